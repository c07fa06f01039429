"""
Preference optimisation: DPO and its family, offline, online (iterative) or as SPIN; one script, one
loss function each.

    python train_dpo.py                         # DPO from out/sft/ckpt.pt on the built-in preference pairs
    python train_dpo.py --loss=ipo --beta=0.5   # or cdpo, robust, hinge, simpo, orpo, kto, rpo
    python train_dpo.py --online=True           # online DPO: fresh pairs from the policy's samples each round
    python train_dpo.py --online=True --judge=out/prm/ckpt.pt   # ... ranked by a reward model (RLAIF)
    python train_dpo.py --spin=True             # SPIN: demonstration vs the policy's own sample
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
   is the mean over the policy's samples of sum_t (log pi - log pi_ref) over the tokens as sampled
   (not the decoded text re-encoded, and no EOS added to an unfinished one), the reference loaded from
   `init_from` for the evaluation only (always the SFT model, also online, so runs compare). The same samples
   give `evals.evaluate_policy`'s other metrics (pass, eos, length_std, distinct_1/2, entropy, demo_nll: SFT's
   held-out demonstrations, the alignment tax) and, with --judge=<RM checkpoint> (offline too), judge and
   judge_win_rate: the reward model's mean score and win rate against the SFT samples. With a data file,
   val_frac of its prompts are held out (split by prompt, never trained on): the samples are of their prompts
   (no gold), and the final implicit reward is measured on their pairs (pairs/acc_labels, pairs/margin).
5. Training is a sequence of rounds, each with its own pairs and reference; offline is one round with
   the fixed data set and the SFT reference. Online (`--online`, iterative DPO, Xu et al. 2023) and
   SPIN (`--spin`, Chen et al. 2024) run `rounds` rounds of max_steps / rounds steps each, so every mode
   takes the same number of optimizer steps; the learning-rate schedule and the optimizer state run
   on across rounds. At the start of a round (`online_pairs.round_pairs`):
   - online: sample k_samples responses per prompt from the current policy (KV-cache sampler,
     temperature 1); the judge scores them (the gold scorer, the verifier, the policy itself with
     feedback.py's pointwise prompt (--judge=self: self-rewarding, Yuan et al. 2024), or a reward model from
     train_rm.py: outcome reward at the EOS, or a process RM's weakest step); the best and the worst
     of each prompt become a pair. An unfinished response (no EOS) ranks below every finished one;
     a prompt whose best and worst tie carries no preference and is skipped (counted: round/tied_frac).
   - SPIN: chosen = the SFT demonstration of the prompt (built-in: task.sft_records, the data SFT was
     trained on; a file: the pair's chosen response), rejected = the policy's own sample for it; a
     sample identical to the demonstration is skipped (counted as tied).
   The pairs hold the sampled tokens as they were sampled (an unfinished one has no EOS appended).
6. The reference of a round (ref_update, logged as round/ref_update): "round" (default) is the policy
   as it starts the round, as in iterative DPO and SPIN: each round's DPO is anchored where the
   round began, and the first step of every round has implicit rewards 0. "fixed" is always the SFT
   model. Either way its log-probs for the round's pairs are precomputed (or it is kept live, --ref).
7. Checkpoints every ckpt_interval steps and at the end; `--resume=True` continues exactly from
   <out_dir>/ckpt.pt, inside a round too (the checkpoint keeps the round's pairs and reference; pin the
   schedule with lr_decay_steps to extend an offline run). A NaN or inf loss or gradient norm stops the
   run naming the step; no checkpoint with NaN is written.
8. The training basics (as in train_sft.py): `--init_from` a nanoalign checkpoint or a GPT-2 directory
   (with `--tokenizer`); the reference comes from the same place. A step is batch_size x grad_accum
   examples; each micro-batch's loss is its mean times its share of the step, so the gradients add up to
   the mean over the whole step (KTO: z0 is computed over the whole step first). `--compile` compiles the
   policy's training forward only; `--grad_ckpt` checkpoints its blocks' activations. `--lora_rank=r`
   trains adapters only and the SFT reference is the policy with its adapters off (`GPT.frozen_base`, no
   second copy; precomputed the same way); a round reference of online/SPIN is still a copy of the policy.
   `--top_k` / `--top_p` filter every sample drawn; log-probs (KL, pairs) use the full softmax, as TRL's do:
   the reference's filtered distribution need not contain the policy's token, and its KL would be infinite.

Logged metrics (metrics.jsonl), with the usual names:
  loss                         the loss of the step (mean over pairs)
  rewards/chosen, rewards/rejected   beta * (log pi - log pi_ref) of chosen / rejected (implicit rewards)
  rewards/accuracies           fraction of pairs with rewards/chosen > rewards/rejected
  rewards/margins              mean of rewards/chosen - rewards/rejected
  logps/chosen, logps/rejected mean sequence log-probs under the policy
  eval/win_rate, eval/kl, eval/length, eval/gold    held-out, as in detail 4
  pairs/acc_labels, pairs/acc_gold   (summary.json, built-in task) the trained policy's implicit reward
                               beta * log pi/pi_ref (reference: the SFT model) as a reward model on the
                               reward models' held-out pairs: fraction ranked as the label says, and as
                               the gold scorer does (pairs whose gold differs), as train_rm.py reports;
                               a file: on its held-out pairs, labels only. pairs/margin: the mean margin
  round, round/pairs           (online, SPIN; one line per round) the round (1-based) and its fresh pairs
  round/tied_frac              fraction of the round's prompts skipped because best and worst tied
  round/judge_mean             mean judge score of the round's finished samples (online)
  round/judge_gold_acc         fraction of the round's pairs (best vs worst by the judge) that gold orders the
                               same way, of those whose gold differs (online, built-in task)
  round/gold_mean              mean gold score of the round's samples, unfinished ones 0 (built-in task)
  round/eos_frac               fraction of the round's samples that ended with EOS
  round/ref_update             "round" or "fixed", as in detail 6
"""
import copy
import json
import os
import random
import time

