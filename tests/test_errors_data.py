"""Data that used to crash or be silently wrong (issue 12, items 1-10): each case reproduced, with the clear
behaviour it now gets. Files are written here; script runs use the tiny `sft_ckpt` and fail (or finish) in
seconds."""
import gzip
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from nanoalign import data
from nanoalign.data import DataError
from nanoalign.model import GPT, GPTConfig
from nanoalign.sampling import generate
from nanoalign.tokenizer import byte_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = byte_tokenizer()
HH = "\n\nHuman: {}\n\nAssistant: {}"
LONG = "a long question " * 20  # 320 bytes: more than the tiny model's 128-token context


def write_lines(path, records):
    """JSONL: records are dicts (dumped) or raw strings/bytes (written as they are)."""
    with open(path, "wb") as f:
        for r in records:
            f.write((r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode()) + b"\n")
    return str(path)


def script(name, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, name, *args, "--device=cpu"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


def ok(r):
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def fails_with(r, pattern):
    """A non-zero exit whose stderr is exactly one line matching `pattern` (no traceback)."""
    assert r.returncode != 0, r.stdout[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), r.stderr[-3000:]  # how utils.configure's excepthook reports a DataError
    last = last[len("error: "):]
    assert "Traceback" not in r.stderr and re.search(pattern, last), r.stderr[-3000:]
    return last


SFT_TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--batch_size=4", "--max_steps=1", "--n_eval=4",
            "--eval_interval=1000", "--ckpt_interval=1000"]
RM_TINY = ["--n_eval=20", "--n_norm=4", "--batch_size=4", "--max_steps=1", "--eval_interval=2", "--log_interval=1"]
DPO_TINY = ["--n_eval=4", "--n_eval_pairs=4", "--batch_size=4", "--max_steps=1", "--eval_interval=2",
            "--log_interval=1"]
GRPO_TINY = ["--prompts_per_step=2", "--group_size=2", "--max_steps=1", "--n_eval=2", "--eval_k=2",
             "--max_new_tokens=8"]


def pairs(n, start=0):
    return [{"prompt": f"{i % 7}+{i % 5}={i}", "chosen": "yes, good", "rejected": "no"} for i in range(start, start + n)]


def problems(n):
    return [{"question": f"What is {i} + 1?", "answer": f"step\n#### {i + 1}"} for i in range(n)]


# ------------------------------------------------------------------------------ 1. on_error / truncate everywhere

def test_1_dpo_takes_on_error_and_skips_an_empty_chosen_response(tmp_path, sft_ckpt):
    """HH-RLHF with one empty chosen response: DPO stops at it naming file:line, or skips it with
    --on_error=skip (counted and reported) and trains."""
    path = write_lines(tmp_path / "hh.jsonl", [{"chosen": HH.format(f"q{i}", "good"), "rejected": HH.format(f"q{i}", "bad")}
                                               for i in range(8)] + [{"chosen": HH.format("q", " "), "rejected": HH.format("q", "x")}])
    fails_with(script("train_dpo.py", f"--init_from={sft_ckpt}", f"--out_dir={tmp_path / 'a'}", f"--data_path={path}",
                      *DPO_TINY), re.escape(f"{path}:9: empty chosen response"))
    out = ok(script("train_dpo.py", f"--init_from={sft_ckpt}", f"--out_dir={tmp_path / 'b'}", f"--data_path={path}",
                    "--on_error=skip", *DPO_TINY))
    assert f"{path}: skipped 1 records: 1 x empty chosen response" in out
    kept, held = map(int, re.search(r"dpo: (\d+) training pairs .*\((\d+) held out for evaluation\)", out).groups())
    assert kept + held == 8 and held >= 1  # the 8 good pairs: some held out by prompt for the evaluation


def test_1_every_file_reading_stage_has_on_error_and_truncate():
    """The config keys, with the same defaults and meaning (read from the config blocks: no torch import)."""
    for name in ("train_sft.py", "train_rm.py", "train_dpo.py", "train_grpo.py"):
        block = open(os.path.join(ROOT, name)).read().split("# ---- config", 1)[1].split("# ---- end config")[0]
        assert 'on_error = "raise"  # malformed records: "raise" (error naming file:line) or "skip"' in block, name
        assert re.search(r'^truncate = "skip"  # .*"skip" \(counted\).* "raise"', block, re.M), name


