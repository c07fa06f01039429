"""
Plumbing shared by the train_*.py scripts: config overrides, checkpoints, the LR schedule, AMP, logs,
the NaN guard (check_finite, optimizer_step) and exact resume (resume_state / restore_state).
"""
import ast
import json
import math
import os
import random
import re
import sys
from contextlib import nullcontext
from dataclasses import asdict

import torch

from nanoalign import dist
from nanoalign.data import DataError
from nanoalign.heads import ScalarModel
from nanoalign.model import GPT, GPTConfig, LoRALinear, merged_state_dict
from nanoalign.tokenizer import get_tokenizer


class ConfigError(ValueError):
    """A config value that cannot work (`--lr=-1`, `--dtype=fp8`, ...)."""


class CheckpointError(ValueError):
    """A checkpoint or model directory that is missing, of the wrong kind, or does not fit another one."""


def _excepthook(exc_type, exc, tb, _default=sys.excepthook):
    """A user's mistake (bad config, bad data, wrong checkpoint) is one line naming what to fix, not a
    traceback; anything else is a bug and keeps its traceback. The exit status is 1 either way."""
    if issubclass(exc_type, (ConfigError, CheckpointError, DataError)):
        print(f"error: {exc}", file=sys.stderr)
    else:
        _default(exc_type, exc, tb)

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
    sys.excepthook = _excepthook  # from here on, a user's mistake is reported in one line
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
            raise ConfigError(f"{where}: unknown config key {k!r}; see --help")
        default = g[k]
        if default is not None and v is not None and type(v) is not type(default) \
                and not (type(default) is float and type(v) is int):
            raise ConfigError(f"{where}: {k} must be {type(default).__name__}, got {v!r}")
        g[k] = float(v) if type(default) is float and v is not None else v

    for arg in argv:
        if arg.startswith("--"):
            k, eq, v = arg[2:].partition("=")
            if not eq:
                raise ConfigError(f"expected --key=value, got {arg!r}")
            if not isinstance(g.get(k), str):  # str settings take the text as it is ("1,2,4" stays a str)
                try:
                    v = ast.literal_eval(v)
                except (ValueError, SyntaxError):
                    pass  # a plain string
            set_key(k, v, arg)
        else:
            for node in ast.parse(open(arg).read(), arg).body:
                if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
                    raise ConfigError(f"{arg}:{node.lineno}: config files hold only `key = literal` lines")
                set_key(node.targets[0].id, ast.literal_eval(node.value), f"{arg}:{node.lineno}")
    config = {k: g[k] for k in keys}
    check_config(config)
    return config


