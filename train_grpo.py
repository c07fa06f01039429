"""
GRPO and its family: policy optimisation with verifiable rewards and group baselines, no critic.

    python train_grpo.py                                   # GRPO on the built-in task from out/sft/ckpt.pt
    python train_grpo.py --scale=none --agg=constant       # Dr. GRPO
    python train_grpo.py --eps_high=0.28 --agg=token_mean --dynamic_sampling=True   # DAPO
    python train_grpo.py --baseline=loo --scale=none       # RLOO
    python train_grpo.py --data_path=gsm8k/train.jsonl --init_from=gpt2-sft.pt --device=cuda

Each step: sample a group of G responses for each of P prompts with the KV-cache sampler, score each
with the reward functions, turn rewards into advantages within each group, and take mu gradient
steps on the clipped surrogate against the sampling policy (optionally plus beta * KL to a frozen
reference). The loss hovers near zero by construction (advantages are centred within each group):
watch the reward and the held-out pass rate, not the loss.

Implementation details:
1. Rollouts: `sampling.generate` with per-row EOS; the response mask includes the sampled EOS and
   excludes the padding after it. A response that hits max_new_tokens without EOS is "truncated".
2. Log-probs (old, new, reference) are float32 and at the sampling temperature, for the response
   tokens only, from one forward over [left-padded prompt | response] with the padding masked. With
   --top_k / --top_p the samples are drawn from the filtered distribution but their log-probs are those
   of the full softmax (as TRL does): the reference's filtered set need not hold the sampled token (its
   KL would be infinite), and the ratio to the old policy is the same kind of number either way.
3. Advantages (`losses.group_advantages`): baseline "mean" (GRPO) or leave-one-out "loo" (RLOO);
   scale by the group std (GRPO), the batch std, or not at all (Dr. GRPO, RLOO).
4. The clipped ratio against the old (sampling) policy, with eps_low / eps_high (DAPO's clip-higher).
   With mu = 1 the ratio is exactly 1 and the gradient is REINFORCE with a group baseline; with one
   minibatch too, the old log-probs are the training forward's own, detached (no separate pass).
5. KL: beta * k3 per token to the frozen reference, inside the loss (GRPO). beta = 0 never loads it.
6. Aggregation over tokens (`losses.aggregate`): per-sequence mean then mean (GRPO), token mean over
   the batch (DAPO), or a constant normaliser batch x max_new_tokens (Dr. GRPO).
7. Groups whose rewards are all equal have zero advantage: counted, and with dynamic_sampling=True
   dropped from the update (DAPO; we drop, we do not resample to refill the batch).
8. Checkpoints every ckpt_interval steps and at the end; `--resume=True` continues exactly from
   <out_dir>/ckpt.pt (with the sampling generator and the prompt RNG). A NaN or inf loss or gradient
   norm stops the run naming the step; no checkpoint with NaN is written.
9. The training basics (as in train_sft.py): `--init_from` a nanoalign checkpoint or a GPT-2 directory
   (with `--tokenizer`), the reference loaded from the same place. `--grad_accum=n` splits each minibatch
   into n micro-batches, each aggregated as its share of the minibatch's sequences (seq_mean, constant)
   or real tokens (token_mean): one optimizer step per minibatch, the same gradient. `--compile` compiles
   the training forward only; `--grad_ckpt` checkpoints the blocks' activations. `--lora_rank=r` trains
   adapters only, and the reference (beta > 0) is the policy with its adapters off: no second copy.

Logged metrics (metrics.jsonl):
  reward, reward_std          mean and std of the rollouts' total reward
  zero_std_frac               fraction of groups whose rewards are all equal (no signal)
  len_mean, len_max, trunc    response length (tokens) and fraction without EOS
  entropy                     mean per-token entropy of the policy on its rollouts
  kl                          mean per-token k3 KL to the reference (beta > 0)
  clip_low, clip_high         fraction of tokens where the lower / upper clip is active
  grad_norm, loss             gradient norm before clipping, the surrogate loss
  eval/pass@1, eval/pass@k    held-out: mean pass rate of k samples per prompt, and the unbiased
                              pass@k estimate (Chen et al. 2021); eval/gold: mean gold score
  eval/...                    and on the same samples `evals.evaluate_policy`'s: win_rate (gold, built-in: against
                              the start policy's sample of the same prompt), kl (k1, to the reference), length,
                              length_std, distinct_1/2, entropy, eos, demo_nll (built-in: SFT's held-out
                              demonstrations, the alignment tax)
"""
import os
import random
import time

