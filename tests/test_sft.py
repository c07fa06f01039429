"""The SFT loss, checkpoints, and train_sft.py end to end (tiny model, a few steps)."""
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from nanoalign.core import pad, token_logprobs
from nanoalign.losses import sft_loss
from nanoalign.model import GPT, GPTConfig
from nanoalign.tokenizer import byte_tokenizer
from nanoalign.utils import load_checkpoint, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--batch_size=4", "--n_train=200", "--n_eval=8",
        "--warmup_steps=2", "--log_interval=1", "--eval_interval=1000", "--ckpt_interval=1000", "--device=cpu"]


def test_sft_loss_hand_computed():
    """-(sum of masked log-probs) / n: log-probs [-1, -2, -3] with mask [0, 1, 1] and n = 4 -> 1.25."""
    logps = torch.tensor([[-1.0, -2.0, -3.0]])
    assert sft_loss(logps, torch.tensor([[0, 1, 1]]), 4).item() == pytest.approx(1.25)


def test_prompt_tokens_get_no_gradient():
    """The logits at prompt positions get exactly zero gradient; changing a prompt target changes nothing."""
    tok = byte_tokenizer()
    ids, mask = tok.render([{"role": "user", "content": "2+3"}, {"role": "assistant", "content": "5"}])
    ids, mask = torch.tensor([ids]), torch.tensor([mask])
    logits = torch.randn(1, ids.shape[1], tok.n_vocab, requires_grad=True)
    loss = sft_loss(token_logprobs(logits[:, :-1], ids[:, 1:]), mask[:, 1:], mask[:, 1:].sum())
    loss.backward()
    predicts_trained = mask[0, 1:].bool()  # logits[t] predicts token t+1
    assert logits.grad[0, :-1][~predicts_trained].abs().max() == 0
    assert logits.grad[0, :-1][predicts_trained].abs().min() > 0
    assert logits.grad[0, -1].abs().max() == 0  # nothing follows the final EOS
    assert mask[0, -1] == 1 and ids[0, -1] == tok.eos_id  # ...but the EOS itself is trained


