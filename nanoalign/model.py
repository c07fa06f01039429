"""
A GPT-2 in one file: learned positions, pre-LayerNorm, tanh-GELU, tied embeddings.

Parameter names match the published GPT-2 checkpoint (transformer.wte, transformer.h.0.attn.c_attn, ...),
so `GPT.from_pretrained(dir)` copies tensors by name. Two things are added to nanoGPT's model:

1. Padded batches. `mask` [B, T] marks real tokens (1) and padding (0). Position ids are counted over
   real tokens only and padding keys are never attended to, so a sequence's outputs do not depend on
   padding side, padding amount or its batch neighbours. With mask=None the batch is treated as
   unpadded (right padding needs no mask either: causal attention never looks right).
2. A KV cache for generation (`KVCache`): the same forward, fed the new tokens only.

And two training aids: `GPT.grad_ckpt = True` recomputes each block's activations in the backward pass
instead of keeping them (activation checkpointing), and LoRA adapters (`add_lora`, `merge_lora`, and the
reference as the same network with its adapters off: `adapters_off`, `frozen_base`).
"""
import json
import math
import os
import struct
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


@dataclass
class GPTConfig:
    block_size: int = 128  # longest sequence (number of learned positions)
    vocab_size: int = 261  # the byte tokenizer's 256 bytes + 5 special tokens
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True  # GPT-2 has biases in every Linear and LayerNorm
    lora_rank: int = 0  # > 0: low-rank adapters on the attention and MLP projections (`GPT.add_lora`)
    lora_alpha: float = 16.0


def fused_adamw(device):
    """Whether AdamW runs fused (one kernel for all the parameters, not a loop over them) on `device`: on CUDA and,
    since torch 2.4, on the CPU too, where it measured several times faster per step than the loop. The same
    update up to float rounding (2e-8 on a weight after 23 steps)."""
    return torch.device(device).type in ("cuda", "cpu")


class KVCache:
    """Keys and values of every layer for a batch, preallocated for `max_len` slots.

    Slots are filled left to right; `key_mask` records which filled slots hold real tokens and
    `n_real` how many real tokens each row has seen, which is the next token's position id.
    """

    def __init__(self, config, batch_size, max_len, device):
        hd = config.n_embd // config.n_head
        self.shape = (config.n_layer, batch_size, config.n_head, max_len, hd)
        self.k = self.v = None  # allocated at the first write, in the dtype attention runs in (AMP or not)
        self.key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.n_real = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.t = 0  # filled slots


