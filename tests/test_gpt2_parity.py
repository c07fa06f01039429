"""GPT.from_pretrained against an independent GPT-2 reference, and the safetensors reader.

The reference below is written the way Hugging Face's GPT2LMHeadModel computes (Conv1D weights stored
[in, out], explicit masked softmax, gelu_new, learned positions, tied lm_head) and reads tensors in the
published GPT-2 layout, so it shares no code with nanoalign.model.
"""
import json
import math
import struct

import numpy as np
import pytest
import torch

from nanoalign.model import GPT, read_safetensors, write_safetensors

V, N_POS, C, N_LAYER, N_HEAD = 97, 24, 32, 2, 4


# ------------------------------------------------------------------ the reference GPT-2 (HF style)

def gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def conv1d(sd, name, x):
    """HF Conv1D: the weight is [in, out] and the layer computes x @ W + b."""
    return x @ sd[name + ".weight"] + sd[name + ".bias"]


def layer_norm(sd, name, x, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * sd[name + ".weight"] + sd[name + ".bias"]


def reference_attention(sd, name, x, n_head):
    B, T, D = x.shape
    q, k, v = conv1d(sd, name + ".c_attn", x).split(D, dim=2)
    split = lambda t: t.view(B, T, n_head, D // n_head).permute(0, 2, 1, 3)  # [B, H, T, hd]
    q, k, v = split(q), split(k), split(v)
    w = q @ k.transpose(-1, -2) / math.sqrt(D // n_head)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    w = torch.where(causal, w, torch.tensor(torch.finfo(w.dtype).min, dtype=w.dtype))
    w = torch.softmax(w, dim=-1)
    a = (w @ v).permute(0, 2, 1, 3).contiguous().view(B, T, D)
    return conv1d(sd, name + ".c_proj", a)


def reference_gpt2_logits(sd, idx, n_layer, n_head):
    """Logits of GPT2LMHeadModel for `idx` [B, T], from a published-layout state dict (no prefix)."""
    sd = {k: v.double() for k, v in sd.items()}  # float64: the reference is the ground truth
    T = idx.shape[1]
    x = sd["wte.weight"][idx] + sd["wpe.weight"][torch.arange(T)][None]
    for i in range(n_layer):
        x = x + reference_attention(sd, f"h.{i}.attn", layer_norm(sd, f"h.{i}.ln_1", x), n_head)
        m = layer_norm(sd, f"h.{i}.ln_2", x)
        x = x + conv1d(sd, f"h.{i}.mlp.c_proj", gelu_new(conv1d(sd, f"h.{i}.mlp.c_fc", m)))
    x = layer_norm(sd, "ln_f", x)
    return x @ sd["wte.weight"].T  # lm_head tied to wte


# ------------------------------------------------------------------ a tiny checkpoint on disk

def random_gpt2_state_dict(seed=0, std=0.2):
    """Random weights in the published GPT-2 layout (Conv1D [in, out]), no prefix, no buffers."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g) * std
    sd = {"wte.weight": r(V, C), "wpe.weight": r(N_POS, C)}
    for i in range(N_LAYER):
        p = f"h.{i}."
        sd.update({
            p + "ln_1.weight": 1 + r(C), p + "ln_1.bias": r(C),
            p + "attn.c_attn.weight": r(C, 3 * C), p + "attn.c_attn.bias": r(3 * C),
            p + "attn.c_proj.weight": r(C, C), p + "attn.c_proj.bias": r(C),
            p + "ln_2.weight": 1 + r(C), p + "ln_2.bias": r(C),
            p + "mlp.c_fc.weight": r(C, 4 * C), p + "mlp.c_fc.bias": r(4 * C),
            p + "mlp.c_proj.weight": r(4 * C, C), p + "mlp.c_proj.bias": r(C),
        })
    sd.update({"ln_f.weight": 1 + r(C), "ln_f.bias": r(C)})
    return sd


def write_checkpoint(folder, sd, prefix="", fmt="safetensors", buffers=True, lm_head=False):
    """config.json + weights as Hugging Face publishes GPT-2, with the old attention-mask buffers."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
              "vocab_size": V, "n_positions": N_POS, "n_ctx": N_POS, "n_embd": C, "n_layer": N_LAYER,
              "n_head": N_HEAD, "layer_norm_epsilon": 1e-5, "bos_token_id": V - 1, "eos_token_id": V - 1}
    (folder / "config.json").write_text(json.dumps(config))
    out = {prefix + k: v for k, v in sd.items()}
    if buffers:
        for i in range(N_LAYER):
            out[f"{prefix}h.{i}.attn.bias"] = torch.tril(torch.ones(N_POS, N_POS)).view(1, 1, N_POS, N_POS)
            out[f"{prefix}h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    if lm_head:
        out["lm_head.weight"] = sd["wte.weight"].clone()
    if fmt == "safetensors":
        write_safetensors(out, str(folder / "model.safetensors"))
    else:
        torch.save(out, str(folder / "pytorch_model.bin"))
    return folder


def random_ids(B=3, T=16, vocab=V, seed=1):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ parity

@pytest.mark.parametrize("prefix,fmt,lm_head", [
    ("", "safetensors", False),
    ("transformer.", "safetensors", True),
    ("", "bin", False),
    ("transformer.", "bin", False),
])
def test_from_pretrained_logits_match_reference(tmp_path, prefix, fmt, lm_head):
    """A published-layout checkpoint (any prefix / file format) loads to GPT-2's exact logits."""
    sd = random_gpt2_state_dict()
    write_checkpoint(tmp_path, sd, prefix=prefix, fmt=fmt, lm_head=lm_head)
    model = GPT.from_pretrained(str(tmp_path)).eval()
    assert model.config.vocab_size == V and model.config.block_size == N_POS
    assert model.config.n_layer == N_LAYER and model.config.n_head == N_HEAD and model.config.n_embd == C
    idx = random_ids()
    with torch.no_grad():
        logits = model(idx)
    ref = reference_gpt2_logits(sd, idx, N_LAYER, N_HEAD)
    assert logits.dtype == torch.float32 and logits.shape == (3, 16, V)
    assert ref.abs().max() > 1.0  # activations are not trivially small
    torch.testing.assert_close(logits.double(), ref, atol=1e-4, rtol=0)
    assert model.lm_head.weight is model.transformer.wte.weight


def test_from_pretrained_full_context_and_padded_batch(tmp_path):
    """Parity holds at the full n_positions, and a left-padded row matches the reference on its real tokens."""
    sd = random_gpt2_state_dict(seed=3)
    model = GPT.from_pretrained(str(write_checkpoint(tmp_path, sd))).eval()
    idx = random_ids(B=2, T=N_POS, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(model(idx).double(), reference_gpt2_logits(sd, idx, N_LAYER, N_HEAD),
                                   atol=1e-4, rtol=0)
        n_pad = 5
        padded = torch.cat([torch.zeros(2, n_pad, dtype=torch.long), idx[:, : N_POS - n_pad]], dim=1)
        mask = torch.ones_like(padded)
        mask[:, :n_pad] = 0
        logits = model(padded, mask=mask)[:, n_pad:]
    ref = reference_gpt2_logits(sd, idx[:, : N_POS - n_pad], N_LAYER, N_HEAD)
    torch.testing.assert_close(logits.double(), ref, atol=1e-4, rtol=0)


def test_from_pretrained_grows_vocab_for_new_tokens(tmp_path):
    """vocab_size=V+5 adds mean-embedding rows, keeps old logits, and keeps lm_head tied to wte."""
    sd = random_gpt2_state_dict(seed=5)
    model = GPT.from_pretrained(str(write_checkpoint(tmp_path, sd)), vocab_size=V + 5).eval()
    wte = model.transformer.wte.weight
    assert wte.shape == (V + 5, C) and model.config.vocab_size == V + 5
    torch.testing.assert_close(wte[:V].detach(), sd["wte.weight"])
    torch.testing.assert_close(wte[V:].detach(), sd["wte.weight"].mean(0, keepdim=True).expand(5, C))
    assert model.lm_head.weight is wte
    idx = random_ids(seed=6)  # old ids only
    with torch.no_grad():
        logits = model(idx)
    assert logits.shape == (3, 16, V + 5)
    torch.testing.assert_close(logits[..., :V].double(), reference_gpt2_logits(sd, idx, N_LAYER, N_HEAD),
                               atol=1e-4, rtol=0)
    # tied: each new column is h @ mean(wte) = the mean of the old columns
    new_cols = logits[..., V:]
    torch.testing.assert_close(new_cols, logits[..., :V].mean(-1, keepdim=True).expand_as(new_cols),
                               atol=1e-4, rtol=0)
    with torch.no_grad():  # the new ids are usable as inputs
        assert torch.isfinite(model(torch.tensor([[V, V + 4, 0]]))).all()


def test_from_pretrained_missing_tensor_raises_keyerror(tmp_path):
    """A checkpoint lacking a parameter fails with a KeyError naming it."""
    sd = random_gpt2_state_dict()
    del sd["h.1.mlp.c_fc.bias"]
    write_checkpoint(tmp_path, sd)
    with pytest.raises(KeyError, match=r"h\.1\.mlp\.c_fc\.bias"):
        GPT.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("key,shape", [("h.0.attn.c_attn.weight", (3 * C, C)), ("wpe.weight", (N_POS + 1, C))])
def test_from_pretrained_wrong_shape_raises_valueerror(tmp_path, key, shape):
    """A tensor of the wrong shape (e.g. c_attn stored [out, in]) fails with a ValueError naming it."""
    sd = random_gpt2_state_dict()
    sd[key] = torch.randn(*shape)
    write_checkpoint(tmp_path, sd)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        GPT.from_pretrained(str(tmp_path))


def test_from_pretrained_unexpected_tensor_and_missing_file(tmp_path):
    """An unknown tensor name is a KeyError; a folder without weights is a FileNotFoundError."""
    sd = random_gpt2_state_dict()
    sd["h.0.attn.q_proj.weight"] = torch.zeros(C, C)
    write_checkpoint(tmp_path / "extra", sd)
    with pytest.raises(KeyError, match="q_proj"):
        GPT.from_pretrained(str(tmp_path / "extra"))
    write_checkpoint(tmp_path / "empty", random_gpt2_state_dict())
    (tmp_path / "empty" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError):
        GPT.from_pretrained(str(tmp_path / "empty"))


# ------------------------------------------------------------------ safetensors, byte by byte

def hand_built_safetensors(path, entries, metadata=None):
    """Write a .safetensors file from (name, dtype_code, shape, raw_bytes), laying the data out in
    reverse order of the header so that offsets, not header order, decide where a tensor lives."""
    header, chunks, offset = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, code, shape, raw in reversed(entries):
        chunks.append(raw)
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    header = {k: header[k] for k in (["__metadata__"] if metadata else []) + [e[0] for e in entries]}
    blob = json.dumps(header).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        f.write(b"".join(chunks))


def test_read_safetensors_hand_built_file(tmp_path):
    """read_safetensors decodes F32, BF16, F16, I64 and scalar tensors from raw bytes at their offsets."""
    f32 = np.arange(6, dtype="<f4").reshape(2, 3) * 0.5 - 1.25
    bf16_values = np.array([1.0, -2.5, 3.140625, 0.0078125, -65280.0, 0.0], dtype="<f4")  # exact in bfloat16
    bf16_raw = (bf16_values.view("<u4") >> 16).astype("<u2").tobytes()
    f16 = np.array([[1.5, -0.333251953125], [65504.0, -6.103515625e-05]], dtype="<f2")
    i64 = np.array([-3, 0, 2**40 + 7], dtype="<i8")
    entries = [
        ("a.f32", "F32", (2, 3), f32.tobytes()),
        ("b.bf16", "BF16", (2, 3), bf16_raw),
        ("c.f16", "F16", (2, 2), f16.tobytes()),
        ("d.i64", "I64", (3,), i64.tobytes()),
        ("e.scalar", "F32", (), np.array(-7.0, dtype="<f4").tobytes()),
    ]
    path = tmp_path / "hand.safetensors"
    hand_built_safetensors(path, entries, metadata={"format": "pt"})
    out = read_safetensors(str(path))
    assert set(out) == {"a.f32", "b.bf16", "c.f16", "d.i64", "e.scalar"}  # no "__metadata__"
    assert out["a.f32"].dtype == torch.float32
    assert torch.equal(out["a.f32"], torch.from_numpy(f32.astype(np.float32)))
    assert out["b.bf16"].shape == (2, 3)
    assert torch.equal(out["b.bf16"].float(), torch.from_numpy(bf16_values.astype(np.float32)).view(2, 3))
    assert out["c.f16"].dtype == torch.float16
    assert torch.equal(out["c.f16"], torch.from_numpy(f16.astype(np.float16)))
    assert out["d.i64"].dtype == torch.int64 and out["d.i64"].tolist() == [-3, 0, 2**40 + 7]
    assert out["e.scalar"].shape == () and out["e.scalar"].item() == -7.0


def test_read_safetensors_bf16_matches_torch_bfloat16(tmp_path):
    """BF16 decoding agrees with torch's own bfloat16 on random values (the bits are the top half of f32)."""
    t = (torch.randn(50, generator=torch.Generator().manual_seed(0)) * 100).to(torch.bfloat16)
    raw = t.view(torch.int16).numpy().astype("<i2").tobytes()
    path = tmp_path / "bf16.safetensors"
    hand_built_safetensors(path, [("w", "BF16", (5, 10), raw)])
    assert torch.equal(read_safetensors(str(path))["w"].float(), t.float().view(5, 10))


def test_write_safetensors_layout_parses_by_hand(tmp_path):
    """write_safetensors emits the documented layout: u64 header length (8-aligned), JSON, raw LE bytes."""
    a = torch.randn(3, 4)
    b = torch.arange(5, dtype=torch.int64) - 2
    path = tmp_path / "w.safetensors"
    write_safetensors({"a": a, "b": b}, str(path))
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert n % 8 == 0
    header = json.loads(data[8:8 + n])
    body = data[8 + n:]
    ia, ib = header["a"], header["b"]
    assert ia["dtype"] == "F32" and ia["shape"] == [3, 4] and ib["dtype"] == "I64" and ib["shape"] == [5]
    got_a = np.frombuffer(body[ia["data_offsets"][0]:ia["data_offsets"][1]], dtype="<f4").reshape(3, 4)
    got_b = np.frombuffer(body[ib["data_offsets"][0]:ib["data_offsets"][1]], dtype="<i8")
    assert np.array_equal(got_a, a.numpy()) and got_b.tolist() == [-2, -1, 0, 1, 2]
    assert len(body) == max(ia["data_offsets"][1], ib["data_offsets"][1])
