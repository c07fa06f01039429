"""Hand-computed checks of the DPO family in nanoalign/losses.py (dpo/cDPO, robust, hinge, IPO,
SimPO, ORPO, RPO, KTO). Expected values come from the math module and explicit formulas."""
import copy
import math

import pytest
import torch

from nanoalign import core, losses
from nanoalign.model import GPT, GPTConfig


def close(a, b, tol=1e-5):
    """Compare a tensor (or number) with hand-computed numbers."""
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, atol=tol, rtol=0), (a, b)


def t(*xs):
    """A float32 tensor from the numbers given."""
    return torch.tensor(xs, dtype=torch.float32)


def softplus(x):
    """log(1 + e^x), by hand."""
    return math.log1p(math.exp(x))


def sigmoid(x):
    """1 / (1 + e^-x), by hand."""
    return 1.0 / (1.0 + math.exp(-x))


def pair(h):
    """Log-probs (pc, pr, rc, rr) whose difference of log-ratios is h: pc = h, everything else 0."""
    return t(h), t(0.0), t(0.0), t(0.0)


# ------------------------------------------------------------------------------ DPO

def test_dpo_worked_example():
    """pc, rc = -8.2, -8.5; pr, rr = -9.5, -9.1; beta 0.1 -> h = 0.7, logit 0.07, loss 0.659."""
    pc, rc, pr, rr = -8.2, -8.5, -9.5, -9.1
    h = (pc - rc) - (pr - rr)
    assert abs(h - 0.7) < 1e-12
    assert abs(0.1 * h - 0.07) < 1e-12
    expected = math.log(1 + math.exp(-0.07))  # -log sigmoid(0.07) = 0.65866
    assert round(expected, 3) == 0.659
    loss = losses.dpo_loss(t(pc), t(pr), t(rc), t(rr), beta=0.1)
    close(loss, [expected])
    assert round(loss.item(), 3) == 0.659


def test_dpo_batch_elementwise():
    """Per-pair losses: h = -2, -3, 0 at beta 0.5 -> softplus(1), softplus(1.5), log 2."""
    loss = losses.dpo_loss(t(-1.0, -5.0, -2.0), t(-4.0, -2.0, -2.0), t(-2.0, -4.0, -1.0),
                           t(-7.0, -4.0, -1.0), beta=0.5)
    hs = [(-1.0 + 2.0) - (-4.0 + 7.0), (-5.0 + 4.0) - (-2.0 + 4.0), (-2.0 + 1.0) - (-2.0 + 1.0)]
    assert hs == [-2.0, -3.0, 0.0]
    close(loss, [softplus(-0.5 * h) for h in hs])  # h = (pc - rc) - (pr - rr) per pair
    close(loss, [softplus(1.0), softplus(1.5), math.log(2.0)])


def _tiny_setup(seed=0, perturb=0.0):
    """Tiny GPT policy, a frozen deep copy as reference, and shared-prompt chosen/rejected batches."""
    torch.manual_seed(seed)
    cfg = GPTConfig(block_size=16, vocab_size=12, n_layer=1, n_head=2, n_embd=16)
    policy = GPT(cfg)
    ref = copy.deepcopy(policy)
    for p in ref.parameters():
        p.requires_grad_(False)
    if perturb:  # move the policy away from the reference so that h != 0
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(perturb * torch.randn_like(p))
    B, P, R = 3, 4, 6  # pairs, prompt length, response length
    prompt = torch.randint(0, cfg.vocab_size, (B, P))
    chosen = torch.cat([prompt, torch.randint(0, cfg.vocab_size, (B, R))], 1)
    rejected = torch.cat([prompt, torch.randint(0, cfg.vocab_size, (B, R))], 1)
    return policy, ref, chosen, rejected, P


def seq_logp(model, idx, P):
    """Sum of token log-probs over the response positions (tokens P..T-1)."""
    lp = core.token_logprobs(model(idx)[:, :-1], idx[:, 1:])  # lp[:, j] is log p(idx[:, j + 1])
    return lp[:, P - 1:].sum(-1)


