"""
Supervised fine-tuning (SFT): train a GPT to produce the assistant turns of demonstrations.

    python train_sft.py                                  # the built-in task, a ~1M-parameter model, CPU
    python train_sft.py --data=alpaca.json --init_from=gpt2/ --device=cuda --compile=True

The loss is the next-token cross-entropy on the completion only: tokens the chat template marks as
assistant output (each reply and its closing EOS). Prompt tokens are context, never targets.

Implementation details (a reader's checklist):
1. Completion-only loss from the chat template's mask (`loss_mask[:, 1:]` lines up with targets `ids[:, 1:]`).
2. Loss aggregation: the mean over all completion tokens of the optimizer step. Each micro-batch adds
   sum(token NLL) / (completion tokens of the whole step), so gradient accumulation gives exactly the
   gradient of the full batch, however it is split.
3. Right padding, so the model needs no attention mask (causal attention never looks right) and
   padding is simply outside the loss mask.
4. A step's examples depend only on (seed, step): resuming from a checkpoint is exact (`--resume=True`,
   even after kill -9). A NaN or inf loss or gradient norm stops the run before the update, naming the
   step, and a checkpoint with a non-finite tensor is never written: the last good one survives.
5. AdamW (no weight decay on biases/LayerNorm), linear warmup + cosine decay, gradient clipping.
6. AMP: bf16 autocast on GPUs that have it, else fp16 with a GradScaler; float32 on CPU by default.
7. Evaluation samples responses to held-out prompts (split by prompt) and scores them with the
   built-in task's gold scorer; `summary.json` has the start and final scores. At each evaluation a few
   held-out prompts' samples go to `samples.jsonl` (step, prompt, response, ended), for file data too, so
   you can read what the model says (their own generator: the metrics are unchanged).
8. Memory: `--grad_ckpt=True` recomputes each block's activations in the backward (model.py, same
   gradients); `--lora_rank=r` trains LoRA adapters only (a checkpoint keeps them, so a run resumes
   exactly; the final one has them merged into the weights unless --lora_merge=False, and a later stage
   starting from an unmerged one merges them first). `--top_k` / `--top_p` filter the evaluation samples.

Logged metrics (metrics.jsonl, one JSON object per line):
  loss        completion-token cross-entropy of the step (nats/token)
  lr          learning rate of the step;  grad_norm: gradient norm before clipping
  tok_per_s   completion + prompt tokens processed per second
  val_loss    the same cross-entropy on held-out demonstrations
  gold        mean gold score (0..1) of responses sampled at temperature 1 on held-out prompts
  pass        fraction of those responses with the correct final answer
  length      mean response length in tokens;  eos: fraction of responses that ended with EOS
  length_std, distinct_1, distinct_2, entropy   of the same samples (`evals.evaluate_policy`; built-in task)
"""
import json
import os
import time

import torch
from tqdm import tqdm

from nanoalign import data, dist, evals, task
from nanoalign.core import model_logprobs, pad
from nanoalign.losses import sft_loss
from nanoalign.utils import (JsonlLogger, check_resumable, configure, cosine_lr, init_model, load_checkpoint,
                             optimizer_step, restore_state, resume_state, save_checkpoint, setup_device, step_generator,
                             write_json)

