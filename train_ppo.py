"""
PPO-based RLHF (Ziegler et al. 2019; Stiennon et al. 2020; Ouyang et al. 2022): a policy, a frozen
reference, a frozen reward model and a critic.

    python train_ppo.py                                   # from out/sft/ckpt.pt, judged by out/rm/ckpt.pt
    python train_ppo.py --reward_model=out/prm/ckpt.pt    # the process RM as the judge (weakest step)
    python train_ppo.py --reward_model=out/prm/ckpt.pt --init_kl_coef=0 --adaptive_kl=False --out_dir=out/ppo_weak_kl
    python train_ppo.py --critic=shared                   # a value head on the policy's own body
    python train_ppo.py --data_path=hh.jsonl --init_from=sft-gpt2.pt --reward_model=rm-gpt2.pt   # a file's prompts

The default judge is the outcome RM that the default `python train_rm.py` writes, so the documented
no-argument commands chain: `train_sft.py`, `train_rm.py`, `train_ppo.py`. The process RM
(`python train_rm.py --kind=process --out_dir=out/prm --max_steps=1500`) is the judge of the measured
weak-KL (over-optimisation) run in the README.

Each iteration: roll out one response per prompt, score it with the reward model, turn the score into
per-token rewards with a KL penalty, estimate advantages with GAE and the critic, then several epochs
of clipped-surrogate updates over shuffled minibatches. The reward model is a proxy for the hidden gold
scorer, so every iteration also logs the gold score of the same responses: the gap between the two
curves is reward over-optimisation.

Implementation details:
1. Rollouts: `sampling.generate` stops each row at its first EOS; the response mask includes that EOS
   and excludes the padding after it. Prompts are left-padded, responses right-padded, and every forward
   gets the padding mask (position ids count real tokens only), so padding never changes a log-prob.
2. Score: the reward model read at the EOS itself (`ScalarModel.reward`: the last real token of
   prompt + response), on the normalised scale set by `train_rm.py` (SFT samples: mean 0, std 1).
   A response without EOS is not scored by the RM (there is no EOS to read); it gets `no_eos_score`.
   A process RM (`train_rm.py --kind=process`) can be the judge instead: its score is the response's
   weakest step probability (`rewards.process_score`), standardised with the mean and std of the
   first iteration's rollouts (the SFT policy's samples), and it lands on the EOS all the same.
3. Per-token reward: r_t = -beta * KL_t, plus the score at the response's last real token.
   KL_t = log pi(y_t) - log pi_ref(y_t) ("k1", whose sum over a response is an unbiased estimate of the
   sequence KL), or k3 (>= 0, lower variance) with kl_estimator="k3".
4. Log-probs of the policy (old and new) and of the reference are float32 and at the sampling
   temperature; values are read at the same positions as the logits: V_t is the value of the state
   before response token t. With --top_k / --top_p the rollouts are sampled from the filtered
   distribution, but log-probs are those of the full softmax (as TRL does): the reference's filtered set
   need not hold the sampled token, which would make the KL penalty infinite.
5. Advantages: GAE(gamma, lambda) (`losses.gae`), returns = advantages + values; advantages are then
   whitened over the real tokens of the batch (optionally the rewards too, keeping their mean).
6. Updates: ppo_epochs passes over shuffled minibatches; policy loss = clipped surrogate
   (`losses.clipped_surrogate`), value loss = clipped value loss (`losses.clipped_value_loss`), both
   token means over the minibatch's real tokens; minus ent_coef * entropy. One optimizer (policy lr,
   critic vf_lr), gradient norm clipped over both. Dropout is off throughout (eval mode), so the first
   minibatch's ratio is exactly 1.
7. KL control: beta fixed, or adaptive (`losses.adaptive_kl_beta`): after each iteration beta moves
   towards target_kl by at most +-20% * batch / horizon.
8. Critic: a separate copy of the reward model by default. An outcome RM's head, with its normalisation
   folded in, makes the critic start as the normalised score; a process RM's head classifies steps, on
   another scale, so its critic keeps the body and starts with a zero head (every value 0, the mean
   standardised score). critic="shared" puts a fresh value head on the policy's body (loss = policy +
   vf_coef * value).
9. Checkpoints every ckpt_interval iterations and at the end; `--resume=True` continues exactly from
   <out_dir>/ckpt.pt: policy, critic, their optimizer, beta, the process judge's normalisation, the
   sampling generator and prompt RNG, the curves. A NaN or inf loss or gradient norm stops the run
   naming the iteration; no checkpoint with NaN is written.
10. The training basics (as in train_sft.py): `--init_from` a nanoalign checkpoint or a GPT-2 directory
   (with `--tokenizer`), the reference loaded from the same place. `--grad_accum=n` splits each minibatch
   into n micro-batches whose token means are weighted by their share of the minibatch's real tokens:
   one optimizer step per minibatch, the same gradient. `--compile` compiles the training forward of
   policy and critic; `--grad_ckpt` checkpoints their blocks' activations (in eval mode too: it follows
   whether gradients are recorded). `--lora_rank=r` trains the policy's adapters only (the critic, its
   own network, trains fully), and the reference is the policy with its adapters off: no second copy.

Logged metrics (metrics.jsonl, one line per iteration):
  rm, rm_std           mean and std of the reward model's score of the rollouts (normalised scale)
  gold                 the gold score of the same responses (0 without EOS): the truth the RM approximates
  kl                   mean over rollouts of sum_t (log pi - log pi_ref): the sequence KL to the reference
  beta                 the KL coefficient used for this iteration's rewards
  non_score_reward     mean over rollouts of sum_t -beta * KL_t
  entropy              mean per-token entropy of the policy on its rollouts
  approx_kl            0.5 * mean (log pi_new - log pi_old)^2 over the updates: how far one iteration moved
  clipfrac             fraction of tokens where the ratio was clipped
  pg_loss, vf_loss     policy and value losses; vf_clipfrac: fraction of values clipped
  explained_var        1 - Var(returns - V) / Var(returns) of the rollout values: is the critic useful?
  len, eos             mean response length (tokens) and fraction of rollouts that ended with EOS
  eval/gold, eval/pass, eval/length, eval/eos   held-out prompts, one sample each (gold, pass: built-in task)
  eval/...             and on the same samples `evals.evaluate_policy`'s: win_rate (gold, vs the SFT policy's sample
                       of each prompt), judge and judge_win_rate (the reward model's; a process RM's weakest step,
                       not standardised), kl (k1, to the reference), length_std, distinct_1/2, entropy, demo_nll
                       (built-in: SFT's held-out demonstrations, the alignment tax)
With --data_path (any file that holds prompts: SFT, preference, problem, or {"prompt": ...} lines) the file's
prompts, split by prompt (val_frac held out), replace the built-in ones; there is no gold (logged as null).
Curves for the over-optimisation picture (kl, rm, gold per iteration) go to curves.csv (and
curves.png if matplotlib is installed).
"""
import os
import random
import time

