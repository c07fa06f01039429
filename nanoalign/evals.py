"""
The evaluations every stage can report, one function each: diversity (distinct-n), length mean and
spread, the gold win rate against the start policy, the policy's entropy on its own samples, the
alignment tax (held-out demonstration NLL), and the release gate that decides whether a run may ship.

The sample statistics are pure functions of what a stage already sampled and scored (`sample_metrics`
bundles them), so calling them draws no random numbers and changes nothing a stage computes. The two
that need a model (`mean_entropy`, `demonstration_nll`) run it under no_grad in eval mode.

What a stage calls at each evaluation: `policy_samples` draws and scores one response per held-out prompt
with a generator of its own, once for the start policy and at every evaluation for the policy, and
`evaluate_policy` turns the policy's samples, paired with the start's, into the metrics every stage logs.
"""
import torch

from nanoalign import task
from nanoalign.core import model_logprobs, pad
from nanoalign.rewards import logratios, response_tokens


def _units(sample):
    """A sample's units for n-grams: a token-id sequence as it is; a text split into whitespace words."""
    if isinstance(sample, str):
        return sample.split()
    return sample.tolist() if isinstance(sample, torch.Tensor) else list(sample)  # tensors hash by identity


def distinct_n(samples, n):
    """distinct-n (Li et al. 2016), pooled over all samples:

        distinct-n = |{unique n-grams over all samples}| / (total number of n-grams over all samples)

    A sample is a token-id sequence (list, tuple or 1-D tensor) or a text, split into whitespace words
    as in the paper (the built-in task's responses have no spaces: pass their token ids). A sample
    shorter than n contributes no n-gram; with no n-gram at all the value is 0. 1 means no n-gram
    repeats anywhere; a policy that collapses onto a few responses goes towards 0."""
    grams = [tuple(u[i:i + n]) for u in map(_units, samples) for i in range(len(u) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def length_stats(lengths):
    """-> (mean, std) of response lengths, the std over the samples as they are (not the unbiased one):

        mean = sum_i l_i / N,   std = sqrt(sum_i (l_i - mean)^2 / N)

    A length drift is the first sign of reward hacking through verbosity (or, as with an exploited
    reward model here, through truncated fragments); the std tells one long tail from a uniform shift."""
    lengths = [float(l) for l in lengths]
    mean = sum(lengths) / len(lengths)
    return mean, (sum((l - mean) ** 2 for l in lengths) / len(lengths)) ** 0.5


def win_rate(a, b):
    """The win rate of scores `a` against `b`, paired (a[i] and b[i] answer the same prompt):

        win rate = P(a > b) + 0.5 * P(a = b) = (#{a_i > b_i} + 0.5 #{a_i = b_i}) / N

    With gold scores of the policy's and the start policy's samples this is train_dpo.py's
    eval/win_rate (the same sum in the same order). 0.5: no better than the start."""
    assert len(a) == len(b) and len(a) > 0, (len(a), len(b))
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)) / len(a)


def _scored_batches(model, seqs, pad_id, temperature, batch_size, with_entropy=False):
    """(log-probs, entropies or None, scored mask) [B, T - 1] of (ids, response mask) pairs, batch by batch,
    in eval mode (restored after): position t predicts token t + 1, scored where that token is a response
    token. Right padding, so no attention mask is needed; the LM head runs at the scored positions only."""
    was_training = model.training
    model.eval()
    dev = model.lm_head.weight.device
    for i in range(0, len(seqs), batch_size):
        ids, _ = pad([s[0] for s in seqs[i:i + batch_size]], pad_id)
        m, _ = pad([s[1] for s in seqs[i:i + batch_size]], 0)
        scored = m[:, 1:].to(dev)
        res = model_logprobs(model, ids.to(dev), scored, temperature=temperature, with_entropy=with_entropy)
        yield (*res, scored) if with_entropy else (res, None, scored)
    model.train(was_training)


@torch.no_grad()
def mean_entropy(model, seqs, pad_id, temperature=1.0, batch_size=64):
    """Mean per-token entropy of the policy on its own samples, over all their response tokens:

        H = sum_i sum_t H(pi(. | x_i, y_i<t)) / sum_i |y_i|,  H(p) = -sum_v p_v log p_v

    `seqs`: (ids, response mask) pairs as `task.sample_responses` returns them (its 4th field), the
    tokens as sampled. A policy that stops exploring (entropy collapse) shows here before its samples
    lose diversity. Float32, at the sampling temperature."""
    total, count = 0.0, 0
    for _, ent, scored in _scored_batches(model, seqs, pad_id, temperature, batch_size, with_entropy=True):
        total, count = total + ent.sum().item(), count + int(scored.sum())
    return total / max(count, 1)