import torch
from tqdm import tqdm

from nanoalign import data, dist, evals, task
from nanoalign.core import model_logprobs, pad, response_positions
from nanoalign.losses import aggregate, clipped_surrogate, group_advantages, k3_kl
from nanoalign.rewards import answer_reward, pass_at_k
from nanoalign.sampling import generate
from nanoalign.utils import (JsonlLogger, configure, init_model, optimizer_step, reference_model, restore_state,
                             resume_checkpoint, resume_state, save_checkpoint, setup_device, write_json)

# ---- config (override with --key=value or a config file; --help lists them)
out_dir = "out/grpo"  # checkpoint, metrics.jsonl and summary.json go here
init_from = "out/sft/ckpt.pt"  # the policy to start from (and the reference): a nanoalign .pt or a GPT-2 directory
tokenizer = ""  # "": a checkpoint's own, GPT-2's for a GPT-2 dir (its vocab.json + merges.txt if there); "gpt2:/path"
data_path = "builtin"  # "builtin" (the offline task) or a problem file (GSM8K question/answer JSONL)
on_error = "raise"  # malformed records: "raise" (error naming file:line) or "skip" (counted, reported)
truncate = "skip"  # prompts that leave no room for max_new_tokens: "skip" (counted) or "raise" (never cut)
rewards = "verify:1.0"  # name:weight,...; verify (builtin: the task's checker; a file: its answer checker, alias answer), format (builtin)
prompts_per_step = 16  # P: prompts per step
group_size = 8  # G: responses sampled per prompt
max_steps = 120  # rollout steps
mu = 1  # gradient steps per batch of rollouts (1: on-policy)
minibatches = 1  # minibatches per gradient pass over the rollouts
grad_accum = 1  # micro-batches per minibatch (one optimizer step each minibatch, whatever the split)
baseline = "mean"  # "mean" (GRPO, Dr. GRPO) or "loo" (RLOO)
scale = "group"  # "group" (GRPO), "batch", or "none" (Dr. GRPO, RLOO)
agg = "seq_mean"  # "seq_mean" (GRPO), "token_mean" (DAPO), or "constant" (Dr. GRPO)
eps_low = 0.2  # lower clip: ratio >= 1 - eps_low
eps_high = 0.2  # upper clip: ratio <= 1 + eps_high (DAPO: 0.28)
beta = 0.0  # KL penalty coefficient (k3 to the reference); 0: the reference is never loaded
dynamic_sampling = False  # drop groups whose rewards are all equal from the update (DAPO)
temperature = 1.0  # sampling temperature (log-probs use the same)
max_new_tokens = 48  # longest response
top_k = None  # rollouts and evaluation: sample from the top_k most likely tokens (None: all; log-probs: detail 2)
top_p = None  # rollouts and evaluation: nucleus, the smallest set of tokens with this much probability (None: all)
lr = 3e-4  # learning rate (constant after warmup)
warmup_steps = 5  # linear warmup steps
weight_decay = 0.0  # AdamW weight decay
grad_clip = 1.0  # clip the gradient norm to this (0: off)
eval_interval = 40  # steps between held-out evaluations
n_eval = 256  # held-out prompts per evaluation
eval_k = 4  # samples per held-out prompt (pass@1 is their mean; pass@k the unbiased estimate)
log_interval = 1  # steps between metrics.jsonl lines
ckpt_interval = 40  # steps between checkpoints (one is always written at the end)
resume = False  # continue from <out_dir>/ckpt.pt if it exists (policy, optimizer, step, sampling and prompt RNGs)
seed = 1337  # seeds prompts and sampling
device = "auto"  # "auto", "cpu", "cuda", ...
dtype = "auto"  # "auto", "float32", "bfloat16", "float16"
compile = False  # torch.compile the policy's training forward (sampling, old/reference log-probs, saving: uncompiled)
grad_ckpt = False  # activation checkpointing: recompute each block's activations in the backward (less memory)
lora_rank = 0  # > 0: train LoRA adapters of this rank; the reference (beta > 0) is the policy with them off
lora_alpha = 16.0  # LoRA scale: the update is (lora_alpha / lora_rank) * B A
lora_merge = True  # LoRA: fold the adapters into the weights of the final checkpoint (a plain GPT)
# ---- end config
config = configure(globals())
os.makedirs(out_dir, exist_ok=True)
torch.manual_seed(seed)
device, autocast, scaler = setup_device(device, dtype)
gen = torch.Generator(device=device).manual_seed(seed)

