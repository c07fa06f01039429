"""
AI feedback (Constitutional AI, RLAIF): a chat model that has learned the feedback skills critiques,
revises and labels its own samples; this script measures those skills against the built-in task's
checkers and writes the data of Constitutional AI's two stages. The stages that train on the data are
the existing scripts.

    python constitutional.py --mode=measure    # the skills of out/sft_fb/ckpt.pt against the checkers and gold
    python constitutional.py --mode=sl         # SL-CAI: sample, critique, revise -> out/cai/sl.jsonl (SFT records)
    python constitutional.py --mode=rl         # RL-CAI: sample pairs, AI-label them -> out/cai/rl.jsonl (preferences)
    python constitutional.py --mode=rm --rm=out/rm_cai/ckpt.pt   # a reward model's agreement with gold, held out

    python train_sft.py --skills=solve,critique,revise,compare,score --out_dir=out/sft_fb   # the feedback model
    python train_sft.py --data_path=out/cai/sl.jsonl --init_from=out/sft_fb/ckpt.pt ...    # the SL-CAI model
    python train_rm.py --data_path=out/cai/rl.jsonl --init_from=out/sft_fb/ckpt.pt ...     # RL-CAI's reward model
    python train_dpo.py --data_path=out/cai/rl.jsonl --init_from=out/sft_fb/ckpt.pt ...    # RL-CAI by DPO
    python train_dpo.py --online=True --judge=self --init_from=out/sft_fb/ckpt.pt ...      # self-rewarding

(docs/ai_feedback.md has the measured commands and numbers.) With `--data_path=<file>` the prompts come
from an SFT or preference file and `--constitution=<file>` (one principle per line) replaces the task's;
then nothing is measured against gold, but the same files are written for any nanoalign chat model.

Details:
1. One principle is drawn per request (random.Random(seed)); critiques and revisions are greedy
   (feedback_temperature 0), the responses they improve are sampled at `temperature`.
2. SL-CAI: each finished sample goes through `rounds` critique -> revise rounds (feedback.critique_and_revise);
   the record is (prompt, final revision). A sample that did not finish (no EOS) is dropped.
   <out>.samples.jsonl holds the same samples unrevised: SFT on them is the control.
3. RL-CAI: two samples per prompt; pairs that are identical or unfinished are dropped. The label is
   P(first better) from the probabilities of the answer tokens "A" and "B", both orders averaged
   (feedback.pairwise_preference); chosen is the likelier, and "p_chosen" (>= 0.5) is the soft label
   train_rm.py trains on. Built-in task: <out>.gold.jsonl holds the same pairs labelled by gold (ties
   dropped), for DPO at equal pairs with the truth as the labeller.
4. measure (built-in task, held-out prompts and pairs): solving (gold, pass), critique exact accuracy
   against task.critique and detection (says "->" iff something breaks the principle), revision (the
   model's own critique, then its revision: gold before and after, fixed / broken / copied), pairwise
   agreement with gold and with the principle's checker on the reward models' held-out pairs, and the
   pointwise judge's correlation with gold and its pair accuracy on the same pairs.
5. --feedback_by=demonstrator (built-in task, sl and rl): the task's flawed critic, reviser and pairwise
   judge (task.critique / revise / compare, the teachers of the skills) give the feedback instead of the
   model: what the pipelines give if the model had learned its feedback skills as well as its teachers.
"""
import json
import os
import random

import torch

from nanoalign import data, feedback, task
from nanoalign.rewards import outcome_scores, pair_accuracy
from nanoalign.utils import configure, load_checkpoint, setup_device, write_json

