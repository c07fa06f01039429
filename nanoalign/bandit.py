"""
A tabular "language" in which the central results behind RLHF, DPO and GRPO are exact.

P prompts; a response is a sequence of L tokens over a vocabulary of V tokens, so each prompt has
Y = V^L responses, all enumerated (in lexicographic order). A policy is a table of free logits, one row
of V for every (prompt, prefix) node:

    pi(y | x) = prod_t softmax(logits[x, node(y_<t)])[y_t]

so the per-token view (PPO's rewards, GAE's values) and the per-sequence view (DPO, best-of-N) both
exist, and every policy over the Y responses has such logits. Expectations are sums over the table, in
float64, never samples: a result holds to rounding error or it does not hold. docs/derivations.md
derives each result; tests/test_bandit.py checks it with the project's own losses (nanoalign/losses.py)
and core functions (nanoalign/core.py). Shapes: logits [P, N, V] (N = 1 + V + ... + V^(L-1) nodes),
per-token log-probs [P, Y, L], per-sequence log-probs and rewards [P, Y].
"""
import functools
import itertools
import math

import torch
import torch.nn.functional as F

from nanoalign.core import per_token_rewards
from nanoalign.losses import clipped_surrogate, gae, k3_kl


# ------------------------------------------------------------------------------ the table

def depth(n_nodes, V):
    """The sequence length L of a tree of n_nodes = 1 + V + ... + V^(L-1) prefix nodes."""
    L, n = 0, 0
    while n < n_nodes:
        n, L = n + V ** L, L + 1
    assert n == n_nodes, (n_nodes, V)
    return L


@functools.lru_cache(maxsize=None)  # built once per (V, L): optimisation loops call it every step
def sequences(V, L):
    """All V^L responses as token ids, lexicographic. -> [Y, L] long (shared: do not modify)."""
    return torch.tensor(list(itertools.product(range(V), repeat=L)), dtype=torch.long).view(V ** L, L)


@functools.lru_cache(maxsize=None)
def prefix_nodes(V, L):
    """node(y_<t) for every response and position: level t's V^t nodes come after the levels above, in
    the order of the prefix read as a base-V number. -> [Y, L] long (shared: do not modify)."""
    seqs = sequences(V, L)
    nodes = torch.zeros_like(seqs)
    offset, value = 0, torch.zeros(V ** L, dtype=torch.long)
    for t in range(L):
        nodes[:, t] = offset + value
        offset, value = offset + V ** t, value * V + seqs[:, t]
    return nodes


def token_logps(logits):
    """log pi(y_t | x, y_<t) of every response, [P, N, V] -> [P, Y, L].

    Computed in float64 here (core.token_logprobs casts to float32, which is right for a network's bf16
    logits and too coarse for checks to 1e-10); it agrees with core.token_logprobs (tested)."""
    V = logits.shape[-1]
    L = depth(logits.shape[1], V)
    return F.log_softmax(logits, -1)[:, prefix_nodes(V, L), sequences(V, L)]


def seq_logps(logits):
    """log pi(y | x) = sum_t log pi(y_t | x, y_<t). [P, N, V] -> [P, Y]."""
    return token_logps(logits).sum(-1)


def logits_for(logp, V):
    """Tree logits that give the distribution exp(logp) over the responses ([P, Y] -> [P, N, V]): the
    logit of token v at prefix y_<t is log pi(y_<t, v), the marginal of the longer prefix (softmax
    turns it into pi(v | y_<t)). How pi* (defined per sequence) becomes a token-level policy."""
    P, Y = logp.shape
    L = round(math.log(Y, V))
    levels = [logp.view(P, V ** (t + 1), V ** (L - t - 1)).logsumexp(-1).view(P, V ** t, V) for t in range(L)]
    return torch.cat(levels, 1)


