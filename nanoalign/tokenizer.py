"""
Tokenizers (all of them `tiktoken.Encoding`s) and the chat template.

- `byte`: the offline default. The 256 bytes are the vocabulary (a tiktoken BPE with no merges), plus
  the special tokens below: 261 ids in all. It needs no file and no download, encodes any text, and
  keeps a tiny model's embedding and softmax small (a 50k GPT-2 vocabulary would dominate the compute
  of a 1M-parameter model on CPU).
- `gpt2`: GPT-2's BPE, ids equal to GPT-2's. tiktoken's own `gpt2` encoding (downloaded or cached), or
  built from local files: a `.tiktoken` rank file, or the original `encoder.json` + `vocab.bpe`.
  The chat special tokens are appended after GPT-2's 50257 ids.

Chat template. A conversation is a list of {"role", "content"} with roles system / user / assistant:

    <|user|> content <|end|> <|assistant|> content <|end|> ...

`<|end|>` closes every turn and is the EOS: generation stops when the model emits it, and it is part
of what the model is trained to produce. `<|pad|>` is a separate id that only fills out batches (masks
always come from lengths, so its value never matters, but it is never mistaken for an EOS).
Message text is encoded as ordinary text: a "<|end|>" typed by a user is just characters.
"""
import base64
import hashlib
import os

import tiktoken
import tiktoken.load  # a submodule `import tiktoken` does not load

SPECIALS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|pad|>"]
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class Tokenizer:
    def __init__(self, enc, spec):
        self.enc, self.spec = enc, spec  # spec: how to rebuild it (stored in checkpoints)
        ids = {s: enc.encode_single_token(s) for s in SPECIALS}
        self.system_id, self.user_id, self.assistant_id = ids["<|system|>"], ids["<|user|>"], ids["<|assistant|>"]
        self.eos_id, self.pad_id = ids["<|end|>"], ids["<|pad|>"]
        self.role_id = {"system": self.system_id, "user": self.user_id, "assistant": self.assistant_id}
        self.n_vocab = enc.n_vocab

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def decode(self, ids, skip_special=True):
        # a model whose embedding has more rows than the vocabulary (padded for speed, or rows added for new
        # tokens) can sample ids that no token has: they decode to nothing rather than crash an evaluation
        ids = [int(i) for i in ids if 0 <= int(i) < self.n_vocab]
        if skip_special:
            ids = [i for i in ids if i < self.system_id or i > self.pad_id]
        return self.enc.decode_bytes(ids).decode("utf-8", errors="replace")

    def render(self, messages):
        """A conversation -> (ids, mask): mask is 1 on the tokens the model is trained to produce,
        i.e. each assistant turn's content and its closing <|end|>; 0 on role tokens and other turns."""
        ids, mask = [], []
        for m in messages:
            if m["role"] not in self.role_id:
                raise ValueError(f"unknown role {m['role']!r}")
            body = self.encode(m["content"]) + [self.eos_id]
            train = 1 if m["role"] == "assistant" else 0
            ids += [self.role_id[m["role"]]] + body
            mask += [0] + [train] * len(body)
        return ids, mask

    def render_prompt(self, messages):
        """The ids that prompt the model for the next assistant turn: the conversation + <|assistant|>."""
        return self.render(messages)[0] + [self.assistant_id]


def byte_tokenizer():
    ranks = {bytes([i]): i for i in range(256)}
    specials = {s: 256 + i for i, s in enumerate(SPECIALS)}
    return Tokenizer(tiktoken.Encoding("nanoalign-bytes", pat_str=r"\S+|\s+", mergeable_ranks=ranks,
                                       special_tokens=specials), {"kind": "byte"})


def load_tiktoken_ranks(path):
    """A .tiktoken file: one `base64(token_bytes) rank` per line."""
    ranks = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def gpt2_tokenizer(path=None):
    """GPT-2's BPE. `path`: None for tiktoken's `gpt2` (downloads once, then cached), a `.tiktoken` file,
    or a directory / `encoder.json` path with `encoder.json` and `vocab.bpe` side by side (or, as a published
    GPT-2 directory has them, `vocab.json` and `merges.txt`: the same two files under other names)."""
    if path is None:
        ranks = tiktoken.get_encoding("gpt2")._mergeable_ranks
    elif path.endswith(".tiktoken"):
        ranks = load_tiktoken_ranks(path)
    else:
        folder = path[: -len("encoder.json")] if path.endswith("encoder.json") else path.rstrip("/") + "/"
        # tiktoken's converter reorders GPT-2's byte-to-unicode alphabet into raw bytes and checks that
        # the resulting ranks equal encoder.json's ids.
        # It reads through tiktoken's file cache, keyed by path only: pass the files' hashes so that a
        # stale cached copy of an earlier file at the same path is re-read, not used.
        bpe_file, json_file = folder + "vocab.bpe", folder + "encoder.json"
        if not os.path.isfile(json_file) and os.path.isfile(folder + "vocab.json"):  # a GPT-2 directory as published:
            bpe_file, json_file = folder + "merges.txt", folder + "vocab.json"  # the same two files, other names
        for f in (bpe_file, json_file):
            if not os.path.isfile(f):
                raise FileNotFoundError(f"GPT-2 tokenizer: no {f} (a folder needs encoder.json + vocab.bpe, "
                                        f"or vocab.json + merges.txt)")
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(bpe_file, json_file, vocab_bpe_hash=_sha256(bpe_file),
                                                              encoder_json_hash=_sha256(json_file))
    specials = {"<|endoftext|>": 50256}
    specials.update({s: 50257 + i for i, s in enumerate(SPECIALS)})
    enc = tiktoken.Encoding("nanoalign-gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    return Tokenizer(enc, {"kind": "gpt2", "path": path})


def get_tokenizer(spec):
    """Build a tokenizer from its spec: "byte", "gpt2", "gpt2:<path>", or a dict stored in a checkpoint."""
    if isinstance(spec, str):
        kind, _, path = spec.partition(":")
        spec = {"kind": kind, "path": path or None}
    if spec["kind"] == "byte":
        return byte_tokenizer()
    if spec["kind"] == "gpt2":
        return gpt2_tokenizer(spec.get("path"))
    raise ValueError(f"unknown tokenizer {spec!r} (use 'byte', 'gpt2' or 'gpt2:/path/to/files')")
