"""
Loss functions: pure functions of per-sequence (or per-token) tensors, each with its equation.
They return per-example (or per-token) losses and the caller chooses the aggregation; for the
policy-gradient losses that choice is `aggregate`, whose modes are part of the algorithm.
"""
import torch
import torch.nn.functional as F


def bradley_terry_loss(r_chosen, r_rejected, margin=0.0, center_coef=0.0):
    """Reward-model loss under the Bradley-Terry model (Bradley & Terry 1952; Ouyang et al. 2022):

        P(chosen > rejected) = sigmoid(r_c - r_r)
        loss = -log sigmoid(r_c - r_r - margin) + center_coef * (r_c + r_r)^2

    `margin` (a scalar or one per pair, Llama 2) demands a larger gap for pairs rated far apart.
    The centering term (Eisenstein et al. 2023) pins the free offset of the rewards near 0; averaged
    over the batch it is center_coef * mean((r_c + r_r)^2).
    Example: r_c = 2.0, r_r = 0.5 -> P = sigmoid(1.5) = 0.818, loss = 0.201.
    Gradient (margin 0, no centering): d loss / d r_c = -(1 - P) = -d loss / d r_r.
    """
    return -F.logsigmoid(r_chosen - r_rejected - margin) + center_coef * (r_chosen + r_rejected) ** 2


def process_reward_loss(step_logits, step_labels, step_mask):
    """Process reward model loss (Lightman et al. 2023): binary cross-entropy of "this step is correct",
    one logit per step read at the step's separator token, averaged over all real steps of the batch:

        loss = mean_{steps s} BCE(sigmoid(logit_s), label_s)

    [B, S] tensors; step_mask marks real steps (rows have different numbers of steps)."""
    bce = F.binary_cross_entropy_with_logits(step_logits, step_labels.float(), reduction="none")
    return (bce * step_mask).sum() / step_mask.sum().clamp(min=1)


def sft_loss(logps, loss_mask, n_tokens):
    """Completion-only cross-entropy, token-level aggregation:

        loss = -sum_{t: mask_t = 1} log p(y_t | y_<t) / n_tokens

    `logps`, `loss_mask`: [B, T] per-token log-probs of the targets and the mask of trained tokens.
    `n_tokens` is the number of trained tokens in the whole optimizer step, not in this micro-batch:
    then the micro-batch losses of a step add up to the full batch's mean, and so do their gradients.
    """
    return -(logps * loss_mask).sum() / n_tokens


# ------------------------------------------------------------------------------ policy gradient (GRPO family)

def group_advantages(rewards, baseline="mean", scale="group", eps=1e-6):
    """Advantages of G responses per prompt from their rewards, [P, G] -> [P, G].

    baseline "mean": A_i = r_i - mean_j r_j                       (GRPO, Shao et al. 2024)
             "loo":  A_i = r_i - mean_{j != i} r_j               (RLOO, Ahmadian et al. 2024)
    scale    "group": divide by the group's population std + eps (GRPO)
             "batch": divide by the std of all advantages in the batch + eps
             "none":  no division                               (Dr. GRPO, Liu et al. 2025; RLOO)
    A group whose rewards are all equal gets advantage 0 (never NaN): it carries no signal.
    Example: rewards [1, 0, 0.5, 1], mean baseline, group scale -> [0.905, -1.508, -0.302, 0.905].
    Binary rewards with a fraction p correct, mean baseline, group scale: a correct response gets
    (1 - p) / sqrt(p (1 - p)) = sqrt((1 - p) / p), a wrong one -sqrt(p / (1 - p)) (rare successes, big pushes).
    """
    G = rewards.shape[-1]
    mean = rewards.mean(-1, keepdim=True)
    adv = rewards - mean if baseline == "mean" else (rewards - mean) * G / (G - 1)  # r_i - mean of the others
    if scale == "group":
        adv = adv / (rewards.std(-1, unbiased=False, keepdim=True) + eps)
    elif scale == "batch":
        adv = adv / (adv.std(unbiased=False) + eps)
    return adv


def k1_kl(logp, ref_logp):
    """k1 = log pi(y) - log pi_ref(y), for y ~ pi: unbiased for KL(pi || pi_ref), negative wherever
    pi_ref(y) > pi(y), high variance (Schulman 2020). The per-token KL of train_ppo.py's default reward."""
    return logp - ref_logp


def k2_kl(logp, ref_logp):
    """k2 = (log pi_ref(y) - log pi(y))^2 / 2, for y ~ pi: >= 0 and low variance, but biased
    (E[k2] = KL only to second order in log pi_ref / pi) (Schulman 2020)."""
    return 0.5 * (ref_logp - logp) ** 2


