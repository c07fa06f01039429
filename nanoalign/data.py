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
  prompt      the prompt of any of the above, or a bare {"prompt": str | messages}
                -> {"prompt": messages}   (`read_prompts`: the distinct prompts of a file, for PPO)

Optional fields, kept when present: a preference record's "margin" (a finite number, or null for none:
that pair's Bradley-Terry margin in train_rm.py) and "p_chosen" (a probability in [0, 1], or null: the
soft label P(chosen > rejected), e.g. an AI judge's, that train_rm.py trains towards). Other extra keys
are ignored.

A problem's answer must be what the answer checker (`rewards.answer_reward`) can match: one number as
`rewards.final_number` reads it from a response, e.g. 42, -3, 0.5 or 1,234 (commas are dropped). An
answer such as "4 apples", "3/4" or a worked solution without "#### N" could never be matched, so it
is a malformed record, not a problem every response fails.

Each normalised record is a `Record`: a plain dict that also knows where it came from (`.where`,
"file:line" or "builtin-train[i]"), so that later messages (too long, ...) can name it.

Errors. A malformed record (bad JSON, a line that is not UTF-8, a missing key, an empty response, ...)
raises `DataError` naming the file and line (`on_error="raise"`, the default), or is skipped and
counted (`on_error="skip"`); `Skips` prints what was skipped and why. Nothing is dropped silently.
A file that cannot be read (missing, not gzip although named .gz, a broken JSON array) and a file with
no usable record left ("FILE: no usable records (N read, K skipped: reasons)") raise DataError whatever
on_error says. In a script, an uncaught DataError ends the run with its one-line message (the
excepthook that `utils.configure` installs), not a traceback.

File data is split into train and val by a hash of the prompt (`split_by_prompt`), as the built-in
task is (`task.split_of`), so records that share a prompt never straddle the split.

Truncation policy (`truncate`), for sequences longer than the context: "skip" (default: drop the
example, counted), "raise", or "left" (drop the oldest prompt tokens; the response and its EOS are
never cut, so a response that alone does not fit is always skipped/raised).
"""
import codecs
import collections
import gzip
import json
import math
import random
import re
import zlib

from nanoalign.rewards import final_number


class DataError(ValueError):
    pass


class Record(dict):
    """A normalised record: a plain dict (equal to one) that also knows where it came from."""

    def __init__(self, fields, where):
        super().__init__(fields)
        self.where = where  # "file:line" or "builtin-train[i]"


class Skips:
    """Counts skipped records by reason, and says so."""

    def __init__(self, on_error="raise"):
        assert on_error in ("raise", "skip")
        self.on_error, self.counts = on_error, collections.Counter()

    def __call__(self, where, reason):
        if self.on_error == "raise":
            raise DataError(f"{where}: {reason}")
        self.counts[reason.split(":")[0]] += 1

    def reasons(self):
        return ", ".join(f"{n} x {r}" for r, n in self.counts.most_common())

    def report(self, name):
        if self.counts:
            print(f"{name}: skipped {sum(self.counts.values())} records: " + self.reasons())
        return sum(self.counts.values())


def require(items, name, n_read, skips):
    """`items` if there are any; else DataError "name: no usable records (N read, K skipped: reasons)"."""
    if items:
        return items
    k = sum(skips.counts.values())
    raise DataError(f"{name}: no usable records ({n_read} read, {k} skipped" + (f": {skips.reasons()})" if k else ")"))


def read_records(path, skips):
    """Yield (where, record) from a JSON array or JSONL file (optionally .gz); `where` is "file:line".
    JSONL is decoded line by line, so a line that is not UTF-8 is one bad record (skippable)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if path.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:  # not gzip at all, truncated, or corrupt
            raise DataError(f"{path}: not a valid gzip file ({e})") from None
    if raw.startswith(codecs.BOM_UTF8):  # tolerate a byte-order mark
        raw = raw[len(codecs.BOM_UTF8):]
    if raw.lstrip().startswith(b"["):  # one JSON array
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:  # one document: it cannot be read around the bad byte
            line = raw.count(b"\n", 0, e.start) + 1
            raise DataError(f"{path}:{line}: not valid UTF-8") from None
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
    for i, line in enumerate(raw.split(b"\n"), 1):  # not splitlines(): JSON strings may hold raw U+2028 etc.
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError:
            skips(f"{path}:{i}", "not valid UTF-8")
            continue
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
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
    out = {"prompt": prompt, "chosen": _nonempty(chosen, where, "chosen response"),
           "rejected": _nonempty(rejected, where, "rejected response")}
    if rec.get("margin") is not None:  # optional: this pair's own Bradley-Terry margin (train_rm.py)
        m = rec["margin"]
        if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
            raise DataError(f"{where}: 'margin' must be a finite number: got {m!r}")
        out["margin"] = float(m)
    if rec.get("p_chosen") is not None:  # optional: a soft label, P(chosen > rejected), e.g. an AI judge's (train_rm.py)
        p = rec["p_chosen"]
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise DataError(f"{where}: 'p_chosen' must be a probability in [0, 1]: got {p!r}")
        out["p_chosen"] = float(p)
    return out


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
    prompt = [{"role": "user", "content": _nonempty(question, where, "question")}]
    answer = _nonempty(answer.strip().replace(",", ""), where, "answer")
    if final_number(answer) != answer:  # what the checker reads from a response must be able to equal it
        raise DataError(f"{where}: answer is not a number the answer checker can match: {answer!r} "
                        "(it must be one number such as 42, -3 or 0.5, as in GSM8K's last line '#### 42')")
    return {"prompt": prompt, "answer": answer}