# ---- config (override with --key=value or a config file; --help lists them)
mode = "measure"  # "measure" (the skills), "sl" (SL-CAI records), "rl" (AI-labelled pairs), "rm" (an RM vs gold)
init_from = "out/sft_fb/ckpt.pt"  # the chat model that samples and gives the feedback
rm = "out/rm_cai/ckpt.pt"  # mode rm: the reward model measured
data_path = "builtin"  # "builtin" (train-split prompts of the task), or an SFT/preference file: its prompts
data_kind = "sft"  # a file's kind: "sft" (the conversation before its final reply) or "preference" (its prompt)
constitution = ""  # "": task.CONSTITUTION; or a text file, one principle per line
out_path = ""  # sl/rl: the file written ("": out/cai/<mode>.jsonl); a <name>.summary.json goes beside it
n_prompts = 2048  # sl/rl: prompts sampled (rl: two responses each)
rounds = 2  # sl: critique -> revise rounds per response
temperature = 1.0  # sampling temperature of the responses that get feedback
feedback_temperature = 0.0  # critiques and revisions (0: greedy)
both_orders = True  # rl/measure: average the pairwise judgement over both orders (cancels position bias)
feedback_by = "model"  # sl/rl: "model", or "demonstrator": the task's own flawed feedback demonstrators (a control)
n_judge = 3  # measure: sampled pointwise judgements averaged per response
solve_only = False  # measure: solving only (a model that was not trained on the feedback skills)
n_eval = 512  # measure: held-out prompts, and held-out pairs
n_examples = 6  # examples of each kind printed and kept in the summary
seed = 1337  # seeds prompts, principles and sampling
device = "auto"  # "auto", "cpu", "cuda", ...
# ---- end config
config = configure(globals())
assert mode in ("measure", "sl", "rl", "rm"), mode
device, _, _ = setup_device(device, "float32")
rng = random.Random(seed)
gen = torch.Generator(device=device).manual_seed(seed)
BUILTIN = data_path == "builtin"
principles = list(task.CONSTITUTION) if not constitution else \
    [line.strip() for line in open(constitution) if line.strip()]
out_path = out_path or f"out/cai/{mode}.jsonl"


def write_jsonl(path, records):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def finish(summary, path):
    write_json(path, summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "examples"}, indent=1))
    for e in summary.get("examples", [])[:n_examples]:
        print(json.dumps(e))
    print(f"wrote {path}")


if mode == "rm":  # a reward model on the built-in held-out pairs, against gold (as train_rm.py measures)
    model, tok, _ = load_checkpoint(rm, device, expect="scalar", what="--rm")
    model.eval()
    pairs = task.preference_records(1000, seed, split="test")
    msgs = [feedback.user(p["prompt"]) for p in pairs]
    r_c, r_r = (outcome_scores(model, tok, msgs, [p[k] for p in pairs]) for k in ("chosen", "rejected"))
    g_c, g_r = (torch.tensor([task.gold(p["prompt"], p[k]) for p in pairs]) for k in ("chosen", "rejected"))
    acc_labels, acc_gold = pair_accuracy(r_c, r_r, g_c, g_r)
    finish({"rm": rm, "n_pairs": len(pairs), "acc_labels": acc_labels, "acc_gold": acc_gold},
           os.path.join(os.path.dirname(rm), "gold_pairs.json"))
    raise SystemExit

model, tok, _ = load_checkpoint(init_from, device, expect="gpt", what="--init_from")
model.eval()

# -------------------------------------------------------------------------- prompts
if mode == "measure":
    assert BUILTIN, "measure needs the built-in task's checkers"
    prompt_msgs = [feedback.user(p) for p in task.prompts(n_eval, seed, split="test")]
elif BUILTIN:
    prompt_msgs = [feedback.user(p) for p in task.prompts(n_prompts, seed, split="train")]
else:  # a file's distinct prompts: an SFT file's conversations before their final reply, or a preference file's
    seen, prompt_msgs = set(), []
    for r in data.load(data_path, data_kind)[0]:
        msgs = r["prompt"] if data_kind == "preference" else r["messages"][:-1]
        if json.dumps(msgs) not in seen and msgs and msgs[-1]["role"] == "user":
            seen.add(json.dumps(msgs))
            prompt_msgs.append(msgs)
    prompt_msgs = prompt_msgs[:n_prompts]
problems = [m[-1]["content"] for m in prompt_msgs]  # what the feedback prompts quote
print(f"{mode}: {len(problems)} prompts, {len(principles)} principles, model {init_from}")


def sample(msgs):
    """One response per prompt at `temperature`: -> (texts, finished)."""
    s = task.sample_responses(model, tok, msgs, temperature=temperature, generator=gen, batch_size=256)
    return [x[0] for x in s], [x[1] for x in s]