import torch
from tqdm import tqdm

from nanoalign import data, dist, evals, task
from nanoalign.core import (masked_mean, masked_var, masked_whiten, model_logprobs, pad, per_token_rewards,
                            response_positions, scored_logprobs)
from nanoalign.heads import ScalarModel
from nanoalign.losses import adaptive_kl_beta, clipped_surrogate, clipped_value_loss, gae, k3_kl
from nanoalign.model import fused_adamw
from nanoalign.rewards import process_score, rm_judge, step_scores
from nanoalign.sampling import generate
from nanoalign.utils import (JsonlLogger, check_tokenizers, configure, init_model, load_checkpoint, optimizer_step,
                             reference_model, restore_state, resume_checkpoint, resume_state, save_checkpoint,
                             setup_device, write_json)

# ---- config (override with --key=value or a config file; --help lists them)
out_dir = "out/ppo"  # checkpoint, metrics.jsonl, curves.csv and summary.json go here
init_from = "out/sft/ckpt.pt"  # the policy to start from, and the frozen reference: a nanoalign .pt or a GPT-2 dir
tokenizer = ""  # "": a checkpoint's own, GPT-2's for a GPT-2 dir (its vocab.json + merges.txt if there); "gpt2:/path"
reward_model = "out/rm/ckpt.pt"  # a reward model from train_rm.py, outcome or process (detail 2)
data_path = "builtin"  # "builtin", or any file holding prompts (SFT, preference, problem, {"prompt": ...} lines)
val_frac = 0.05  # a data file: about this fraction of its prompts held out for evaluation (split by prompt)
on_error = "raise"  # malformed records: "raise" (error naming file:line) or "skip" (counted, reported)
critic = "rm"  # "rm": a separate critic initialised from the reward model; "shared": a value head on the policy
batch_size = 64  # prompts (one rollout each) per iteration
max_iters = 100  # iterations (rollout + update)
ppo_epochs = 4  # passes over each batch of rollouts
minibatches = 4  # minibatches per pass
grad_accum = 1  # micro-batches per minibatch (one optimizer step each minibatch, whatever the split)
lr = 3e-5  # policy learning rate (constant after warmup)
vf_lr = 1e-4  # critic learning rate (the value head's, with critic="shared")
warmup_iters = 5  # linear warmup of both learning rates
vf_coef = 0.5  # weight of the value loss
ent_coef = 0.0  # entropy bonus
cliprange = 0.2  # policy ratio clip
cliprange_value = 0.2  # value clip (in reward units)
gamma = 1.0  # discount
lam = 0.95  # GAE lambda
init_kl_coef = 0.05  # beta: the KL penalty coefficient (its start, if adaptive)
adaptive_kl = True  # adapt beta towards target_kl
target_kl = 1.0  # adaptive: target sequence KL (nats)
horizon = 2000  # adaptive: rollouts over which beta can change by a factor of about e^0.2
kl_estimator = "k1"  # per-token KL in the reward: "k1" (log-ratio) or "k3"
whiten_rewards = False  # whiten the per-token rewards (keeping their mean) before GAE
no_eos_score = -3.0  # score of a response that never emitted EOS (normalised RM units)
temperature = 1.0  # sampling temperature (log-probs use the same)
max_new_tokens = 48  # longest response
top_k = None  # rollouts and evaluation: sample from the top_k most likely tokens (None: all; log-probs: detail 4)
top_p = None  # rollouts and evaluation: nucleus, the smallest set of tokens with this much probability (None: all)
grad_clip = 1.0  # clip the gradient norm of policy + critic (0: off)
eval_interval = 25  # iterations between held-out evaluations
n_eval = 256  # held-out prompts per evaluation
ckpt_interval = 25  # iterations between checkpoints (one is always written at the end)
resume = False  # continue from <out_dir>/ckpt.pt if it exists (policy, critic, optimizer, beta, RNGs, prm_norm, ...)
seed = 1337  # seeds prompts and sampling
device = "auto"  # "auto", "cpu", "cuda", ...
dtype = "auto"  # "auto", "float32", "bfloat16", "float16"
compile = False  # torch.compile the training forward of policy and critic (rollouts, scoring, saving: uncompiled)
grad_ckpt = False  # activation checkpointing of the policy's (and critic's) blocks in the backward (less memory)
lora_rank = 0  # > 0: the policy trains LoRA adapters of this rank; the reference is the policy with them off
lora_alpha = 16.0  # LoRA scale: the update is (lora_alpha / lora_rank) * B A
lora_merge = True  # LoRA: fold the adapters into the weights of the final checkpoint (a plain GPT)
# ---- end config
config = configure(globals())
assert critic in ("rm", "shared") and kl_estimator in ("k1", "k3"), (critic, kl_estimator)
os.makedirs(out_dir, exist_ok=True)
torch.manual_seed(seed)
device, autocast, scaler = setup_device(device, dtype)
gen = torch.Generator(device=device).manual_seed(seed)
# read before the models are loaded, so a bad file fails at once (no torch RNG is used here)
file_prompts = data.read_prompts(data_path, val_frac, seed, on_error) if data_path != "builtin" else None