@torch.no_grad()
def demonstration_nll(model, tok, records, batch_size=64):
    """The alignment tax's measure: the mean NLL per token of fixed held-out demonstrations,

        NLL = -sum_i sum_t log pi(y_it | x_i, y_i<t) / sum_i |y_i|   (|y_i| counts the closing EOS)

    `records`: {"prompt", "response"} dicts, e.g. the built-in task's `task.sft_records(512, seed,
    split="val")`, exactly the set and the per-token mean of train_sft.py's val_loss (so the SFT model's
    value is its own val_loss). The alignment stages never train on these demonstrations: measured on
    the start policy and on the trained one, the rise (final - start) is what alignment cost in the
    imitation skill SFT taught, the alignment tax. A response longer than the context loses its
    prompt's start, as `rewards.implicit_rewards` does."""
    T = model.config.block_size
    seqs = [response_tokens(tok, [{"role": "user", "content": r["prompt"]}], r["response"]) for r in records]
    seqs = [(ids[-T:], m[-T:]) for ids, m in seqs]
    total, count = 0.0, 0
    for logp, _, scored in _scored_batches(model, seqs, tok.pad_id, 1.0, batch_size):
        total, count = total + logp.sum().item(), count + int(scored.sum())  # every response token and the EOS
    return -total / count


def sample_metrics(responses, lengths=None, gold=None, passed=None, start_gold=None, kl=None, entropy=None,
                   prefix="eval/"):
    """The evaluation set of one batch of held-out samples, from what a stage already has:

    responses   token-id sequences of the sampled responses (or texts; distinct-n then counts words)
    lengths     their lengths in tokens (None: len of each token-id response)
    gold        a score per sample (the gold scorer, or a judge's)  -> gold: the mean
    passed      1/0 per sample (the verifier)                       -> pass: the mean
    start_gold  the start policy's scores of its own samples, paired with `gold` (same prompts)
                                                                     -> win_rate (`win_rate(gold, start_gold)`)
    kl          per-sample sum_t log pi/pi_ref (`rewards.logratios`) -> kl: the mean, an estimate of KL(pi || ref)
    entropy     `mean_entropy(...)` of the samples, passed through  -> entropy
    Always: length, length_std (`length_stats`), distinct_1, distinct_2 (`distinct_n`).
    -> {prefix + name: float}; what was not given is left out."""
    if lengths is None:
        lengths = [len(r) for r in responses]
    mean, std = length_stats(lengths)
    out = {"length": mean, "length_std": std, "distinct_1": distinct_n(responses, 1),
           "distinct_2": distinct_n(responses, 2)}
    if gold is not None:
        out["gold"] = sum(gold) / len(gold)
    if passed is not None:
        out["pass"] = sum(passed) / len(passed)
    if start_gold is not None:
        out["win_rate"] = win_rate(gold, start_gold)
    if kl is not None:
        kl = [float(k) for k in kl]
        out["kl"] = sum(kl) / len(kl)
    if entropy is not None:
        out["entropy"] = float(entropy)
    return {prefix + k: v for k, v in out.items()}


