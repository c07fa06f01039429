"""PPO: GAE, whitening, per-token rewards, the clipped objectives, adaptive KL, and tiny end-to-end runs."""
import csv
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from nanoalign.core import lengths_to_mask, masked_whiten, per_token_rewards
from nanoalign.heads import ScalarModel
from nanoalign.losses import adaptive_kl_beta, clipped_surrogate, clipped_value_loss, gae
from nanoalign.utils import load_checkpoint, save_checkpoint

from helpers import random_head_rm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------ GAE

def test_gae_hand_computed():
    """r = [0, 0, 1], V = [0.5, 0.6, 0.7], gamma 1, lambda 0.9: deltas [0.1, 0.1, 0.3],
    A_2 = 0.3, A_1 = 0.1 + 0.9 * 0.3 = 0.37, A_0 = 0.1 + 0.9 * 0.37 = 0.433; returns = A + V."""
    adv, ret = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.6, 0.7]]), torch.ones(1, 3), 1.0, 0.9)
    assert torch.allclose(adv, torch.tensor([[0.433, 0.37, 0.3]]), atol=1e-6)
    assert torch.allclose(ret, torch.tensor([[0.933, 0.97, 1.0]]), atol=1e-6)


def test_gae_with_discount_hand_computed():
    """gamma 0.5, lambda 1: A_1 = 2 - 1 = 1; A_0 = (0 + 0.5 * 1 - 1) + 0.5 * 1 = 0 (= 0.5 * 2 - V_0)."""
    adv, _ = gae(torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0, 1.0]]), torch.ones(1, 2), 0.5, 1.0)
    assert torch.allclose(adv, torch.tensor([[0.0, 1.0]]))


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value_and_ignores_padding():
    """With gamma = lambda = 1, A_t = sum_{k >= t} r_k - V_t on the real tokens, whatever sits in the
    padding (garbage rewards and values there change nothing), and padding gets 0."""
    torch.manual_seed(0)
    B, T = 4, 7
    lengths = torch.tensor([7, 3, 5, 1])
    mask = lengths_to_mask(lengths, T)
    r, v = torch.randn(B, T), torch.randn(B, T)
    adv, ret = gae(r, v, mask, 1.0, 1.0)
    for b in range(B):
        n = lengths[b]
        togo = r[b, :n].flip(0).cumsum(0).flip(0)
        assert torch.allclose(adv[b, :n], togo - v[b, :n], atol=1e-5)
        assert torch.allclose(ret[b, :n], togo, atol=1e-5)
        assert (adv[b, n:] == 0).all() and (ret[b, n:] == 0).all()
    junk = torch.where(mask, 0.0, 100.0)
    adv2, ret2 = gae(r + junk, v - junk, mask, 1.0, 1.0)
    assert torch.equal(adv, adv2) and torch.equal(ret, ret2)


# ------------------------------------------------------------------------------ rewards and whitening

def test_score_lands_on_the_eos_token():
    """The sequence score is added at each row's last real token (the sampled EOS), the KL penalty on
    every real token, nothing on padding: [-b k0, -b k1, -b k2 + s] for a 3-token response."""
    mask = lengths_to_mask(torch.tensor([3, 1, 4]), 4)
    kl = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.5, 9.0, 9.0, 9.0], [0.1, 0.1, 0.1, 0.1]])
    r = per_token_rewards(torch.tensor([1.0, 2.0, 3.0]), kl, mask, 0.5)
    expected = torch.tensor([[-0.05, -0.1, -0.15 + 1.0, 0.0], [-0.25 + 2.0, 0.0, 0.0, 0.0],
                             [-0.05, -0.05, -0.05, -0.05 + 3.0]])
    assert torch.allclose(r, expected)
    assert torch.allclose(r.sum(1), torch.tensor([1.0, 2.0, 3.0]) - 0.5 * (kl * mask).sum(1))


def test_whitening_ignores_padding():
    """Advantages are whitened with the mean and std of the real tokens only: the result on real
    tokens equals whitening the real values alone, padding stays 0, and padding values change nothing."""
    torch.manual_seed(1)
    mask = lengths_to_mask(torch.tensor([5, 2, 3]), 5)
    x = torch.randn(3, 5)
    w = masked_whiten(x, mask)
    real = x[mask]
    assert torch.allclose(w[mask], (real - real.mean()) / real.std(), atol=1e-5)
    assert (w[~mask] == 0).all()
    assert torch.equal(w, masked_whiten(torch.where(mask, x, 1e3), mask))
    kept = masked_whiten(x, mask, shift_mean=False)  # rewards: std 1, the original mean kept
    assert torch.allclose(kept[mask].mean(), real.mean(), atol=1e-5)
    assert torch.allclose(kept[mask].std(), torch.tensor(1.0), atol=1e-5)


# ------------------------------------------------------------------------------ the clipped objectives

def test_ppo_clipped_objective_hand_cases():
    """loss = -min(ratio A, clip(ratio, 0.8, 1.2) A):
    ratio 1.5, A +1 -> -1.2 (clipped: no gain past 1.2); ratio 0.5, A -1 -> 0.8 (clipped at 0.8);
    ratio 0.5, A +1 -> -0.5 (pessimistic side: unclipped); ratio 1.5, A -1 -> 1.5 (unclipped)."""
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.5]])
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    logp = torch.log(ratio).requires_grad_()
    loss, low, high = clipped_surrogate(logp, torch.zeros(1, 4), adv, 0.2, 0.2)
    assert torch.allclose(loss, torch.tensor([[-1.2, 0.8, -0.5, 1.5]]))
    assert low.tolist() == [[False, True, False, False]] and high.tolist() == [[True, False, False, False]]
    loss.sum().backward()  # clipped tokens carry no gradient; unclipped ones: -A * ratio
    assert torch.allclose(logp.grad, torch.tensor([[0.0, 0.0, -0.5, 1.5]]))


