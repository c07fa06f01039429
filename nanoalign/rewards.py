"""
Judges: turning (prompt, response) texts into scores with outcome and process reward models (or a
DPO policy's implicit reward), and best-of-N selection.

A prompt is a list of chat messages; a response is the assistant's text. Every scored sequence is
`render_prompt(prompt) + encode(response) + [EOS]`, so the outcome reward is read at the EOS token.
"""
import math
import re

import torch

from nanoalign.core import model_logprobs, pad, sequence_logprob


def response_tokens(tok, prompt, response):
    """-> (ids, mask): prompt + response + EOS, mask 1 on the response and its EOS."""
    p, r = tok.render_prompt(prompt), tok.encode(response) + [tok.eos_id]
    return p + r, [0] * len(p) + [1] * len(r)


def response_logprobs(model, seqs, pad_id, temperature=1.0, body=None):
    """Sum and mean of the response-token log-probs of each (ids, response mask) from `response_tokens`,
    in one right-padded forward (no attention mask needed), float32, at `temperature`. -> ([N], [N]).
    Differentiable: DPO trains through it. The LM head runs at the response tokens only
    (`core.model_logprobs`); `body` is the function computing hidden states (default model.body)."""
    ids, _ = pad([s[0] for s in seqs], pad_id)
    m, _ = pad([s[1] for s in seqs], 0)
    ids, m = ids.to(model.lm_head.weight.device), m[:, 1:].to(model.lm_head.weight.device)
    logp = model_logprobs(model, ids, m, temperature=temperature, body=body)
    return sequence_logprob(logp, m), sequence_logprob(logp, m, average=True)


def step_tokens(tok, prompt, response, sep=";"):
    """Tokenise prompt + response step by step. -> (ids, positions): positions[i] is the index of the
    last token of step i (its result, just before the separator), where a process reward model reads
    that step's score. Steps and separators are encoded separately, so step boundaries are token
    boundaries for any tokenizer.

    Why not read at the separator, as Math-Shepherd does with its step tag? Checking "a+b=c" needs
    the sum the model forms at "=" compared with the c that follows; read at c that is one attention
    hop, read at the separator it is two, and a 4-layer model did not learn the second within the
    CPU budget (step accuracy stayed at the base rate; see README)."""
    ids, positions = tok.render_prompt(prompt), []
    parts = response.split(sep)
    for i, part in enumerate(parts):
        ids += tok.encode(part)
        if i < len(parts) - 1:  # a step: it was followed by a separator
            positions.append(len(ids) - 1)
            ids += tok.encode(sep)
    return ids + [tok.eos_id], positions


@torch.no_grad()
def outcome_scores(rm, tok, prompts, responses, batch_size=64):
    """Normalised reward of each (prompt, response), read at its EOS. -> float32 tensor [N].
    A sequence longer than the context loses the start of its prompt (a judge must score everything)."""
    device, out, T = rm.head.weight.device, [], rm.config.block_size
    for i in range(0, len(prompts), batch_size):
        seqs = [response_tokens(tok, p, r)[0][-T:] for p, r in zip(prompts[i:i + batch_size], responses[i:i + batch_size])]
        ids, mask = pad(seqs, tok.pad_id)
        out.append(rm.reward(ids.to(device), mask.to(device)).cpu())
    return torch.cat(out)


@torch.no_grad()
def step_scores(prm, tok, prompts, responses, batch_size=64):
    """P(step correct) for each step of each response, from a process reward model. -> list of [S_i] tensors."""
    device, out, T = prm.head.weight.device, [], prm.config.block_size
    for i in range(0, len(prompts), batch_size):
        items = [step_tokens(tok, p, r) for p, r in zip(prompts[i:i + batch_size], responses[i:i + batch_size])]
        cut = [max(0, len(ids) - T) for ids, _ in items]  # too long: drop the prompt's start (and its steps)
        items = [(ids[c:], [q - c for q in pos if q >= c]) for (ids, pos), c in zip(items, cut)]
        ids, mask = pad([it[0] for it in items], tok.pad_id)
        logits = prm(ids.to(device), mask.to(device)).cpu()
        out += [torch.sigmoid(logits[j, pos]) for j, (_, pos) in enumerate(items)]
    return out


