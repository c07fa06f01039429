"""nanoalign/task.py: the built-in chain-addition task, its gold scorer and its record generators."""
import random

import pytest

from nanoalign import data, task

P = "4+7+2+9"  # sum 22, answer 22 % 10 = 2
CORRECT = "4+7=1;1+2=3;3+9=2;#2"


# ------------------------------------------------------------------------------ scoring

def test_correct_response():
    """The correct chain has gold 1, verify 1, and every step right."""
    assert task.step_labels(P, CORRECT) == [True, True, True]
    assert task.verify(P, CORRECT) == 1.0
    assert task.gold(P, CORRECT) == 1.0


def test_arithmetic_slip_carried_on():
    """A slip in step 1 carried on: labels [F, T, T], wrong answer, gold 0.5*0 + 0.5*2/3."""
    r = "4+7=2;2+2=4;4+9=3;#3"
    assert task.step_labels(P, r) == [False, True, True]
    assert task.verify(P, r) == 0.0
    assert task.gold(P, r) == pytest.approx(1 / 3)


def test_wrong_digit():
    """Adding 8 instead of 7 is a wrong step even though 4+8=2 is true arithmetic mod 10."""
    r = "4+8=2;2+2=4;4+9=3;#3"
    assert task.step_labels(P, r) == [False, True, True]
    assert task.gold(P, r) == pytest.approx(1 / 3)


def test_wrong_running_total():
    """A step must start from the previous written total: 1+2=3 then 2+9=1 is wrong (though true mod 10)."""
    r = "4+7=1;1+2=3;2+9=1;#1"
    assert task.step_labels(P, r) == [True, True, False]
    assert task.verify(P, r) == 0.0
    assert task.gold(P, r) == pytest.approx(0.5 * 2 / 3)


def test_slip_in_last_step_only():
    """Right steps but a wrong last sum: labels [T, T, F], gold 0.5 * 2/3."""
    r = "4+7=1;1+2=3;3+9=3;#3"
    assert task.step_labels(P, r) == [True, True, False]
    assert task.gold(P, r) == pytest.approx(1 / 3)


def test_answer_disagrees_with_steps():
    """Correct steps but a wrong final answer: verify 0, gold 0.5 (the steps' half only)."""
    r = "4+7=1;1+2=3;3+9=2;#1"
    assert task.step_labels(P, r) == [True, True, True]
    assert task.verify(P, r) == 0.0
    assert task.gold(P, r) == pytest.approx(0.5)


def test_missing_steps():
    """Skipping steps: right answer with one of three steps -> 0.5 + 0.5/3; answer only -> 0.5."""
    r = "4+7=1;#2"
    assert task.step_labels(P, r) == [True]
    assert task.verify(P, r) == 1.0
    assert task.gold(P, r) == pytest.approx(0.5 + 0.5 / 3)
    assert task.step_labels(P, "#2") == []
    assert task.gold(P, "#2") == pytest.approx(0.5)


def test_extra_steps_cost():
    """An extra (even true) step is wrong and costs a correct one: gold 0.5 + 0.5*(3-1)/3."""
    r = "4+7=1;1+2=3;3+9=2;2+0=2;#2"
    assert task.step_labels(P, r) == [True, True, True, False]
    assert task.verify(P, r) == 1.0
    assert task.gold(P, r) == pytest.approx(0.5 + 0.5 * 2 / 3)
    many = "4+7=1;1+2=3;3+9=2" + ";2+0=2" * 5 + ";#2"
    assert task.gold(P, many) == pytest.approx(0.5)  # steps part floored at 0


@pytest.mark.parametrize("text", ["", "hello world", "#", "#abc", ";;;;", "1+1=2=3;#x", "9" * 400 + ";#" + "9" * 400,
                                  "\x00\uffff", "#-2", "2", "4 + 7 = 1; #2"])
def test_garbage_scores_zero_without_exception(text):
    """Garbage text gets gold 0 and verify 0, and never raises."""
    assert task.verify(P, text) == 0.0
    assert task.gold(P, text) == 0.0
    assert not any(task.step_labels(P, text))