# What the common keys accept, checked once, up front, wherever a script has them (each script checks
# its own choice-valued keys, e.g. `loss`, itself). (test, what it accepts)
_POSITIVE_INT = (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1")
_NONNEG_INT = (lambda v: isinstance(v, int) and v >= 0, "an integer >= 0")
_POSITIVE = (lambda v: v > 0, "a number > 0")
_NONNEG = (lambda v: v >= 0, "a number >= 0")
_FRACTION = (lambda v: 0 < v < 1, "a number between 0 and 1 (exclusive)")
CONFIG_CHECKS = {
    **{k: _POSITIVE_INT for k in ("batch_size", "grad_accum", "max_steps", "max_iters", "n_layer", "n_head", "n_embd",
                                  "block_size", "eval_interval", "log_interval", "ckpt_interval", "n_train", "n_eval",
                                  "n_eval_pairs", "n_prompts", "prompts_per_step", "group_size", "k_samples",
                                  "rounds", "prompts_per_round", "max_new_tokens", "ppo_epochs", "minibatches",
                                  "mu", "eval_k", "n_norm", "horizon")},
    **{k: _NONNEG_INT for k in ("warmup_steps", "warmup_iters", "lr_decay_steps", "top_blocks", "seed")},
    **{k: _POSITIVE for k in ("lr", "vf_lr", "target_kl", "temperature")},
    **{k: _NONNEG for k in ("min_lr", "weight_decay", "grad_clip", "beta", "init_kl_coef", "vf_coef",
                            "cliprange", "cliprange_value", "eps_low", "eps_high", "gamma", "margin", "center_coef")},
    "lam": (lambda v: 0 <= v <= 1, "a number between 0 and 1"),
    "dropout": (lambda v: 0 <= v < 1, "a number >= 0 and < 1"),
    "val_frac": _FRACTION,
    "label_smoothing": (lambda v: 0 <= v < 0.5, "a number >= 0 and < 0.5"),
    "beta1": (lambda v: 0 <= v < 1, "a number >= 0 and < 1"),
    "beta2": (lambda v: 0 <= v < 1, "a number >= 0 and < 1"),
    "dtype": (lambda v: v in ("auto", "float32", "bfloat16", "float16"), "auto, float32, bfloat16 or float16"),
    "on_error": (lambda v: v in ("raise", "skip"), "raise or skip"),
    "truncate": (lambda v: v in ("skip", "raise", "left"), "skip, raise or left"),
    "device": (lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None, "auto, cpu, cuda or cuda:N"),
    "lora_rank": _NONNEG_INT,
    "lora_alpha": _POSITIVE,
    "top_k": _POSITIVE_INT,  # None (the default): no top-k filter
    "top_p": (lambda v: 0 < v <= 1, "a number > 0 and <= 1"),
}


def check_config(config):
    """Raise ConfigError naming the first key whose value cannot work, and what the key accepts."""
    for k, v in config.items():
        if k in CONFIG_CHECKS and v is not None:
            ok, accepts = CONFIG_CHECKS[k]
            try:
                good = ok(v)
            except TypeError:
                good = False
            if not good:
                raise ConfigError(f"--{k}={v!r}: {k} must be {accepts}")
    if config.get("n_embd") and config.get("n_head") and config["n_embd"] % config["n_head"]:
        raise ConfigError(f"--n_head={config['n_head']}: n_embd ({config['n_embd']}) must be divisible by n_head")
    device = config.get("device", "auto")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device={device}: this machine has no CUDA GPU that torch can use "
                              f"(torch {torch.__version__}); use --device=cpu or auto")
        if ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
            raise ConfigError(f"--device={device}: there are {torch.cuda.device_count()} CUDA devices")


# ------------------------------------------------------------------------------ devices, AMP, schedule

