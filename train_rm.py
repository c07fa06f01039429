"""
Reward models: an outcome reward model (Bradley-Terry on preference pairs) or a process reward model
(per-step correctness), both a GPT body with a scalar head, measured against the gold scorer.

    python train_rm.py                                   # outcome RM from out/sft/ckpt.pt, built-in pairs
    python train_rm.py --kind=process --out_dir=out/prm --max_steps=1500  # process RM, the task's step labels
    python train_rm.py --data_path=hh.jsonl.gz --init_from=gpt2/ --device=cuda

Implementation details:
1. The RM is the SFT model's body plus a linear head (zero-initialised: the first loss is log 2), by
   default with two new transformer blocks in between that also read each token's log-prob (detail 7;
   `--top_blocks=0`: the head on the body, which trains the body too).
2. Outcome: chosen and rejected sequences go through ONE forward (stacked on the batch axis), and each
   reward is read at the sequence's last real token, the EOS (`core.gather_last`, mask from lengths).
3. Loss: -log sigmoid(r_c - r_r - margin) + center_coef * (r_c + r_r)^2, the mean over pairs.
   `margin` is a constant, or per pair from a "margin" field in the data. A pair with a "p_chosen" field
   (a soft label, e.g. an AI judge's probability; constitutional.py --mode=rl writes them) trains towards
   that probability: p * BT(r_c, r_r) + (1 - p) * BT(r_r, r_c) (feedback.soft_bradley_terry_loss).
4. Process: the scalar at the last token of each step (its result, just before the ";" separator) is
   the logit of "this step is correct"; binary cross-entropy against the task's step checker, the
   mean over all steps of the batch. (`rewards.step_tokens` says why not at the separator itself.)
5. Evaluation on held-out pairs: accuracy against their (noisy) labels and against the gold scorer on
   pairs whose gold scores differ. The process RM ranks a response by its weakest step.
6. Normalisation (outcome RM): after training, rewards of the SFT policy's own samples on training
   prompts (the first n_norm that leave room in the context for a sample) are standardised, reward =
   gain * raw + bias with mean 0 and std 1; gain and bias are saved in the checkpoint, so PPO reads
   rewards on a known scale.
7. `--top_blocks=k` puts k new transformer blocks between the body and the head and freezes the body
   (`heads.ScalarModel`). Besides the body's hidden states, the blocks read each token's log-prob under
   the body's own LM head, log p(x_t | x_<t), added as that number times a learned vector. The body
   knows how likely each written token is only through its LM head; a head on its hidden states has to
   learn that from the outcome labels first, which on the built-in task takes thousands of steps
   (README). With it, the new blocks only have to learn how to weigh and gather the log-probs.
8. Checkpoints every ckpt_interval steps (un-normalised) and at the end (normalised); `--resume=True`
   continues exactly from <out_dir>/ckpt.pt (pin the schedule with lr_decay_steps to extend a run). A
   NaN or inf loss or gradient norm stops the run naming the step; no checkpoint with NaN is written.
9. A step is batch_size x grad_accum examples; each micro-batch's loss is its mean times its share of the
   step (pairs, or steps for the process RM), so the gradients add up to the whole step's mean.
   `--grad_ckpt=True` recomputes the body's block activations in the backward (same gradients; it saves
   memory only where the body trains: top_blocks=0 or LoRA). `--lora_rank=r`: the body trains through
   LoRA adapters (the head and new blocks fully); the final checkpoint has them merged (--lora_merge).

Logged metrics (metrics.jsonl):
  loss, lr, grad_norm       training loss of the step, learning rate, gradient norm before clipping
  acc, margin               (outcome) fraction of pairs with r_c > r_r in the batch, mean r_c - r_r
  step_acc                  (process) fraction of steps classified correctly in the batch
  eval/acc_labels           held-out: fraction of pairs ranked as their label says
  eval/acc_gold             held-out: fraction of non-tied pairs ranked as the gold scorer does
  eval/chosen_mean, eval/chosen_std, eval/rejected_mean, eval/rejected_std, eval/margin
                            held-out reward statistics (outcome)
  eval/step_acc             held-out step classification accuracy (process)
summary.json also has `baseline`: loglik/acc_labels, loglik/acc_gold, the same pair accuracies with no
training at all, the initial model's own log-likelihood of each response (sum over its tokens) as the
judge. What a trained reward model must beat.
"""
import itertools
import os
import random
import time

import torch
from tqdm import tqdm

