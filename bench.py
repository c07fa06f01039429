"""
Throughput benchmark: the steps the stages run, built from the functions they use, on a named shape.

    python bench.py                                       # every step, tiny-gpt2vocab, CPU, before and now
    python bench.py --preset=gpt2 --device=cuda --dtype=bfloat16 --compile=True --impl=now
    python bench.py --steps=sft,dpo                       # the ratio now / before is printed per step

Presets (random weights: only the shapes matter):
  tiny-gpt2vocab  GPT-2's architecture with 4 layers, 4 heads, width 128, context 256 and GPT-2's
                  50,257-token vocabulary: 7.26M parameters, most of them the embedding / LM head
  gpt2            GPT-2 124M: 12 layers, 12 heads, width 768, context 1024
Steps (per optimizer step; `--prompt_len`, `--resp_len`, `--batch` change the shapes):
  sft     8 sequences of 32 prompt + 64 response tokens, completion-only loss (losses.sft_loss), AdamW
  dpo     8 pairs (prompt 32, responses 64) in one forward, a live reference, losses.dpo_loss, AdamW
  rm      8 pairs through heads.ScalarModel (2 new blocks on a frozen body), Bradley-Terry, AdamW
  grpo    1 prompt x 8 samples x 64 new tokens (sampling.generate), one clipped-surrogate update
  sample  32 prompts x 64 new tokens at temperature 1 (sampling.generate)
Implementations (`--impl`), so that every machine shows its own gain from the fast paths:
  now     what the stages run: `core.model_logprobs` (the LM head at the scored positions only, chunked,
          recomputed in the backward), the inverse-CDF sampler with the end checked every few steps on a
          GPU (`sampling.generate`), fused AdamW, and GRPO's old log-probs taken from its training forward
  before  the same steps as nanoalign ran them before those fast paths: `core.token_logprobs` on the full
          [B, T, V] logits, `torch.multinomial` with a check of the end at every step, AdamW's loop over the
          parameters, and a separate no-grad pass for GRPO's old log-probs

Each (step, path) runs in its own process, so its peak memory is its own: on CUDA the peak allocated
by torch, on CPU the process's peak resident set (which includes torch itself, ~0.3 GB). Times are the
median of `--iters` steps after `--warmup`. On CUDA it also prints the model FLOPs utilisation: 6 N
FLOPs per trained token and 2 N per token only run forward (N: parameters, LM head included) plus
attention (12 L C T per trained token, 4 L C T forward), against `--peak_tflops` (default: the GPU's
bf16 dense peak where known).
"""
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from nanoalign.core import model_logprobs, gather_last, sequence_logprob, token_logprobs
from nanoalign.heads import ScalarModel
from nanoalign.losses import aggregate, bradley_terry_loss, clipped_surrogate, dpo_loss, group_advantages, sft_loss
from nanoalign.model import GPT, GPTConfig, fused_adamw
from nanoalign import sampling
from nanoalign.utils import configure, setup_device

# ---- config (override with --key=value; --help lists them)
preset = "tiny-gpt2vocab"  # "tiny-gpt2vocab" or "gpt2"
steps = "sft,dpo,rm,grpo,sample"  # which steps to time
impl = "before,now"  # "before", "now", or both (the ratio now / before is printed)
batch = 8  # sequences (sft), pairs (dpo, rm), samples of one prompt (grpo); sample: 4x this many prompts
prompt_len = 32  # prompt tokens
resp_len = 64  # response tokens (sampled: new tokens)
iters = 5  # timed steps (the median is reported)
warmup = 2  # untimed steps first (compile, allocator, caches)
device = "auto"  # "auto", "cpu", "cuda", ...
dtype = "auto"  # "auto", "float32", "bfloat16", "float16"
compile = False  # torch.compile the training model (sampling runs uncompiled)
peak_tflops = 0.0  # the accelerator's peak for MFU (0: look the GPU up)
only = ""  # internal: "step:path" runs one benchmark in this process and prints its JSON
seed = 1337  # seeds the weights and the data
# ---- end config
config = configure(globals())
PRESETS = {"tiny-gpt2vocab": dict(n_layer=4, n_head=4, n_embd=128, block_size=256, vocab_size=50257),
           "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257),
           "test": dict(n_layer=1, n_head=2, n_embd=16, block_size=128, vocab_size=300)}  # the smoke test's
PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "4090": 165e12}
if preset not in PRESETS:
    raise SystemExit(f"unknown preset {preset!r}; one of {sorted(PRESETS)}")


def run_one(step, path):
    """Time one step in this process. -> dict of measurements."""
    dev, autocast, _ = setup_device(device, dtype)
    torch.manual_seed(seed)
    cfg = GPTConfig(**PRESETS[preset])
    V, P, R, B = cfg.vocab_size, prompt_len, resp_len, batch
    g = torch.Generator().manual_seed(seed)
    data = lambda n, t: torch.randint(V - 10, (n, t), generator=g).to(dev)  # token ids (no special ids needed)
    policy = GPT(cfg).to(dev)
    train = torch.compile(policy) if compile else policy
    before = path == "before"
    if before:  # the multinomial draw over [B, V] probabilities (temperature divided even at 1), a sync every step
        sampling.sample_token = lambda logits, u, temperature, top_k, top_p: torch.multinomial(
            sampling.filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1), 1).squeeze(-1)
        sampling.sync_interval = lambda device: 1

    def logps(model, ids, scored, mask=None):  # per-token log-probs of ids[:, 1:] where `scored`
        if before:
            return token_logprobs(model(ids, mask)[:, :-1], ids[:, 1:]) * scored
        return model_logprobs(model, ids, scored, mask)

    def adamw(model, weight_decay):  # the stages' optimizer; before: AdamW's loop over the parameters
        opt = model.configure_optimizer(weight_decay, 1e-4, (0.9, 0.99), dev)
        for group in opt.param_groups:
            group["fused"] = group["fused"] and not before
        return opt

    resp_mask = torch.zeros(B, P + R - 1, dtype=torch.bool, device=dev)
    resp_mask[:, P - 1:] = True  # the targets ids[:, P:] are the response
    trained_tokens = forward_tokens = 0
    if step == "sft":
        ids = data(B, P + R)
        opt = adamw(policy, 0.1)

        def once():
            with autocast:
                loss = sft_loss(logps(train, ids, resp_mask), resp_mask, resp_mask.sum())
            loss.backward()
            opt.step(), opt.zero_grad(set_to_none=True)
        trained_tokens = B * (P + R)
    elif step == "dpo":
        ids = data(2 * B, P + R)  # chosen then rejected, one forward
        m2 = resp_mask.repeat(2, 1)
        ref = GPT(cfg).to(dev).eval().requires_grad_(False)
        opt = adamw(policy, 0.0)

        def once():
            with autocast:
                pol = sequence_logprob(logps(train, ids, m2), m2)
                with torch.no_grad():
                    rf = sequence_logprob(logps(ref, ids, m2), m2)
                loss = dpo_loss(pol[:B], pol[B:], rf[:B], rf[B:], 0.1).mean()
            loss.backward()
            opt.step(), opt.zero_grad(set_to_none=True)
        trained_tokens, forward_tokens = 2 * B * (P + R), 2 * B * (P + R)
    elif step == "rm":
        ids = data(2 * B, P + R)
        rm = ScalarModel(policy, top_blocks=2).to(dev)
        rm.gpt.requires_grad_(False)
        opt = torch.optim.AdamW([p for p in rm.parameters() if p.requires_grad], lr=1e-4,
                                fused=fused_adamw(dev) and not before)
        last = torch.ones_like(ids, dtype=torch.bool)
        train = torch.compile(rm) if compile else rm

        def once():
            with autocast:
                r = gather_last(train(ids), last)
                loss = bradley_terry_loss(r[:B], r[B:]).mean()
            loss.backward()
            opt.step(), opt.zero_grad(set_to_none=True)
        trained_tokens = forward_tokens = 0  # no MFU: the frozen body runs forward, only the new blocks train
    elif step == "grpo":
        prompt = data(1, P)[0].tolist()
        opt = adamw(policy, 0.0)
        gen = torch.Generator(device=dev).manual_seed(seed)

        def once():
            resp, rmask = sampling.generate(policy, [prompt] * B, R, eos_id=V - 1, pad_id=V - 2, generator=gen)
            ids = torch.cat([torch.tensor([prompt] * B, device=dev), resp], 1)
            scored = torch.cat([torch.zeros(B, P - 1, dtype=torch.bool, device=dev), rmask], 1)
            adv = group_advantages(torch.rand(1, B, generator=g).to(dev)).reshape(-1, 1)
            with autocast:
                if before:  # a separate no-grad pass for the old log-probs
                    with torch.no_grad():
                        old = logps(policy, ids, scored)[:, P - 1:]
                lp = logps(train, ids, scored)[:, P - 1:]
                loss = aggregate(clipped_surrogate(lp, old if before else lp.detach(), adv)[0], rmask, "seq_mean")
            loss.backward()
            opt.step(), opt.zero_grad(set_to_none=True)
        trained_tokens, forward_tokens = B * (P + R), B * R  # the update; the sampled tokens (KV cache)
    elif step == "sample":
        prompts = data(4 * B, P).tolist()
        gen = torch.Generator(device=dev).manual_seed(seed)

        def once():
            sampling.generate(policy, prompts, R, eos_id=V - 1, pad_id=V - 2, generator=gen)
        forward_tokens = 4 * B * R
    else:
        raise SystemExit(f"unknown step {step!r}")

    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        once()
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        sync()
        t = time.perf_counter()
        once()
        sync()
        times.append(time.perf_counter() - t)
    sec = statistics.median(times)
    n_params = sum(p.numel() for p in policy.parameters())
    out = {"step": step, "path": path, "s_per_step": sec, "steps_per_s": 1 / sec,
           "tok_per_s": (4 * B * R if step == "sample" else B * R if step == "grpo" else
                         (2 if step in ("dpo", "rm") else 1) * B * (P + R)) / sec,
           "peak_mb": (torch.cuda.max_memory_allocated() if dev.startswith("cuda") else
                       resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 20}
    if dev.startswith("cuda"):
        L, C, T = cfg.n_layer, cfg.n_embd, P + R
        flops = trained_tokens * (6 * n_params + 12 * L * C * T) + forward_tokens * (2 * n_params + 4 * L * C * T)
        peak = peak_tflops * 1e12 or next((v for k, v in PEAKS.items() if k in torch.cuda.get_device_name()), 0)
        out["mfu"] = flops / sec / peak if peak and flops else None
    return out


if only:
    step, path = only.split(":")
    print("RESULT " + json.dumps(run_one(step, path)))
    sys.exit(0)

paths = [p for p in impl.split(",") if p]
print(f"preset {preset} ({PRESETS[preset]}), device {device}, dtype {dtype}, compile {compile}; median of {iters}")
print(f"| step | implementation | s/step | steps/s | tokens/s | peak MB | MFU | vs {paths[0]} |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
results = []
for step in [s for s in steps.split(",") if s]:
    base = None
    for path in paths:
        args = [a for a in sys.argv[1:] if not a.startswith(("--only=", "--steps=", "--impl="))]
        r = subprocess.run([sys.executable, os.path.abspath(__file__), *args, f"--only={step}:{path}"],
                           capture_output=True, text=True)
        line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{step}:{path} failed:\n{r.stderr[-3000:]}")
        res = json.loads(line[7:])
        results.append(res)
        base = base or res
        mfu = f"{100 * res['mfu']:.1f}%" if res.get("mfu") else "-"
        ratio = f"{res['steps_per_s'] / base['steps_per_s']:.2f}x" if res is not base else ""
        print(f"| {step} | {path} | {res['s_per_step']:.3f} | "
              f"{res['steps_per_s']:.2f} | {res['tok_per_s']:.0f} | {res['peak_mb']:.0f} | {mfu} | {ratio} |", flush=True)
