"""The evaluation every stage shares (evals.policy_samples, evals.evaluate_policy) on hand cases and on a tiny
model, any file's prompts (data.read_prompts), and PPO / DPO evaluating on a data file end to end."""
import copy
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from nanoalign import data, evals, task
from nanoalign.core import token_logprobs
from nanoalign.model import GPT, GPTConfig
from nanoalign.rewards import implicit_rewards, response_tokens, rm_judge
from nanoalign.tokenizer import byte_tokenizer
from nanoalign.utils import load_checkpoint, save_checkpoint

from helpers import random_head_rm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def eos_prone(model, tok):
    """Make a GPT end its responses after a few tokens (an untrained one almost never samples the EOS): the
    final LayerNorm's bias points along dimension 0, and so does the EOS embedding (tied to the LM head), so
    the EOS logit is about 1.6 * (3 + a unit normal): between 10% and 90% per token."""
    with torch.no_grad():
        model.transformer.ln_f.bias.zero_()[0] = 3.0
        model.transformer.wte.weight[tok.eos_id].zero_()[0] = 1.6
    return model


def tiny_gpt(seed, tok):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=tok.n_vocab, block_size=64, n_layer=1, n_head=2, n_embd=16))


# ------------------------------------------------------------------------------ the shared function

def test_evaluate_policy_hand_case():
    """Three hand-made samples against three of the start: every metric against its hand value, the KL against
    a one-sequence, unpadded log-prob sum at the samples' temperature (2), unfinished samples ranked last."""
    tok = byte_tokenizer()
    pi, ref = tiny_gpt(0, tok), tiny_gpt(1, tok)
    prompts = ["1+2", "3+4+5", "6"]

    def samples(texts, ended, gold, judge):
        seqs = []
        for p, t, e in zip(prompts, texts, ended):
            ids, m = response_tokens(tok, [{"role": "user", "content": p}], t)
            seqs.append((ids, m) if e else (ids[:-1], m[:-1]))  # unfinished: no EOS was sampled
        return {"text": texts, "ended": ended, "length": [sum(m) for _, m in seqs], "seq": seqs, "gold": gold,
                "pass": [float(g == 1.0) for g in gold], "judge": judge, "temperature": 2.0}

    # responses: "ab"+EOS, "aa" (unfinished), "b"+EOS -> tokens a b E | a a | b E
    mine = samples(["ab", "aa", "b"], [True, False, True], [1.0, 0.0, 0.5], [0.3, None, -0.5])
    start = samples(["ba", "b", "a"], [True, True, False], [0.5, 0.0, 0.5], [0.2, 0.4, None])
    pi.train()
    m = evals.evaluate_policy(pi, tok, mine, start, reference=ref, demos=task.sft_records(3, 0, "val"))
    assert pi.training  # the mode it was in is restored
    want_kl = 0.0
    with torch.no_grad():
        for ids, mask in mine["seq"]:
            x, sel = torch.tensor([ids]), torch.tensor(mask[1:]).bool()
            lp = [token_logprobs(model(x)[0, :-1], x[0, 1:], 2.0)[sel].sum() for model in (pi, ref)]
            want_kl += (lp[0] - lp[1]).item() / 3
    assert m == {
        "eval/length": pytest.approx(7 / 3), "eval/length_std": pytest.approx(math.sqrt(2 / 9)),
        "eval/distinct_1": pytest.approx(3 / 7),  # a, b, E of 7 tokens
        "eval/distinct_2": pytest.approx(3 / 4),  # ab, bE, aa, bE
        "eval/gold": pytest.approx(0.5), "eval/pass": pytest.approx(1 / 3),
        "eval/win_rate": pytest.approx(2 / 3),  # 1 > 0.5, 0 = 0, 0.5 = 0.5
        "eval/eos": pytest.approx(2 / 3),
        "eval/judge": pytest.approx(-0.1),  # the finished ones: (0.3 - 0.5) / 2
        "eval/judge_win_rate": pytest.approx(2 / 3),  # 0.3 > 0.2; unfinished < 0.4; -0.5 > unfinished
        "eval/kl": pytest.approx(want_kl, abs=1e-5),
        "eval/entropy": pytest.approx(evals.mean_entropy(pi, mine["seq"], tok.pad_id, 2.0)),
        "eval/demo_nll": pytest.approx(evals.demonstration_nll(pi, tok, task.sft_records(3, 0, "val")))}
    # no start: no win rates; no reference, no demos: no KL, no alignment tax
    bare = evals.evaluate_policy(pi, tok, mine, prefix="")
    assert set(bare) == {"length", "length_std", "distinct_1", "distinct_2", "gold", "pass", "eos", "judge", "entropy"}


