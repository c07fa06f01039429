"""
A recipe for GPT-2 124M on real data, on one 80 GB GPU: every stage's command, in order, each starting from
the checkpoint the one before it wrote.

    GPT-2 -> SFT on Alpaca -> outcome reward model on HH-RLHF -> DPO on HH-RLHF
          -> PPO on HH-RLHF prompts, judged by that reward model -> GRPO on GSM8K

    python -m nanoalign.recipe                       # print the commands (paths as published; see --help)
    python -m nanoalign.recipe --gpt2=models/gpt2 --out=runs/gpt2
    python -m nanoalign.recipe --time_steps=3 --gpt2=random --time_device=cpu --vocab=DIR   # time every stage

`gpt2_recipe()` is the one place the recipe is written: the docs show what this module prints, and
tests/test_recipe.py runs these very commands, in this order, with size overrides appended (a later --key=value
wins), for two steps each on CPU, on a tiny GPT-2 directory and tiny files in each format; so the documented
commands and the tested ones cannot drift apart. The settings are untuned starting points, not measured here.

`--time_steps=N` runs the commands instead, each cut to N optimizer steps at ONE of its micro-batches (time_stage,
TIMING) on files cut to their first time_records records, and prints each stage's seconds per step and peak
resident memory. `--gpt2=random` times GPT-2 124M's shapes with random weights (no download).
"""
import gzip
import json
import os
import shlex
import subprocess
import sys
import threading
import time

import torch

from nanoalign.model import write_safetensors
from nanoalign.utils import configure

# ---- config (override with --key=value; --help lists them)
gpt2 = "gpt2"  # a GPT-2 directory as published: config.json + model.safetensors (+ vocab.json + merges.txt)
alpaca = "alpaca_data.json"  # Stanford Alpaca (a JSON array of instruction/input/output)
hh = "hh-rlhf/helpful-base/train.jsonl.gz"  # Anthropic HH-RLHF (gzipped JSONL of chosen/rejected dialogues)
gsm8k = "gsm8k/train.jsonl"  # GSM8K (JSONL of question/answer "... #### 72")
out = "out/gpt2"  # every stage's out_dir is <out>/<stage>
time_steps = 0  # > 0: run the stages for this many steps each at one micro-batch, print s/step and peak memory
time_records = 256  # time_steps: each data file cut to its first this many records (DPO precomputes over all)
time_device = ""  # time_steps: "" keeps the recipe's CUDA flags; "cpu" runs float32, uncompiled
vocab = ""  # --gpt2=random: a folder of GPT-2's tokenizer files (encoder.json + vocab.bpe; "": tiktoken's own)
# ---- end config

GPU = "--device=cuda --dtype=bfloat16 --compile=True"  # every stage: one CUDA GPU, bf16 autocast, torch.compile


def gpt2_recipe(gpt2=gpt2, alpaca=alpaca, hh=hh, gsm8k=gsm8k, out=out):
    """[(stage, command)] in the order they run. The reward model scores the SFT model's kind of text; the
    policy stages chain (SFT -> DPO -> PPO -> GRPO), each one's start being its reference."""
    return [
        ("sft", f"train_sft.py --init_from={gpt2} --data_path={alpaca} --out_dir={out}/sft "
                "--batch_size=16 --grad_accum=4 --lr=5e-5 --min_lr=5e-6 --warmup_steps=50 --max_steps=1600 "
                f"--eval_interval=200 --ckpt_interval=400 --sample_tokens=256 {GPU}"),
        ("rm", f"train_rm.py --init_from={out}/sft/ckpt.pt --data_path={hh} --on_error=skip --truncate=left "
               f"--out_dir={out}/rm --batch_size=16 --grad_accum=4 --lr=1e-4 --min_lr=1e-5 --warmup_steps=30 "
               f"--max_steps=650 --eval_interval=100 --ckpt_interval=200 {GPU}"),
        ("dpo", f"train_dpo.py --init_from={out}/sft/ckpt.pt --data_path={hh} --on_error=skip --truncate=left "
                f"--out_dir={out}/dpo --beta=0.1 --batch_size=8 --grad_accum=8 --lr=5e-6 --min_lr=5e-7 "
                f"--warmup_steps=150 --max_steps=650 --eval_interval=100 --ckpt_interval=200 --n_eval=256 {GPU}"),
        ("ppo", f"train_ppo.py --init_from={out}/dpo/ckpt.pt --reward_model={out}/rm/ckpt.pt --data_path={hh} "
                f"--on_error=skip --out_dir={out}/ppo --batch_size=64 --minibatches=4 --grad_accum=2 --lr=5e-6 "
                f"--vf_lr=1e-5 --max_new_tokens=128 --max_iters=200 --eval_interval=25 --ckpt_interval=50 "
                f"--n_eval=256 {GPU}"),
        ("grpo", f"train_grpo.py --init_from={out}/ppo/ckpt.pt --data_path={gsm8k} --out_dir={out}/grpo "
                 "--prompts_per_step=16 --group_size=16 --minibatches=4 --grad_accum=4 --lr=2e-6 --warmup_steps=10 "
                 f"--max_new_tokens=256 --max_steps=200 --eval_interval=50 --ckpt_interval=50 --n_eval=256 {GPU}"),
    ]