def test_clipped_value_loss_hand_cases():
    """0.5 * max((V - R)^2, (V_clip - R)^2), V_clip = old + clip(V - old, -0.2, 0.2):
    V 1.5, old 1.0, R 2.0 -> V_clip 1.2: max(0.25, 0.64) / 2 = 0.32 (moving past the clip gains nothing);
    V 1.1, old 1.0, R 2.0 -> inside the clip: 0.81 / 2 = 0.405;
    V 0.5, old 1.0, R 0.0 -> V_clip 0.8: max(0.25, 0.64) / 2 = 0.32."""
    v = torch.tensor([1.5, 1.1, 0.5], requires_grad=True)
    loss = clipped_value_loss(v, torch.tensor([1.0, 1.0, 1.0]), torch.tensor([2.0, 2.0, 0.0]), 0.2)
    assert torch.allclose(loss, torch.tensor([0.32, 0.405, 0.32]))
    loss.sum().backward()
    assert torch.allclose(v.grad, torch.tensor([0.0, -0.9, 0.0]))  # only the unclipped term has a gradient


def test_adaptive_kl_moves_beta_the_right_way():
    """KL above target raises beta, below lowers it, on target leaves it; the error is clipped to +-0.2."""
    assert adaptive_kl_beta(0.1, 1.5, 1.0, 100, 10) == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    assert adaptive_kl_beta(0.1, 1.1, 1.0, 100, 10) == pytest.approx(0.1 * (1 + 0.1 * 0.1))
    assert adaptive_kl_beta(0.1, 0.0, 1.0, 100, 10) == pytest.approx(0.1 * (1 - 0.2 * 0.1))
    assert adaptive_kl_beta(0.1, 1.0, 1.0, 100, 10) == pytest.approx(0.1)
    beta = 0.1
    for _ in range(50):  # a KL stuck above target keeps raising beta
        beta = adaptive_kl_beta(beta, 5.0, 1.0, 100, 10)
    assert beta > 0.1 * 1.02 ** 49


# ------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def rm_ckpts(sft_ckpt, tmp_path_factory):
    """(Untrained, non-trivial) outcome and process reward models on the tiny SFT body."""
    gpt, tok, _ = load_checkpoint(sft_ckpt)
    rm = random_head_rm(gpt)
    rm.gain.fill_(2.0), rm.bias.fill_(-0.5)
    paths = {}
    for kind in ("outcome", "process"):
        paths[kind] = str(tmp_path_factory.mktemp(kind) / "ckpt.pt")
        save_checkpoint(paths[kind], rm, tok, rm_kind=kind)
    top = ScalarModel(load_checkpoint(sft_ckpt)[0], top_blocks=1)  # train_rm.py's default shape: new blocks on top
    torch.nn.init.normal_(top.head.weight, std=1.0)
    paths["outcome_top"] = str(tmp_path_factory.mktemp("outcome_top") / "ckpt.pt")
    save_checkpoint(paths["outcome_top"], top, tok, rm_kind="outcome")
    return paths


@pytest.mark.parametrize("judge,extra", [("outcome", []), ("process", []), ("outcome_top", []),
                                         ("outcome", ["--critic=shared", "--kl_estimator=k3", "--whiten_rewards=True",
                                                      "--adaptive_kl=False", "--ent_coef=0.01"])])
def test_tiny_ppo_run(sft_ckpt, rm_ckpts, tmp_path, judge, extra):
    """Two iterations end to end: every metric is logged, beta adapts (or not), the curves are saved."""
    out = tmp_path / "ppo"
    r = subprocess.run([sys.executable, "train_ppo.py", f"--init_from={sft_ckpt}", f"--reward_model={rm_ckpts[judge]}",
                        f"--out_dir={out}", "--batch_size=4", "--max_iters=2", "--ppo_epochs=2", "--minibatches=2",
                        "--eval_interval=2", "--n_eval=4", "--max_new_tokens=10", "--device=cpu", *extra],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert [l["iter"] for l in lines] == [1, 2]
    for key in ("rm", "rm_std", "gold", "kl", "beta", "entropy", "approx_kl", "clipfrac", "vf_loss", "pg_loss",
                "explained_var", "len", "eos", "non_score_reward"):
        assert key in lines[0], key
    assert "eval/gold" in lines[1]
    assert (lines[1]["beta"] == lines[0]["beta"]) == bool(extra)  # fixed, or adapted after iteration 1
    if judge == "process":  # the critic starts with a zero head: every first value is 0, explaining nothing
        assert lines[0]["explained_var"] == pytest.approx(0.0, abs=1e-6)
    elif not extra:  # the critic starts as the normalised outcome RM (head std 1): far from 0
        assert abs(lines[0]["explained_var"]) > 1e-3
    rows = list(csv.DictReader(open(out / "curves.csv")))
    assert [int(r["iter"]) for r in rows] == [1, 2] and set(rows[0]) == {"iter", "kl", "rm", "gold"}
    assert (out / "curves.png").exists() == (importlib.util.find_spec("matplotlib") is not None)  # optional picture
    summary = json.load(open(out / "summary.json"))
    assert {"eval/gold", "eval/pass"} <= set(summary["start"]) and summary["iters"] == 2
    policy, _, _ = load_checkpoint(str(out / "ckpt.pt"))
    assert not isinstance(policy, ScalarModel)