def make_table(P=3, V=3, L=2, seed=0):
    """A random reference policy (normal logits) and reward table (uniform in [0, 1]), float64.
    -> (ref_logits [P, N, V], rewards [P, Y])."""
    g = torch.Generator().manual_seed(seed)
    n_nodes = sum(V ** t for t in range(L))
    ref_logits = torch.randn(P, n_nodes, V, generator=g, dtype=torch.float64)
    rewards = torch.rand(P, V ** L, generator=g, dtype=torch.float64)
    return ref_logits, rewards


def expect_given_prefix(x, tok_logp, k):
    """E_pi[x | x, y_<k] for every response ([P, Y], [P, Y, L] -> [P, Y]): the responses that share
    the prefix y_<k are a contiguous block of V^(L-k) in lexicographic order, each weighted by
    pi(y_>=k | y_<k) = exp(sum_{t >= k} log pi(y_t | y_<t)). k = 0: E_pi[x]; k = L: x itself."""
    P, Y, L = tok_logp.shape
    V = round(Y ** (1 / L))
    w = tok_logp[..., k:].sum(-1).exp()
    block = V ** (L - k)
    return (w * x).view(P, Y // block, block).sum(-1, keepdim=True).expand(P, Y // block, block).reshape(P, Y)


# ------------------------------------------------------------------------------ the KL-regularised objective

def kl(logp, ref_logp):
    """Exact KL(pi || pi_ref) = sum_y pi(y) (log pi(y) - log pi_ref(y)), over the last dimension."""
    return (logp.exp() * (logp - ref_logp)).sum(-1)


def objective(logp, ref_logp, r, beta):
    """The RLHF objective per prompt, exactly: J(pi) = E_pi[r] - beta KL(pi || pi_ref). [P, Y] -> [P]."""
    return (logp.exp() * r).sum(-1) - beta * kl(logp, ref_logp)


def log_partition(ref_logp, r, beta):
    """log Z(x) = log sum_y pi_ref(y|x) exp(r(x,y) / beta). [P, Y] -> [P]."""
    return torch.logsumexp(ref_logp + r / beta, -1)


def optimal_logp(ref_logp, r, beta):
    """The maximiser of J: log pi*(y|x) = log pi_ref(y|x) + r(x,y) / beta - log Z(x), and J(pi*) = beta log Z(x).
    Why: J(pi) = sum_y pi(y) [r(y) - beta log pi(y)/pi_ref(y)] = -beta sum_y pi(y) log [pi(y) / (Z pi*(y))]
               = beta log Z - beta KL(pi || pi*), and a KL is >= 0 with equality only at pi = pi*."""
    return ref_logp + r / beta - log_partition(ref_logp, r, beta)[:, None]


def rlhf_pg_loss(logits, ref_logits, r, beta):
    """PPO-RLHF's policy-gradient loss on the exact expectation over responses, at ratio 1 (one step):

        r_t = -beta (log pi(y_t|y_<t) - log pi_ref(y_t|y_<t)) + [t = last] r(x, y)   (core.per_token_rewards)
        A_t = sum_{k >= t} r_k                      (losses.gae with gamma = lam = 1 and V = 0)
        loss = -sum_x sum_y pi(y|x) sum_t A_t log pi(y_t | y_<t)    (losses.clipped_surrogate, ratio 1)

    pi(y|x) and A_t are constants (no gradient: they stand for the samples and their rewards). Its
    gradient is exactly -grad sum_x J(pi): E[grad log pi (r - beta log pi/pi_ref)] is grad J because
    E[grad log pi] = 0, and rewards before t drop out of token t's term for the same reason."""
    tok, ref_tok = token_logps(logits), token_logps(ref_logits)
    P, Y, L = tok.shape
    tok, ref_tok = tok.reshape(P * Y, L), ref_tok.reshape(P * Y, L)
    mask = torch.ones_like(tok)
    rewards = per_token_rewards(r.reshape(-1), (tok - ref_tok).detach(), mask, beta)
    adv, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma=1.0, lam=1.0)
    token_loss, _, _ = clipped_surrogate(tok, tok.detach(), adv)
    weight = tok.sum(-1).exp().detach()  # pi(y|x): the exact expectation instead of sampled responses
    return (weight * token_loss.sum(-1)).sum()