def policy_samples(model, tok, prompts, seed, gold_fn=None, pass_fn=None, judge=None, temperature=1.0,
                   max_new_tokens=task.MAX_NEW_TOKENS, top_k=None, top_p=None, batch_size=64):
    """One response per prompt (a user-message string or a list of chat messages) from `model`, sampled with a
    generator of its own seeded with `seed`, never one the training draws from: evaluating changes no training
    sample. Then scored by the scorers given (each optional):

      gold_fn(prompt, text) -> float     the gold scorer (built-in task: task.gold)          unfinished: 0
      pass_fn(prompt, text) -> 0 or 1    the verifier (task.verify, rewards.answer_reward)   unfinished: 0, fails
      judge(messages, texts) -> floats   a learned judge (rewards.rm_judge), finished only   unfinished: None

    A sample without EOS is unfinished (task.evaluate's rule). -> a dict of per-sample lists: "text", "ended",
    "length" (tokens, the EOS counted), "seq" (the tokens exactly as sampled, `task.sample_responses`' 4th
    field), "gold" / "pass" / "judge" for the scorers given, and "temperature", the one evaluate_policy then
    scores log-probs at. With the same arguments the same model gives the same samples."""
    g = torch.Generator(device=model.transformer.wte.weight.device).manual_seed(seed)
    drawn = task.sample_responses(model, tok, prompts, temperature=temperature, max_new_tokens=max_new_tokens,
                                  batch_size=batch_size, generator=g, top_k=top_k, top_p=top_p)
    s = {"text": [d[0] for d in drawn], "ended": [d[1] for d in drawn], "length": [d[2] for d in drawn],
         "seq": [d[3] for d in drawn], "temperature": temperature}
    for name, fn in (("gold", gold_fn), ("pass", pass_fn)):
        if fn is not None:
            s[name] = [fn(p, t) if e else 0.0 for p, t, e in zip(prompts, s["text"], s["ended"])]
    if judge is not None:  # a judge reads the EOS (an outcome RM) or needs whole steps: finished samples only
        done = [i for i, e in enumerate(s["ended"]) if e]
        msgs = [[{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
        scores = judge([msgs[i] for i in done], [s["text"][i] for i in done]) if done else []
        s["judge"] = [None] * len(prompts)
        for i, x in zip(done, scores):
            s["judge"][i] = float(x)
    return s


@torch.no_grad()
def evaluate_policy(policy, tok, samples, start=None, reference=None, demos=None, batch_size=64, prefix="eval/"):
    """The evaluation every stage logs: the policy's held-out samples (`policy_samples`), paired prompt by
    prompt with the start policy's (`start`: policy_samples of the start, on the same prompts with the same
    scorers, drawn once since the start does not change; None: no win rates). -> {prefix + name: float}:

      length, length_std, distinct_1, distinct_2   `sample_metrics` of the responses' token ids (EOS included)
      eos                                          the fraction of samples that ended with EOS
      gold, pass                                   the mean gold score and the pass rate (if scored)
      win_rate                                     `win_rate(gold, start's gold)`: P(gold > start's) + 0.5 P(tie)
      judge                                        the judge's mean score of the finished samples (nan if none)
      judge_win_rate                               its win rate against the start's, an unfinished sample ranked
                                                   below every finished one (ties with another unfinished)
      kl (reference given)                         mean over samples of sum_t [log pi(y_t|.) - log pi_ref(y_t|.)]
                                                   on the tokens as sampled (`rewards.logratios`): the k1 estimator,
                                                   unbiased for the sequence-level KL(pi || pi_ref), noisy, can be < 0
      entropy                                      `mean_entropy` of the samples
      demo_nll (demos given)                       `demonstration_nll` of demos: the alignment tax, measured on the
                                                   start too (evaluate it as the policy there), its rise is the tax

    Log-probs (kl, entropy) are float32 at the samples' temperature, of the full softmax even when top-k/top-p
    filtered the sampling: the reference's filtered set need not hold a sampled token (an infinite KL). The
    policy runs in eval mode (restored after); nothing here draws a random number."""
    was_training = policy.training
    policy.eval()
    temperature, n = samples["temperature"], len(samples["seq"])
    responses = [ids[len(ids) - k:] for (ids, _), k in zip(samples["seq"], samples["length"])]
    out = sample_metrics(responses, samples["length"], samples.get("gold"), samples.get("pass"),
                         start["gold"] if start is not None and "gold" in samples else None,
                         entropy=mean_entropy(policy, samples["seq"], tok.pad_id, temperature, batch_size), prefix="")
    out["eos"] = sum(samples["ended"]) / n
    if "judge" in samples:
        done = [x for x in samples["judge"] if x is not None]
        out["judge"] = sum(done) / len(done) if done else float("nan")
        if start is not None:
            ranked = lambda scores: [float("-inf") if x is None else x for x in scores]  # unfinished: last
            out["judge_win_rate"] = win_rate(ranked(samples["judge"]), ranked(start["judge"]))
    if reference is not None:  # train_dpo.py's eval/kl, the same sum in the same order
        out["kl"] = logratios(policy, reference, samples["seq"], tok.pad_id, batch_size=batch_size,
                              temperature=temperature).mean().item()
    if demos is not None:
        out["demo_nll"] = demonstration_nll(policy, tok, demos, batch_size)
    policy.train(was_training)
    return {prefix + k: v for k, v in out.items()}


def release_gate(proxy_delta, gold_delta, length_delta, max_length_delta=20, min_gold_delta=0.0):
    """May a run ship? Its changes from the start policy: the proxy reward it optimised (a reward model's
    or judge's score), the gold (or human) score, and the mean response length in tokens. It ships iff

        gold_delta > min_gold_delta   and   |length_delta| <= max_length_delta

    The proxy alone never decides: a proxy that rises while gold does not is the signature of reward
    over-optimisation (Gao et al. 2023), and a length change beyond the limit means the gain may be the
    length, not the quality (Singhal et al. 2023), either way. -> (ship: bool, reasons: list of str,
    one per failed condition, empty when it ships). Example: proxy +0.31, gold -0.04, length +48 with
    a limit of 20 -> (False, [gold, length])."""
    reasons = []
    if not gold_delta > min_gold_delta:
        if gold_delta < 0:
            why = f"gold fell by {-gold_delta:.3f}"
        else:
            why = f"gold rose by only {gold_delta:.3f}" if gold_delta > 0 else "gold did not change"
        if min_gold_delta > 0:
            why += f" (the gate asks for more than {min_gold_delta:.3f})"
        if proxy_delta > 0:
            why += f" while the proxy rose by {proxy_delta:.3f}: the proxy's gain is not real (over-optimisation)"
        reasons.append(why)
    if abs(length_delta) > max_length_delta:
        reasons.append(f"length {'grew' if length_delta > 0 else 'shrank'} by {abs(length_delta):.1f} tokens, more "
                       f"than the limit of {max_length_delta:g}: the gain may be length, not quality")
    return not reasons, reasons
