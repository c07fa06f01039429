"""AI feedback: the task's feedback skills (rendering, mask, checkers), the primitives of nanoalign/feedback.py,
the soft label into train_rm.py, and train_dpo.py --judge=self end to end."""
import hashlib
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

from nanoalign import feedback, task
from nanoalign.losses import bradley_terry_loss
from nanoalign.tokenizer import byte_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
P = "4+7+2+9"  # 4+7=1; 1+2=3; 3+9=2


def digest(records):
    return hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()[:16]


def test_default_data_unchanged():
    """The built-in SFT data, preference pairs, unpaired examples and prompts are what they were before the
    feedback skills were added (hashes computed on the code before the change): default runs are unchanged."""
    assert digest(task.sft_records(200)) == "2b23e81844508308"
    assert digest(task.sft_records(200, 1337)) == "d40cf9ae8d538537"  # train_sft.py's default seed
    assert digest(task.sft_records(50, 1337, "val")) == "e49836c8abd09938"
    assert digest(task.preference_records(200)) == "bd200477a5d0db53"
    assert digest(task.preference_records(200, 1337)) == "cbd716eebffa4071"
    assert digest(task.unpaired_records(200)) == "425cd86ffd7cb878"
    assert digest(task.prompts(200)) == "f5fa01c393217a4d"
    assert task.skill_records("solve", 10) == []  # --skills=solve adds nothing


@pytest.mark.parametrize("skill", ["critique", "revise", "compare", "score"])
def test_skill_rendering_and_mask(skill):
    """Each skill is one user turn in feedback.py's format; the mask trains the reply (and its EOS) only, and
    every demonstration fits the default 128-token context."""
    tok = byte_tokenizer()
    recs = task.skill_records(skill, 400, seed=0)
    assert len(recs) == 400
    tags = {"critique": "critique: ", "revise": "revise:\n", "compare": "compare: ", "score": "score 0-5:\n"}
    for r in recs:
        assert r["prompt"].startswith(tags[skill])
        ids, mask = tok.render([{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["response"]}])
        assert len(ids) <= 128
        trained = [i for i, m in zip(ids, mask) if m]
        assert trained[-1] == tok.eos_id and tok.decode(trained[:-1]) == r["response"]
        assert tok.decode([i for i, m in zip(ids, mask) if not m]) == r["prompt"]  # the rest is the prompt, untrained
    replies = {r["response"] for r in recs}
    if skill == "compare":
        assert replies == {"A", "B"}
    if skill == "score":
        assert replies <= {str(s) for s in range(6)} and len(replies) >= 3


def test_violations_critique_and_fix_hand_cases():
    right, slip = "4+7=1;1+2=3;3+9=2;#2", "4+7=1;1+2=3;3+9=1;#1"  # slip: the blind spot, 3+8
    for k in range(3):
        assert task.violations(P, right, k) == [None] * 4 and task.critique(P, right, k) == right + " ok"
    assert task.violations(P, slip, 0) == [None, None, "3+9=2", None]
    assert task.critique(P, slip, 1) == "4+7=1;1+2=3;3+9=1 -> 3+9=2"
    assert task.critique(P, slip, 2) == slip + " ok"  # the answer is the last result: nothing to say
    assert task.critique(P, "4+7=1;1+2=3;3+9=2;#5", 2) == "4+7=1;1+2=3;3+9=2;#5 -> #2"
    assert task.critique(P, "4+7=1;1+2=3;#3", 0) == "4+7=1;1+2=3;#3 -> 3+9=2"  # a skipped step
    assert task.critique(P, "4+7=1;1+2=3;3+9=2;2+1=3;#3", 0) == "4+7=1;1+2=3;3+9=2;2+1=3 -> #2"  # an extra one
    wrong_operand = "4+7=1;1+3=4;4+9=3;#3"  # its sums are right, but it adds 3 where the prompt has 2
    assert task.critique(P, wrong_operand, 0) == "4+7=1;1+3=4 -> 1+2=3"
    assert task.critique(P, wrong_operand, 1) == wrong_operand + " ok"