def test_gradient_accumulation_equals_full_batch():
    """Micro-batches of unequal token counts, each normalised by the step's total: same gradient as one batch."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=20, n_layer=1, n_head=2, n_embd=16))
    seqs = [torch.randint(0, 20, (n,)).tolist() for n in (5, 12, 7, 20, 3, 9)]
    masks = [[0] * (len(s) // 2) + [1] * (len(s) - len(s) // 2) for s in seqs]
    n = sum(sum(m[1:]) for m in masks)

    def grad(groups):
        model.zero_grad()
        for g in groups:
            ids, _ = pad([seqs[i] for i in g], 0)
            lm, _ = pad([masks[i] for i in g], 0)
            sft_loss(token_logprobs(model(ids)[:, :-1], ids[:, 1:]), lm[:, 1:], n).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    full = grad([[0, 1, 2, 3, 4, 5]])
    assert torch.allclose(grad([[0, 1], [2, 3], [4, 5]]), full, atol=1e-6)
    assert torch.allclose(grad([[3], [0, 1, 2, 4, 5]]), full, atol=1e-6)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model, tok = GPT(GPTConfig(block_size=16, vocab_size=261, n_layer=1, n_head=2, n_embd=16)), byte_tokenizer()
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, model, tok, step=7)
    loaded, tok2, ckpt = load_checkpoint(path)
    x = torch.randint(0, 261, (2, 10))
    assert torch.equal(model(x), loaded(x)) and ckpt["step"] == 7 and tok2.spec == tok.spec
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > " + os.environ["EXPLOIT_MARK"],))


def test_checkpoint_cannot_run_code(tmp_path, monkeypatch):
    """A checkpoint carrying a pickled callable is refused (weights_only=True) and the code never runs."""
    mark = tmp_path / "pwned"
    monkeypatch.setenv("EXPLOIT_MARK", str(mark))
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "model_config": {}, "tokenizer": {"kind": "byte"}, "x": Exploit()}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(str(path))
    assert not mark.exists()


def run_sft(out_dir, *args):
    r = subprocess.run([sys.executable, "train_sft.py", f"--out_dir={out_dir}", *TINY, *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(l) for l in open(os.path.join(out_dir, "metrics.jsonl"))]


def test_train_sft_end_to_end(tmp_path):
    """A tiny run writes a loadable checkpoint, metrics.jsonl and summary.json with start and final gold."""
    out = tmp_path / "sft"
    metrics = run_sft(out, "--max_steps=6", "--lr=1e-2")
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 6 and losses[-1] < losses[0]
    summary = json.load(open(out / "summary.json"))
    for key in ("gold", "pass", "length", "eos"):
        assert key in summary["start"] and key in summary["final"]
    model, tok, ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["step"] == 6 and model.config.n_embd == 32 and tok.spec == {"kind": "byte"}


def test_train_sft_accumulation_split_does_not_change_the_step(tmp_path):
    """batch_size 8 x grad_accum 1 and 4 x 2 see the same examples: same loss and gradient norm."""
    a = run_sft(tmp_path / "a", "--max_steps=2", "--batch_size=8", "--grad_accum=1")
    b = run_sft(tmp_path / "b", "--max_steps=2", "--batch_size=4", "--grad_accum=2")
    for ma, mb in zip(a, b):
        if "loss" in ma:
            assert ma["loss"] == pytest.approx(mb["loss"], rel=1e-5)
            assert ma["grad_norm"] == pytest.approx(mb["grad_norm"], rel=1e-4)


def test_train_sft_resume_is_exact(tmp_path):
    """4 steps straight = 2 steps, stop, resume to 4: identical weights, and the resumed metrics.jsonl holds
    steps 1-4 once each; running again without resume starts the log anew."""
    straight = run_sft(tmp_path / "straight", "--max_steps=4", "--lr_decay_steps=4")
    run_sft(tmp_path / "resumed", "--max_steps=2", "--lr_decay_steps=4")
    resumed = run_sft(tmp_path / "resumed", "--max_steps=4", "--lr_decay_steps=4", "--resume=True")
    steps = lambda lines: [m["step"] for m in lines if "loss" in m]
    assert steps(resumed) == steps(straight) and len(steps(straight)) == len(set(steps(straight))) > 1
    assert steps(run_sft(tmp_path / "straight", "--max_steps=4", "--lr_decay_steps=4")) == steps(straight)
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)
    c = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)
    assert c["step"] == 4


def test_train_sft_help_lists_every_key():
    r = subprocess.run([sys.executable, "train_sft.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0
    for key in ("max_steps", "lr", "grad_accum", "init_from", "data_path", "compile", "dtype"):
        assert f"--{key}=" in r.stdout


def test_train_sft_rejects_unknown_and_mistyped_keys():
    for bad in ("--no_such_key=1", "--max_steps=abc"):
        r = subprocess.run([sys.executable, "train_sft.py", bad], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode != 0 and ("unknown config key" in r.stderr or "must be int" in r.stderr)


def test_train_sft_on_a_file(tmp_path):
    """Real-data path: an SFT JSONL file, val split, no gold scorer."""
    path = tmp_path / "sft.jsonl"
    with open(path, "w") as f:
        for i in range(40):
            f.write(json.dumps({"prompt": f"say {i}", "response": f"{i}!"}) + "\n")
    run_sft(tmp_path / "f", f"--data_path={path}", "--max_steps=2")
    summary = json.load(open(tmp_path / "f" / "summary.json"))
    assert "val_loss" in summary and "final" not in summary


def test_train_sft_from_a_gpt2_checkpoint(tmp_path):
    """init_from=<GPT-2 dir> with a gpt2:<file> tokenizer: the published layout is loaded, the vocabulary
    grows by the chat special tokens, and training runs. (Tiny random weights and a local rank file.)"""
    import base64
    from nanoalign.model import write_safetensors
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    C, V, P = 8, 50257, 64
    json.dump({"vocab_size": V, "n_positions": P, "n_embd": C, "n_layer": 1, "n_head": 2}, open(gpt2 / "config.json", "w"))
    g = torch.Generator().manual_seed(0)
    shapes = {"wte.weight": (V, C), "wpe.weight": (P, C), "ln_f.weight": (C,), "ln_f.bias": (C,)}
    for name, shape in {"ln_1": (C,), "ln_2": (C,)}.items():
        shapes.update({f"h.0.{name}.weight": shape, f"h.0.{name}.bias": shape})
    shapes.update({"h.0.attn.c_attn.weight": (C, 3 * C), "h.0.attn.c_attn.bias": (3 * C,),  # Conv1D: [in, out]
                   "h.0.attn.c_proj.weight": (C, C), "h.0.attn.c_proj.bias": (C,),
                   "h.0.mlp.c_fc.weight": (C, 4 * C), "h.0.mlp.c_fc.bias": (4 * C,),
                   "h.0.mlp.c_proj.weight": (4 * C, C), "h.0.mlp.c_proj.bias": (C,)})
    write_safetensors({k: 0.1 * torch.randn(s, generator=g) for k, s in shapes.items()}, gpt2 / "model.safetensors")
    ranks = tmp_path / "bytes.tiktoken"
    # every id the random model can sample (samples.jsonl) must decode: the 256 bytes and 50,000 two-byte tokens
    pieces = [bytes([i]) for i in range(256)] + [bytes([i // 256, i % 256]) for i in range(50000)]
    ranks.write_text("".join(f"{base64.b64encode(b).decode()} {i}\n" for i, b in enumerate(pieces)))
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(20)))
    run_sft(tmp_path / "out", f"--init_from={gpt2}", f"--tokenizer=gpt2:{ranks}", f"--data_path={sft}",
            "--max_steps=2")
    model, tok, _ = load_checkpoint(str(tmp_path / "out" / "ckpt.pt"))
    assert model.config.vocab_size == tok.n_vocab == 50262 and tok.eos_id == 50260
    assert tok.spec == {"kind": "gpt2", "path": str(ranks)}