def parse_prompt(rec, where):
    """The prompt of any record that holds one: a preference, unpaired or problem record's prompt, an SFT
    conversation's turns before its final reply, or a bare {"prompt": str | messages} (or {"messages": [...]}
    that does not end with an assistant turn) -> {"prompt": messages}."""
    if "chosen" in rec:
        return {"prompt": parse_preference(rec, where)["prompt"]}
    if "answer" in rec:
        return {"prompt": parse_problem(rec, where)["prompt"]}
    if "completion" in rec:
        return {"prompt": parse_unpaired(rec, where)["prompt"]}
    key = next((k for k in ("messages", "conversations") if k in rec), None)
    if key is not None:  # a conversation: all of it if it awaits the assistant's reply, else what precedes the reply
        msgs = _messages(rec[key], where, key)
        prompt = msgs if msgs and msgs[-1]["role"] != "assistant" else parse_sft(rec, where)["messages"][:-1]
    elif "response" in rec or "instruction" in rec:  # an SFT record: its prompt
        prompt = parse_sft(rec, where)["messages"][:-1]
    elif "prompt" in rec:
        prompt = _messages(rec["prompt"], where, "prompt")
    else:
        raise DataError(f"{where}: no prompt in it: expected a prompt, SFT, preference or problem record "
                        f"(has {sorted(rec)})")
    if not prompt:
        raise DataError(f"{where}: empty prompt")
    return {"prompt": prompt}


PARSERS = {"sft": parse_sft, "preference": parse_preference, "unpaired": parse_unpaired, "problem": parse_problem,
           "prompt": parse_prompt}


def load(path, kind, on_error="raise"):
    """Read and normalise a file of `kind` records. Returns (records, skips); each record is a `Record`
    whose .where is its "file:line". DataError if no record is usable."""
    skips = Skips(on_error)
    out = []
    for where, rec in read_records(path, skips):
        try:
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            out.append(Record(PARSERS[kind](rec, where), where))
        except DataError as e:
            skips(where, str(e).split(": ", 1)[1])
    skips.report(path)
    return require(out, path, len(out) + sum(skips.counts.values()), skips), skips