def test_revise_score_compare_hand_cases():
    exact = random.Random(0)
    slip = "4+7=1;1+2=4;4+9=3;#3"
    crit = task.critique(P, slip, 1)
    assert task.revise(P, slip, crit, exact, p_err=0, p_blind=0) == "4+7=1;1+2=3;3+9=2;#2"  # fix, then go on solving
    assert task.revise(P, slip, slip + " ok", exact) == slip  # nothing found: nothing changed
    assert task.revise(P, "4+7=1;1+2=3;3+9=2;#5", "4+7=1;1+2=3;3+9=2;#5 -> #2", exact) == "4+7=1;1+2=3;3+9=2;#2"
    assert task.faults(P, "4+7=1;1+2=3;3+9=2;#2") == 0 and task.score(P, "4+7=1;1+2=3;3+9=2;#2") == 5
    assert task.faults(P, slip) == 2 and task.score(P, slip) == 3  # a broken step and a wrong answer
    assert task.score(P, "#1") == 5 - 2  # the answer comes where step 1 should: one fault; and it is wrong
    assert task.compare(P, "4+7=1;1+2=3;3+9=2;#2", slip, 0) == "A"
    assert task.compare(P, slip, "4+7=1;1+2=3;3+9=2;#2", 1) == "B"
    assert task.compare(P, slip, slip, 0) is None  # the checker: a tie
    assert task.compare(P, slip, slip, 0, random.Random(1)) in ("A", "B")  # the demonstrator: a coin


def test_critic_does_not_share_the_blind_spot():
    """The solver adds 8 for most 9s; the critic demonstrator catches broken "+9" steps as often as any
    other broken step (it only overlooks P_MISS of them)."""
    rng = random.Random(0)
    caught = {True: [], False: []}
    for _ in range(3000):
        p = task.sample_prompt(rng, "train")
        r = task.demonstrate(p, rng)
        true = task.critique(p, r, 1)
        if " -> " in true:
            nine = true.rsplit(" -> ", 1)[0].split(";")[-1][2] == "9"
            caught[nine].append(task.critique(p, r, 1, rng) == true)  # it names the first broken step
    for nine in (True, False):
        assert len(caught[nine]) > 200
        assert abs(sum(caught[nine]) / len(caught[nine]) - (1 - task.P_MISS)) < 0.05


class AnswerStub(torch.nn.Module):
    """A 'model' whose next-token logits are 0 everywhere except: "A" gets log 3 when the prompt shows
    "A: right", and an unrelated token gets 10 (the two answers are renormalised, so it must not matter)."""

    def __init__(self, tok):
        super().__init__()
        self.tok, self.lm_head = tok, torch.nn.Linear(1, 1)
        self.config = type("C", (), {"block_size": 128})()
        self.a = tok.encode("A")[0]

    def forward(self, ids):
        logits = torch.zeros(*ids.shape, self.tok.n_vocab)
        logits[..., self.tok.encode("z")[0]] = 10.0
        for b, row in enumerate(ids.tolist()):
            if "A: right" in self.tok.decode(row):
                logits[b, :, self.a] = math.log(3.0)
        return logits


def test_pairwise_probability_from_the_two_answer_tokens():
    tok = byte_tokenizer()
    stub = AnswerStub(tok)
    p, judged = feedback.pairwise_preference(stub, tok, ["1+1"], ["right"], ["wrong"], ["be right"], both_orders=False)
    assert judged.tolist() == [True] and p.item() == pytest.approx(0.75)  # 3 / (3 + 1)
    # both orders: "A: right" first gives P(A) = 0.75; shown second, nothing is preferred: P(B) = 0.5
    p, _ = feedback.pairwise_preference(stub, tok, ["1+1"], ["right"], ["wrong"], ["be right"])
    assert p.item() == pytest.approx(0.625)
    # a prompt that fills the context is not judged: 0.5
    p, judged = feedback.pairwise_preference(stub, tok, ["1" * 200], ["right"], ["wrong"], ["be right"])
    assert judged.tolist() == [False] and p.item() == 0.5


