"""torchrun (nanoalign/dist.py): two CPU processes (gloo) train exactly as one process with the same global batch.

The single-process runs go in this process; the two-rank runs all go in ONE `torch.distributed.run` job that runs
this file as its script (the __main__ block at the bottom: each rank runs the stage scripts one after the other,
in process), so torch is imported three times, not thirty. Compared: every logged number of every step (losses,
rewards, KL, whitened advantages' effects...) and the final weights, to 1e-5.
"""
import contextlib
import io
import json
import os
import random
import runpy
import shutil
import subprocess
import sys

import pytest
import torch

from nanoalign import dist
from nanoalign.core import masked_whiten
from nanoalign.heads import ScalarModel
from nanoalign.losses import group_advantages
from nanoalign.model import GPT, GPTConfig
from nanoalign.sampling import generate
from nanoalign.tokenizer import byte_tokenizer
from nanoalign.utils import ConfigError, load_checkpoint, save_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ("elapsed_s", "tok_per_s", "checkpoint")  # wall-clock numbers and the out_dir differ between runs anyway
# Losses and weights within TOL (relative, or absolute below 1); the other statistics, sums of many float32 terms or
# differences of such sums (eval/kl: of ~50 log-probs each), within STAT_TOL. The models have no biases: an attention key bias (and a
# Bradley-Terry head's bias, unless centred) gets a zero gradient by symmetry (softmax ignores a shift common to a
# row, r_c - r_r one common to both), so rounding alone drives it, and Adam turns any rounding into a +-lr step.
TOL, STAT_TOL = 1e-5, 1e-4


def run_here(script, *args):
    """`python script *args` in this process (the same code and numbers, without importing torch again), on one
    thread as each rank runs: a thread count is a summation order, and Adam makes rounding visible (see TOL)."""
    argv, hook, cwd, rng, threads = sys.argv, sys.excepthook, os.getcwd(), torch.get_rng_state(), torch.get_num_threads()
    sys.argv = [script, "--device=cpu", *map(str, args)]
    os.chdir(ROOT)
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    finally:  # what the script set for its own process goes back
        sys.argv, sys.excepthook = argv, hook
        os.chdir(cwd)
        torch.set_rng_state(rng)
        torch.set_num_threads(threads)
    return out.getvalue()


def stage_runs(d):
    """(name, script, args) of every compared run, writing under directory d. The RL runs start from a policy
    whose rollouts end and whose rewards differ within a batch (so their steps have gradients)."""
    coin = f"--init_from={d / 'coin' / 'ckpt.pt'}"
    return [
        ("sft", "train_sft.py", [f"--init_from={d / 'base.pt'}", "--batch_size=8", "--grad_accum=2",
                                 "--n_train=200", "--n_eval=4", "--max_steps=3", "--log_interval=1",
                                 "--eval_interval=3", "--lr=1e-2", "--warmup_steps=1"]),
        ("dpo", "train_dpo.py", [coin, "--n_train=40", "--n_eval=4", "--n_eval_pairs=8", "--batch_size=4",
                                 "--grad_accum=2", "--max_steps=3", "--eval_interval=3", "--log_interval=1",
                                 "--lr=1e-3", "--warmup_steps=1"]),
        # KTO's z0 (the mean over the whole step of mismatched pairs) away from its clamp at 0: see kto.jsonl
        ("kto", "train_dpo.py", [coin, "--loss=kto", f"--data_path={d / 'kto.jsonl'}", "--n_eval=4", "--batch_size=4",
                                 "--max_steps=3", "--eval_interval=3", "--log_interval=1", "--lr=1e-3",
                                 "--warmup_steps=1"]),
        ("rm", "train_rm.py", [coin, "--n_train=40", "--n_eval=8", "--n_norm=8", "--batch_size=4", "--grad_accum=2",
                               "--max_steps=3", "--eval_interval=3", "--log_interval=1", "--lr=1e-2",
                               "--center_coef=0.01"]),  # centring: the head's bias gets a gradient (see TOL)
        # DAPO-style: batch-std scaling, the token-mean denominator, dynamic sampling; mu=2 over 2 minibatches
        ("grpo", "train_grpo.py", [coin, f"--data_path={d / 'problems.jsonl'}", "--prompts_per_step=4",
                                   "--group_size=4", "--mu=2", "--minibatches=2", "--beta=0.05", "--scale=batch",
                                   "--agg=token_mean", "--dynamic_sampling=True", "--max_steps=3", "--eval_interval=3",
                                   "--n_eval=4", "--eval_k=2", "--max_new_tokens=10", "--lr=1e-3",
                                   "--warmup_steps=1"]),
        # advantage (and reward) whitening over the batch, adaptive KL
        ("ppo", "train_ppo.py", [coin, f"--reward_model={d / 'rm.pt'}", "--batch_size=8", "--max_iters=3", "--ppo_epochs=2", "--minibatches=2",
                                 "--whiten_rewards=True", "--eval_interval=3", "--n_eval=4", "--max_new_tokens=10",
                                 "--lr=1e-3", "--warmup_iters=1", "--horizon=50"]),
    ]


