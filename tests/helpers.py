"""Helpers shared by test files: a tiny random GPT-2 directory in the published layout, with or without its own
tokenizer files."""
import itertools
import os

import torch

from nanoalign.heads import ScalarModel
from nanoalign.recipe import write_random_gpt2


def write_gpt2_dir(path, C=8, V=50257, P=128, n_layer=1, n_head=2, seed=0):
    """A tiny random GPT-2 in the published layout (config.json + model.safetensors, Conv1D weights [in, out])."""
    path.mkdir()
    write_random_gpt2(path, C, n_layer, n_head, P, V, std=0.1, seed=seed)


def write_gpt2_tokenizer_files(path, merges=(("Ġ", "t"), ("h", "e"), ("Ġt", "he")), n_merges=50000):
    """vocab.json + merges.txt, as a published GPT-2 directory has them, for a made-up BPE with GPT-2's id layout:
    the 256 byte tokens, `merges` first, then two-character filler merges up to `n_merges`, then <|endoftext|> at
    50256 (with the default 50,000). Every id a random 50,257-row GPT-2 can sample then decodes, with no download.
    -> the encoder (token string -> id)."""
    from test_tokenizer import bytes_to_unicode, write_tiny_gpt2_vocab
    alphabet, made = list(bytes_to_unicode().values()), {a + b for a, b in merges}
    fillers = ((a, b) for a, b in itertools.product(alphabet, repeat=2) if a + b not in made)  # each a new token
    merges = list(merges) + list(itertools.islice(fillers, n_merges - len(merges)))
    encoder = write_tiny_gpt2_vocab(path, merges)
    os.replace(path / "encoder.json", path / "vocab.json")  # the names a published GPT-2 directory uses
    os.replace(path / "vocab.bpe", path / "merges.txt")
    os.remove(path / "gpt2.tiktoken")
    return encoder


def random_head_rm(gpt, std=1.0, seed=0):
    """An untrained outcome RM on `gpt`'s body whose scores still differ between responses: the head drawn from
    N(0, std^2) after torch.manual_seed(seed) (the global generator, as the tests that use it always did)."""
    rm = ScalarModel(gpt)
    torch.manual_seed(seed)
    torch.nn.init.normal_(rm.head.weight, std=std)
    return rm
