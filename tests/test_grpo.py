"""GRPO family: advantages, aggregation, k3, the clipped ratio, the mu=1 gradient, rewards, a tiny run."""
import json
import os
import subprocess
import sys

import pytest
import torch

from nanoalign import task
from nanoalign.core import token_logprobs
from nanoalign.losses import aggregate, clipped_surrogate, group_advantages, k3_kl
from nanoalign.model import GPT, GPTConfig
from nanoalign.rewards import answer_reward, final_number, pass_at_k

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_grpo_advantages_worked_example():
    """Rewards [1, 0, 0.5, 1], population std: [0.905, -1.508, -0.302, 0.905]."""
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.5, 1.0]]))
    assert adv[0].tolist() == pytest.approx([0.905, -1.508, -0.302, 0.905], abs=5e-4)


def test_rloo_and_dr_grpo_and_batch_scale():
    r = torch.tensor([[1.0, 0.0, 0.5, 1.0], [0.0, 0.0, 0.0, 1.0]])
    # RLOO: r_i - mean of the other three
    assert group_advantages(r, "loo", "none")[0].tolist() == pytest.approx([0.5, -0.8333, -0.1667, 0.5], abs=1e-4)
    # Dr. GRPO: r_i - mean, unscaled
    assert group_advantages(r, "mean", "none")[1].tolist() == pytest.approx([-0.25, -0.25, -0.25, 0.75])
    # batch scale: one std over all 8 centred values
    centred = torch.tensor([0.375, -0.625, -0.125, 0.375, -0.25, -0.25, -0.25, 0.75])
    expected = centred / centred.std(unbiased=False)
    assert group_advantages(r, "mean", "batch").flatten().tolist() == pytest.approx(expected.tolist(), abs=1e-4)


@pytest.mark.parametrize("baseline,scale", [("mean", "group"), ("mean", "batch"), ("mean", "none"), ("loo", "none"),
                                            ("loo", "group")])
def test_zero_std_groups_give_zero_advantage_and_no_nan(baseline, scale):
    r = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    adv = group_advantages(r, baseline, scale)
    assert torch.isfinite(adv).all() and (adv == 0).all()


def test_aggregation_modes_hand_computed():
    """Token losses [[1, 2, 3], [4, pad, pad]]: seq_mean (2 + 4)/2 = 3, token_mean 10/4 = 2.5,
    constant 10 / (2 * 5) = 1."""
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate(loss, mask, "seq_mean").item() == pytest.approx(3.0)
    assert aggregate(loss, mask, "token_mean").item() == pytest.approx(2.5)
    assert aggregate(loss, mask, "constant", max_len=5).item() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        aggregate(loss, mask, "nope")


def test_k3_is_nonnegative_and_zero_when_policies_agree():
    logp = torch.randn(1000) * 3
    ref = torch.randn(1000) * 3
    assert (k3_kl(logp, ref) >= 0).all()
    assert torch.equal(k3_kl(logp, logp), torch.zeros(1000))
    # hand case: logp = -1, ref = -2: exp(-1) - (-1) - 1 = 0.3679
    assert k3_kl(torch.tensor(-1.0), torch.tensor(-2.0)).item() == pytest.approx(0.367879, abs=1e-6)


def test_clipped_ratio_hand_cases():
    """ratio e^{logp - old}: 1.5 with A=+1 is clipped at 1.2; 0.5 with A=-1 at 0.8; 0.5 with A=+1 is not
    clipped (the pessimistic min keeps the unclipped term); clip-higher 0.28 lets 1.25 through."""
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 0.5, 0.5, 1.25]))
    adv = torch.tensor([1.0, -1.0, 1.0, 1.0])
    loss, low, high = clipped_surrogate(logp, old, adv, 0.2, 0.2)
    assert loss.tolist() == pytest.approx([-1.2, 0.8, -0.5, -1.2])
    assert low.tolist() == [False, True, False, False] and high.tolist() == [True, False, False, True]
    loss, low, high = clipped_surrogate(logp, old, adv, 0.2, 0.28)
    assert loss[3].item() == pytest.approx(-1.25) and not high[3]
    # gradient: zero where clipped, -A * ratio elsewhere
    lp = logp.clone().requires_grad_(True)
    clipped_surrogate(lp, old, adv, 0.2, 0.2)[0].sum().backward()
    assert lp.grad.tolist() == pytest.approx([0.0, 0.0, -0.5, 0.0])