# -------------------------------------------------------------------------- data: records
# parsed before the model is loaded, so a bad file fails at once (no torch RNG is used here)
if truncate not in ("skip", "raise"):  # cutting the start of a problem would change the problem
    raise SystemExit(f"truncate must be 'skip' or 'raise' for GRPO prompts, not {truncate!r}")
problems = data.load(data_path, "problem", on_error)[0] if data_path != "builtin" else None

# -------------------------------------------------------------------------- models
policy, tok = init_model(init_from, tokenizer, {}, device, expect="gpt")
if lora_rank:  # only the adapters train; the reference is the policy with them off (utils.reference_model)
    policy.add_lora(lora_rank, lora_alpha)
policy.grad_ckpt = grad_ckpt
ref = reference_model(policy, init_from, tokenizer, device) if beta > 0 else None
optimizer = policy.configure_optimizer(weight_decay, lr, (0.9, 0.99), "cuda" if "cuda" in device else "cpu")
train_body = torch.compile(policy.body) if compile else policy.body  # the training forward only
sampling = dict(top_k=top_k, top_p=top_p)  # the sampler's filters (None: none)

# -------------------------------------------------------------------------- prompts and rewards
T, skips = policy.config.block_size, data.Skips("skip")


def leaves_room(text, where):
    """Whether a prompt leaves room for a max_new_tokens response in the context; a prompt is never cut."""
    n = len(tok.render_prompt([{"role": "user", "content": text}]))
    if n + max_new_tokens <= T:
        return True
    if truncate == "raise":
        raise data.DataError(f"{where}: prompt of {n} tokens leaves no room for max_new_tokens={max_new_tokens} "
                             f"in block_size {T}")
    skips.counts["prompt too long"] += 1
    return False


if data_path == "builtin":
    reward_fns = {"verify": task.verify, "format": task.format_ok}
    pass_fn = task.verify  # what "pass" means in evaluation
    train_prompts = [p for i, p in enumerate(task.prompts(20000, seed, split="train"))
                     if leaves_room(p, f"builtin-train[{i}]")]
    eval_prompts = [p for i, p in enumerate(task.prompts(n_eval, seed, split="test"))
                    if leaves_room(p, f"builtin-test[{i}]")]
    skips.report(data_path)
    data.require(eval_prompts, "builtin (held-out prompts)", n_eval, skips)
    data.require(train_prompts, "builtin (train prompts)", 20000, skips)