# ------------------------------------------------------------------------------ preferences (DPO, IPO)

def pair_weights(mu_logp, r):
    """Probability that a preference pair is (chosen y, rejected y'), [P, Y] -> [P, Y, Y]: two distinct
    responses drawn independently from mu (a response is never paired with itself), labelled by
    Bradley-Terry on r; either draw order gives the pair, hence the 2:

        w(y, y') = 2 mu(y) mu(y') sigmoid(r(y) - r(y')) / sum_{u != v} mu(u) mu(v),     y != y'
    """
    mu = mu_logp.exp()
    pairs = mu[:, :, None] * mu[:, None, :] * (1 - torch.eye(r.shape[-1], dtype=mu.dtype))
    w = pairs * torch.sigmoid(r[:, :, None] - r[:, None, :])
    return 2 * w / pairs.sum((-2, -1), keepdim=True)


def expected_pair_loss(loss_fn, logp, ref_logp, weights, **kw):
    """The exact expected loss over preference pairs, per prompt ([P, Y] log-probs, [P, Y, Y] -> [P]):

        E[loss] = sum_{y, y'} w(y, y') loss_fn(pc = log pi(y), pr = log pi(y'), rc = log pi_ref(y), rr = log pi_ref(y'))

    loss_fn is one of nanoalign.losses' paired losses (dpo_loss, ipo_loss, ...), kw its settings."""
    Y = logp.shape[-1]
    pc, pr = logp[:, :, None].expand(-1, Y, Y), logp[:, None, :].expand(-1, Y, Y)
    rc, rr = ref_logp[:, :, None].expand(-1, Y, Y), ref_logp[:, None, :].expand(-1, Y, Y)
    return (weights * loss_fn(pc, pr, rc, rr, **kw)).sum((-2, -1))


def ipo_optimum_logp(ref_logp, beta):
    """IPO's minimiser for two responses (y_w, y_l) = (0, 1) and P(y_w > y_l) = 1 (Azar et al. 2023):
    (h - 1/(2 beta))^2 is 0 at h = 1/(2 beta), so

        log pi(y_w)/pi(y_l) = log pi_ref(y_w)/pi_ref(y_l) + 1/(2 beta),  pi(y_l) = sigmoid(-(that))

    finite for every beta > 0. [P, 2] -> [P, 2]."""
    m = ref_logp[:, 0] - ref_logp[:, 1] + 1 / (2 * beta)
    return torch.stack([F.logsigmoid(m), F.logsigmoid(-m)], -1)


# ------------------------------------------------------------------------------ PPO's clip, GAE

def clipped_objective(logp, old_logp, adv, eps):
    """PPO's surrogate on a one-step problem, exactly: the expectation over actions a ~ pi_old,

        L(pi) = sum_a pi_old(a) min(rho_a A_a, clip(rho_a, 1 - eps, 1 + eps) A_a),   rho_a = pi(a) / pi_old(a)

    with losses.clipped_surrogate (eps = inf: the unclipped surrogate sum_a pi(a) A_a). [P, K] -> [P]."""
    loss, _, _ = clipped_surrogate(logp, old_logp, adv, eps, eps)
    return -(old_logp.exp() * loss).sum(-1)


def trust_region_kl(rho_min, rho_max):
    """A bound on KL(pi_old || pi) from the range of the ratios rho = pi / pi_old:

        KL(pi_old || pi) = E_old[-log rho] = E_old[rho - 1 - log rho]     (E_old[rho] = 1)
                        <= max(f(rho_min), f(rho_max)),  f(rho) = rho - 1 - log rho (convex, f(1) = 0)

    which is k3 of the ratio (losses.k3_kl). Ratios in [1 - eps, 1 + eps]: KL <= -eps - log(1 - eps)."""
    f = lambda rho: k3_kl(torch.zeros(()), torch.log(torch.as_tensor(rho, dtype=torch.float64)))
    return torch.maximum(f(rho_min), f(rho_max))