def gold_of(problem, response):
    return task.gold(problem, response) if BUILTIN else float("nan")


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


# -------------------------------------------------------------------------- SL-CAI
if mode == "sl":
    texts, ended = sample(prompt_msgs)
    keep = [i for i, e in enumerate(ended) if e]
    if feedback_by == "model":
        final, log = feedback.critique_and_revise(model, tok, [problems[i] for i in keep], [texts[i] for i in keep],
                                                  principles, rng, rounds, feedback_temperature, gen)
    else:  # the control: the task's flawed critic and reviser in the model's place (detail 5)
        final, log = [texts[i] for i in keep], []
        for _ in range(rounds):
            ks = [rng.randrange(len(task.CONSTITUTION)) for _ in keep]
            crits = [task.critique(problems[i], f, k, rng) for i, f, k in zip(keep, final, ks)]
            revs = [task.revise(problems[i], f, c, rng) for i, f, c in zip(keep, final, crits)]
            log.append({"responses": final, "principles": [task.CONSTITUTION[k] for k in ks], "critiques": crits, "revisions": revs})
            final = revs
    write_jsonl(out_path, [{"messages": prompt_msgs[i] + [{"role": "assistant", "content": f}]} for i, f in zip(keep, final)])
    # the same samples unrevised: SFT on them is the control (self-distillation without feedback)
    write_jsonl(out_path.replace(".jsonl", ".samples.jsonl"),
                [{"messages": prompt_msgs[i] + [{"role": "assistant", "content": texts[i]}]} for i in keep])
    summary = {"mode": mode, "feedback_by": feedback_by, "out_path": out_path, "n_records": len(keep), "unfinished_dropped": len(texts) - len(keep),
               "rounds": rounds, "changed_frac": mean(f != texts[i] for i, f in zip(keep, final)),
               "changed_frac_per_round": [mean(r is not None and r != x for r, x in zip(l["revisions"], l["responses"]))
                                          for l in log]}
    if BUILTIN:
        before = [task.gold(problems[i], texts[i]) for i in keep]
        after = [task.gold(problems[i], f) for i, f in zip(keep, final)]
        summary.update({"gold_before": mean(before), "gold_after": mean(after),
                        "pass_before": mean(task.verify(problems[i], texts[i]) for i in keep),
                        "pass_after": mean(task.verify(problems[i], f) for i, f in zip(keep, final))})
    summary["examples"] = [{"problem": problems[i], "response": texts[i],
                            "critiques": [l["critiques"][j] for l in log], "final": final[j]}
                           for j, i in enumerate(keep) if final[j] != texts[i]][:n_examples]
    finish(summary, out_path.replace(".jsonl", ".summary.json"))

# -------------------------------------------------------------------------- RL-CAI
if mode == "rl":
    a, ea = sample(prompt_msgs)
    b, eb = sample(prompt_msgs)
    keep = [i for i in range(len(a)) if ea[i] and eb[i] and a[i] != b[i]]
    ks = [rng.choice(principles) for _ in keep]
    if feedback_by == "model":
        p, judged = feedback.pairwise_preference(model, tok, [problems[i] for i in keep], [a[i] for i in keep],
                                                 [b[i] for i in keep], ks, both_orders)
    else:  # the control: the task's flawed pairwise judge labels them (a hard label, p 1 or 0; detail 5)
        p = torch.tensor([float(task.compare(problems[i], a[i], b[i], task.CONSTITUTION.index(k), rng) == "A")
                          for i, k in zip(keep, ks)])
        judged = torch.ones(len(keep), dtype=torch.bool)
    records, gold_records, agree = [], [], []
    for j, i in enumerate(keep):
        if not judged[j]:
            continue
        first = float(p[j]) >= 0.5
        c, r = (a[i], b[i]) if first else (b[i], a[i])
        records.append({"prompt": prompt_msgs[i], "chosen": c, "rejected": r, "p_chosen": max(float(p[j]), 1 - float(p[j])),
                        "principle": ks[j]})
        if BUILTIN:
            gc, gr = task.gold(problems[i], c), task.gold(problems[i], r)
            if gc != gr:
                agree.append(gc > gr)
                gold_records.append({"prompt": prompt_msgs[i], "chosen": c if gc > gr else r, "rejected": r if gc > gr else c})
    write_jsonl(out_path, records)
    summary = {"mode": mode, "feedback_by": feedback_by, "out_path": out_path, "n_pairs": len(records), "sampled": len(a),
               "dropped_identical_or_unfinished": len(a) - len(keep), "not_judged": len(keep) - len(records),
               "mean_p_chosen": mean(r["p_chosen"] for r in records), "both_orders": both_orders}
    if BUILTIN:
        gold_path = out_path.replace(".jsonl", ".gold.jsonl")
        write_jsonl(gold_path, gold_records)
        summary.update({"gold_tied_frac": 1 - len(agree) / max(1, len(records)), "ai_label_gold_agreement": mean(agree),
                        "gold_path": gold_path, "n_gold_pairs": len(gold_records)})
    summary["examples"] = records[:n_examples]
    finish(summary, out_path.replace(".jsonl", ".summary.json"))