from nanoalign import data, dist, task
from nanoalign.core import gather_last, pad
from nanoalign.feedback import soft_bradley_terry_loss
from nanoalign.heads import ScalarModel
from nanoalign.losses import bradley_terry_loss, process_reward_loss
from nanoalign.model import fused_adamw
from nanoalign.rewards import (implicit_rewards, outcome_scores, pair_accuracy, process_score, response_tokens,
                               step_scores, step_tokens)
from nanoalign.utils import (JsonlLogger, configure, cosine_lr, init_model, load_checkpoint, optimizer_step,
                             restore_state, resume_checkpoint, resume_state, save_checkpoint, setup_device,
                             step_generator, write_json)

# ---- config (override with --key=value or a config file; --help lists them)
out_dir = "out/rm"  # checkpoint, metrics.jsonl and summary.json go here
kind = "outcome"  # "outcome" (Bradley-Terry on pairs) or "process" (per-step correctness, built-in task only)
init_from = "out/sft/ckpt.pt"  # the SFT checkpoint (.pt) or a GPT-2 directory the RM starts from
tokenizer = ""  # "": a checkpoint's own, GPT-2's for a GPT-2 dir (its vocab.json + merges.txt if there); "gpt2:/path"
data_path = "builtin"  # "builtin", or a preference file (prompt/chosen/rejected, or raw HH-RLHF) JSON/JSONL(.gz)
n_train = 20000  # builtin: training pairs (outcome) or step-labelled responses (process)
n_eval = 1000  # held-out pairs evaluated (builtin: test-split prompts; file: the val split)
val_frac = 0.05  # file data: about this fraction of prompts held out (split by a hash of the prompt)
on_error = "raise"  # malformed records: "raise" (error naming file:line) or "skip" (counted, reported)
truncate = "skip"  # sequences longer than block_size: "skip" (counted), "raise", or "left" (cut the prompt's start)
margin = 0.0  # Bradley-Terry margin for pairs that carry no "margin" field
center_coef = 0.0  # reward centering: + center_coef * mean((r_c + r_r)^2)
top_blocks = 2  # new blocks between the (then frozen) body and the head, fed log p(token) (detail 7)
batch_size = 32  # pairs (outcome) or responses (process) per micro-batch
grad_accum = 1  # micro-batches per optimizer step (a step: batch_size x grad_accum)
max_steps = 600  # optimizer steps
lr = 1e-3  # peak learning rate
min_lr = 1e-4  # learning rate at the end of the cosine decay
warmup_steps = 30  # linear warmup steps
lr_decay_steps = 0  # steps of the cosine schedule (0: max_steps)
weight_decay = 0.1  # AdamW weight decay (matrices only)
grad_clip = 1.0  # clip the gradient norm to this (0: off)
eval_interval = 200  # steps between evaluations
log_interval = 10  # steps between metrics.jsonl lines
ckpt_interval = 200  # steps between checkpoints (one is always written at the end, after the normalisation)
resume = False  # continue from <out_dir>/ckpt.pt if it exists (model, optimizer, scaler, step, RNG, log rows)
normalize = True  # outcome: standardise rewards on the policy's own samples after training
policy = ""  # the policy whose samples set the normalisation ("": init_from, if it is a checkpoint)
n_norm = 512  # samples used for the normalisation
seed = 1337  # seeds data and sampling
device = "auto"  # "auto", "cpu", "cuda", ...
dtype = "auto"  # "auto", "float32", "bfloat16", "float16"
compile = False  # torch.compile the model for training
grad_ckpt = False  # activation checkpointing: recompute the body's block activations in the backward (less memory)
lora_rank = 0  # > 0: the body trains through LoRA adapters of this rank (the head and new blocks train fully)
lora_alpha = 16.0  # LoRA scale: the update is (lora_alpha / lora_rank) * B A
lora_merge = True  # LoRA: fold the adapters into the weights of the final checkpoint
# ---- end config
config = configure(globals())
assert kind in ("outcome", "process"), kind
if kind == "process" and data_path != "builtin":
    raise SystemExit("the process reward model needs step labels: it trains on the built-in task only")
os.makedirs(out_dir, exist_ok=True)
torch.manual_seed(seed)
device, autocast, scaler = setup_device(device, dtype)
user = lambda text: [{"role": "user", "content": text}]  # a built-in prompt as a conversation

# -------------------------------------------------------------------------- data: records
# parsed before the model is built, so a bad file fails at once (no torch RNG is used here)
if data_path == "builtin":
    train_records = data.normalise(task.preference_records(n_train, seed), "preference", "builtin-train") \
        if kind == "outcome" else None
    eval_pairs = data.normalise(task.preference_records(n_eval, seed, split="test"), "preference", "builtin-test")
