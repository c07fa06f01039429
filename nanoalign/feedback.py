"""
AI feedback: a chat model critiques, revises and judges responses in its own words, under principles
drawn from a constitution (Constitutional AI, Bai et al. 2022; RLAIF, Lee et al. 2023; self-rewarding
language models, Yuan et al. 2024).

Each skill is one user turn, rendered by the normal chat template; the model's reply is the feedback:

    critique  "critique: <principle>\\n<problem>\\n<response>"  -> what breaks the principle first and what
                                                               it should be, or that nothing does
    revise    "revise:\\n<problem>\\n<response>\\n<critique>"    -> the response, rewritten
    compare   "compare: <principle>\\n<problem>\\nA: <a>\\nB: <b>" -> "A" or "B"
    score     "score 0-5:\\n<problem>\\n<response>"             -> one digit, 0 (worst) to 5 (best)

The formats are short because a byte-level model with 128 positions must hold prompt and reply. What
a critique says is up to the model that learned the skill: the built-in task (nanoalign/task.py:
CONSTITUTION, skill_records and the checkers) teaches one and measures it, but nothing here depends on
the task: these primitives take any nanoalign chat model and any text.

- critique_and_revise: for each (problem, response), draw a principle, sample a critique, then a
  revision given the critique; `rounds` times, each round critiquing the last revision (SL-CAI).
- pairwise_preference: P(A is better) read from the model's next-token probabilities of "A" and "B"
  after the compare prompt (renormalised over the two), not from a sampled word; averaged over both
  orders of the pair, so that a judge that prefers a position cancels it (RL-CAI's soft labels).
- pointwise_scores: the mean of a few sampled scores on the fixed scale (self-rewarding's judge).
- soft_bradley_terry_loss: the reward-model loss for a pair whose label is a probability.
"""
import torch

from nanoalign.core import pad
from nanoalign.losses import bradley_terry_loss
from nanoalign.sampling import generate

SCORE_MAX = 5  # the pointwise scale is 0..SCORE_MAX


def critique_prompt(problem, response, principle):
    return f"critique: {principle}\n{problem}\n{response}"


def revise_prompt(problem, response, critique):
    return f"revise:\n{problem}\n{response}\n{critique}"


def compare_prompt(problem, a, b, principle):
    return f"compare: {principle}\n{problem}\nA: {a}\nB: {b}"


def score_prompt(problem, response):
    return f"score 0-{SCORE_MAX}:\n{problem}\n{response}"


def user(text):
    return [{"role": "user", "content": text}]


def complete(model, tok, texts, max_new_tokens=48, temperature=0.0, generator=None, batch_size=256):
    """The model's reply to each user message in `texts`. -> list of str, or None where the reply did not
    end with EOS: it ran out of max_new_tokens or of context (a prompt that fills the context gets None
    without being run). temperature=0 is greedy."""
    T, out = model.config.block_size, [None] * len(texts)
    rows = [tok.render_prompt(user(t)) for t in texts]
    todo = [i for i, r in enumerate(rows) if len(r) < T]
    for s in range(0, len(todo), batch_size):
        chunk = todo[s:s + batch_size]
        ids, mask = generate(model, [rows[i] for i in chunk], max_new_tokens, tok.eos_id, tok.pad_id,
                             temperature=temperature, generator=generator)
        for i, row, n in zip(chunk, ids.tolist(), mask.sum(1).tolist()):
            if n > 0 and row[n - 1] == tok.eos_id:
                out[i] = tok.decode(row[:n - 1])
    return out


def critique_and_revise(model, tok, problems, responses, constitution, rng, rounds=1, temperature=0.0,
                        generator=None, max_new_tokens=64):
    """Constitutional AI's supervised stage (Bai et al. 2022, section 3): for each (problem, response) draw
    one principle from `constitution` (`rng`: a random.Random), have the model critique the response
    under it, then revise it given the critique; repeat `rounds` times on the latest revision, a fresh
    principle each time. A critique or revision that does not finish (no EOS) leaves the response as
    it was. -> (final responses, log): log[r] = {"responses" (the round's input), "principles", "critiques",
    "revisions"} of round r, one entry per response (None where nothing was produced)."""
    current, log = list(responses), []
    for _ in range(rounds):
        inputs = list(current)
        principles = [rng.choice(constitution) for _ in problems]
        crits = complete(model, tok, [critique_prompt(p, r, k) for p, r, k in zip(problems, current, principles)],
                         max_new_tokens, temperature, generator)
        todo = [i for i, c in enumerate(crits) if c is not None]
        revs = [None] * len(problems)
        done = complete(model, tok, [revise_prompt(problems[i], current[i], crits[i]) for i in todo],
                        max_new_tokens, temperature, generator)
        for i, r in zip(todo, done):
            if r is not None and r.strip():
                revs[i] = current[i] = r
        log.append({"responses": inputs, "principles": principles, "critiques": crits, "revisions": revs})
    return current, log


