"""
Best-of-N: sample N responses per held-out prompt from a policy, keep the one a judge ranks highest,
and report the gold score of what was kept. How much a judge gains with N, and where it stops gaining
while the gold scorer (the ceiling) keeps going, is how good a learned judge is.

    python best_of_n.py    # SFT policy; judges: out/rm (outcome), out/prm (process), the ensemble, gold

Judges: `outcome` (the first RM in --rms), `ensemble-min` (the minimum of the normalised rewards of
all RMs in --rms, a pessimistic ensemble: Coste et al. 2023), `process` (the PRM's weakest step),
`dpo implicit` (with --dpo: a DPO-trained policy's log pi/pi_ref, its reference the checkpoint
train_dpo.py started from), `gold` (the gold scorer itself: the ceiling). N = 1 is the policy alone.
A response that never emitted EOS is unfinished: every judge ranks it last and its gold score is 0.
"""
import os

import torch

from nanoalign import task
from nanoalign.rewards import best_of_n, implicit_rewards, outcome_scores, process_score, step_scores
from nanoalign.utils import (CheckpointError, check_tokenizers, configure, load_checkpoint, run_path, setup_device,
                             write_json)

# ---- config (override with --key=value or a config file; --help lists them)
policy = "out/sft/ckpt.pt"  # the policy that samples the candidates
rms = "out/rm/ckpt.pt"  # outcome reward models, comma-separated (more than one adds the ensemble-min judge)
prm = "out/prm/ckpt.pt"  # process reward model ("" to leave it out)
dpo = ""  # a policy from train_dpo.py: its implicit reward is one more judge ("" to leave it out)
n_prompts = 256  # held-out (test split) prompts
ns = "1,2,4,8,16"  # the values of N; the largest is sampled once, smaller N use its first samples
temperature = 1.0  # sampling temperature of the candidates
seed = 1337  # seeds prompts and sampling
out = "out/best_of_n.json"  # where the table is written
device = "auto"  # "auto", "cpu", "cuda", ...
# ---- end config
config = configure(globals())
device, _, _ = setup_device(device, "float32")
Ns = [int(n) for n in ns.split(",")]
N = max(Ns)

model, tok, _ = load_checkpoint(policy, device, expect="gpt", what="--policy")
prompts = task.prompts(n_prompts, seed, split="test")
flat = [p for p in prompts for _ in range(N)]  # prompt i's candidates are rows i*N .. i*N + N-1
samples = task.sample_responses(model, tok, flat, temperature=temperature,
                                generator=torch.Generator(device=device).manual_seed(seed))
texts, ended = [s[0] for s in samples], torch.tensor([s[1] for s in samples])
gold = torch.tensor([task.gold(p, t) if e else 0.0 for p, t, e in zip(flat, texts, ended.tolist())])
passed = torch.tensor([task.verify(p, t) if e else 0.0 for p, t, e in zip(flat, texts, ended.tolist())])
messages = [[{"role": "user", "content": p}] for p in flat]

judges = {}


def load_judge(path, rm_kind, what):
    """A reward model of `rm_kind` ("outcome" or "process") that reads the policy's token ids."""
    rm, rm_tok, ckpt = load_checkpoint(path, device, expect="scalar", what=what)
    check_tokenizers(tok, rm_tok, f"--policy={policy}", f"{what} {path}")
    if ckpt.get("rm_kind", "outcome") != rm_kind:
        raise CheckpointError(f"{what} {path} holds a reward model of kind {ckpt.get('rm_kind', 'outcome')!r}; "
                              f"{what} takes {rm_kind!r} ones")
    return rm.eval()


rm_paths = [r for r in rms.split(",") if r]
rm_scores = [outcome_scores(load_judge(r, "outcome", "--rms"), tok, messages, texts) for r in rm_paths]
if rm_scores:
    judges["outcome"] = rm_scores[0]
if len(rm_scores) > 1:
    judges[f"ensemble-min (k={len(rm_scores)})"] = torch.stack(rm_scores).min(0).values
if prm == "out/prm/ckpt.pt" and not os.path.exists(prm):  # the default, not trained: leave that judge out
    print(f"no {prm} (python train_rm.py --kind=process --out_dir=out/prm --max_steps=1500): no process judge")
    prm = ""
if prm:
    probs = step_scores(load_judge(prm, "process", "--prm"), tok, messages, texts)
    judges["process"] = torch.tensor([process_score(s) for s in probs])
if dpo:
    dpo_policy, dpo_tok, dpo_ckpt = load_checkpoint(dpo, device, expect="gpt", what="--dpo")
    check_tokenizers(tok, dpo_tok, f"--policy={policy}", f"--dpo={dpo}")
    ref_path = run_path(dpo_ckpt, dpo_ckpt["config"]["init_from"])  # relative to where DPO ran, not to here
    dpo_ref = load_checkpoint(ref_path, device, expect="gpt", what="--dpo's init_from")[0]
    judges["dpo implicit"] = implicit_rewards(dpo_policy.eval(), dpo_ref.eval(), tok, messages, texts)
judges["gold (ceiling)"] = gold

table = {}
for name, score in judges.items():
    score = score.masked_fill(~ended, float("-inf")).view(n_prompts, N)
    row = {}
    for n in Ns:
        pick = best_of_n(score[:, :n]) + torch.arange(n_prompts) * N
        row[n] = {"gold": gold[pick].mean().item(), "pass": passed[pick].mean().item()}
    table[name] = row

print(f"best-of-N on {n_prompts} held-out prompts; policy {policy}; gold score of the kept response (pass rate)\n")
print("| judge | " + " | ".join(f"N={n}" for n in Ns) + " |")
print("| --- | " + " | ".join("---:" for _ in Ns) + " |")
for name, row in table.items():
    print(f"| {name} | " + " | ".join(f"{row[n]['gold']:.3f} ({row[n]['pass']:.0%})" for n in Ns) + " |")
os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
write_json(out, {"config": config, "table": table})  # strict JSON: a NaN would be written as null
print(f"\nwrote {out}")
