"""Reward models: losses, reading the reward at the last real token, normalisation, PRM step positions,
best-of-N, and tiny train_rm.py / best_of_n.py runs."""
import json
import os
import subprocess
import sys

import pytest
import torch

from nanoalign import task
from nanoalign.core import pad
from nanoalign.heads import ScalarModel
from nanoalign.losses import bradley_terry_loss, process_reward_loss
from nanoalign.model import GPT, GPTConfig
from nanoalign.rewards import (best_of_n, implicit_rewards, logratios, pair_accuracy, process_score, response_tokens,
                               step_tokens)
from nanoalign.sampling import generate
from nanoalign.tokenizer import byte_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bradley_terry_centering_hand_computed():
    """r_c = 2.0, r_r = 0.5, margin 0.5, centering 0.01: -log sigmoid(1.0) + 0.01 * 2.5^2 = 0.3133 + 0.0625."""
    loss = bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.5]), 0.5, center_coef=0.01)
    assert loss.item() == pytest.approx(0.313262 + 0.0625, abs=1e-5)
    # the centering term's gradient pushes the sum of the pair's rewards towards 0
    r = torch.tensor([3.0, 1.0], requires_grad=True)
    bradley_terry_loss(r[0], r[1], center_coef=1.0).backward()
    pure = torch.tensor([3.0, 1.0], requires_grad=True)
    bradley_terry_loss(pure[0], pure[1]).backward()
    assert torch.allclose(r.grad - pure.grad, torch.tensor([8.0, 8.0]))  # d/dr (r_c + r_r)^2 = 2 * 4


def test_process_reward_loss_hand_computed():
    """Logits [0, 2] with labels [1, 0] and a padded third step: mean(log 2, log(1 + e^2)) = 1.4129."""
    logits = torch.tensor([[0.0, 2.0, 9.0]])
    loss = process_reward_loss(logits, torch.tensor([[1, 0, 1]]), torch.tensor([[1.0, 1.0, 0.0]]))
    assert loss.item() == pytest.approx((0.693147 + 2.126928) / 2, abs=1e-5)


@pytest.fixture(scope="module", params=[0, 2], ids=["head", "top_blocks"])
def rm(request):
    """A reward model with a random (non-trivial) head: on the body directly, or with two new blocks."""
    torch.manual_seed(0)
    m = ScalarModel(GPT(GPTConfig(block_size=64, vocab_size=261, n_layer=2, n_head=2, n_embd=32)), request.param)
    torch.nn.init.normal_(m.head.weight, std=1.0)
    return m.eval()


def test_reward_is_read_at_the_last_real_token_under_any_padding(rm):
    """Rewards alone, right-padded, left-padded, with more padding: all equal, and equal to the
    per-token scalar at the EOS of the unpadded sequence."""
    tok = byte_tokenizer()
    seqs = [response_tokens(tok, [{"role": "user", "content": p}], r)[0]
            for p, r in [("1+2", "1+2=3;#3"), ("9+9+9", "9+9=18;18+9=27;#27"), ("5+0+1", "#6")]]
    alone = torch.stack([rm(torch.tensor([s]))[0, -1] for s in seqs])
    assert all(s[-1] == tok.eos_id for s in seqs)
    for left in (False, True):
        for T in (None, 40):
            ids, mask = pad(seqs, tok.pad_id, left=left, T=T)
            assert torch.allclose(rm.reward(ids, mask), alone, atol=1e-5)
    ids, mask = pad(seqs, tok.pad_id)
    assert not torch.allclose(rm(ids, mask)[:, -1], alone, atol=1e-3)  # the last column is padding