# ---- config (override with --key=value or a config file; --help lists them)
out_dir = "out/sft"  # checkpoint, metrics.jsonl and summary.json go here
data_path = "builtin"  # "builtin" (the offline task) or an SFT file (JSON/JSONL: prompt/response or messages)
n_train = 20000  # builtin: number of training demonstrations generated
skills = "solve"  # builtin: what to learn, from task.SKILLS: "solve" (the default data), or e.g. "solve,critique,revise,compare,score"
n_skill = 5000  # builtin: demonstrations per feedback skill (critique, revise, compare, score: task.skill_records)
val_frac = 0.05  # file data: about this fraction of prompts held out for val_loss (split by a hash of the prompt)
on_error = "raise"  # malformed records: "raise" (error naming file:line) or "skip" (counted, reported)
truncate = "skip"  # sequences longer than block_size: "skip" (counted), "raise", or "left" (cut the prompt's start)
init_from = "scratch"  # "scratch", a nanoalign checkpoint (.pt), or a GPT-2 directory (config.json + weights)
tokenizer = ""  # "": byte for scratch, GPT-2's for a GPT-2 dir, a checkpoint's own; or "byte", "gpt2", "gpt2:/path"
n_layer = 4  # scratch model: transformer blocks
n_head = 4  # scratch model: attention heads
n_embd = 128  # scratch model: width
block_size = 128  # scratch model: context length
dropout = 0.0  # scratch model: dropout
batch_size = 32  # sequences per micro-batch
grad_accum = 2  # micro-batches per optimizer step
max_steps = 1500  # optimizer steps (900 sat on the edge of the copy plateau: whether a run left it by then was a matter of float rounding)
lr = 3e-3  # peak learning rate
min_lr = 3e-4  # learning rate at the end of the cosine decay
warmup_steps = 50  # linear warmup steps
lr_decay_steps = 0  # steps of the cosine schedule (0: max_steps)
weight_decay = 0.1  # AdamW weight decay (matrices only)
beta1 = 0.9  # AdamW beta1
beta2 = 0.99  # AdamW beta2
grad_clip = 1.0  # clip the gradient norm to this (0: off)
eval_interval = 300  # steps between evaluations
n_eval = 256  # held-out prompts sampled per evaluation (and for summary.json)
n_samples = 4  # held-out prompts whose sampled responses go to <out_dir>/samples.jsonl at each evaluation
sample_tokens = 128  # samples.jsonl: the longest sampled response, in tokens (within block_size)
top_k = None  # evaluation sampling: keep the top_k most likely tokens (None: all)
top_p = None  # evaluation sampling: nucleus, the smallest set of tokens with this much probability (None: all)
log_interval = 10  # steps between metrics.jsonl lines
ckpt_interval = 300  # steps between checkpoints (one is always written at the end)
resume = False  # continue from <out_dir>/ckpt.pt if it exists (model, optimizer, scaler, step, RNG, log rows)
seed = 1337  # seeds data, initialisation and evaluation sampling
device = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
dtype = "auto"  # "auto", "float32", "bfloat16", "float16"
compile = False  # torch.compile the model for training
grad_ckpt = False  # activation checkpointing: recompute each block's activations in the backward (less memory)
lora_rank = 0  # > 0: train LoRA adapters of this rank on the attention and MLP projections, not the weights
lora_alpha = 16.0  # LoRA scale: the update is (lora_alpha / lora_rank) * B A
lora_merge = True  # LoRA: fold the adapters into the weights of the final checkpoint (a plain GPT)
# ---- end config
config = configure(globals())
os.makedirs(out_dir, exist_ok=True)
torch.manual_seed(seed)
device, autocast, scaler = setup_device(device, dtype)
ckpt_path = os.path.join(out_dir, "ckpt.pt")
resuming = resume and os.path.exists(ckpt_path)

# -------------------------------------------------------------------------- data: records
# parsed before the model is built, so a bad file fails at once (no torch RNG is used here)
if data_path == "builtin":
    solve = task.sft_records(n_train, seed) if "solve" in skills.split(",") else []
    train_convs = data.normalise(solve + task.skill_records(skills, n_skill, seed), "sft", "builtin-train")
    val_convs = data.normalise(task.sft_records(512, seed, split="val"), "sft", "builtin-val")
else:  # split by prompt: conversations that share a prompt are all train or all val
    train_convs, val_convs = data.split_by_prompt(data.load(data_path, "sft", on_error)[0], val_frac, seed, data_path)

# -------------------------------------------------------------------------- model and tokenizer
if resuming:  # a LoRA run's checkpoint brings its adapters back
    model, tok, ckpt = load_checkpoint(ckpt_path, device)
    check_resumable(ckpt, ckpt_path)