def k3_kl(logp, ref_logp):
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman 2020, "k3"):

        k3 = exp(ref - logp) - (ref - logp) - 1  >= 0, and = 0 where the policies agree.
    Unbiased, and lower variance than the plain log-ratio (k1)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def clipped_surrogate(logp, old_logp, adv, eps_low=0.2, eps_high=0.2):
    """PPO's clipped objective per token (Schulman et al. 2017), with DAPO's asymmetric clip range:

        ratio = exp(logp - old_logp)
        loss  = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)

    `adv` is broadcast over tokens ([B, 1] for one advantage per sequence). Returns (loss [B, T],
    clipped_low [B, T], clipped_high [B, T]): where the clip is active on each side."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    loss = -torch.min(unclipped, clipped)
    adv = adv.expand_as(ratio)
    return loss, (ratio < 1 - eps_low) & (adv < 0), (ratio > 1 + eps_high) & (adv > 0)


def aggregate(token_loss, mask, mode, max_len=None):
    """Reduce a [B, T] per-token loss over the real tokens to a scalar:

    "seq_mean":   mean over sequences of (mean over each sequence's tokens)       (GRPO)
    "token_mean": sum over all tokens / number of real tokens in the batch        (DAPO)
    "constant":   sum over all tokens / (B * max_len), a constant normaliser      (Dr. GRPO)
    Per-sequence means give each sequence equal weight (long responses' tokens count less); the
    token mean gives each token equal weight; the constant removes the length bias of both.
    """
    mask = mask.to(token_loss.dtype)
    if mode == "seq_mean":
        return ((token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if mode == "token_mean":
        return (token_loss * mask).sum() / mask.sum().clamp(min=1)
    if mode == "constant":
        return (token_loss * mask).sum() / (token_loss.shape[0] * max_len)
    raise ValueError(f"unknown aggregation {mode!r}")


# ------------------------------------------------------------------------------ PPO (RLHF with a critic)

def gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation (Schulman et al. 2016) over right-padded responses. [B, T] each.

        delta_t = r_t + gamma * V_{t+1} - V_t          (V = 0 after the last real token)
        A_t     = delta_t + gamma * lam * A_{t+1}      (A = 0 after the last real token)
        returns = A + V                                (the critic's regression targets)

    lam = 0: A_t = delta_t, the one-step TD error; lam = 1: A_t = sum_{k >= t} gamma^(k-t) r_k - V_t, the
    Monte Carlo return minus the value. Padding gets advantage and return 0.
    Example: r = [0, 0, 1], V = [0.5, 0.6, 0.7], gamma 1, lam 0.9 -> deltas [0.1, 0.1, 0.3],
    A = [0.1 + 0.9 * 0.37, 0.1 + 0.9 * 0.3, 0.3] = [0.433, 0.37, 0.3].
    """
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    T = rewards.shape[1]
    adv = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]  # padding resets the recursion
        adv[:, t] = last
    return adv, (adv + values) * mask


def clipped_value_loss(values, old_values, returns, clip=0.2):
    """PPO's clipped value loss per token (as in OpenAI's baselines and lm-human-preferences):

        V_clip = old_V + clip(V - old_V, -clip, clip)
        loss   = 0.5 * max((V - R)^2, (V_clip - R)^2)

    The critic cannot move a value more than `clip` from the one it had at rollout time and profit.
    Example: V 1.5, old_V 1.0, R 2.0, clip 0.2 -> max(0.25, 0.64) / 2 = 0.32. [B, T] -> [B, T]."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * torch.max((values - returns) ** 2, (clipped - returns) ** 2)


def adaptive_kl_beta(beta, kl, target, horizon, n_steps):
    """The adaptive KL controller of Ziegler et al. (2019): move beta towards the KL target,

        error = clip(kl / target - 1, -0.2, 0.2)
        beta <- beta * (1 + error * n_steps / horizon)

    where `kl` is the mean sequence KL of the last batch and n_steps the number of rollouts in it.
    KL above target raises beta (a stronger penalty), below lowers it; at most +-20% of n/horizon."""
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n_steps / horizon)


# ------------------------------------------------------------------------------ the DPO family
# Arguments are per-sequence log-probs [B]: `pc`, `pr` the policy's for chosen and rejected, `rc`, `rr`
# the reference's. `h` below is the difference of log-ratios: (pc - rc) - (pr - rr).

def dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.0):
    """DPO (Rafailov et al. 2023), and with label_smoothing = eps > 0 conservative DPO (cDPO,
    Mitchell 2023), which assumes each label is flipped with probability eps:

        loss = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)

    Example: pc, rc = -8.2, -8.5; pr, rr = -9.5, -9.1; beta 0.1 -> h = 0.7, logit 0.07, loss 0.659.
    Why: the optimum of E[r] - beta KL(pi || pi_ref) is pi* = pi_ref exp(r / beta) / Z, so
    r = beta log pi*/pi_ref + beta log Z, and Bradley-Terry's sigmoid(r_w - r_l) is sigmoid(beta h) at pi*:
    Z cancels. Gradient (eps = 0): -beta sigmoid(-beta h) (grad log pi(y_w) - grad log pi(y_l)); the weight
    sigmoid(-beta h) = sigmoid(r^(y_l) - r^(y_w)), r^ = beta log pi/pi_ref, is large where r^ orders the pair wrongly.
    """
    z = beta * ((pc - rc) - (pr - rr))
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def robust_dpo_loss(pc, pr, rc, rr, beta=0.1, eps=0.1):
    """Robust DPO (Chowdhury et al. 2024): unbiased under labels flipped with probability eps < 0.5,

        loss = ((1 - eps) * -log sigmoid(beta h) - eps * -log sigmoid(-beta h)) / (1 - 2 eps)
    """
    z = beta * ((pc - rc) - (pr - rr))
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def hinge_loss(pc, pr, rc, rr, beta=0.1):
    """SLiC-HF's calibration loss (Zhao et al. 2023) on the log-ratios: relu(1 - beta h)."""
    return F.relu(1 - beta * ((pc - rc) - (pr - rr)))