def test_input_logprobs_hand_computed_and_padding_free():
    """The new blocks' extra input: log p(x_t | x_<t) under the body's LM head, 0 at the first token; the
    same at each real token under left or right padding, and 0 at a token that follows padding."""
    from nanoalign.heads import input_logprobs
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(block_size=64, vocab_size=261, n_layer=1, n_head=2, n_embd=16)).eval()
    seqs = [[5, 9, 3, 7, 1], [4, 2, 8]]
    with torch.no_grad():
        want = []
        for s in seqs:
            lsm = torch.log_softmax(gpt(torch.tensor([s]))[0].float(), -1)
            want.append([0.0] + [lsm[t - 1, s[t]].item() for t in range(1, len(s))])
        for left in (False, True):
            ids, mask = pad(seqs, 260, left=left, T=7)
            lp = input_logprobs(gpt, gpt.body(ids, mask), ids, mask)
            for i, s in enumerate(seqs):
                real = mask[i].nonzero().squeeze(1)
                assert lp[i, real].tolist() == pytest.approx(want[i], abs=1e-5)
                assert lp[i][~mask[i].bool()].abs().sum().item() == 0.0
    assert abs(want[0][1]) > 1e-3


def test_checkpoint_keeps_the_new_blocks(rm, tmp_path):
    from nanoalign.utils import load_checkpoint, save_checkpoint
    path = str(tmp_path / "rm.pt")
    save_checkpoint(path, rm, byte_tokenizer(), rm_kind="outcome")
    loaded = load_checkpoint(path)[0].eval()
    ids = torch.randint(0, 256, (3, 10))
    assert len(loaded.top) == len(rm.top) and torch.equal(loaded(ids), rm(ids))


def test_normalisation_gives_mean_0_std_1(rm):
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (50, 12))
    mask = torch.ones_like(ids, dtype=torch.bool)
    raw = rm.reward(ids, mask)
    rm.set_normalisation(raw)
    normed = rm.reward(ids, mask)
    assert normed.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert normed.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(normed, (raw - raw.mean()) / raw.std(unbiased=False), atol=1e-5)
    rm.gain.fill_(1.0)
    rm.bias.fill_(0.0)


def test_prm_positions_line_up_with_steps_and_labels():
    """Each step's score is read at the step's last token (its result, just before ";"); one position
    per step label, and the same ids as encoding the whole text at once (byte tokenizer)."""
    tok = byte_tokenizer()
    prompt, response = "4+7+2+9", "4+7=2;2+2=4;4+9=3;#3"
    ids, positions = step_tokens(tok, [{"role": "user", "content": prompt}], response)
    labels = task.step_labels(prompt, response)
    assert len(positions) == len(labels) == 3 and labels == [False, True, True]
    assert all(ids[p + 1] == ord(";") for p in positions)
    text = tok.decode(ids)
    steps = response.split(";")[:3]
    for p, step in zip(positions, steps):  # the tokens up to and including each position spell the step
        assert tok.decode(ids[p + 1 - len(step):p + 1]) == step
    assert [chr(ids[p]) for p in positions] == ["2", "4", "3"]  # the results
    assert ids[-1] == tok.eos_id and text.endswith("#3")
    assert ids == response_tokens(tok, [{"role": "user", "content": prompt}], response)[0]


def test_process_score_min_and_prod():
    s = torch.tensor([0.9, 0.5, 0.8])
    assert process_score(s) == pytest.approx(0.5)
    assert process_score(s, "prod") == pytest.approx(0.36)
    assert process_score(torch.tensor([])) == 0.0


def test_implicit_reward_hand_computed_and_independent_of_batch_neighbours():
    """beta * sum over the response and its EOS of (log pi - log pi_ref), computed token by token here;
    0 when pi = pi_ref; a response scores the same alone as beside a longer one (right padding)."""
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=64, vocab_size=261, n_layer=1, n_head=2, n_embd=16)
    pi, ref = GPT(cfg).eval(), GPT(cfg).eval()
    tok, prompt = byte_tokenizer(), [{"role": "user", "content": "1+2"}]
    ids, mask = response_tokens(tok, prompt, "1+2=3;#3")
    with torch.no_grad():
        lp = lambda m: torch.log_softmax(m(torch.tensor([ids]))[0].float(), -1)
        a, b = lp(pi), lp(ref)
    want = sum(a[t - 1, ids[t]] - b[t - 1, ids[t]] for t in range(len(ids)) if mask[t])
    alone = implicit_rewards(pi, ref, tok, [prompt], ["1+2=3;#3"], beta=0.5)
    assert alone.item() == pytest.approx(0.5 * want.item(), abs=1e-5) and abs(want.item()) > 1e-3
    paired = implicit_rewards(pi, ref, tok, [prompt, prompt], ["1+2=3;#3", "1+2=3;#3 and a much longer tail"], 0.5)
    assert paired[0].item() == pytest.approx(alone.item(), abs=1e-5)
    assert implicit_rewards(pi, pi, tok, [prompt], ["1+2=3;#3"]).item() == 0.0
    loglik = sum(a[t - 1, ids[t]] for t in range(len(ids)) if mask[t])  # ref=None: the likelihood itself
    assert implicit_rewards(pi, None, tok, [prompt], ["1+2=3;#3"]).item() == pytest.approx(loglik.item(), abs=1e-5)