def exact_values(tok_logp, rewards, gamma=1.0):
    """The exact value of every prefix under pi: V_t = V(x, y_<t) = E_pi[sum_{k >= t} gamma^(k-t) r_k | y_<t].
    [P, Y, L] log-probs, [P*Y, L] per-token rewards -> [P*Y, L], one V_t per response and position.
    The return-to-go is losses.gae with V = 0 and lam = 1."""
    P, Y, L = tok_logp.shape
    mask = torch.ones(P * Y, L, dtype=rewards.dtype)
    ret, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma=gamma, lam=1.0)
    ret = ret.view(P, Y, L)
    return torch.stack([expect_given_prefix(ret[..., t], tok_logp, t) for t in range(L)], -1).view(P * Y, L)


# ------------------------------------------------------------------------------ KL estimators, best-of-N

def moments(k, logp):
    """Exact mean and variance of an estimator k(y) for y ~ pi: (sum pi k, sum pi k^2 - (sum pi k)^2)."""
    p = logp.exp()
    mean = (p * k).sum(-1)
    return mean, (p * k ** 2).sum(-1) - mean ** 2


def best_of_n_logp(logp, r, n):
    """The exact distribution of best-of-n sampling from pi (the response of highest reward among n
    independent samples), for distinct rewards. With F(y) = pi(r(Y) <= r(y)):

        pi_n(y) = F(y)^n - (F(y) - pi(y))^n

    (all n samples at most as good as y, minus all of them strictly worse). [P, Y] -> [P, Y]."""
    assert (r.sort(-1).values.diff(dim=-1) > 0).all(), "best_of_n_logp needs distinct rewards"
    order = r.argsort(-1)
    p = logp.exp().gather(-1, order)
    F_ = p.cumsum(-1)
    pn = F_ ** n - (F_ - p).clamp(min=0) ** n
    return torch.empty_like(pn).scatter_(-1, order, pn).log()


def best_of_n_kl_bound(n):
    """KL(pi_n || pi) <= log n - (n - 1)/n, with equality in the limit of a continuous reward
    (Beirami et al. 2024). There F(Y) ~ U(0, 1) and U = F under pi_n has density n u^(n-1), so
    KL = E[log(n U^(n-1))] = log n + (n - 1) E[log U] = log n - (n - 1)/n, as E[log U] = -1/n."""
    return math.log(n) - (n - 1) / n


# ------------------------------------------------------------------------------ memory of PPO's four models

def gpt_params(n_layer, n_embd, vocab_size, block_size):
    """Parameters of nanoalign's GPT (GPT-2's layout, biases, tied LM head), d = n_embd:

        per block 12 d^2 + 13 d (attention 4 d^2 + 4 d, MLP 8 d^2 + 5 d, two LayerNorms 4 d)
        total     n_layer (12 d^2 + 13 d) + (vocab_size + block_size) d + 2 d    (embeddings, ln_f)

    GPT-2 small (12, 768, 50257, 1024): 124,439,808."""
    d = n_embd
    return n_layer * (12 * d * d + 13 * d) + (vocab_size + block_size) * d + 2 * d


def ppo_memory(n_params, mixed=False):
    """Bytes of PPO-RLHF's four models for n_params each (weights, gradients, AdamW state; no
    activations, KV cache or buffers). Trained (policy, critic): weights + grads + AdamW's m and v;
    frozen (reference, reward model): weights only.

        fp32:              trained 4 + 4 + 4 + 4 = 16 B/param, frozen 4 B/param: 40 B/param in all
        bf16 mixed (ZeRO): trained 2 + 2 (bf16 weights, grads) + 4 + 4 + 4 (fp32 master, m, v) = 16,
                           frozen 2 B/param: 36 B/param in all

    -> {"policy", "critic", "reference", "reward_model", "total"} in bytes."""
    trained, frozen = 16, (2 if mixed else 4)
    out = {"policy": trained * n_params, "critic": trained * n_params,
           "reference": frozen * n_params, "reward_model": frozen * n_params}
    out["total"] = sum(out.values())
    return out