def test_mu_1_gradient_equals_reinforce_with_group_baseline():
    """On-policy (old = current log-probs, detached): the clipped surrogate's gradient is exactly
    that of -A * log pi, aggregated the same way."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=12, n_layer=1, n_head=2, n_embd=16))
    ids = torch.randint(0, 12, (4, 9))
    mask = torch.ones(4, 8)
    mask[1, 5:] = 0
    adv = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]])).reshape(-1, 1)

    def grad(loss_fn):
        model.zero_grad()
        logp = token_logprobs(model(ids)[:, :-1], ids[:, 1:], temperature=0.7)
        aggregate(loss_fn(logp), mask, "seq_mean").backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    ppo = grad(lambda lp: clipped_surrogate(lp, lp.detach(), adv)[0])
    reinforce = grad(lambda lp: -adv * lp)
    assert torch.allclose(ppo, reinforce, atol=1e-6) and ppo.abs().max() > 0


def test_verifiable_rewards():
    assert task.format_ok("4+7+2+9", "4+7=2;2+2=4;4+9=3;#3") == 1.0  # wrong but well-formed
    assert task.format_ok("4+7+2+9", "4+7=1;#1") == 0.0  # a missing step
    assert final_number("3 + 4 = 7\n#### 1,234") == "1234" and final_number("so 42.") == "42"
    assert final_number("no number") is None
    reward = answer_reward({"q": "18"})
    assert reward("q", "... #### 18") == 1.0 and reward("q", "18.0") == 1.0 and reward("q", "#### 17") == 0.0
    assert pass_at_k(4, 1, 1) == 0.25 and pass_at_k(4, 1, 4) == 1.0 and pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(4, 0, 4) == 0.0


@pytest.mark.parametrize("extra", [[], ["--beta=0.05", "--mu=2", "--minibatches=2", "--dynamic_sampling=True",
                                        "--agg=constant", "--eps_high=0.28", "--rewards=verify:1,format:0.5"]])
def test_train_grpo_tiny_run(tmp_path, sft_ckpt, extra):
    out = tmp_path / "grpo"
    r = subprocess.run([sys.executable, "train_grpo.py", f"--init_from={sft_ckpt}", f"--out_dir={out}",
                        "--prompts_per_step=2", "--group_size=4", "--max_steps=2", "--eval_interval=2", "--n_eval=4",
                        "--eval_k=2", "--max_new_tokens=12", "--device=cpu", *extra],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(l) for l in open(out / "metrics.jsonl")]
    steps = [l for l in lines if "reward" in l]
    assert len(steps) == 2
    for key in ("reward_std", "zero_std_frac", "len_mean", "len_max", "trunc", "entropy", "clip_low", "clip_high"):
        assert key in steps[0]
    assert ("kl" in steps[0]) == bool(extra)
    summary = json.load(open(out / "summary.json"))
    assert {"eval/pass@1", "eval/pass@2", "eval/gold"} <= set(summary["final"])


def test_train_grpo_on_a_problem_file(tmp_path, sft_ckpt):
    """GSM8K-format problems: the answer checker is the reward, held-out problems are split off."""
    path = tmp_path / "gsm.jsonl"
    path.write_text("".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"step\n#### {i + 1}"}) + "\n"
                            for i in range(12)))
    out = tmp_path / "grpo"
    r = subprocess.run([sys.executable, "train_grpo.py", f"--init_from={sft_ckpt}", f"--out_dir={out}",
                        f"--data_path={path}", "--rewards=answer", "--prompts_per_step=2", "--group_size=2",
                        "--max_steps=1", "--n_eval=4", "--eval_k=2", "--max_new_tokens=8", "--device=cpu"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.load(open(out / "summary.json"))
    assert summary["n_eval_prompts"] == 4 and "eval/gold" not in summary["final"]


def test_grpo_mu1_reuses_the_training_forward_for_the_old_logprobs(tmp_path):
    """mu = 1, one minibatch: the old log-probs (and the logged entropy) are taken from the training forward,
    detached, instead of a separate no-grad pass (detail 4). The run equals the one with the separate pass (a
    copy of the script with the reuse switched off), step by step and in its final weights."""
    src = open(os.path.join(ROOT, "train_grpo.py")).read()
    line = "reuse_old = mu == 1 and minibatches == 1 and not dynamic_sampling and policy.config.dropout == 0"
    assert line in src
    slow = tmp_path / "train_grpo_separate_pass.py"
    slow.write_text(src.replace(line, "reuse_old = False"))
    # a model that has begun to learn the task's format (40 SFT steps) answers one-digit problems right often
    # enough for the rewards, and so the gradient, to vary
    sft = tmp_path / "sft"
    r = subprocess.run([sys.executable, "train_sft.py", f"--out_dir={sft}", "--n_layer=1", "--n_head=2", "--n_embd=32",
                        "--batch_size=16", "--n_train=400", "--n_eval=8", "--max_steps=40", "--lr=3e-3",
                        "--eval_interval=1000", "--device=cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    problems = tmp_path / "digits.jsonl"
    problems.write_text("".join(json.dumps({"question": f"{i}+{i}+{i}", "answer": f"#### {3 * i % 10}"}) + "\n"
                                for i in range(20)))
    runs = {}
    for name, script in (("reuse", os.path.join(ROOT, "train_grpo.py")), ("separate", str(slow))):
        out = tmp_path / name
        r = subprocess.run([sys.executable, script, f"--init_from={sft / 'ckpt.pt'}", f"--out_dir={out}", "--grad_accum=2",
                            f"--data_path={problems}", "--prompts_per_step=2", "--group_size=8", "--max_steps=3",
                            "--eval_interval=100", "--n_eval=2", "--eval_k=1", "--max_new_tokens=32", "--device=cpu"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = ([json.loads(l) for l in open(out / "metrics.jsonl") if '"reward"' in l],
                      torch.load(out / "ckpt.pt", map_location="cpu", weights_only=False)["model"])
    (fast, w_fast), (slow_rows, w_slow) = runs["reuse"], runs["separate"]
    assert len(fast) == 3 and any(row["grad_norm"] > 0 for row in fast)
    for a, b in zip(fast, slow_rows):
        for key in ("reward", "loss", "grad_norm", "entropy", "clip_low", "clip_high"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    assert max((w_fast[k] - w_slow[k]).abs().max().item() for k in w_fast) < 1e-5
