"""
The shared math of every stage: pure functions of tensors, computed in float32.

Conventions used everywhere in nanoalign:
- `mask` tensors are 1 (or True) on real tokens and 0 on padding; they are built from lengths
  (`lengths_to_mask`), never by comparing ids with a pad id.
- Next-token alignment: `logits[:, t]` predicts `ids[:, t + 1]`. `token_logprobs(logits[:, :-1], ids[:, 1:])`
  gives the log-prob of each token given what precedes it; the matching mask is `loss_mask[:, 1:]`.
"""
import torch
import torch.nn.functional as F


def lengths_to_mask(lengths, T, left=False):
    """[B] lengths -> [B, T] bool mask of the real tokens (right padding, or left padding if `left`)."""
    lengths = torch.as_tensor(lengths)
    ar = torch.arange(T, device=lengths.device)[None]
    return ar >= (T - lengths[:, None]) if left else ar < lengths[:, None]


def pad(seqs, pad_id, left=False, T=None):
    """list of int lists -> (ids [B, T] long, mask [B, T] bool), padded on the right (or left)."""
    T = T or max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            if left:
                ids[i, T - len(s):] = torch.as_tensor(s)
            else:
                ids[i, :len(s)] = torch.as_tensor(s)
    return ids, lengths_to_mask(torch.tensor([len(s) for s in seqs]), T, left)


def token_logprobs(logits, targets, temperature=1.0):
    """log p(target_t) under softmax(logits_t / temperature), in float32. [B, T, V], [B, T] -> [B, T].

    "Selective" log-softmax: gather the target logit and subtract the logsumexp, never materialising
    the [B, T, V] log-prob tensor. Use the temperature the tokens were sampled at (policy-gradient
    ratios and KL terms are wrong otherwise).
    """
    logits = logits.float() / temperature
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits, temperature=1.0):
    """Entropy of softmax(logits / temperature) per position, float32. [B, T, V] -> [B, T]."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def masked_sum(x, mask, dim=None):
    mask = mask.to(x.dtype)
    return (x * mask).sum() if dim is None else (x * mask).sum(dim)


def masked_mean(x, mask, dim=None):
    """Mean over the positions where mask is 1 (over all of them, or along `dim`)."""
    mask = mask.to(x.dtype)
    return masked_sum(x, mask, dim) / (mask.sum() if dim is None else mask.sum(dim)).clamp(min=1)


def masked_var(x, mask, unbiased=True):
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum().to(x.dtype)
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x, mask, shift_mean=True, eps=1e-8):
    """(x - mean) / std over the real positions only; padding is left at 0.

    With shift_mean=False the mean is added back (used for rewards: rescale but keep the sign)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def sequence_logprob(logps, mask, average=False):
    """Sum over a sequence's real tokens of their log-probs (or the mean, if `average`). [B, T] -> [B]."""
    return masked_mean(logps, mask, dim=-1) if average else masked_sum(logps, mask, dim=-1)


def last_index(mask):
    """Index of the last real token of each row, under any padding side. [B, T] -> [B]."""
    T = mask.shape[-1]
    ar = torch.arange(T, device=mask.device).expand_as(mask)
    return torch.where(mask.bool(), ar, -1).max(-1).values


def gather_last(x, mask):
    """x[b, last real position of row b]. [B, T] -> [B]."""
    return x.gather(-1, last_index(mask)[:, None]).squeeze(-1)


def kl_penalized_reward(score, logp, ref_logp, beta):
    """The RLHF reward of a response: score - beta * (log pi(y|x) - log pi_ref(y|x)).

    The second term is the sampled (k1) estimate of KL(pi || pi_ref); per token in PPO, per
    sequence here."""
    return score - beta * (logp - ref_logp)


def per_token_rewards(score, kl, mask, beta):
    """PPO's per-token rewards (Ziegler et al. 2019): r_t = -beta * KL_t on every real token, plus the
    sequence's score at its last real token (the EOS). [B], [B, T], [B, T] -> [B, T]; padding gets 0.
    Summed over a response this is `kl_penalized_reward` with the KL taken token by token."""
    mask = mask.to(kl.dtype)
    rewards = -beta * kl * mask
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_index(mask)] += score
    return rewards