def test_critique_and_revise_and_pointwise_logic(monkeypatch):
    """critique_and_revise draws a principle per request, chains rounds, and keeps a response whose critique
    or revision did not finish; pointwise_scores averages the parsable judgements."""
    seen = []

    def fake_complete(model, tok, texts, *a, **k):
        seen.append(texts)
        out = []
        for t in texts:
            if t.startswith("critique: "):
                out.append(None if "stuck" in t else "c")
            elif t.startswith("revise:"):
                out.append(t.split("\n")[2] + "+")
            else:
                out.append({"x": "4", "y": "five"}.get(t.split("\n")[2][0], "2"))
        return out

    monkeypatch.setattr(feedback, "complete", fake_complete)
    final, log = feedback.critique_and_revise(None, None, ["q", "q"], ["r", "stuck"], ["p1", "p2"], random.Random(0), rounds=2)
    assert final == ["r++", "stuck"]
    assert log[0]["responses"] == ["r", "stuck"] and log[1]["responses"] == ["r+", "stuck"]
    assert log[0]["critiques"] == ["c", None] and log[0]["revisions"] == ["r+", None]
    assert all(k in ("p1", "p2") for l in log for k in l["principles"])
    assert seen[0][0] == feedback.critique_prompt("q", "r", log[0]["principles"][0])
    assert feedback.pointwise_scores(None, None, ["q", "q"], ["x", "y"], n_samples=3) == [4.0, None]
    assert [feedback.parse_score(t) for t in ("3", " 5", "6", "4.5", None, "")] == [3, 5, None, None, None, None]


def test_soft_bradley_terry_loss():
    r_c, r_r = torch.tensor([1.0, 0.3]), torch.tensor([0.0, 0.3])
    loss = feedback.soft_bradley_terry_loss(r_c, r_r, torch.tensor([0.75, 0.5]))
    assert loss[0].item() == pytest.approx(0.75 * 0.31326 + 0.25 * 1.31326, abs=1e-4)  # the docstring's example
    assert loss[1].item() == pytest.approx(math.log(2))
    hard = feedback.soft_bradley_terry_loss(r_c, r_r, torch.ones(2), 0.2, 0.1)
    assert torch.equal(hard, bradley_terry_loss(r_c, r_r, 0.2, 0.1))  # p = 1: the hard-label loss


def test_p_chosen_parsed_and_checked():
    from nanoalign import data
    rec = {"prompt": "1+2", "chosen": "a", "rejected": "b"}
    assert data.parse_preference(dict(rec, p_chosen=0.7), "f:1")["p_chosen"] == 0.7
    assert "p_chosen" not in data.parse_preference(dict(rec, p_chosen=None), "f:1")
    for bad in (1.5, -0.1, True, "0.7"):
        with pytest.raises(data.DataError, match="p_chosen"):
            data.parse_preference(dict(rec, p_chosen=bad), "f:1")


def run_rm(tmp_path, name, sft_ckpt, records):
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / name
    r = subprocess.run([sys.executable, "train_rm.py", f"--init_from={sft_ckpt}", f"--data_path={path}", f"--out_dir={out}",
                        "--max_steps=4", "--batch_size=8", "--lr=1e-2", "--warmup_steps=1", "--log_interval=1",
                        "--eval_interval=1000", "--normalize=False", "--device=cpu"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(l)["loss"] for l in open(out / "metrics.jsonl") if '"loss"' in l]


def test_soft_label_reaches_train_rm(tmp_path, sft_ckpt):
    """p_chosen = 0.5 on every pair: the loss has no gradient at the zero head, so the rewards stay 0 and
    the loss stays log 2; the same pairs without the field (hard labels) move away from it."""
    pairs = task.preference_records(64, seed=3)
    soft = run_rm(tmp_path, "soft", sft_ckpt, [dict(p, p_chosen=0.5) for p in pairs])
    hard = run_rm(tmp_path, "hard", sft_ckpt, pairs)
    assert len(soft) == 4 and all(abs(l - math.log(2)) < 1e-6 for l in soft)
    assert soft != hard and max(abs(l - math.log(2)) for l in hard[1:]) > 1e-5  # were the field ignored, soft == hard


def test_judge_self_end_to_end(tmp_path, sft_ckpt):
    """Online DPO judged by the policy itself: the rounds run, the self-judge's scores are logged with
    their agreement with gold, and the summary names the judge."""
    out = tmp_path / "self"
    r = subprocess.run([sys.executable, "train_dpo.py", f"--init_from={sft_ckpt}", f"--out_dir={out}", "--online=True",
                        "--judge=self", "--self_judgements=2", "--n_eval=4", "--batch_size=4", "--max_steps=4",
                        "--rounds=2", "--prompts_per_round=8", "--eval_interval=2", "--log_interval=1", "--device=cpu"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rounds = [json.loads(l) for l in open(out / "metrics.jsonl") if '"round"' in l]
    assert [x["round"] for x in rounds] == [1, 2]
    assert all("round/judge_mean" in x and "round/judge_gold_acc" in x for x in rounds)
    assert json.load(open(out / "summary.json"))["judge"] == "self"