def test_dpo_at_init_is_log2_with_nonzero_grad():
    """policy == reference: h = 0, loss = log 2 exactly per pair, yet the gradient is non-zero."""
    policy, ref, chosen, rejected, P = _tiny_setup()
    pc, pr = seq_logp(policy, chosen, P), seq_logp(policy, rejected, P)
    with torch.no_grad():
        rc, rr = seq_logp(ref, chosen, P), seq_logp(ref, rejected, P)
    close(pc - rc, [0.0] * 3, tol=1e-6)
    close(pr - rr, [0.0] * 3, tol=1e-6)
    loss = losses.dpo_loss(pc, pr, rc, rr, beta=0.1)
    close(loss, [math.log(2.0)] * 3, tol=1e-6)
    loss.mean().backward()
    grads = [p.grad for p in policy.parameters() if p.grad is not None]
    assert grads and any(g.abs().max().item() > 1e-6 for g in grads)
    assert all(p.grad is None for p in ref.parameters())


@pytest.mark.parametrize("perturb", [0.0, 0.05])
def test_dpo_gradient_formula(perturb):
    """grad dpo = sum over pairs of -beta * sigmoid(-beta h_i) * (grad logp_c,i - grad logp_r,i)."""
    beta = 0.5
    policy, ref, chosen, rejected, P = _tiny_setup(seed=1, perturb=perturb)
    params = [p for p in policy.parameters()]
    with torch.no_grad():
        rc, rr = seq_logp(ref, chosen, P), seq_logp(ref, rejected, P)
    pc, pr = seq_logp(policy, chosen, P), seq_logp(policy, rejected, P)
    hs = ((pc - rc) - (pr - rr)).tolist()
    if perturb:
        assert max(abs(h) for h in hs) > 1e-2  # the coefficient really differs from beta / 2
    expected = [torch.zeros_like(p) for p in params]
    for i, h in enumerate(hs):
        coef = -beta * sigmoid(-beta * h)  # by hand, from the numeric h
        gc = torch.autograd.grad(pc[i], params, retain_graph=True)
        gr = torch.autograd.grad(pr[i], params, retain_graph=True)
        for e, a, b in zip(expected, gc, gr):
            e.add_(coef * (a - b))
    got = torch.autograd.grad(losses.dpo_loss(pc, pr, rc, rr, beta=beta).sum(), params)
    assert any(e.abs().max().item() > 1e-4 for e in expected)
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, atol=1e-6, rtol=0), (g - e).abs().max()


# ------------------------------------------------------------------------------ cDPO and robust DPO

def test_cdpo_hand_value_and_eps0_is_dpo():
    """cDPO eps 0.2, worked example: 0.8 * softplus(-0.07) + 0.2 * softplus(0.07); eps 0 is DPO."""
    args = t(-8.2), t(-9.5), t(-8.5), t(-9.1)
    expected = 0.8 * softplus(-0.07) + 0.2 * softplus(0.07)  # 0.8 * 0.65866 + 0.2 * 0.72866
    close(losses.dpo_loss(*args, beta=0.1, label_smoothing=0.2), [expected])
    close(losses.dpo_loss(*args, beta=0.1, label_smoothing=0.0), [softplus(-0.07)])
    h = 2.0  # beta 1: 0.9 * log(1+e^-2) + 0.1 * log(1+e^2)
    close(losses.dpo_loss(*pair(h), beta=1.0, label_smoothing=0.1),
          [0.9 * math.log(1 + math.exp(-2.0)) + 0.1 * math.log(1 + math.exp(2.0))])


@pytest.mark.parametrize("z", [-1.5, 0.07, 2.0])
def test_robust_dpo_hand_value(z):
    """robust = ((1 - eps) softplus(-z) - eps softplus(z)) / (1 - 2 eps), z = beta h, eps 0.2."""
    eps, beta = 0.2, 0.5
    expected = ((1 - eps) * softplus(-z) - eps * softplus(z)) / (1 - 2 * eps)
    close(losses.robust_dpo_loss(*pair(z / beta), beta=beta, eps=eps), [expected])