def test_unfinished_response():
    """A response cut off mid-step keeps credit for its finished steps only: 0.5 * 2/3."""
    r = "4+7=1;1+2=3;3+9="
    assert task.step_labels(P, r) == [True, True, False]
    assert task.verify(P, r) == 0.0
    assert task.gold(P, r) == pytest.approx(1 / 3)


def test_answer_must_end_the_response():
    """The answer counts only at the very end: "#2;" or "#2 done" fail verify; the steps still count."""
    for r in (CORRECT + ";", CORRECT + " done", CORRECT + ";#2x"):
        assert task.verify(P, r) == 0.0, r
        assert 0.0 < task.gold(P, r) < 0.5, r
    # "#2" is then an extra non-step part, and an extra "" part too for the trailing ";"
    assert task.gold(P, CORRECT + ";") == pytest.approx(0.5 * (3 - 2) / 3)
    assert task.verify(P, "4+7=1;#2;1+2=3") == 0.0


def test_three_digit_prompt_hand_case():
    """Prompt "0+0+5": "0+0=0;0+5=5;#5" is fully right; "0+0=0;0+5=6;#6" gets 0.5 * 1/2."""
    assert task.gold("0+0+5", "0+0=0;0+5=5;#5") == 1.0
    assert task.step_labels("0+0+5", "0+0=0;0+5=6;#6") == [True, False]
    assert task.gold("0+0+5", "0+0=0;0+5=6;#6") == pytest.approx(0.25)


# ------------------------------------------------------------------------------ demonstrator

def test_demonstrate_without_errors_is_always_correct():
    """demonstrate(p_err=0, p_blind=0) is always fully correct (gold 1) and has one step per added digit."""
    rng = random.Random(0)
    for p in task.prompts(500, seed=3, split="train") + task.prompts(100, seed=3, split="test"):
        r = task.demonstrate(p, rng, p_err=0, p_blind=0)
        assert task.gold(p, r) == 1.0, (p, r)
        assert len(task.step_labels(p, r)) == len(task.digits_of(p)) - 1
    assert task.demonstrate(P, rng, p_err=0, p_blind=0) == CORRECT


def test_demonstrate_default_pass_rate():
    """With the default slip rate the demonstrator passes on between 40% and 75% of prompts."""
    rng = random.Random(1234)
    ps = task.prompts(2000, seed=1, split="train")
    rate = sum(task.verify(p, task.demonstrate(p, rng)) for p in ps) / len(ps)
    assert 0.4 < rate < 0.75, rate
    assert task.demonstrate(P, random.Random(0), p_err=1.0) != CORRECT


def test_prompt_shape():
    """Prompts are 3 to 6 single digits joined by "+"."""
    for p in task.prompts(500, seed=0, split="train"):
        ds = p.split("+")
        assert task.MIN_DIGITS <= len(ds) <= task.MAX_DIGITS
        assert all(len(d) == 1 and d.isdigit() for d in ds)


# ------------------------------------------------------------------------------ splits and generators

def test_splits_disjoint_by_prompt():
    """Prompts from train, val and test never overlap, and split_of agrees with each."""
    sets = {s: set(task.prompts(3000, seed=0, split=s)) for s in ("train", "val", "test")}
    assert not sets["train"] & sets["val"]
    assert not sets["train"] & sets["test"]
    assert not sets["val"] & sets["test"]
    for s, ps in sets.items():
        assert len(ps) > 100
        assert all(task.split_of(p) == s for p in ps)
    for s in ("train", "val", "test"):
        for r in task.sft_records(200, split=s):
            assert task.split_of(r["prompt"]) == s
        for r in task.preference_records(100, split=s):
            assert task.split_of(r["prompt"]) == s
        for r in task.unpaired_records(100, split=s):
            assert task.split_of(r["prompt"]) == s


def test_split_proportions():
    """About 80% / 10% / 10% of all prompts fall in train / val / test."""
    rng = random.Random(0)
    ps = ["+".join(str(rng.randrange(10)) for _ in range(rng.randint(3, 6))) for _ in range(20000)]
    counts = {s: sum(task.split_of(p) == s for p in ps) / len(ps) for s in ("train", "val", "test")}
    assert 0.75 < counts["train"] < 0.85 and 0.07 < counts["val"] < 0.13 and 0.07 < counts["test"] < 0.13


