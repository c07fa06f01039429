"""
The built-in offline task: chain addition modulo 10, with a hidden gold scorer.

A prompt is 3 to 6 digits, e.g. "4+7+2+9"; the answer is the last digit of their sum. A good response
adds them one step at a time, each step "running total + next digit = new total (mod 10)", steps
ended by ";", then the answer after "#":

    4+7=1;1+2=3;3+9=2;#2

Modulo 10 keeps every number one token wide, so a step is always 5 tokens and a tiny model can learn
both to do the steps and (as a reward model) to check them.

Everything a post-training pipeline needs comes from a seed, with no download:
- SFT demonstrations come from a *flawed demonstrator*, like a careless human with a habit:
  it slips on a step with probability p_err (its result is off by 1 or 2), and it has a blind spot:
  adding a 9, it usually (p_blind = 60%) adds 8. Either way it carries the error on.
  A model that imitates it is right on about half the prompts when sampled, and even its greedy
  answer inherits the blind spot: imitation cannot beat the demonstrator, feedback can.
- `gold(prompt, response)`: the hidden truth, 0.5 * [final answer correct] + 0.5 * fraction of the
  k-1 steps done correctly. Learned reward models are measured against it; it is never trained on.
- Preference pairs: two demonstrator samples per prompt, labelled by the gold scorer with
  Bradley-Terry noise: P(a preferred) = sigmoid((gold(a) - gold(b)) / label_temp). Ties are coin flips.
- Unpaired feedback (KTO): a sample labelled desirable with probability sigmoid((gold - 0.75) / label_temp).
- `verify(prompt, response)`: the exact checker, 1.0 iff the final answer is right (GRPO).
- `step_labels(prompt, response)`: per-step correctness (process reward models).
- Splits are by prompt (a hash of its text): no test prompt is ever seen in training.
- Feedback skills (critique, revise, compare, score; `skill_records`) under a short CONSTITUTION, each
  with a flawed demonstrator that does not share the solver's blind spot and an exact checker
  (`violations`, `critique`, `revise`, `compare`, `score`): what AI feedback is measured on.
"""
import math
import random
import re
import zlib

import torch

from nanoalign import feedback
from nanoalign.sampling import generate

MIN_DIGITS, MAX_DIGITS = 3, 6
P_ERR = 0.1  # the demonstrator's random slip rate per step
P_BLIND = 0.6  # how often the demonstrator adds 8 when it should add 9
LABEL_TEMP = 0.1  # Bradley-Terry temperature of the gold-derived preference labels
MAX_NEW_TOKENS = 48  # the longest correct response is 32 bytes


def split_of(prompt):
    h = zlib.crc32(prompt.encode()) % 10
    return "test" if h == 0 else "val" if h == 1 else "train"


def sample_prompt(rng, split):
    while True:
        digits = [rng.randrange(10) for _ in range(rng.randint(MIN_DIGITS, MAX_DIGITS))]
        prompt = "+".join(map(str, digits))
        if split_of(prompt) == split:
            return prompt


def digits_of(prompt):
    return [int(d) for d in prompt.split("+")]


def demonstrate(prompt, rng, p_err=P_ERR, p_blind=P_BLIND):
    """A response from the flawed demonstrator (p_err=p_blind=0: always correct)."""
    digits = digits_of(prompt)
    return go_on([], digits[0], digits[1:], rng, p_err, p_blind)


def go_on(steps, total, rest, rng, p_err=P_ERR, p_blind=P_BLIND):
    """The demonstrator's way of going on from the written `steps` (a list of strings) and running
    `total`: add each digit of `rest` with its slips and blind spot, then the answer. -> the response."""
    steps = list(steps)
    for d in rest:
        c = (total + d) % 10
        if d == 9 and rng.random() < p_blind:
            c = (total + 8) % 10  # the blind spot: writes "+9" but adds 8
        elif rng.random() < p_err:
            c = (c + rng.choice([-2, -1, 1, 2])) % 10  # an arithmetic slip
        steps.append(f"{total}+{d}={c}")
        total = c
    return ";".join(steps) + f";#{total}"


