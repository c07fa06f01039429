"""Reliability: config values that cannot work, checkpoints of the wrong kind, models that do not fit
together, and the default commands that must chain. Each case fails with one line naming what to fix."""
import base64
import os
import re
import subprocess
import sys

import pytest
import torch

from nanoalign.heads import ScalarModel
from nanoalign.model import GPT, GPTConfig
from nanoalign.tokenizer import get_tokenizer
from nanoalign.utils import (CheckpointError, ConfigError, check_config, check_tokenizers, configure, init_model,
                             load_checkpoint, save_checkpoint)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args):
    return subprocess.run([sys.executable, script, *args, "--device=cpu"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def assert_one_line_error(r, *needles):
    """Exit 1 with an `error: ...` line that names what to fix, and no traceback."""
    assert r.returncode == 1, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), r.stderr[-2000:]
    for n in needles:
        assert n in last, (n, last)


@pytest.fixture(scope="module")
def gpt2_tok_spec(tmp_path_factory):
    """A GPT-2-kind tokenizer from a local bytes-only rank file (no download): 50262 ids."""
    path = tmp_path_factory.mktemp("tok") / "bytes.tiktoken"
    path.write_text("".join(f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(256)))
    return f"gpt2:{path}"


@pytest.fixture(scope="module")
def ckpts(sft_ckpt, gpt2_tok_spec, tmp_path_factory):
    """Byte and GPT-2-tokenizer policies and outcome reward models (tiny, untrained), and a process RM."""
    d = tmp_path_factory.mktemp("ckpts")
    byte_policy, byte_tok, _ = load_checkpoint(sft_ckpt)
    gtok = get_tokenizer(gpt2_tok_spec)
    gpt2_policy = GPT(GPTConfig(vocab_size=gtok.n_vocab, n_layer=1, n_head=2, n_embd=8, block_size=128))
    paths = {"byte_policy": sft_ckpt}
    save_checkpoint(str(d / "gpt2_policy.pt"), gpt2_policy, gtok)
    save_checkpoint(str(d / "byte_rm.pt"), ScalarModel(byte_policy), byte_tok, rm_kind="outcome")
    save_checkpoint(str(d / "byte_prm.pt"), ScalarModel(byte_policy), byte_tok, rm_kind="process")
    save_checkpoint(str(d / "gpt2_rm.pt"), ScalarModel(gpt2_policy), gtok, rm_kind="outcome")
    paths.update({k: str(d / f"{k}.pt") for k in ("gpt2_policy", "byte_rm", "byte_prm", "gpt2_rm")})
    return paths


# ------------------------------------------------------------------------------ config (item 16, 17)

def fake_script(tmp_path, body):
    path = tmp_path / "script.py"
    path.write_text("# ---- config\n" + body + "# ---- end config\n")
    g = {"__file__": str(path)}
    exec(body, g)
    return g


@pytest.mark.parametrize("arg, needle", [
    ("--lr=-1", "lr must be a number > 0"),
    ("--batch_size=0", "batch_size must be an integer >= 1"),
    ("--max_steps=0", "max_steps must be an integer >= 1"),
    ("--n_head=3", "n_embd (128) must be divisible by n_head"),
    ("--dtype=fp8", "dtype must be auto, float32, bfloat16 or float16"),
    ("--on_error=ignore", "on_error must be raise or skip"),
    ("--truncate=right", "truncate must be skip, raise or left"),
    ("--device=gpu", "device must be auto, cpu, cuda or cuda:N"),
    ("--dropout=1.5", "dropout must be a number >= 0 and < 1"),
])
def test_bad_config_values_name_the_key_and_what_it_accepts(tmp_path, arg, needle):
    g = fake_script(tmp_path, "lr = 1e-3\nbatch_size = 8\nmax_steps = 10\nn_head = 4\nn_embd = 128\ndtype = 'auto'\n"
                              "on_error = 'raise'\ntruncate = 'skip'\ndevice = 'auto'\ndropout = 0.0\n")
    with pytest.raises(ConfigError, match=re.escape(needle)):
        configure(g, [arg])
    assert configure(fake_script(tmp_path, "lr = 1e-3\nbatch_size = 8\n"), [])["lr"] == 1e-3  # good values pass


def test_cuda_on_a_machine_without_it():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        check_config({"device": "cuda"})


@pytest.mark.parametrize("arg, needle", [("--lr=-1", "lr must be a number > 0"),
                                         ("--max_steps=0", "max_steps must be an integer >= 1"),
                                         ("--dtype=fp8", "dtype must be")])
def test_a_script_reports_a_bad_value_in_one_line(arg, needle):
    """Before any model or data is built, exit 1, no traceback."""
    assert_one_line_error(run("train_sft.py", arg, "--out_dir=/nonexistent/never-written"), needle)


# ------------------------------------------------------------------------------ checkpoints (items 11-14)

def test_check_tokenizers(gpt2_tok_spec):
    byte, gpt2 = get_tokenizer("byte"), get_tokenizer(gpt2_tok_spec)
    check_tokenizers(byte, get_tokenizer("byte"), "a", "b")  # the same: fine
    with pytest.raises(CheckpointError, match=r"uses the gpt2 tokenizer \(50262 ids\) but a uses the byte tokenizer"):
        check_tokenizers(byte, gpt2, "a", "b")


@pytest.mark.parametrize("policy, rm", [("byte_policy", "gpt2_rm"), ("gpt2_policy", "byte_rm")])
def test_ppo_refuses_a_reward_model_with_another_tokenizer(ckpts, tmp_path, policy, rm):
    """Byte ids read as GPT-2 ids ran to the end with exit 0; the reverse crashed in an embedding lookup."""
    r = run("train_ppo.py", f"--init_from={ckpts[policy]}", f"--reward_model={ckpts[rm]}", f"--out_dir={tmp_path}",
            "--max_iters=1", "--batch_size=2", "--n_eval=2")
    assert_one_line_error(r, "--reward_model=", "tokenizer", "--init_from=")


def test_online_dpo_and_best_of_n_refuse_a_judge_with_another_tokenizer(ckpts, tmp_path):
    r = run("train_dpo.py", f"--init_from={ckpts['byte_policy']}", "--online=True", f"--judge={ckpts['gpt2_rm']}",
            f"--out_dir={tmp_path}", "--max_steps=1", "--n_eval=2", "--prompts_per_round=2")
    assert_one_line_error(r, "--judge=", "tokenizer")
    r = run("best_of_n.py", f"--policy={ckpts['byte_policy']}", f"--rms={ckpts['gpt2_rm']}", "--prm=",
            "--n_prompts=2", "--ns=1,2", f"--out={tmp_path}/b.json")
    assert_one_line_error(r, "--rms", "tokenizer")


@pytest.mark.parametrize("script", ["train_dpo.py", "train_grpo.py", "train_ppo.py"])
def test_a_reward_model_where_a_policy_is_expected(ckpts, tmp_path, script):
    r = run(script, f"--init_from={ckpts['byte_rm']}", f"--out_dir={tmp_path}", "--n_eval=2")
    assert_one_line_error(r, f"--init_from={ckpts['byte_rm']} is a reward-model checkpoint",
                          "a policy checkpoint", "is expected")


def test_a_policy_where_a_reward_model_is_expected(ckpts, tmp_path):
    r = run("train_ppo.py", f"--init_from={ckpts['byte_policy']}", f"--reward_model={ckpts['byte_policy']}",
            f"--out_dir={tmp_path}", "--max_iters=1")
    assert_one_line_error(r, f"--reward_model={ckpts['byte_policy']} is a policy checkpoint",
                          "a reward-model checkpoint (train_rm.py writes those) is expected")
    with pytest.raises(CheckpointError, match="is a policy checkpoint"):
        load_checkpoint(ckpts["byte_policy"], expect="scalar", what="--judge")
    r = run("best_of_n.py", f"--policy={ckpts['byte_policy']}", f"--rms={ckpts['byte_rm']}",
            f"--prm={ckpts['byte_rm']}", "--n_prompts=2", "--ns=1,2", f"--out={tmp_path}/b.json")
    assert_one_line_error(r, "--prm", "'outcome'", "takes 'process'")


def test_init_from_a_missing_or_wrong_directory_never_reaches_the_network(tmp_path, monkeypatch):
    import tiktoken

    def no_network(*a, **k):
        raise AssertionError("reached for the network")
    monkeypatch.setattr(tiktoken, "get_encoding", no_network)
    with pytest.raises(CheckpointError, match="no such directory"):
        init_model(str(tmp_path / "nope"), "", {}, "cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a GPT-2 directory, it has no config.json and no model.safetensors"):
        init_model(str(tmp_path / "empty"), "", {}, "cpu")
    with pytest.raises(CheckpointError, match="no such file"):
        init_model(str(tmp_path / "missing.pt"), "", {}, "cpu")


def test_a_tokenizer_asked_for_with_a_checkpoint_is_refused_not_ignored(ckpts, gpt2_tok_spec):
    with pytest.raises(CheckpointError, match="brings its own byte tokenizer"):
        init_model(ckpts["byte_policy"], gpt2_tok_spec, {}, "cpu")
    model, tok = init_model(ckpts["byte_policy"], "byte", {}, "cpu")  # the same one: fine
    assert tok.spec["kind"] == "byte"
    assert init_model(ckpts["gpt2_policy"], "", {}, "cpu")[1].n_vocab == 50262


def test_a_gpt2_directory_as_published_brings_its_own_tokenizer_files(tmp_path):
    """vocab.json + merges.txt in the directory are read (no --tokenizer, no download)."""
    import json
    from nanoalign.model import write_safetensors
    from test_tokenizer import write_tiny_gpt2_vocab
    d = tmp_path / "gpt2"
    encoder = write_tiny_gpt2_vocab(d, [("Ġ", "t"), ("h", "e")])
    os.rename(d / "encoder.json", d / "vocab.json")  # the names a published GPT-2 directory uses
    os.rename(d / "vocab.bpe", d / "merges.txt")
    C, V, P = 8, len(encoder), 16
    json.dump({"vocab_size": V, "n_positions": P, "n_embd": C, "n_layer": 0, "n_head": 2}, open(d / "config.json", "w"))
    write_safetensors({"wte.weight": torch.randn(V, C), "wpe.weight": torch.randn(P, C), "ln_f.weight": torch.ones(C),
                       "ln_f.bias": torch.zeros(C)}, d / "model.safetensors")
    model, tok = init_model(str(d), "", {}, "cpu")
    assert tok.spec == {"kind": "gpt2", "path": f"gpt2:{d}"[5:]} and tok.encode(" the") == [encoder["Ġt"], encoder["he"]]
    assert model.config.vocab_size == tok.n_vocab == 50262  # GPT-2 ids, then the chat special tokens


# ------------------------------------------------------------------------------ defaults that chain (item 19)

def defaults(script):
    src = open(os.path.join(ROOT, script)).read().split("# ---- config", 1)[1].split("# ---- end config")[0]
    return dict(re.findall(r'^(\w+) = "([^"]*)"', src, re.M))


def test_the_default_commands_chain():
    """Each stage's default input is what an earlier stage writes by default: train_sft.py, then train_rm.py,
    train_dpo.py, train_grpo.py, train_ppo.py and best_of_n.py with no arguments."""
    sft = defaults("train_sft.py")["out_dir"] + "/ckpt.pt"
    rm = defaults("train_rm.py")["out_dir"] + "/ckpt.pt"
    for script in ("train_rm.py", "train_dpo.py", "train_grpo.py", "train_ppo.py"):
        assert defaults(script)["init_from"] == sft, script
    assert defaults("train_ppo.py")["reward_model"] == rm
    assert defaults("best_of_n.py")["policy"] == sft and defaults("best_of_n.py")["rms"] == rm


def test_a_missing_default_input_says_which_command_makes_it(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "train_dpo.py"), "--device=cpu"], cwd=tmp_path,
                       capture_output=True, text=True)
    assert_one_line_error(r, "--init_from=out/sft/ckpt.pt: no such file: run `python train_sft.py` first")