import torch
from tqdm import tqdm

from nanoalign import data, dist, evals, feedback, losses, online_pairs, task
from nanoalign.rewards import (implicit_rewards, outcome_scores, pair_accuracy, process_score,
                               response_logprobs, response_tokens, rm_judge, step_scores)
from nanoalign.utils import (JsonlLogger, check_tokenizers, configure, cosine_lr, init_model, load_checkpoint, optimizer_step,
                             reference_model, restore_state, resume_checkpoint, resume_state, save_checkpoint,
                             setup_device, step_generator, write_json)

# ---- config (override with --key=value or a config file; --help lists them)
out_dir = "out/dpo"  # checkpoint, metrics.jsonl and summary.json go here
loss = "dpo"  # dpo, cdpo, robust, hinge, ipo, simpo, orpo, kto, rpo
init_from = "out/sft/ckpt.pt"  # the policy to start from, and the reference: a nanoalign .pt or a GPT-2 directory
tokenizer = ""  # "": a checkpoint's own, GPT-2's for a GPT-2 dir (its vocab.json + merges.txt if there); "gpt2:/path"
data_path = "builtin"  # "builtin", or a preference file (or an unpaired file for kto); online/spin: its prompts
n_train = 20000  # builtin: training pairs (or unpaired examples for kto)
on_error = "raise"  # malformed records: "raise" (error naming file:line) or "skip" (counted, reported)
truncate = "skip"  # sequences longer than block_size: "skip" (counted), "raise", or "left" (cut the prompt's start)
beta = 0.5  # the loss's temperature (DPO family), or SimPO's scale
label_smoothing = 0.1  # cdpo and robust: the assumed label-flip rate
gamma = 1.0  # simpo: target margin
orpo_lambda = 0.1  # orpo: weight of the odds-ratio term
rpo_alpha = 1.0  # rpo: weight of the chosen NLL
kto_lambda_d = 1.0  # kto: weight of desirable examples
kto_lambda_u = 1.0  # kto: weight of undesirable examples
ref = "precompute"  # "precompute" (one pass, then freed) or "live" (a frozen copy)
online = False  # online DPO: each round, best vs worst of k_samples policy samples per prompt, ranked by judge
spin = False  # SPIN: each round, chosen = the SFT demonstration, rejected = the policy's own sample
rounds = 5  # online/spin: rounds of max_steps // rounds steps, each on fresh pairs
k_samples = 4  # online: responses sampled per prompt
prompts_per_round = 1024  # online/spin: prompts per round (builtin: new train prompts; a file: the next ones)
judge = "gold"  # online: "gold" or "verify" (built-in task only), "self" (self-rewarding), or a reward-model checkpoint from train_rm.py
# (a checkpoint, offline too: the evaluation's judge, its win rate of the policy's held-out samples against the SFT's)
self_judgements = 3  # judge=self: sampled 0-5 scores averaged per response (feedback.pointwise_scores)
ref_update = "round"  # online/spin: reference = the policy at the round's start ("round") or the SFT ("fixed")
max_new_tokens = 48  # online/spin: the longest sampled response, in tokens
top_k = None  # every sample drawn (online/spin pairs, evaluation): keep the top_k most likely tokens (None: all)
top_p = None  # every sample drawn: nucleus, the smallest set of tokens with this much probability (None: all)
batch_size = 32  # pairs (or unpaired examples) per micro-batch
grad_accum = 1  # micro-batches per optimizer step (a step: batch_size x grad_accum pairs)
max_steps = 300  # optimizer steps
lr = 1e-4  # peak learning rate
min_lr = 1e-5  # learning rate at the end of the cosine decay
warmup_steps = 20  # linear warmup steps
lr_decay_steps = 0  # steps of the cosine schedule (0: max_steps)
grad_clip = 1.0  # clip the gradient norm to this (0: off)
eval_interval = 100  # steps between evaluations
n_eval = 512  # held-out prompts for win rate, KL and length (built-in task; a file: at most this many of its own)
n_eval_pairs = 1000  # held-out pairs (built-in task; a file: at most this many) on which the final implicit reward is measured
val_frac = 0.05  # a data file: about this fraction of its prompts held out for evaluation (split by prompt)
log_interval = 10  # steps between metrics.jsonl lines
ckpt_interval = 100  # steps between checkpoints (one is always written at the end)
resume = False  # continue from <out_dir>/ckpt.pt if it exists (+ online/spin: the round, its pairs and reference)
seed = 1337  # seeds data and sampling
device = "auto"  # "auto", "cpu", "cuda", ...
dtype = "auto"  # "auto", "float32", "bfloat16", "float16"
compile = False  # torch.compile the policy's training forward (sampling, the reference and saving: uncompiled)
grad_ckpt = False  # activation checkpointing: recompute each block's activations in the backward (less memory)
lora_rank = 0  # > 0: train LoRA adapters of this rank; the reference is then the policy with its adapters off
lora_alpha = 16.0  # LoRA scale: the update is (lora_alpha / lora_rank) * B A
lora_merge = True  # LoRA: fold the adapters into the weights of the final checkpoint (a plain GPT)
# ---- end config
config = configure(globals())
LOSSES = ("dpo", "cdpo", "robust", "hinge", "ipo", "simpo", "orpo", "kto", "rpo")
if loss not in LOSSES:
    raise SystemExit(f"unknown loss {loss!r}; one of {LOSSES}")
