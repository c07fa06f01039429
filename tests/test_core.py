"""Hand-computed checks of nanoalign/core.py and nanoalign/losses.py."""
import math

import pytest
import torch

from nanoalign import core, losses


def close(a, b, tol=1e-4):
    """Compare a tensor (or number) with hand-computed numbers."""
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, atol=tol, rtol=0), (a, b)


# ------------------------------------------------------------------------------ losses

def test_bradley_terry_worked_example():
    """Rewards 2.0 vs 0.5: P(chosen) = sigmoid(1.5) = 0.818, loss = -log 0.818 = 0.201."""
    loss = losses.bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.5]))
    close(loss, [0.201413], tol=1e-5)  # log(1 + e^-1.5)
    close(torch.exp(-loss), [0.817574], tol=1e-5)
    close(loss, [0.201], tol=5e-4)


def test_bradley_terry_margin_scalar_and_per_pair():
    """A margin m demands a larger gap: loss = -log sigmoid(r_c - r_r - m)."""
    rc, rr = torch.tensor([2.0, 2.0]), torch.tensor([0.5, 0.5])
    close(losses.bradley_terry_loss(rc, rr, margin=0.5), [0.313262, 0.313262], tol=1e-5)  # log(1+e^-1)
    close(losses.bradley_terry_loss(rc, rr, margin=torch.tensor([0.0, 1.5])),
          [0.201413, math.log(2.0)], tol=1e-5)


def test_bradley_terry_is_antisymmetric_in_order():
    """Swapping chosen and rejected turns sigmoid(d) into sigmoid(-d): loss(-1.5) = 1.701."""
    close(losses.bradley_terry_loss(torch.tensor([0.5]), torch.tensor([2.0])), [1.701413], tol=1e-5)


def test_kl_penalized_reward_worked_examples():
    """r - 0.2 (logp - logp_ref): 1.20 - 0.2*0.1 = 1.18 and 1.35 - 0.2*1.6 = 1.03."""
    r = core.kl_penalized_reward(torch.tensor([1.20, 1.35]), torch.tensor([-2.1, -1.2]),
                                 torch.tensor([-2.2, -2.8]), 0.2)
    close(r, [1.18, 1.03], tol=1e-5)


# ------------------------------------------------------------------------------ log-probs, entropy

LOGITS = [[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]]  # [1, 2, 3]
TARGETS = [[2, 1]]
# log softmax([1,2,3])[2] = 3 - log(e + e^2 + e^3); log softmax([0,0,0])[1] = -log 3
LOGP_T1 = [[-0.407606, -1.098612]]
# at temperature 2 the first row is [0.5, 1, 1.5]: 1.5 - log(e^0.5 + e + e^1.5)
LOGP_T2 = [[-0.680270, -1.098612]]


def test_token_logprobs_hand_case():
    """token_logprobs = log_softmax(logits) gathered at the targets, on a 1x2x3 case."""
    out = core.token_logprobs(torch.tensor(LOGITS), torch.tensor(TARGETS))
    close(out, LOGP_T1, tol=1e-5)
    close(LOGP_T1[0][0], 3 - math.log(math.e + math.e ** 2 + math.e ** 3), tol=1e-6)


