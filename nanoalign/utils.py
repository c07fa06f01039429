"""
Plumbing shared by the train_*.py scripts: config overrides, checkpoints, the LR schedule, AMP, logs.
"""
import ast
import json
import math
import os
import re
import sys
from contextlib import nullcontext
from dataclasses import asdict

import torch

from nanoalign.heads import ScalarModel
from nanoalign.model import GPT, GPTConfig
from nanoalign.tokenizer import get_tokenizer

# ------------------------------------------------------------------------------ config

CONFIG_LINE = re.compile(r"^(\w+)\s*=\s*(.*?)(?:\s+#\s*(.*))?$")


def configure(g, argv=None):
    """Override a script's config globals from the command line, nanoGPT style.

    The config is the block of `key = value  # help` lines between "# ---- config" and "# ---- end config"
    in the script. Arguments: `--key=value` (value parsed as a Python literal, else a string) and
    config files `name.py` holding `key = literal` lines (parsed, never executed). `--help` lists the
    keys with their defaults and help. Returns the final config as a dict.
    """
    argv = sys.argv[1:] if argv is None else argv
    src = open(g["__file__"]).read()
    block = src.split("# ---- config", 1)[1].split("# ---- end config", 1)[0]
    keys = {}
    for line in block.splitlines():
        m = CONFIG_LINE.match(line)
        if m:
            keys[m.group(1)] = m.group(3) or ""
    if "--help" in argv or "-h" in argv:
        print((g.get("__doc__") or "").strip().split("\n\n")[0] + "\n")
        print("usage: python " + os.path.basename(g["__file__"]) + " [config.py ...] [--key=value ...]\n")
        width = max(len(f"{k}={g[k]!r}") for k in keys)
        for k, h in keys.items():
            print(f"  --{f'{k}={g[k]!r}':<{width}}  {h}")
        sys.exit(0)

    def set_key(k, v, where):
        if k not in keys:
            raise SystemExit(f"{where}: unknown config key {k!r}; see --help")
        default = g[k]
        if default is not None and v is not None and type(v) is not type(default) \
                and not (type(default) is float and type(v) is int):
            raise SystemExit(f"{where}: {k} must be {type(default).__name__}, got {v!r}")
        g[k] = float(v) if type(default) is float and v is not None else v

    for arg in argv:
        if arg.startswith("--"):
            k, eq, v = arg[2:].partition("=")
            if not eq:
                raise SystemExit(f"expected --key=value, got {arg!r}")
            if not isinstance(g.get(k), str):  # str settings take the text as it is ("1,2,4" stays a str)
                try:
                    v = ast.literal_eval(v)
                except (ValueError, SyntaxError):
                    pass  # a plain string
            set_key(k, v, arg)
        else:
            for node in ast.parse(open(arg).read(), arg).body:
                if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
                    raise SystemExit(f"{arg}:{node.lineno}: config files hold only `key = literal` lines")
                set_key(node.targets[0].id, ast.literal_eval(node.value), f"{arg}:{node.lineno}")
    return {k: g[k] for k in keys}


# ------------------------------------------------------------------------------ devices, AMP, schedule

def setup_device(device, dtype):
    """-> (device, autocast context, GradScaler). dtype "auto": bf16 on GPUs that support it, else
    fp16 with a GradScaler; float32 on CPU (bf16 on CPU works, but is rarely faster)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev_type = "cuda" if device.startswith("cuda") else "cpu"
    if dtype == "auto":
        dtype = "float32" if dev_type == "cpu" else "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if dev_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    ctx = nullcontext() if dtype == "float32" else torch.autocast(device_type=dev_type, dtype=ptdtype)
    scaler = torch.amp.GradScaler(dev_type, enabled=dtype == "float16")
    return device, ctx, scaler


def cosine_lr(step, lr, warmup_steps, decay_steps, min_lr):
    """Linear warmup to `lr`, then cosine decay to `min_lr` at `decay_steps`, then flat."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr
    ratio = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (lr - min_lr)


def optimizer_step(model, optimizer, scaler, grad_clip):
    """Unscale (fp16), clip the gradient norm (0: no clipping), step, zero. Returns the norm before clipping."""
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf")).item()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def step_generator(seed, step):
    """The RNG of one optimizer step: a batch depends only on (seed, step), so resuming is exact and
    batch_size x grad_accum can be split any way without changing which examples a step sees."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


# ------------------------------------------------------------------------------ checkpoints

def save_checkpoint(path, model, tok, **extra):
    """model + its config + the tokenizer spec (+ optimizer, step, config, ... in `extra`).
    Written to a temporary file and renamed, so an interrupted save never leaves a broken checkpoint."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    kind = "scalar" if isinstance(model, ScalarModel) else "gpt"
    state = {"model": model.state_dict(), "model_config": asdict(model.config), "tokenizer": tok.spec, "kind": kind,
             **({"top_blocks": len(model.top)} if kind == "scalar" else {}), **extra}
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path, device="cpu"):
    """-> (model, tokenizer, checkpoint dict): a GPT, or a ScalarModel for reward/value checkpoints.
    weights_only=True: loading a checkpoint cannot run code."""
    ckpt = torch.load(path, map_location=device, weights_only=True)
    model = GPT(GPTConfig(**ckpt["model_config"]))
    if ckpt.get("kind") == "scalar":
        model = ScalarModel(model, ckpt.get("top_blocks", 0))
    model.load_state_dict(ckpt["model"])
    return model.to(device), get_tokenizer(ckpt["tokenizer"]), ckpt


def init_model(init_from, tokenizer, model_config, device):
    """The model a stage starts from: "scratch" (a new GPT of `model_config`), a nanoalign checkpoint
    (a .pt file), or a GPT-2 directory (config.json + model.safetensors / pytorch_model.bin).
    Returns (model, tokenizer); a checkpoint brings its own tokenizer, GPT-2 needs the gpt2 one."""
    if init_from == "scratch":
        tok = get_tokenizer(tokenizer)
        return GPT(GPTConfig(vocab_size=tok.n_vocab, **model_config)).to(device), tok
    if init_from.endswith(".pt"):
        model, tok, _ = load_checkpoint(init_from, device)
        return (model.gpt if isinstance(model, ScalarModel) else model), tok  # a reward model: its body
    tok = get_tokenizer(tokenizer if tokenizer.startswith("gpt2") else "gpt2")
    return GPT.from_pretrained(init_from, vocab_size=tok.n_vocab).to(device), tok


# ------------------------------------------------------------------------------ logs

class JsonlLogger:
    """One JSON object per line to <out_dir>/metrics.jsonl. A fresh run starts the file anew (a rerun into
    the same out_dir must not mix two runs); a resumed run appends to it."""

    def __init__(self, path, append=False):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self.f = open(path, "a" if append else "w")

    def log(self, **metrics):
        self.f.write(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}) + "\n")
        self.f.flush()


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