else:
    n_read, problems = len(problems), [p for p in problems if leaves_room(p["prompt"][-1]["content"], p.where)]
    skips.report(data_path)
    data.require(problems, data_path, n_read, skips)
    answers = {p["prompt"][-1]["content"]: p["answer"] for p in problems}
    reward_fns = {"verify": answer_reward(answers)}  # the data's verifier: the default reward works for files too
    reward_fns["answer"] = reward_fns["verify"]  # its older name
    pass_fn = reward_fns["verify"]
    texts = list(answers)
    random.Random(seed).shuffle(texts)
    eval_prompts, train_prompts = texts[:n_eval], texts[n_eval:]
    if not train_prompts:
        raise SystemExit(f"{data_path}: all {len(texts)} distinct problems are held out for evaluation "
                         f"(n_eval={n_eval}), none is left to train on: pass a smaller --n_eval")
weights = {}
for item in rewards.split(","):
    name, _, w = item.partition(":")
    if name not in reward_fns:
        raise SystemExit(f"unknown reward {name!r}; here: {sorted(reward_fns)}")
    weights[name] = float(w or 1.0)


def total_reward(prompt, response):
    return sum(w * reward_fns[n](prompt, response) for n, w in weights.items())


def response_logprobs(model, prompt_ids, prompt_mask, resp, resp_mask, with_entropy=False, body=None):
    """Per-token log-probs [B, N] (float32, at the sampling temperature) of the response tokens, 0 on padding
    (and their entropies, if asked). The LM head runs at the response tokens only (`core.model_logprobs`)."""
    ids = torch.cat([prompt_ids, resp], 1)
    mask = torch.cat([prompt_mask, resp_mask], 1)
    Tp = prompt_ids.shape[1]
    with autocast:
        out = model_logprobs(model, ids, response_positions(mask, Tp), mask, temperature, with_entropy, body)
    return tuple(x[:, Tp - 1:] for x in out) if with_entropy else out[:, Tp - 1:]


# held-out samples, eval_k per prompt: the policy's at each evaluation (seed + 1), the start's once (seed; the policy
# has not trained yet, also when resuming: the checkpoint is restored below), scored by the verifier (and gold)
eval_flat = [p for p in eval_prompts for _ in range(eval_k)]
how = dict(pass_fn=pass_fn, gold_fn=task.gold if data_path == "builtin" else None, temperature=temperature,
           max_new_tokens=max_new_tokens, **sampling)
demos = task.sft_records(512, seed, split="val") if data_path == "builtin" else None  # the alignment tax
start_samples = evals.policy_samples(policy, tok, eval_flat, seed, **how)


@torch.no_grad()
def evaluate():
    samples = evals.policy_samples(policy, tok, eval_flat, seed + 1, **how)
    ok = samples["pass"]  # no EOS: unfinished, fails
    passed = [int(sum(ok[i * eval_k:(i + 1) * eval_k])) for i in range(len(eval_prompts))]
    metrics = {"eval/pass@1": sum(passed) / len(eval_flat),
               f"eval/pass@{eval_k}": sum(pass_at_k(eval_k, c, eval_k) for c in passed) / len(passed)}
    with torch.random.fork_rng(devices=[]):  # loading builds a GPT first, a draw from the global RNG (dropout's)
        reference = ref if ref is not None else reference_model(policy, init_from, tokenizer, device)  # the KL only
    shared = evals.evaluate_policy(policy, tok, samples, start_samples, reference=reference, demos=demos)
    metrics.update((k, v) for k, v in shared.items() if k != "eval/pass")  # eval/pass is eval/pass@1
    return metrics


# -------------------------------------------------------------------------- training loop
ckpt_path = os.path.join(out_dir, "ckpt.pt")
ckpt = resume_checkpoint(ckpt_path, resume, device)
logger = JsonlLogger(os.path.join(out_dir, "metrics.jsonl"), append=ckpt is not None)
rng = random.Random(seed)  # picks each step's prompts
start_step, start = 0, None
if ckpt:  # the policy, its optimizer, both RNGs and the log as they were; the start scores were saved with them
    restore_state(ckpt, model=policy, optimizer=optimizer, scaler=scaler, gen=gen, prompt_rng=rng, logger=logger)
    start_step, start, metrics = ckpt["step"], ckpt["start"], ckpt["last_eval"]
    print(f"resumed from {ckpt_path} at step {start_step}")