# SFT resumed under torchrun: straight to 4 steps, vs 2 steps and --resume=True to 4; then, as after a kill,
# the step-2 checkpoint put back under the finished log and resumed again. Dropout on: each rank's own RNG.
RESUME = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--batch_size=4", "--n_train=200", "--n_eval=4",
          "--log_interval=1", "--eval_interval=2", "--lr_decay_steps=4", "--warmup_steps=1", "--dropout=0.2"]


def dist_jobs(d):
    jobs = [("helpers",)] + [(script, [f"--out_dir={d / 'two' / name}", *args]) for name, script, args in stage_runs(d)]
    straight, resumed = d / "two" / "resume_straight", d / "two" / "resumed"
    jobs += [("train_sft.py", [f"--out_dir={straight}", *RESUME, "--max_steps=4"]),
             ("train_sft.py", [f"--out_dir={resumed}", *RESUME, "--max_steps=2"]),
             ("copy", str(resumed / "ckpt.pt"), str(d / "two" / "ckpt_2.pt")),
             ("train_sft.py", [f"--out_dir={resumed}", *RESUME, "--max_steps=4", "--resume=True"]),
             ("copy", str(resumed / "ckpt.pt"), str(d / "two" / "ckpt_4.pt")),
             ("copy", str(d / "two" / "ckpt_2.pt"), str(resumed / "ckpt.pt")),  # the log has 4 steps, the ckpt 2
             ("train_sft.py", [f"--out_dir={resumed}", *RESUME, "--max_steps=4", "--resume=True"])]
    return jobs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every stage run once in this process and once under torchrun with two ranks. -> the directory."""
    d = tmp_path_factory.mktemp("dist")
    rng, answers = random.Random(0), ["1+1=2;#2", "1+2=3;#3", "2+2=4;#4"]
    (d / "coin.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "response": rng.choice(answers)}) + "\n"
                                          for i in range(100)))
    (d / "kto.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "completion": answers[i % 4 // 3],
                                                      "label": i % 4 < 3}) + "\n" for i in range(40)))
    (d / "problems.jsonl").write_text("".join(json.dumps({"question": f"q{i}", "answer": "#### 2"}) + "\n"
                                              for i in range(40)))
    torch.manual_seed(0)
    save_checkpoint(str(d / "base.pt"), GPT(GPTConfig(vocab_size=byte_tokenizer().n_vocab, n_layer=1, n_head=2,
                                                      n_embd=32, bias=False)), byte_tokenizer())
    run_here("train_sft.py", f"--out_dir={d / 'coin'}", f"--data_path={d / 'coin.jsonl'}", f"--init_from={d / 'base.pt'}",
             "--batch_size=16", "--max_steps=30", "--lr=1e-2", "--warmup_steps=2", "--eval_interval=1000")
    gpt, tok, _ = load_checkpoint(str(d / "coin" / "ckpt.pt"))
    rm = ScalarModel(gpt)  # an untrained outcome RM whose scores differ between responses
    torch.nn.init.normal_(rm.head.weight, std=0.3)
    save_checkpoint(str(d / "rm.pt"), rm, tok, rm_kind="outcome")
    for name, script, args in stage_runs(d):
        run_here(script, f"--out_dir={d / 'one' / name}", *args)
    (d / "jobs.json").write_text(json.dumps([[str(x) if not isinstance(x, list) else x for x in j]
                                             for j in dist_jobs(d)]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.abspath(__file__), str(d / "jobs.json")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    (d / "torchrun.out").write_text(r.stdout)
    return d


def rows(out):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in open(os.path.join(out, "metrics.jsonl"))]


def close(a, b, key=""):
    """Two metrics.jsonl rows (or summaries) with the same keys and numbers within TOL (losses) or STAT_TOL (the
    other statistics); anything else equal."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(close(a[k], b[k], k) for k in a if k not in TIMING)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(close(x, y, key) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, (int, float)):
        return abs(a - b) <= (TOL if "loss" in key else STAT_TOL) * max(1.0, abs(a))
    return a == b


