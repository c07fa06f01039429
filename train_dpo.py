"""
Offline preference optimisation: DPO and its family, one script, one loss function each.

    python train_dpo.py                         # DPO from out/sft/ckpt.pt on the built-in preference pairs
    python train_dpo.py --loss=ipo --beta=0.5   # or cdpo, robust, hinge, simpo, orpo, kto, rpo
    python train_dpo.py --data_path=hh.jsonl.gz --init_from=sft-gpt2.pt --device=cuda

Implementation details:
1. Chosen and rejected go through ONE forward (stacked on the batch axis, right-padded); a sequence's
   log-prob is the sum of its response tokens' log-probs (float32), or their mean for the
   length-normalised losses (IPO, SimPO, ORPO, and RPO's NLL term).
2. The reference is a frozen copy ("live") or, by default, its log-probs are precomputed in one pass
   before training and the reference is freed ("precompute"). Reference-free losses (SimPO, ORPO)
   never load it for training.
3. KTO trains on unpaired examples; its reference point z0 is the mean log-ratio of mismatched
   (prompt i, completion j) pairs, clamped at 0 and detached.
4. Evaluation on held-out prompts: one sample each from the policy and from the start (SFT) policy,
   scored by the gold scorer; win rate = P(policy's gold > SFT's) + 0.5 P(tie). KL to the reference
   is the mean over the policy's samples of sum_t (log pi - log pi_ref), the reference loaded from
   `init_from` for the evaluation only.

Logged metrics (metrics.jsonl), with the usual names:
  loss                         the loss of the step (mean over pairs)
  rewards/chosen, rewards/rejected   beta * (log pi - log pi_ref) of chosen / rejected (implicit rewards)
  rewards/accuracies           fraction of pairs with rewards/chosen > rewards/rejected
  rewards/margins              mean of rewards/chosen - rewards/rejected
  logps/chosen, logps/rejected mean sequence log-probs under the policy
  eval/win_rate, eval/kl, eval/length, eval/gold    held-out, as in detail 4
"""
import os
import random
import time

import torch
from tqdm import tqdm

from nanoalign import data, losses, task
from nanoalign.core import pad, sequence_logprob, token_logprobs
from nanoalign.rewards import response_tokens
from nanoalign.utils import (JsonlLogger, configure, cosine_lr, load_checkpoint, optimizer_step, save_checkpoint,
                             setup_device, step_generator, write_json)

# ---- config (override with --key=value or a config file; --help lists them)
out_dir = "out/dpo"  # checkpoint, metrics.jsonl and summary.json go here
loss = "dpo"  # dpo, cdpo, robust, hinge, ipo, simpo, orpo, kto, rpo
init_from = "out/sft/ckpt.pt"  # the policy to start from, and the reference
data_path = "builtin"  # "builtin", or a preference file (or an unpaired file for kto)
n_train = 20000  # builtin: training pairs (or unpaired examples for kto)
beta = 0.5  # the loss's temperature (DPO family), or SimPO's scale
label_smoothing = 0.1  # cdpo and robust: the assumed label-flip rate
gamma = 1.0  # simpo: target margin
orpo_lambda = 0.1  # orpo: weight of the odds-ratio term
rpo_alpha = 1.0  # rpo: weight of the chosen NLL
kto_lambda_d = 1.0  # kto: weight of desirable examples
kto_lambda_u = 1.0  # kto: weight of undesirable examples
ref = "precompute"  # "precompute" (one pass, then freed) or "live" (a frozen copy)
batch_size = 32  # pairs (or unpaired examples) per step
max_steps = 300  # optimizer steps
lr = 1e-4  # peak learning rate
min_lr = 1e-5  # learning rate at the end of the cosine decay
warmup_steps = 20  # linear warmup steps
grad_clip = 1.0  # clip the gradient norm to this (0: off)
eval_interval = 100  # steps between evaluations
n_eval = 512  # held-out prompts for win rate, KL and length (built-in task)
log_interval = 10  # steps between metrics.jsonl lines
seed = 1337  # seeds data and sampling
device = "auto"  # "auto", "cpu", "cuda", ...
dtype = "auto"  # "auto", "float32", "bfloat16", "float16"
# ---- end config
config = configure(globals())
LOSSES = ("dpo", "cdpo", "robust", "hinge", "ipo", "simpo", "orpo", "kto", "rpo")
if loss not in LOSSES:
    raise SystemExit(f"unknown loss {loss!r}; one of {LOSSES}")
REFERENCE_FREE = loss in ("simpo", "orpo")
os.makedirs(out_dir, exist_ok=True)
torch.manual_seed(seed)
device, autocast, scaler = setup_device(device, dtype)
policy, tok, _ = load_checkpoint(init_from, device)
optimizer = policy.configure_optimizer(0.0, lr, (0.9, 0.99), "cuda" if "cuda" in device else "cpu")