def test_token_logprobs_temperature():
    """Temperature 2 divides the logits before the softmax (the uniform row is unchanged)."""
    out = core.token_logprobs(torch.tensor(LOGITS), torch.tensor(TARGETS), temperature=2.0)
    close(out, LOGP_T2, tol=1e-5)
    close(LOGP_T2[0][0], 1.5 - math.log(math.exp(0.5) + math.e + math.exp(1.5)), tol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_token_logprobs_float32_for_low_precision_logits(dtype):
    """Half-precision logits give float32 log-probs, equal to the float32 answer (inputs are exact)."""
    out = core.token_logprobs(torch.tensor(LOGITS, dtype=dtype), torch.tensor(TARGETS))
    assert out.dtype == torch.float32
    close(out, LOGP_T1, tol=1e-5)
    out2 = core.token_logprobs(torch.tensor(LOGITS, dtype=dtype), torch.tensor(TARGETS), temperature=2.0)
    assert out2.dtype == torch.float32
    close(out2, LOGP_T2, tol=1e-5)


def test_token_logprobs_large_logits_are_finite():
    """Huge logits do not overflow: the log-prob of the argmax of [1000, 0] is ~0, the other ~-1000."""
    out = core.token_logprobs(torch.tensor([[[1000.0, 0.0], [1000.0, 0.0]]]), torch.tensor([[0, 1]]))
    close(out, [[0.0, -1000.0]], tol=1e-3)


def test_entropy_uniform_is_log_v():
    """Uniform logits over V classes have entropy log V."""
    for V in (2, 7, 261):
        h = core.entropy_from_logits(torch.zeros(2, 3, V))
        assert h.shape == (2, 3)
        close(h, torch.full((2, 3), math.log(V)), tol=1e-5)


def test_entropy_one_hot_is_zero_and_hand_case():
    """A near one-hot distribution has entropy ~0; probs (1/2, 1/4, 1/4) have entropy 1.5 log 2."""
    h = core.entropy_from_logits(torch.tensor([[[100.0, 0.0, 0.0]]]))
    close(h, [[0.0]], tol=1e-6)
    h = core.entropy_from_logits(torch.log(torch.tensor([[[2.0, 1.0, 1.0]]])))
    close(h, [[1.5 * math.log(2)]], tol=1e-5)


def test_entropy_temperature_and_dtype():
    """Temperature -> infinity flattens to log V; bf16 logits give float32 entropies."""
    logits = torch.tensor([[[1.0, 2.0, 3.0]]])
    close(core.entropy_from_logits(logits, temperature=1e6), [[math.log(3)]], tol=1e-5)
    h = core.entropy_from_logits(logits.bfloat16())
    assert h.dtype == torch.float32
    p = [math.exp(v) for v in (1, 2, 3)]
    p = [v / sum(p) for v in p]
    close(h, [[-sum(v * math.log(v) for v in p)]], tol=1e-5)  # 0.8324
    close(h, [[0.832396]], tol=1e-5)


# ------------------------------------------------------------------------------ masked reductions

X = torch.tensor([[1.0, 2.0, 3.0, 1e9], [4.0, 1e9, 1e9, 1e9]])
M = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)


def test_masked_sum_ignores_padding():
    """masked_sum adds only the real positions, whatever huge values the padding holds."""
    close(core.masked_sum(X, M), 10.0)
    close(core.masked_sum(X, M, dim=-1), [6.0, 4.0])
    close(core.masked_sum(X, M.long(), dim=0), [5.0, 2.0, 3.0, 0.0])


def test_masked_mean_ignores_padding():
    """masked_mean averages over real positions only, globally and along a dim."""
    close(core.masked_mean(X, M), 10.0 / 4)
    close(core.masked_mean(X, M, dim=-1), [2.0, 4.0])
    close(core.masked_mean(X, M.float(), dim=0), [2.5, 2.0, 3.0, 0.0])


def test_masked_mean_empty_row_is_not_nan():
    """A row with no real tokens gives a finite mean (0), not NaN, and does not spoil the others."""
    x = torch.tensor([[1.0, 3.0], [5.0, 7.0]])
    m = torch.tensor([[1, 1], [0, 0]])
    out = core.masked_mean(x, m, dim=-1)
    assert not torch.isnan(out).any()
    close(out, [2.0, 0.0])
    assert not torch.isnan(core.masked_mean(x, torch.zeros_like(m)))


def test_masked_var_unbiased_and_biased():
    """Real values 1,2,3,4: biased variance 1.25, unbiased 5/3; padding (1e9) is ignored."""
    x = torch.tensor([[1.0, 2.0, 1e9], [3.0, 4.0, 1e9]])
    m = torch.tensor([[1, 1, 0], [1, 1, 0]])
    close(core.masked_var(x, m), 5.0 / 3, tol=1e-5)
    close(core.masked_var(x, m, unbiased=False), 1.25, tol=1e-5)


def test_masked_whiten_real_positions_standardised():
    """Whitened real positions have mean 0 and (unbiased) std 1; padding comes out as 0."""
    x = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 10.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    w = core.masked_whiten(x, m)
    real = w[m.bool()]
    close(real.mean(), 0.0, tol=1e-5)
    close(real.std(), 1.0, tol=1e-5)
    close(w[~m.bool()], [0.0, 0.0, 0.0])
    # by hand: mean 4, unbiased var (9+4+1+0+36)/4 = 12.5
    close(w[0, 0], (1 - 4) / math.sqrt(12.5), tol=1e-5)


