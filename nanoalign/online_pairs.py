"""
Online preference pairs, for iterative DPO (Xu et al. 2023) and SPIN (Chen et al. 2024), as train_dpo.py
--online / --spin make them at the start of each round: from the current policy's own samples.

    online: k samples per prompt, scored by a judge; the best and the worst of a prompt become a pair.
    SPIN:   one sample per prompt; chosen = the prompt's demonstration, rejected = the policy's sample.

Pairs hold the sampled tokens exactly as they were sampled (an unfinished response has no EOS appended), in
`rewards.response_tokens`' (ids, response mask) format, so their log-probs are those of what was sampled.
"""
from nanoalign import task
from nanoalign.rewards import response_tokens


def best_vs_worst(scores):
    """Online pairing. `scores`: for each prompt, its k samples' judge scores (-inf: unfinished).
    -> (pairs, n_tied): (prompt index, index of the best sample, index of the worst) for every prompt whose
    best scores higher than its worst (the first best and the first worst in sample order), and the
    number of prompts skipped because all their scores tie (no preference to learn)."""
    pairs, tied = [], 0
    for i, s in enumerate(scores):
        best = max(range(len(s)), key=lambda j: s[j])
        worst = min(range(len(s)), key=lambda j: s[j])
        if s[best] > s[worst]:
            pairs.append((i, best, worst))
        else:
            tied += 1
    return pairs, tied


def round_pairs(policy, tok, chunk, judge_scores, k, max_new_tokens, generator, builtin, **sampling):
    """One round's pairs. `chunk`: the round's prompts, each (chat messages, prompt text for the built-in task's
    scorers or None, demonstration or None); `judge_scores(msgs, prompt_texts, texts)` -> a score per sample
    (online), or None for SPIN (then k must be 1). -> (pairs as [chosen seq, rejected seq], round statistics):
    round/eos_frac, round/pairs, round/tied_frac; online round/judge_mean (finished samples), built-in task
    round/gold_mean (unfinished: 0) and, online, round/judge_gold_acc (how often gold orders a pair as the judge
    did, of the pairs whose gold differs). An unfinished sample ranks below every finished one; a SPIN sample
    that reproduced its demonstration is skipped (counted as tied)."""
    assert judge_scores is not None or k == 1, "SPIN takes one sample per prompt"
    rows = [c for c in chunk for _ in range(k)]  # prompt i's samples are rows i*k .. i*k + k-1
    samples = task.sample_responses(policy, tok, [c[0] for c in rows], max_new_tokens=max_new_tokens, batch_size=256,
                                    generator=generator, **sampling)
    texts, ended = [s[0] for s in samples], [s[1] for s in samples]  # s[3]: the tokens exactly as sampled
    stats = {"round/eos_frac": sum(ended) / len(samples)}
    if builtin:
        stats["round/gold_mean"] = sum(task.gold(c[1], t) if e else 0.0 for c, t, e in zip(rows, texts, ended)) / len(rows)
    if judge_scores is None:  # SPIN
        new, tied = [], 0
        for (msgs, _, demo), (text, e, _, seq) in zip(chunk, samples):
            if e and text == demo:  # the policy reproduced the demonstration: nothing to push apart
                tied += 1
            else:
                new.append([response_tokens(tok, msgs, demo), seq])
    else:
        scores = judge_scores([c[0] for c in rows], [c[1] for c in rows], texts)
        finished = [s for s, e in zip(scores, ended) if e]
        stats["round/judge_mean"] = sum(finished) / len(finished) if finished else 0.0
        ranked = [s if e else float("-inf") for s, e in zip(scores, ended)]  # unfinished: below everything
        pairs, tied = best_vs_worst([ranked[i * k:(i + 1) * k] for i in range(len(chunk))])
        new = [[samples[i * k + b][3], samples[i * k + w][3]] for i, b, w in pairs]
        if builtin:  # how often the judge's best-vs-worst order is gold's (pairs whose gold differs)
            g = [(task.gold(chunk[i][1], texts[i * k + b]), task.gold(chunk[i][1], texts[i * k + w]) if ended[i * k + w]
                  else 0.0) for i, b, w in pairs]
            hits = [x > y for x, y in g if x != y]
            stats["round/judge_gold_acc"] = sum(hits) / len(hits) if hits else float("nan")
    stats.update({"round/pairs": len(new), "round/tied_frac": tied / len(chunk)})
    return new, stats