# -------------------------------------------------------------------------- data: token sequences
kind = "unpaired" if loss == "kto" else "preference"
if data_path == "builtin":
    make = task.unpaired_records if loss == "kto" else task.preference_records
    records = data.normalise(make(n_train, seed), kind, "builtin-train")
else:
    records, _ = data.load(data_path, kind)
T = policy.config.block_size
if loss == "kto":  # (prompt + completion, label, prompt + a mismatched completion for z0)
    partner = list(range(len(records)))
    random.Random(seed).shuffle(partner)
    examples = [(response_tokens(tok, r["prompt"], r["completion"]),
                 r["label"], response_tokens(tok, r["prompt"], records[j]["completion"]))
                for r, j in zip(records, partner)]
    seqs = [[e[0], e[2]] for e in examples]
else:  # (prompt + chosen, prompt + rejected)
    seqs = [[response_tokens(tok, r["prompt"], r["chosen"]), response_tokens(tok, r["prompt"], r["rejected"])]
            for r in records]
keep = [i for i, s in enumerate(seqs) if all(len(x[0]) <= T for x in s)]
if len(keep) < len(seqs):
    print(f"skipped {len(seqs) - len(keep)} examples longer than the context ({T} tokens)")
seqs = [seqs[i] for i in keep]
labels = torch.tensor([examples[i][1] for i in keep]) if loss == "kto" else None
print(f"{loss}: {len(seqs)} training {'examples' if loss == 'kto' else 'pairs'} from {data_path}")


def seq_logps(model, batch_seqs):
    """Sum and mean of response-token log-probs of each (ids, response mask) in one forward. -> [N], [N]."""
    ids, _ = pad([s[0] for s in batch_seqs], tok.pad_id)
    rmask, _ = pad([s[1] for s in batch_seqs], 0)
    ids, rmask = ids.to(device), rmask.to(device)
    with autocast:
        logits = model(ids)  # right padding: no attention mask needed
    logp = token_logprobs(logits[:, :-1], ids[:, 1:])
    m = rmask[:, 1:]
    return sequence_logprob(logp, m), sequence_logprob(logp, m, average=True)


def flat(idx):
    """The sequences of examples `idx`, all firsts then all seconds: one concatenated forward."""
    return [seqs[i][0] for i in idx] + [seqs[i][1] for i in idx]


# -------------------------------------------------------------------------- the reference
ref_model, ref_table = None, None
if not REFERENCE_FREE:
    ref_model = load_checkpoint(init_from, device)[0].eval().requires_grad_(False)
    if ref == "precompute":  # one pass over the data, then the reference is freed
        chunks = []
        with torch.no_grad():
            for i in tqdm(range(0, len(seqs), 64), desc="reference log-probs"):
                idx = list(range(i, min(i + 64, len(seqs))))
                chunks.append(torch.stack(seq_logps(ref_model, flat(idx))).view(2, 2, -1).permute(2, 0, 1).cpu())
        ref_table = torch.cat(chunks)  # [N, (sum, mean), (first, second)]
        ref_model = None


def reference_logps(idx):
    """Sum and mean log-probs of the reference, laid out like seq_logps(policy, flat(idx))."""
    if ref_model is None:
        t = ref_table[idx].to(device)  # [B, 2, 2]
        return t[:, 0].t().reshape(-1), t[:, 1].t().reshape(-1)
    with torch.no_grad():
        return seq_logps(ref_model, flat(idx))


def compute_loss(idx):
    """The loss of examples `idx` and the usual metrics."""
    B = len(idx)
    s, a = seq_logps(policy, flat(idx))
    pc, pr, avg_c, avg_r = s[:B], s[B:], a[:B], a[B:]
    if REFERENCE_FREE:
        per = losses.simpo_loss(avg_c, avg_r, beta, gamma) if loss == "simpo" else \
            losses.orpo_loss(avg_c, avg_r, orpo_lambda)
        return per.mean(), {"logps/chosen": pc.mean().item(), "logps/rejected": pr.mean().item()}
    r_sum, r_avg = reference_logps(idx)
    rc, rr = r_sum[:B], r_sum[B:]
    if loss == "kto":  # first half: the examples; second half: the mismatched pairs
        z0 = losses.kto_reference_point(pr, rr)
        lab = labels[idx].to(device)
        per = losses.kto_loss(pc, rc, lab, z0, beta, kto_lambda_d, kto_lambda_u)
        reward = beta * (pc - rc).detach()
        return per.mean(), {"kl_z0": z0.item(), "rewards/desirable": reward[lab].mean().item() if lab.any() else 0.0,
                            "rewards/undesirable": reward[~lab].mean().item() if (~lab).any() else 0.0}
    if loss == "ipo":  # length-normalised log-ratios
        per = losses.ipo_loss(avg_c, avg_r, r_avg[:B], r_avg[B:], beta)
    elif loss in ("dpo", "cdpo"):
        per = losses.dpo_loss(pc, pr, rc, rr, beta, label_smoothing if loss == "cdpo" else 0.0)
    elif loss == "robust":
        per = losses.robust_dpo_loss(pc, pr, rc, rr, beta, label_smoothing)
    elif loss == "hinge":
        per = losses.hinge_loss(pc, pr, rc, rr, beta)
    else:  # rpo
        per = losses.rpo_loss(pc, pr, rc, rr, avg_c, beta, rpo_alpha)
    rew_c, rew_r = beta * (pc - rc).detach(), beta * (pr - rr).detach()
    return per.mean(), {"rewards/chosen": rew_c.mean().item(), "rewards/rejected": rew_r.mean().item(),
                        "rewards/accuracies": (rew_c > rew_r).float().mean().item(),
                        "rewards/margins": (rew_c - rew_r).mean().item(),
                        "logps/chosen": pc.mean().item(), "logps/rejected": pr.mean().item()}