def test_run_path_resolves_a_checkpoints_relative_paths_where_the_run_was(tmp_path, monkeypatch):
    """A checkpoint's config holds init_from as typed; read from another directory it must still mean the run's."""
    from nanoalign.utils import run_path
    run_dir, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    (run_dir / "out" / "sft").mkdir(parents=True)
    (run_dir / "out" / "sft" / "ckpt.pt").write_text("x")
    elsewhere.mkdir()
    monkeypatch.chdir(run_dir)
    tok = get_tokenizer("byte")
    save_checkpoint(str(run_dir / "ckpt.pt"), GPT(GPTConfig(vocab_size=tok.n_vocab, n_layer=1, n_head=1, n_embd=8,
                                                           block_size=8)), tok, config={"init_from": "out/sft/ckpt.pt"})
    monkeypatch.chdir(elsewhere)
    ckpt = torch.load(run_dir / "ckpt.pt", weights_only=True)
    assert ckpt["cwd"] == str(run_dir)
    assert run_path(ckpt, ckpt["config"]["init_from"]) == str(run_dir / "out/sft/ckpt.pt")
    assert run_path(ckpt, "/abs/x.pt") == "/abs/x.pt" and run_path({}, "out/sft/ckpt.pt") == "out/sft/ckpt.pt"
    assert run_path(ckpt, "missing.pt") == "missing.pt"  # not there: as it is (a checkpoint moved elsewhere)