@torch.no_grad()
def answer_probs(model, tok, texts, answers=("A", "B"), batch_size=128):
    """For each user message, the model's next-token probabilities of the answers (each one token),
    renormalised over them: P(answer j) = exp(l_j) / sum_i exp(l_i), the logits l read right after
    `<|assistant|>`, in float32. -> ([N, len(answers)], [N] bool: judged). A prompt that fills the context
    is not judged: uniform probabilities."""
    ans = [tok.encode(a) for a in answers]
    assert all(len(a) == 1 for a in ans), f"each answer must be one token: {answers}"
    ans = torch.tensor([a[0] for a in ans])
    T, device = model.config.block_size, model.lm_head.weight.device
    rows = [tok.render_prompt(user(t)) for t in texts]
    probs = torch.full((len(rows), len(ans)), 1.0 / len(ans))
    judged = torch.tensor([len(r) <= T for r in rows], dtype=torch.bool)
    todo = judged.nonzero().flatten().tolist()
    was_training = model.training
    model.eval()
    for s in range(0, len(todo), batch_size):
        chunk = todo[s:s + batch_size]
        ids, _ = pad([rows[i] for i in chunk], tok.pad_id)  # right padding: causal attention needs no mask
        last = torch.tensor([len(rows[i]) - 1 for i in chunk], device=device)
        logits = model(ids.to(device))[torch.arange(len(chunk), device=device), last].float()
        probs[chunk] = logits[:, ans.to(device)].softmax(-1).cpu()
    model.train(was_training)
    return probs, judged


def pairwise_preference(model, tok, problems, a, b, principles, both_orders=True):
    """Constitutional AI's feedback model (Bai et al. 2022, section 4.1): P(a is better than b) under each
    pair's principle, the probability of "A" against "B" as the next token after the compare prompt.
    both_orders: the mean of P("A" | a shown as A) and P("B" | a shown as B), which cancels a preference
    for one position. -> ([N] float32, [N] bool: judged in every order asked; else 0.5 for the unjudged)"""
    p_ab, ok = answer_probs(model, tok, [compare_prompt(q, x, y, k) for q, x, y, k in zip(problems, a, b, principles)])
    if not both_orders:
        return p_ab[:, 0], ok
    p_ba, ok_ba = answer_probs(model, tok, [compare_prompt(q, y, x, k) for q, x, y, k in zip(problems, a, b, principles)])
    return 0.5 * (p_ab[:, 0] + p_ba[:, 1]), ok & ok_ba


def parse_score(text, scale=SCORE_MAX):
    """A reply to the score prompt -> int in 0..scale, or None if it is not one."""
    t = (text or "").strip()
    return int(t) if t.isdigit() and int(t) <= scale else None


def pointwise_scores(model, tok, problems, responses, n_samples=3, temperature=1.0, generator=None, scale=SCORE_MAX):
    """The self-rewarding judge (Yuan et al. 2024, section 2.2): the model scores each response on the fixed
    0..scale scale, n_samples sampled judgements averaged. -> list of float, or None where no judgement
    parsed as a score."""
    texts = [score_prompt(p, r) for p, r in zip(problems, responses) for _ in range(n_samples)]
    got = [parse_score(t, scale) for t in complete(model, tok, texts, 4, temperature, generator)]
    out = []
    for i in range(len(problems)):
        s = [g for g in got[i * n_samples:(i + 1) * n_samples] if g is not None]
        out.append(sum(s) / len(s) if s else None)
    return out


def soft_bradley_terry_loss(r_chosen, r_rejected, p_chosen, margin=0.0, center_coef=0.0):
    """Bradley-Terry with a soft label (Bai et al. 2022 train their preference model on the feedback
    model's probabilities): the cross-entropy between the label's P(chosen > rejected) = p and the
    model's sigmoid(r_c - r_r - margin):

        loss = p * BT(r_c, r_r, margin) + (1 - p) * BT(r_r, r_c, -margin)
             = -p log sigmoid(d) - (1 - p) log sigmoid(-d) + center_coef * (r_c + r_r)^2,  d = r_c - r_r - margin

    (BT = losses.bradley_terry_loss; its centering term, weighted p and 1 - p, counts once.) p = 1 is
    the hard-label loss. Example: d = 1, p = 0.75 -> 0.75 * 0.313 + 0.25 * 1.313 = 0.563."""
    return p_chosen * bradley_terry_loss(r_chosen, r_rejected, margin, center_coef) \
        + (1 - p_chosen) * bradley_terry_loss(r_rejected, r_chosen, -margin, center_coef)
