"""
Data: loaders for the formats people already have, normalised to a few plain shapes, and tokenisation.

Files are JSON (one array of records) or JSONL (one record per line). Formats:

  sft         {"prompt": str, "response": str}, {"messages": [{"role", "content"}, ...]},
              Alpaca {"instruction", "input", "output"}, or ShareGPT {"conversations": [{"from", "value"}]}
                -> {"messages": [...]}, ending in a non-empty assistant turn
  preference  {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}
              or raw HH-RLHF {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}
              or ShareGPT {"conversations": [...], "chosen": {"from": "gpt", "value"}, "rejected": {...}}
                -> {"prompt": messages, "chosen": str, "rejected": str}
  unpaired    {"prompt": str | messages, "completion": str, "label": bool or 0/1}
                -> {"prompt": messages, "completion": str, "label": bool}
  problem     {"question": str, "answer": "... #### 42"} (GSM8K) or {"prompt": str, "answer": str}
                -> {"prompt": messages, "answer": "42"}

Errors. A malformed record (bad JSON, a missing key, an empty response, ...) raises `DataError` naming
the file and line (`on_error="raise"`, the default), or is skipped and counted (`on_error="skip"`);
`Skips` prints what was skipped and why. Nothing is dropped silently.

Truncation policy (`truncate`), for sequences longer than the context: "skip" (default: drop the
example, counted), "raise", or "left" (drop the oldest prompt tokens; the response and its EOS are
never cut, so a response that alone does not fit is always skipped/raised).
"""
import collections
import gzip
import json
import re


class DataError(ValueError):
    pass


class Skips:
    """Counts skipped records by reason, and says so."""

    def __init__(self, on_error="raise"):
        assert on_error in ("raise", "skip")
        self.on_error, self.counts = on_error, collections.Counter()

    def __call__(self, where, reason):
        if self.on_error == "raise":
            raise DataError(f"{where}: {reason}")
        self.counts[reason.split(":")[0]] += 1

    def report(self, name):
        if self.counts:
            print(f"{name}: skipped {sum(self.counts.values())} records: " +
                  ", ".join(f"{n} x {r}" for r, n in self.counts.most_common()))
        return sum(self.counts.values())


def read_records(path, skips):
    """Yield (where, record) from a JSON array or JSONL file (optionally .gz); `where` is "file:line"."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8-sig") as f:  # -sig: tolerate a byte-order mark
        text = f.read()
    if text.lstrip().startswith("["):  # one JSON array
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: bad JSON: {e.msg}") from None
        # record i starts at the line where its text starts; find it by decoding element by element
        dec, pos, line = json.JSONDecoder(), text.index("[") + 1, 1 + text[:text.index("[")].count("\n")
        for rec in records:
            while text[pos] in " \t\r\n,":
                line += text[pos] == "\n"
                pos += 1
            _, end = dec.raw_decode(text, pos)
            yield f"{path}:{line}", rec
            line += text.count("\n", pos, end)
            pos = end
        return
    for i, raw in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold raw U+2028 etc.
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as e:
            skips(f"{path}:{i}", f"bad JSON: {e.msg}")
            continue
        yield f"{path}:{i}", rec


# ------------------------------------------------------------------------------ record parsers

def _text(rec, key, where):
    if key not in rec:
        raise DataError(f"{where}: missing key {key!r} (has {sorted(rec)})")
    v = rec[key]
    if not isinstance(v, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(v).__name__}")
    return v


SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def _messages(v, where, key):
    """A string (one user turn), a message, or a list of messages: {role, content} with role
    system/user/assistant, or ShareGPT's {from: human/gpt/system, value}."""
    if isinstance(v, str):
        return [{"role": "user", "content": v}]
    out = []
    for m in v if isinstance(v, list) else [v]:
        if isinstance(m, dict) and "from" in m:
            m = {"role": SHAREGPT_ROLES.get(m["from"]), "content": m.get("value")}
        if not (isinstance(m, dict) and isinstance(m.get("content"), str)
                and m.get("role") in ("system", "user", "assistant")):
            raise DataError(f"{where}: {key!r} must be a string or a list of {{role, content}} messages "
                            "with role system/user/assistant")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _nonempty(text, where, what):
    if not text.strip():
        raise DataError(f"{where}: empty {what}")
    return text


HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh(dialogue, where):
    """"\\n\\nHuman: hi\\n\\nAssistant: hello" -> messages. The text must start with a Human turn."""
    parts = HH_TURN.split(dialogue)
    if parts[0].strip() or len(parts) < 3:
        raise DataError(f"{where}: not an HH-RLHF dialogue (expected '\\n\\nHuman: ...\\n\\nAssistant: ...')")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c} for r, c in zip(parts[1::2], parts[2::2])]