def test_sampled_sequences_are_scored_as_sampled():
    """task.sample_responses keeps the tokens exactly as generate sampled them (no EOS appended to an
    unfinished response), and logratios sums log pi - log pi_ref over exactly those tokens: a KL estimate
    must score the samples, not the decoded text re-encoded with an EOS added."""
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=64, vocab_size=261, n_layer=1, n_head=2, n_embd=16)
    pi, ref = GPT(cfg).eval(), GPT(cfg).eval()
    tok, prompts = byte_tokenizer(), ["1+2", "3+4+5"]
    samples = task.sample_responses(pi, tok, prompts, max_new_tokens=6, generator=torch.Generator().manual_seed(5))
    rendered = [tok.render_prompt([{"role": "user", "content": p}]) for p in prompts]
    out, out_mask = generate(pi, rendered, 6, tok.eos_id, tok.pad_id, generator=torch.Generator().manual_seed(5))
    assert [s[1] for s in samples] == [False, True]  # with these seeds: one unfinished, one sampled EOS (4th token)
    for (text, ended, n, (ids, mask)), p, row, m in zip(samples, rendered, out.tolist(), out_mask.sum(1).tolist()):
        assert n == m and ids == p + row[:m] and mask == [0] * len(p) + [1] * m
        assert (ids[-1] == tok.eos_id) == ended  # the EOS is there only if it was sampled
    seqs = [s[3] for s in samples]
    want = []
    with torch.no_grad():
        for ids, mask in seqs:
            a, b = (torch.log_softmax(x(torch.tensor([ids]))[0].float(), -1) for x in (pi, ref))
            want.append(sum(a[t - 1, ids[t]] - b[t - 1, ids[t]] for t in range(len(ids)) if mask[t]).item())
    got = logratios(pi, ref, seqs, tok.pad_id, beta=0.5)
    assert got.tolist() == pytest.approx([0.5 * w for w in want], abs=1e-5)
    assert logratios(pi, pi, seqs, tok.pad_id).abs().max().item() == 0.0


def test_pair_accuracy_hand_computed():
    """Judge scores (c, r): right, wrong, tie, right. Labels: 1 + 0 + 0.5 + 1 of 4 = 0.625. Gold prefers the
    rejected one in pair 2 (so the judge is right there) and ties pair 4 (left out): (1 + 1 + 0.5) / 3."""
    r_c, r_r = torch.tensor([2.0, 0.0, 1.0, 3.0]), torch.tensor([1.0, 1.0, 1.0, 0.0])
    g_c, g_r = torch.tensor([1.0, 0.2, 0.9, 0.5]), torch.tensor([0.5, 0.7, 0.1, 0.5])
    assert pair_accuracy(r_c, r_r) == (0.625, None)
    labels, gold = pair_accuracy(r_c, r_r, g_c, g_r)
    assert labels == 0.625 and gold == pytest.approx(2.5 / 3)


def test_best_of_n_picks_the_argmax():
    scores = torch.tensor([[0.1, 0.9, 0.3], [2.0, -1.0, 2.0], [float("-inf"), -5.0, -6.0]])
    assert best_of_n(scores).tolist() == [1, 0, 1]


def run(script, *args):
    r = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


TINY_RM = ["--n_train=100", "--n_eval=20", "--n_norm=16", "--batch_size=4", "--max_steps=3", "--eval_interval=2",
           "--log_interval=1", "--device=cpu"]


