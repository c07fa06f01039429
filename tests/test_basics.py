"""The training basics of every stage: gradient accumulation and activation checkpointing (the same step as one
plain batch), LoRA wiring (only adapters train, the reference is the frozen start, merged checkpoints), a GPT-2
directory as --init_from for DPO, GRPO and PPO, top-k sampling, and SFT's samples.jsonl."""
import base64
import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from nanoalign.core import token_logprobs
from nanoalign.heads import ScalarModel
from nanoalign.model import GPT, GPTConfig
from nanoalign.sampling import generate
from nanoalign.tokenizer import byte_tokenizer, get_tokenizer
from nanoalign.utils import (CheckpointError, init_model, load_checkpoint, reference_model, resume_checkpoint,
                             save_checkpoint)

from helpers import random_head_rm, write_gpt2_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def tiny(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=dropout))


def ids():
    return torch.randint(40, (3, 12), generator=torch.Generator().manual_seed(1))


def grads(model, x, mask=None):
    model.zero_grad()
    torch.manual_seed(7)  # the same dropout masks in both runs
    token_logprobs(model(x, mask)[:, :-1], x[:, 1:]).sum().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


# ------------------------------------------------------------------------------ activation checkpointing

def test_grad_ckpt_gives_the_same_gradients_and_saves_less():
    """With dropout and a padding mask: the same gradients as the plain forward, also in eval mode (PPO trains
    in eval mode), while the forward keeps fewer tensors for the backward."""
    model = tiny(dropout=0.1).train()
    x, mask = ids(), torch.ones(3, 12, dtype=torch.bool)
    mask[0, :4] = False  # left padding in one row
    plain = grads(model, x, mask)
    model.grad_ckpt = True
    assert torch.allclose(grads(model, x, mask), plain, atol=1e-6, rtol=0)
    model.eval()
    model.grad_ckpt = False
    plain_eval = grads(model, x, mask)
    model.grad_ckpt = True
    assert torch.allclose(grads(model, x, mask), plain_eval, atol=1e-6, rtol=0)

    def n_saved(m):
        count = [0]
        with torch.autograd.graph.saved_tensors_hooks(lambda t: count.__setitem__(0, count[0] + 1) or t, lambda t: t):
            m(x, mask).sum()
        return count[0]
    model.grad_ckpt = False
    full = n_saved(model)
    model.grad_ckpt = True
    assert n_saved(model) < full / 2


