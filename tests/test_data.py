"""nanoalign/data.py: file formats, error reporting, truncation policy, in-memory normalisation."""
import gzip
import json
import re

import pytest

from nanoalign import data
from nanoalign.data import DataError
from nanoalign.tokenizer import byte_tokenizer


def write(tmp_path, records, fmt, name="data"):
    """Write records as JSONL, a JSON array (one key per line), or gzipped JSONL; return the path."""
    path = str(tmp_path / f"{name}.{fmt}")
    if fmt == "json":
        text = json.dumps(records, indent=2)
    else:
        text = "".join(json.dumps(r) + "\n" for r in records)
    if fmt.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    return path


def write_text(tmp_path, text, name):
    path = str(tmp_path / name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


FORMATS = ["jsonl", "json", "jsonl.gz"]
U, A = "user", "assistant"


def msg(role, content):
    return {"role": role, "content": content}


# ------------------------------------------------------------------------------ formats

@pytest.mark.parametrize("fmt", FORMATS)
def test_sft_prompt_response(tmp_path, fmt):
    """{"prompt", "response"} -> a user turn and an assistant turn."""
    path = write(tmp_path, [{"prompt": "2+2?", "response": "4"}, {"prompt": "hi", "response": "hello"}], fmt)
    recs, skips = data.load(path, "sft")
    assert recs == [{"messages": [msg(U, "2+2?"), msg(A, "4")]},
                    {"messages": [msg(U, "hi"), msg(A, "hello")]}]
    assert sum(skips.counts.values()) == 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_sft_messages(tmp_path, fmt):
    """{"messages": [...]} is kept as is, system turn included."""
    conv = [msg("system", "be brief"), msg(U, "a"), msg(A, "b"), msg(U, "c"), msg(A, "d")]
    recs, _ = data.load(write(tmp_path, [{"messages": conv}], fmt), "sft")
    assert recs == [{"messages": conv}]


@pytest.mark.parametrize("fmt", FORMATS)
def test_sft_alpaca(tmp_path, fmt):
    """Alpaca: instruction + "\\n\\n" + input as the prompt (input optional), output as the response."""
    path = write(tmp_path, [{"instruction": "Translate", "input": "chat", "output": "cat"},
                            {"instruction": "Say hi", "input": "", "output": "hi"},
                            {"instruction": "Say yo", "output": "yo"}], fmt)
    recs, _ = data.load(path, "sft")
    assert recs == [{"messages": [msg(U, "Translate\n\nchat"), msg(A, "cat")]},
                    {"messages": [msg(U, "Say hi"), msg(A, "hi")]},
                    {"messages": [msg(U, "Say yo"), msg(A, "yo")]}]


@pytest.mark.parametrize("fmt", FORMATS)
def test_sft_sharegpt(tmp_path, fmt):
    """ShareGPT {"conversations": [{"from", "value"}]}: human/gpt/system -> user/assistant/system."""
    conv = [{"from": "system", "value": "s"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "r"}]
    recs, _ = data.load(write(tmp_path, [{"conversations": conv}], fmt), "sft")
    assert recs == [{"messages": [msg("system", "s"), msg(U, "q"), msg(A, "r")]}]


@pytest.mark.parametrize("fmt", FORMATS)
def test_preference_string_prompt(tmp_path, fmt):
    """{"prompt": str, "chosen": str, "rejected": str} -> prompt as one user message."""
    recs, _ = data.load(write(tmp_path, [{"prompt": "p", "chosen": "good", "rejected": "bad"}], fmt), "preference")
    assert recs == [{"prompt": [msg(U, "p")], "chosen": "good", "rejected": "bad"}]


@pytest.mark.parametrize("fmt", FORMATS)
def test_preference_message_lists(tmp_path, fmt):
    """Message-list prompt and message-list chosen/rejected: the final assistant turn is the reply."""
    rec = {"prompt": [msg("system", "s"), msg(U, "q")],
           "chosen": [msg(A, "good")], "rejected": [msg(A, "bad")]}
    recs, _ = data.load(write(tmp_path, [rec], fmt), "preference")
    assert recs == [{"prompt": [msg("system", "s"), msg(U, "q")], "chosen": "good", "rejected": "bad"}]


@pytest.mark.parametrize("fmt", FORMATS)
def test_preference_full_conversations_without_prompt(tmp_path, fmt):
    """Two full conversations (no prompt key) are split into the shared prompt and the two replies."""
    rec = {"chosen": [msg(U, "q"), msg(A, "good")], "rejected": [msg(U, "q"), msg(A, "bad")]}
    recs, _ = data.load(write(tmp_path, [rec], fmt), "preference")
    assert recs == [{"prompt": [msg(U, "q")], "chosen": "good", "rejected": "bad"}]


@pytest.mark.parametrize("fmt", FORMATS)
def test_preference_raw_hh_rlhf(tmp_path, fmt):
    """Raw HH-RLHF strings -> prompt of 3 messages, chosen "A", rejected "B"."""
    base = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: more\n\nAssistant: "
    recs, _ = data.load(write(tmp_path, [{"chosen": base + "A", "rejected": base + "B"}], fmt), "preference")
    assert recs == [{"prompt": [msg(U, "hi"), msg(A, "hello"), msg(U, "more")], "chosen": "A", "rejected": "B"}]


@pytest.mark.parametrize("fmt", FORMATS)
def test_preference_sharegpt(tmp_path, fmt):
    """ShareGPT-style preference: conversations as the prompt, chosen/rejected as gpt messages."""
    rec = {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"}],
           "chosen": {"from": "gpt", "value": "good"}, "rejected": {"from": "gpt", "value": "bad"}}
    recs, _ = data.load(write(tmp_path, [rec], fmt), "preference")
    assert recs == [{"prompt": [msg("system", "s"), msg(U, "q")], "chosen": "good", "rejected": "bad"}]


@pytest.mark.parametrize("fmt", FORMATS)
def test_unpaired_labels(tmp_path, fmt):
    """Unpaired labels true/false and 1/0 all become booleans."""
    path = write(tmp_path, [{"prompt": "p", "completion": "c1", "label": True},
                            {"prompt": [msg(U, "p2")], "completion": "c2", "label": False},
                            {"prompt": "p", "completion": "c3", "label": 1},
                            {"prompt": "p", "completion": "c4", "label": 0}], fmt)
    recs, _ = data.load(path, "unpaired")
    assert [r["label"] for r in recs] == [True, False, True, False]
    assert all(type(r["label"]) is bool for r in recs)
    assert recs[0] == {"prompt": [msg(U, "p")], "completion": "c1", "label": True}
    assert recs[1]["prompt"] == [msg(U, "p2")]


@pytest.mark.parametrize("fmt", FORMATS)
def test_problem_gsm8k(tmp_path, fmt):
    """GSM8K: the answer after "####" with thousands separators removed; {"prompt", "answer"} too."""
    path = write(tmp_path, [{"question": "How many?", "answer": "First 1000+234.\n#### 1,234"},
                            {"prompt": "2+2", "answer": " 4 "}], fmt)
    recs, _ = data.load(path, "problem")
    assert recs == [{"prompt": [msg(U, "How many?")], "answer": "1234"},
                    {"prompt": [msg(U, "2+2")], "answer": "4"}]


def test_jsonl_blank_lines_and_crlf(tmp_path):
    """Blank lines are skipped, CRLF line ends are fine, and line numbers count every line."""
    text = '{"prompt": "a", "response": "b"}\r\n\r\n{"prompt": "c", "response": "d"}\r\n{"prompt": "e"}\r\n'
    path = write_text(tmp_path, text, "crlf.jsonl")
    with pytest.raises(DataError, match=re.escape(path) + f":4: missing key 'response'"):
        data.load(path, "sft")


def test_jsonl_unicode_line_separator_inside_string(tmp_path):
    """A raw U+2028 / U+0085 inside a JSON string (valid JSON) does not split the JSONL line."""
    rec = {"prompt": "a\u2028b", "response": "c\x85d\u2029"}
    path = write_text(tmp_path, json.dumps(rec, ensure_ascii=False) + "\n" + json.dumps(rec) + "\n", "u.jsonl")
    recs, _ = data.load(path, "sft")
    assert recs == [{"messages": [msg(U, "a\u2028b"), msg(A, "c\x85d\u2029")]}] * 2


# ------------------------------------------------------------------------------ errors

GOOD = '{"prompt": "a", "response": "b"}'


def test_bad_json_names_file_and_line(tmp_path):
    """Bad JSON on line 3 of a JSONL -> DataError with "path:3" and "bad JSON"."""
    path = write_text(tmp_path, f"{GOOD}\n{GOOD}\n{{\"prompt\": \"a\", \n{GOOD}\n", "bad.jsonl")
    with pytest.raises(DataError) as e:
        data.load(path, "sft")
    assert f"{path}:3" in str(e.value) and "bad JSON" in str(e.value)


def test_missing_key_names_line_and_key(tmp_path):
    """A missing key on line 2 -> the message has ":2:" and the key's name."""
    path = write_text(tmp_path, f'{GOOD}\n{{"prompt": "a", "reply": "b"}}\n', "missing.jsonl")
    with pytest.raises(DataError) as e:
        data.load(path, "sft")
    assert f"{path}:2:" in str(e.value) and "'response'" in str(e.value)


@pytest.mark.parametrize("kind,rec,needle", [
    ("sft", {"prompt": "a", "response": "   "}, "empty response"),
    ("sft", {"messages": [msg(U, "a"), msg(A, "")]}, "empty response"),
    ("sft", {"messages": [msg(U, "a")]}, "end with an assistant turn"),
    ("sft", {"conversations": [{"from": "robot", "value": "x"}]}, "role"),
    ("sft", {"prompt": "a", "response": 5}, "must be a string"),
    ("preference", {"prompt": "p", "chosen": "x", "rejected": ""}, "empty rejected response"),
    ("preference", {"prompt": "p", "chosen": "x"}, "missing key 'rejected'"),
    ("preference", {"chosen": "\n\nHuman: hi\n\nAssistant: A", "rejected": "\n\nHuman: bye\n\nAssistant: B"},
     "do not share the prompt"),
    ("preference", {"chosen": "just text", "rejected": "\n\nHuman: hi\n\nAssistant: B"}, "not an HH-RLHF"),
    ("unpaired", {"prompt": "p", "completion": "c", "label": "yes"}, "'label' must be true/false or 1/0"),
    ("unpaired", {"prompt": "p", "completion": "c"}, "'label'"),
    ("unpaired", {"prompt": "p", "completion": "", "label": 1}, "empty completion"),
    ("problem", {"question": "q", "answer": "work #### "}, "empty answer"),
])
def test_bad_records_raise_with_location(tmp_path, kind, rec, needle):
    """Each malformed record raises DataError naming file:line and the reason."""
    path = write_text(tmp_path, json.dumps(rec) + "\n", "bad.jsonl")
    with pytest.raises(DataError) as e:
        data.load(path, kind)
    assert str(e.value).startswith(f"{path}:1: ") and needle in str(e.value), str(e.value)


def test_non_object_record(tmp_path):
    """A JSONL line that is not an object is reported with its line."""
    path = write_text(tmp_path, f"{GOOD}\n[1, 2]\n", "list.jsonl")
    with pytest.raises(DataError, match=re.escape(path) + f":2: expected a JSON object, got list"):
        data.load(path, "sft")


def test_json_array_reports_record_start_line(tmp_path):
    """In a JSON array file, a bad record on a later line reports the line where that record starts."""
    text = ('[\n'
            '  {"prompt": "a", "response": "b"},\n'
            '  {"prompt": "c",\n'
            '   "response": "d"},\n'
            '\n'
            '  {"prompt": "e",\n'
            '   "answer": "f"}\n'
            ']\n')
    path = write_text(tmp_path, text, "arr.json")
    with pytest.raises(DataError) as e:
        data.load(path, "sft")
    assert str(e.value).startswith(f"{path}:6: missing key 'response'"), str(e.value)


def test_json_array_line_numbers_with_indent(tmp_path):
    """json.dumps(indent=2) of 3 records: record i starts on line 2 + 4*i; a bad 3rd one says line 10."""
    recs = [{"prompt": "a", "response": "b"}, {"prompt": "c", "response": "d"}, {"prompt": "e", "response": ""}]
    path = write(tmp_path, recs, "json")
    with open(path) as f:
        assert f.read().splitlines()[9].strip() == "{"
    with pytest.raises(DataError, match=re.escape(path) + f":10: empty response"):
        data.load(path, "sft")


def test_json_array_bad_json(tmp_path):
    """A broken JSON array names the file and the line of the syntax error."""
    path = write_text(tmp_path, '[\n  {"prompt": "a", "response": "b"},\n  {"prompt": }\n]\n', "broken.json")
    with pytest.raises(DataError, match=re.escape(path) + f":3: bad JSON"):
        data.load(path, "sft")


def test_skip_mode_counts_and_reports(tmp_path, capsys):
    """on_error="skip": good records are returned, bad ones counted by reason and reported."""
    lines = [GOOD, "{not json", '{"prompt": "a"}', '{"prompt": "c", "response": "d"}',
             '{"prompt": "a", "response": " "}', "[]", '{"prompt": "e", "response": "f"}']
    path = write_text(tmp_path, "\n".join(lines) + "\n", "mixed.jsonl")
    recs, skips = data.load(path, "sft", on_error="skip")
    assert [r["messages"][1]["content"] for r in recs] == ["b", "d", "f"]
    assert sum(skips.counts.values()) == 4
    assert skips.counts["bad JSON"] == 1
    assert skips.counts["empty response"] == 1
    assert any(k.startswith("missing key 'response'") for k in skips.counts)
    out = capsys.readouterr().out
    assert f"{path}: skipped 4 records" in out
    assert "1 x bad JSON" in out and "1 x empty response" in out


def test_skip_mode_json_array(tmp_path, capsys):
    """Skip mode works on JSON arrays too, and a clean file prints no report."""
    path = write(tmp_path, [{"prompt": "a", "response": "b"}, {"prompt": "a"}, 7], "json")
    recs, skips = data.load(path, "sft", on_error="skip")
    assert len(recs) == 1 and sum(skips.counts.values()) == 2
    assert "skipped 2 records" in capsys.readouterr().out
    clean = write(tmp_path, [{"prompt": "a", "response": "b"}], "json", name="clean")
    data.load(clean, "sft", on_error="skip")
    assert capsys.readouterr().out == ""


# ------------------------------------------------------------------------------ truncation

TOK = byte_tokenizer()


def conv(prompt, response):
    return {"messages": [msg(U, prompt), msg(A, response)]}


def test_render_layout_used_by_truncation():
    """The byte tokenizer renders <user> p <end> <assistant> r <end>; only r and its <end> are trained."""
    ids, mask = TOK.render(conv("ab", "xyz")["messages"])
    assert ids == [TOK.user_id, 97, 98, TOK.eos_id, TOK.assistant_id, 120, 121, 122, TOK.eos_id]
    assert mask == [0, 0, 0, 0, 0, 1, 1, 1, 1]


def test_truncate_fits_unchanged():
    """An example that fits is returned untouched under every policy."""
    for policy in ("skip", "raise", "left"):
        out = data.tokenize_sft(TOK, [conv("ab", "xyz")], 9, truncate=policy)
        assert out == [TOK.render(conv("ab", "xyz")["messages"])]


def test_truncate_skip_drops_and_counts(capsys):
    """"skip" drops over-long conversations, counts them, and says so."""
    convs = [conv("ab", "xyz"), conv("a" * 20, "xyz"), conv("cd", "uv"), conv("b" * 30, "x")]
    out = data.tokenize_sft(TOK, convs, 12, truncate="skip", name="mysft")
    assert [TOK.decode(ids) for ids, _ in out] == ["abxyz", "cduv"]
    assert "mysft: skipped 2 records: 2 x too long" in capsys.readouterr().out


def test_truncate_raise_names_record():
    """"raise" raises DataError naming the record (name[i]) and the lengths."""
    convs = [conv("ab", "xyz"), conv("a" * 20, "xyz")]
    with pytest.raises(DataError, match=r"mysft\[1\]: too long: 27 tokens > context 12"):
        data.tokenize_sft(TOK, convs, 12, truncate="raise", name="mysft")


def test_truncate_left_keeps_response_and_eos():
    """"left" keeps the last block_size tokens: the end of the prompt, the whole response and its EOS."""
    (ids, mask), = data.tokenize_sft(TOK, [conv("abcdefghij", "xyz")], 8, truncate="left")
    assert ids == [ord("i"), ord("j"), TOK.eos_id, TOK.assistant_id, ord("x"), ord("y"), ord("z"), TOK.eos_id]
    assert mask == [0, 0, 0, 0, 1, 1, 1, 1]


def test_truncate_left_skips_response_that_alone_does_not_fit(capsys):
    """A response that cannot fit with at least one context token is skipped even under "left"."""
    # response "xyzuvw" + EOS = 7 trained tokens: fits in 8 (with <assistant>), not in 7
    assert len(data.tokenize_sft(TOK, [conv("abcdefghij", "xyzuvw")], 8, truncate="left")) == 1
    with pytest.raises(DataError, match=re.escape("sft: no usable records (1 read, 1 skipped: 1 x too long)")):
        data.tokenize_sft(TOK, [conv("abcdefghij", "xyzuvw")], 7, truncate="left")  # nothing left: an error
    assert "skipped 1 records: 1 x too long" in capsys.readouterr().out


def test_fit_directly():
    """fit() applies the policy to one (ids, mask) pair and counts skips in the given Skips."""
    ids, mask = list(range(10)), [0] * 6 + [1] * 4
    skips = data.Skips("skip")
    assert data.fit(ids, mask, 10, "skip", "x[0]", skips) == (ids, mask)
    assert data.fit(ids, mask, 5, "left", "x[0]", skips) == (ids[-5:], mask[-5:])
    assert data.fit(ids, mask, 4, "left", "x[0]", skips) is None
    assert data.fit(ids, mask, 9, "skip", "x[0]", skips) is None
    assert skips.counts["too long"] == 2
    with pytest.raises(DataError, match=r"x\[3\]: too long: 10 tokens > context 9"):
        data.fit(ids, mask, 9, "raise", "x[3]", skips)


# ------------------------------------------------------------------------------ in-memory records

def test_normalise_uses_same_parsers():
    """normalise() parses in-memory records exactly as load() would."""
    assert data.normalise([{"prompt": "p", "response": "r"}], "sft") == [{"messages": [msg(U, "p"), msg(A, "r")]}]
    assert data.normalise([{"prompt": "p", "chosen": "a", "rejected": "b"}], "preference") == \
        [{"prompt": [msg(U, "p")], "chosen": "a", "rejected": "b"}]
    assert data.normalise([{"prompt": "p", "completion": "c", "label": 0}], "unpaired") == \
        [{"prompt": [msg(U, "p")], "completion": "c", "label": False}]
    assert data.normalise([{"question": "q", "answer": "#### 7"}], "problem") == \
        [{"prompt": [msg(U, "q")], "answer": "7"}]


def test_normalise_bad_record_names_index():
    """A bad in-memory record raises DataError naming name[i]."""
    recs = [{"prompt": "p", "response": "r"}, {"prompt": "p", "response": "r"}, {"prompt": "p"}]
    with pytest.raises(DataError, match=r"^task\[2\]: missing key 'response'"):
        data.normalise(recs, "sft", name="task")
    with pytest.raises(DataError, match=r"^records\[0\]: 'label'"):
        data.normalise([{"prompt": "p", "completion": "c", "label": "yes"}], "unpaired")