def test_1_dpo_truncate_raise(tmp_path, sft_ckpt):
    """DPO applies the truncation policy to each pair (no silent drop): raise names the pair's file:line."""
    path = write_lines(tmp_path / "p.jsonl", pairs(6) + [{"prompt": LONG, "chosen": "yes", "rejected": "no"}])
    fails_with(script("train_dpo.py", f"--init_from={sft_ckpt}", f"--out_dir={tmp_path / 'a'}", f"--data_path={path}",
                      "--truncate=raise", *DPO_TINY), re.escape(f"{path}:7: too long: ") + r"\d+ tokens > context 128")


# ------------------------------------------------------------------------------ 2. nothing usable

@pytest.mark.parametrize("text,counts", [("", "0 read, 0 skipped)"), ("\n\n  \n\r\n", "0 read, 0 skipped)"),
                                         ("{bad\n[1]\n", "2 read, 2 skipped: 1 x bad JSON, 1 x expected a JSON object, got list)")])
def test_2_load_with_no_usable_record_is_one_clear_error(tmp_path, text, counts):
    path = str(tmp_path / "d.jsonl")
    open(path, "w").write(text)
    with pytest.raises(DataError) as e:
        data.load(path, "sft", on_error="skip")
    assert str(e.value).startswith(f"{path}: no usable records (") and str(e.value).endswith(counts), str(e.value)


@pytest.mark.parametrize("stage", ["train_sft.py", "train_rm.py", "train_dpo.py", "train_grpo.py"])
def test_2_scripts_exit_with_the_message_before_building_a_model(tmp_path, sft_ckpt, stage):
    """A file whose every record is skipped (an empty one: test above, same path): one line, non-zero exit,
    and no model built (SFT prints "model: ..." once it has one; the others write nothing to out_dir)."""
    path = write_lines(tmp_path / "junk.jsonl", ["{not json", "", '{"x": 1}'])
    init = [] if stage == "train_sft.py" else [f"--init_from={sft_ckpt}"]
    out = tmp_path / "out"
    r = script(stage, *init, f"--out_dir={out}", f"--data_path={path}", "--on_error=skip")
    fails_with(r, "^" + re.escape(f"{path}: no usable records (2 read, 2 skipped: 1 x bad JSON, 1 x ") + r".+\)$")
    assert "model:" not in r.stdout and not os.path.exists(out / "metrics.jsonl")


def test_2_nothing_left_after_truncation(tmp_path, sft_ckpt):
    """Every record too long for the context: a clear error after tokenisation, in SFT, RM and DPO."""
    sft = write_lines(tmp_path / "sft.jsonl", [{"prompt": LONG + str(i), "response": "r"} for i in range(6)])
    fails_with(script("train_sft.py", f"--out_dir={tmp_path / 's'}", f"--data_path={sft}", *SFT_TINY),
               re.escape(f"{sft} train: no usable records (") + r"\d+ read, \d+ skipped: \d+ x too long\)")
    prefs = write_lines(tmp_path / "p.jsonl", [{"prompt": LONG + str(i), "chosen": "a", "rejected": "b"} for i in range(6)])
    fails_with(script("train_rm.py", f"--init_from={sft_ckpt}", f"--out_dir={tmp_path / 'r'}", f"--data_path={prefs}",
                      *RM_TINY), re.escape(f"{prefs} (train pairs): no usable records (") + r"\d+ read, \d+ skipped: \d+ x too long\)")
    fails_with(script("train_dpo.py", f"--init_from={sft_ckpt}", f"--out_dir={tmp_path / 'd'}", f"--data_path={prefs}",
                      *DPO_TINY), re.escape(f"{prefs} (pairs): no usable records (6 read, 6 skipped: 6 x too long)"))


# ------------------------------------------------------------------------------ 3. bytes: UTF-8 and gzip

def test_3_non_utf8_line_is_named_and_skippable(tmp_path):
    good = json.dumps({"prompt": "a", "response": "b"}).encode()
    path = write_lines(tmp_path / "d.jsonl", [good, b'{"prompt": "caf\xe9", "response": "x"}', good])
    with pytest.raises(DataError, match="^" + re.escape(f"{path}:2: not valid UTF-8") + "$"):
        data.load(path, "sft")
    recs, skips = data.load(path, "sft", on_error="skip")
    assert len(recs) == 2 and skips.counts == {"not valid UTF-8": 1}
    arr = str(tmp_path / "d.json")  # a JSON array is one document: the error names the line, always
    open(arr, "wb").write(b'[\n {"prompt": "a", "response": "b"},\n {"prompt": "\xff", "response": "b"}\n]\n')
    with pytest.raises(DataError, match="^" + re.escape(f"{arr}:3: not valid UTF-8") + "$"):
        data.load(arr, "sft", on_error="skip")