def test_train_rm_outcome_end_to_end(tmp_path, sft_ckpt):
    """A tiny outcome RM run: metrics, summary with both accuracies, a normalised, loadable checkpoint."""
    from nanoalign.utils import load_checkpoint
    out = tmp_path / "rm"
    stdout = run("train_rm.py", f"--init_from={sft_ckpt}", f"--out_dir={out}", *TINY_RM)
    assert "vs gold" in stdout
    summary = json.load(open(out / "summary.json"))
    for key in ("eval/acc_labels", "eval/acc_gold", "eval/chosen_mean", "eval/rejected_std", "eval/margin"):
        assert key in summary["final"]
    assert set(summary["baseline"]) == {"loglik/acc_labels", "loglik/acc_gold"}  # the untrained likelihood judge
    assert summary["normalization"]["mean_after"] == pytest.approx(0.0, abs=1e-4)
    assert summary["normalization"]["std_after"] == pytest.approx(1.0, abs=1e-3)
    rm, tok, ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert isinstance(rm, ScalarModel) and ckpt["rm_kind"] == "outcome"
    assert rm.gain.item() == pytest.approx(summary["normalization"]["gain"])
    lines = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert any("acc" in l and "margin" in l for l in lines)


@pytest.mark.parametrize("top_blocks", [0, 1])
def test_train_rm_top_blocks_freeze_the_body(tmp_path, sft_ckpt, top_blocks):
    """--top_blocks=1: the SFT body is unchanged by training, the new block and the head moved;
    --top_blocks=0: the head sits on the body, and the body trains too."""
    from nanoalign.utils import load_checkpoint
    out = tmp_path / "rm"
    run("train_rm.py", f"--init_from={sft_ckpt}", f"--out_dir={out}", f"--top_blocks={top_blocks}", *TINY_RM)
    rm, _, ckpt = load_checkpoint(str(out / "ckpt.pt"))
    sft = load_checkpoint(sft_ckpt)[0].state_dict()
    assert ckpt["top_blocks"] == top_blocks and len(rm.top) == top_blocks
    same = [torch.equal(v, sft[k]) for k, v in rm.gpt.state_dict().items()]
    assert all(same) if top_blocks else not all(same)
    assert rm.head.weight.abs().sum().item() > 0  # it started at zero


def test_train_rm_outcome_on_a_preference_file(tmp_path, sft_ckpt):
    """A prompt/chosen/rejected JSONL file: labels-only accuracies (no gold scorer), the likelihood baseline,
    and the normalisation on the file's prompts."""
    path = tmp_path / "prefs.jsonl"
    with open(path, "w") as f:
        for i in range(40):
            f.write(json.dumps({"prompt": f"{i % 7}+{i % 5}", "chosen": "yes, good", "rejected": "no"}) + "\n")
    out = tmp_path / "rm"
    run("train_rm.py", f"--init_from={sft_ckpt}", f"--data_path={path}", "--val_frac=0.25", f"--out_dir={out}",
        *TINY_RM)
    summary = json.load(open(out / "summary.json"))
    assert "eval/acc_labels" in summary["final"] and "eval/acc_gold" not in summary["final"]
    assert set(summary["baseline"]) == {"loglik/acc_labels"}
    assert summary["normalization"]["std_after"] == pytest.approx(1.0, abs=1e-3)