else:  # split by prompt: pairs that share a prompt are all train or all held out
    train_records, eval_pairs = data.split_by_prompt(data.load(data_path, "preference", on_error)[0], val_frac, seed,
                                                     data_path)
    eval_pairs = eval_pairs[:n_eval]

# -------------------------------------------------------------------------- model
gpt, tok = init_model(init_from, tokenizer, {}, device)
rm = ScalarModel(gpt, top_blocks).to(device)
if lora_rank:  # the body's adapters train, not its weights (the head and any new blocks are new: they train)
    gpt.add_lora(lora_rank, lora_alpha)
elif top_blocks:  # the body is frozen (and needs no backward pass); the new blocks and the head learn
    rm.gpt.requires_grad_(False)
gpt.grad_ckpt = grad_ckpt
policy_path = policy or (init_from if init_from.endswith(".pt") else "")  # whose samples set the normalisation
if kind == "outcome" and normalize and policy_path and \
        torch.load(policy_path, map_location="cpu", weights_only=True).get("kind") == "scalar":
    raise SystemExit(f"{policy_path} is a reward model and cannot sample: pass --policy=<the SFT checkpoint> "
                     "for the normalisation (or --normalize=False)")
block = gpt.config.block_size
n_train_params = sum(p.numel() for p in rm.parameters() if p.requires_grad)
print(f"{kind} reward model from {init_from}: {gpt.num_params() / 1e6:.2f}M-parameter body, {top_blocks} new blocks, "
      f"{n_train_params / 1e6:.2f}M parameters trained")

# -------------------------------------------------------------------------- data: tokens
if kind == "outcome":
    skips, train_set = data.Skips("skip"), []
    for r in train_records:  # (chosen ids, rejected ids, margin); both must fit the context (skips count pairs)
        pair = data.fit_all([response_tokens(tok, r["prompt"], r[k]) for k in ("chosen", "rejected")], block,
                            truncate, r.where, skips)
        if pair:
            train_set.append((pair[0][0], pair[1][0], float(r.get("margin", margin)), r.get("p_chosen", 1.0)))
    skips.report("train pairs")
    data.require(train_set, f"{data_path} (train pairs)", len(train_records), skips)
else:  # process: demonstrator samples (at twice the slip rate) with the step checker's labels
    rng, train_set = random.Random(f"prm-{seed}"), []
    for _ in range(n_train):
        p = task.sample_prompt(rng, "train")
        r = task.demonstrate(p, rng, 2 * task.P_ERR)
        ids, pos = step_tokens(tok, user(p), r)
        train_set.append((ids, pos, task.step_labels(p, r)))
print(f"data: {len(train_set)} training examples, {len(eval_pairs)} held-out pairs")
norm_prompts = []  # training prompts whose policy samples set the normalisation (detail 6); checked before training
if kind == "outcome" and normalize and policy_path:
    pool = (user(p) for p in task.prompts(n_norm, seed, split="train")) if data_path == "builtin" else \
        (r["prompt"] for r in train_records)
    fits = (p for p in pool if len(tok.render_prompt(p)) + task.MAX_NEW_TOKENS <= block)  # room to sample
    norm_prompts = list(itertools.islice(fits, n_norm))
    if not norm_prompts:
        raise SystemExit(f"no training prompt leaves room for a {task.MAX_NEW_TOKENS}-token sample in block_size "
                         f"{block}, so there is nothing to normalise on: pass --normalize=False")


def prompt_text(pair):  # the built-in task's prompt string (gold needs it)
    return pair["prompt"][-1]["content"]


def judge(prompts, responses):
    """The trained model's score of each response (outcome reward, or the process RM's weakest step)."""
    if kind == "outcome":
        return outcome_scores(rm, tok, prompts, responses)
    return torch.tensor([process_score(s) for s in step_scores(rm, tok, prompts, responses)])


eval_prompts = [p["prompt"] for p in eval_pairs]
eval_gold = ()  # gold scores of the held-out pairs, (chosen, rejected): built-in task only
if data_path == "builtin":
    eval_gold = tuple(torch.tensor([task.gold(prompt_text(p), p[k]) for p in eval_pairs])
                      for k in ("chosen", "rejected"))


def accuracies(r_c, r_r, prefix="eval/"):
    """acc_labels and (built-in task) acc_gold of a judge's scores of the held-out pairs (rewards.pair_accuracy)."""
    labels, gold = pair_accuracy(r_c, r_r, *eval_gold)
    return {prefix + "acc_labels": labels, **({prefix + "acc_gold": gold} if eval_gold else {})}