def test_3_byte_order_mark_still_works(tmp_path):
    rec = {"prompt": "a", "response": "b"}
    for name, text in (("d.jsonl", json.dumps(rec) + "\n"), ("d.json", json.dumps([rec], indent=1))):
        path = str(tmp_path / name)
        open(path, "wb").write(b"\xef\xbb\xbf" + text.encode())
        assert data.load(path, "sft")[0] == [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    gz = str(tmp_path / "d.jsonl.gz")
    with gzip.open(gz, "wb") as f:
        f.write(b"\xef\xbb\xbf" + json.dumps(rec).encode() + b"\n")
    assert len(data.load(gz, "sft")[0]) == 1


def test_3_broken_gzip_is_a_data_error(tmp_path):
    text = "".join(json.dumps({"prompt": f"p{i}", "response": "r" * 50}) + "\n" for i in range(200)).encode()
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes(gzip.compress(text)[:300])
    plain = tmp_path / "plain.jsonl.gz"
    plain.write_bytes(text)
    for path in (str(truncated), str(plain)):
        with pytest.raises(DataError, match="^" + re.escape(f"{path}: not a valid gzip file (")):
            data.load(path, "sft", on_error="skip")
    with pytest.raises(DataError, match="cannot read"):
        data.load(str(tmp_path / "missing.jsonl"), "sft")


def test_3_scripts_report_a_bad_byte_with_file_and_line(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [{"prompt": f"p{i}", "response": "r"} for i in range(4)] + [b"\x80\x81"])
    fails_with(script("train_sft.py", f"--out_dir={tmp_path / 'o'}", f"--data_path={path}", *SFT_TINY),
               "^" + re.escape(f"{path}:5: not valid UTF-8") + "$")


# ------------------------------------------------------------------------------ 4. truncate=raise names file:line

def test_4_truncate_raise_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [{"prompt": "a", "response": "b"}, "", {"prompt": "x" * 50, "response": "y"}])
    recs, _ = data.load(path, "sft")
    assert [r.where for r in recs] == [f"{path}:1", f"{path}:3"]
    with pytest.raises(DataError, match="^" + re.escape(f"{path}:3: too long: 55 tokens > context 20")):
        data.tokenize_sft(TOK, recs, 20, truncate="raise", name="train")
    builtin = data.normalise([{"prompt": "p", "response": "x" * 50}], "sft", "builtin-train")
    with pytest.raises(DataError, match=re.escape("builtin-train[0]: too long")):
        data.tokenize_sft(TOK, builtin, 20, truncate="raise", name="train")


def test_4_scripts_name_the_line_under_truncate_raise(tmp_path, sft_ckpt):
    sft = write_lines(tmp_path / "s.jsonl", [{"prompt": f"p{i}", "response": "r"} for i in range(5)] +
                      [{"prompt": LONG, "response": "r"}])
    fails_with(script("train_sft.py", f"--out_dir={tmp_path / 's'}", f"--data_path={sft}", "--truncate=raise",
                      *SFT_TINY), "^" + re.escape(f"{sft}:6: too long: "))
    prefs = write_lines(tmp_path / "p.jsonl", pairs(30) + [{"prompt": "q", "chosen": LONG, "rejected": "no"}])
    recs, _ = data.load(prefs, "preference")
    train, _ = data.split_by_prompt(recs, 0.05, 1337)
    assert any(r["chosen"] == LONG for r in train)  # the split is by a hash of the prompt: "q" is a train prompt
    fails_with(script("train_rm.py", f"--init_from={sft_ckpt}", f"--out_dir={tmp_path / 'r'}", f"--data_path={prefs}",
                      "--truncate=raise", *RM_TINY), "^" + re.escape(f"{prefs}:31: too long: "))


# ------------------------------------------------------------------------------ 5. a pair's own margin

def test_5_preference_margin_is_kept_and_validated(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": 2},
                                              {"prompt": "p", "chosen": "a", "rejected": "b", "margin": None},
                                              {"prompt": "p", "chosen": "a", "rejected": "b"}])
    recs, _ = data.load(path, "preference")
    assert recs[0]["margin"] == 2.0 and type(recs[0]["margin"]) is float
    assert "margin" not in recs[1] and "margin" not in recs[2]
    for bad in ("3", True, float("nan"), [1]):
        with pytest.raises(DataError, match="'margin' must be a finite number"):
            data.parse_preference({"prompt": "p", "chosen": "a", "rejected": "b", "margin": bad}, "x:1")