def setup_device(device, dtype):
    """-> (device, autocast context, GradScaler). dtype "auto": bf16 on GPUs that support it, else
    fp16 with a GradScaler; float32 on CPU (bf16 on CPU works, but is rarely faster). Under torchrun this
    process joins the job here (dist.setup: NCCL on GPUs, each rank on cuda:LOCAL_RANK; gloo on CPU)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = dist.setup(device)[2]
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


def check_finite(where, **values):
    """Stop training (SystemExit: one line, exit status 1) if a value is NaN or infinite. An update made from
    it would turn every weight into NaN, and a checkpoint written after it would replace the last good one."""
    for name, v in values.items():
        if not math.isfinite(v):
            raise SystemExit(f"{where}: {name} is {v}: training diverged (a lower lr?); stopped before the optimizer "
                             f"stepped on it, so every checkpoint written so far is intact")


def optimizer_step(model, optimizer, scaler, grad_clip, loss=None, where="step"):
    """Unscale (fp16), clip the gradient norm (0: no clipping), step, zero. Returns the norm before clipping.
    A non-finite `loss` (the value just backpropagated) or gradient norm stops training first (check_finite;
    `where` names the step), except that with fp16 inf/NaN gradients are the GradScaler's business: it
    skips that step and lowers its scale, as designed. Under torchrun the ranks' gradients are summed first
    (dist.reduce_gradients), and `loss` must be the whole step's (dist.all_reduce), so all ranks agree."""
    if loss is not None:
        check_finite(where, loss=float(loss))
    dist.reduce_gradients(model.parameters())
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf")).item()
    if not scaler.is_enabled():
        check_finite(where, grad_norm=grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def step_generator(seed, step):
    """The RNG of one optimizer step: a batch depends only on (seed, step), so resuming is exact and
    batch_size x grad_accum can be split any way without changing which examples a step sees."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


# ------------------------------------------------------------------------------ checkpoints

def save_checkpoint(path, model, tok, merge_lora=False, **extra):
    """model + its config + the tokenizer spec (+ optimizer, step, config, ... in `extra`, e.g. resume_state()).
    Written to a temporary file and renamed, so an interrupted save never leaves a broken checkpoint. A
    NaN or infinite tensor anywhere in it (weights, optimizer moments, ...) is refused, naming the tensor,
    and nothing is written: the last good checkpoint at `path` survives. Under torchrun rank 0 writes it
    (every rank holds the same weights and optimizer state) and the others return at once.
    A model with LoRA adapters is saved with them (load_checkpoint rebuilds them; a run resumes exactly), or,
    with merge_lora=True (the end of a run, --lora_merge), with them folded into the weights: a plain model that
    every stage and tool reads as any other (the live model keeps its adapters). Such a checkpoint is marked
    "lora_merged" and cannot be resumed as a LoRA run (check_resumable)."""
    if not dist.is_main():
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    kind = "scalar" if isinstance(model, ScalarModel) else "gpt"
    merge = merge_lora and any(isinstance(m, LoRALinear) for m in model.modules())
    state = {"model": merged_state_dict(model) if merge else model.state_dict(),
             "model_config": {**asdict(model.config), **({"lora_rank": 0} if merge else {})},
             "tokenizer": tok.spec, "kind": kind, **({"top_blocks": len(model.top)} if kind == "scalar" else {}),
             "cwd": os.getcwd(),  # where the config's relative paths point (run_path)
             **({"lora_merged": {"rank": model.config.lora_rank, "alpha": model.config.lora_alpha}} if merge else {}),
             **extra}
    bad = nonfinite_tensor(state)
    if bad:
        raise SystemExit(f"refusing to write {path}: {bad} is not finite (NaN or inf); the file there is kept")
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)


def run_path(ckpt, path):
    """A path from a checkpoint's config (e.g. its init_from) as the run that wrote it meant it: a relative path
    is relative to the directory that run was started in, not to today's (if it is there: a checkpoint copied
    to another machine, or older than the "cwd" field, gets the path as it is)."""
    if not path or os.path.isabs(path) or not os.path.exists(os.path.join(ckpt.get("cwd", ""), path)):
        return path
    return os.path.join(ckpt.get("cwd", ""), path)


def nonfinite_tensor(obj, name=""):
    """The name ("optimizer.state.3.exp_avg") of the first floating-point tensor in a nested dict/list that
    holds a NaN or inf, or None. The config is the user's input, not trained state, and is not looked at."""
    if torch.is_tensor(obj):
        return name if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        if not (name == "" and k == "config"):
            bad = nonfinite_tensor(v, f"{name}.{k}" if name else str(k))
            if bad:
                return bad
    return None


# ------------------------------------------------------------------------------ resume

