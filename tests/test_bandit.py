"""Theory you can run: the closed forms behind RLHF, DPO, IPO, PPO, GAE, GRPO, the KL estimators and
best-of-N, checked exactly on the tabular language of nanoalign/bandit.py with the project's own loss
functions. Each test names the result it checks; docs/derivations.md derives it."""
import math

import pytest
import torch

from nanoalign import bandit
from nanoalign.bandit import (expected_pair_loss, kl, log_partition, make_table, objective, optimal_logp,
                              pair_weights, seq_logps, token_logps)
from nanoalign.core import kl_penalized_reward, per_token_rewards, token_logprobs
from nanoalign.losses import (aggregate, bradley_terry_loss, clipped_surrogate, dpo_loss, gae, group_advantages,
                              ipo_loss, k1_kl, k2_kl, k3_kl)
from nanoalign.model import GPT, GPTConfig
from nanoalign.rewards import best_of_n

BETA = 0.5


def table(**kw):
    """(ref_logits, ref_logp, rewards) of a random table (3 prompts x 9 responses of 2 tokens by default)."""
    ref_logits, r = make_table(**kw)
    return ref_logits, seq_logps(ref_logits), r


def adam(loss_fn, x0, steps, lr=0.1):
    """Minimise loss_fn(x) from x0 with Adam; -> x (detached)."""
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(x).backward()
        opt.step()
    return x.detach()


# ------------------------------------------------------------------------------ the table itself

def test_table_is_a_policy_and_agrees_with_core():
    """Each prompt's responses sum to probability 1; the float64 token log-probs are core.token_logprobs'
    (float32); logits_for turns a sequence distribution back into tree logits; expect_given_prefix
    averages over the right responses."""
    ref_logits, ref, r = table()
    assert torch.allclose(ref.exp().sum(-1), torch.ones(3, dtype=torch.float64), atol=1e-12)
    P, N, V = ref_logits.shape
    tok = token_logps(ref_logits)
    nodes, seqs = bandit.prefix_nodes(V, 2), bandit.sequences(V, 2)
    core_tok = token_logprobs(ref_logits[:, nodes].reshape(P * V * V, 2, V), seqs.repeat(P, 1))
    assert torch.allclose(tok.reshape(-1, 2).float(), core_tok, atol=1e-6)
    assert torch.allclose(seq_logps(bandit.logits_for(ref, V)), ref, atol=1e-12)
    # E[r | y_<1] by hand: the 3 responses that start with token 0 of prompt 0, weighted by pi(y_2 | y_1)
    e = bandit.expect_given_prefix(r, tok, 1)
    by_hand = (tok[0, :3, 1].exp() * r[0, :3]).sum()
    assert torch.allclose(e[0, :3], by_hand.expand(3)) and not torch.allclose(e[0, 3:6], by_hand.expand(3))
    assert torch.allclose(bandit.expect_given_prefix(r, tok, 0), (ref.exp() * r).sum(-1, keepdim=True).expand(3, 9))
    assert torch.equal(bandit.expect_given_prefix(r, tok, 2), r)


# ------------------------------------------------------------------------------ 1. pi* maximises E[r] - beta KL