@pytest.mark.parametrize("gen", [task.sft_records, task.preference_records, task.unpaired_records, task.prompts])
def test_generators_deterministic_and_seeded(gen):
    """Same seed -> same records; different seed or split -> different records."""
    a, b = gen(50, seed=0, split="train"), gen(50, seed=0, split="train")
    assert a == b
    assert gen(50, seed=1, split="train") != a
    assert gen(50, seed=0, split="val") != a


def test_preference_pairs_distinct_and_gold_aligned():
    """Chosen != rejected always; on non-tied pairs chosen has the higher gold far above chance."""
    recs = task.preference_records(1000, seed=0)
    assert all(r["chosen"] != r["rejected"] for r in recs)
    diffs = [task.gold(r["prompt"], r["chosen"]) - task.gold(r["prompt"], r["rejected"]) for r in recs]
    untied = [d for d in diffs if abs(d) > 1e-9]
    assert len(untied) > 300
    agree = sum(d > 0 for d in untied) / len(untied)
    assert agree > 0.65, agree


def test_unpaired_labels_boolean_both_classes():
    """Unpaired labels are real booleans, both classes present, and desirable ones have higher gold."""
    recs = task.unpaired_records(1000, seed=0)
    labels = [r["label"] for r in recs]
    assert all(type(x) is bool for x in labels)
    assert 50 < sum(labels) < 950
    good = [task.gold(r["prompt"], r["completion"]) for r in recs if r["label"]]
    bad = [task.gold(r["prompt"], r["completion"]) for r in recs if not r["label"]]
    assert sum(good) / len(good) > sum(bad) / len(bad) + 0.2


def test_sft_records_are_mostly_correct():
    """SFT demonstrations come from the noisy demonstrator: mostly but not always correct."""
    recs = task.sft_records(1000, seed=0)
    rate = sum(task.verify(r["prompt"], r["response"]) for r in recs) / len(recs)
    assert 0.4 < rate < 0.75, rate


def test_records_pass_normalise():
    """Every generated record normalises as its kind (sft, preference, unpaired, problem)."""
    sft = data.normalise(task.sft_records(300, seed=2), "sft", name="task_sft")
    assert len(sft) == 300 and all(r["messages"][-1]["role"] == "assistant" for r in sft)
    pref = data.normalise(task.preference_records(300, seed=2), "preference", name="task_pref")
    assert len(pref) == 300 and all(r["prompt"][0]["role"] == "user" for r in pref)
    unp = data.normalise(task.unpaired_records(300, seed=2), "unpaired", name="task_kto")
    assert len(unp) == 300 and {r["label"] for r in unp} == {True, False}
    ps = task.prompts(100, seed=2)
    prob = data.normalise([{"prompt": p, "answer": str(sum(task.digits_of(p)) % 10)} for p in ps], "problem")
    assert [r["answer"] for r in prob] == [str(sum(map(int, p.split("+"))) % 10) for p in ps]


def test_correct_responses_fit_in_max_new_tokens():
    """The longest correct response (6 digits, e.g. all 9s) fits in MAX_NEW_TOKENS byte tokens with its EOS."""
    r = task.demonstrate("9+9+9+9+9+9", random.Random(0), p_err=0, p_blind=0)
    assert r == "9+9=8;8+9=7;7+9=6;6+9=5;5+9=4;#4"
    assert len(r) + 1 <= task.MAX_NEW_TOKENS


def test_demonstrator_blind_spot_adds_8_for_9():
    """With p_blind=1 and no random slips every "+9" step adds 8; steps adding other digits are right."""
    r = task.demonstrate("3+9+2", random.Random(0), p_err=0, p_blind=1.0)
    assert r == "3+9=1;1+2=3;#3"
    assert task.step_labels("3+9+2", r) == [False, True]
    rng = random.Random(0)
    rate = sum(task.demonstrate("3+9", rng, p_err=0) == "3+9=1;#1" for _ in range(2000)) / 2000
    assert abs(rate - task.P_BLIND) < 0.04


def test_numbers_are_single_digits():
    """Leading zeros or two-digit numbers are not steps or answers: there is one way to write each."""
    assert task.verify(P, "4+7=1;1+2=3;3+9=2;#02") == 0.0
    assert task.step_labels(P, "4+7=01;1+2=3;3+9=2;#2") == [False, False, True]  # no total to carry on