def max_weight_diff(a, b):
    wa, wb = (torch.load(p, map_location="cpu", weights_only=True)["model"] for p in (a, b))
    assert wa.keys() == wb.keys()
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


@pytest.mark.parametrize("name", ["sft", "dpo", "kto", "rm", "grpo", "ppo"])
def test_two_ranks_train_as_one_process(runs, name):
    """The same losses, statistics and evaluations at every step, the same summary and the same final weights."""
    one, two = runs / "one" / name, runs / "two" / name
    r1, r2 = rows(one), rows(two)
    assert len(r1) == len(r2) and len(r1) >= 3
    for a, b in zip(r1, r2):
        if abs(a.get("rewards/margins", 1.0)) < TOL:  # policy = reference (a first step): rewards tie, up to rounding,
            a.pop("rewards/accuracies"), b.pop("rewards/accuracies")  # so "chosen > rejected" is a coin toss
        assert close(a, b), (a, b)
    assert close(json.load(open(one / "summary.json")), json.load(open(two / "summary.json")))
    assert max_weight_diff(one / "ckpt.pt", two / "ckpt.pt") <= TOL
    # it trained (two untouched models would prove nothing): the policy moved; the RM's head left its zero init
    if name == "rm":
        assert torch.load(one / "ckpt.pt", weights_only=True)["model"]["head.weight"].abs().max() > 1e-4
    else:
        assert max_weight_diff(runs / ("base.pt" if name == "sft" else "coin/ckpt.pt"), one / "ckpt.pt") > 1e-4
    if name == "kto":  # z0 left its clamp: a z0 of each rank's own examples would have differed
        assert max(r.get("kl_z0", 0) for r in r1) > 1e-3


def test_resume_under_torchrun(runs):
    """Stopped at step 2 and resumed to 4 (dropout on: each rank's own RNG comes back) equals the run straight to
    4; after a replayed kill (step-2 checkpoint, a log of 4 steps) the log drops the repeated rows."""
    two = runs / "two"
    assert rows(two / "resumed") == rows(two / "resume_straight")
    assert max_weight_diff(two / "ckpt_4.pt", two / "resume_straight" / "ckpt.pt") == 0
    assert max_weight_diff(two / "resumed" / "ckpt.pt", two / "resume_straight" / "ckpt.pt") == 0
    assert "resumed from" in (runs / "torchrun.out").read_text()
    assert len(torch.load(two / "ckpt_2.pt", weights_only=True)["rng_ranks"]) == 2


def test_only_rank_0_writes_and_prints(runs):
    out = (runs / "torchrun.out").read_text()
    assert out.count("wrote ") == sum(1 for j in dist_jobs(runs) if j[0].endswith(".py"))  # one line per run