def test_policy_that_is_the_start_wins_half_at_kl_zero_and_draws_nothing_of_the_training():
    """The start policy's samples against its own, drawn again from a copy with the same seed: the same samples,
    so win rates 0.5 and KL 0 exactly; the global RNG is untouched; the draws and scores are task.evaluate's."""
    tok = byte_tokenizer()
    model = eos_prone(tiny_gpt(0, tok), tok)
    prompts = task.prompts(24, 0, "test")
    how = dict(gold_fn=lambda p, t: len(t) % 3 / 2, pass_fn=task.verify, max_new_tokens=8, batch_size=10,  # 3 batches
               judge=lambda msgs, texts: [len(t) for t in texts])
    state = torch.get_rng_state()
    mine = evals.policy_samples(model, tok, prompts, 3, **how)
    assert torch.equal(torch.get_rng_state(), state)  # its own generator: the global one draws nothing
    assert 0 < sum(mine["ended"]) < len(prompts) and len(set(mine["text"])) > 3  # finished and unfinished, varied
    start = evals.policy_samples(copy.deepcopy(model), tok, prompts, 3, **how)
    assert start["text"] == mine["text"] and start["seq"] == mine["seq"]
    m = evals.evaluate_policy(model, tok, mine, start, reference=copy.deepcopy(model))
    assert m["eval/win_rate"] == 0.5 and m["eval/judge_win_rate"] == 0.5 and m["eval/kl"] == 0.0
    assert torch.equal(torch.get_rng_state(), state)
    assert {"eval/length", "eval/length_std", "eval/distinct_1", "eval/distinct_2", "eval/gold", "eval/pass",
            "eval/eos", "eval/judge", "eval/entropy"} <= set(m)
    # the samples task.evaluate draws with that seed (PPO's and SFT's evaluations): its four numbers, exactly
    old = task.evaluate(model, tok, prompts, seed=3, max_new_tokens=8, batch_size=10)
    drawn = evals.policy_samples(model, tok, prompts, 3, gold_fn=task.gold, pass_fn=task.verify, max_new_tokens=8,
                                 batch_size=10)
    again = evals.evaluate_policy(model, tok, drawn)
    assert {k: again[f"eval/{k}"] for k in old} == old
    other = evals.policy_samples(model, tok, prompts, 8, **how)  # another seed, other samples
    assert other["text"] != mine["text"]


# ------------------------------------------------------------------------------ any file's prompts