STEP = re.compile(r"(\d)\+(\d)=(\d)")  # one digit each: "4+07=1" is not a step
ANSWER = re.compile(r"#(\d)")


def parse(response):
    """-> (list of step strings, answer string or None). The answer must end the response."""
    parts = response.split(";")
    answer = ANSWER.fullmatch(parts[-1])
    return (parts[:-1], answer.group(1)) if answer else (parts, None)


def step_labels(prompt, response):
    """Correctness of each written step: step i must be (previous written total) + digit i+1 = their sum mod 10."""
    digits = digits_of(prompt)
    steps, _ = parse(response)
    labels, total = [], digits[0]
    for i, s in enumerate(steps):
        m = STEP.fullmatch(s)
        ok = bool(m) and i + 1 < len(digits) and int(m.group(1)) == total and int(m.group(2)) == digits[i + 1] \
            and int(m.group(3)) == (int(m.group(1)) + int(m.group(2))) % 10
        labels.append(ok)
        total = int(m.group(3)) if m else -1
    return labels


def verify(prompt, response):
    """1.0 iff the response ends with the correct final answer "#<sum mod 10>"."""
    _, answer = parse(response)
    return float(answer is not None and int(answer) == sum(digits_of(prompt)) % 10)


def format_ok(prompt, response):
    """1.0 iff the response has the task's shape: one well-formed step per added digit, then "#d"."""
    steps, answer = parse(response)
    return float(answer is not None and len(steps) == len(digits_of(prompt)) - 1
                 and all(STEP.fullmatch(s) for s in steps))


def gold(prompt, response):
    """The hidden gold score in [0, 1]: half for the final answer, half for the steps (extra steps cost)."""
    labels = step_labels(prompt, response)
    n = len(digits_of(prompt)) - 1
    steps = max(0.0, (sum(labels) - max(0, len(labels) - n)) / n)
    return 0.5 * verify(prompt, response) + 0.5 * steps


def sft_records(n, seed=0, split="train"):
    rng = random.Random(f"sft-{seed}-{split}")
    out = []
    for _ in range(n):
        p = sample_prompt(rng, split)
        out.append({"prompt": p, "response": demonstrate(p, rng)})
    return out


def preference_records(n, seed=0, split="train", p_err=2 * P_ERR, label_temp=LABEL_TEMP):
    """Pairs of distinct demonstrator samples (at twice the slip rate, so pairs differ), gold-labelled
    with Bradley-Terry noise."""
    rng = random.Random(f"pref-{seed}-{split}")
    out = []
    while len(out) < n:
        p = sample_prompt(rng, split)
        a, b = demonstrate(p, rng, p_err), demonstrate(p, rng, p_err)
        if a == b:
            continue
        p_a = 1 / (1 + math.exp(-(gold(p, a) - gold(p, b)) / label_temp))
        chosen, rejected = (a, b) if rng.random() < p_a else (b, a)
        out.append({"prompt": p, "chosen": chosen, "rejected": rejected})
    return out


def unpaired_records(n, seed=0, split="train", p_err=2 * P_ERR, label_temp=LABEL_TEMP):
    rng = random.Random(f"kto-{seed}-{split}")
    out = []
    for _ in range(n):
        p = sample_prompt(rng, split)
        c = demonstrate(p, rng, p_err)
        label = rng.random() < 1 / (1 + math.exp(-(gold(p, c) - 0.75) / label_temp))
        out.append({"prompt": p, "completion": c, "label": label})
    return out


def prompts(n, seed=0, split="test"):
    rng = random.Random(f"prompts-{seed}-{split}")
    return [sample_prompt(rng, split) for _ in range(n)]


# ------------------------------------------------------------------------------ feedback skills
# The task also teaches feedback (the prompt formats and the primitives that use them are in
# nanoalign/feedback.py). Each skill has a flawed demonstrator, like the solver's, and an exact checker.
# The feedback demonstrators check every step with no blind spot (a "+9" is checked like any other
# step: checking is easier than generating, and a critic with the solver's blind spot would have
# nothing to fix), but they overlook a broken step with probability P_MISS. The reviser writes the
# critique's fix and then goes on solving like the solver, slips and blind spot included.