@pytest.mark.parametrize("h", [-3.0, 0.7, 4.0])
def test_robust_dpo_is_unbiased_under_label_flips(h):
    """(1 - eps) robust(h) + eps robust(-h) = -log sigmoid(beta h): the clean DPO loss."""
    eps, beta = 0.3, 0.5
    pc, pr, rc, rr = t(-2.0), t(-2.0 - h), t(-1.0), t(-1.0)  # h = (pc - rc) - (pr - rr)
    kept = losses.robust_dpo_loss(pc, pr, rc, rr, beta=beta, eps=eps)
    flipped = losses.robust_dpo_loss(pr, pc, rr, rc, beta=beta, eps=eps)  # chosen <-> rejected
    close((1 - eps) * kept + eps * flipped, [softplus(-beta * h)])
    close(losses.dpo_loss(pc, pr, rc, rr, beta=beta), [softplus(-beta * h)])


# ------------------------------------------------------------------------------ hinge and IPO

def test_hinge_below_and_above_margin():
    """relu(1 - beta h) with beta 0.5: h = 1 -> 0.5, h = -2 -> 2, h = 3 (> 1/beta = 2) -> 0."""
    loss = losses.hinge_loss(t(1.0, -2.0, 3.0), t(0.0, 0.0, 0.0), t(0.0, 0.0, 0.0), t(0.0, 0.0, 0.0),
                             beta=0.5)
    close(loss, [1 - 0.5 * 1.0, 1 - 0.5 * -2.0, 0.0])


def test_hinge_zero_gradient_beyond_margin():
    """Past h = 1/beta the hinge is flat (grad 0); before it the grad wrt pc is -beta."""
    pc = t(3.0, 1.0).requires_grad_()
    zeros = t(0.0, 0.0)
    loss = losses.hinge_loss(pc, zeros, zeros, zeros, beta=0.5)
    loss.sum().backward()
    assert loss[0].item() == 0.0 and pc.grad[0].item() == 0.0  # exactly flat, not merely small
    close(pc.grad, [0.0, -0.5])


def test_ipo_hand_value_and_minimum():
    """(h - 1/(2 beta))^2 with beta 0.25: h = 0.5 -> (0.5 - 2)^2 = 2.25; minimum 0 at h = 2."""
    beta = 0.25
    close(losses.ipo_loss(*pair(0.5), beta=beta), [(0.5 - 1 / (2 * beta)) ** 2])
    close(losses.ipo_loss(*pair(0.5), beta=beta), [2.25])
    hs = t(1.9, 2.0, 2.1).requires_grad_()
    zeros = t(0.0, 0.0, 0.0)
    loss = losses.ipo_loss(hs, zeros, zeros, zeros, beta=beta)
    close(loss, [0.01, 0.0, 0.01])
    loss.sum().backward()
    close(hs.grad, [2 * (1.9 - 2.0), 0.0, 2 * (2.1 - 2.0)])  # slope 0 at the minimum


# ------------------------------------------------------------------------------ SimPO, ORPO, RPO

def test_simpo_hand_value():
    """beta 2, gamma 1, a_c = -0.4, a_r = -0.9: -log sigmoid(2 * 0.5 - 1) = log 2; and a_r = -1.4."""
    close(losses.simpo_loss(t(-0.4), t(-0.9), beta=2.0, gamma=1.0), [math.log(2.0)])
    z = 2.0 * (-0.4 - -1.4) - 1.0  # = 1
    close(losses.simpo_loss(t(-0.4), t(-1.4), beta=2.0, gamma=1.0), [math.log(1 + math.exp(-z))])
    close(losses.simpo_loss(t(-0.4), t(-1.4), beta=2.0, gamma=0.0), [math.log(1 + math.exp(-2.0))])


def test_orpo_hand_value():
    """a_c = -0.5, a_r = -1.0, lam 0.1: log odds(a) = a - log(1 - e^a); 0.5 - 0.1 log sigmoid(lo_c - lo_r)."""
    lo_c = -0.5 - math.log(1 - math.exp(-0.5))  # 0.4328
    lo_r = -1.0 - math.log(1 - math.exp(-1.0))  # -0.5413
    expected = 0.5 - 0.1 * -math.log(1 + math.exp(-(lo_c - lo_r)))
    close(losses.orpo_loss(t(-0.5), t(-1.0), lam=0.1), [expected])
    close(losses.orpo_loss(t(-0.5), t(-1.0), lam=0.0), [0.5])