else:
    model, tok = init_model(init_from, tokenizer, dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                                                        block_size=block_size, dropout=dropout), device)
    if lora_rank:  # only the adapters train
        model.add_lora(lora_rank, lora_alpha)
model.grad_ckpt = grad_ckpt
print(f"model: {model.num_params() / 1e6:.2f}M parameters, vocab {tok.n_vocab}, context {model.config.block_size}"
      + (f", {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.3f}M in LoRA adapters (trained)"
         if model.lora_layers() else ""))

# -------------------------------------------------------------------------- data: tokens
src = "" if data_path == "builtin" else f"{data_path} "  # names the set in "no usable records" errors
train_set = data.tokenize_sft(tok, train_convs, model.config.block_size, truncate, src + "train")
val_set = data.tokenize_sft(tok, val_convs, model.config.block_size, truncate, src + "val")[:512]
print(f"data: {len(train_set)} train and {len(val_set)} val conversations from {data_path}")
eval_prompts = task.prompts(n_eval, seed, split="val")  # periodic evaluation
test_prompts = task.prompts(n_eval, seed, split="test")  # summary.json
if data_path == "builtin":  # samples.jsonl: what the model says to a few held-out prompts
    sample_prompts = eval_prompts[:n_samples]
else:  # the held-out conversations' prompts (all before the final reply), distinct, with room for an answer
    sample_prompts = {}
    for c in val_convs:
        p = c["messages"][:-1]
        if len(sample_prompts) < n_samples and len(tok.render_prompt(p)) < model.config.block_size:
            sample_prompts.setdefault(json.dumps(p), p)
    sample_prompts = list(sample_prompts.values())


def sample_eval(prompts):
    """task.evaluate's samples and scores (gold, pass, length, eos), plus evals.evaluate_policy's length_std,
    distinct_1/2 and entropy of them (no start policy to compare with: SFT's alignment tax is its val_loss)."""
    samples = evals.policy_samples(model, tok, prompts, seed, gold_fn=task.gold, pass_fn=task.verify, top_k=top_k,
                                   top_p=top_p)
    return evals.evaluate_policy(model, tok, samples, prefix="")


def batch_loss(body, examples, n_target_tokens):
    """SFT loss of some examples: their completion-token NLL summed, / the step's completion tokens."""
    ids, _ = pad([e[0] for e in examples], tok.pad_id)
    loss_mask, _ = pad([e[1] for e in examples], 0)
    ids, loss_mask = ids.to(device), loss_mask.to(device)
    with autocast:  # right padding: no attention mask needed; the LM head runs at completion tokens only
        logps = model_logprobs(model, ids, loss_mask[:, 1:], body=body)  # float32; position t predicts ids[t + 1]
    return sft_loss(logps, loss_mask[:, 1:], n_target_tokens)


@torch.no_grad()
def evaluate(step):
    model.eval()
    total, n = 0.0, sum(sum(m[1:]) for _, m in val_set)
    for i in range(0, len(val_set), batch_size):
        total += batch_loss(train_body, val_set[i:i + batch_size], n).item()
    metrics = {"step": step, "val_loss": total}
    if data_path == "builtin":  # the gold scorer exists for the built-in task only
        metrics.update(sample_eval(eval_prompts))
    g = torch.Generator(device=device).manual_seed(seed)  # its own generator: the metrics above are unchanged
    samples = task.sample_responses(model, tok, sample_prompts, max_new_tokens=sample_tokens, generator=g,
                                    top_k=top_k, top_p=top_p) if sample_prompts else []
    for p, (text, ended, _, _) in zip(sample_prompts, samples):
        one_turn = isinstance(p, str) or len(p) == 1  # a single user turn is shown as its text
        samples_log.log(step=step, prompt=p if isinstance(p, str) else p[0]["content"] if one_turn else p,
                        response=text, ended=ended)
    model.train()
    return metrics