def test_train_rm_normalises_on_prompts_that_leave_room_to_sample(tmp_path, sft_ckpt):
    """A file whose prompts are half too long to sample from (--truncate=left keeps their pairs for
    training): the normalisation uses only prompts that fit; with none that fit, it stops before training."""
    path = tmp_path / "prefs.jsonl"
    long_prompt = "a long question " * 20  # 320 bytes: more than the tiny model's 128-token context
    with open(path, "w") as f:
        for i in range(80):
            prompt = long_prompt if i % 2 else f"{i % 7}+{i % 5}"
            f.write(json.dumps({"prompt": prompt, "chosen": "yes, good", "rejected": "no"}) + "\n")
    out = tmp_path / "rm"
    run("train_rm.py", f"--init_from={sft_ckpt}", f"--data_path={path}", "--truncate=left", f"--out_dir={out}",
        *TINY_RM)
    assert json.load(open(out / "summary.json"))["normalization"]["n"] == 16  # n_norm, all of them short
    with open(path, "w") as f:
        for i in range(40):
            f.write(json.dumps({"prompt": long_prompt, "chosen": "yes, good", "rejected": "no"}) + "\n")
    r = subprocess.run([sys.executable, "train_rm.py", f"--init_from={sft_ckpt}", f"--data_path={path}",
                        "--truncate=left", f"--out_dir={tmp_path / 'rm2'}", *TINY_RM],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "--normalize=False" in r.stderr and not (tmp_path / "rm2" / "metrics.jsonl").exists()


def test_train_rm_process_and_best_of_n(tmp_path, sft_ckpt):
    """A tiny process RM run, then best_of_n.py with outcome RMs, their ensemble, the PRM and gold."""
    prm, rm1, rm2 = tmp_path / "prm", tmp_path / "rm1", tmp_path / "rm2"
    run("train_rm.py", "--kind=process", f"--init_from={sft_ckpt}", f"--out_dir={prm}", *TINY_RM)
    assert "eval/step_acc" in json.load(open(prm / "summary.json"))["final"]
    # outcome RM 1 from the SFT model; outcome RM 2 from the PRM's body, normalised on the SFT policy's samples
    run("train_rm.py", f"--init_from={sft_ckpt}", f"--out_dir={rm1}", "--seed=1", *TINY_RM)
    r = subprocess.run([sys.executable, "train_rm.py", f"--init_from={prm}/ckpt.pt", f"--out_dir={rm2}", *TINY_RM],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "cannot sample" in r.stderr and not (rm2 / "metrics.jsonl").exists()  # fails first
    run("train_rm.py", f"--init_from={prm}/ckpt.pt", f"--policy={sft_ckpt}", f"--out_dir={rm2}", "--seed=2", *TINY_RM)
    assert json.load(open(rm2 / "summary.json"))["normalization"]["policy"] == str(sft_ckpt)
    from nanoalign.utils import load_checkpoint, save_checkpoint
    gpt, tok, _ = load_checkpoint(sft_ckpt)  # a stand-in for a DPO policy: SFT, perturbed, and where it started
    with torch.no_grad():
        gpt.lm_head.weight.add_(0.1 * torch.randn_like(gpt.lm_head.weight))
    save_checkpoint(str(tmp_path / "dpo.pt"), gpt, tok, config={"init_from": sft_ckpt})
    table_path = tmp_path / "bon.json"
    stdout = run("best_of_n.py", f"--policy={sft_ckpt}", f"--rms={rm1}/ckpt.pt,{rm2}/ckpt.pt",
                 f"--prm={prm}/ckpt.pt", f"--dpo={tmp_path / 'dpo.pt'}", "--n_prompts=6", "--ns=1,2,4",
                 f"--out={table_path}", "--device=cpu")
    table = json.load(open(table_path))["table"]
    assert set(table) == {"outcome", "ensemble-min (k=2)", "process", "dpo implicit", "gold (ceiling)"}
    # N=1 is the policy alone: every judge keeps the same (first) sample
    assert len({row["1"]["gold"] for row in table.values()}) == 1
    gold = table["gold (ceiling)"]
    assert gold["1"]["gold"] <= gold["2"]["gold"] <= gold["4"]["gold"]  # the ceiling cannot get worse with N
    assert "| judge |" in stdout


def test_init_from_a_reward_model_checkpoint_gives_its_body(rm, tmp_path):
    """`init_model` on a reward-model checkpoint returns its GPT body (the head is dropped), weights equal."""
    from nanoalign.utils import init_model, save_checkpoint
    path = str(tmp_path / "rm.pt")
    save_checkpoint(path, rm, byte_tokenizer(), rm_kind="outcome")
    body, tok = init_model(path, "", {}, "cpu")  # a checkpoint brings its own tokenizer
    assert isinstance(body, GPT) and tok.n_vocab == 261
    ours = rm.gpt.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in body.state_dict().items())