# -------------------------------------------------------------------------- the four roles
policy, tok = init_model(init_from, tokenizer, {}, device, expect="gpt")
if lora_rank:  # only the adapters train; the reference is the policy with them off (utils.reference_model)
    policy.add_lora(lora_rank, lora_alpha)
ref = reference_model(policy, init_from, tokenizer, device)
rm, rm_tok, rm_ckpt = load_checkpoint(reward_model, device, expect="scalar", what="--reward_model")
check_tokenizers(tok, rm_tok, f"--init_from={init_from}", f"--reward_model={reward_model}")
rm.eval().requires_grad_(False)
process_judge = rm_ckpt.get("rm_kind") == "process"
prm_norm = None  # (mean, std) of the process scores of the first rollouts
if critic == "rm":  # a separate critic, initialised from the reward model (detail 8)
    value_model = load_checkpoint(reward_model, device)[0]
    with torch.no_grad():
        if process_judge:  # its head classifies steps: not a value on the score's scale. Values start at 0.
            value_model.head.weight.zero_(), value_model.head.bias.zero_()
        else:  # fold the normalisation into the head: the critic starts as the normalised RM
            value_model.head.weight.mul_(value_model.gain)
            value_model.head.bias.mul_(value_model.gain).add_(value_model.bias)
        value_model.gain.fill_(1.0), value_model.bias.fill_(0.0)
    critic_params = list(value_model.parameters())