CONSTITUTION = (  # one is drawn per request (Bai et al. 2022); each has its checker in violations()
    "each step adds the next digit",  # step j is (last result)+(digit j+1)=(their sum mod 10); no step skipped
    "each sum keeps its last digit",  # each written step a+b=c has c = (a+b) mod 10, whatever a and b are
    "the answer is the last result",  # the answer after "#" is the last step's result
)
P_MISS = 0.1  # how often a feedback demonstrator overlooks a broken step
SKILLS = ("solve", "critique", "revise", "compare", "score")


def violations(prompt, response, principle):
    """Where `response` breaks CONSTITUTION[principle] (an index). A response's items are what ";" splits
    it into: its steps, then the answer "#d". -> one entry per item: None where the item keeps the
    principle, else what the item should be (the first one's fix is exact: every item before it is
    right under the principle)."""
    digits, items = digits_of(prompt), response.split(";")
    n, total, out = len(digits) - 1, digits[0], []  # total: the last written result
    for j, item in enumerate(items):
        step, answer = STEP.fullmatch(item), ANSWER.fullmatch(item) if j == len(items) - 1 else None
        fix = None
        if principle == 2:  # only the answer can break it
            if j == len(items) - 1 and not (answer and int(answer.group(1)) == total):
                fix = f"#{total}"
        elif principle == 0 or not step:  # bookkeeping: this item must be the next step, or the answer after n steps
            expected = f"{total}+{digits[j + 1]}={(total + digits[j + 1]) % 10}" if j < n else f"#{total}"
            fix = None if item == expected or (answer and j == n) else expected
        else:  # principle 1, a well-formed step: its own sum
            a, b, c = (int(x) for x in step.groups())
            fix = None if c == (a + b) % 10 else f"{a}+{b}={(a + b) % 10}"
        out.append(fix)
        total = int(step.group(3)) if step else total
    return out


def critique(prompt, response, principle, rng=None, p_miss=P_MISS):
    """The critic: quotes the items that keep the principle, then the first that breaks it as
    "<item> -> <fix>"; if none does, the whole response and " ok". rng=None: the exact critique (the
    checker's); with an rng, each broken item is overlooked with probability p_miss.
    "4+7=1;1+2=3;3+9=1;#1", principle 1 -> "4+7=1;1+2=3;3+9=1 -> 3+9=2"."""
    items = response.split(";")
    for j, fix in enumerate(violations(prompt, response, principle)):
        if fix is not None and (rng is None or rng.random() >= p_miss):
            return ";".join(items[:j] + [f"{items[j]} -> {fix}"])
    return response + " ok"


def revise(prompt, response, critique_text, rng, p_err=P_ERR, p_blind=P_BLIND):
    """The reviser: a critique that finds nothing leaves the response as it is; otherwise keep the items
    the critique accepted, write its fix, and go on solving from there as the solver does (go_on)."""
    if " -> " not in critique_text:
        return response
    head, fix = critique_text.rsplit(" -> ", 1)
    kept, digits = head.split(";")[:-1], digits_of(prompt)
    step = STEP.fullmatch(fix)
    if not step:  # the fix is the answer (or not a step at all): the response ends with it
        return ";".join(kept + [fix])
    return go_on(kept + [fix], int(step.group(3)), digits[len(kept) + 2:], rng, p_err, p_blind)


def faults(prompt, response):
    """The rubric's count of faults: the items that break principle 0 (a wrong, extra or missing step),
    plus one for a wrong final answer."""
    return sum(f is not None for f in violations(prompt, response, 0)) + int(verify(prompt, response) == 0)


def score(prompt, response, rng=None, p_miss=P_MISS):
    """The pointwise judge: feedback.SCORE_MAX minus one point per fault (faults()), at least 0; with an rng
    each fault is overlooked with probability p_miss. A correct response scores 5, one slip 3."""
    seen = sum(1 for _ in range(faults(prompt, response)) if rng is None or rng.random() >= p_miss)
    return max(0, feedback.SCORE_MAX - seen)


