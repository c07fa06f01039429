"""The GPT under padding, the KV cache, and the sampler."""
import pytest
import torch

from nanoalign.core import pad, token_logprobs
from nanoalign.model import GPT, GPTConfig
from nanoalign.sampling import filter_logits, generate, sample_token

PAD, EOS = 0, 3


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=64, vocab_size=50, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():  # larger weights than the init, so that attention patterns are far from uniform
        for p in m.parameters():
            p.mul_(4.0)
    return m.eval()


def seq_logprobs(model, ids, mask):
    return token_logprobs(model(ids, mask)[:, :-1], ids[:, 1:])


def test_logprobs_do_not_depend_on_padding_side_amount_or_neighbours(model):
    """One sequence's per-token log-probs, alone vs right/left padded, with more padding, beside others."""
    torch.manual_seed(1)
    target = torch.randint(4, 50, (11,)).tolist()
    others = [torch.randint(4, 50, (n,)).tolist() for n in (3, 17, 8)]
    alone = seq_logprobs(model, torch.tensor([target]), None)[0]
    for left in (False, True):
        for T in (17, 30):
            ids, mask = pad([target] + others, PAD, left=left, T=T)
            lp = seq_logprobs(model, ids, mask)[0]
            real = lp[T - 11:] if left else lp[:10]
            assert torch.allclose(real, alone, atol=1e-5), (left, T, (real - alone).abs().max())


def test_padding_really_is_masked(model):
    """Without the mask, left padding changes the log-probs: the mask is doing the work."""
    seq = list(range(5, 15))
    ids, mask = pad([seq], PAD, left=True, T=16)
    alone = seq_logprobs(model, torch.tensor([seq]), None)[0]
    unmasked = seq_logprobs(model, ids, None)[0, 6:]
    assert (unmasked - alone).abs().max() > 1e-3


def test_padding_value_is_irrelevant(model):
    """Masks come from lengths: the id written into padding slots cannot change the real outputs."""
    seqs = [[5, 6, 7, 8, 9], [10, 11]]
    ids, mask = pad(seqs, PAD, left=True)
    ids2 = ids.masked_fill(~mask, EOS)
    assert torch.allclose(model(ids, mask)[mask], model(ids2, mask)[mask], atol=1e-6)