def test_masked_whiten_independent_of_padding_values():
    """Changing the padded values (to 1e6) changes nothing at the real positions."""
    x = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 10.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    x2 = torch.where(m.bool(), x, torch.tensor(1e6))
    w, w2 = core.masked_whiten(x, m), core.masked_whiten(x2, m)
    close(w2, w, tol=1e-5)
    close(w2[~m.bool()], [0.0, 0.0, 0.0])


def test_masked_whiten_keep_mean():
    """shift_mean=False rescales to std 1 but keeps the mean (4 here)."""
    x = torch.tensor([[1.0, 2.0, 3.0, -7.0], [4.0, 10.0, 99.0, 99.0]])
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    w = core.masked_whiten(x, m, shift_mean=False)
    real = w[m.bool()]
    close(real.mean(), 4.0, tol=1e-5)
    close(real.std(), 1.0, tol=1e-5)
    close(w[0, 0], (1 - 4) / math.sqrt(12.5) + 4, tol=1e-5)
    close(w[~m.bool()], [0.0, 0.0, 0.0])


def test_sequence_logprob_sum_and_average():
    """Sum and mean of a row's real log-probs: (-1,-2,-3) -> -6 and -2; padding (99) ignored."""
    logps = torch.tensor([[-1.0, -2.0, -3.0, 99.0], [-0.5, 99.0, 99.0, 99.0]])
    m = core.lengths_to_mask(torch.tensor([3, 1]), 4)
    close(core.sequence_logprob(logps, m), [-6.0, -0.5])
    close(core.sequence_logprob(logps, m, average=True), [-2.0, -0.5])


# ------------------------------------------------------------------------------ padding and masks

def test_lengths_to_mask_right_and_left():
    """Lengths (2, 0, 3) in T=3, padded right and left."""
    right = core.lengths_to_mask(torch.tensor([2, 0, 3]), 3)
    left = core.lengths_to_mask([2, 0, 3], 3, left=True)
    assert right.dtype == torch.bool and left.dtype == torch.bool
    assert right.tolist() == [[True, True, False], [False, False, False], [True, True, True]]
    assert left.tolist() == [[False, True, True], [False, False, False], [True, True, True]]


def test_pad_right():
    """pad() right-pads with pad_id and returns the mask of the real tokens."""
    ids, mask = core.pad([[5, 6, 7], [8], []], pad_id=0)
    assert ids.dtype == torch.long
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
    assert mask.tolist() == [[True, True, True], [True, False, False], [False, False, False]]


def test_pad_left_and_fixed_length():
    """pad(left=True, T=4) left-pads to length 4."""
    ids, mask = core.pad([[5, 6, 7], [8]], pad_id=9, left=True, T=4)
    assert ids.tolist() == [[9, 5, 6, 7], [9, 9, 9, 8]]
    assert mask.tolist() == [[False, True, True, True], [False, False, False, True]]


def test_pad_mask_comes_from_lengths_not_ids():
    """A real token equal to pad_id is still marked real, on both sides."""
    ids, mask = core.pad([[0, 3, 0], [0]], pad_id=0)
    assert ids.tolist() == [[0, 3, 0], [0, 0, 0]]
    assert mask.tolist() == [[True, True, True], [True, False, False]]
    ids, mask = core.pad([[0, 3, 0], [0]], pad_id=0, left=True)
    assert mask.tolist() == [[True, True, True], [False, False, True]]


def test_last_index_and_gather_last():
    """The last real token under right padding, left padding and no padding."""
    x = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23], [30, 31, 32, 33]])
    right = core.lengths_to_mask(torch.tensor([2, 4, 1]), 4)
    left = core.lengths_to_mask(torch.tensor([2, 4, 1]), 4, left=True)
    full = torch.ones(3, 4, dtype=torch.bool)
    assert core.last_index(right).tolist() == [1, 3, 0]
    assert core.gather_last(x, right).tolist() == [11, 23, 30]
    assert core.last_index(left).tolist() == [3, 3, 3]
    assert core.gather_last(x, left).tolist() == [13, 23, 33]
    assert core.last_index(full).tolist() == [3, 3, 3]
    assert core.gather_last(x, full.long()).tolist() == [13, 23, 33]


