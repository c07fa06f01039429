"""nanoalign/evals.py: distinct-n, length spread, win rate, entropy and demonstration NLL on hand cases, the
release gate on the worked example and a passing case."""
import json
import math
import os

import pytest
import torch

from nanoalign import evals, task
from nanoalign.core import entropy_from_logits
from nanoalign.model import GPT, GPTConfig
from nanoalign.tokenizer import byte_tokenizer
from nanoalign.utils import load_checkpoint


def test_distinct_n_hand_cases():
    # token ids: [1 2 3], [1 2 1 2] -> unigrams 1,2,3,1,2,1,2: 3 unique of 7; bigrams 12,23,12,21,12: 3 of 5
    seqs = [[1, 2, 3], [1, 2, 1, 2]]
    assert evals.distinct_n(seqs, 1) == pytest.approx(3 / 7)
    assert evals.distinct_n(seqs, 2) == pytest.approx(3 / 5)
    assert evals.distinct_n([torch.tensor(s) for s in seqs], 2) == pytest.approx(3 / 5)  # tensors count by value
    # pooled over samples, not averaged per sample: two identical samples halve it
    assert evals.distinct_n([[4, 5], [4, 5]], 1) == pytest.approx(2 / 4)
    assert evals.distinct_n([[7], [8, 9]], 2) == pytest.approx(1.0)  # [7] has no bigram
    assert evals.distinct_n([[7]], 2) == 0.0
    # texts count whitespace words: "a b a" -> 2 unique of 3; bigrams "a b", "b a", "a b" -> 2 of 3
    assert evals.distinct_n(["a b a", "a b"], 1) == pytest.approx(2 / 5)
    assert evals.distinct_n(["a b a", "a b"], 2) == pytest.approx(2 / 3)


def test_length_stats_and_win_rate_hand_cases():
    mean, std = evals.length_stats([2, 4, 4, 4, 5, 5, 7, 9])
    assert (mean, std) == (pytest.approx(5.0), pytest.approx(2.0))  # the textbook example: population std 2
    assert evals.length_stats([3, 3, 3]) == (3.0, 0.0)
    # a beats b twice, ties once, loses once: (2 + 0.5) / 4
    assert evals.win_rate([1.0, 0.5, 0.2, 0.0], [0.0, 0.4, 0.2, 0.3]) == pytest.approx(0.625)
    assert evals.win_rate([0.3] * 5, [0.3] * 5) == 0.5
    with pytest.raises(AssertionError):
        evals.win_rate([1.0], [1.0, 0.0])


def test_sample_metrics():
    m = evals.sample_metrics([[1, 2, 3], [1, 2, 1, 2]], gold=[1.0, 0.5], passed=[1, 0], start_gold=[0.5, 0.5],
                             kl=torch.tensor([0.2, 0.4]), entropy=1.25)
    assert m == {"eval/length": 3.5, "eval/length_std": 0.5, "eval/distinct_1": pytest.approx(3 / 7),
                 "eval/distinct_2": pytest.approx(3 / 5), "eval/gold": 0.75, "eval/pass": 0.5,
                 "eval/win_rate": 0.75, "eval/kl": pytest.approx(0.3), "eval/entropy": 1.25}
    # texts with their token lengths given; only what was given is reported
    m = evals.sample_metrics(["x y", "x"], lengths=[10, 20], prefix="")
    assert m == {"length": 15.0, "length_std": 5.0, "distinct_1": 2 / 3, "distinct_2": 1.0}


def test_release_gate_worked_example_and_passing_case():
    ship, reasons = evals.release_gate(proxy_delta=0.31, gold_delta=-0.04, length_delta=48, max_length_delta=20)
    assert ship is False and len(reasons) == 2
    assert reasons[0].startswith("gold fell by 0.040 while the proxy rose by 0.310")
    assert reasons[1].startswith("length grew by 48.0 tokens, more than the limit of 20")
    assert evals.release_gate(0.31, 0.12, 5, max_length_delta=20) == (True, [])
    # each condition alone: gold up but the length drifted (either way); length fine but gold flat
    assert evals.release_gate(0.31, 0.12, -25) == (False, [
        "length shrank by 25.0 tokens, more than the limit of 20: the gain may be length, not quality"])
    ship, reasons = evals.release_gate(0.31, 0.0, 3)
    assert ship is False and reasons == ["gold did not change while the proxy rose by 0.310: the proxy's gain is "
                                         "not real (over-optimisation)"]
    assert evals.release_gate(0.31, 0.04, 3, min_gold_delta=0.05)[0] is False


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=64, n_layer=1, n_head=2, n_embd=16)).eval()


def test_mean_entropy_counts_response_tokens_only():
    model, tok = tiny_gpt(), byte_tokenizer()
    seqs = []
    for prompt, resp in (("1+2", "1+2=3;#3"), ("4+5+6", "#5"), ("7", "7=7;7=7;#7")):
        p, r = tok.render_prompt([{"role": "user", "content": prompt}]), tok.encode(resp) + [tok.eos_id]
        seqs.append((p + r, [0] * len(p) + [1] * len(r)))
    with torch.no_grad():  # one sequence at a time, no padding: the entropy of the distribution of each response token
        ents = [entropy_from_logits(model(torch.tensor([ids]))[0, :-1], 2.0)[torch.tensor(m[1:]).bool()]
                for ids, m in seqs]
    want = torch.cat(ents).mean().item()
    assert evals.mean_entropy(model, seqs, tok.pad_id, temperature=2.0, batch_size=2) == pytest.approx(want, abs=1e-5)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # uniform next-token distribution: entropy log V everywhere
    assert evals.mean_entropy(model, seqs, tok.pad_id) == pytest.approx(math.log(261), abs=1e-5)


def test_demonstration_nll_is_sfts_val_loss(sft_ckpt):
    """The alignment tax's measure on SFT's own held-out demonstrations is SFT's val_loss."""
    model, tok, _ = load_checkpoint(sft_ckpt)
    val_loss = json.load(open(os.path.join(os.path.dirname(sft_ckpt), "summary.json")))["val_loss"]
    records = task.sft_records(512, 1337, split="val")  # train_sft.py's val set (seed 1337)
    assert evals.demonstration_nll(model, tok, records) == pytest.approx(val_loss, abs=1e-5)
    model.train()
    with torch.no_grad():
        model.lm_head.weight.zero_()
    assert evals.demonstration_nll(model, tok, records[:8]) == pytest.approx(math.log(261), abs=1e-5)
    assert model.training  # the mode it was in is restored