ONLINE = online or spin  # pairs made each round from the policy's own samples
if online and spin:
    raise SystemExit("--online and --spin are different ways of making pairs; choose one")
if ONLINE and loss == "kto":
    raise SystemExit("online DPO and SPIN make pairs; kto trains on unpaired examples")
if ref_update not in ("round", "fixed"):
    raise SystemExit(f"ref_update must be 'round' or 'fixed', got {ref_update!r}")
if online and judge in ("gold", "verify") and data_path != "builtin":
    raise SystemExit(f"judge={judge!r} exists only for the built-in task; with a data file, pass a reward-model "
                     f"checkpoint from train_rm.py (--judge=out/rm/ckpt.pt)")
if judge not in ("gold", "verify", "self") and not os.path.isfile(judge):
    raise SystemExit(f"judge must be 'gold', 'verify', 'self' or a reward-model checkpoint; {judge!r} is no file")
REFERENCE_FREE = loss in ("simpo", "orpo")
n_rounds = max(1, min(rounds, max_steps)) if ONLINE else 1
os.makedirs(out_dir, exist_ok=True)
torch.manual_seed(seed)
device, autocast, scaler = setup_device(device, dtype)
sampling = dict(top_k=top_k, top_p=top_p)  # the sampler's filters, for every sample drawn (None: none)

# parsed before the model is loaded, so a bad file fails at once (no torch RNG is used here)
kind = "unpaired" if loss == "kto" else "preference"
if data_path != "builtin":  # offline: the data set; online and SPIN: its prompts (and chosen responses)
    records = data.load(data_path, kind, on_error)[0]