def resume_state(**objs):
    """Everything a run needs to continue exactly where it stopped, as checkpoint entries (save_checkpoint(...,
    **resume_state(...))). Each named object becomes its state: state_dict() of modules, optimizers, a
    GradScaler, the JsonlLogger (its row count); get_state() of a torch.Generator; getstate() of a
    random.Random; anything else (the step, numbers, lists and dicts of them) is kept as it is. The global
    torch RNG ("rng", and CUDA's) always comes along. Taking the states draws no random number. Under torchrun
    every rank's own global RNG (each draws its own dropout) and its own GPU's are kept too (a collective: every
    rank calls this, rank 0's checkpoint holds them all)."""
    out = {"rng": torch.get_rng_state(), "resume_script": os.path.basename(sys.argv[0])}
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if dist.world() > 1:
        out["rng_ranks"] = dist.all_gather_objects(torch.get_rng_state())
        if cuda:
            out["cuda_rng_ranks"] = dist.all_gather_objects(torch.cuda.get_rng_state())
    elif cuda:
        out["cuda_rng"] = torch.cuda.get_rng_state_all()
    for name, obj in objs.items():
        out[name] = obj.get_state() if isinstance(obj, torch.Generator) else obj.getstate() \
            if isinstance(obj, random.Random) else obj.state_dict() if hasattr(obj, "state_dict") else obj
    return out


def resume_checkpoint(path, resume, device="cpu"):
    """The checkpoint a --resume=True run continues from: `path` if it exists, else None (a fresh start,
    so that a job can always be launched with --resume=True)."""
    if not (resume and os.path.exists(path)):
        return None
    ckpt = torch.load(path, map_location=device, weights_only=True)
    script = os.path.basename(sys.argv[0])
    if ckpt.get("resume_script", script) != script:
        raise SystemExit(f"--resume: {path} was written by {ckpt['resume_script']}, not {script}; pick another out_dir")
    return check_resumable(ckpt, path)


def check_resumable(ckpt, path):
    """A finished LoRA run whose adapters were merged into its weights (--lora_merge=True) has lost them: it is a
    plain model now, not a state to continue. Refused, with what to do instead. -> ckpt."""
    if ckpt.get("lora_merged"):
        raise CheckpointError(f"--resume: {path} is the end of a LoRA run, its adapters merged into the weights "
                              f"(--lora_merge=True), and cannot continue as one; start a new run from it "
                              f"(--init_from={path}), or run with --lora_merge=False to keep a LoRA run extendable")
    return ckpt


def restore_state(ckpt, **objs):
    """Put what resume_state() saved back into the same, freshly built objects (in place), and the global
    RNG. Plain values the caller reads from the checkpoint itself. A name the checkpoint lacks (one
    written by an older version) is reported and left as built."""
    missing = [name for name in objs if name not in ckpt]
    if missing:
        print(f"resume: the checkpoint has no saved {', '.join(missing)}, left as built")
    for name, obj in objs.items():
        if name not in ckpt:
            continue
        state = ckpt[name]
        if isinstance(obj, torch.Generator):
            obj.set_state(state.cpu())  # a generator's state is a CPU tensor, whatever map_location did
        elif isinstance(obj, random.Random):
            obj.setstate(state)
        elif isinstance(obj, torch.amp.GradScaler):
            if state:  # {}: saved by a disabled scaler (float32 or bf16); this one keeps its fresh scale
                obj.load_state_dict(state)
        else:
            obj.load_state_dict(state)
    if "rng" in ckpt:
        torch.set_rng_state(ckpt["rng"].cpu())
    if dist.world() > 1:  # this rank's own, if the checkpoint came from as many ranks (else rank 0's "rng")
        for key, put in (("rng_ranks", torch.set_rng_state), ("cuda_rng_ranks", torch.cuda.set_rng_state)):
            if len(ckpt.get(key) or ()) == dist.world() and (key == "rng_ranks" or torch.cuda.is_available()):
                put(ckpt[key][dist.rank()].cpu())
    elif "cuda_rng" in ckpt and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in ckpt["cuda_rng"]])


CHECKPOINT_KINDS = {"gpt": "a policy checkpoint (train_sft.py, train_dpo.py, train_grpo.py, train_ppo.py write those)",
                    "scalar": "a reward-model checkpoint (train_rm.py writes those)"}