def parse_sft(rec, where):
    if "messages" in rec or "conversations" in rec:
        key = "messages" if "messages" in rec else "conversations"
        msgs = _messages(rec[key], where, key)
    elif "instruction" in rec:  # Alpaca: instruction, optional input, output
        prompt = _text(rec, "instruction", where)
        if rec.get("input"):
            prompt += "\n\n" + _text(rec, "input", where)
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": _text(rec, "output", where)}]
    else:
        msgs = [{"role": "user", "content": _text(rec, "prompt", where)},
                {"role": "assistant", "content": _text(rec, "response", where)}]
    if not msgs or msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: the conversation must end with an assistant turn")
    _nonempty(msgs[-1]["content"], where, "response")
    return {"messages": msgs}


def _split_conversation(msgs, where, key):
    if not msgs or msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: {key!r} must end with an assistant turn")
    return msgs[:-1], msgs[-1]["content"]


def parse_preference(rec, where):
    for k in ("chosen", "rejected"):
        if k not in rec:
            raise DataError(f"{where}: missing key {k!r} (has {sorted(rec)})")
    if "conversations" in rec and "prompt" not in rec:  # ShareGPT-style preference files
        rec = dict(rec, prompt=rec["conversations"])
    if "prompt" not in rec:  # raw HH-RLHF (strings) or two full conversations: split off the shared prompt
        conv = {k: parse_hh(rec[k], where) if isinstance(rec[k], str) else _messages(rec[k], where, k)
                for k in ("chosen", "rejected")}
        (pc, chosen), (pr, rejected) = (_split_conversation(conv[k], where, k) for k in ("chosen", "rejected"))
        if pc != pr:
            raise DataError(f"{where}: chosen and rejected do not share the prompt before the final reply")
        prompt = pc
    else:
        prompt = _messages(rec["prompt"], where, "prompt")
        chosen, rejected = (rec[k] if isinstance(rec[k], str) else _split_conversation(
            _messages(rec[k], where, k), where, k)[1] for k in ("chosen", "rejected"))
    if not prompt:
        raise DataError(f"{where}: empty prompt")
    return {"prompt": prompt, "chosen": _nonempty(chosen, where, "chosen response"),
            "rejected": _nonempty(rejected, where, "rejected response")}


def parse_unpaired(rec, where):
    label = rec.get("label")
    if label not in (True, False, 0, 1):
        raise DataError(f"{where}: 'label' must be true/false or 1/0, got {label!r}")
    if "prompt" not in rec:
        raise DataError(f"{where}: missing key 'prompt' (has {sorted(rec)})")
    return {"prompt": _messages(rec["prompt"], where, "prompt"),
            "completion": _nonempty(_text(rec, "completion", where), where, "completion"), "label": bool(label)}


def parse_problem(rec, where):
    question = _text(rec, "question" if "question" in rec else "prompt", where)
    answer = _text(rec, "answer", where)
    if "####" in answer:  # GSM8K: the worked solution's last line is "#### <final answer>"
        answer = answer.rsplit("####", 1)[1]
    answer = answer.strip().replace(",", "")
    return {"prompt": [{"role": "user", "content": _nonempty(question, where, "question")}],
            "answer": _nonempty(answer, where, "answer")}


PARSERS = {"sft": parse_sft, "preference": parse_preference, "unpaired": parse_unpaired, "problem": parse_problem}


def load(path, kind, on_error="raise"):
    """Read and normalise a file of `kind` records. Returns (records, skips)."""
    skips = Skips(on_error)
    out = []
    for where, rec in read_records(path, skips):
        try:
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            out.append(PARSERS[kind](rec, where))
        except DataError as e:
            skips(where, str(e).split(": ", 1)[1])
    skips.report(path)
    return out, skips


def normalise(records, kind, name="records"):
    """Normalise records made in memory (the built-in task) exactly as if they came from a file."""
    return [PARSERS[kind](r, f"{name}[{i}]") for i, r in enumerate(records)]


# ------------------------------------------------------------------------------ tokenisation

def fit(ids, mask, limit, truncate, where, skips):
    """Apply the truncation policy to one rendered example; None if it is skipped."""
    if truncate not in ("skip", "raise", "left"):
        raise ValueError(f"truncate must be 'skip', 'raise' or 'left', not {truncate!r}")
    if len(ids) <= limit:
        return ids, mask
    first_trained = mask.index(1) if 1 in mask else len(mask)
    if truncate == "left" and len(ids) - first_trained <= limit - 1:  # keep >= 1 prompt token
        return ids[-limit:], mask[-limit:]
    reason = f"too long: {len(ids)} tokens > context {limit}"
    if truncate == "raise":
        raise DataError(f"{where}: {reason}")
    skips.counts[reason.split(":")[0]] += 1
    return None


def tokenize_sft(tok, convs, block_size, truncate="skip", name="sft"):
    """Conversations -> list of (ids, mask) where mask marks the trained (assistant) tokens."""
    skips, out = Skips("skip"), []
    for i, c in enumerate(convs):
        ids, mask = tok.render(c["messages"])
        r = fit(ids, mask, block_size, truncate, f"{name}[{i}]", skips)
        if r is not None:
            out.append(r)
    skips.report(name)
    return out