elif not ONLINE:
    make = task.unpaired_records if loss == "kto" else task.preference_records
    records = data.normalise(make(n_train, seed), kind, "builtin-train")

policy, tok = init_model(init_from, tokenizer, {}, device, expect="gpt")
if lora_rank:  # only the adapters train; the reference is the policy with them off (utils.reference_model)
    policy.add_lora(lora_rank, lora_alpha)
policy.grad_ckpt = grad_ckpt
optimizer = policy.configure_optimizer(0.0, lr, (0.9, 0.99), "cuda" if "cuda" in device else "cpu")
train_body = torch.compile(policy.body) if compile else policy.body  # the training forward only
T = policy.config.block_size

# -------------------------------------------------------------------------- data: token sequences
# seqs[i] = [(ids, response mask) of the first sequence, ... of the second]: chosen and rejected (KTO: the
# example and a mismatched completion). Offline they are the data set; online and SPIN, the round's pairs.
seqs, labels, eval_records = [], None, []  # eval_records: a file's held-out pairs (split by prompt)
if not ONLINE:
    partner = list(range(len(records)))  # kto: example i's mismatched completion, for z0
    if loss == "kto":
        random.Random(seed).shuffle(partner)
    skips, kept = data.Skips("skip"), []
    for r, j in zip(records, partner):  # both sequences must fit the context (skips count examples)
        pair = [response_tokens(tok, r["prompt"], r["completion"]),
                response_tokens(tok, r["prompt"], records[j]["completion"])] if loss == "kto" else \
            [response_tokens(tok, r["prompt"], r["chosen"]), response_tokens(tok, r["prompt"], r["rejected"])]
        pair = data.fit_all(pair, T, truncate, r.where, skips)
        if pair:
            seqs.append(pair)
            kept.append(r)
    what = "examples" if loss == "kto" else "pairs"
    skips.report(f"{data_path} {what}")
    data.require(seqs, f"{data_path} ({what})", len(records), skips)
    if data_path != "builtin":  # hold out pairs by prompt for the evaluation, never trained on
        held = data.held_out(kept, val_frac, seed, data_path)
        eval_records = [r for r, h in zip(kept, held) if h]
        seqs, kept = ([x for x, h in zip(xs, held) if not h] for xs in (seqs, kept))
        if not seqs:
            raise SystemExit(f"{data_path}: 1 usable {what[:-1]}, held out for evaluation: none is left to train on")
    labels = torch.tensor([r["label"] for r in kept]) if loss == "kto" else None
    print(f"{loss}: {len(seqs)} training {what} from {data_path}"
          + (f" ({len(eval_records)} held out for evaluation)" if eval_records else ""))
else:  # a pool of (prompt messages, prompt text for the task's scorers, demonstration for SPIN)
    n_pool = prompts_per_round * n_rounds
    if data_path == "builtin":
        pool = [([{"role": "user", "content": r["prompt"]}], r["prompt"], r["response"])
                for r in task.sft_records(n_pool, seed)] if spin else \
            [([{"role": "user", "content": p}], p, None) for p in task.prompts(n_pool, seed, split="train")]
    else:  # the file's distinct prompts, in order (SPIN: with the first chosen response of each), but the held-out
        held = data.held_out(records, val_frac, seed, data_path)
        eval_records, records = ([r for r, h in zip(records, held) if h == side] for side in (True, False))
        seen, pool = set(), []
        for r in records:
            key = json.dumps(r["prompt"])
            if key not in seen:
                seen.add(key)
                pool.append((r["prompt"], None, r["chosen"]))
    fits = [x for x in pool if len(tok.render_prompt(x[0])) + max_new_tokens <= T
            and (not spin or len(response_tokens(tok, x[0], x[2])[0]) <= T)]
    if len(fits) < len(pool):
        print(f"skipped {len(pool) - len(fits)} prompts too long for the context ({T} tokens)")
    if not fits:
        raise SystemExit(f"{data_path}: no usable prompts ({len(pool)} read, {len(pool)} skipped: too long to "
                         f"sample {max_new_tokens} tokens in block_size {T})")
    pool = fits
    what = f"best vs worst of {k_samples} samples judged by {judge}" if online else "demonstration vs own sample"
    print(f"{'online' if online else 'spin'} {loss}: {n_rounds} rounds of {prompts_per_round} prompts from "
          f"{data_path}, {what}, reference: {'the round start' if ref_update == 'round' else 'SFT'}")