else:
    start = metrics = evaluate()
print("start: " + " ".join(f"{k} {v:.3f}" for k, v in start.items()))
t0 = time.time()


def save(step):
    save_checkpoint(ckpt_path, policy, tok, merge_lora=lora_merge and step == max_steps, step=step, config=config,
                    start=start, last_eval=metrics,
                    **resume_state(optimizer=optimizer, scaler=scaler, gen=gen, prompt_rng=rng, logger=logger))


bar = tqdm(range(start_step, max_steps), initial=start_step, total=max_steps, desc="grpo", disable=not dist.is_main())
for step in bar:
    # 1) rollouts: P prompts x G samples, with the current policy (= the old policy of this step). torchrun: each
    # rank samples the groups of its share of the prompts, and the rollouts are gathered (the whole batch, as one
    # process has it: advantages, batch scaling and statistics are computed on it)
    policy.eval()
    prompts = [rng.choice(train_prompts) for _ in range(prompts_per_step)]
    flat = [p for p in prompts for _ in range(group_size)]
    prompt_lists = [tok.render_prompt([{"role": "user", "content": p}]) for p in flat]
    rows = dist.share(prompts_per_step, group_size, "--prompts_per_step")  # this rank's rollouts (all, alone)
    resp, resp_mask = generate(policy, prompt_lists[rows], max_new_tokens, tok.eos_id, tok.pad_id,
                               temperature=temperature, generator=gen, rows=(rows.start, len(flat)), **sampling)
    resp, resp_mask = dist.all_gather_cat(resp, tok.pad_id), dist.all_gather_cat(resp_mask)
    prompt_ids, prompt_mask = (t.to(device) for t in pad(prompt_lists, tok.pad_id, left=True))  # as generate did
    n_tok = resp_mask.sum(1)
    ended = (resp.gather(1, (n_tok - 1).clamp(min=0)[:, None]).squeeze(1) == tok.eos_id) & (n_tok > 0)
    texts = [tok.decode(r[:n].tolist()) for r, n in zip(resp, n_tok)]
    # 2) rewards (an unfinished response gets 0) and advantages within each group
    r = torch.tensor([total_reward(p, t) if e else 0.0 for p, t, e in zip(flat, texts, ended.tolist())])
    groups = r.view(prompts_per_step, group_size)
    zero_std = (groups == groups[:, :1]).all(1)
    adv = group_advantages(groups, baseline, scale).reshape(-1, 1).to(device)
    keep = torch.arange(len(flat), device=device)
    if dynamic_sampling:
        keep = (~zero_std).repeat_interleave(group_size).nonzero().squeeze(1).to(device)
    # 3) old (= sampling) log-probs, reference log-probs (torchrun: of this rank's rollouts, gathered). One pass over
    # all the rollouts in one minibatch (mu = 1): the old policy is the one being trained, so its log-probs are
    # taken from the training forward itself, detached (detail 4), and this no-grad pass is skipped
    reuse_old = mu == 1 and minibatches == 1 and not dynamic_sampling and policy.config.dropout == 0
    with torch.no_grad():
        mine = (prompt_ids[rows], prompt_mask[rows], resp[rows], resp_mask[rows])
        old_logp, ent = (torch.zeros(resp.shape, device=device) for _ in "oe") if reuse_old else \
            map(dist.all_gather_cat, response_logprobs(policy, *mine, with_entropy=True))
        ref_logp = dist.all_gather_cat(response_logprobs(ref, *mine)) if ref is not None else None
    # 4) mu passes of clipped-surrogate updates over minibatches
    policy.train()
    for g in optimizer.param_groups:
        g["lr"] = lr * min(1.0, (step + 1) / warmup_steps)  # linear warmup, then constant
    stats = {"loss": 0.0, "clip_low": 0.0, "clip_high": 0.0, "kl": 0.0, "grad_norm": 0.0}
    n_updates = 0
    for _ in range(mu if len(keep) else 0):
        for mb in keep[torch.randperm(len(keep), generator=torch.Generator().manual_seed(seed + step))].chunk(minibatches):
            # micro-batches of the minibatch, each aggregated as its share of the minibatch's sequences (seq_mean,
            # constant) or real tokens (token_mean): their gradients add up to the minibatch's (one: a share of 1)
            n_seq, n_real, mb_loss = len(mb), max(1, int(resp_mask[mb].sum())), 0.0
            for micro in dist.shard(mb, even=False).chunk(grad_accum):  # torchrun: this rank's share of it
                if not len(micro):  # a minibatch smaller than the number of ranks
                    continue
                w_seq, w_tok = len(micro) / n_seq, int(resp_mask[micro].sum()) / n_real
                out = response_logprobs(policy, prompt_ids[micro], prompt_mask[micro], resp[micro], resp_mask[micro],
                                        with_entropy=reuse_old, body=train_body)
                logp = out[0] if reuse_old else out
                if reuse_old:
                    old_logp[micro], ent[micro] = logp.detach(), out[1].detach()
                token_loss, low, high = clipped_surrogate(logp, old_logp[micro], adv[micro], eps_low, eps_high)
                if ref is not None:
                    kl = k3_kl(logp, ref_logp[micro])
                    token_loss = token_loss + beta * kl
                    stats["kl"] += aggregate(kl.detach(), resp_mask[micro], "token_mean").item() * w_tok
                loss = aggregate(token_loss, resp_mask[micro], agg, max_new_tokens) * (w_tok if agg == "token_mean"
                                                                                      else w_seq)
                scaler.scale(loss).backward()
                mb_loss += loss.item()
                stats["clip_low"] += aggregate(low.float(), resp_mask[micro], "token_mean").item() * w_tok
                stats["clip_high"] += aggregate(high.float(), resp_mask[micro], "token_mean").item() * w_tok
            mb_loss = dist.all_reduce(mb_loss)  # the ranks' shares added up
            stats["grad_norm"] += optimizer_step(policy, optimizer, scaler, grad_clip, mb_loss, f"step {step + 1}")
            stats["loss"] += mb_loss
            n_updates += 1
    stats.update(dist.all_reduce({k: stats[k] for k in ("clip_low", "clip_high", "kl")}))  # the ranks' shares
    if reuse_old:
        ent = dist.all_reduce(ent)  # torchrun: each rank filled the rows it trained on
    stats = {k: v / max(1, n_updates) for k, v in stats.items()}
    if ref is None:
        stats.pop("kl")
    stats.update(reward=r.mean().item(), reward_std=r.std().item(), zero_std_frac=zero_std.float().mean().item(),
                 len_mean=n_tok.float().mean().item(), len_max=int(n_tok.max()), trunc=1 - ended.float().mean().item(),
                 entropy=aggregate(ent, resp_mask, "token_mean").item())
    bar.set_postfix(reward=f"{stats['reward']:.3f}", pass1=f"{metrics['eval/pass@1']:.3f}")
    done = step + 1
    if done % log_interval == 0:
        logger.log(step=done, **stats)
    if done % eval_interval == 0 or done == max_steps:
        metrics = evaluate()
        logger.log(step=done, **metrics)
        bar.write(f"step {done} " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    if done % ckpt_interval == 0 and done < max_steps:
        save(done)

save(max_steps)
summary = {"steps": max_steps, "elapsed_s": round(time.time() - t0, 1), "checkpoint": ckpt_path,
           "n_eval_prompts": len(eval_prompts), "samples_per_prompt": eval_k, "start": start, "final": metrics}
write_json(os.path.join(out_dir, "summary.json"), summary)
print(f"held-out pass@1: {start['eval/pass@1']:.3f} -> {metrics['eval/pass@1']:.3f}"
      f" ({100 * (metrics['eval/pass@1'] - start['eval/pass@1']):+.1f} points)\nwrote {ckpt_path}")