def test_5_train_rm_uses_the_pairs_margin(tmp_path, sft_ckpt):
    """The head starts at zero, so the first loss is softplus(margin): log 2 without a margin, 3.0486 with 3."""
    path = write_lines(tmp_path / "p.jsonl", [dict(p, margin=3) for p in pairs(40)])
    ok(script("train_rm.py", f"--init_from={sft_ckpt}", f"--out_dir={tmp_path / 'rm'}", f"--data_path={path}",
              "--normalize=False", *RM_TINY))
    first = json.loads(open(tmp_path / "rm" / "metrics.jsonl").readline())
    assert first["loss"] == pytest.approx(math.log1p(math.exp(3)), abs=1e-4)


# ------------------------------------------------------------------------------ 6. problem answers

@pytest.mark.parametrize("answer", ["step\n#### 4 apples", "She had 4 apples.", "#### 3/4", "#### $5", "#### x"])
def test_6_answers_the_checker_cannot_match_are_malformed(tmp_path, answer):
    path = write_lines(tmp_path / "p.jsonl", problems(2) + [{"question": "q", "answer": answer}])
    with pytest.raises(DataError, match="^" + re.escape(f"{path}:3: answer is not a number the answer checker can match")):
        data.load(path, "problem")
    recs, skips = data.load(path, "problem", on_error="skip")
    assert len(recs) == 2 and sum(skips.counts.values()) == 1


def test_6_numeric_answers_load_and_match_the_checker():
    from nanoalign.rewards import answer_reward
    for answer, response in (("#### 1,234", "so #### 1234"), ("-3", "it is -3"), ("#### 0.5", "0.5"), (" 42 ", "42")):
        rec = data.parse_problem({"question": "q", "answer": answer}, "x:1")
        assert answer_reward({"q": rec["answer"]})("q", response) == 1.0, answer


def test_6_grpo_on_a_file_of_unmatchable_answers_stops(tmp_path, sft_ckpt):
    path = write_lines(tmp_path / "p.jsonl", [{"question": f"q{i}", "answer": "no number here"} for i in range(4)])
    fails_with(script("train_grpo.py", f"--init_from={sft_ckpt}", f"--out_dir={tmp_path / 'g'}", f"--data_path={path}",
                      "--on_error=skip", *GRPO_TINY),
               re.escape(f"{path}: no usable records (4 read, 4 skipped: 4 x answer is not a number"))


# ------------------------------------------------------------------------------ 7. RM counts pairs

def test_7_fit_all_counts_an_example_once():
    skips = data.Skips("skip")
    short, long_ = ([1, 2, 3], [0, 1, 1]), (list(range(20)), [0] * 10 + [1] * 10)
    assert data.fit_all([short, short], 10, "skip", "x:1", skips) == [short, short]
    assert data.fit_all([long_, long_], 10, "skip", "x:2", skips) is None
    assert data.fit_all([short, long_], 10, "skip", "x:3", skips) is None
    assert skips.counts == {"too long": 2}
    with pytest.raises(DataError, match=r"^x:4: too long: 20 tokens > context 10"):
        data.fit_all([short, long_], 10, "raise", "x:4", skips)


def test_7_train_rm_reports_skipped_pairs(tmp_path, sft_ckpt):
    """Pairs with both responses too long, and with only the chosen one too long: each is one skipped pair."""
    recs = pairs(30) + [{"prompt": f"long {i}", "chosen": LONG, "rejected": LONG if i % 2 else "no"} for i in range(12)]
    path = write_lines(tmp_path / "p.jsonl", recs)
    train, _ = data.split_by_prompt(data.load(path, "preference")[0], 0.05, 1337)
    n_long = sum(r["chosen"] == LONG for r in train)
    out = ok(script("train_rm.py", f"--init_from={sft_ckpt}", f"--out_dir={tmp_path / 'rm'}", f"--data_path={path}",
                    "--normalize=False", *RM_TINY))
    assert n_long > 0 and f"train pairs: skipped {n_long} records: {n_long} x too long" in out
    assert f"data: {len(train) - n_long} training examples" in out


# ------------------------------------------------------------------------------ 8. prompts that leave no room