def seq_logps(model, batch_seqs, body=None):
    """Sum and mean of response-token log-probs of each (ids, response mask), in one forward. -> [N], [N]."""
    with autocast:
        return response_logprobs(model, batch_seqs, tok.pad_id, body=body)


def flat(idx):
    """The sequences of examples `idx`, all firsts then all seconds: one concatenated forward."""
    return [seqs[i][0] for i in idx] + [seqs[i][1] for i in idx]


# -------------------------------------------------------------------------- online and SPIN: fresh pairs
judge_model, judge_kind = None, None
if judge not in ("gold", "verify", "self"):  # RLAIF: a reward model ranks the samples (and judges the evaluation)
    judge_model, judge_tok, judge_ckpt = load_checkpoint(judge, device, expect="scalar", what="--judge")
    check_tokenizers(tok, judge_tok, f"--init_from={init_from}", f"--judge={judge}")
    judge_model.eval().requires_grad_(False)
    judge_kind = judge_ckpt.get("rm_kind", "outcome")


def judge_scores(msgs, prompt_texts, texts, r=0):
    """The judge's score of each (prompt, response): gold, verify, the policy's own judgement (self-rewarding,
    Yuan et al. 2024: the mean of self_judgements sampled scores on feedback.py's 0-5 prompt, 0 where none
    parses; round r seeds the sampling), an outcome RM's reward or a process
    RM's weakest step."""
    if judge in ("gold", "verify"):
        f = task.gold if judge == "gold" else task.verify
        return [f(p, t) for p, t in zip(prompt_texts, texts)]
    if judge == "self":
        g = torch.Generator(device=device).manual_seed(seed * 1000 + 500 + r)
        scores = feedback.pointwise_scores(policy, tok, [m[-1]["content"] for m in msgs], texts, self_judgements, generator=g)
        return [0.0 if x is None else x for x in scores]
    if judge_kind == "process":
        return [process_score(s) for s in step_scores(judge_model, tok, msgs, texts)]
    return outcome_scores(judge_model, tok, msgs, texts).tolist()


def make_pairs(r):
    """Round r's pairs from the current policy's samples (online.round_pairs). -> (pairs as seqs, round metrics)."""
    chunk = [pool[(r * prompts_per_round + i) % len(pool)] for i in range(min(prompts_per_round, len(pool)))]
    judge_fn = None if spin else (lambda msgs, prompt_texts, texts: judge_scores(msgs, prompt_texts, texts, r))
    new, stats = online_pairs.round_pairs(policy, tok, chunk, judge_fn, 1 if spin else k_samples, max_new_tokens,
                                          torch.Generator(device=device).manual_seed(seed * 1000 + r),
                                          data_path == "builtin", **sampling)
    return new, {"round": r + 1, **stats, "round/ref_update": ref_update}


# -------------------------------------------------------------------------- the reference
ref_model, ref_table = None, None


def round_reference():
    """The frozen reference of a round: the SFT model (`init_from`), or with ref_update="round" (online,
    SPIN) a copy of the policy as it starts the round. In the first round the two are the same model."""
    if ONLINE and ref_update == "round":
        return copy.deepcopy(policy).eval().requires_grad_(False)
    return reference_model(policy, init_from, tokenizer, device)  # LoRA: the policy with its adapters off


def set_reference(model):
    """Make `model` the reference for the current `seqs`: keep it ("live"), or precompute its log-probs
    in one pass and free it ("precompute")."""
    global ref_model, ref_table
    if ref == "live":
        ref_model = model
        return
    # pairs per forward: at most 64, and at most twice the training micro-batch that was sized to fit memory (the
    # float32 logits of 64 pairs of 1,024 GPT-2 tokens alone are 26 GB); the default run's chunks stay 64 pairs
    chunks, n = [], min(64, 2 * batch_size)
    with torch.no_grad():
        for i in tqdm(range(0, len(seqs), n), desc="reference log-probs", leave=False, disable=not dist.is_main()):
            idx = list(range(i, min(i + n, len(seqs))))
            chunks.append(torch.stack(seq_logps(model, flat(idx))).view(2, 2, -1).permute(2, 0, 1).cpu())
    ref_table = torch.cat(chunks)  # [N, (sum, mean), (first, second)]
    ref_model = None