# --time_steps: each stage at ONE of the recipe's micro-batches (grad_accum=1): SFT 16 conversations, RM 16 pairs,
# DPO 8 pairs; PPO an iteration of 64 / (4 minibatches x 2) = 8 rollouts and its 4 epochs; GRPO one group of 16
# (16 x 16 / (4 x 4)). Evaluations (small) and the checkpoint only at the end; a metrics.jsonl row every step.
TIMING = {"sft": "--n_eval=8 --n_samples=1 --sample_tokens=16", "rm": "--n_eval=16 --n_norm=16",
          "dpo": "--n_eval=4 --n_eval_pairs=8", "ppo": "--batch_size=8 --minibatches=1 --n_eval=4",
          "grpo": "--prompts_per_step=1 --group_size=16 --minibatches=1 --n_eval=2 --eval_k=1"}
GPT2_124M = dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257)


def write_random_gpt2(path, n_embd, n_layer, n_head, n_positions=1024, vocab_size=50257, std=0.02, seed=0):
    """A random GPT-2 in the published layout: config.json + model.safetensors (Conv1D weights [in, out]),
    every tensor N(0, std^2)."""
    C, P, V = n_embd, n_positions, vocab_size
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"vocab_size": V, "n_positions": P, "n_embd": C, "n_layer": n_layer, "n_head": n_head}, f)
    g = torch.Generator().manual_seed(seed)
    shapes = {"wte.weight": (V, C), "wpe.weight": (P, C), "ln_f.weight": (C,), "ln_f.bias": (C,)}
    for i in range(n_layer):
        shapes.update({f"h.{i}.{k}": s for k, s in {
            "ln_1.weight": (C,), "ln_1.bias": (C,), "ln_2.weight": (C,), "ln_2.bias": (C,),
            "attn.c_attn.weight": (C, 3 * C), "attn.c_attn.bias": (3 * C,),
            "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,),
            "mlp.c_fc.weight": (C, 4 * C), "mlp.c_fc.bias": (4 * C,),
            "mlp.c_proj.weight": (4 * C, C), "mlp.c_proj.bias": (C,)}.items()})
    write_safetensors({k: std * torch.randn(s, generator=g) for k, s in shapes.items()},
                      os.path.join(path, "model.safetensors"))


def head_records(src, dst, n):
    """The first n records of a data file (a JSON array, or JSON lines, gzipped or not) written to dst."""
    opener = gzip.open if src.endswith(".gz") else open
    with opener(src, "rt") as f:
        text = f.read()
    if src.endswith(".json") and text.lstrip().startswith("["):
        text = json.dumps(json.loads(text)[:n])
    else:
        text = "".join(line + "\n" for line in text.splitlines()[:n])
    with opener(dst, "wt") as f:
        f.write(text)


def time_stage(command, metrics_path, steps):
    """Run `python <command>` -> (seconds per step, peak resident memory in MB, exit code). Seconds per step:
    between the arrival of the first and the steps-th row of its metrics.jsonl (one row per step), over steps - 1,
    so the first step's warm-up (and compile) is left out; the process's own peak RSS, from wait4."""
    if os.path.exists(metrics_path):
        os.remove(metrics_path)
    t0, arrivals, done = time.time(), [], threading.Event()

    def watch():
        while not done.wait(0.05):
            if os.path.exists(metrics_path):
                with open(metrics_path) as f:
                    n = sum(1 for line in f if line.endswith("\n"))
                arrivals.extend([time.time() - t0] * (n - len(arrivals)))

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    proc = subprocess.Popen([sys.executable, *shlex.split(command)])
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    thread.join()
    per_step = (arrivals[steps - 1] - arrivals[0]) / (steps - 1) if len(arrivals) >= steps > 1 else float("nan")
    return per_step, usage.ru_maxrss / 1024, proc.returncode