def test_last_index_float_values():
    """gather_last works on float values (e.g. per-token rewards) with a 0/1 integer mask."""
    v = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    m = torch.tensor([[1, 1, 0], [0, 1, 1]])
    close(core.gather_last(v, m), [0.2, 0.6], tol=1e-6)


# ------------------------------------------------------------------------------ memory-lean log-probs

@pytest.mark.parametrize("temperature, chunk", [(1.0, 7), (0.7, 64), (1.3, 1000)])
def test_lm_logprobs_equal_the_full_logits_values_and_gradients(temperature, chunk):
    """Scored positions only, chunked, recomputed in the backward: the same log-probs (bit for bit here),
    entropies and gradients (to float32 rounding of the chunked weight-gradient sums) as the full logits."""
    torch.manual_seed(0)
    N, C, V = 50, 16, 300
    h = torch.randn(N, C, requires_grad=True)
    w = (0.5 * torch.randn(V, C)).requires_grad_()
    t = torch.randint(V, (N,))
    logits = h @ w.t()
    full, full_ent = core.token_logprobs(logits, t, temperature), core.entropy_from_logits(logits, temperature)
    ours, ent = core.lm_logprobs(h, w, t, temperature, with_entropy=True, chunk=chunk)
    assert torch.allclose(ours, full, atol=1e-6, rtol=0) and torch.allclose(ent, full_ent, atol=1e-6, rtol=0)
    gw = torch.randn(N)  # any upstream gradient, on both outputs
    g_full = torch.autograd.grad((full * gw).sum() + full_ent.sum(), (h, w))
    g_ours = torch.autograd.grad((ours * gw).sum() + ent.sum(), (h, w))
    for a, b in zip(g_full, g_ours):
        assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()


def test_lm_logprobs_never_keeps_the_logits_for_the_backward():
    """What autograd saves for the backward is the chunk inputs, never a [chunk, V] logits tensor."""
    torch.manual_seed(0)
    N, C, V, chunk = 64, 8, 1000, 16
    h, w = torch.randn(N, C, requires_grad=True), torch.randn(V, C, requires_grad=True)
    t = torch.randint(V, (N,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
        out = core.lm_logprobs(h, w, t, chunk=chunk)
    assert max(saved) < chunk * V  # the full-logits path saves [N, V] (64,000 here)
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
        core.token_logprobs(h @ w.t(), t)
    assert max(saved) >= N * V  # the check can fail: the plain path does keep them
    out.sum().backward()
    assert h.grad is not None and w.grad is not None


def test_lm_logprobs_of_nothing():
    h, w = torch.randn(0, 4), torch.randn(10, 4)
    assert core.lm_logprobs(h, w, torch.zeros(0, dtype=torch.long)).shape == (0,)


def test_model_logprobs_scores_only_the_marked_positions_under_any_padding():
    """The same numbers as the full-logits path at the scored positions, 0 elsewhere; gradients agree."""
    from nanoalign.model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=30, block_size=16, n_layer=1, n_head=2, n_embd=16))
    ids, mask = core.pad([[5, 6, 7, 8, 9, 10], [11, 12, 13]], 0, left=True)
    scored = mask[:, 1:] & torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 1, 1]], dtype=torch.bool)
    full = core.token_logprobs(model(ids, mask)[:, :-1], ids[:, 1:]) * scored
    ours, ent = core.model_logprobs(model, ids, scored, mask, with_entropy=True)
    assert torch.allclose(ours, full, atol=1e-6, rtol=0) and (ours[~scored] == 0).all() and (ent[~scored] == 0).all()
    g_full = torch.autograd.grad(full.sum(), model.transformer.wte.weight)[0]
    g_ours = torch.autograd.grad(ours.sum(), model.transformer.wte.weight)[0]
    assert torch.allclose(g_full, g_ours, atol=1e-5, rtol=0)


def test_response_positions_hand_case():
    """Prompts in the first Tp = 3 slots (left-padded), then responses: position t scores ids[t + 1], so the
    response tokens' targets sit at positions Tp - 1 .. and a response's padding is never scored."""
    mask = torch.tensor([[0, 1, 1, 1, 1, 0],    # prompt of 2, response of 2 (then padding)
                         [1, 1, 1, 1, 1, 1]]).bool()  # prompt of 3, response of 3
    assert core.response_positions(mask, 3).int().tolist() == [[0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