@torch.no_grad()
def evaluate():
    rm.eval()
    r_c = judge(eval_prompts, [p["chosen"] for p in eval_pairs])
    r_r = judge(eval_prompts, [p["rejected"] for p in eval_pairs])
    metrics = accuracies(r_c, r_r)
    if kind == "outcome":
        metrics.update({"eval/margin": (r_c - r_r).mean().item(), "eval/chosen_mean": r_c.mean().item(),
                        "eval/chosen_std": r_c.std().item(), "eval/rejected_mean": r_r.mean().item(),
                        "eval/rejected_std": r_r.std().item()})
    if data_path == "builtin":
        g_c, g_r = eval_gold
        metrics["eval/label_gold_agreement"] = ((g_c > g_r)[g_c != g_r]).float().mean().item()  # labels' ceiling
        if kind == "process":
            rng = random.Random(f"prm-eval-{seed}")
            ps = [task.sample_prompt(rng, "test") for _ in range(300)]
            rs = [task.demonstrate(p, rng, 2 * task.P_ERR) for p in ps]
            probs = step_scores(rm, tok, [user(p) for p in ps], rs)
            hits = [((pr > 0.5) == torch.tensor(task.step_labels(p, r))).float() for p, r, pr in zip(ps, rs, probs)]
            metrics["eval/step_acc"] = torch.cat(hits).mean().item()
    rm.train()
    return metrics


def loss_on(batch, n_total):
    """The loss and batch metrics of some training examples, as their share of a step of n_total pairs (outcome)
    or steps (process): the batch's mean times its count / n_total, so that a step's micro-batches add up to the
    mean over the whole step, however it is split (with one micro-batch the share is exactly 1)."""
    if kind == "outcome":
        B = len(batch)
        ids, mask = pad([b[0] for b in batch] + [b[1] for b in batch], tok.pad_id)  # chosen then rejected
        ids, mask = ids.to(device), mask.to(device)
        with autocast:
            r = gather_last(train_rm(ids), mask)  # right padding: no attention mask; read at the EOS
        r_c, r_r = r[:B], r[B:]
        m = torch.tensor([b[2] for b in batch], device=device)
        p = torch.tensor([b[3] for b in batch], device=device)
        loss = bradley_terry_loss(r_c, r_r, m, center_coef) if bool((p == 1).all()) else \
            soft_bradley_terry_loss(r_c, r_r, p, m, center_coef)  # soft labels: a "p_chosen" field (detail 3)
        w = B / n_total
        return loss.mean() * w, {"acc": (r_c > r_r).float().mean().item() * w, "margin": (r_c - r_r).mean().item() * w}
    ids, _ = pad([b[0] for b in batch], tok.pad_id)
    S = max(len(b[1]) for b in batch)
    pos, step_mask = pad([b[1] for b in batch], 0, T=S)
    labels, _ = pad([[int(x) for x in b[2]] for b in batch], 0, T=S)
    with autocast:
        logits = train_rm(ids.to(device))  # right padding: no mask needed
    step_logits = logits.gather(1, pos.to(device))
    labels, step_mask = labels.to(device), step_mask.to(device)
    loss = process_reward_loss(step_logits, labels, step_mask)
    hit = ((step_logits > 0) == labels.bool()).float()
    w = sum(len(b[1]) for b in batch) / max(1, n_total)  # this batch's steps / the step's
    return loss * w, {"step_acc": ((hit * step_mask).sum() / step_mask.sum()).item() * w}