else:
    value_model = ScalarModel(policy).to(device)  # shares the policy's GPT; only the head is new
    critic_params = list(value_model.head.parameters())
policy.eval(), value_model.eval()  # dropout off everywhere (detail 6)
policy.grad_ckpt = value_model.gpt.grad_ckpt = grad_ckpt  # eval mode does not turn it off: gradients do
train_body = torch.compile(policy.body) if compile else policy.body  # the training forward only
train_critic = torch.compile(value_model) if compile and value_model.gpt is not policy else value_model
sampling = dict(top_k=top_k, top_p=top_p)  # the sampler's filters (None: none)
trained = torch.nn.ModuleList([policy, value_model])  # for the gradient-norm clip
optimizer = torch.optim.AdamW([{"params": [p for p in policy.parameters() if p.requires_grad], "lr": lr},
                               {"params": critic_params, "lr": vf_lr}], betas=(0.9, 0.99), weight_decay=0.0,
                              fused=fused_adamw(device))
base_lrs = [lr, vf_lr]
if file_prompts is None:
    train_prompts, eval_prompts = task.prompts(20000, seed, split="train"), task.prompts(n_eval, seed, split="test")
else:  # message lists; a prompt that leaves no room for max_new_tokens is skipped, never cut
    fits = lambda ps: [p for p in ps if len(tok.render_prompt(p)) + max_new_tokens <= policy.config.block_size]
    train_prompts, eval_prompts = fits(file_prompts[0]), fits(file_prompts[1])[:n_eval]
    print(f"{data_path}: {len(train_prompts)} train and {len(eval_prompts)} held-out prompts (of "
          f"{len(file_prompts[0])} and {len(file_prompts[1])}: too long for max_new_tokens, or past n_eval)")
    if not train_prompts or not eval_prompts:
        raise SystemExit(f"{data_path}: no train or no held-out prompt leaves room for max_new_tokens={max_new_tokens}")
user = lambda p: [{"role": "user", "content": p}] if isinstance(p, str) else p  # a file's prompts are message lists
gold_fn = task.gold if file_prompts is None else None  # the hidden gold exists for the built-in task only


def forward(ids, mask, Tp, train=False):
    """Per-token log-probs, entropies and values of the response tokens, [B, N] each (detail 4). train=True: the
    training forward (compiled with --compile)."""
    scored = response_positions(mask, Tp)  # the LM head runs at the response tokens only
    with autocast:
        h = (train_body if train else policy.body)(ids, mask)
        logp, ent = (x[:, Tp - 1:] for x in scored_logprobs(h, policy.lm_head.weight, ids, scored, temperature, True))
        if value_model.gpt is policy:  # shared body: only the value head is the critic's own
            values = value_model.head(h[:, Tp - 1:-1]).squeeze(-1).float()  # values[t]: the state before resp[t]
        else:
            values = (train_critic if train else value_model)(ids, mask)[:, Tp - 1:-1]
    return logp, ent, values


