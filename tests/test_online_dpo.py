"""train_dpo.py online (iterative DPO) and SPIN: the pairing rule, tiny end-to-end runs, the round's reference."""
import json
import math
import os
import subprocess
import sys

import pytest

from nanoalign.online_pairs import best_vs_worst

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 2 rounds of 2 steps; lr high and no warmup so that one round visibly moves the policy
TINY = ["--n_eval=4", "--batch_size=4", "--max_steps=4", "--rounds=2", "--prompts_per_round=8", "--eval_interval=2",
        "--log_interval=1", "--lr=1e-3", "--warmup_steps=1", "--device=cpu"]


def run_dpo(out, sft_ckpt, *args, ok=True):
    r = subprocess.run([sys.executable, "train_dpo.py", f"--init_from={sft_ckpt}", f"--out_dir={out}", *TINY, *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    if not ok:
        return r
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    return [l for l in lines if "round" in l], [l for l in lines if "loss" in l], json.load(open(os.path.join(out, "summary.json")))


def test_best_vs_worst_pairs_and_skips_ties():
    inf = math.inf
    scores = [[0.2, 0.9, 0.5, 0.1],  # best 1, worst 3
              [0.5, 0.5, 0.5, 0.5],  # all tie: skipped
              [-inf, 0.3, -inf, 0.3],  # unfinished samples rank last; the first best and the first worst
              [1.0, 1.0, 0.0, 0.0],  # verifier-style scores: the first right one vs the first wrong one
              [-inf, -inf, -inf, -inf]]  # nothing finished: a tie, skipped
    pairs, tied = best_vs_worst(scores)
    assert pairs == [(0, 1, 3), (2, 1, 0), (3, 0, 2)]
    assert tied == 2
    assert best_vs_worst([]) == ([], 0)


def test_online_run_end_to_end(tmp_path, sft_ckpt):
    rounds, steps, summary = run_dpo(tmp_path / "online", sft_ckpt, "--online=True", "--k_samples=4")
    assert [l["round"] for l in rounds] == [1, 2] and [l["step"] for l in rounds] == [0, 2]
    for l in rounds:
        assert {"round/judge_mean", "round/gold_mean", "round/tied_frac", "round/pairs", "round/eos_frac"} <= set(l)
        assert l["round/ref_update"] == "round"
        assert 0 <= l["round/tied_frac"] <= 1 and l["round/pairs"] == round(8 * (1 - l["round/tied_frac"]))
    assert rounds[0]["round/pairs"] > 0
    assert len(steps) == 4 and all(l["loss"] == l["loss"] for l in steps)
    assert summary["mode"] == "online" and summary["steps"] == 4 and summary["judge"] == "gold"
    assert {"eval/win_rate", "eval/kl", "eval/length", "eval/gold"} <= set(summary["final"])


@pytest.fixture(scope="module")
def spin_runs(tmp_path_factory, sft_ckpt):
    out = tmp_path_factory.mktemp("spin")
    return {u: run_dpo(out / u, sft_ckpt, "--spin=True", f"--ref_update={u}") for u in ("round", "fixed")}


def test_spin_run_end_to_end(spin_runs):
    rounds, steps, summary = spin_runs["round"]
    assert [l["round"] for l in rounds] == [1, 2]
    assert all(l["round/pairs"] + round(8 * l["round/tied_frac"]) == 8 for l in rounds)  # one sample per prompt
    assert "round/judge_mean" not in rounds[0]  # SPIN has no judge
    assert len(steps) == 4 and summary["mode"] == "spin" and summary["final"]["eval/win_rate"] == summary["final"]["eval/win_rate"]


def test_ref_update_round_moves_the_reference_and_fixed_does_not(spin_runs):
    (_, a, _), (_, b, _) = spin_runs["round"][:3], spin_runs["fixed"][:3]
    # round 1 (steps 1-2) is the same run either way: the reference is the SFT model
    assert a[0]["rewards/chosen"] == pytest.approx(0, abs=1e-6) and b[0]["rewards/chosen"] == pytest.approx(0, abs=1e-6)
    assert a[1]["loss"] == pytest.approx(b[1]["loss"], abs=1e-6)
    # step 3 starts round 2: the same policy on the same fresh pairs in both runs ...
    assert a[2]["logps/chosen"] == pytest.approx(b[2]["logps/chosen"], abs=1e-4)
    # ... "round": the reference is that policy (implicit rewards 0, loss log 2), so it is no longer the SFT model;
    assert a[2]["rewards/chosen"] == pytest.approx(0, abs=1e-6) and a[2]["rewards/rejected"] == pytest.approx(0, abs=1e-6)
    assert a[2]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    # "fixed": the reference is still the SFT model, which the policy has moved away from
    assert abs(b[2]["rewards/chosen"]) > 1e-3 or abs(b[2]["rewards/rejected"]) > 1e-3
    assert b[2]["loss"] != pytest.approx(math.log(2), abs=1e-4)


def test_online_on_a_file_with_a_reward_model_judge(tmp_path, sft_ckpt):
    """RLAIF: a reward-model checkpoint ranks the samples; the prompts come from a preference file."""
    from nanoalign import task
    from nanoalign.heads import ScalarModel
    from nanoalign.utils import load_checkpoint, save_checkpoint
    gpt, tok, _ = load_checkpoint(sft_ckpt)
    save_checkpoint(str(tmp_path / "rm.pt"), ScalarModel(gpt), tok, rm_kind="outcome")  # an untrained RM will do
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for r in task.preference_records(12, seed=5):
            f.write(json.dumps(r) + "\n")
    rounds, steps, summary = run_dpo(tmp_path / "rlaif", sft_ckpt, "--online=True", f"--judge={tmp_path / 'rm.pt'}",
                                     f"--data_path={tmp_path / 'pairs.jsonl'}")
    assert len(rounds) == 2 and rounds[0]["round/pairs"] > 0 and "round/gold_mean" not in rounds[0]
    assert math.isfinite(rounds[0]["round/judge_mean"])
    assert len(steps) == 4 and summary["judge"].endswith("rm.pt")


def test_gold_judge_needs_the_builtin_task(tmp_path, sft_ckpt):
    r = run_dpo(tmp_path / "bad", sft_ckpt, "--online=True", "--judge=gold", "--data_path=pairs.jsonl", ok=False)
    assert r.returncode != 0 and "only for the built-in task" in r.stderr