def round_state():
    """What a run resumed inside the current round needs of it, beyond the policy: its pairs (online, SPIN;
    offline they are the data set, rebuilt) and its reference: the precomputed log-probs, or a live copy of
    the policy at the round's start (a live SFT reference is simply loaded again)."""
    own_ref = ref_model is not None and ONLINE and ref_update == "round"
    return {"round_seqs": seqs if ONLINE else None, "ref_table": ref_table,
            "ref_model": ref_model.state_dict() if own_ref else None}


def restore_round(ckpt):
    """The inverse of round_state(), from a checkpoint written inside the round."""
    global seqs, ref_model, ref_table
    seqs = ckpt["round_seqs"] if ONLINE else seqs
    ref_table = None if ckpt["ref_table"] is None else ckpt["ref_table"].cpu()
    if ckpt["ref_model"] is not None:
        ref_model = copy.deepcopy(policy).eval().requires_grad_(False)
        ref_model.load_state_dict(ckpt["ref_model"])
    elif ref == "live" and not REFERENCE_FREE:
        ref_model = round_reference()  # the SFT model


def reference_logps(idx):
    """Sum and mean log-probs of the reference, laid out like seq_logps(policy, flat(idx))."""
    if ref_model is None:
        t = ref_table[idx].to(device)  # [B, 2, 2]
        return t[:, 0].t().reshape(-1), t[:, 1].t().reshape(-1)
    with torch.no_grad():
        return seq_logps(ref_model, flat(idx))


def kto_z0(idx):
    """KTO's z0 over all of a step's mismatched pairs, before its micro-batches (each would estimate its own);
    torchrun: each rank's share of them, gathered."""
    mine = dist.shard(idx, "--batch_size")
    with torch.no_grad():
        return losses.kto_reference_point(dist.all_gather_cat(seq_logps(policy, [seqs[i][1] for i in mine])[0]),
                                          dist.all_gather_cat(reference_logps(mine)[0][len(mine):]))


def compute_loss(idx, step_idx, z0=None):
    """The loss of examples `idx` and the usual metrics, as their share of the step's examples `step_idx`: the
    mean over `idx` times len(idx) / len(step_idx), so a step's micro-batches add up to its mean (with one, the
    share is exactly 1; KTO's per-label means are shared by their label's counts). KTO: z0 given (kto_z0 of
    the whole step), or that of `idx` itself."""
    B, w = len(idx), len(idx) / len(step_idx)
    s, a = seq_logps(policy, flat(idx), train_body)
    pc, pr, avg_c, avg_r = s[:B], s[B:], a[:B], a[B:]
    if REFERENCE_FREE:
        per = losses.simpo_loss(avg_c, avg_r, beta, gamma) if loss == "simpo" else \
            losses.orpo_loss(avg_c, avg_r, orpo_lambda)
        return per.mean() * w, {"logps/chosen": pc.mean().item() * w, "logps/rejected": pr.mean().item() * w}
    r_sum, r_avg = reference_logps(idx)
    rc, rr = r_sum[:B], r_sum[B:]
    if loss == "kto":  # first half: the examples; second half: the mismatched pairs
        z0 = losses.kto_reference_point(pr, rr) if z0 is None else z0
        lab = labels[idx].to(device)
        per = losses.kto_loss(pc, rc, lab, z0, beta, kto_lambda_d, kto_lambda_u)
        reward = beta * (pc - rc).detach()
        return per.mean() * w, {"kl_z0": z0.item() * w,
                                **{f"rewards/{name}": reward[sel].mean().item() * (int(sel.sum()) / int(all_sel.sum()))
                                   if sel.any() else 0.0 for name, sel, all_sel in (
                                       ("desirable", lab, labels[step_idx]), ("undesirable", ~lab, ~labels[step_idx]))}}
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
    stats = {"rewards/chosen": rew_c.mean().item(), "rewards/rejected": rew_r.mean().item(),
             "rewards/accuracies": (rew_c > rew_r).float().mean().item(), "rewards/margins": (rew_c - rew_r).mean().item(),
             "logps/chosen": pc.mean().item(), "logps/rejected": pr.mean().item()}
    return per.mean() * w, {k: v * w for k, v in stats.items()}