# -------------------------------------------------------------------------- optimizer, resume
optimizer = model.configure_optimizer(weight_decay, lr, (beta1, beta2), "cuda" if "cuda" in device else "cpu")
train_body = torch.compile(model.body) if compile else model.body  # sampling and saving use the uncompiled `model`
decay_steps = lr_decay_steps or max_steps
logger = JsonlLogger(os.path.join(out_dir, "metrics.jsonl"), append=resuming)
samples_log = JsonlLogger(os.path.join(out_dir, "samples.jsonl"), append=resuming)  # step, prompt, response, ended
start_step, start_eval = 0, None
if resuming:  # the model came from the checkpoint above; the rest of the state now
    restore_state(ckpt, optimizer=optimizer, scaler=scaler, logger=logger, samples_log=samples_log)
    start_step, start_eval = ckpt["step"], ckpt["start_eval"]
    print(f"resumed from {ckpt_path} at step {start_step}")


def save(step):
    save_checkpoint(ckpt_path, model, tok, merge_lora=lora_merge and step == max_steps, step=step, config=config,
                    start_eval=start_eval, **resume_state(optimizer=optimizer, scaler=scaler, logger=logger,
                                                          samples_log=samples_log))


# -------------------------------------------------------------------------- training loop
if start_eval is None and data_path == "builtin":
    start_eval = sample_eval(test_prompts)
    print(f"start: held-out gold {start_eval['gold']:.3f}, pass {start_eval['pass']:.3f}")
model.train()
t0, tokens, last_eval = time.time(), 0, None
bar = tqdm(range(start_step, max_steps), initial=start_step, total=max_steps, desc="sft", disable=not dist.is_main())
for step in bar:
    # 1) the step's examples, split into micro-batches; the loss normaliser is the whole step's count
    picks = torch.randint(len(train_set), (batch_size * grad_accum,), generator=step_generator(seed, step)).tolist()
    examples = [train_set[i] for i in picks]
    n_target = sum(sum(m[1:]) for _, m in examples)
    for g in optimizer.param_groups:
        g["lr"] = cosine_lr(step, lr, warmup_steps, decay_steps, min_lr)
    # 2) forward/backward each micro-batch, accumulating gradients (torchrun: each rank its share of each one)
    loss_sum = 0.0
    for micro in range(grad_accum):
        mine = dist.shard(examples[micro * batch_size:(micro + 1) * batch_size], "--batch_size")
        loss = batch_loss(train_body, mine, n_target)
        scaler.scale(loss).backward()
        loss_sum += loss.item()
    loss_sum = dist.all_reduce(loss_sum)  # the step's loss: the ranks' shares added up
    # 3) clip and step
    grad_norm = optimizer_step(model, optimizer, scaler, grad_clip, loss_sum, f"step {step + 1}")  # NaN: stop
    tokens += sum(len(e[0]) for e in examples)
    bar.set_postfix(loss=f"{loss_sum:.3f}")
    done = step + 1
    if done % log_interval == 0 or done == max_steps:
        logger.log(step=done, loss=loss_sum, lr=optimizer.param_groups[0]["lr"], grad_norm=grad_norm,
                   tok_per_s=tokens / (time.time() - t0), elapsed_s=time.time() - t0)
    if done % eval_interval == 0 or done == max_steps:
        metrics = last_eval = evaluate(done)
        logger.log(**metrics)
        bar.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    if done % ckpt_interval == 0 or done == max_steps:
        save(done)

# -------------------------------------------------------------------------- summary
summary = {"steps": max_steps, "elapsed_s": round(time.time() - t0, 1), "checkpoint": ckpt_path,
           "val_loss": (last_eval or evaluate(max_steps))["val_loss"]}
if data_path == "builtin":
    final_eval = sample_eval(test_prompts)
    summary.update({"n_test_prompts": len(test_prompts), "start": start_eval, "final": final_eval})
    print(f"held-out gold: start {start_eval['gold']:.3f} -> final {final_eval['gold']:.3f}; "
          f"pass: {start_eval['pass']:.3f} -> {final_eval['pass']:.3f}")
write_json(os.path.join(out_dir, "summary.json"), summary)
print(f"wrote {ckpt_path} and {os.path.join(out_dir, 'summary.json')}")