def load_checkpoint(path, device="cpu", expect=None, what="checkpoint"):
    """-> (model, tokenizer, checkpoint dict): a GPT, or a ScalarModel for reward/value checkpoints.
    weights_only=True: loading a checkpoint cannot run code. `expect` ("gpt" or "scalar") refuses the
    other kind with a message naming `what` (the config key it came from) and both kinds."""
    if not os.path.isfile(path):
        hint = {"out/sft/ckpt.pt": ": run `python train_sft.py` first",
                "out/rm/ckpt.pt": ": run `python train_rm.py` first",
                "out/prm/ckpt.pt": ": run `python train_rm.py --kind=process --out_dir=out/prm --max_steps=1500` first"}
        raise CheckpointError(f"{what}={path}: no such file{hint.get(os.path.normpath(path), '')}")
    ckpt = torch.load(path, map_location=device, weights_only=True)
    kind = ckpt.get("kind", "gpt")
    if expect is not None and kind != expect:
        raise CheckpointError(f"{what}={path} is {CHECKPOINT_KINDS[kind]}; {CHECKPOINT_KINDS[expect]} is expected here")
    model = GPT(GPTConfig(**ckpt["model_config"]))
    if kind == "scalar":
        model = ScalarModel(model, ckpt.get("top_blocks", 0))
    model.load_state_dict(ckpt["model"])
    return model.to(device), get_tokenizer(ckpt["tokenizer"]), ckpt


def check_tokenizers(tok, other, what, other_what):
    """Two models that exchange token ids (a policy and its reward model, critic or reference) must share
    one tokenizer: the same kind and the same number of ids. Otherwise one reads the other's ids as
    different tokens (or indexes past its embedding), silently or with a crash deep inside torch."""
    a, b = (t.spec if isinstance(t.spec, dict) else {"kind": t.spec} for t in (tok, other))
    if a["kind"] != b["kind"] or tok.n_vocab != other.n_vocab:
        raise CheckpointError(f"{other_what} uses the {b['kind']} tokenizer ({other.n_vocab} ids) but {what} uses the "
                              f"{a['kind']} tokenizer ({tok.n_vocab} ids): they must share one tokenizer (train the "
                              f"reward model from the policy's SFT checkpoint, or the policy with the RM's tokenizer)")


GPT2_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def init_model(init_from, tokenizer, model_config, device, expect=None):
    """The model a stage starts from: "scratch" (a new GPT of `model_config`), a nanoalign checkpoint
    (a .pt file), or a GPT-2 directory (config.json + model.safetensors / pytorch_model.bin).
    Returns (model, tokenizer). `tokenizer` "" picks the natural one: byte for scratch, GPT-2's for a
    GPT-2 directory (its own vocab.json + merges.txt when present, else tiktoken's), and a checkpoint's
    own; a checkpoint brings its tokenizer, so another one asked for is refused, not ignored.
    `expect="gpt"` refuses a reward-model checkpoint (a policy stage); otherwise one gives its body. The
    LoRA adapters a checkpoint carries (a run with --lora_merge=False) are merged: they are part of the
    model the stage starts from, and a stage with --lora_rank adds fresh ones on top."""
    if init_from == "scratch":
        tok = get_tokenizer(tokenizer or "byte")
        return GPT(GPTConfig(vocab_size=tok.n_vocab, **model_config)).to(device), tok
    if init_from.endswith(".pt"):
        model, tok, _ = load_checkpoint(init_from, device, expect=expect, what="--init_from")
        if tokenizer and tokenizer.partition(":")[0] != tok.spec["kind"]:
            raise CheckpointError(f"--tokenizer={tokenizer}: the checkpoint --init_from={init_from} brings its own "
                                  f"{tok.spec['kind']} tokenizer; leave --tokenizer out")
        gpt = model.gpt if isinstance(model, ScalarModel) else model  # a reward model: its body
        return (gpt.merge_lora() if gpt.lora_layers() else gpt), tok
    # a GPT-2 directory: check it before anything else (never reach for the network over a local mistake)
    if not os.path.isdir(init_from):
        raise CheckpointError(f"--init_from={init_from}: no such directory (expected 'scratch', a nanoalign .pt "
                              f"checkpoint, or a GPT-2 directory with config.json and model.safetensors)")
    missing = [f for f in ("config.json",) if not os.path.isfile(os.path.join(init_from, f))]
    if not any(os.path.isfile(os.path.join(init_from, f)) for f in GPT2_WEIGHTS):
        missing.append(" or ".join(GPT2_WEIGHTS))
    if missing:
        raise CheckpointError(f"--init_from={init_from}: not a GPT-2 directory, it has no {' and no '.join(missing)}")
    if tokenizer and not tokenizer.startswith("gpt2"):
        raise CheckpointError(f"--tokenizer={tokenizer}: a GPT-2 checkpoint needs GPT-2's tokenizer "
                              f"('gpt2' or 'gpt2:/path/to/files')")
    if not tokenizer:  # the directory's own files, as published, else tiktoken's gpt2
        own = all(os.path.isfile(os.path.join(init_from, f)) for f in ("vocab.json", "merges.txt"))
        tokenizer = f"gpt2:{init_from}" if own else "gpt2"
    tok = get_tokenizer(tokenizer)
    return GPT.from_pretrained(init_from, vocab_size=tok.n_vocab).to(device), tok