def write_lines(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_read_prompts_from_every_kind_of_record(tmp_path):
    user = lambda text: [{"role": "user", "content": text}]
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q7"}]
    rows = [{"prompt": "q1"}, {"prompt": user("q2")}, {"prompt": "q3", "chosen": "a", "rejected": "b"},
            {"chosen": "\n\nHuman: q4\n\nAssistant: a", "rejected": "\n\nHuman: q4\n\nAssistant: b"},
            {"prompt": "q5", "response": "r"}, {"instruction": "q6", "input": "", "output": "o"},
            {"messages": chat}, {"messages": chat + [{"role": "assistant", "content": "a"}]},  # the same prompt
            {"question": "q8", "answer": "#### 8"}, {"prompt": "q9", "completion": "c", "label": 1},
            {"prompt": "q1"}]  # a repeat
    path = write_lines(tmp_path / "p.jsonl", rows)
    train, held = data.read_prompts(path, 0.3, 0)
    want = [user(f"q{i}") for i in range(1, 7)] + [chat] + [user("q8"), user("q9")]
    assert sorted(map(json.dumps, train + held)) == sorted(map(json.dumps, want))  # distinct, every kind
    held_flags = data.held_out([{"prompt": p} for p in want], 0.3, 0)
    assert held == [p for p, h in zip(want, held_flags) if h]
    assert train == [p for p, h in zip(want, held_flags) if not h]
    assert 1 <= len(held) < len(want)
    bad = write_lines(tmp_path / "bad.jsonl", [{"text": "x"}] + rows)
    with pytest.raises(data.DataError, match=re.escape(f"{bad}:1: no prompt in it")):
        data.read_prompts(bad, 0.3, 0)
    with pytest.raises(data.DataError, match="1 distinct prompt"):
        data.read_prompts(write_lines(tmp_path / "one.jsonl", [{"prompt": "q"}] * 3), 0.3, 0)


# ------------------------------------------------------------------------------ the stages on a data file

@pytest.fixture(scope="module")
def ckpts(sft_ckpt, tmp_path_factory):
    """An EOS-prone policy (samples that finish, so the judge scores some) and an outcome RM on its body."""
    root = tmp_path_factory.mktemp("stage_evals")
    gpt, tok, _ = load_checkpoint(sft_ckpt)
    save_checkpoint(str(root / "policy.pt"), eos_prone(gpt, tok), tok)
    rm = random_head_rm(copy.deepcopy(gpt))
    save_checkpoint(str(root / "rm.pt"), rm, tok, rm_kind="outcome")
    return str(root / "policy.pt"), str(root / "rm.pt")


def run(script, *args):
    r = subprocess.run([sys.executable, script, "--device=cpu", *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def sane(m, n_tokens):
    assert 0 <= m["eval/judge_win_rate"] <= 1 and math.isfinite(m["eval/judge"]) and math.isfinite(m["eval/kl"])
    assert 0 < m["eval/length"] <= n_tokens and m["eval/length_std"] >= 0 and 0 < m["eval/eos"] <= 1
    assert 0 < m["eval/distinct_1"] <= 1 and 0 < m["eval/distinct_2"] <= 1 and m["eval/entropy"] > 0
    assert not {"eval/gold", "eval/pass", "eval/win_rate", "eval/demo_nll"} & set(m)  # a file has no gold


def held_out_eval(policy_path, init_path, rm_path, prompts, seed, start_seed):
    """A stage's final evaluation on a file, recomputed from its checkpoint: its policy's samples (seed) against
    the start's (start_seed), judged by the RM, KL to the start."""
    (policy, tok, _), (init, _, _), (rm, _, _) = (load_checkpoint(p) for p in (policy_path, init_path, rm_path))
    how = dict(judge=rm_judge(rm.eval(), tok), max_new_tokens=10)
    return evals.evaluate_policy(policy, tok, evals.policy_samples(policy, tok, prompts, seed, **how),
                                 evals.policy_samples(init, tok, prompts, start_seed, **how), reference=init.eval())


def test_ppo_on_a_prompt_file(tmp_path, ckpts):
    """PPO on a file of prompts of every kind, judged by the RM: the held-out evaluation has the RM's score and
    win rate against the start, KL (0 at the start: the reference is the start), length, distinct-n and entropy,
    no gold; the final one is what the checkpoint's samples of the held-out prompts give."""
    policy, rm = ckpts
    path = write_lines(tmp_path / "prompts.jsonl", [{"prompt": f"{i}+{i % 7}"} for i in range(24)]
                       + [{"prompt": "5+6", "chosen": "a", "rejected": "b"}, {"question": "2+9", "answer": "#### 1"},
                          {"messages": [{"role": "user", "content": "9+1"}, {"role": "assistant", "content": "y"}]}])
    out = tmp_path / "ppo"
    stdout = run("train_ppo.py", f"--init_from={policy}", f"--reward_model={rm}", f"--data_path={path}",
                 "--val_frac=0.3", f"--out_dir={out}", "--batch_size=4", "--max_iters=2", "--ppo_epochs=1",
                 "--minibatches=1", "--eval_interval=2", "--n_eval=64", "--max_new_tokens=10", "--lr=1e-3")
    summary = json.load(open(out / "summary.json"))
    held = data.read_prompts(path, 0.3, 1337)[1]
    assert summary["n_eval_prompts"] == len(held) and f"and {len(held)} held-out prompts" in stdout
    start, final = summary["start"], summary["final"]
    sane(start, 10), sane(final, 10)
    assert start["eval/kl"] == 0.0 and final["eval/kl"] != 0.0  # the policy has moved
    assert final == pytest.approx(held_out_eval(str(out / "ckpt.pt"), policy, rm, held, 1337, 1338), abs=1e-6)
    rows = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert [r["gold"] for r in rows] == [None, None]  # no gold for a file
    assert rows[1]["eval/judge"] == pytest.approx(final["eval/judge"], abs=1e-6)


def test_dpo_on_a_preference_file(tmp_path, ckpts):
    """DPO on a preference file with --judge=<RM>: pairs held out by prompt, never trained on; on them the
    final implicit reward's accuracy and margin, and on their prompts the samples' RM score and win rate
    against the start's, KL, length, distinct-n and entropy, each what the checkpoint gives."""
    policy, rm = ckpts
    pairs = [{"prompt": f"{i}+{i % 5}", "chosen": f"{i % 10}", "rejected": "no"} for i in range(30)]
    path = write_lines(tmp_path / "pairs.jsonl", pairs)
    out = tmp_path / "dpo"
    stdout = run("train_dpo.py", f"--init_from={policy}", f"--judge={rm}", f"--data_path={path}", "--val_frac=0.25",
                 f"--out_dir={out}", "--batch_size=4", "--max_steps=2", "--eval_interval=2", "--log_interval=1",
                 "--n_eval=64", "--max_new_tokens=10", "--lr=3e-3", "--warmup_steps=1")
    records = data.load(path, "preference")[0]
    held = [r for r, h in zip(records, data.held_out(records, 0.25, 1337)) if h]
    assert f"dpo: {30 - len(held)} training pairs from {path} ({len(held)} held out for evaluation)" in stdout
    summary = json.load(open(out / "summary.json"))
    final = summary["final"]
    assert summary["n_eval_prompts"] == len(held)  # one prompt per pair here
    sane(final, 10)
    assert "eval/judge_win_rate" not in summary["start"] and math.isfinite(summary["start"]["eval/judge"])
    prompts = [r["prompt"] for r in held]
    want = held_out_eval(str(out / "ckpt.pt"), policy, rm, prompts, 1338, 1337)
    assert {k: v for k, v in final.items() if not k.startswith("pairs/")} == pytest.approx(want, abs=1e-6)
    pi, ref = load_checkpoint(str(out / "ckpt.pt"))[0], load_checkpoint(policy)[0]
    r_c, r_r = (implicit_rewards(pi, ref, byte_tokenizer(), prompts, [r[k] for r in held], 0.5)
                for k in ("chosen", "rejected"))
    ties = (r_c == r_r).float().mean().item()
    assert final["pairs/acc_labels"] == pytest.approx((r_c > r_r).float().mean().item() + 0.5 * ties)
    assert final["pairs/margin"] == pytest.approx((r_c - r_r).mean().item(), abs=1e-6) and final["pairs/margin"] != 0
    assert "pairs/acc_gold" not in final