def compare(prompt, a, b, principle, rng=None, p_miss=P_MISS):
    """The pairwise judge: "A" if `a` breaks the principle fewer times than `b`, then (a tie) if it has
    fewer faults; with an rng each broken item and fault is overlooked with probability p_miss and a
    full tie is a coin flip; rng=None (the checker): None for a tie."""
    def key(x):
        seen = lambda count: sum(1 for _ in range(count) if rng is None or rng.random() >= p_miss)
        return seen(sum(f is not None for f in violations(prompt, x, principle))), seen(faults(prompt, x))
    ka, kb = key(a), key(b)
    if ka == kb:
        return None if rng is None else rng.choice("AB")
    return "A" if ka < kb else "B"


def skill_records(skills, n, seed=0, split="train"):
    """Demonstrations of the feedback skills named in `skills` (a comma-separated subset of SKILLS; "solve"
    is sft_records and is left out here), n per skill, as SFT records {"prompt", "response"}: the user
    turn in feedback.py's format, the reply from the skill's flawed demonstrator. The responses given
    feedback are demonstrator samples at twice the slip rate (as in the preference pairs); each request
    draws its principle."""
    out = []
    for skill in [s for s in skills.split(",") if s and s != "solve"]:
        if skill not in SKILLS:
            raise ValueError(f"unknown skill {skill!r}; choose from {SKILLS}")
        rng = random.Random(f"{skill}-{seed}-{split}")
        for _ in range(n):
            p = sample_prompt(rng, split)
            r, k = demonstrate(p, rng, 2 * P_ERR), rng.randrange(len(CONSTITUTION))
            if skill == "critique":
                out.append({"prompt": feedback.critique_prompt(p, r, CONSTITUTION[k]), "response": critique(p, r, k, rng)})
            elif skill == "revise":
                c = critique(p, r, k, rng)
                out.append({"prompt": feedback.revise_prompt(p, r, c), "response": revise(p, r, c, rng)})
            elif skill == "compare":
                b = demonstrate(p, rng, 2 * P_ERR)
                out.append({"prompt": feedback.compare_prompt(p, r, b, CONSTITUTION[k]), "response": compare(p, r, b, k, rng)})
            else:
                out.append({"prompt": feedback.score_prompt(p, r), "response": str(score(p, r, rng))})
    return out


# ------------------------------------------------------------------------------ evaluation

def sample_responses(model, tok, prompts, temperature=1.0, max_new_tokens=MAX_NEW_TOKENS, batch_size=64,
                     generator=None, **kw):
    """Sample one response per prompt (a user message string, or a list of chat messages).
    -> list of (text, ended_with_eos, n_tokens, seq). seq = (prompt ids + response ids, response mask) holds
    the tokens exactly as sampled (the EOS only if one was sampled), in `rewards.response_tokens`' format:
    score log-probs on it, not on the re-encoded text."""
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = [tok.render_prompt([{"role": "user", "content": p}] if isinstance(p, str) else p)
                 for p in prompts[i:i + batch_size]]
        ids, mask = generate(model, chunk, max_new_tokens, tok.eos_id, tok.pad_id, temperature=temperature,
                             generator=generator, **kw)
        for p, row, m in zip(chunk, ids.tolist(), mask.sum(1).tolist()):
            r = row[:m]
            out.append((tok.decode(r), m > 0 and r[-1] == tok.eos_id, m, (p + r, [0] * len(p) + [1] * m)))
    return out


def evaluate(model, tok, prompt_texts, temperature=1.0, seed=0, **kw):
    """Gold score, pass rate, length and EOS rate of sampled responses. A response that never
    emitted EOS is unfinished: it gets gold 0 and fails."""
    g = torch.Generator(device=model.transformer.wte.weight.device).manual_seed(seed)
    samples = sample_responses(model, tok, prompt_texts, temperature=temperature, generator=g, **kw)
    golds = [gold(p, t) if e else 0.0 for p, (t, e, _, _) in zip(prompt_texts, samples)]
    passes = [verify(p, t) if e else 0.0 for p, (t, e, _, _) in zip(prompt_texts, samples)]
    n = len(samples)
    return {"gold": sum(golds) / n, "pass": sum(passes) / n, "length": sum(s[2] for s in samples) / n,
            "eos": sum(s[1] for s in samples) / n}