@torch.no_grad()
def implicit_rewards(policy, ref, tok, prompts, responses, beta=1.0, batch_size=64):
    """DPO's implicit reward of each (prompt, response) (Rafailov et al. 2023, section 5): a policy trained
    by DPO against `ref` defines r(x, y) = beta * (log pi(y|x) - log pi_ref(y|x)) up to a term of x alone,
    so it ranks the responses to one prompt like a reward model. ref=None: beta * log pi(y|x), the
    policy's own likelihood as a judge. Sums over the response and its EOS, float32. -> [N]"""
    T = policy.config.block_size
    seqs = [response_tokens(tok, p, r) for p, r in zip(prompts, responses)]
    seqs = [(ids[-T:], m[-T:]) for ids, m in seqs]  # too long: drop the prompt's start
    return logratios(policy, ref, seqs, tok.pad_id, beta, batch_size)


@torch.no_grad()
def logratios(policy, ref, seqs, pad_id, beta=1.0, batch_size=64, temperature=1.0):
    """beta * (log pi(y|x) - log pi_ref(y|x)) of tokenised sequences, (ids, response mask) pairs as
    `response_tokens` or `task.sample_responses` make them (ref=None: beta * log pi(y|x)), both at `temperature`.
    On the policy's own samples (drawn at that temperature) its mean estimates KL(pi || pi_ref) (times beta).
    -> [N], float32, on the CPU."""
    out = []
    for i in range(0, len(seqs), batch_size):
        logp = response_logprobs(policy, seqs[i:i + batch_size], pad_id, temperature)[0]
        if ref is not None:
            logp = logp - response_logprobs(ref, seqs[i:i + batch_size], pad_id, temperature)[0]
        out.append((beta * logp).cpu())
    return torch.cat(out)


def pair_accuracy(r_c, r_r, gold_c=None, gold_r=None):
    """How a judge ranks preference pairs, given its scores of the chosen and rejected responses [N]:
    -> (fraction ranked as the labels say, fraction of the pairs whose gold scores differ ranked as gold
    says, or None without gold scores). A tie in the judge's scores counts half."""
    agree = (r_c > r_r).float() + 0.5 * (r_c == r_r).float()
    if gold_c is None:
        return agree.mean().item(), None
    return agree.mean().item(), torch.where(gold_c > gold_r, agree, 1 - agree)[gold_c != gold_r].mean().item()


def process_score(step_probs, reduce="min"):
    """A response's score from its step probabilities: the weakest step ("min") or all of them ("prod").
    A response with no step scores 0."""
    if len(step_probs) == 0:
        return 0.0
    return float(step_probs.min() if reduce == "min" else step_probs.prod())


def rm_judge(rm, tok, kind="outcome"):
    """A reward model of train_rm.py as a judge: a callable (prompts as message lists, response texts) -> a
    list of scores, an outcome RM's normalised reward at the EOS or a process RM's weakest step probability
    (kind "process"; not standardised, so its scale is not PPO's rollout score's)."""
    if kind == "process":
        return lambda prompts, texts: [process_score(s) for s in step_scores(rm, tok, prompts, texts)]
    return lambda prompts, texts: outcome_scores(rm, tok, prompts, texts).tolist()


def best_of_n(scores):
    """Index of the best of N candidates for each prompt. [P, N] scores -> [P]. Ties: the first."""
    return torch.as_tensor(scores).argmax(-1)


# ------------------------------------------------------------------------------ verifiable rewards

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text):
    """The answer a response gives: the number after the last "####" if there is one (GSM8K's
    convention), else the last number in the text; commas dropped. None if there is no number."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    numbers = NUMBER.findall(tail)
    return numbers[-1].replace(",", "") if numbers else None


def answer_reward(answers):
    """A reward callable (prompt, response) -> 1.0 iff the response's final number equals the
    reference answer of that prompt (`answers`: prompt text -> answer string, e.g. from GSM8K)."""
    def reward(prompt, response):
        got, want = final_number(response), answers[prompt]
        try:
            return float(got is not None and float(got) == float(want))
        except ValueError:
            return float(got == want)
    return reward


def pass_at_k(n, c, k):
    """Unbiased pass@k from n samples of which c passed (Chen et al. 2021): 1 - C(n - c, k) / C(n, k)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)
