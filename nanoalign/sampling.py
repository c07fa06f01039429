"""
Batched generation with a KV cache: the inner loop of PPO, GRPO, online DPO, best-of-N and evaluation.

Prompts of different lengths are left-padded so that every row's next token lands in the same slot;
the model's attention mask and position ids make the padding invisible. Each step feeds one token
per row through the cache. A row stops at its first EOS; its later slots are padding.
"""
import torch

from nanoalign import dist
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
    rows=(first, total): under torchrun each rank samples its share of one batch, these prompts being its rows
    first .. first + B - 1 of `total`. Each step then draws the noise of the whole batch (torch.multinomial's
    own method: argmax p / Exp(1) noise) and uses this share's rows, and the generator ends as one process's
    would (the draws of the steps the other ranks are still sampling are drawn too): a row's tokens and the
    generator's state do not depend on how the batch is split. A whole batch (total = B) samples as it did.
    """
    was_training = model.training
    model.eval()
    device = model.transformer.wte.weight.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    if int(lengths.max()) >= model.config.block_size:
        raise ValueError(f"prompt of {int(lengths.max())} tokens leaves no room in block_size {model.config.block_size}")
    limit = (model.config.block_size - lengths).clamp(max=max_new_tokens)  # per row
    max_new_tokens = int(limit.max())
    idx, mask = pad(prompts, pad_id, left=True)
    idx, mask = idx.to(device), mask.to(device)
    B, Tp = idx.shape
    split = rows is not None and rows[1] != B and temperature != 0  # a share of a batch sampled by several ranks
    cache = KVCache(model.config, B, Tp + max_new_tokens, device)
    logits = model.lm_head(model.body(idx, mask, cache)[:, -1])
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    out_mask = torch.zeros(B, max_new_tokens, dtype=torch.bool, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    n = 0
    for n in range(1, max_new_tokens + 1):
        logits = logits.float()
        if temperature == 0:
            nxt = logits.argmax(-1)
        else:
            probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
            if split:  # what multinomial does on the whole batch, keeping this share's rows
                noise = torch.empty(rows[1], probs.shape[-1], device=device).exponential_(1, generator=generator)
                nxt = (probs / noise[rows[0]:rows[0] + B]).argmax(-1)
            else:
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        nxt = nxt.masked_fill(done, pad_id)
        out[:, n - 1], out_mask[:, n - 1] = nxt, ~done
        done = done | (nxt == eos_id) | (n >= limit)
        if bool(done.all()) or n == max_new_tokens:
            break
        # finished rows are fed as padding (mask 0), so their positions stop growing: a row that hit
        # its limit never reaches a position past block_size (what they compute is never read)
        logits = model.lm_head(model.body(nxt[:, None], ~done[:, None], cache)[:, -1])
    for _ in range(dist.all_reduce(n, "max") - n if split else 0):  # the steps the other ranks still sample
        torch.empty(rows[1], logits.shape[-1], device=device).exponential_(1, generator=generator)
    model.train(was_training)
    return out[:, :n], out_mask[:, :n]