# -------------------------------------------------------------------------- training loop
params = [p for n, p in rm.named_parameters() if p.requires_grad and not n.startswith("head.")]
optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                               {"params": [p for p in params if p.dim() < 2] + list(rm.head.parameters()),
                                "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.99), fused=fused_adamw(device))
train_rm = torch.compile(rm) if compile else rm
ckpt_path = os.path.join(out_dir, "ckpt.pt")
ckpt = resume_checkpoint(ckpt_path, resume, device)
logger = JsonlLogger(os.path.join(out_dir, "metrics.jsonl"), append=ckpt is not None)
start_step, metrics = 0, None
if ckpt:  # weights, optimizer, RNG and log as they were; the scores before training were saved with them
    restore_state(ckpt, model=rm, optimizer=optimizer, scaler=scaler, logger=logger)
    rm.gain.fill_(1.0), rm.bias.fill_(0.0)  # training is un-normalised (a final checkpoint's is set again below)
    start_step, start, baseline, metrics = ckpt["step"], ckpt["start"], ckpt["baseline"], ckpt["last_eval"]
    print(f"resumed from {ckpt_path} at step {start_step}")
else:
    start = evaluate()
    rm.eval()  # a baseline with no training: the initial model's own log-likelihood of each response as the judge
    baseline = accuracies(*(implicit_rewards(gpt, None, tok, eval_prompts, [p[k] for p in eval_pairs])
                            for k in ("chosen", "rejected")), prefix="loglik/")
    print("start: " + " ".join(f"{k} {v:.3f}" for k, v in start.items()))
    print("baseline (the initial model's log-likelihood as the judge): "
          + " ".join(f"{k} {v:.3f}" for k, v in baseline.items()))


def save(step):
    save_checkpoint(ckpt_path, rm, tok, merge_lora=lora_merge and step == max_steps, step=step, config=config,
                    rm_kind=kind, start=start, baseline=baseline,
                    last_eval=metrics, **resume_state(optimizer=optimizer, scaler=scaler, logger=logger))


t0 = time.time()
rm.train()
bar = tqdm(range(start_step, max_steps), initial=start_step, total=max_steps, desc=f"rm-{kind}", disable=not dist.is_main())
for step in bar:
    picks = torch.randint(len(train_set), (batch_size * grad_accum,), generator=step_generator(seed, step)).tolist()
    examples = [train_set[i] for i in picks]
    n_total = len(examples) if kind == "outcome" else sum(len(b[1]) for b in examples)  # the loss's normaliser
    for g in optimizer.param_groups:
        g["lr"] = cosine_lr(step, lr, warmup_steps, lr_decay_steps or max_steps, min_lr)
    loss, stats = 0.0, {}
    for i in range(0, len(examples), batch_size):  # micro-batches: their gradients add up to the step's
        part, part_stats = loss_on(dist.shard(examples[i:i + batch_size], "--batch_size"), n_total)  # rank's share
        scaler.scale(part).backward()
        loss += part.item()
        stats = {k: stats.get(k, 0.0) + v for k, v in part_stats.items()}
    loss, stats = dist.all_reduce(loss), dist.all_reduce(stats)  # the ranks' shares added up
    grad_norm = optimizer_step(rm, optimizer, scaler, grad_clip, loss, f"step {step + 1}")  # NaN: stop
    bar.set_postfix(loss=f"{loss:.3f}", **{k: f"{v:.2f}" for k, v in stats.items()})
    done = step + 1
    if done % log_interval == 0:
        logger.log(step=done, loss=loss, lr=optimizer.param_groups[0]["lr"], grad_norm=grad_norm, **stats)
    if done % eval_interval == 0 or done == max_steps:
        metrics = evaluate()
        logger.log(step=done, **metrics)
        bar.write(f"step {done} " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    if done % ckpt_interval == 0 and done < max_steps:  # the last one is written after the normalisation
        save(done)
final = metrics

# -------------------------------------------------------------------------- normalisation
norm = {}
if kind == "outcome" and normalize:
    if policy_path:
        pol, ptok, _ = load_checkpoint(policy_path, device)
        prompts = norm_prompts
        samples = task.sample_responses(pol, ptok, prompts, generator=torch.Generator(device=device).manual_seed(seed))
        rm.eval()
        raw = outcome_scores(rm, tok, prompts, [s[0] for s in samples])
        rm.set_normalisation(raw)
        normed = outcome_scores(rm, tok, prompts, [s[0] for s in samples])
        norm = {"gain": rm.gain.item(), "bias": rm.bias.item(), "policy": policy_path, "n": len(prompts),
                "mean_after": normed.mean().item(), "std_after": normed.std(unbiased=False).item()}
        print(f"normalised on {len(prompts)} samples of {policy_path}: gain {norm['gain']:.4f}, bias {norm['bias']:.4f}")

save(max_steps)
summary = {"kind": kind, "steps": max_steps, "elapsed_s": round(time.time() - t0, 1), "checkpoint": ckpt_path,
           "n_eval_pairs": len(eval_pairs), "start": start, "final": final, "baseline": baseline,
           "normalization": norm}
write_json(os.path.join(out_dir, "summary.json"), summary)
msg = f"held-out pairs: accuracy vs labels {final['eval/acc_labels']:.3f}"
if "eval/acc_gold" in final:
    msg += f", vs gold {final['eval/acc_gold']:.3f} (the labels themselves agree with gold on " \
           f"{final['eval/label_gold_agreement']:.3f} of non-tied pairs)"
print(msg + f"\nwrote {ckpt_path} and {os.path.join(out_dir, 'summary.json')}")
