"""
Batched generation with a KV cache: the inner loop of PPO, GRPO, online DPO, best-of-N and evaluation.

Prompts of different lengths are left-padded so that every row's next token lands in the same slot;
the model's attention mask and position ids make the padding invisible. Each step feeds one token
per row through the cache. A row stops at its first EOS; its later slots are padding.
"""
import torch

from nanoalign.core import pad
from nanoalign.model import KVCache


def filter_logits(logits, top_k=None, top_p=None):
    """Keep the top_k largest logits and/or the smallest set whose probability reaches top_p; -inf the rest."""
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_token(logits, u, temperature=1.0, top_k=None, top_p=None):
    """One token per row of logits [B, V], drawn by inverse CDF with the uniforms u [B] in [0, 1):

        token = min { i : sum_{j <= i} p_j > u },   p = softmax(filter(logits / temperature))

    which has probability exactly p_i for each i. It replaces torch.multinomial (most of a decode step's
    time with a 50k vocabulary): one exp, one cumulative sum and a binary search per row. The cumulative
    sum is float32, as torch.multinomial's own is (float64 measured 3x slower on the CPU for a change in
    each token's probability of about 1e-5 of the total at most); filtered-out tokens (weight 0) leave the
    CDF flat, so they are never drawn. The softmax is never normalised: u is scaled by the row's total."""
    logits = logits.float()
    if temperature != 1.0:  # dividing by 1 would cost a pass over [B, V] for nothing
        logits = logits / temperature
    logits = filter_logits(logits, top_k, top_p)
    cdf = (logits - logits.max(-1, keepdim=True).values).exp().cumsum(-1)
    total = cdf[:, -1:]
    x = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))  # < total, whatever the rounding
    return torch.searchsorted(cdf, x, right=True).squeeze(-1)


def sync_interval(device):
    """How many decode steps pass between two checks that every row is done: each check is a host sync on a
    GPU (the CPU waits for the device), and free on the CPU."""
    return 1 if device.type == "cpu" else 8


@torch.no_grad()
def generate(model, prompts, max_new_tokens, eos_id, pad_id, temperature=1.0, top_k=None, top_p=None,
             generator=None, rows=None):
    """Sample a response for each prompt (a list of token-id lists).

    Returns (tokens [B, N], mask [B, N]) with N <= max_new_tokens: mask is 1 on each response's real
    tokens, including the EOS it sampled, and 0 on the padding after it. temperature=0 is greedy.
    Sampling is in float32 from logits / temperature; score the tokens at the same temperature.
    Positions past block_size do not exist, so each row samples at most min(max_new_tokens,
    block_size - its prompt's length) tokens; a row that reaches its limit ends unfinished (no EOS)
    while the others go on. A prompt that leaves no room at all is a ValueError.

    Reproducible with `generator`: all the uniforms a call may use, [B, max_new_tokens], are drawn up
    front, so the generator's state afterwards depends only on the call's arguments, not on when rows
    stopped. The loop asks the device whether every row is done only every `check_every` steps (each
    ask is a host sync on a GPU); the steps past the end feed padding and are trimmed, so the result is
    the same for any `check_every`.
    rows=(first, total): under torchrun each rank samples its share of one batch, these prompts being its
    rows first .. first + B - 1 of `total`. The uniforms of the whole batch are drawn and this share's rows
    used, so a row's tokens and the generator's state do not depend on how the batch is split.
    """
    was_training = model.training
    model.eval()
    device = model.transformer.wte.weight.device
    longest = max(len(p) for p in prompts)
    if longest >= model.config.block_size:
        raise ValueError(f"prompt of {longest} tokens leaves no room in block_size {model.config.block_size}")
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    limit = (model.config.block_size - lengths).clamp(max=max_new_tokens)  # per row
    requested, max_new_tokens = max_new_tokens, min(max_new_tokens, model.config.block_size - min(map(len, prompts)))
    idx, mask = pad(prompts, pad_id, left=True)
    idx, mask = idx.to(device), mask.to(device)
    B, Tp = idx.shape
    first, total = rows or (0, B)
    # the requested max_new_tokens, not this share's limit: every rank draws the same [total, N] uniforms
    u = None if temperature == 0 else torch.rand(total, requested, device=device, generator=generator)[first:first + B]
    check_every = sync_interval(device)
    cache = KVCache(model.config, B, Tp + max_new_tokens, device)
    logits = model.lm_head(model.body(idx, mask, cache)[:, -1])
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    out_mask = torch.zeros(B, max_new_tokens, dtype=torch.bool, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    for n in range(1, max_new_tokens + 1):
        if temperature == 0:
            nxt = logits.float().argmax(-1)
        else:
            nxt = sample_token(logits, u[:, n - 1], temperature, top_k, top_p)
        nxt = nxt.masked_fill(done, pad_id)
        out[:, n - 1], out_mask[:, n - 1] = nxt, ~done
        done = done | (nxt == eos_id) | (n >= limit)
        if n == max_new_tokens or (n % check_every == 0 and bool(done.all())):
            break
        # finished rows are fed as padding (mask 0), so their positions stop growing: a row that hit
        # its limit never reaches a position past block_size (what they compute is never read)
        logits = model.lm_head(model.body(nxt[:, None], ~done[:, None], cache)[:, -1])
    model.train(was_training)
    n = int(out_mask.sum(1).max())  # the longest response: steps past it held padding only
    return out[:, :n], out_mask[:, :n]