def test_grad_ckpt_is_off_where_nothing_is_trained():
    """Sampling (KV cache, no_grad) with grad_ckpt on decodes exactly what it does with it off."""
    model = tiny()
    prompts = [[1, 2, 3], [4, 5]]
    a = generate(model, prompts, 6, eos_id=0, pad_id=39, generator=torch.Generator().manual_seed(0))
    model.grad_ckpt = True
    b = generate(model, prompts, 6, eos_id=0, pad_id=39, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ------------------------------------------------------------------------------ LoRA: reference, checkpoints

def test_frozen_base_is_the_start_however_the_adapters_train():
    base = tiny()
    model = copy.deepcopy(base).add_lora(rank=4, alpha=8)
    opt = model.configure_optimizer(0.0, 1e-1, (0.9, 0.99), "cpu")
    for _ in range(3):
        token_logprobs(model(ids())[:, :-1], ids()[:, 1:]).sum().neg().backward()
        opt.step(), opt.zero_grad()
    ref = reference_model(model, "unused: LoRA needs no second copy", "", "cpu")
    assert list(ref.parameters()) == [] and ref.state_dict() == {}
    model.train()
    out = ref(ids())
    assert torch.equal(out, base(ids())) and not out.requires_grad
    assert model.training and all(m.enabled for m in model.lora_layers())  # left as it was
    assert not torch.allclose(model(ids()), base(ids()), atol=1e-3)  # the adapters did train


def test_a_merged_checkpoint_is_a_plain_gpt_and_is_not_resumed(tmp_path):
    model = tiny().add_lora(rank=4, alpha=8)
    with torch.no_grad():
        for m in model.lora_layers():
            m.lora_B.normal_(0, 0.5)
    tok = byte_tokenizer()
    save_checkpoint(str(tmp_path / "lora.pt"), model, tok)
    save_checkpoint(str(tmp_path / "merged.pt"), model, tok, merge_lora=True, step=3)
    assert model.lora_layers()  # the live model keeps its adapters
    merged, _, ckpt = load_checkpoint(str(tmp_path / "merged.pt"))
    assert not merged.lora_layers() and merged.config.lora_rank == 0 and ckpt["lora_merged"] == {"rank": 4, "alpha": 8}
    assert not any("lora_" in k for k in ckpt["model"])
    assert torch.allclose(merged(ids()), model(ids()), atol=1e-5, rtol=0)
    with pytest.raises(CheckpointError, match="lora_merge=False"):
        resume_checkpoint(str(tmp_path / "merged.pt"), True)
    # a later stage starting from the unmerged checkpoint gets the adapters merged, every weight trainable
    start, _ = init_model(str(tmp_path / "lora.pt"), "", {}, "cpu", expect="gpt")
    assert not start.lora_layers() and all(p.requires_grad for p in start.parameters())
    assert torch.allclose(start(ids()), model(ids()), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ the stages, end to end

def run_all(*commands):
    """Run the scripts side by side (2 cores); each command is (script, args). -> their stdouts."""
    procs = [subprocess.Popen([sys.executable, s, *a, "--device=cpu"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for s, a in commands]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [o for o, _ in outs]


def metrics(out):
    return [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]


def assert_same_steps(a, b, keys, rel=1e-5):
    """Every logged step of runs a and b agrees on `keys`: the first step's loss and gradient norm, and the later
    steps' values, which are computed with the weights the earlier updates made. (Not the weights themselves:
    AdamW turns a parameter's float-noise gradient, e.g. a reward head's bias, which cancels in r_c - r_r, into a
    full lr-sized step of either sign.)"""
    rows = [(x, y) for x, y in zip(metrics(a), metrics(b)) if keys[0] in x]
    assert len(rows) >= 2
    for x, y in rows:
        for k in keys:
            assert x[k] == pytest.approx(y[k], rel=rel, abs=1e-5), (k, x, y)  # logs keep 6 decimals


def test_sft_accumulation_with_grad_ckpt_and_lora_is_the_same_step(tmp_path):
    """SFT with LoRA: 8 x 1 plain and 4 x 2 with activation checkpointing take the same steps."""
    common = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--n_train=200", "--n_eval=4", "--max_steps=2",
              "--eval_interval=2", "--log_interval=1", "--lr=1e-2", "--lora_rank=4", "--lora_merge=False"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run_all(("train_sft.py", [f"--out_dir={a}", "--batch_size=8", "--grad_accum=1", *common]),
            ("train_sft.py", [f"--out_dir={b}", "--batch_size=4", "--grad_accum=2", "--grad_ckpt=True", *common]))
    assert_same_steps(a, b, ["loss", "grad_norm"])


def test_rm_accumulation_and_grad_ckpt_are_the_same_step(tmp_path, sft_ckpt):
    """Outcome RM with the head on the body (the body trains, so checkpointing has work to do)."""
    common = [f"--init_from={sft_ckpt}", "--n_train=100", "--n_eval=20", "--max_steps=2", "--eval_interval=2",
              "--log_interval=1", "--top_blocks=0", "--normalize=False", "--lr=1e-2", "--warmup_steps=1"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run_all(("train_rm.py", [f"--out_dir={a}", "--batch_size=8", *common]),
            ("train_rm.py", [f"--out_dir={b}", "--batch_size=4", "--grad_accum=2", "--grad_ckpt=True", *common]))
    assert_same_steps(a, b, ["loss", "grad_norm", "acc", "margin"])
    assert metrics(a)[1]["loss"] != pytest.approx(math.log(2), abs=1e-4)  # the second step is not a trivial one


@pytest.mark.parametrize("loss", ["dpo", "kto"])
def test_dpo_accumulation_and_grad_ckpt_are_the_same_step(tmp_path, sft_ckpt, loss):
    """8 pairs x 1 and 4 x 2 (checkpointed): the same loss, implicit rewards, gradient norm and weights. KTO's z0
    is the whole step's."""
    common = [f"--init_from={sft_ckpt}", f"--loss={loss}", "--n_train=40", "--n_eval=4", "--n_eval_pairs=20",
              "--max_steps=2", "--eval_interval=2", "--log_interval=1", "--lr=1e-2"]
    keys = ["loss", "grad_norm", "rewards/chosen", "rewards/margins", "rewards/accuracies"] if loss == "dpo" else \
        ["loss", "grad_norm", "kl_z0", "rewards/desirable", "rewards/undesirable"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run_all(("train_dpo.py", [f"--out_dir={a}", "--batch_size=8", *common]),
            ("train_dpo.py", [f"--out_dir={b}", "--batch_size=4", "--grad_accum=2", "--grad_ckpt=True", *common]))
    assert_same_steps(a, b, keys)


@pytest.mark.parametrize("agg", ["seq_mean", "token_mean"])  # "constant" shares by sequences, as seq_mean
def test_grpo_accumulation_and_grad_ckpt_are_the_same_step(tmp_path, sft_ckpt, agg):
    """Each minibatch in 1 or 3 micro-batches (of unequal sizes and token counts), with the k3 KL term."""
    common = [f"--init_from={sft_ckpt}", f"--agg={agg}", "--prompts_per_step=2", "--group_size=4", "--max_steps=2",
              "--eval_interval=2", "--n_eval=2", "--eval_k=2", "--max_new_tokens=12", "--beta=0.05", "--mu=2",
              "--minibatches=2", "--lr=1e-2"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run_all(("train_grpo.py", [f"--out_dir={a}", *common]),
            ("train_grpo.py", [f"--out_dir={b}", "--grad_accum=3", "--grad_ckpt=True", *common]))
    assert_same_steps(a, b, ["loss", "grad_norm", "kl", "clip_low", "reward"])


@pytest.fixture(scope="module")
def outcome_rm(sft_ckpt, tmp_path_factory):
    gpt, tok, _ = load_checkpoint(sft_ckpt)
    rm = random_head_rm(gpt)
    path = str(tmp_path_factory.mktemp("rm") / "ckpt.pt")
    save_checkpoint(path, rm, tok, rm_kind="outcome")
    return path


def test_ppo_accumulation_and_grad_ckpt_are_the_same_step(tmp_path, sft_ckpt, outcome_rm, critic="rm"):
    """Each minibatch in 1 or 3 micro-batches: token means over the minibatch's real tokens, policy and critic."""
    common = [f"--init_from={sft_ckpt}", f"--reward_model={outcome_rm}", f"--critic={critic}", "--batch_size=4",
              "--max_iters=2", "--ppo_epochs=2", "--minibatches=1", "--eval_interval=2", "--n_eval=2",
              "--max_new_tokens=10", "--lr=1e-2", "--vf_lr=1e-2", "--warmup_iters=1", "--ent_coef=0.01"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    run_all(("train_ppo.py", [f"--out_dir={a}", *common]),
            ("train_ppo.py", [f"--out_dir={b}", "--grad_accum=3", "--grad_ckpt=True", *common]))
    assert_same_steps(a, b, ["pg_loss", "vf_loss", "grad_norm", "approx_kl", "clipfrac", "kl", "rm"])
    assert metrics(a)[1]["kl"] != 0  # the policy moved: step 2's rollouts come from the updated policy


def test_lora_dpo_trains_only_adapters_against_the_frozen_start(tmp_path, sft_ckpt):
    """A DPO run with LoRA and a live reference: every base weight stays the SFT model's, the adapters train, the
    reference is the SFT model (rewards move after the first step: the reference is not the live policy), and the
    merged final checkpoint is a plain GPT computing what the unmerged one does."""
    common = [f"--init_from={sft_ckpt}", "--n_train=40", "--n_eval=4", "--n_eval_pairs=20", "--batch_size=4",
              "--max_steps=2", "--eval_interval=2", "--log_interval=1", "--lr=1e-2", "--lora_rank=4", "--ref=live"]
    a, b = str(tmp_path / "lora"), str(tmp_path / "merged")
    run_all(("train_dpo.py", [f"--out_dir={a}", "--lora_merge=False", *common]),
            ("train_dpo.py", [f"--out_dir={b}", *common]))
    sft = torch.load(sft_ckpt, weights_only=True)["model"]
    ckpt = torch.load(os.path.join(a, "ckpt.pt"), weights_only=True)
    assert ckpt["model_config"]["lora_rank"] == 4
    lora = {k: v for k, v in ckpt["model"].items() if ".lora_" in k}
    assert len(lora) == 2 * 4 and any(v.abs().sum() > 0 for k, v in lora.items() if k.endswith("lora_B"))
    assert all(torch.equal(ckpt["model"][k], sft[k]) for k in sft)  # the base never moved
    steps = [m for m in metrics(a) if "loss" in m]
    assert steps[0]["rewards/chosen"] == 0 and steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert steps[1]["rewards/chosen"] != 0  # policy != reference after a step
    policy, tok, _ = load_checkpoint(os.path.join(a, "ckpt.pt"))
    sft_model = load_checkpoint(sft_ckpt)[0]
    x = torch.tensor([tok.render_prompt([{"role": "user", "content": "1+2+3"}])])
    with policy.adapters_off():
        assert torch.equal(policy(x), sft_model(x))  # the reference it trained against: the SFT model exactly
    merged, _, mckpt = load_checkpoint(os.path.join(b, "ckpt.pt"))
    assert not merged.lora_layers() and mckpt["lora_merged"]
    assert torch.allclose(merged(x), policy(x), atol=1e-5, rtol=0)
    assert metrics(a) == metrics(b)  # merging at the end changes nothing the run computed


# ------------------------------------------------------------------------------ GPT-2 directories, top-k

def test_dpo_grpo_ppo_start_from_a_gpt2_directory(tmp_path):
    """--init_from=<GPT-2 dir> --tokenizer=gpt2:<file> in the three policy stages (GRPO with a KL reference from
    the same directory), on files in their formats; PPO's reward model shares the tokenizer."""
    gpt2, ranks = tmp_path / "gpt2", tmp_path / "ranks.tiktoken"
    write_gpt2_dir(gpt2)
    # every id a random GPT-2 can sample must decode: the 256 bytes and 50,000 two-byte tokens (no download)
    pieces = [bytes([i]) for i in range(256)] + [bytes([i // 256, i % 256]) for i in range(50000)]
    ranks.write_text("".join(f"{base64.b64encode(b).decode()} {i}\n" for i, b in enumerate(pieces)))
    tok = get_tokenizer(f"gpt2:{ranks}")
    rm = ScalarModel(GPT.from_pretrained(str(gpt2), vocab_size=tok.n_vocab))
    save_checkpoint(str(tmp_path / "rm.pt"), rm, tok, rm_kind="outcome")
    pref, problems = tmp_path / "pref.jsonl", tmp_path / "gsm.jsonl"
    pref.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"}) + "\n"
                            for i in range(12)))
    problems.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"}) + "\n"
                                for i in range(8)))
    start = [f"--init_from={gpt2}", f"--tokenizer=gpt2:{ranks}"]
    run_all(("train_dpo.py", [*start, f"--out_dir={tmp_path / 'dpo'}", f"--data_path={pref}", "--batch_size=4",
                              "--max_steps=1", "--log_interval=1", "--n_eval=2", "--n_eval_pairs=4"]),
            ("train_grpo.py", [*start, f"--out_dir={tmp_path / 'grpo'}", f"--data_path={problems}", "--beta=0.1",
                               "--prompts_per_step=2", "--group_size=2", "--max_steps=1", "--n_eval=2", "--eval_k=1",
                               "--max_new_tokens=6"]),
            ("train_ppo.py", [*start, f"--out_dir={tmp_path / 'ppo'}", f"--reward_model={tmp_path / 'rm.pt'}",
                              "--batch_size=2", "--max_iters=1", "--ppo_epochs=1", "--minibatches=1", "--n_eval=2",
                              "--max_new_tokens=6"]))
    for stage in ("dpo", "grpo", "ppo"):
        model, t, _ = load_checkpoint(str(tmp_path / stage / "ckpt.pt"))
        assert model.config.vocab_size == t.n_vocab == 50262 and t.spec == tok.spec, stage
    first = [m for m in metrics(str(tmp_path / "dpo")) if "loss" in m][0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # the reference is the same GPT-2 as the policy


def test_grpo_top_k_1_samples_every_group_alike(tmp_path, sft_ckpt):
    """--top_k=1 reaches the sampler: each prompt's G samples are the same argmax decode, so every group's
    rewards tie (zero_std_frac 1); --top_p=0 is refused."""
    run_all(("train_grpo.py", [f"--init_from={sft_ckpt}", f"--out_dir={tmp_path}", "--top_k=1", "--prompts_per_step=3",
                               "--group_size=3", "--max_steps=1", "--n_eval=2", "--eval_k=1", "--max_new_tokens=8"]))
    assert metrics(str(tmp_path))[0]["zero_std_frac"] == 1.0
    r = subprocess.run([sys.executable, "train_grpo.py", "--top_p=0", "--device=cpu"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True)
    assert r.returncode == 1 and "top_p must be a number > 0 and <= 1" in r.stderr


# ------------------------------------------------------------------------------ SFT samples

def test_sft_writes_held_out_samples_at_each_eval(tmp_path):
    """samples.jsonl: n_samples held-out prompts (never training prompts) with the model's response, per eval."""
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"say {i}", "response": f"{i}!"}) + "\n" for i in range(40)))
    out = tmp_path / "out"
    run_all(("train_sft.py", [f"--out_dir={out}", f"--data_path={path}", "--n_layer=1", "--n_head=2", "--n_embd=32",
                              "--batch_size=4", "--max_steps=2", "--eval_interval=1", "--n_samples=3",
                              "--val_frac=0.2", "--sample_tokens=8"]))
    rows = [json.loads(l) for l in open(out / "samples.jsonl")]
    assert [r["step"] for r in rows] == [1, 1, 1, 2, 2, 2]
    assert all(set(r) == {"step", "prompt", "response", "ended"} and isinstance(r["response"], str) for r in rows)
    from nanoalign import data
    train, val = data.split_by_prompt(data.load(str(path), "sft")[0], 0.2, 1337)
    held_out = {c["messages"][0]["content"] for c in val}
    assert {r["prompt"] for r in rows} <= held_out and len({r["prompt"] for r in rows}) == 3
    assert "val_loss" in json.load(open(out / "summary.json"))