def positions_and_attention(mask, cache=None):
    """Position ids [B, T] and a boolean attention mask [B, 1, T, S] for T new tokens over S keys.

    Query i sees key j when j is at or before i (in slot order) and key j is a real token. A padding
    query is also allowed to see itself, so that no row is all-False (softmax of nothing is NaN);
    its output is junk that nothing downstream reads.
    """
    B, T = mask.shape
    start = 0 if cache is None else cache.t
    n_before = 0 if cache is None else cache.n_real[:, None]
    pos = (n_before + mask.long().cumsum(1) - 1).clamp(min=0)
    keys = mask if cache is None else torch.cat([cache.key_mask[:, :start], mask], dim=1)
    q_slot = torch.arange(start, start + T, device=mask.device)[:, None]
    k_slot = torch.arange(start + T, device=mask.device)[None, :]
    attn = (k_slot <= q_slot)[None] & keys[:, None, :]
    attn = attn | (k_slot == q_slot)[None]
    if cache is not None:
        cache.key_mask[:, start:start + T] = mask
        cache.n_real += mask.long().sum(1)
    return pos, attn[:, None]


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.layer, self.n_head, self.dropout = layer, config.n_head, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, attn=None, cache=None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:  # write the new keys/values into their slots, attend over all filled slots
            s = cache.t
            if cache.k is None:
                cache.k, cache.v = k.new_zeros(cache.shape), v.new_zeros(cache.shape)
            cache.k[self.layer, :, :, s:s + T] = k
            cache.v[self.layer, :, :, s:s + T] = v
            k, v = cache.k[self.layer, :, :, :s + T], cache.v[self.layer, :, :, :s + T]
        dropout = self.dropout if self.training else 0.0
        if attn is None:  # unpadded batch: the fast fused causal kernel
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class LoRALinear(nn.Linear):
    """An nn.Linear with a low-rank update (LoRA, Hu et al. 2021):

        y = x W^T + b + (alpha / r) * x A^T B^T,   A: [r, in] random, B: [out, r] zero at the start

    so at initialisation the layer computes exactly what the base layer did, and only A and B train.
    The parameter names stay those of the base layer (c_attn.weight, ...) plus lora_A and lora_B, so a
    GPT-2 checkpoint still loads by name. `enabled = False` gives the base layer back: the frozen
    reference policy of DPO, KTO, PPO and GRPO is the same network with its adapters off."""

    @classmethod
    def adapt(cls, linear, rank, alpha):
        linear.__class__ = cls
        linear.rank, linear.scale, linear.enabled = rank, alpha / rank, True
        linear.lora_A = nn.Parameter(torch.empty(rank, linear.in_features, device=linear.weight.device))
        nn.init.kaiming_uniform_(linear.lora_A, a=math.sqrt(5))  # as nn.Linear's own init, and PEFT's
        linear.lora_B = nn.Parameter(torch.zeros(linear.out_features, rank, device=linear.weight.device))
        return linear

    def forward(self, x):
        y = super().forward(x)
        if self.enabled:
            y = y + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scale
        return y

    @torch.no_grad()
    def merge(self):
        """Fold the update into the weight, W <- W + (alpha / r) B A, and become a plain nn.Linear."""
        self.weight += (self.lora_B @ self.lora_A).to(self.weight.dtype) * self.scale
        del self.lora_A, self.lora_B
        self.__class__ = nn.Linear


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's "gelu_new"
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, attn=None, cache=None):
        x = x + self.attn(self.ln_1(x), attn, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    grad_ckpt = False  # True: activation checkpointing of the blocks whenever gradients are being recorded

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.lora_rank:  # a checkpoint saved with adapters: the same modules, before its state loads
            self.add_lora(config.lora_rank, config.lora_alpha)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self):
        return sum(p.numel() for p in self.parameters()) - self.transformer.wpe.weight.numel()

    def body(self, idx, mask=None, cache=None):
        """Final hidden states [B, T, C] (after ln_f): what the LM head, reward head and value head read."""
        B, T = idx.shape
        if mask is None and cache is None:
            pos, attn = torch.arange(T, device=idx.device)[None], None
        else:
            if mask is None:
                mask = torch.ones(B, T, dtype=torch.bool, device=idx.device)
            pos, attn = positions_and_attention(mask.bool(), cache)
        # Positions grow by one per real token, so without a cache T bounds them and the check costs
        # nothing; with a cache it reads the device (a host sync on a GPU): there, sampling.generate's
        # per-row limits already keep positions inside block_size, so it is done on the CPU only.
        if T > self.config.block_size or (cache is not None and not idx.is_cuda
                                          and int(pos.max()) >= self.config.block_size):
            n = T if cache is None else int(pos.max()) + 1
            raise ValueError(f"sequence of {n} tokens > block_size {self.config.block_size}")
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        # grad_ckpt: keep only each block's input; its activations are recomputed in the backward pass (the
        # same dropout mask: the RNG state is replayed). Off under no_grad (sampling, scoring): nothing to save.
        ckpt = self.grad_ckpt and cache is None and torch.is_grad_enabled()
        for block in self.transformer.h:
            x = torch.utils.checkpoint.checkpoint(block, x, attn, use_reentrant=False) if ckpt else block(x, attn, cache)
        if cache is not None:
            cache.t += T
        return self.transformer.ln_f(x)

    def forward(self, idx, mask=None, cache=None):
        """Logits [B, T, vocab_size]."""
        return self.lm_head(self.body(idx, mask, cache))

    # ---------------------------------------------------------------- LoRA

    def lora_layers(self):
        return [m for m in self.modules() if isinstance(m, LoRALinear)]

    def add_lora(self, rank, alpha):
        """Adapters on every block's attention (c_attn, c_proj) and MLP (c_fc, c_proj) projections; every
        other parameter is frozen. The model's output is unchanged until the adapters train."""
        for block in self.transformer.h:
            for linear in (block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj):
                LoRALinear.adapt(linear, rank, alpha)
        for name, p in self.named_parameters():
            p.requires_grad_(".lora_" in name)
        self.config.lora_rank, self.config.lora_alpha = rank, alpha
        return self

    def merge_lora(self):
        """Fold every adapter into its weight: a plain GPT again, every parameter trainable."""
        for m in self.lora_layers():
            m.merge()
        self.requires_grad_(True)
        self.config.lora_rank = 0
        return self

    @contextmanager
    def adapters_off(self):
        """`with policy.adapters_off():` the base network, i.e. the reference policy, with no second copy."""
        layers = self.lora_layers()
        for m in layers:
            m.enabled = False
        try:
            yield self
        finally:
            for m in layers:
                m.enabled = True

    def frozen_base(self):
        """The reference policy as a view of this LoRA policy: a module whose forward / body run this network with
        its adapters off, in eval mode, with no gradient. It holds no weights of its own (nothing to copy, save
        or train), so it is always the frozen start, however far the adapters have trained."""
        return FrozenBase(self)

    # ---------------------------------------------------------------- optimizer

    def configure_optimizer(self, weight_decay, learning_rate, betas, device_type):
        """AdamW; weight decay on matrices only (not biases or LayerNorm gains)."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused_adamw(device_type))

    # ---------------------------------------------------------------- GPT-2 weights

    @classmethod
    def from_pretrained(cls, path, vocab_size=None):
        """Load a GPT-2 checkpoint in its published layout, with no Hugging Face library.

        `path` is a directory holding `config.json` and `model.safetensors` (or `pytorch_model.bin`).
        The published GPT-2 stores attention and MLP weights as Conv1D, [in, out]: transposed here.
        `vocab_size` larger than the checkpoint's adds rows to the embedding (for new special tokens),
        initialised to the mean embedding.
        """
        with open(os.path.join(path, "config.json")) as f:
            hf = json.load(f)
        config = GPTConfig(block_size=hf.get("n_positions", hf.get("n_ctx", 1024)), vocab_size=hf["vocab_size"],
                           n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=0.0, bias=True)
        st_path, bin_path = os.path.join(path, "model.safetensors"), os.path.join(path, "pytorch_model.bin")
        if os.path.exists(st_path):
            sd = read_safetensors(st_path)
        elif os.path.exists(bin_path):
            sd = torch.load(bin_path, map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin")
        model = cls(config)
        ours = model.state_dict()
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        loaded = set()
        for key, tensor in sd.items():
            if key.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # the causal-mask buffers older files store; not parameters
            name = key if key.startswith("transformer.") or key == "lm_head.weight" else "transformer." + key
            if name not in ours:
                raise KeyError(f"{path}: unexpected tensor {key}")
            if name.endswith(conv1d):
                tensor = tensor.t()
            if tensor.shape != ours[name].shape:
                raise ValueError(f"{path}: {key} has shape {tuple(tensor.shape)}, expected {tuple(ours[name].shape)}")
            with torch.no_grad():
                ours[name].copy_(tensor.float())
            loaded.add(name)
        missing = set(ours) - loaded - {"lm_head.weight"}  # lm_head is tied to wte
        if missing:
            raise KeyError(f"{path}: missing tensors {sorted(missing)}")
        if vocab_size is not None and vocab_size > config.vocab_size:
            model.resize_vocab(vocab_size)
        return model

    def resize_vocab(self, vocab_size):
        """Grow the (tied) embedding to `vocab_size` rows; new rows start at the mean embedding."""
        old = self.transformer.wte.weight.detach()
        new = torch.cat([old, old.mean(0, keepdim=True).expand(vocab_size - old.shape[0], -1)])
        self.transformer.wte.weight = nn.Parameter(new.clone())
        self.lm_head = nn.Linear(self.config.n_embd, vocab_size, bias=False).to(old.device)
        self.lm_head.weight = self.transformer.wte.weight
        self.config.vocab_size = vocab_size


class FrozenBase(nn.Module):
    """GPT.frozen_base(): see there. Reads the policy's config, embedding and LM head (no adapters live there)."""

    def __init__(self, policy):
        super().__init__()
        object.__setattr__(self, "policy", policy)  # not a submodule: not in parameters() or state_dict()
        self.config = policy.config

    @property
    def transformer(self):
        return self.policy.transformer

    @property
    def lm_head(self):
        return self.policy.lm_head

    @torch.no_grad()
    def body(self, idx, mask=None, cache=None):
        was_training = self.policy.training
        with self.policy.adapters_off():
            self.policy.eval()
            try:
                return self.policy.body(idx, mask, cache)
            finally:
                self.policy.train(was_training)

    @torch.no_grad()
    def forward(self, idx, mask=None, cache=None):
        return self.lm_head(self.body(idx, mask, cache))