@torch.no_grad()
def judge(ids, mask, prompts, texts):
    """The score of each rollout, read at its EOS (detail 2)."""
    global prm_norm
    if not process_judge:
        return rm.reward(ids, mask)
    raw = torch.tensor([process_score(s) for s in step_scores(rm, tok, [user(p) for p in prompts], texts)])
    if prm_norm is None:  # torchrun: of the whole batch's scores
        everyone = dist.all_gather_cat(raw)
        prm_norm = (everyone.mean().item(), everyone.std().clamp(min=1e-6).item())
    return ((raw - prm_norm[0]) / prm_norm[1]).to(device)


# held-out samples: the policy's at each evaluation (seed: task.evaluate's draws), the start's once (seed + 1, from the
# reference, which is the start policy, also when resuming); scored by gold and verifier (built-in) and by the RM
how = dict(gold_fn=gold_fn, pass_fn=task.verify if gold_fn else None, judge=rm_judge(rm, tok, rm_ckpt.get("rm_kind")),
           temperature=temperature, max_new_tokens=max_new_tokens, **sampling)
demos = task.sft_records(512, seed, split="val") if gold_fn else None  # the alignment tax: SFT's held-out demos
start_samples = evals.policy_samples(ref, tok, eval_prompts, seed + 1, **how)


@torch.no_grad()
def evaluate():
    samples = evals.policy_samples(policy, tok, eval_prompts, seed, **how)
    return evals.evaluate_policy(policy, tok, samples, start_samples, reference=ref, demos=demos)


# -------------------------------------------------------------------------- training loop
ckpt_path = os.path.join(out_dir, "ckpt.pt")
ckpt = resume_checkpoint(ckpt_path, resume, device)
logger = JsonlLogger(os.path.join(out_dir, "metrics.jsonl"), append=ckpt is not None)
rng = random.Random(seed)  # picks each iteration's prompts
start_iter, beta, curves = 0, init_kl_coef, []
if ckpt:  # everything the next iteration depends on, as it was; the SFT scores were saved with it
    restore_state(ckpt, model=policy, critic=value_model, optimizer=optimizer, scaler=scaler, gen=gen,
                  prompt_rng=rng, logger=logger)
    start_iter, beta, prm_norm, curves, start, metrics, stats = (ckpt[k] for k in (
        "step", "beta", "prm_norm", "curves", "start", "last_eval", "last_iter"))
    print(f"resumed from {ckpt_path} at iter {start_iter}")
else:
    start = metrics = evaluate()
print("start (SFT): " + " ".join(f"{k} {v:.3f}" for k, v in start.items()))
t0 = time.time()


def save(done):
    last = {k: stats[k] for k in ("rm", "gold", "kl", "beta", "len", "eos")} if done else None
    save_checkpoint(ckpt_path, policy, tok, merge_lora=lora_merge and done == max_iters, step=done, config=config,
                    beta=beta, prm_norm=prm_norm, curves=curves,
                    start=start, last_eval=metrics, last_iter=last, **resume_state(
                        critic=value_model, optimizer=optimizer, scaler=scaler, gen=gen, prompt_rng=rng, logger=logger))