def test_sharded_sampling_equals_the_whole_batch():
    """generate's rows=(first, total): each share samples the tokens the whole batch gives its rows (the noise of
    the whole batch, multinomial's own method) with top-k too, and a whole batch samples exactly as before."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=20, n_layer=1, n_head=2, n_embd=16))
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10], [2, 2], [3]]
    for kw in ({}, {"top_k": 5}):
        full = generate(model, prompts, 12, 0, 19, generator=torch.Generator().manual_seed(1), **kw)
        assert torch.equal(generate(model, prompts, 12, 0, 19, generator=torch.Generator().manual_seed(1),
                                    rows=(0, 6), **kw)[0], full[0])
        for lo, hi in ((0, 2), (2, 6), (3, 4)):
            part = generate(model, prompts[lo:hi], 12, 0, 19, generator=torch.Generator().manual_seed(1),
                            rows=(lo, 6), **kw)
            n = part[0].shape[1]
            assert torch.equal(part[0], full[0][lo:hi, :n]) and torch.equal(part[1], full[1][lo:hi, :n])
            assert not full[1][lo:hi, n:].any()  # what the share did not sample is padding in the whole batch too
        assert full[1].sum() > 20  # real samples (several tokens), not all empty


def test_one_process_helpers_are_the_identity():
    x = [1, 2, 3]
    assert dist.shard(x) is x and dist.share(5, 4) == slice(0, 20) and dist.all_reduce(2.5) == 2.5
    t = torch.arange(6.0).view(2, 3)
    assert dist.all_gather_cat(t) is t and dist.all_gather_objects("a") == ["a"] and dist.broadcast_object(7) == 7


# ------------------------------------------------------------------------------ the two-rank job (torchrun)

def check_helpers():
    """dist's collectives on two gloo ranks, against what one process computes on the whole batch."""
    dist.setup("cpu")
    r = dist.rank()
    assert dist.world() == 2
    # shares and shards: contiguous, in rank order; an uneven batch is refused, naming it
    assert dist.share(4, 3) == slice(6 * r, 6 * r + 6) and dist.shard(list(range(6))) == [[0, 1, 2], [3, 4, 5]][r]
    assert dist.shard(list(range(3)), even=False) == [[0], [1, 2]][r]
    with pytest.raises(ConfigError, match="--batch_size .3. cannot be split evenly over 2"):
        dist.shard([1, 2, 3], "--batch_size")
    # PPO's whitening and GRPO's batch scaling on gathered shares equal one process's on the whole batch; the
    # shares are cut to their own longest response (as sampled), so the gather pads them back
    g = torch.Generator().manual_seed(0)
    adv, lengths = torch.randn(8, 7, generator=g), torch.tensor([7, 3, 5, 2, 1, 4, 6, 2])
    mask = torch.arange(7)[None] < lengths[:, None]
    mine = slice(4 * r, 4 * r + 4)
    width = int(lengths[mine].max())
    got_adv = dist.all_gather_cat((adv * mask)[mine, :width])
    got_mask = dist.all_gather_cat(mask[mine, :width])
    assert got_mask.dtype == torch.bool and torch.equal(got_mask, mask)
    assert torch.equal(masked_whiten(got_adv, got_mask), masked_whiten(adv * mask, mask))
    rewards = torch.rand(4, 3, generator=g)
    assert torch.equal(group_advantages(dist.all_gather_cat(rewards[2 * r:2 * r + 2]).view(4, 3), scale="batch"),
                       group_advantages(rewards, scale="batch"))
    assert dist.all_reduce({"a": 1.0 + r, "b": 2.0}) == {"a": 3.0, "b": 4.0} and dist.all_reduce(3 + r, "max") == 4
    assert dist.all_gather_objects({"r": r}) == [{"r": 0}, {"r": 1}] and dist.broadcast_object(r) == 0
    # gradients: SUMMED (each loss is already its share of the global one); None where no rank has one
    a, b, c = (torch.nn.Parameter(torch.zeros(3)) for _ in range(3))
    a.grad = torch.full((3,), 1.0 + r)
    b.grad = torch.ones(3) if r == 0 else None  # rank 1's share held nothing for b
    dist.reduce_gradients([a, b, c], bucket_numel=4)  # two buckets
    assert a.grad.tolist() == [3.0] * 3 and b.grad.tolist() == [1.0] * 3 and c.grad is None


if __name__ == "__main__":  # run by the fixture above under torch.distributed.run: one rank
    for job in json.load(open(sys.argv[1])):
        if job[0] == "helpers":
            check_helpers()
        elif job[0] == "copy":
            if dist.is_main():
                shutil.copy(job[1], job[2])
            torch.distributed.barrier()
        else:
            argv, hook = sys.argv, sys.excepthook
            sys.argv = [job[0], "--device=cpu", *job[1]]
            try:
                runpy.run_path(os.path.join(ROOT, job[0]), run_name="__main__")
            finally:
                sys.argv, sys.excepthook = argv, hook
            torch.distributed.barrier()  # rank 0 has written everything before the next run reads it