def merged_state_dict(module):
    """module.state_dict() as it would be after GPT.merge_lora(): every adapter folded into its weight
    (W + (alpha / r) B A, computed as LoRALinear.merge does) and the adapter tensors dropped. The module itself
    is left as it is (still training its adapters). Works for a GPT or anything holding one (a ScalarModel)."""
    sd = module.state_dict()
    for name, m in module.named_modules():
        if isinstance(m, LoRALinear):
            w = sd[name + ".weight"]
            sd[name + ".weight"] = w + (m.lora_B @ m.lora_A).detach().to(w.dtype) * m.scale
            del sd[name + ".lora_A"], sd[name + ".lora_B"]
    return sd


SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32,
                      "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path):
    """A .safetensors file is: 8 bytes little-endian header length N, N bytes of JSON header
    {name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": ...}, then the raw little-endian
    tensor bytes, offsets relative to the end of the header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        raw = data[begin:end]
        if info["dtype"] == "BF16":  # numpy has no bfloat16: widen the 16 bits to float32's top half
            arr = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            t = torch.from_numpy(arr.view(np.float32).copy())
        else:
            t = torch.from_numpy(np.frombuffer(raw, dtype=np.dtype(SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<")).copy())
        out[name] = t.reshape(info["shape"])
    return out


def write_safetensors(tensors, path):
    """The inverse of read_safetensors (float32 / int64 only); used to write test checkpoints."""
    header, chunks, offset = {}, [], 0
    for name, t in tensors.items():
        arr = t.detach().cpu().contiguous().numpy()
        code = {np.dtype(np.float32): "F32", np.dtype(np.int64): "I64"}[arr.dtype]
        raw = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + b"".join(chunks))