# -------------------------------------------------------------------------- evaluation
if data_path == "builtin":
    eval_prompts = task.prompts(n_eval, seed, split="test")
else:  # the held-out pairs' distinct prompts that leave room for a response
    eval_prompts = list({json.dumps(r["prompt"]): r["prompt"] for r in eval_records
                         if len(tok.render_prompt(r["prompt"])) + max_new_tokens <= T}.values())[:n_eval]
    if not eval_prompts:
        raise SystemExit(f"{data_path}: no held-out prompt leaves room for max_new_tokens={max_new_tokens} in {T}")
# held-out samples: the SFT policy's once (seed), the policy's at each evaluation (seed + 1); built-in: gold, verifier
builtin = data_path == "builtin"
how = dict(gold_fn=task.gold if builtin else None, pass_fn=task.verify if builtin else None,
           judge=rm_judge(judge_model, tok, judge_kind) if judge_model is not None else None,
           max_new_tokens=task.MAX_NEW_TOKENS if builtin else max_new_tokens, **sampling)
demos = task.sft_records(512, seed, split="val") if builtin else None  # the alignment tax
sft_samples = evals.policy_samples(policy, tok, eval_prompts, seed, **how)
start = evals.evaluate_policy(policy, tok, sft_samples, demos=demos)  # before a checkpoint is restored: the SFT's


@torch.no_grad()
def evaluate():
    samples = evals.policy_samples(policy, tok, eval_prompts, seed + 1, **how)
    reference = reference_model(policy, init_from, tokenizer, device)  # for the KL only, freed after
    return evals.evaluate_policy(policy, tok, samples, sft_samples, reference=reference, demos=demos)


# -------------------------------------------------------------------------- training loop
ckpt_path = os.path.join(out_dir, "ckpt.pt")
ckpt = resume_checkpoint(ckpt_path, resume, device)
logger = JsonlLogger(os.path.join(out_dir, "metrics.jsonl"), append=ckpt is not None)
print("start: held-out " + ", ".join(f"{k[5:]} {start[k]:.3f}" for k in ("eval/gold", "eval/judge", "eval/length")
                                     if k in start))
t0, metrics, round_log, steps_done, evaluated_at = time.time(), {}, [], 0, None
at = 0  # the schedule's step the run is at (steps_done, plus the steps of rounds that had no pairs)
if ckpt:  # the SFT samples above came from init_from; from here on the policy is the checkpoint's
    restore_state(ckpt, model=policy, optimizer=optimizer, scaler=scaler, logger=logger)
    at, steps_done, metrics, evaluated_at, round_log = (ckpt[k] for k in ("at_step", "step", "last_eval",
                                                                          "evaluated_at", "round_log"))
    print(f"resumed from {ckpt_path} at step {at}")


def save(done):
    save_checkpoint(ckpt_path, policy, tok, merge_lora=lora_merge and done == max_steps, step=steps_done,
                    config=config, at_step=done, last_eval=metrics,
                    evaluated_at=evaluated_at, round_log=round_log, **round_state(),
                    **resume_state(optimizer=optimizer, scaler=scaler, logger=logger))


