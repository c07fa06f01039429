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
import torch.utils.checkpoint


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
    logits = logits.float()
    if temperature != 1.0:  # dividing by 1 would cost a pass over [B, T, V] for nothing
        logits = logits / temperature
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits, temperature=1.0):
    """Entropy of softmax(logits / temperature) per position, float32. [B, T, V] -> [B, T]."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def lm_logprobs(h, weight, targets, temperature=1.0, with_entropy=False, chunk=2048):
    """log p(target) (and optionally the entropy) at N scored positions, computed from their hidden
    states through the LM head without ever holding the [N, V] logits. [N, C], [V, C], [N] -> [N] float32.

    Only the positions that are scored go in (gather them first: `h[mask]`), so prompt and padding
    positions cost nothing. The logits are made `chunk` rows at a time, and when there is more than one
    chunk each runs under activation checkpointing: its logits are freed after the forward and
    recomputed in the backward.
    The peak is one chunk's [chunk, V] float32 logits (and their gradient) instead of the batch's; the
    values are those of `token_logprobs(h @ weight.T, targets)`. With GPT-2's 50,257-token vocabulary
    and chunk 2048 that is 0.4 GB at most, whatever the batch.
    """
    def piece(h_c, t_c):
        logits = F.linear(h_c, weight).float()
        if temperature != 1.0:
            logits = logits / temperature
        lse = torch.logsumexp(logits, dim=-1)
        logp = logits.gather(-1, t_c[:, None]).squeeze(-1) - lse
        if not with_entropy:
            return logp, logp.new_zeros(())
        all_logp = F.log_softmax(logits, dim=-1)  # as entropy_from_logits computes it
        return logp, -(all_logp.exp() * all_logp).sum(-1)

    # One chunk is kept for the backward as it is: recomputing it would cost a second LM-head pass and
    # lower no peak (the backward holds one chunk's logits and gradient either way).
    recompute = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad) and h.shape[0] > chunk
    logps, ents = [], []
    for i in range(0, h.shape[0], chunk):
        args = (h[i:i + chunk], targets[i:i + chunk])
        lp, ent = torch.utils.checkpoint.checkpoint(piece, *args, use_reentrant=False) if recompute else piece(*args)
        logps.append(lp)
        ents.append(ent)
    if not logps:  # nothing scored
        empty = h.new_zeros(0, dtype=torch.float32)
        return (empty, empty) if with_entropy else empty
    logp = torch.cat(logps)
    return (logp, torch.cat(ents)) if with_entropy else logp


def scored_logprobs(h, weight, ids, scored, temperature=1.0, with_entropy=False):
    """log p(ids[:, t + 1] | ids[:, :t + 1]) from the hidden states h [B, T, C] of ids [B, T] and the LM head's
    weight [V, C], at the positions `scored` [B, T - 1] marks and 0 elsewhere, float32 -> [B, T - 1] (and the
    entropies, if asked). Equals `token_logprobs(h[:, :-1] @ weight.T, ids[:, 1:], temperature) * scored`,
    but the LM head runs at the scored positions only, in chunks (`lm_logprobs`)."""
    sel = scored.bool()
    out = torch.zeros(sel.shape, dtype=torch.float32, device=ids.device)
    res = lm_logprobs(h[:, :-1][sel], weight, ids[:, 1:][sel], temperature, with_entropy)
    if not with_entropy:
        return out.index_put((sel,), res)
    return out.index_put((sel,), res[0]), out.index_put((sel,), res[1])


def response_positions(mask, Tp):
    """The `scored` mask of `scored_logprobs` for [prompt | response] sequences: mask [B, T] of the real tokens,
    the prompts in the first Tp slots -> [B, T - 1], true where position t predicts a real response token."""
    return torch.cat([torch.zeros_like(mask[:, 1:Tp]), mask[:, Tp:]], 1)


def model_logprobs(model, ids, scored, mask=None, temperature=1.0, with_entropy=False, body=None):
    """`scored_logprobs` under a GPT: the log-probs [B, T - 1] of the targets that are trained or scored
    (response tokens; 0 elsewhere). `mask` is the padding mask for the body (None: right padding or none);
    `body` computes the hidden states (default `model.body`; the stages pass a torch.compile'd one)."""
    h = (body or model.body)(ids, mask)
    return scored_logprobs(h, model.lm_head.weight, ids, scored, temperature, with_entropy)


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