def test_optimal_policy_attains_beta_log_z_and_beats_every_perturbation():
    """J(pi*) = beta log Z(x); J(pi) = beta log Z - beta KL(pi || pi*) for any pi, so every other policy
    scores lower, by exactly beta KL(pi || pi*); the gradient of J is zero at pi*."""
    ref_logits, ref, r = table()
    star = optimal_logp(ref, r, BETA)
    assert torch.allclose(star.exp().sum(-1), torch.ones(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(objective(star, ref, r, BETA), BETA * log_partition(ref, r, BETA), atol=1e-12)
    star_logits = bandit.logits_for(star, 3)
    g = torch.Generator().manual_seed(1)
    for scale in (1e-3, 0.1, 1.0):
        for _ in range(10):
            pi = seq_logps(star_logits + scale * torch.randn(star_logits.shape, generator=g, dtype=torch.float64))
            gap = objective(star, ref, r, BETA) - objective(pi, ref, r, BETA)
            assert (gap > 0).all()
            assert torch.allclose(gap, BETA * kl(pi, star), atol=1e-12, rtol=1e-9)
    x = star_logits.clone().requires_grad_(True)
    objective(seq_logps(x), ref, r, BETA).sum().backward()
    assert x.grad.abs().max() < 1e-12


# ------------------------------------------------------------------------------ 2. policy-gradient ascent -> pi*

def test_per_token_kl_rewards_sum_to_the_sequence_reward():
    """sum_t r_t of core.per_token_rewards (k1 per token) is core.kl_penalized_reward of the sequence."""
    ref_logits, ref, r = table()
    pi_logits = ref_logits + 0.5
    pi_logits[:, 0] *= -1
    tok, ref_tok = token_logps(pi_logits).reshape(-1, 2), token_logps(ref_logits).reshape(-1, 2)
    per_token = per_token_rewards(r.reshape(-1), tok - ref_tok, torch.ones_like(tok), BETA)
    seq = kl_penalized_reward(r.reshape(-1), tok.sum(-1), ref_tok.sum(-1), BETA)
    assert torch.allclose(per_token.sum(-1), seq, atol=1e-12)


def test_policy_gradient_is_the_exact_gradient_and_ascends_to_pi_star():
    """The PPO-RLHF loss (KL as a per-token reward, reward-to-go from GAE, ratio-1 surrogate) has exactly
    the gradient of -J; plain gradient ascent with it converges to pi* = pi_ref exp(r/beta) / Z."""
    ref_logits, ref, r = table()
    g = torch.Generator().manual_seed(2)
    x = (ref_logits + torch.randn(ref_logits.shape, generator=g, dtype=torch.float64)).requires_grad_(True)
    pg, = torch.autograd.grad(bandit.rlhf_pg_loss(x, ref_logits, r, BETA), x)
    exact, = torch.autograd.grad(-objective(seq_logps(x), ref, r, BETA).sum(), x)
    assert torch.allclose(pg, exact, atol=1e-14) and exact.abs().max() > 1e-2
    x = ref_logits.clone()
    for _ in range(400):  # plain gradient ascent on J: x <- x + lr grad J = x - lr grad loss
        x.requires_grad_(True)
        grad, = torch.autograd.grad(bandit.rlhf_pg_loss(x, ref_logits, r, BETA), x)
        x = (x - 4.0 * grad).detach()
    star = optimal_logp(ref, r, BETA)
    assert (seq_logps(x).exp() - star.exp()).abs().max() < 1e-5
    assert torch.allclose(objective(seq_logps(x), ref, r, BETA), BETA * log_partition(ref, r, BETA),
                          atol=1e-10)


# ------------------------------------------------------------------------------ 3. DPO's minimiser is pi*; Z cancels

def test_dpo_at_pi_star_is_bradley_terry_on_the_true_reward():
    """beta log pi*/pi_ref = r - beta log Z, so beta h(y, y') = r(y) - r(y'): Z(x) cancels, and DPO's loss
    at pi* is the Bradley-Terry loss of the true reward, pair by pair."""
    ref_logits, ref, r = table()
    star = optimal_logp(ref, r, BETA)
    Y = r.shape[-1]
    pc, pr = star[:, :, None].expand(-1, Y, Y), star[:, None, :].expand(-1, Y, Y)
    rc, rr = ref[:, :, None].expand(-1, Y, Y), ref[:, None, :].expand(-1, Y, Y)
    bt = bradley_terry_loss(r[:, :, None].expand(-1, Y, Y), r[:, None, :].expand(-1, Y, Y))
    assert torch.allclose(dpo_loss(pc, pr, rc, rr, beta=BETA), bt, atol=1e-12)


def test_dpo_minimiser_is_pi_star_and_its_implicit_reward_is_r_up_to_a_constant():
    """Pairs from pi_ref labelled by Bradley-Terry on r: the exact expected DPO loss, minimised from
    pi_ref, reaches pi*, its gradient vanishes there, its minimum is the labels' own entropy, and
    beta log pi/pi_ref - r is one constant per prompt (-beta log Z)."""
    ref_logits, ref, r = table()
    w = pair_weights(ref, r)
    assert torch.allclose(w.sum((-2, -1)), torch.ones(3, dtype=torch.float64), atol=1e-12)
    star = optimal_logp(ref, r, BETA)
    expected = lambda x: expected_pair_loss(dpo_loss, seq_logps(x), ref, w, beta=BETA).sum()
    x = adam(expected, ref_logits, 500)
    pi = seq_logps(x)
    assert (pi.exp() - star.exp()).abs().max() < 1e-8
    implicit = BETA * (pi - ref)
    offset = implicit - r
    assert (offset.max(-1).values - offset.min(-1).values).max() < 1e-7
    assert torch.allclose(offset[:, 0], -BETA * log_partition(ref, r, BETA), atol=1e-7)
    entropy = (w * (-torch.sigmoid(r[:, :, None] - r[:, None, :]).log())).sum((-2, -1))  # H of BT labels
    assert torch.allclose(expected_pair_loss(dpo_loss, star, ref, w, beta=BETA), entropy, atol=1e-12)
    s = bandit.logits_for(star, 3).requires_grad_(True)
    expected(s).backward()
    assert s.grad.abs().max() < 1e-12


def test_adding_a_per_prompt_constant_to_the_reward_changes_nothing():
    """r + c(x): the same preference probabilities, the same pi* (Z(x) absorbs e^{c/beta}), the same DPO
    loss everywhere, so the same minimiser."""
    ref_logits, ref, r = table()
    shifted = r + torch.tensor([[3.0], [-7.5], [100.0]], dtype=torch.float64)
    assert torch.allclose(optimal_logp(ref, shifted, BETA), optimal_logp(ref, r, BETA), atol=1e-10)
    assert torch.allclose(pair_weights(ref, shifted), pair_weights(ref, r), atol=1e-14)
    assert torch.allclose(log_partition(ref, shifted, BETA) - log_partition(ref, r, BETA),
                          torch.tensor([3.0, -7.5, 100.0], dtype=torch.float64) / BETA)
    pi = seq_logps(ref_logits + 0.3)
    assert torch.allclose(expected_pair_loss(dpo_loss, pi, ref, pair_weights(ref, shifted), beta=BETA),
                          expected_pair_loss(dpo_loss, pi, ref, pair_weights(ref, r), beta=BETA), atol=1e-14)


# ------------------------------------------------------------------------------ 4. deterministic preferences

@pytest.mark.parametrize("beta", [0.1, 1.0, 10.0])
def test_deterministic_preferences_dpo_drives_the_loser_to_zero_ipo_stays_finite(beta):
    """Two responses, y_w always preferred (P = 1). DPO's loss -log sigmoid(beta h) falls with every
    increase of h = log pi(y_w)/pi(y_l) - log pi_ref(y_w)/pi_ref(y_l) and has no minimiser: its gradient
    beta sigmoid(-beta h) never vanishes and the infimum 0 is reached only at pi(y_l) = 0, whatever beta.
    IPO's (h - 1/(2 beta))^2 has its minimum at the closed form h = 1/(2 beta), i.e.
    log pi(y_w)/pi(y_l) = log pi_ref(y_w)/pi_ref(y_l) + 1/(2 beta), and optimisation settles there."""
    ref_logits = torch.tensor([[[0.3, -0.2]]], dtype=torch.float64)  # one prompt, V = 2, L = 1
    ref = seq_logps(ref_logits)
    w = torch.tensor([[[0.0, 1.0], [0.0, 0.0]]], dtype=torch.float64)  # the pair is always (y_w = 0, y_l = 1)
    ipo_star = bandit.ipo_optimum_logp(ref, beta).exp()[0]
    assert math.isclose(math.log(ipo_star[0] / ipo_star[1]), 0.5 + 1 / (2 * beta), rel_tol=1e-12)
    # the exact losses along pi(y_l) = sigmoid(-m), m = log pi(y_w)/pi(y_l) from -5 to 40
    m = torch.linspace(-5, 40, 4501, dtype=torch.float64)
    pis = torch.stack([torch.nn.functional.logsigmoid(m), torch.nn.functional.logsigmoid(-m)], -1)
    along = lambda loss_fn: expected_pair_loss(loss_fn, pis, ref.expand(len(m), 2), w, beta=beta)
    dpo_path, ipo_path = along(dpo_loss), along(ipo_loss)
    assert (dpo_path.diff() < 0).all() and (dpo_path > 0).all()  # always lower with a smaller pi(y_l)
    assert abs(pis[ipo_path.argmin(), 1].exp() - ipo_star[1]) < 1e-3 and ipo_path.argmin() < len(m) - 1
    # optimisation from pi_ref: DPO keeps lowering pi(y_l) with a gradient that never vanishes; IPO converges
    for name, loss_fn in (("dpo", dpo_loss), ("ipo", ipo_loss)):
        f = lambda x: expected_pair_loss(loss_fn, seq_logps(x), ref, w, beta=beta).sum()
        x = ref_logits.clone().requires_grad_(True)
        opt = torch.optim.Adam([x], lr=0.1)
        pi_l = []
        for _ in range(400):
            opt.zero_grad()
            f(x).backward()
            opt.step()
            pi_l.append(seq_logps(x.detach())[0, 1].exp().item())
        opt.zero_grad()
        f(x).backward()
        if name == "dpo":
            assert all(b < a for a, b in zip(pi_l, pi_l[1:])) and x.grad.abs().max() > 0
            assert pi_l[-1] < ipo_star[1] / 3
        else:
            assert torch.allclose(seq_logps(x.detach()).exp()[0], ipo_star, atol=1e-8) and x.grad.abs().max() < 1e-6


# ------------------------------------------------------------------------------ 5. the DPO gradient's weight

def test_dpo_gradient_weight_is_sigmoid_of_minus_beta_h():
    """d loss / d(beta h) = -sigmoid(-beta h): at h = 0 loss 0.693 and -0.500, at beta h = 2 loss 0.127
    and -0.119. Per sequence: d/d log pi(y_w) = -beta sigmoid(-beta h), d/d log pi(y_l) = +beta sigmoid(-beta h).
    Bradley-Terry likewise: d/dr_c = -(1 - P(chosen > rejected))."""
    for z, loss_3, grad_3 in ((0.0, 0.693, -0.500), (2.0, 0.127, -0.119)):
        zt = torch.tensor(z, dtype=torch.float64, requires_grad=True)
        zero = torch.zeros((), dtype=torch.float64)
        loss = dpo_loss(zt, zero, zero, zero, beta=1.0)  # with beta 1 and pc = z, beta h = z
        loss.backward()
        assert round(loss.item(), 3) == loss_3 and round(zt.grad.item(), 3) == grad_3
        assert math.isclose(zt.grad.item(), -1 / (1 + math.exp(z)), rel_tol=1e-12)
    beta, h = 0.1, 3.0
    pc = torch.tensor(h, dtype=torch.float64, requires_grad=True)
    pr = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    dpo_loss(pc, pr, torch.tensor(0.0), torch.tensor(0.0), beta=beta).backward()
    weight = 1 / (1 + math.exp(beta * h))  # sigmoid(-beta h): how wrong the implicit reward model is
    assert math.isclose(pc.grad.item(), -beta * weight, rel_tol=1e-12)
    assert math.isclose(pr.grad.item(), beta * weight, rel_tol=1e-12)
    rc_ = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    rr_ = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    bradley_terry_loss(rc_, rr_).backward()
    assert math.isclose(rc_.grad.item(), -(1 - 1 / (1 + math.exp(-1.5))), rel_tol=1e-12)
    assert math.isclose(rr_.grad.item(), -rc_.grad.item(), rel_tol=1e-12)


# ------------------------------------------------------------------------------ 6. PPO's clip

def test_clipped_gradient_is_zero_exactly_where_the_ratio_left_the_range_the_advantage_favours():
    """d/d log pi(a) of pi_old(a) min(rho A, clip(rho) A) is pi_old(a) rho A inside, 0 where rho > 1 + eps
    with A > 0 or rho < 1 - eps with A < 0 (the flags of losses.clipped_surrogate), and pi_old(a) rho A
    again where rho left the range against the advantage (the pessimistic min keeps it)."""
    eps = 0.2
    rho = torch.tensor([0.5, 0.79, 0.81, 1.0, 1.19, 1.21, 2.0], dtype=torch.float64)
    old = torch.full_like(rho, 1 / 7).log()
    for sign in (1.0, -1.0):
        adv = torch.full_like(rho, sign)
        logp = (old + rho.log()).requires_grad_(True)
        bandit.clipped_objective(logp[None], old[None], adv[None], eps).sum().backward()
        _, low, high = clipped_surrogate(logp.detach(), old, adv, eps, eps)
        outside = (rho > 1 + eps) & (adv > 0) | (rho < 1 - eps) & (adv < 0)
        assert torch.equal(low | high, outside) and outside.any()
        assert torch.equal(logp.grad == 0, outside)
        assert torch.allclose(logp.grad[~outside], (old.exp() * rho * adv)[~outside], atol=1e-15)


def test_clipping_stops_the_update_and_bounds_the_kl_the_unclipped_surrogate_overshoots():
    """Gradient ascent on the exact surrogate of a one-step problem: the clipped one stops (gradient
    exactly 0) once every ratio is just past the edge the advantage pushes it to, so
    KL(pi_old || pi) <= max f(rho) over the ratios' range, about -eps - log(1 - eps); the unclipped
    sum_a pi(a) A_a is linear in pi and keeps going towards the greedy policy (KL without bound)."""
    eps = 0.2
    old_logits = torch.tensor([[0.5, 0.0, -0.5]], dtype=torch.float64)
    old = old_logits.log_softmax(-1)
    adv = torch.tensor([[1.0, -0.5, -1.0]], dtype=torch.float64)
    final = {}
    for e in (eps, float("inf")):
        x = old_logits.clone().requires_grad_(True)
        opt = torch.optim.SGD([x], lr=0.02)
        kls = []
        for step in range(400):
            opt.zero_grad()
            (-bandit.clipped_objective(x.log_softmax(-1), old, adv, e).sum()).backward()
            if x.grad.abs().max() == 0:
                break
            opt.step()
            kls.append(kl(old, x.detach().log_softmax(-1)).item())
        final[e] = step, (x.detach().log_softmax(-1) - old).exp()[0], kls
    step, rho, kls = final[eps]
    assert step < 100 and rho[0] > 1 + eps and (rho[1:] < 1 - eps).all()
    assert rho.max() < 1 + eps + 0.01 and rho.min() > 1 - eps - 0.01
    assert kls[-1] <= bandit.trust_region_kl(rho.min(), rho.max()) + 1e-12
    assert kls[-1] < 1.1 * bandit.trust_region_kl(1 - eps, 1 + eps)
    assert math.isclose(bandit.trust_region_kl(1 - eps, 1 + eps).item(), -eps - math.log(1 - eps), rel_tol=1e-12)
    step, rho, kls_unclipped = final[float("inf")]
    assert step == 399 and all(b > a for a, b in zip(kls_unclipped, kls_unclipped[1:]))
    assert kls_unclipped[-1] > 20 * kls[-1] and rho[0] > 1.5  # towards 1 / pi_old(best) = 1.93


# ------------------------------------------------------------------------------ 7. GAE

@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_gae_lambda_0_is_td_error_lambda_1_is_monte_carlo_minus_value(gamma):
    """A_t = sum_l (gamma lambda)^l delta_{t+l}. lambda = 0: A_t = delta_t = r_t + gamma V_{t+1} - V_t;
    lambda = 1: the sum telescopes to A_t = sum_{k >= t} gamma^(k-t) r_k - V_t. With the exact values of
    the policy, E[delta_{t+l} | y_<t+l] = 0, so E[A_t | y_<=t] = delta_t = Q(y_<t, y_t) - V(y_<t) and
    E[A_t | y_<t] = 0 for every lambda."""
    ref_logits, r = make_table(P=2, V=2, L=3, seed=3)
    pi_logits = ref_logits + torch.randn(ref_logits.shape, generator=torch.Generator().manual_seed(4),
                                         dtype=torch.float64)
    tok, ref_tok = token_logps(pi_logits), token_logps(ref_logits)
    P, Y, L = tok.shape
    mask = torch.ones(P * Y, L, dtype=torch.float64)
    rewards = per_token_rewards(r.reshape(-1), (tok - ref_tok).reshape(P * Y, L), mask, 0.1)
    values = bandit.exact_values(tok, rewards, gamma)
    next_v = torch.cat([values[:, 1:], torch.zeros(P * Y, 1, dtype=torch.float64)], 1)
    delta = rewards + gamma * next_v - values
    discount = gamma ** (torch.arange(L)[None, :] - torch.arange(L)[:, None]).clamp(min=0).double()
    mc = rewards @ torch.triu(discount).T  # sum_{k >= t} gamma^(k-t) r_k
    adv0, ret0 = gae(rewards, values, mask, gamma, lam=0.0)
    adv1, _ = gae(rewards, values, mask, gamma, lam=1.0)
    assert torch.allclose(adv0, delta, atol=1e-12) and torch.allclose(ret0, delta + values, atol=1e-12)
    assert torch.allclose(adv1, mc - values, atol=1e-12)
    assert not torch.allclose(adv0, adv1, atol=1e-3)
    for lam in (0.0, 0.5, 0.95, 1.0):
        adv = gae(rewards, values, mask, gamma, lam)[0].view(P, Y, L)
        for t in range(L):
            assert torch.allclose(bandit.expect_given_prefix(adv[..., t], tok, t + 1), delta.view(P, Y, L)[..., t],
                                  atol=1e-12)
            assert bandit.expect_given_prefix(adv[..., t], tok, t).abs().max() < 1e-12


# ------------------------------------------------------------------------------ 8. GRPO

@pytest.mark.parametrize("baseline,scale", [("mean", "group"), ("mean", "batch"), ("mean", "none"),
                                            ("loo", "none"), ("loo", "group")])
def test_group_advantages_sum_to_zero_in_each_group(baseline, scale):
    """sum_i (r_i - mean_j r_j) = 0, and leave-one-out's r_i - mean_{j != i} r_j = G/(G - 1) (r_i - mean_j r_j);
    a scale common to the group keeps the sum 0."""
    r = torch.rand(5, 7, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    adv = group_advantages(r, baseline, scale)
    assert adv.sum(-1).abs().max() < 1e-12 and adv.abs().max() > 0.1


def test_binary_rewards_advantage_is_sqrt_of_failure_odds():
    """Binary rewards, success fraction p in the group: a correct response gets (1 - p)/sqrt(p (1 - p))
    = sqrt((1 - p)/p), a wrong one -sqrt(p/(1 - p)). Over random groups with success probability p,
    E[A | correct] tends to sqrt((1 - p)/p) as G grows (exact sums over the binomial)."""
    for G, k in ((4, 1), (8, 2), (8, 6), (16, 1), (10, 5)):
        p = k / G
        adv = group_advantages((torch.arange(G) < k).double()[None])[0]
        assert torch.allclose(adv[:k], torch.full((k,), math.sqrt((1 - p) / p), dtype=torch.float64), rtol=1e-5)
        assert torch.allclose(adv[k:], torch.full((G - k,), -math.sqrt(p / (1 - p)), dtype=torch.float64), rtol=1e-5)
    p, gaps = 0.25, []
    for G in (4, 16, 64, 256):
        rewards = (torch.arange(G)[None] < torch.arange(1, G + 1)[:, None]).double()  # row k-1: k correct
        pmf = torch.tensor([math.comb(G - 1, j) * p ** j * (1 - p) ** (G - 1 - j) for j in range(G)],
                           dtype=torch.float64)  # P(k - 1 of the other G - 1 are correct)
        gaps.append(math.sqrt((1 - p) / p) - (pmf * group_advantages(rewards)[:, 0]).sum().item())
    assert all(0 < b < a for a, b in zip(gaps, gaps[1:])) and gaps[-1] < 0.01


def test_seq_mean_pushes_a_short_wrong_response_harder_per_token_constant_does_not():
    """One advantage A < 0 for a 2-token and an 8-token wrong response. GRPO's per-sequence mean gives
    each token -A / (B |y|), 4 times more per token to the short one (and the same total to each: long
    wrong answers are penalised less per token); the constant normaliser gives -A / (B max_len) to all."""
    B, max_len, A = 2, 8, -1.0
    mask = torch.zeros(B, max_len)
    mask[0, :2], mask[1, :] = 1, 1
    adv = torch.full((B, 1), A)
    grads = {}
    for mode in ("seq_mean", "token_mean", "constant"):
        logp = torch.zeros(B, max_len, requires_grad=True)
        aggregate(clipped_surrogate(logp, logp.detach(), adv)[0], mask, mode, max_len).backward()
        grads[mode] = logp.grad
    g = grads["seq_mean"]
    assert g[0, 0].item() == pytest.approx(-A / (B * 2)) and g[1, 0].item() == pytest.approx(-A / (B * 8))
    assert g[0, 0] / g[1, 0] == pytest.approx(4.0) and (g * mask).sum(-1).tolist() == pytest.approx([-A / B] * 2)
    for mode in ("token_mean", "constant"):
        real = grads[mode][mask.bool()]
        assert torch.allclose(real, real[0].expand_as(real))
    assert grads["constant"][0, 0].item() == pytest.approx(-A / (B * max_len))
    assert (grads["constant"] * (1 - mask)).abs().max() == 0


# ------------------------------------------------------------------------------ 9. KL estimators

def test_kl_estimators_exact_means_and_variances():
    """y ~ pi, log-ratio d = log pi_ref(y) - log pi(y): k1 = -d is unbiased but often negative and has the
    largest variance; k3 = e^d - 1 - d is unbiased (E[e^d] = 1) and >= 0; k2 = d^2 / 2 is >= 0, low
    variance and biased. Per token, E[sum_t k3_t] is the sequence KL (the chain rule of KL)."""
    pi = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64).log()
    ref = torch.tensor([0.3, 0.3, 0.25, 0.15], dtype=torch.float64).log()
    true = kl(pi, ref)
    (m1, v1), (m2, v2), (m3, v3) = (bandit.moments(k(pi, ref), pi) for k in (k1_kl, k2_kl, k3_kl))
    assert torch.allclose(m1, true, atol=1e-15) and torch.allclose(m3, true, atol=1e-15)
    assert abs(m2 - true) > 1e-5 and abs(m2 - true) < 0.05 * true
    assert k1_kl(pi, ref).min() < 0 and (k3_kl(pi, ref) >= 0).all() and (k2_kl(pi, ref) >= 0).all()
    assert v3 < v1 / 50 and v2 < v1 / 50
    ref_logits, ref_seq, _ = table()
    pi_logits = ref_logits + torch.randn(ref_logits.shape, generator=torch.Generator().manual_seed(6),
                                         dtype=torch.float64)
    tok, ref_tok, pi_seq = token_logps(pi_logits), token_logps(ref_logits), seq_logps(pi_logits)
    for est in (k1_kl, k3_kl):
        per_seq = est(tok, ref_tok).sum(-1)
        assert torch.allclose((pi_seq.exp() * per_seq).sum(-1), kl(pi_seq, ref_seq), atol=1e-12)


# ------------------------------------------------------------------------------ 10. best-of-N

def test_best_of_n_distribution_and_kl():
    """pi_n(y) = F(y)^n - (F(y) - pi(y))^n; it matches rewards.best_of_n on samples; its KL to pi is below
    log n - (n - 1)/n on the table and reaches it as the outcomes get finer (uniform over M)."""
    _, ref, r = table()
    assert torch.allclose(bandit.best_of_n_logp(ref, r, 1), ref, atol=1e-12)
    for n in (2, 4, 8, 16):
        bn = bandit.best_of_n_logp(ref, r, n)
        assert torch.allclose(bn.exp().sum(-1), torch.ones(3, dtype=torch.float64), atol=1e-12)
        assert (kl(bn, ref) < bandit.best_of_n_kl_bound(n)).all()
    g = torch.Generator().manual_seed(7)
    n, S = 4, 100_000
    samples = torch.multinomial(ref[0].exp(), S * n, replacement=True, generator=g).view(S, n)
    picked = samples.gather(-1, best_of_n(r[0][samples])[:, None]).squeeze(-1)
    empirical = torch.bincount(picked, minlength=9).double() / S
    exact = bandit.best_of_n_logp(ref, r, n)[0].exp()
    assert (empirical - exact).abs().max() < 4 * (0.25 / S) ** 0.5
    plug_in = (empirical * (empirical.clamp(min=1e-300).log() - ref[0])).sum()
    assert abs(plug_in - kl(exact.log(), ref[0])) < 0.01
    for M, tol in ((10, 0.11), (1000, 2e-5)):
        uniform = torch.full((1, M), -math.log(M), dtype=torch.float64)
        gap = bandit.best_of_n_kl_bound(16) - kl(bandit.best_of_n_logp(uniform, torch.arange(M)[None].double(), 16),
                                                  uniform).item()
        assert 0 < gap < tol
    assert math.isclose(bandit.best_of_n_kl_bound(4), math.log(4) - 0.75)


# ------------------------------------------------------------------------------ 11. worked examples

def test_worked_examples_not_yet_pinned():
    """Chosen -6.2/-6.5, rejected -7.8/-7.1, beta 0.1: h = 1.0, loss 0.644; the -8.2/-8.5, -9.5/-9.1
    example's sigmoid(0.07) = 0.517; rewards [1, 0, 0.5, 1]: group mean 0.625, advantage mean 0.000."""
    t = lambda x: torch.tensor(x, dtype=torch.float64)
    pc, rc, pr, rr = -6.2, -6.5, -7.8, -7.1
    assert math.isclose((pc - rc) - (pr - rr), 1.0, abs_tol=1e-12)
    assert round(dpo_loss(t(pc), t(pr), t(rc), t(rr), beta=0.1).item(), 3) == 0.644
    z = 0.1 * ((-8.2 + 8.5) - (-9.5 + 9.1))
    assert math.isclose(z, 0.07, abs_tol=1e-12) and round(torch.sigmoid(t(z)).item(), 3) == 0.517
    assert round(math.exp(-dpo_loss(t(-8.2), t(-9.5), t(-8.5), t(-9.1), beta=0.1).item()), 3) == 0.517
    rewards = t([[1.0, 0.0, 0.5, 1.0]])
    assert rewards.mean().item() == 0.625
    assert round(group_advantages(rewards).mean().item(), 3) == 0.0


# ------------------------------------------------------------------------------ memory of PPO's four models

def test_ppo_memory_arithmetic():
    """gpt_params matches the model class; GPT-2 small is 124,439,808 parameters; an AdamW step holds
    exactly 16 bytes per fp32 parameter (weights, grads, m, v); PPO's four GPT-2 models take 40 B/param
    (4.98 GB) in fp32 and 36 B/param (4.48 GB) in bf16 mixed precision."""
    for cfg in (GPTConfig(block_size=16, vocab_size=11, n_layer=2, n_head=2, n_embd=8),
                GPTConfig(block_size=32, vocab_size=50, n_layer=1, n_head=4, n_embd=24)):
        model = GPT(cfg)
        n = sum(p.numel() for p in model.parameters())
        assert n == bandit.gpt_params(cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.block_size)
    model = GPT(GPTConfig(block_size=16, vocab_size=11, n_layer=2, n_head=2, n_embd=8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 11, (2, 5))).float().sum().backward()
    opt.step()
    params = list(model.parameters())
    held = sum(p.numel() * p.element_size() + p.grad.numel() * p.grad.element_size() for p in params)
    held += sum(v.numel() * v.element_size() for s in opt.state.values() for k, v in s.items() if k != "step")
    assert held == 16 * sum(p.numel() for p in params)
    n = bandit.gpt_params(12, 768, 50257, 1024)
    assert n == 124_439_808
    fp32, mixed = bandit.ppo_memory(n), bandit.ppo_memory(n, mixed=True)
    assert fp32["total"] == 40 * n and round(fp32["total"] / 1e9, 2) == 4.98
    assert mixed["total"] == 36 * n and round(mixed["total"] / 1e9, 2) == 4.48
    assert fp32["policy"] == mixed["policy"] == 16 * n and fp32["reference"] == 4 * n and mixed["reference"] == 2 * n