def normalise(records, kind, name="records"):
    """Normalise records made in memory (the built-in task) exactly as if they came from a file."""
    return [Record(PARSERS[kind](r, f"{name}[{i}]"), f"{name}[{i}]") for i, r in enumerate(records)]


def held_out(records, val_frac, seed, name="records"):
    """Which file records a split by prompt holds out: a list of bools, in the records' order. A prompt is held
    out when crc32(its JSON) / 2^32 < val_frac (about val_frac of the prompts; at least one, and never all),
    as the built-in task is split (task.split_of), so records that share a prompt are on the same side.
    The prompt of an SFT conversation is everything before its final reply. A file with a single prompt
    cannot be split by prompt: max(1, val_frac of) its records are held out, seeded (said so)."""
    keys = [json.dumps(r["prompt"] if "prompt" in r else r["messages"][:-1], sort_keys=True) for r in records]
    h = {k: zlib.crc32(k.encode()) / 2 ** 32 for k in keys}
    ranked = sorted(h, key=h.get)
    n_held = min(max(1, sum(v < val_frac for v in h.values())), len(ranked) - 1)
    if n_held < 1:  # one prompt: hold out max(1, val_frac of the records), as a split by record would
        print(f"{name}: every record has the same prompt, so the held-out records share it with training")
        order = list(range(len(records)))
        random.Random(seed).shuffle(order)
        held = set(order[:max(1, int(len(records) * val_frac))])
        return [i in held for i in range(len(records))]
    held = set(ranked[:n_held])
    return [k in held for k in keys]


def split_by_prompt(records, val_frac, seed, name="records"):
    """File records -> (train, val) by `held_out`, each side in a seeded shuffle."""
    held = held_out(records, val_frac, seed, name)
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    return [records[i] for i in order if not held[i]], [records[i] for i in order if held[i]]


def read_prompts(path, val_frac, seed, on_error="raise"):
    """The distinct prompts (chat-message lists) of any file that holds prompts: SFT, preference, unpaired or
    problem records, or bare {"prompt": str | messages} lines (`parse_prompt`), split by prompt as
    `held_out` does. -> (train prompts, held-out prompts), each in the file's order. DataError if the file has
    fewer than two distinct prompts (nothing would be left to train on, or to evaluate on)."""
    distinct = {}
    for r in load(path, "prompt", on_error)[0]:
        distinct.setdefault(json.dumps(r["prompt"], sort_keys=True), r)
    records = list(distinct.values())
    if len(records) < 2:
        raise DataError(f"{path}: {len(records)} distinct prompt: a split into train and held-out prompts needs two")
    held = held_out(records, val_frac, seed, path)
    return [r["prompt"] for r, h in zip(records, held) if not h], [r["prompt"] for r, h in zip(records, held) if h]


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


def fit_all(seqs, limit, truncate, where, skips):
    """fit() every sequence of one example (a pair: prompt + chosen, prompt + rejected) -> their fitted
    (ids, mask), or None if any is skipped, counted once: the counts are of examples, not sequences."""
    fitted = [fit(ids, mask, limit, truncate, where, Skips("skip")) for ids, mask in seqs]
    if any(f is None for f in fitted):
        skips.counts["too long"] += 1
        return None
    return fitted


def tokenize_sft(tok, convs, block_size, truncate="skip", name="sft"):
    """Conversations -> list of (ids, mask) where mask marks the trained (assistant) tokens. Messages
    name a record by its .where (file:line), or name[i] for a plain dict. DataError if none fits."""
    skips, out = Skips("skip"), []
    for i, c in enumerate(convs):
        ids, mask = tok.render(c["messages"])
        r = fit(ids, mask, block_size, truncate, getattr(c, "where", f"{name}[{i}]"), skips)
        if r is not None:
            out.append(r)
    skips.report(name)
    return require(out, name, len(convs), skips)  # nothing left to train on is an error, not an empty set
