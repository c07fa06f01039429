"""Tokenizers and the chat template: the byte tokenizer, render/render_prompt masks, and GPT-2 BPE parity
with an in-test copy of OpenAI's original encoder.py algorithm."""
import base64
import json
import os

import pytest

from nanoalign.tokenizer import byte_tokenizer, get_tokenizer, gpt2_tokenizer

REAL_GPT2_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "gpt2")

UNICODE_TEXTS = [
    "",
    "hello world",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n\n\nCRLF",
    "naïve café, Straße, Ελληνικά, русский, 日本語, 한국어, עברית",
    "emoji 🎉🚀 👍🏽 👨‍👩‍👧 flags 🇫🇷",
    "math ∑∫√∞ ≠ ≤ and symbols ©®™ \u00a0nbsp \u200bzero-width",
    "<|end|> <|user|> <|endoftext|> typed as text",
]


@pytest.fixture(scope="module", autouse=True)
def private_tiktoken_cache(tmp_path_factory):
    """tiktoken copies files it reads into a cache dir (default /tmp/data-gym-cache): keep ours private."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path_factory.mktemp("tiktoken_cache")))
        yield


# ------------------------------------------------------------------ byte tokenizer

@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_byte_tokenizer_round_trip(tok, text):
    """Any unicode text encodes to its UTF-8 bytes and decodes back exactly."""
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_byte_tokenizer_vocab_and_specials(tok):
    """261 ids: 256 bytes + 5 distinct specials above them; pad is not eos."""
    assert tok.n_vocab == 261
    specials = [tok.system_id, tok.user_id, tok.assistant_id, tok.eos_id, tok.pad_id]
    assert len(set(specials)) == 5
    assert set(specials) == set(range(256, 261))
    assert tok.pad_id != tok.eos_id
    assert tok.role_id == {"system": tok.system_id, "user": tok.user_id, "assistant": tok.assistant_id}
    assert tok.spec == {"kind": "byte"}


def test_byte_tokenizer_typed_special_text_is_ordinary_bytes(tok):
    """'<|end|>' typed in content is plain bytes, never the eos id."""
    ids = tok.encode("say <|end|> now")
    assert ids == list(b"say <|end|> now")
    assert tok.eos_id not in ids
    assert all(i < 256 for i in tok.encode("<|system|><|user|><|assistant|><|end|><|pad|>"))


def test_decode_skips_special_ids_unless_asked(tok):
    """decode drops the chat specials by default and keeps their text with skip_special=False."""
    ids = [tok.user_id] + tok.encode("hi") + [tok.eos_id, tok.pad_id]
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special=False) == "<|user|>hi<|end|><|pad|>"


# ------------------------------------------------------------------ chat template

def test_decode_drops_ids_past_the_vocabulary(tok):
    """A model with more embedding rows than the tokenizer has ids (padded vocab) may sample one: it decodes
    to nothing instead of raising inside an evaluation."""
    ids = tok.encode("ab")
    assert tok.decode(ids + [tok.n_vocab, tok.n_vocab + 40] + tok.encode("c")) == "abc"
    assert tok.decode([tok.n_vocab], skip_special=False) == ""


def test_render_three_messages_hand_built(tok):
    """render gives the exact ids and mask of a system/user/assistant conversation."""
    messages = [{"role": "system", "content": "Be"}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Yo!"}]
    S, U, A, E = tok.system_id, tok.user_id, tok.assistant_id, tok.eos_id
    expected_ids = [S, 66, 101, E, U, 72, 105, E, A, 89, 111, 33, E]
    expected_mask = [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    ids, mask = tok.render(messages)
    assert ids == expected_ids
    assert mask == expected_mask


def test_render_prompt_ends_with_assistant(tok):
    """render_prompt is the rendered conversation followed by <|assistant|>."""
    messages = [{"role": "user", "content": "2+2?"}]
    prompt = tok.render_prompt(messages)
    assert prompt[-1] == tok.assistant_id
    assert prompt == [tok.user_id] + list(b"2+2?") + [tok.eos_id, tok.assistant_id]


def test_render_multi_turn_masks_each_assistant_turn(tok):
    """Every assistant turn (content + closing eos) is masked 1, everything else 0, including user eos."""
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "a1 <|end|>"}, {"role": "user", "content": "q2"},
                {"role": "assistant", "content": ""}, {"role": "user", "content": "q3"},
                {"role": "assistant", "content": "ünïcode"}]
    ids, mask = tok.render(messages)
    assert len(ids) == len(mask)
    assert set(mask) == {0, 1}
    runs, start = [], None  # maximal runs of mask 1
    for i, m in enumerate(mask + [0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    assistant_contents = [m["content"] for m in messages if m["role"] == "assistant"]
    assert len(runs) == len(assistant_contents)
    for (s, e), content in zip(runs, assistant_contents):
        assert ids[s - 1] == tok.assistant_id and mask[s - 1] == 0
        assert ids[e - 1] == tok.eos_id
        assert ids[s:e - 1] == tok.encode(content)
    # eos ids: one per turn, trained only on assistant turns
    eos_positions = [i for i, t in enumerate(ids) if t == tok.eos_id]
    assert len(eos_positions) == len(messages)
    assert [mask[i] for i in eos_positions] == [1 if m["role"] == "assistant" else 0 for m in messages]
    assert all(mask[i] == 0 for i, t in enumerate(ids) if t in (tok.system_id, tok.user_id, tok.assistant_id))


def test_render_rejects_unknown_role(tok):
    """A role outside system/user/assistant is a ValueError."""
    with pytest.raises(ValueError, match="tool"):
        tok.render([{"role": "tool", "content": "x"}])


# ------------------------------------------------------------------ OpenAI's GPT-2 encoder.py, verbatim in spirit

try:  # OpenAI's encoder.py needs `regex` (\p{L}); tiktoken depends on it, so it is normally present
    import regex
except ImportError:  # pragma: no cover
    regex = None

ORIGINAL_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def get_pairs(word):
    pairs = set()
    prev_char = word[0]
    for char in word[1:]:
        pairs.add((prev_char, char))
        prev_char = char
    return pairs


class ReferenceEncoder:
    """OpenAI's gpt-2/src/encoder.py Encoder (encode only), reading encoder.json + vocab.bpe."""

    def __init__(self, folder):
        with open(os.path.join(folder, "encoder.json")) as f:
            self.encoder = json.load(f)
        with open(os.path.join(folder, "vocab.bpe"), encoding="utf-8") as f:
            bpe_data = f.read()
        bpe_merges = [tuple(merge_str.split()) for merge_str in bpe_data.split("\n")[1:-1]]
        self.byte_encoder = bytes_to_unicode()
        self.bpe_ranks = dict(zip(bpe_merges, range(len(bpe_merges))))
        self.cache = {}
        self.pat = regex.compile(ORIGINAL_GPT2_PATTERN)

    def bpe(self, token):
        if token in self.cache:
            return self.cache[token]
        word = tuple(token)
        pairs = get_pairs(word)
        if not pairs:
            return token
        while True:
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                    new_word.extend(word[i:j])
                    i = j
                except ValueError:
                    new_word.extend(word[i:])
                    break
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = get_pairs(word)
        word = " ".join(word)
        self.cache[token] = word
        return word

    def encode(self, text):
        bpe_tokens = []
        for token in regex.findall(self.pat, text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            bpe_tokens.extend(self.encoder[bpe_token] for bpe_token in self.bpe(token).split(" "))
        return bpe_tokens


# ------------------------------------------------------------------ a tiny GPT-2 style vocabulary

TRAIN_TEXT = """The quick brown fox jumps over the lazy dog. The dog didn't mind; it's the fox's habit.
They're here, we've seen them, I'm sure they'll stay and he'd agree.
In 2024 there were 1234 foxes and 5678 dogs in the the the theatre.
Then the other three thought: there is nothing in the north, only the thin thread of the river.
    indented line with    several   spaces
"""

PARITY_TEXTS = UNICODE_TEXTS + [
    TRAIN_TEXT,
    "Hello world! The the THE tHe",
    "it's IT'S they're we've I'm you'll he'd don't can't won't shouldn't 's 't",
    "digits 0 12 345 6789 3.14159 1,000,000 2024-01-01 and x2y3",
    "the\n\nthe\n \nthe  \n   the\t\tthe",
    "   ",
    "\n",
    "end with space ",
    "thethethethe inininin hehehe",
    "?!... ---- ''' \"quoted\" (parens) [brackets] {braces} <tags>",
]


def train_merges(text, n_merges):
    """A few rounds of plain BPE on the pre-tokenized text; never makes a token twice (tiktoken needs
    each merge to produce a new token)."""
    byte_encoder = bytes_to_unicode()
    counts = {}
    for piece in regex.findall(ORIGINAL_GPT2_PATTERN, text):
        word = tuple(byte_encoder[b] for b in piece.encode("utf-8"))
        counts[word] = counts.get(word, 0) + 1
    vocab = set(byte_encoder.values())
    merges = []
    while len(merges) < n_merges:
        pair_counts = {}
        for word, c in counts.items():
            for pair in zip(word, word[1:]):
                pair_counts[pair] = pair_counts.get(pair, 0) + c
        candidates = sorted((-c, pair) for pair, c in pair_counts.items() if "".join(pair) not in vocab)
        if not candidates:
            break
        first, second = candidates[0][1]
        merges.append((first, second))
        vocab.add(first + second)
        new_counts = {}
        for word, c in counts.items():
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    out.append(first + second)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_counts[tuple(out)] = new_counts.get(tuple(out), 0) + c
        counts = new_counts
    return merges


def write_tiny_gpt2_vocab(folder, merges):
    """encoder.json (256 byte tokens in bytes_to_unicode order, then one id per merge, then <|endoftext|>),
    vocab.bpe ('#version: 0.2' + one merge per line) and the same ranks as gpt2.tiktoken."""
    folder.mkdir(parents=True, exist_ok=True)
    byte_encoder = bytes_to_unicode()
    encoder = {ch: i for i, ch in enumerate(byte_encoder.values())}
    for first, second in merges:
        encoder[first + second] = len(encoder)
    encoder["<|endoftext|>"] = len(encoder)
    (folder / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    (folder / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    byte_decoder = {ch: b for b, ch in byte_encoder.items()}
    lines = [base64.b64encode(bytes(byte_decoder[ch] for ch in token)).decode() + f" {rank}\n"
             for token, rank in encoder.items() if token != "<|endoftext|>"]
    (folder / "gpt2.tiktoken").write_text("".join(lines))
    return encoder


@pytest.fixture(scope="module")
def tiny_vocab(tmp_path_factory):
    pytest.importorskip("regex")
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    merges = train_merges(TRAIN_TEXT, 60)
    encoder = write_tiny_gpt2_vocab(folder, merges)
    return folder, merges, encoder


def test_tiny_vocab_is_well_formed(tiny_vocab):
    """The fixture itself: GPT-2's byte order for ids 0..255, 60 distinct merges incl. 'Ġth e', eot last."""
    folder, merges, encoder = tiny_vocab
    assert len(merges) == 60 and len({a + b for a, b in merges}) == 60
    assert merges[:3] == [("t", "h"), ("Ġ", "th"), ("Ġth", "e")]
    assert encoder["!"] == 0 and encoder["Ġ"] == 220 and encoder["Ċ"] == 198  # as in the real GPT-2
    assert encoder["<|endoftext|>"] == max(encoder.values()) == 256 + 60


@pytest.mark.parametrize("source", ["dir", "encoder.json", "tiktoken"])
def test_gpt2_tokenizer_matches_reference_bpe(tiny_vocab, source):
    """gpt2_tokenizer from a folder, an encoder.json path or a .tiktoken file equals encoder.py's ids."""
    folder, _, _ = tiny_vocab
    path = {"dir": str(folder), "encoder.json": str(folder / "encoder.json"),
            "tiktoken": str(folder / "gpt2.tiktoken")}[source]
    tok = gpt2_tokenizer(path)
    ref = ReferenceEncoder(str(folder))
    used_merges = False
    for text in PARITY_TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        assert tok.decode(ids) == text
        used_merges |= any(256 <= i < 256 + 60 for i in ids)
    assert used_merges  # the merges, not just raw bytes, are exercised
    assert tok.spec == {"kind": "gpt2", "path": path}


def test_gpt2_tokenizer_tiny_vocab_specials(tiny_vocab):
    """With a GPT-2 style vocab the chat specials sit at 50257.. and typed specials stay ordinary text."""
    folder, _, _ = tiny_vocab
    tok = gpt2_tokenizer(str(folder))
    assert [tok.system_id, tok.user_id, tok.assistant_id, tok.eos_id, tok.pad_id] == list(range(50257, 50262))
    assert tok.n_vocab == 50262
    assert tok.enc.encode_single_token("<|endoftext|>") == 50256
    ids = tok.encode("<|end|><|endoftext|>")
    assert not set(ids) & {50256, tok.eos_id}
    assert ids == ReferenceEncoder(str(folder)).encode("<|end|><|endoftext|>")


def test_gpt2_tokenizer_rereads_changed_files(tmp_path):
    """Rewriting encoder.json + vocab.bpe at the same path gives the new vocabulary, not a stale cached one."""
    pytest.importorskip("regex")
    folder = tmp_path / "vocab"
    write_tiny_gpt2_vocab(folder, [("Ġ", "t"), ("h", "e")])
    assert gpt2_tokenizer(str(folder)).encode(" the") == [256, 257]
    write_tiny_gpt2_vocab(folder, [("h", "e"), ("Ġ", "t"), ("Ġt", "he")])
    tok = gpt2_tokenizer(str(folder))
    assert tok.encode(" the") == [258] == ReferenceEncoder(str(folder)).encode(" the")


# ------------------------------------------------------------------ the real GPT-2 files, when present

PARAGRAPHS = [
    "Hello world",
    "IT'S LOUD, DON'T SHOUT! They'LL say it's 'quoted' and we'VE heard",
    "The quick brown fox jumps over the lazy dog. It's 3:45pm and we've got 1,234 things to do!\n\n"
    "    def f(x):\n        return x ** 2  # a comment\n",
    "GPT-2 is a large transformer-based language model with 1.5 billion parameters, trained on a dataset "
    "of 8 million web pages. They're predicting the next word, given all of the previous words.",
    "Unicode: naïve café — “quotes” ‘single’ … 日本語のテキスト 🎉🚀 Ελληνικά\r\n\ttab\u00a0nbsp   end  ",
]


@pytest.fixture(scope="module")
def real_gpt2():
    pytest.importorskip("regex")
    if not all(os.path.exists(os.path.join(REAL_GPT2_DIR, f)) for f in ("encoder.json", "vocab.bpe", "gpt2.tiktoken")):
        pytest.skip(f"no GPT-2 files at {REAL_GPT2_DIR}")
    folder = os.path.abspath(REAL_GPT2_DIR)
    return (gpt2_tokenizer(os.path.join(folder, "gpt2.tiktoken")), gpt2_tokenizer(folder),
            ReferenceEncoder(folder))


def test_real_gpt2_files_agree(real_gpt2):
    """The real gpt2.tiktoken, encoder.json+vocab.bpe and encoder.py give identical ids."""
    from_tiktoken, from_json, reference = real_gpt2
    for text in PARAGRAPHS:
        ids = from_tiktoken.encode(text)
        assert ids == from_json.encode(text) == reference.encode(text)
        assert from_tiktoken.decode(ids) == text


def test_real_gpt2_known_ids_and_specials(real_gpt2):
    """Known GPT-2 ids, <|endoftext|> = 50256, chat specials 50257..50261."""
    for tok in real_gpt2[:2]:
        assert tok.encode("Hello world") == [15496, 995]
        assert tok.encode(" the") == [262]
        assert tok.enc.encode_single_token("<|endoftext|>") == 50256
        assert [tok.system_id, tok.user_id, tok.assistant_id, tok.eos_id, tok.pad_id] == list(range(50257, 50262))
        assert tok.n_vocab == 50262


# ------------------------------------------------------------------ get_tokenizer

def test_get_tokenizer_specs(tiny_vocab):
    """'byte', {'kind': 'byte'} and 'gpt2:<path>' build tokenizers; an unknown kind is a ValueError."""
    for spec in ("byte", {"kind": "byte"}):
        tok = get_tokenizer(spec)
        assert tok.n_vocab == 261 and tok.encode("hé") == [104, 195, 169]
    folder, _, _ = tiny_vocab
    tok = get_tokenizer(f"gpt2:{folder}")
    assert tok.spec == {"kind": "gpt2", "path": str(folder)} and tok.eos_id == 50260
    assert get_tokenizer(tok.spec).encode(TRAIN_TEXT) == tok.encode(TRAIN_TEXT)  # rebuilt from its stored spec
    for bad in ("sentencepiece", {"kind": "bpe"}):
        with pytest.raises(ValueError):
            get_tokenizer(bad)