# -------------------------------------------------------------------------- measure the skills
if mode == "measure":
    ps = problems
    out = {"mode": mode, "init_from": init_from, "n_eval": len(ps)}
    # solving, as train_sft.py's summary measures it
    out["solve"] = task.evaluate(model, tok, ps, seed=seed)
    if solve_only:
        finish(out, os.path.join(os.path.dirname(init_from), "solve.json"))
        raise SystemExit
    texts, ended = sample(prompt_msgs)
    keep = [i for i, e in enumerate(ended) if e]
    ps_k, rs_k = [ps[i] for i in keep], [texts[i] for i in keep]
    # critique: the model's (greedy) critique of its own sample under a drawn principle, against the exact critic
    ks = [rng.randrange(len(task.CONSTITUTION)) for _ in keep]
    crit = feedback.complete(model, tok, [feedback.critique_prompt(p, r, task.CONSTITUTION[k]) for p, r, k in zip(ps_k, rs_k, ks)],
                             64, feedback_temperature, gen)
    true = [task.critique(p, r, k) for p, r, k in zip(ps_k, rs_k, ks)]
    flag = [c is not None and " -> " in c for c in crit]
    broken = [" -> " in t for t in true]
    nine = [b and t.rsplit(" -> ", 1)[0].split(";")[-1][2:3] == "9" for t, b in zip(true, broken)]  # a broken "+9" step
    out["critique"] = {"n": len(keep), "exact": mean(c == t for c, t in zip(crit, true)),
                       "detection": mean(f == b for f, b in zip(flag, broken)),
                       "recall": mean(f for f, b in zip(flag, broken) if b), "false_alarm": mean(f for f, b in zip(flag, broken) if not b),
                       "exact_when_broken": mean(c == t for c, t, b in zip(crit, true, broken) if b),
                       "recall_broken_plus9": mean(f for f, n9 in zip(flag, nine) if n9),
                       "unfinished": mean(c is None for c in crit), "broken_frac": mean(broken),
                       "by_principle": {task.CONSTITUTION[k]: mean(c == t for c, t, kk in zip(crit, true, ks) if kk == k)
                                        for k in range(len(task.CONSTITUTION))}}
    # revision: given the model's own critique; "fixed": a wrong response made right; "copied": flagged but unchanged
    todo = [j for j, c in enumerate(crit) if c is not None]
    revs = feedback.complete(model, tok, [feedback.revise_prompt(ps_k[j], rs_k[j], crit[j]) for j in todo], 64,
                             feedback_temperature, gen)
    rev = [rs_k[j] for j in range(len(keep))]
    for j, r in zip(todo, revs):
        rev[j] = r if r else rs_k[j]
    wrong = [task.verify(p, r) == 0 for p, r in zip(ps_k, rs_k)]
    out["revise"] = {"gold_before": mean(task.gold(p, r) for p, r in zip(ps_k, rs_k)),
                     "gold_after": mean(task.gold(p, r) for p, r in zip(ps_k, rev)),
                     "fixed_when_flagged_wrong": mean(task.verify(p, r) == 1 for p, r, w, f in zip(ps_k, rev, wrong, flag) if w and f),
                     "broke_right": mean(task.verify(p, r) == 0 for p, r, w in zip(ps_k, rev, wrong) if not w),
                     "copied_when_flagged": mean(r == s for r, s, f in zip(rev, rs_k, flag) if f),
                     "exact_given_own_critique": mean(r == task.revise(p, s, c, random.Random(0), 0.0, 0.0)
                                                  for p, s, c, r, f in zip(ps_k, rs_k, crit, rev, flag) if f and c)}
    final, _ = feedback.critique_and_revise(model, tok, ps_k, rs_k, principles, random.Random(seed), rounds,
                                            feedback_temperature, gen)
    out["revise"][f"gold_after_{rounds}_rounds"] = mean(task.gold(p, r) for p, r in zip(ps_k, final))
    out["revise"][f"pass_after_{rounds}_rounds"] = mean(task.verify(p, r) for p, r in zip(ps_k, final))
    out["revise"]["pass_before"] = mean(task.verify(p, r) for p, r in zip(ps_k, rs_k))
    # judges, on the reward models' held-out pairs (demonstrator samples at twice the slip rate)
    pairs = task.preference_records(n_eval, seed, split="test")
    swap = [rng.random() < 0.5 for _ in pairs]  # the records' chosen come first: shown first half the time only
    qs = [x["prompt"] for x in pairs]
    ca = [x["rejected"] if s else x["chosen"] for x, s in zip(pairs, swap)]  # shown as A
    cb = [x["chosen"] if s else x["rejected"] for x, s in zip(pairs, swap)]  # shown as B
    kp = [rng.randrange(len(task.CONSTITUTION)) for _ in pairs]
    g_a, g_b = torch.tensor([task.gold(q, x) for q, x in zip(qs, ca)]), torch.tensor([task.gold(q, x) for q, x in zip(qs, cb)])
    p2, _ = feedback.pairwise_preference(model, tok, qs, ca, cb, [task.CONSTITUTION[k] for k in kp], True)
    p1, _ = feedback.pairwise_preference(model, tok, qs, ca, cb, [task.CONSTITUTION[k] for k in kp], False)
    checker = [task.compare(q, x, y, k) for q, x, y, k in zip(qs, ca, cb, kp)]
    out["compare"] = {"n_pairs": len(pairs), "gold_tied_frac": (g_a == g_b).float().mean().item(),
                      "acc_gold_both_orders": pair_accuracy(p2, 1 - p2, g_a, g_b)[1],
                      "acc_gold_one_order": pair_accuracy(p1, 1 - p1, g_a, g_b)[1],
                      "acc_checker": mean((float(p) > 0.5) == (c == "A") for p, c in zip(p2, checker) if c is not None),
                      "mean_p_A_one_order": p1.mean().item(), "confident_frac": ((p2 - 0.5).abs() > 0.4).float().mean().item()}
    # pointwise judge: mean of n_judge sampled scores of each response of the held-out pairs
    s_a = feedback.pointwise_scores(model, tok, qs, ca, n_judge, 1.0, gen)
    s_b = feedback.pointwise_scores(model, tok, qs, cb, n_judge, 1.0, gen)
    sa, sb = (torch.tensor([x if x is not None else 0.0 for x in s]) for s in (s_a, s_b))
    xs, ys = torch.cat([sa, sb]), torch.cat([g_a, g_b])
    corr = torch.corrcoef(torch.stack([xs, ys]))[0, 1].item()
    one = [feedback.parse_score(t) for t in feedback.complete(model, tok, [feedback.score_prompt(q, x) for q, x in zip(qs, ca)],
                                                              4, 0.0, gen)]
    out["score"] = {"n_judge": n_judge, "corr_gold": corr, "acc_gold": pair_accuracy(sa, sb, g_a, g_b)[1],
                    "unparsed": mean(s is None for s in s_a + s_b),
                    "greedy_exact": mean(s == task.score(q, x) for s, q, x in zip(one, qs, ca))}
    out["examples"] = [{"problem": p, "response": r, "principle": task.CONSTITUTION[k], "critique": c, "true": t, "revision": v}
                       for p, r, k, c, t, v in zip(ps_k, rs_k, ks, crit, true, rev) if c != t or v != r][:n_examples]
    finish(out, os.path.join(os.path.dirname(init_from), "feedback_skills.json"))
