"""Resume in every stage and the NaN guard.

A run stopped (or killed with kill -9) and resumed with --resume=True reproduces the uninterrupted run
exactly on CPU: the same metrics.jsonl rows (none repeated, none lost), the same summary and the same
final weights. A diverging run stops before the optimizer steps on a NaN, naming the step; no
checkpoint with a NaN is written, so the last good one survives; the logs stay strict JSON."""
import contextlib
import io
import json
import math
import os
import random
import re
import runpy
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from nanoalign.heads import ScalarModel
from nanoalign.model import GPT, GPTConfig
from nanoalign.tokenizer import byte_tokenizer
from nanoalign.utils import (JsonlLogger, load_checkpoint, optimizer_step, restore_state, resume_state,
                             save_checkpoint, write_json)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = ("elapsed_s", "tok_per_s", "checkpoint")  # wall-clock numbers and the out_dir differ between runs anyway
NAN_STOP = re.compile(r"(step|iter) \d+: (loss|grad_norm) is (nan|inf)")


def run(script, out, *args, ok=True):
    r = subprocess.run([sys.executable, script, f"--out_dir={out}", "--device=cpu", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    if ok:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def run_here(script, out, *args):
    """`python script --out_dir=out --device=cpu *args`, run in this process: the same code and numbers,
    without a new interpreter's seconds of importing torch (most of a tiny run). -> its stdout."""
    argv, hook, cwd, rng, stdout = sys.argv, sys.excepthook, os.getcwd(), torch.get_rng_state(), io.StringIO()
    sys.argv = [script, f"--out_dir={out}", "--device=cpu", *map(str, args)]
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(stdout):
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    finally:  # what the script set for its own process (argv, excepthook, cwd, the global seed) goes back
        sys.argv, sys.excepthook = argv, hook
        os.chdir(cwd)
        torch.set_rng_state(rng)
    return stdout.getvalue()


def strict_json(text, where):
    """json.loads that refuses the bare NaN / Infinity Python's own parser lets through."""
    def refuse(name):
        raise ValueError(f"{where}: bare {name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def rows(out):
    """metrics.jsonl of a run, parsed strictly, without its timing fields."""
    lines = open(os.path.join(out, "metrics.jsonl")).read().splitlines()
    return [{k: v for k, v in strict_json(line, "metrics.jsonl").items() if k not in TIMING} for line in lines]


def summary(out):
    s = strict_json(open(os.path.join(out, "summary.json")).read(), "summary.json")
    return {k: v for k, v in s.items() if k not in TIMING}


def weights(out, name="ckpt.pt"):
    return torch.load(os.path.join(out, name), map_location="cpu", weights_only=True)["model"]


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def interrupted_equals_straight(script, tmp_path, args, key, until, total, state=("model",)):
    """Run `total` steps straight; and `until` steps, then --resume=True to `total`. Both must agree exactly
    (metrics.jsonl rows, summary.json, the checkpoints' `state` entries), and the resumed run must have
    trained (its weights moved after the resume). -> the resumed out_dir."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_here(script, straight, *args, f"--{key}={total}")
    run_here(script, resumed, *args, f"--{key}={until}")
    shutil.copy(resumed / "ckpt.pt", tmp_path / f"ckpt_{until}.pt")
    stdout = run_here(script, resumed, *args, f"--{key}={total}", "--resume=True")
    assert re.search(rf"resumed from .* at (step|iter) {until}\b", stdout), stdout[-2000:]
    assert rows(resumed) == rows(straight)
    assert summary(resumed) == summary(straight)
    a, b = (torch.load(d / "ckpt.pt", weights_only=True) for d in (straight, resumed))
    for name in state:
        assert same_weights(a[name], b[name]), name
    assert not same_weights(weights(resumed), weights(tmp_path, f"ckpt_{until}.pt"))  # it trained after resuming
    return resumed


# ------------------------------------------------------------------------------ the shared mechanism, in process

def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=261, n_layer=1, n_head=2, n_embd=16))


def test_resume_state_round_trip(tmp_path):
    """Modules, optimizer, GradScaler, torch.Generator, random.Random, the global RNG and plain values survive
    a checkpoint: restored into freshly built objects, every next draw and step is the same."""
    model, tok = tiny_gpt(), byte_tokenizer()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randint(0, 261, (2, 8))).sum().backward()
    opt.step()
    gen, rng, scaler = torch.Generator().manual_seed(5), random.Random(7), torch.amp.GradScaler("cpu", enabled=True)
    rng.random(), torch.rand(3, generator=gen), scaler.scale(torch.ones(())), scaler.update(1024.0)
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, model, tok, step=3, beta=0.25,
                    **resume_state(optimizer=opt, scaler=scaler, gen=gen, rng2=rng))
    expect = (torch.rand(4), torch.rand(4, generator=gen), rng.random())

    model2 = GPT(GPTConfig(block_size=16, vocab_size=261, n_layer=1, n_head=2, n_embd=16))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    gen2, rng2, scaler2 = torch.Generator(), random.Random(), torch.amp.GradScaler("cpu", enabled=True)
    ckpt = torch.load(path, weights_only=True)
    torch.rand(10)  # the global RNG moves on before the restore
    restore_state(ckpt, model=model2, optimizer=opt2, scaler=scaler2, gen=gen2, rng2=rng2)
    assert (ckpt["step"], ckpt["beta"]) == (3, 0.25) and scaler2.get_scale() == 1024.0
    got = (torch.rand(4), torch.rand(4, generator=gen2), rng2.random())
    assert torch.equal(got[0], expect[0]) and torch.equal(got[1], expect[1]) and got[2] == expect[2]
    assert same_weights(model.state_dict(), model2.state_dict())
    for m, o in ((model, opt), (model2, opt2)):  # the same next step, moments included
        m.zero_grad()
        m(torch.arange(8)[None]).sum().backward()
        o.step()
    assert same_weights(model.state_dict(), model2.state_dict())
    assert load_checkpoint(path)[2]["step"] == 3  # still an ordinary checkpoint


def test_optimizer_step_stops_on_nan_before_the_update():
    model = tiny_gpt()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    off = torch.amp.GradScaler("cpu", enabled=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss = model(torch.arange(8)[None]).sum()
    loss.backward()
    with pytest.raises(SystemExit, match=r"step 7: loss is nan"):
        optimizer_step(model, opt, off, 1.0, float("nan"), "step 7")
    model.transformer.wte.weight.grad[0, 0] = float("inf")  # a finite loss, an infinite gradient
    with pytest.raises(SystemExit, match=r"iter 2: grad_norm is (nan|inf)"):
        optimizer_step(model, opt, off, 1.0, loss.item(), "iter 2")
    assert same_weights(model.state_dict(), before)  # never stepped
    # fp16: inf gradients are the GradScaler's to handle (it skips the step and halves its scale), not an error
    fp16 = torch.amp.GradScaler("cpu", enabled=True)
    opt.zero_grad()
    fp16.scale(model(torch.arange(8)[None]).sum()).backward()
    model.transformer.wte.weight.grad[0, 0] = float("inf")
    scale = fp16.get_scale()
    optimizer_step(model, opt, fp16, 1.0, loss.item(), "step 8")
    assert same_weights(model.state_dict(), before) and fp16.get_scale() == scale / 2


def test_save_checkpoint_refuses_nan_and_keeps_the_good_file(tmp_path):
    model, tok = tiny_gpt(), byte_tokenizer()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.arange(8)[None]).sum().backward()
    opt.step()
    path = tmp_path / "ckpt.pt"
    save_checkpoint(str(path), model, tok, optimizer=opt.state_dict(), config={"lr": float("inf")})  # config: not state
    good = path.read_bytes()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[1, 2] = float("nan")
    with pytest.raises(SystemExit, match=r"model\.transformer\.h\.0\.mlp\.c_fc\.weight is not finite"):
        save_checkpoint(str(path), model, tok, optimizer=opt.state_dict())
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[1, 2] = 0.0
    next(iter(opt.state.values()))["exp_avg_sq"][0] = float("inf")
    with pytest.raises(SystemExit, match=r"optimizer\.state\.\d+\.exp_avg_sq is not finite"):
        save_checkpoint(str(path), model, tok, optimizer=opt.state_dict())
    assert path.read_bytes() == good and not (tmp_path / "ckpt.pt.tmp").exists()


def test_logs_are_strict_json(tmp_path):
    """NaN and inf are written as null (JSON has neither); finite values are unchanged."""
    log = JsonlLogger(str(tmp_path / "metrics.jsonl"))
    log.log(step=1, loss=float("nan"), grad_norm=float("inf"), lr=0.1234567891, tag="x")
    write_json(str(tmp_path / "summary.json"),
               {"final": {"std": float("nan"), "acc": 0.5}, "curve": [1.0, -float("inf")]})
    assert strict_json(open(tmp_path / "metrics.jsonl").read(), "metrics") == \
        {"step": 1, "loss": None, "grad_norm": None, "lr": 0.123457, "tag": "x"}
    assert strict_json(open(tmp_path / "summary.json").read(), "summary") == \
        {"final": {"std": None, "acc": 0.5}, "curve": [1.0, None]}


def test_logger_drops_the_rows_logged_after_the_checkpoint(tmp_path):
    """A killed run logged past its last checkpoint (the last row maybe half written); restored from that
    checkpoint, the log keeps the rows up to it and appends after them."""
    path = tmp_path / "metrics.jsonl"
    log = JsonlLogger(str(path))
    for step in (1, 2):
        log.log(step=step)
    state = log.state_dict()  # what a checkpoint at step 2 holds
    for step in (3, 4):
        log.log(step=step)
    with open(path, "a") as f:
        f.write('{"step": 5, "lo')  # torn by kill -9
    resumed = JsonlLogger(str(path), append=True)
    restore_state({"rng": torch.get_rng_state(), "logger": state}, logger=resumed)
    resumed.log(step=3)
    assert [json.loads(line)["step"] for line in open(path)] == [1, 2, 3] and resumed.rows == 3
    JsonlLogger(str(path))  # a fresh run starts the file anew
    assert path.read_text() == ""


# ------------------------------------------------------------------------------ the NaN guard in the scripts

def test_sft_nan_stops_naming_the_step_and_the_good_checkpoint_survives(tmp_path, sft_ckpt):
    """--lr=1e6 resumed from a good checkpoint: the run stops at the first NaN with a message naming the step,
    non-zero, and the checkpoint it resumed from is byte for byte what it was."""
    out = tmp_path / "sft"
    out.mkdir()
    shutil.copy(sft_ckpt, out / "ckpt.pt")
    good = (out / "ckpt.pt").read_bytes()
    r = run("train_sft.py", out, "--resume=True", "--lr=1e6", "--warmup_steps=1", "--max_steps=30", "--batch_size=4",
            "--n_train=200", "--n_eval=8", "--log_interval=1", "--eval_interval=1000", ok=False)
    assert r.returncode != 0 and NAN_STOP.search(r.stderr.strip().splitlines()[-1]), r.stderr[-2000:]
    assert (out / "ckpt.pt").read_bytes() == good
    losses = [row["loss"] for row in rows(out) if "loss" in row]
    assert losses and all(math.isfinite(x) for x in losses)  # the NaN step itself is never logged


def test_rm_nan_stops_naming_the_step_and_writes_no_nan_checkpoint(tmp_path, sft_ckpt):
    out = tmp_path / "rm"
    with pytest.raises(SystemExit) as stop:  # in this process: the message python prints, with exit status 1
        run_here("train_rm.py", out, f"--init_from={sft_ckpt}", "--lr=1e6", "--max_steps=30", "--ckpt_interval=1",
                 "--n_train=100", "--n_eval=20", "--n_norm=16", "--batch_size=4", "--eval_interval=2",
                 "--log_interval=1")
    assert isinstance(stop.value.code, str) and NAN_STOP.search(stop.value.code), stop.value.code
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)  # the last good one (written every step until the NaN)
    assert 0 < ckpt["step"] < 30 and all(torch.isfinite(t).all() for t in ckpt["model"].values())
    assert rows(out) and not (out / "summary.json").exists()


# ------------------------------------------------------------------------------ resume, stage by stage

@pytest.fixture(scope="module")
def coin_policy(tmp_path_factory):
    """A tiny SFT policy that answers one of three one-step sums (then EOS) to anything: most rollouts end, and
    a reward (the answer 2, or a process RM's step score) varies within a batch, so RL steps have non-zero
    gradients. -> (its checkpoint, a problem file whose answer is 2)."""
    d = tmp_path_factory.mktemp("coin")
    rng, answers = random.Random(0), ["1+1=2;#2", "1+2=3;#3", "2+2=4;#4"]
    (d / "sft.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "response": rng.choice(answers)}) + "\n"
                                         for i in range(100)))
    run_here("train_sft.py", d / "sft", f"--data_path={d / 'sft.jsonl'}", "--n_layer=1", "--n_head=2", "--n_embd=32",
        "--batch_size=16", "--grad_accum=1", "--max_steps=30", "--lr=1e-2", "--warmup_steps=2", "--eval_interval=1000")
    (d / "problems.jsonl").write_text("".join(json.dumps({"question": f"q{i}", "answer": "#### 2"}) + "\n"
                                              for i in range(40)))
    return str(d / "sft" / "ckpt.pt"), str(d / "problems.jsonl")


def test_sft_resume_after_a_replayed_kill_drops_the_repeated_rows(tmp_path, sft_ckpt):
    """As after a kill -9: the run had logged 2 steps past its last checkpoint. Resumed from it, the log drops
    those rows (item 18) and the run reproduces the uninterrupted one."""
    args = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--batch_size=4", "--n_train=200", "--n_eval=8",
            "--warmup_steps=2", "--log_interval=1", "--eval_interval=2", "--lr_decay_steps=4"]
    resumed = interrupted_equals_straight("train_sft.py", tmp_path, args, "max_steps", 2, 4)
    shutil.copy(tmp_path / "ckpt_2.pt", resumed / "ckpt.pt")  # the last checkpoint was step 2; the log went on to 4
    assert len(rows(resumed)) > len([r for r in rows(resumed) if r["step"] <= 2])
    run_here("train_sft.py", resumed, *args, "--max_steps=4", "--resume=True")
    assert rows(resumed) == rows(tmp_path / "straight")


def test_rm_resume_is_exact(tmp_path, sft_ckpt):
    """The outcome RM (new blocks, normalised at the end): resumed from the normalised step-2 checkpoint it
    trains un-normalised again, and ends with the same normalisation as the straight run."""
    interrupted_equals_straight("train_rm.py", tmp_path, [
        f"--init_from={sft_ckpt}", "--n_train=100", "--n_eval=20", "--n_norm=16", "--batch_size=4", "--eval_interval=2",
        "--log_interval=1", "--lr_decay_steps=4"], "max_steps", 2, 4)


def test_dpo_offline_resume_is_exact(tmp_path, sft_ckpt):
    interrupted_equals_straight("train_dpo.py", tmp_path, [
        f"--init_from={sft_ckpt}", "--n_train=40", "--n_eval=4", "--n_eval_pairs=20", "--batch_size=4",
        "--eval_interval=2", "--log_interval=1", "--lr=1e-3", "--warmup_steps=1", "--lr_decay_steps=4"],
        "max_steps", 2, 4)


def test_grpo_resume_is_exact(tmp_path, coin_policy):
    policy, problems = coin_policy
    interrupted_equals_straight("train_grpo.py", tmp_path, [
        f"--init_from={policy}", f"--data_path={problems}", "--prompts_per_step=2", "--group_size=4", "--mu=2",
        "--minibatches=2", "--beta=0.05", "--eval_interval=2", "--n_eval=4", "--eval_k=2", "--max_new_tokens=10"],
        "max_steps", 2, 4)


def test_ppo_resume_is_exact(tmp_path, sft_ckpt, coin_policy):
    """With a process-RM judge, whose normalisation is fixed on the first iteration's rollouts, adaptive KL,
    and a separate critic sharing the policy's optimizer."""
    gpt, tok, _ = load_checkpoint(sft_ckpt)
    prm = ScalarModel(gpt)
    torch.manual_seed(0)
    torch.nn.init.normal_(prm.head.weight, std=1.0)
    save_checkpoint(str(tmp_path / "prm.pt"), prm, tok, rm_kind="process")
    interrupted_equals_straight("train_ppo.py", tmp_path, [
        f"--init_from={coin_policy[0]}", f"--reward_model={tmp_path / 'prm.pt'}", "--batch_size=4", "--ppo_epochs=2",
        "--minibatches=2", "--eval_interval=2", "--n_eval=4", "--max_new_tokens=10"], "max_iters", 2, 4,
        state=("model", "critic"))
    assert (tmp_path / "straight" / "curves.csv").read_text() == (tmp_path / "resumed" / "curves.csv").read_text()


def test_online_dpo_killed_with_sigkill_and_resumed_is_exact(tmp_path, sft_ckpt):
    """A real kill -9 of a running online-DPO run once a checkpoint of step >= 1 exists (checkpoints every
    step; wherever the kill lands, inside a round or between two), then --resume=True: the run equals the
    uninterrupted one, the round's pairs and reference coming from the checkpoint."""
    args = [f"--init_from={sft_ckpt}", "--online=True", "--rounds=2", "--max_steps=8", "--prompts_per_round=8",
            "--n_eval=4", "--batch_size=4", "--eval_interval=4", "--log_interval=1", "--lr=1e-3", "--warmup_steps=1",
            "--ckpt_interval=1"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_here("train_dpo.py", straight, *args)
    p = subprocess.Popen([sys.executable, "train_dpo.py", f"--out_dir={killed}", "--device=cpu", *args], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    at, deadline = None, time.time() + 240
    try:
        while p.poll() is None and time.time() < deadline:
            if (killed / "ckpt.pt").exists():  # replaced atomically: always a whole file
                at = torch.load(killed / "ckpt.pt", weights_only=True)["at_step"]
                if at >= 1:
                    os.kill(p.pid, signal.SIGKILL)
                    break
            time.sleep(0.01)
    finally:
        p.kill()
        p.wait()
    assert at is not None and at >= 1
    at = torch.load(killed / "ckpt.pt", weights_only=True)["at_step"]  # the kill may have come a step or two later
    stdout = run_here("train_dpo.py", killed, *args, "--resume=True")
    assert f"resumed from {killed / 'ckpt.pt'} at step {at}" in stdout
    assert rows(killed) == rows(straight)
    assert summary(killed) == summary(straight)
    assert same_weights(weights(killed), weights(straight))