def test_8_generate_limits_each_row_not_the_batch():
    """A long prompt in the batch no longer shortens everyone's responses: each row samples up to
    min(max_new_tokens, block_size - its length), and what it samples is the plain argmax loop's."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=64, vocab_size=50, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():  # larger weights than the init, so that the argmax is far from ties
        for p in model.parameters():
            p.mul_(4.0)
    prompts = [[5] * 60, [7, 8, 9], [4] * 62]
    out, mask = generate(model, prompts, 10, eos_id=-1, pad_id=0, temperature=0)
    assert out.shape == (3, 10) and mask.sum(1).tolist() == [4, 10, 2]
    for p, row, m in zip(prompts, out.tolist(), mask.tolist()):
        n = sum(m)
        seq = list(p)
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert row[:n] == seq[len(p):] and all(t == 0 for t in row[n:])
    with pytest.raises(ValueError, match="prompt of 64 tokens leaves no room in block_size 64"):
        generate(model, [[1, 2], [5] * 64], 5, eos_id=-1, pad_id=0)


def test_8_9_grpo_on_a_file_filters_long_prompts_and_verifies_by_default(tmp_path, sft_ckpt):
    """A problem file (a malformed record skipped, prompts too long for a 128-token model filtered and
    counted) with the default --rewards=verify:1.0: it trains. truncate=raise names the long one's line;
    with no prompt that fits, one clear error."""
    recs = problems(8) + [{"question": LONG, "answer": "#### 1"}, {"question": "q", "answer": "#### x"}]
    path = write_lines(tmp_path / "p.jsonl", recs)
    out = ok(script("train_grpo.py", f"--init_from={sft_ckpt}", f"--out_dir={tmp_path / 'g'}", f"--data_path={path}",
                    "--on_error=skip", *GRPO_TINY))
    assert f"{path}: skipped 1 records: 1 x prompt too long" in out
    assert json.load(open(tmp_path / "g" / "summary.json"))["n_eval_prompts"] == 2
    fails_with(script("train_grpo.py", f"--init_from={sft_ckpt}", f"--out_dir={tmp_path / 'h'}", f"--data_path={path}",
                      "--on_error=skip", "--truncate=raise", *GRPO_TINY),
               "^" + re.escape(f"{path}:9: prompt of ") + r"\d+ tokens leaves no room for max_new_tokens=8 in block_size 128$")
    only_long = write_lines(tmp_path / "l.jsonl", [{"question": LONG + str(i), "answer": "#### 1"} for i in range(3)])
    fails_with(script("train_grpo.py", f"--init_from={sft_ckpt}", f"--out_dir={tmp_path / 'i'}",
                      f"--data_path={only_long}", *GRPO_TINY),
               "^" + re.escape(f"{only_long}: no usable records (3 read, 3 skipped: 3 x prompt too long)") + "$")


# ------------------------------------------------------------------------------ 10. split by prompt

def test_10_split_by_prompt_never_straddles_and_keeps_val_frac():
    recs = [data.Record({"prompt": [{"role": "user", "content": f"q{i % 500}"}], "chosen": f"c{i}", "rejected": "r"},
                        f"f:{i}") for i in range(2000)]  # 500 prompts, 4 pairs each
    train, val = data.split_by_prompt(recs, 0.1, seed=0)
    key = lambda r: r["prompt"][0]["content"]
    assert len(train) + len(val) == 2000 and not {key(r) for r in train} & {key(r) for r in val}
    assert 0.06 < len(val) / 2000 < 0.14 and len(val) % 4 == 0
    assert {key(r) for r in data.split_by_prompt(recs, 0.1, seed=1)[1]} == {key(r) for r in val}  # by prompt, not seed
    sft = [data.Record({"messages": [{"role": "user", "content": f"q{i % 50}"}, {"role": "assistant", "content": str(i)}]},
                       f"f:{i}") for i in range(200)]
    s_train, s_val = data.split_by_prompt(sft, 0.0, seed=0)  # val_frac 0 still holds out one prompt (all its records)
    prompts = lambda rs: {r["messages"][0]["content"] for r in rs}
    assert len(prompts(s_val)) == 1 and len(s_val) == 4 and not prompts(s_train) & prompts(s_val)
    two = sft[:2]  # val_frac 0.99: still one prompt is left to train on
    assert [len(x) for x in data.split_by_prompt(two, 0.99, seed=0)] == [1, 1]


def test_10_a_single_prompt_file_is_split_by_record_and_says_so(capsys):
    same = [data.Record({"prompt": [{"role": "user", "content": "q"}], "chosen": f"c{i}", "rejected": "r"}, f"f:{i}")
            for i in range(40)]
    train, val = data.split_by_prompt(same, 0.05, seed=0, name="f")
    assert (len(train), len(val)) == (38, 2) and "f: every record has the same prompt" in capsys.readouterr().out