def argmax_loop(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def test_greedy_kv_cache_equals_uncached_argmax_loop(model):
    """Batched, left-padded, KV-cached greedy decoding = a plain no-cache argmax loop, token for token."""
    prompts = [[5, 9, 12], [7] * 9, [20], [4, 30, 31, 32, 33, 34]]
    out, mask = generate(model, prompts, 20, eos_id=-1, pad_id=PAD, temperature=0)  # eos=-1: never stops
    assert out.shape == (4, 20) and mask.all()
    for i, p in enumerate(prompts):
        assert out[i].tolist() == argmax_loop(model, p, 20)


def test_cached_logits_equal_full_forward(model):
    """The logits of each cached decoding step equal the full forward's at that position."""
    from nanoalign.model import KVCache
    prompts = [[5, 9, 12, 13], [40]]
    ids, mask = pad(prompts, PAD, left=True)
    cache = KVCache(model.config, 2, 12, "cpu")
    steps = [model(ids, mask, cache)[:, -1]]
    new = [[17, 18], [19, 20], [21, 22]]
    for tokens in new:
        steps.append(model(torch.tensor(tokens)[:, None], torch.ones(2, 1, dtype=torch.bool), cache)[:, -1])
    full_ids = torch.cat([ids, torch.tensor(new).t()], 1)
    full_mask = torch.cat([mask, torch.ones(2, 3, dtype=torch.bool)], 1)
    full = model(full_ids, full_mask)
    for k, logits in enumerate(steps):
        assert torch.allclose(logits, full[:, ids.shape[1] - 1 + k], atol=1e-5)


def test_response_mask_stops_at_first_eos_and_includes_it():
    """Rows stop at their own EOS: the EOS is inside the mask, everything after it is PAD and masked."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=64, vocab_size=8, n_layer=1, n_head=1, n_embd=8)).eval()
    g = torch.Generator().manual_seed(0)
    out, mask = generate(m, [[1, 2]] * 64, 30, eos_id=EOS, pad_id=PAD, temperature=1.0, generator=g)
    assert mask.dtype == torch.bool
    lengths, ended = mask.sum(1).tolist(), 0
    for row, n in zip(out.tolist(), lengths):
        if EOS in row:
            first = row.index(EOS)
            assert n == first + 1  # the sampled EOS is the last real token
            assert all(t == PAD for t in row[first + 1:])
            ended += 1
        else:
            assert n == out.shape[1]
    assert ended > 0 and len(set(lengths)) > 1  # rows ended, at different steps


def test_generation_is_reproducible_with_a_generator(model):
    a = generate(model, [[5, 6]] * 3, 10, EOS, PAD, generator=torch.Generator().manual_seed(7))[0]
    b = generate(model, [[5, 6]] * 3, 10, EOS, PAD, generator=torch.Generator().manual_seed(7))[0]
    assert torch.equal(a, b)


def test_generation_respects_block_size(model):
    out, _ = generate(model, [[5] * 60], 20, EOS, PAD, temperature=0)
    assert out.shape[1] <= 4
    with pytest.raises(ValueError):
        generate(model, [[5] * 64], 5, EOS, PAD)


def test_top_k_and_top_p_filtering():
    """Hand case: probs [0.5, 0.3, 0.15, 0.05]."""
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    keep = lambda x: torch.isfinite(x)[0].tolist()
    assert keep(filter_logits(logits, top_k=2)) == [True, True, False, False]
    assert keep(filter_logits(logits, top_p=0.5)) == [True, False, False, False]
    assert keep(filter_logits(logits, top_p=0.79)) == [True, True, False, False]
    assert keep(filter_logits(logits, top_p=0.81)) == [True, True, True, False]
    assert keep(filter_logits(logits, top_k=3, top_p=0.5)) == [True, False, False, False]
    shuffled = logits[:, [2, 0, 3, 1]]  # order must not matter
    assert keep(filter_logits(shuffled, top_p=0.79)) == [False, True, False, True]


def test_sampling_temperature_matches_logprob_temperature():
    """Empirical frequencies of sampled tokens at temperature T match exp(token_logprobs(..., T))."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=8, vocab_size=6, n_layer=1, n_head=1, n_embd=8)).eval()
    with torch.no_grad():
        m.transformer.wte.weight.mul_(8)
    prompt = [1, 2]
    T = 0.7
    out, _ = generate(m, [prompt] * 20000, 1, eos_id=-1, pad_id=PAD, temperature=T,
                      generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(out[:, 0], minlength=6).float() / 20000
    logits = m(torch.tensor([prompt]))[:, -1:]
    probs = token_logprobs(logits.expand(6, 1, 6), torch.arange(6)[:, None], T).exp().squeeze(-1)
    assert (freq - probs).abs().max() < 0.015
    assert (probs - token_logprobs(logits.expand(6, 1, 6), torch.arange(6)[:, None], 1.0).exp().squeeze(-1)).abs().max() > 0.05


def test_inverse_cdf_sampler_hand_case():
    """p = [0.5, 0.3, 0.15, 0.05]: the CDF is [0.5, 0.8, 0.95, 1.0], and u picks the first entry above it."""
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(7, 4)
    u = torch.tensor([0.0, 0.49, 0.5, 0.79, 0.81, 0.96, 1 - 2 ** -24])
    assert sample_token(logits, u).tolist() == [0, 0, 1, 1, 2, 3, 3]
    # filtered-out tokens (weight 0) are never drawn, even at the edges of [0, 1)
    cut = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().expand(4, 4)
    assert sample_token(cut, torch.tensor([0.0, 0.62, 0.63, 1 - 2 ** -24]), top_k=2).tolist() == [0, 0, 1, 1]  # 0.5 / 0.8 = 0.625
    zero_first = torch.tensor([[float("-inf"), 0.0, 0.0]])
    assert sample_token(zero_first, torch.tensor([0.0])).tolist() == [1]


def test_inverse_cdf_sampler_matches_the_distribution():
    """At a temperature and with top-p, the empirical frequencies match the filtered softmax."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 50, generator=g) * 2
    n = 200_000
    draws = sample_token(logits.expand(n, 50), torch.rand(n, generator=g), temperature=0.7, top_p=0.9)
    freq = torch.bincount(draws, minlength=50).double() / n
    p = filter_logits(logits / 0.7, top_p=0.9).softmax(-1)[0].double()
    assert (freq - p).abs().max() < 0.005
    assert freq[p == 0].sum() == 0


def test_generate_leaves_the_generator_where_the_shape_says(model, monkeypatch):
    """The uniforms are drawn up front: the generator's next draw does not depend on when rows stopped; and
    checking for the end less often (as on a GPU) gives the same tokens, trimmed to the longest response."""
    import nanoalign.sampling as sampling
    prompts = [[5, 6], [7], [1, 2, 3]]
    g = torch.Generator().manual_seed(3)
    a = generate(model, prompts, 12, EOS, PAD, generator=g)
    after = torch.rand(1, generator=g)
    g2 = torch.Generator().manual_seed(3)
    torch.rand(3, 12, generator=g2)
    assert torch.equal(after, torch.rand(1, generator=g2))
    monkeypatch.setattr(sampling, "sync_interval", lambda device: 5)
    b = generate(model, prompts, 12, EOS, PAD, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[1][:, -1].any()  # trimmed: the last column holds a real token