bar = tqdm(range(start_iter, max_iters), initial=start_iter, total=max_iters, desc="ppo", disable=not dist.is_main())
for it in bar:
    # 1) rollouts (detail 1). torchrun: each rank samples (and scores, and runs the models on) its share, gathered:
    # every rank holds the whole batch, as one process does (whitening, KL control, statistics: computed on it)
    prompts = [rng.choice(train_prompts) for _ in range(batch_size)]
    prompt_lists = [tok.render_prompt(user(p)) for p in prompts]
    rows = dist.share(batch_size, what="--batch_size")  # this rank's rollouts (all of them, alone)
    resp, resp_mask = generate(policy, prompt_lists[rows], max_new_tokens, tok.eos_id, tok.pad_id,
                               temperature=temperature, generator=gen, rows=(rows.start, batch_size), **sampling)
    resp, resp_mask = dist.all_gather_cat(resp, tok.pad_id), dist.all_gather_cat(resp_mask)
    prompt_ids, prompt_mask = (t.to(device) for t in pad(prompt_lists, tok.pad_id, left=True))
    ids, mask = torch.cat([prompt_ids, resp], 1), torch.cat([prompt_mask, resp_mask], 1)
    Tp, m = prompt_ids.shape[1], resp_mask.float()
    n_tok = resp_mask.sum(1)
    last = (n_tok - 1).clamp(min=0)
    ended = (resp.gather(1, last[:, None]).squeeze(1) == tok.eos_id) & (n_tok > 0)
    texts = [tok.decode(r[:n].tolist()) for r, n in zip(resp, n_tok)]
    with torch.no_grad():
        # 2) the score at the EOS; 3) per-token rewards with the KL penalty
        no_eos = torch.full((batch_size,), no_eos_score, device=device)
        score = torch.where(ended, dist.all_gather_cat(judge(ids[rows], mask[rows], prompts[rows], texts[rows])), no_eos)
        old_logp, ent, old_values = map(dist.all_gather_cat, forward(ids[rows], mask[rows], Tp))
        ref_logp = dist.all_gather_cat(model_logprobs(ref, ids[rows], response_positions(mask[rows], Tp), mask[rows],
                                                      temperature)[:, Tp - 1:])
        kl_t = (old_logp - ref_logp if kl_estimator == "k1" else k3_kl(old_logp, ref_logp)) * m
        rewards = per_token_rewards(score, kl_t, m, beta)
        if whiten_rewards:
            rewards = masked_whiten(rewards, m, shift_mean=False)
        # 5) GAE, returns, whitened advantages
        adv, returns = gae(rewards, old_values, m, gamma, lam)
        adv = masked_whiten(adv, m)
        explained_var = 1 - masked_var(returns - old_values, m) / masked_var(returns, m).clamp(min=1e-8)
    gold = torch.tensor([gold_fn(p, t) if e else 0.0 for p, t, e in zip(prompts, texts, ended.tolist())] if gold_fn
                        else [float("nan")] * len(prompts))  # a file: no gold
    # 6) epochs of minibatch updates
    for g, base in zip(optimizer.param_groups, base_lrs):
        g["lr"] = base * min(1.0, (it + 1) / warmup_iters)
    sums, n_updates = {}, 0
    for epoch in range(ppo_epochs):
        order = torch.randperm(batch_size, generator=torch.Generator().manual_seed(seed + 1000 * it + epoch))
        for mb in order.to(device).chunk(minibatches):
            # micro-batches of the minibatch, each's token means weighted by its share of the minibatch's real
            # tokens: their gradients add up to the minibatch's (one micro-batch: a share of exactly 1)
            n_real, mb_loss, mb_stats = max(1, int(m[mb].sum())), 0.0, {}
            for micro in dist.shard(mb, "the minibatch (--batch_size / --minibatches)").chunk(grad_accum):  # rank's
                w = int(m[micro].sum()) / n_real
                logp, ent_mb, values = forward(ids[micro], mask[micro], Tp, train=True)
                mm = m[micro]
                pg_tok, low, high = clipped_surrogate(logp, old_logp[micro], adv[micro], cliprange, cliprange)
                pg_loss = masked_mean(pg_tok, mm)
                vf_tok = clipped_value_loss(values, old_values[micro], returns[micro], cliprange_value)
                vf_loss = masked_mean(vf_tok, mm)
                loss = (pg_loss + vf_coef * vf_loss - ent_coef * masked_mean(ent_mb, mm)) * w
                scaler.scale(loss).backward()
                mb_loss += loss.item()
                part = {"pg_loss": pg_loss.item(),
                        "vf_loss": vf_loss.item(),
                        "approx_kl": masked_mean(0.5 * (logp.detach() - old_logp[micro]) ** 2, mm).item(),
                        "clipfrac": masked_mean((low | high).float(), mm).item(),
                        "vf_clipfrac": masked_mean(((values.detach() - old_values[micro]).abs() > cliprange_value)
                                                   .float(), mm).item()}
                mb_stats = {k: mb_stats.get(k, 0.0) + v * w for k, v in part.items()}
            mb_loss, mb_stats = dist.all_reduce(mb_loss), dist.all_reduce(mb_stats)  # the ranks' shares added up
            stats = {"grad_norm": optimizer_step(trained, optimizer, scaler, grad_clip, mb_loss, f"iter {it + 1}"),
                     **mb_stats}
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            n_updates += 1
    stats = {k: v / n_updates for k, v in sums.items()}
    kl_seq = (old_logp - ref_logp).mul(m).sum(1).mean().item()
    stats.update(rm=score.mean().item(), rm_std=score.std().item(), gold=gold.mean().item(), kl=kl_seq, beta=beta,
                 non_score_reward=(-beta * kl_t).sum(1).mean().item(), entropy=masked_mean(ent, m).item(),
                 explained_var=explained_var.item(), len=n_tok.float().mean().item(), eos=ended.float().mean().item())
    curves.append((it + 1, kl_seq, stats["rm"], stats["gold"]))
    # 7) KL control
    if adaptive_kl:
        beta = adaptive_kl_beta(beta, kl_seq, target_kl, horizon, batch_size)
    done = it + 1
    if done % eval_interval == 0 or done == max_iters:
        metrics = evaluate()
        stats.update(metrics)
        bar.write(f"iter {done} rm {stats['rm']:.3f} gold {stats['gold']:.3f} kl {kl_seq:.3f} beta {stats['beta']:.4f} "
                  + " ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
    logger.log(iter=done, **stats)
    bar.set_postfix(rm=f"{stats['rm']:.2f}", gold=f"{stats['gold']:.3f}", kl=f"{kl_seq:.2f}")
    if done % ckpt_interval == 0 and done < max_iters:
        save(done)

save(max_iters)
if dist.is_main():  # torchrun: rank 0 writes the curves
    with open(os.path.join(out_dir, "curves.csv"), "w") as f:
        f.write("iter,kl,rm,gold\n" + "".join(f"{i},{k:.4f},{r:.4f},{g:.4f}\n" for i, k, r, g in curves))
    try:  # the picture is optional: matplotlib is not a dependency
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        kls = [c[1] for c in curves]
        ax2 = ax.twinx()
        dots = ax.plot(kls, [c[2] for c in curves], ".", alpha=0.5, label="reward model score (normalised)") + \
            ax2.plot(kls, [c[3] for c in curves], ".", color="C1", alpha=0.5, label="gold score")
        ax.set_xlabel("KL(policy || reference), nats"), ax.set_ylabel("RM score"), ax2.set_ylabel("gold score")
        ax.legend(dots, [d.get_label() for d in dots], loc="center right")
        fig.tight_layout(), fig.savefig(os.path.join(out_dir, "curves.png"), dpi=120)
    except ImportError:
        pass
summary = {"iters": max_iters, "elapsed_s": round(time.time() - t0, 1), "checkpoint": ckpt_path,
           "n_eval_prompts": len(eval_prompts), "start": start, "final": metrics,
           "last_iter": {k: stats[k] for k in ("rm", "gold", "kl", "beta", "len", "eos")}}
write_json(os.path.join(out_dir, "summary.json"), summary)
print("held-out (SFT -> final): " + "; ".join(f"{k[5:]} {start[k]:.3f} -> {metrics[k]:.3f}" for k in (
    "eval/gold", "eval/pass", "eval/judge", "eval/judge_win_rate", "eval/kl") if k in start and k in metrics)
      + f"; last KL {stats['kl']:.2f}, beta {stats['beta']:.4f}\nwrote {ckpt_path}")
