"""LoRA: adapters on the attention and MLP projections, the reference as the same network with them off."""
import copy

import torch

from nanoalign.core import token_logprobs
from nanoalign.model import GPT, GPTConfig, LoRALinear
from nanoalign.tokenizer import byte_tokenizer
from nanoalign.utils import load_checkpoint, save_checkpoint


def tiny(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16))


def ids():
    return torch.randint(40, (3, 12), generator=torch.Generator().manual_seed(1))


def randomise_adapters(model):
    with torch.no_grad():
        for m in model.lora_layers():
            m.lora_B.normal_(0, 0.5)


def test_at_initialisation_the_adapted_model_is_the_base_exactly():
    base = tiny()
    adapted = copy.deepcopy(base).add_lora(rank=4, alpha=8)
    assert len(adapted.lora_layers()) == 4 * 2  # c_attn, attn.c_proj, c_fc, mlp.c_proj in each block
    assert torch.equal(adapted(ids()), base(ids()))
    assert "transformer.h.0.attn.c_attn.weight" in adapted.state_dict()  # GPT-2's names are kept
    assert "transformer.h.0.attn.c_attn.lora_A" in adapted.state_dict()


def test_only_the_adapters_get_gradients():
    model = tiny().add_lora(rank=2, alpha=4)
    randomise_adapters(model)
    x = ids()
    token_logprobs(model(x)[:, :-1], x[:, 1:]).sum().backward()
    for name, p in model.named_parameters():
        if ".lora_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    trained = {id(p) for g in model.configure_optimizer(0.1, 1e-3, (0.9, 0.99), "cpu").param_groups for p in g["params"]}
    assert trained == {id(p) for n, p in model.named_parameters() if ".lora_" in n}


def test_merged_and_unmerged_give_the_same_logits():
    model = tiny().add_lora(rank=4, alpha=8)
    randomise_adapters(model)
    before = model(ids())
    assert not torch.allclose(before, tiny()(ids()), atol=1e-3)  # the adapters do change the output
    model.merge_lora()
    assert not model.lora_layers() and all(p.requires_grad for p in model.parameters())
    assert model.config.lora_rank == 0
    assert torch.allclose(model(ids()), before, atol=1e-5, rtol=0)
    assert type(model.transformer.h[0].attn.c_attn) is torch.nn.Linear


def test_adapters_off_is_the_frozen_base():
    base = tiny()
    model = copy.deepcopy(base).add_lora(rank=4, alpha=8)
    randomise_adapters(model)
    with model.adapters_off():
        assert torch.equal(model(ids()), base(ids()))
    assert not torch.allclose(model(ids()), base(ids()), atol=1e-3)  # and back on afterwards


def test_a_checkpoint_keeps_the_adapters(tmp_path):
    model = tiny().add_lora(rank=3, alpha=6)
    randomise_adapters(model)
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, model, byte_tokenizer())
    loaded, _, _ = load_checkpoint(path)
    assert isinstance(loaded.transformer.h[1].mlp.c_fc, LoRALinear) and loaded.config.lora_rank == 3
    assert torch.equal(loaded(ids()), model(ids()))
    with loaded.adapters_off(), model.adapters_off():
        assert torch.equal(loaded(ids()), model(ids()))