def test_orpo_stable_at_extremes():
    """a_c = -1e-9 (p -> 1) and a = -50 (p -> 0): finite loss and gradients, no NaN."""
    ac = t(-1e-9, -50.0, -1e-9).requires_grad_()
    ar = t(-50.0, -1e-9, -1e-9).requires_grad_()
    loss = losses.orpo_loss(ac, ar, lam=0.1)
    assert torch.isfinite(loss).all(), loss
    loss.sum().backward()
    assert torch.isfinite(ac.grad).all() and torch.isfinite(ar.grad).all(), (ac.grad, ar.grad)
    # a_c ~ 0, a_r = -50: lo_c - lo_r is huge, so the odds term ~ 0 and the loss ~ -a_c ~ 0
    close(loss[0], 0.0, tol=1e-6)
    # a_c = -50, a_r ~ 0: lo_c ~ -50, lo_r >= 13.8 (clamped), so the loss ~ 50 + 0.1 * (63.8 or more)
    assert loss[1].item() > 50.0 + 0.1 * 60.0
    close(loss[2], 0.1 * math.log(2.0), tol=1e-6)  # equal odds: -0.1 log sigmoid(0)


def test_rpo_hand_value():
    """Worked example plus alpha 0.5 * NLL of chosen (avg_pc = -1.2): 0.65866 + 0.6."""
    loss = losses.rpo_loss(t(-8.2), t(-9.5), t(-8.5), t(-9.1), t(-1.2), beta=0.1, alpha=0.5)
    close(loss, [math.log(1 + math.exp(-0.07)) + 0.5 * 1.2])
    loss0 = losses.rpo_loss(t(-8.2), t(-9.5), t(-8.5), t(-9.1), t(-1.2), beta=0.1, alpha=0.0)
    close(loss0, [math.log(1 + math.exp(-0.07))])


# ------------------------------------------------------------------------------ KTO

def test_kto_reference_point_mean_clamp_detach():
    """z0 = max(0, mean(logp - ref)), detached: mean 0.3 -> 0.3, mean -0.5 -> 0."""
    lp = t(-1.0, -2.0, -3.0).requires_grad_()
    z0 = losses.kto_reference_point(lp, t(-1.5, -2.0, -3.4))  # diffs 0.5, 0, 0.4
    close(z0, 0.3)
    assert not z0.requires_grad and z0.grad_fn is None
    z0 = losses.kto_reference_point(lp, t(-0.5, -1.5, -2.0))  # diffs -0.5, -0.5, -1.0: mean -2/3
    close(z0, 0.0, tol=0)
    assert not z0.requires_grad


def test_kto_loss_hand_values():
    """Desirable: 1 - sigmoid(beta (r - z0)); undesirable: 1 - sigmoid(beta (z0 - r)); beta 0.5, z0 0.2."""
    beta, z0 = 0.5, 0.2
    logp, ref = t(-1.0, -3.0, -2.0, -1.0), t(-2.0, -2.5, -2.0, -1.6)  # r = 1.0, -0.5, 0.0, 0.6
    desirable = torch.tensor([True, True, False, False])
    loss = losses.kto_loss(logp, ref, desirable, torch.tensor(z0), beta=beta)
    close(loss, [1 - sigmoid(0.5 * (1.0 - 0.2)), 1 - sigmoid(0.5 * (-0.5 - 0.2)),
                 1 - sigmoid(0.5 * (0.2 - 0.0)), 1 - sigmoid(0.5 * (0.2 - 0.6))])


def test_kto_lambda_weights_apply_to_the_right_examples():
    """lambda_d 2 scales only desirable losses, lambda_u 0.25 only undesirable ones."""
    beta, z0 = 1.0, 0.0
    logp, ref = t(0.0, 0.0), t(-1.0, -1.0)  # r = 1 for both
    desirable = torch.tensor([True, False])
    loss = losses.kto_loss(logp, ref, desirable, torch.tensor(z0), beta=beta, lambda_d=2.0, lambda_u=0.25)
    close(loss, [2.0 * (1 - sigmoid(1.0)), 0.25 * (1 - sigmoid(-1.0))])
    loss = losses.kto_loss(logp, ref, ~desirable, torch.tensor(z0), beta=beta, lambda_d=2.0, lambda_u=0.25)
    close(loss, [0.25 * (1 - sigmoid(-1.0)), 2.0 * (1 - sigmoid(1.0))])