def time_stages(stages, steps, device, out):
    """Each stage's command cut to `steps` steps at one micro-batch (TIMING) on `device`, timed. -> [(stage, s/step,
    peak RSS MB)]; a stage that fails stops the timing (the ones after it need its checkpoint)."""
    flags = "--grad_accum=1 --eval_interval=100000 --ckpt_interval=100000 "
    if device:
        flags += f"--device={device}" + (" --dtype=float32 --compile=False" if device == "cpu" else "")
    rows = []
    for stage, command in stages:
        length = f"--max_iters={steps}" if stage == "ppo" else f"--max_steps={steps} --log_interval=1"
        per_step, rss, rc = time_stage(f"{command} {flags} {length} {TIMING[stage]}",
                                       os.path.join(out, stage, "metrics.jsonl"), steps)  # gpt2_recipe's out_dir
        if rc:
            raise SystemExit(f"{stage} failed (exit {rc}); its command: {command}")
        rows.append((stage, per_step, rss))
        print(f"{stage}: {per_step:.1f} s per {'iteration' if stage == 'ppo' else 'step'}, peak RSS {rss / 1024:.2f} GB",
              flush=True)
    return rows


def render(stages, width=110):
    """The commands as a shell block: `python <command>`, long ones continued over lines with ` \\`."""
    blocks = []
    for _, command in stages:
        lines, line = [], "python"
        for word in (shlex.quote(w) for w in shlex.split(command)):
            if len(line) + 1 + len(word) > width - 2:
                lines.append(line)
                line = "    " + word
            else:
                line += " " + word
        blocks.append(" \\\n".join(lines + [line]))
    return "\n".join(blocks)


if __name__ == "__main__":
    configure(globals())
    if not time_steps:
        print(render(gpt2_recipe(gpt2, alpaca, hh, gsm8k, out)))
        raise SystemExit
    if time_steps < 2:
        raise SystemExit(f"error: --time_steps={time_steps}: at least 2 (the first step, with its warm-up, is not timed)")
    missing = [f"--{k}={v}" for k, v in (("alpaca", alpaca), ("hh", hh), ("gsm8k", gsm8k)) if not os.path.isfile(v)]
    if gpt2 != "random" and not (os.path.isfile(gpt2) or os.path.isfile(os.path.join(gpt2, "config.json"))):
        missing.append(f"--gpt2={gpt2} (a GPT-2 directory's config.json, a checkpoint, or random)")
    names = next((n for n in (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"))
                  if all(os.path.isfile(os.path.join(vocab, x)) for x in n)), None) if vocab else None
    if vocab and names is None:
        missing.append(f"--vocab={vocab} (encoder.json + vocab.bpe, or vocab.json + merges.txt)")
    if missing:
        raise SystemExit("error: no such file: " + ", ".join(missing))
    if gpt2 == "random":  # GPT-2 124M's shapes, random weights, GPT-2's tokenizer files beside them if given
        gpt2 = os.path.join(out, "gpt2-random")
        write_random_gpt2(gpt2, **GPT2_124M)
        for src, dst in zip(names or (), ("vocab.json", "merges.txt")):  # the names a GPT-2 directory uses
            with open(os.path.join(vocab, src)) as f, open(os.path.join(gpt2, dst), "w") as g:
                g.write(f.read())
    os.makedirs(os.path.join(out, "data"), exist_ok=True)
    cut = [os.path.join(out, "data", f"{name}-{os.path.basename(path)}")
           for name, path in (("alpaca", alpaca), ("hh", hh), ("gsm8k", gsm8k))]
    for path, short in zip((alpaca, hh, gsm8k), cut):
        head_records(path, short, time_records)
    rows = time_stages(gpt2_recipe(gpt2, *cut, out), time_steps, time_device, out)
    print("| stage | seconds per step (PPO: per iteration) | peak RSS (GB) |\n| --- | ---: | ---: |")
    print("\n".join(f"| {stage} | {t:.1f} | {rss / 1024:.2f} |" for stage, t, rss in rows))