def reference_model(policy, init_from, tokenizer, device):
    """The frozen reference of a policy that started from `init_from` (DPO, KTO, PPO, GRPO), in eval mode with
    no gradient: with LoRA, the policy itself with its adapters off (`GPT.frozen_base`: no second copy of the
    weights, and exactly the start, since only the adapters train); else `init_from` loaded again."""
    if policy.lora_layers():
        return policy.frozen_base()
    return init_model(init_from, tokenizer, {}, device)[0].eval().requires_grad_(False)


# ------------------------------------------------------------------------------ logs

def json_safe(obj):
    """obj with every NaN or infinite float replaced by None: JSON has no NaN, and a bare `NaN` in a file
    breaks strict parsers (and every reader that is not Python's)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


class JsonlLogger:
    """One JSON object per line to <out_dir>/metrics.jsonl (NaN and inf written as null). A fresh run starts
    the file anew (a rerun into the same out_dir must not mix two runs); a resumed run (append=True) keeps
    it. Its state is the number of rows: restored from a checkpoint (restore_state), the rows logged after
    that checkpoint, which a killed run went on to write and the resumed run writes again, are dropped.
    Under torchrun rank 0 writes the file; the other ranks only count their rows."""

    def __init__(self, path, append=False):
        self.path, self.rows, self.f = path, 0, None
        if not dist.is_main():
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if append and os.path.exists(path):
            self.load_state_dict({"rows": None})  # keep every complete row (a torn last one goes)
        else:
            self.f = open(path, "w")

    def log(self, **metrics):
        if self.f is not None:  # None on ranks other than 0
            row = json_safe({k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()})
            self.f.write(json.dumps(row, allow_nan=False) + "\n")
            self.f.flush()
        self.rows += 1

    def state_dict(self):
        return {"rows": self.rows}

    def load_state_dict(self, state):
        """Keep the file's first state["rows"] complete rows (None: all), rewritten atomically; append after them."""
        if not dist.is_main():
            self.rows = state["rows"]
            return
        if self.f:
            self.f.close()
        with open(self.path) as f:
            lines = [line for line in f if line.endswith("\n")][:state["rows"]]
        with open(self.path + ".tmp", "w") as f:
            f.writelines(lines)
        os.replace(self.path + ".tmp", self.path)
        self.f, self.rows = open(self.path, "a"), len(lines)


def write_json(path, obj):
    """obj as indented JSON, NaN and inf as null (json_safe; allow_nan=False makes a bare NaN impossible).
    Under torchrun rank 0 writes it."""
    if not dist.is_main():
        return
    with open(path, "w") as f:
        json.dump(json_safe(obj), f, indent=2, allow_nan=False)