bounds = [max_steps * r // n_rounds for r in range(n_rounds + 1)]  # round r trains steps bounds[r] .. bounds[r+1]-1
bar = tqdm(total=max_steps, initial=at, desc=loss if not ONLINE else f"{'online' if online else 'spin'} {loss}",
           disable=not dist.is_main())
for r in range(n_rounds):
    if bounds[r + 1] <= at:  # trained before the checkpoint
        continue
    inside = bounds[r] < at  # resumed inside this round: its pairs and reference as the checkpoint has them
    if inside:
        restore_round(ckpt)
    elif ONLINE:  # fresh pairs from the policy as it is now
        seqs, stats = dist.broadcast_object(make_pairs(r))  # torchrun: every rank samples alike; rank 0's pairs for all
        round_log.append(stats)
        logger.log(step=bounds[r], **stats)
        bar.write(f"round {r + 1}: " + " ".join(f"{k[6:]} {v:.3f}" if isinstance(v, float) else f"{k[6:]} {v}"
                                               for k, v in stats.items() if k.startswith("round/")))
        if not seqs:
            bar.write(f"round {r + 1}: no pairs (every prompt tied); its {bounds[r + 1] - bounds[r]} steps are skipped")
            bar.update(bounds[r + 1] - bounds[r])
            continue
    if not REFERENCE_FREE and not inside:
        set_reference(round_reference())
    policy.train()
    for step in range(max(bounds[r], at), bounds[r + 1]):
        idx = torch.randint(len(seqs), (batch_size * grad_accum,), generator=step_generator(seed, step)).tolist()
        for g in optimizer.param_groups:
            g["lr"] = cosine_lr(step, lr, warmup_steps, lr_decay_steps or max_steps, min_lr)
        z0 = kto_z0(idx) if loss == "kto" and (grad_accum > 1 or dist.world() > 1) else None
        loss_value, stats = 0.0, {}
        for i in range(0, len(idx), batch_size):  # micro-batches: their gradients add up to the step's
            part, part_stats = compute_loss(dist.shard(idx[i:i + batch_size], "--batch_size"), idx, z0)  # rank's share
            scaler.scale(part).backward()
            loss_value += part.item()
            stats = {k: stats.get(k, 0.0) + v for k, v in part_stats.items()}
        loss_value, stats = dist.all_reduce(loss_value), dist.all_reduce(stats)  # the ranks' shares added up
        grad_norm = optimizer_step(policy, optimizer, scaler, grad_clip, loss_value, f"step {step + 1}")
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}")
        done, steps_done = step + 1, steps_done + 1
        if done % log_interval == 0:
            logger.log(step=done, loss=loss_value, grad_norm=grad_norm, lr=optimizer.param_groups[0]["lr"], **stats)
        if done % eval_interval == 0 or done == max_steps:
            policy.eval()
            metrics, evaluated_at = evaluate(), done
            policy.train()
            logger.log(step=done, **metrics)
            bar.write(f"step {done} " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items()))
        if done % ckpt_interval == 0 and done < max_steps:  # the last one is written after the evaluation below
            save(done)
bar.close()
if evaluated_at != max_steps:  # the last round(s) had no pairs
    policy.eval()
    metrics = evaluate()
    logger.log(step=max_steps, **metrics)

if data_path == "builtin" or (eval_records and loss != "kto"):  # the policy as a reward model, on held-out pairs
    held_out = data.normalise(task.preference_records(n_eval_pairs, seed, split="test"), "preference") \
        if data_path == "builtin" else eval_records[:n_eval_pairs]  # built-in: the pairs train_rm.py is measured on
    msgs = [p["prompt"] for p in held_out]
    reference = reference_model(policy, init_from, tokenizer, device)
    r_c, r_r = (implicit_rewards(policy, reference, tok, msgs, [p[k] for p in held_out], beta)
                for k in ("chosen", "rejected"))
    g_c, g_r = (torch.tensor([task.gold(p["prompt"][-1]["content"], p[k]) for p in held_out])
                for k in ("chosen", "rejected")) if data_path == "builtin" else (None, None)
    metrics["pairs/acc_labels"], acc_gold = pair_accuracy(r_c, r_r, g_c, g_r)
    if acc_gold is not None:
        metrics["pairs/acc_gold"] = acc_gold
    metrics["pairs/margin"] = (r_c - r_r).mean().item()  # beta * (log-ratio of chosen - of rejected)
    print(f"implicit reward on {len(held_out)} held-out pairs: accuracy vs labels {metrics['pairs/acc_labels']:.3f}"
          + (f", vs gold {acc_gold:.3f}" if acc_gold is not None else "") + f", margin {metrics['pairs/margin']:.3f}")

save(max_steps)
summary = {"loss": loss, "mode": "online" if online else "spin" if spin else "offline", "steps": steps_done,
           "elapsed_s": round(time.time() - t0, 1), "checkpoint": ckpt_path, "n_eval_prompts": len(eval_prompts),
           "start": start, "final": metrics}
if ONLINE:
    summary.update({"judge": judge if online else None, "ref_update": ref_update, "rounds": round_log})
write_json(os.path.join(out_dir, "summary.json"), summary)
shown = [k for k in ("eval/win_rate", "eval/judge_win_rate", "eval/kl", "eval/gold", "eval/judge", "eval/length")
         if k in metrics]
print("held-out (SFT -> final): " + "; ".join(f"{k[5:]} " + (f"{start[k]:.3f} -> " if k in start else "")
                                             + f"{metrics[k]:.3f}" for k in shown) + f"\nwrote {ckpt_path}")