def ipo_loss(pc, pr, rc, rr, beta=0.1):
    """IPO (Azar et al. 2023): regress h onto 1 / (2 beta) instead of pushing it to infinity:

        loss = (h - 1 / (2 beta))^2
    Its minimiser h = 1 / (2 beta) is finite even when P(y_w > y_l) = 1, where DPO's loss only tends
    to 0 as h -> infinity, i.e. pi(y_l) -> 0, whatever beta.
    Pass length-normalised log-probs (mean per token, as TRL does) or sums; train_dpo.py uses means."""
    return ((pc - rc) - (pr - rr) - 1 / (2 * beta)) ** 2


def simpo_loss(avg_pc, avg_pr, beta=2.0, gamma=1.0):
    """SimPO (Meng et al. 2024): reference-free, length-normalised, with a target margin gamma:

        loss = -log sigmoid(beta (avg_logp_c - avg_logp_r) - gamma)
    """
    return -F.logsigmoid(beta * (avg_pc - avg_pr) - gamma)


def orpo_loss(avg_pc, avg_pr, lam=0.1):
    """ORPO (Hong et al. 2024): reference-free; SFT on the chosen plus an odds-ratio term:

        odds(y) = p / (1 - p) with p = exp(avg_logp(y))   (the length-averaged probability)
        loss = -avg_logp_c - lam * log sigmoid(log odds_c - log odds_r)
    log odds = avg_logp - log(1 - exp(avg_logp)), computed stably with log1p(-exp(.)).
    """
    log_odds = lambda a: a - torch.log1p(-torch.exp(a.clamp(max=-1e-6)))
    return -avg_pc - lam * F.logsigmoid(log_odds(avg_pc) - log_odds(avg_pr))


def rpo_loss(pc, pr, rc, rr, avg_pc, beta=0.1, alpha=1.0):
    """RPO (Pang et al. 2024): DPO plus alpha times the chosen response's NLL per token:

        loss = dpo(h) - alpha * avg_logp_c
    """
    return dpo_loss(pc, pr, rc, rr, beta) - alpha * avg_pc


def kto_reference_point(logp_mismatched, ref_mismatched):
    """KTO's z0: an estimate of KL(pi || pi_ref) from completions paired with *other* prompts of the
    batch, averaged, clamped at 0 and detached (it is a reference point, not something to optimise)."""
    return (logp_mismatched - ref_mismatched).mean().clamp(min=0).detach()


def kto_loss(logp, ref_logp, desirable, z0, beta=0.1, lambda_d=1.0, lambda_u=1.0):
    """KTO (Ethayarajh et al. 2024) on unpaired examples, r = logp - ref_logp:

        desirable:   lambda_D * (1 - sigmoid(beta (r - z0)))
        undesirable: lambda_U * (1 - sigmoid(beta (z0 - r)))
    """
    r = logp - ref_logp
    return torch.where(desirable, lambda_d * (1 - torch.sigmoid(beta * (r - z0))),
                       lambda_u * (1 - torch.sigmoid(beta * (z0 - r))))