# -------------------------------------------------------------------------- evaluation
eval_prompts = task.prompts(n_eval, seed, split="test")
sft_samples = task.sample_responses(policy, tok, eval_prompts, generator=torch.Generator(device=device).manual_seed(seed))
sft_gold = [task.gold(p, t) if e else 0.0 for p, (t, e, _) in zip(eval_prompts, sft_samples)]


@torch.no_grad()
def evaluate():
    samples = task.sample_responses(policy, tok, eval_prompts,
                                    generator=torch.Generator(device=device).manual_seed(seed + 1))
    gold = [task.gold(p, t) if e else 0.0 for p, (t, e, _) in zip(eval_prompts, samples)]
    wins = sum(1.0 if g > s else 0.5 if g == s else 0.0 for g, s in zip(gold, sft_gold)) / len(gold)
    reference = load_checkpoint(init_from, device)[0].eval()  # for the KL only, freed after
    pairs = [response_tokens(tok, [{"role": "user", "content": p}], t) for p, (t, _, _) in zip(eval_prompts, samples)]
    pairs = [(ids[-T:], m[-T:]) for ids, m in pairs]
    kl = torch.cat([seq_logps(policy, pairs[i:i + 64])[0] - seq_logps(reference, pairs[i:i + 64])[0]
                    for i in range(0, len(pairs), 64)])
    return {"eval/win_rate": wins, "eval/kl": kl.mean().item(), "eval/gold": sum(gold) / len(gold),
            "eval/length": sum(s[2] for s in samples) / len(samples)}


# -------------------------------------------------------------------------- training loop
logger = JsonlLogger(os.path.join(out_dir, "metrics.jsonl"))
start = {"eval/gold": sum(sft_gold) / len(sft_gold), "eval/length": sum(s[2] for s in sft_samples) / len(sft_samples)}
print(f"start: held-out gold {start['eval/gold']:.3f}, length {start['eval/length']:.1f}")
t0, metrics = time.time(), {}
policy.train()
bar = tqdm(range(max_steps), desc=loss)
for step in bar:
    idx = torch.randint(len(seqs), (batch_size,), generator=step_generator(seed, step)).tolist()
    for g in optimizer.param_groups:
        g["lr"] = cosine_lr(step, lr, warmup_steps, max_steps, min_lr)
    loss_value, stats = compute_loss(idx)
    scaler.scale(loss_value).backward()
    grad_norm = optimizer_step(policy, optimizer, scaler, grad_clip)
    bar.set_postfix(loss=f"{loss_value.item():.3f}")
    done = step + 1
    if done % log_interval == 0:
        logger.log(step=done, loss=loss_value.item(), grad_norm=grad_norm, lr=optimizer.param_groups[0]["lr"], **stats)
    if done % eval_interval == 0 or done == max_steps:
        policy.eval()
        metrics = evaluate()
        policy.train()
        logger.log(step=done, **metrics)
        bar.write(f"step {done} " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items()))

ckpt_path = os.path.join(out_dir, "ckpt.pt")
save_checkpoint(ckpt_path, policy, tok, step=max_steps, config=config)
summary = {"loss": loss, "steps": max_steps, "elapsed_s": round(time.time() - t0, 1), "checkpoint": ckpt_path,
           "n_eval_prompts": n_eval, "start": start, "final": metrics}
write_json(os.path.join(out_dir, "summary.json"), summary)
print(f"held-out: gold win rate vs SFT {metrics['eval/win_rate']:.3f}, KL {metrics['eval/kl']:.2f}, "
      f"length {metrics['eval/length']:.1f} (SFT {start['eval/length']:.1f})\nwrote {ckpt_path}")
