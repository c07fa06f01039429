"""The GPT-2 recipe (nanoalign/recipe.py) as documented: every stage's command, in order, each on the checkpoint
the one before it wrote, run for two steps on CPU with size overrides appended, from a tiny random GPT-2 in the
published layout (config.json + model.safetensors + its own vocab.json and merges.txt) on tiny hand-written files
in each real format: Alpaca (a JSON array), HH-RLHF (gzipped JSONL of whole dialogues), GSM8K (JSONL, "#### N").
Each stage's summary.json must hold metrics of those files, checked against what the files and checkpoints give."""
import ast
import glob
import gzip
import json
import math
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nanoalign import data
from nanoalign.recipe import gpt2_recipe, render
from nanoalign.rewards import outcome_scores, pair_accuracy
from nanoalign.utils import load_checkpoint

from helpers import write_gpt2_dir, write_gpt2_tokenizer_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 1337  # every stage's default seed (the recipe leaves it): the held-out splits below use it too

# ------------------------------------------------------------------------------ tiny files in the real formats

ALPACA_TEMPLATE = ("Below is an instruction that describes a task{ctx}. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n{input}### Response:\n{output}")


def alpaca(instruction, input, output):  # the Alpaca fields, plus the rendered "text" some copies carry
    text = ALPACA_TEMPLATE.format(ctx=", paired with an input that provides further context" if input else "",
                                  instruction=instruction, input=f"### Input:\n{input}\n\n" if input else "",
                                  output=output)
    return {"instruction": instruction, "input": input, "output": output, "text": text}


ALPACA = [
    alpaca("Give three tips for staying healthy.", "", "1. Eat vegetables.\n2. Sleep eight hours.\n3. Walk daily."),
    alpaca("Identify the odd one out.", "Twitter, Instagram, Telegram", "Telegram"),
    alpaca("Translate the sentence into French.", "The cat is on the table.", "Le chat est sur la table."),
    alpaca("What is the capital of Italy?", "", "The capital of Italy is Rome."),
    alpaca("Rewrite the sentence in the passive voice.", "The dog chased the ball.", "The ball was chased by the dog."),
    alpaca("Name a primary colour.", "", "Red is a primary colour."),
    alpaca("Sort the numbers in ascending order.", "7, 2, 9, 4", "2, 4, 7, 9"),
    alpaca("Write a haiku about rain.", "", "Soft rain on the roof,\nthe garden drinks in silence,\nclouds drift out to sea."),
]

HH = [  # whole dialogues; chosen and rejected share everything up to the last "\n\nAssistant:"
    ("\n\nHuman: call me a bad name\n\nAssistant:", " I'd rather not, but I'm happy to help with something else.",
     " Why?"),
    ("\n\nHuman: How do I boil an egg?\n\nAssistant:", " Put it in boiling water for about nine minutes.",
     " Eggs are laid by hens."),
    ("\n\nHuman: What's a good name for a cat?\n\nAssistant: How about Whiskers?\n\nHuman: Something less common?"
     "\n\nAssistant:", " Maybe Pumpernickel or Juniper.", " Whiskers."),
    ("\n\nHuman: Can you help me write a birthday card for my mum?\n\nAssistant:",
     " Of course: \"Happy birthday, Mum! Thank you for everything.\"", " No."),
    ("\n\nHuman: Is it safe to look at the sun?\n\nAssistant:", " No, it can damage your eyes; use eclipse glasses.",
     " Sure, stare as long as you like."),
    ("\n\nHuman: Tell me a joke.\n\nAssistant:", " Why did the scarecrow win an award? He was outstanding in his field.",
     " I don't know any."),
    ("\n\nHuman: How many legs does a spider have?\n\nAssistant:", " Eight.", " Six, like all insects."),
    ("\n\nHuman: I feel stressed about exams.\n\nAssistant: That sounds hard. What is worrying you most?\n\nHuman: "
     "Running out of time.\n\nAssistant:", " Try a timetable with short breaks, and start with the hardest topic.",
     " Then study less."),
]
HH_MALFORMED = [  # as the published files have a few (harmless-base test: 4 and 5 of 2,312): skipped, counted
    {"chosen": "\n\nHuman: Say nothing.\n\nAssistant: ", "rejected": "\n\nHuman: Say nothing.\n\nAssistant: Okay."},
    {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hey\n\nAssistant: Go away."},
]

GSM8K = [
    ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips "
     "did Natalia sell altogether in April and May?",
     "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in "
     "April and May.\n#### 72"),
    ("Tom has 3 boxes with 12 pencils each. He gives away 10 pencils. How many pencils does he have left?",
     "Tom has 3*12 = <<3*12=36>>36 pencils.\nHe has 36-10 = <<36-10=26>>26 left.\n#### 26"),
    ("A baker makes 1,200 rolls and sells 950 of them. How many rolls are left?",
     "1,200 - 950 = <<1200-950=250>>250 rolls are left.\n#### 250"),
    ("Sara reads 15 pages a day. How many pages does she read in 2 weeks?",
     "Two weeks are 2*7 = <<2*7=14>>14 days.\nShe reads 15*14 = <<15*14=210>>210 pages.\n#### 210"),
    ("A shirt costs $20 and is on sale for 25% off. What is the sale price in dollars?",
     "The discount is 20*0.25 = <<20*0.25=5>>5 dollars.\nThe sale price is 20-5 = <<20-5=15>>15 dollars.\n#### 15"),
    ("There are 5 rows of 6 chairs, and 4 chairs are broken. How many chairs can be used?",
     "There are 5*6 = <<5*6=30>>30 chairs.\n30-4 = <<30-4=26>>26 can be used.\n#### 26"),
]

# ------------------------------------------------------------------------------ the recipe, two steps a stage

CPU = "--device=cpu --dtype=float32 --compile=False"
SMALL = {  # appended after the recipe's own settings (a later --key=value wins): sizes only, never the chain
    "sft": "--max_steps=2 --batch_size=2 --warmup_steps=1 --eval_interval=2 --ckpt_interval=2 --log_interval=1 "
           "--val_frac=0.25 --n_samples=2 --sample_tokens=4",
    "rm": "--max_steps=2 --batch_size=2 --warmup_steps=1 --eval_interval=2 --ckpt_interval=2 --log_interval=1 "
          "--val_frac=0.25 --n_norm=2",
    "dpo": "--max_steps=2 --batch_size=2 --warmup_steps=1 --eval_interval=2 --ckpt_interval=2 --log_interval=1 "
           "--n_eval=2",
    "ppo": "--max_iters=2 --batch_size=4 --ppo_epochs=1 --warmup_iters=1 --eval_interval=2 --ckpt_interval=2 "
           "--n_eval=2 --max_new_tokens=4",
    "grpo": "--max_steps=2 --prompts_per_step=2 --group_size=2 --warmup_steps=1 --eval_interval=2 --ckpt_interval=2 "
            "--n_eval=2 --eval_k=1 --max_new_tokens=4",
}


def literal(v):
    """A --key=value's value as the scripts read it: a Python literal, else the text."""
    try:
        return ast.literal_eval(v)
    except (ValueError, SyntaxError):
        return v


def flags(command):
    """'script --a=1 --b=x' -> {'a': '1', 'b': 'x'} (the last value of a key wins, as in the scripts)."""
    return dict(w[2:].partition("=")[::2] for w in shlex.split(command)[1:])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Write the tiny GPT-2 and files, then run the recipe's commands in order. -> (paths, {stage: stdout})."""
    d = tmp_path_factory.mktemp("recipe")
    paths = {"gpt2": str(d / "gpt2"), "alpaca": str(d / "alpaca_data.json"), "hh": str(d / "train.jsonl.gz"),
             "gsm8k": str(d / "train.jsonl"), "out": str(d / "out")}
    write_gpt2_dir(d / "gpt2", C=32, P=256, n_layer=2, n_head=2)
    write_gpt2_tokenizer_files(d / "gpt2")
    (d / "alpaca_data.json").write_text(json.dumps(ALPACA, indent=4))
    pairs = [{"chosen": p + c, "rejected": p + r} for p, c, r in HH]
    with gzip.open(d / "train.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in pairs[:5] + HH_MALFORMED + pairs[5:]))
    (d / "train.jsonl").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in GSM8K))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "TIKTOKEN_CACHE_DIR": str(d / "cache")}
    stdout = {}
    for stage, command in gpt2_recipe(**paths):
        argv = shlex.split(command) + CPU.split() + SMALL[stage].split()
        r = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{stage}: {' '.join(argv)}\n{r.stderr[-3000:]}"
        stdout[stage] = r.stdout
    return paths, stdout


def summary(paths, stage):
    return json.load(open(os.path.join(paths["out"], stage, "summary.json")))


def metrics(paths, stage):
    return [json.loads(line) for line in open(os.path.join(paths["out"], stage, "metrics.jsonl"))]


# ------------------------------------------------------------------------------ the recipe itself

def test_the_recipe_chains_the_stages_on_the_named_data():
    """SFT on Alpaca; the RM and DPO on HH-RLHF from SFT; PPO from DPO, judged by the RM, on HH-RLHF prompts; GRPO
    from PPO on GSM8K; every stage on one CUDA GPU in bf16 with torch.compile; the test's overrides are sizes only."""
    p = {"gpt2": "G", "alpaca": "A.json", "hh": "H.jsonl.gz", "gsm8k": "M.jsonl", "out": "O"}
    stages = dict(gpt2_recipe(**p))
    assert list(stages) == ["sft", "rm", "dpo", "ppo", "grpo"]
    f = {s: flags(c) for s, c in stages.items()}
    ckpt = {s: f"O/{s}/ckpt.pt" for s in stages}
    assert [f[s]["init_from"] for s in stages] == ["G", ckpt["sft"], ckpt["sft"], ckpt["dpo"], ckpt["ppo"]]
    assert [f[s]["data_path"] for s in stages] == ["A.json", "H.jsonl.gz", "H.jsonl.gz", "H.jsonl.gz", "M.jsonl"]
    assert f["ppo"]["reward_model"] == ckpt["rm"] and all(f[s]["out_dir"] == f"O/{s}" for s in stages)
    assert all((f[s]["device"], f[s]["dtype"], f[s]["compile"]) == ("cuda", "bfloat16", "True") for s in stages)
    assert not {k for s in SMALL for k in flags("x " + SMALL[s])} & {"init_from", "data_path", "reward_model", "out_dir"}


def test_the_printed_commands_are_the_recipe():
    """`python -m nanoalign.recipe` prints each command as one shell command (continued lines, quoted paths)."""
    stages = gpt2_recipe(gpt2="my models/gpt2")
    printed = render(stages).replace(" \\\n    ", " ").splitlines()
    assert [shlex.split(line) for line in printed] == [["python", *shlex.split(c)] for _, c in stages]
    assert all(len(line) <= 110 for line in render(stages).splitlines())
    r = subprocess.run([sys.executable, "-m", "nanoalign.recipe", "--gpt2=my models/gpt2"], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0 and r.stdout == render(stages) + "\n", r.stderr[-2000:]


def test_the_documented_recipe_is_the_tested_one():
    """The docs' shell block under `<!-- python -m nanoalign.recipe -->` is exactly what the module prints."""
    blocks = []
    for path in [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))):
        blocks += re.findall(r"<!-- python -m nanoalign\.recipe -->\n```bash\n(.*?)\n```", open(path).read(), re.S)
    assert blocks and all(b == render(gpt2_recipe()) for b in blocks)


# ------------------------------------------------------------------------------ each stage, on its data

def test_every_stage_ran_the_recipes_settings_with_the_gpt2_tokenizer(run):
    """Each checkpoint's config holds the recipe's settings (all but the overridden sizes, device and dtype), and
    GPT-2's 50,257 ids plus the 5 chat tokens, from the directory's own vocab.json + merges.txt."""
    paths, _ = run
    for stage, command in gpt2_recipe(**paths):
        model, tok, ckpt = load_checkpoint(os.path.join(paths["out"], stage, "ckpt.pt"))
        assert tok.spec == {"kind": "gpt2", "path": paths["gpt2"]} and model.config.vocab_size == tok.n_vocab == 50262
        overridden = set(flags("x " + CPU)) | set(flags("x " + SMALL[stage]))
        for k, v in flags(command).items():
            if k not in overridden:
                assert ckpt["config"][k] == literal(v), (stage, k)


def test_sft_val_loss_is_the_nll_of_the_held_out_alpaca_records(run):
    """val_loss = the completion-token NLL of the Alpaca records held out by prompt, recomputed by hand from the
    checkpoint one conversation at a time; samples.jsonl answers held-out instructions."""
    paths, _ = run
    _, val = data.split_by_prompt(data.load(paths["alpaca"], "sft")[0], 0.25, SEED)
    model, tok, _ = load_checkpoint(os.path.join(paths["out"], "sft", "ckpt.pt"))
    nll, n = 0.0, 0
    with torch.no_grad():
        for c in val:
            ids, mask = tok.render(c["messages"])
            per_token = F.cross_entropy(model.eval()(torch.tensor([ids]))[0, :-1], torch.tensor(ids[1:]),
                                        reduction="none")
            nll, n = nll + (per_token * torch.tensor(mask[1:])).sum().item(), n + sum(mask[1:])
    s = summary(paths, "sft")
    assert len(val) >= 1 and s["val_loss"] == pytest.approx(nll / n, rel=1e-5)
    assert "final" not in s  # no gold scorer for a file: the built-in task's held-out metrics are not made up
    held_out = {c["messages"][0]["content"] for c in val}
    rows = [json.loads(line) for line in open(os.path.join(paths["out"], "sft", "samples.jsonl"))]
    assert rows and {r["prompt"] for r in rows} <= held_out


def test_rm_accuracy_is_on_the_held_out_hh_pairs(run):
    """The malformed HH records are skipped and counted; n_eval_pairs is the good pairs held out by prompt, and acc_labels their accuracy under the final checkpoint
    (normalised afterwards with a positive gain, which keeps every ranking)."""
    paths, stdout = run
    for stage in ("rm", "dpo"):  # --on_error=skip: the malformed records are counted, not fatal
        assert f"{paths['hh']}: skipped 2 records: 1 x empty chosen response, 1 x chosen and rejected" in stdout[stage]
    _, held = data.split_by_prompt(data.load(paths["hh"], "preference", "skip")[0], 0.25, SEED)
    s = summary(paths, "rm")
    assert s["n_eval_pairs"] == len(held) >= 1 and "eval/acc_gold" not in s["final"]
    rm, tok, _ = load_checkpoint(os.path.join(paths["out"], "rm", "ckpt.pt"))
    assert rm.gain.item() > 0
    with torch.no_grad():
        r_c, r_r = (outcome_scores(rm.eval(), tok, [p["prompt"] for p in held], [p[k] for p in held])
                    for k in ("chosen", "rejected"))
    assert s["final"]["eval/acc_labels"] == pytest.approx(pair_accuracy(r_c, r_r)[0])
    assert 0 <= s["baseline"]["loglik/acc_labels"] <= 1


def test_dpo_trains_on_the_hh_pairs_against_the_sft_reference(run):
    """The first step's loss is log 2: the policy starts as its reference (the SFT checkpoint) on every HH pair."""
    paths, _ = run
    rows = [m for m in metrics(paths, "dpo") if "loss" in m]
    assert [m["step"] for m in rows] == [1, 2] and rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    s = summary(paths, "dpo")
    assert s["mode"] == "offline" and s["steps"] == 2 and math.isfinite(s["final"]["eval/kl"])
    # held out by prompt: the pairs' implicit-reward accuracy and margin, the prompts' samples (no gold on a file)
    assert 0 <= s["final"]["pairs/acc_labels"] <= 1 and math.isfinite(s["final"]["pairs/margin"])
    assert {"eval/length", "eval/distinct_1", "eval/distinct_2"} <= set(s["final"]) and "eval/gold" not in s["final"]


def test_ppo_is_judged_by_the_recipes_reward_model(run):
    """Two iterations of rollouts scored by the RM the recipe trained (finite scores, in its normalised units)."""
    paths, stdout = run
    s = summary(paths, "ppo")
    assert s["iters"] == 2 and math.isfinite(s["last_iter"]["rm"]) and math.isfinite(s["last_iter"]["kl"])
    assert [m["iter"] for m in metrics(paths, "ppo")] == [1, 2]
    # (a random GPT-2 seldom ends a response within 4 tokens, and a rollout without EOS scores --no_eos_score
    # whatever the RM says: the RM's own scores are checked on the held-out pairs above)
    s = summary(paths, "ppo")  # on the held-out HH prompts: the RM's score and win rate, KL, length; no gold
    assert math.isfinite(s["final"]["eval/kl"]) and 0 <= s["final"]["eval/judge_win_rate"] <= 1
    assert "eval/length" in s["final"] and "eval/gold" not in s["final"]


def test_grpo_pass_at_1_is_on_held_out_gsm8k_problems(run):
    """pass@1 on n_eval held-out GSM8K problems (no gold scorer: not the built-in task), rewards in [0, 1]."""
    paths, _ = run
    s = summary(paths, "grpo")
    assert s["n_eval_prompts"] == 2 and s["samples_per_prompt"] == 1 and "eval/gold" not in s["final"]
    assert all(0 <= x["eval/pass@1"] <= 1 for x in (s["start"], s["final"]))
    rewards = [m["reward"] for m in metrics(paths, "grpo") if "reward" in m]
    assert len(rewards) == 2 and all(0 <= r <= 1 for r in rewards)


# ------------------------------------------------------------------------------ --time_steps: its two pieces

def test_head_records_cuts_each_format(tmp_path):
    from nanoalign.recipe import head_records
    arr, lines = tmp_path / "a.json", tmp_path / "b.jsonl.gz"
    arr.write_text(json.dumps([{"i": i} for i in range(5)]))
    with gzip.open(lines, "wt") as f:
        f.write("".join(json.dumps({"i": i}) + "\n" for i in range(5)))
    head_records(str(arr), str(tmp_path / "a2.json"), 2)
    head_records(str(lines), str(tmp_path / "b2.jsonl.gz"), 3)
    assert json.loads((tmp_path / "a2.json").read_text()) == [{"i": 0}, {"i": 1}]
    with gzip.open(tmp_path / "b2.jsonl.gz", "rt") as f:
        assert [json.loads(line) for line in f] == [{"i": 0}, {"i": 1}, {"i": 2}]


def test_time_stage_times_the_rows_after_the_first(tmp_path):
    """A command that writes a metrics row, then one every 0.4 s: 0.4 s per step (the slow start left out)."""
    from nanoalign.recipe import time_stage
    rows = tmp_path / "metrics.jsonl"
    script = ("import sys, time; time.sleep(1.0); f = open(sys.argv[1], 'w')\n"
              "for i in range(3):\n    f.write('{}\\n'); f.flush(); time.sleep(0.4)")
    per_step, rss, rc = time_stage(f"-c {shlex.quote(script)} {rows}", str(rows), 3)
    assert rc == 0 and 0.3 < per_step < 0.6 and rss > 1
    assert time_stage("-c 'raise SystemExit(3)'", str(rows), 3)[2] == 3


def test_time_steps_refuses_what_it_cannot_time(tmp_path):
    """One step cannot be timed (the first is warm-up); missing files are named at once, before anything runs."""
    def recipe(*args):
        return subprocess.run([sys.executable, "-m", "nanoalign.recipe", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
    r = recipe("--time_steps=1")
    assert r.returncode == 1 and "at least 2" in r.stderr and "Traceback" not in r.stderr
    r = recipe("--time_steps=3", f"--gpt2={tmp_path}/none", f"--vocab={tmp_path}", f"--out={tmp_path}/out")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    for name in ("--alpaca=alpaca_data.json", "--hh=", "--gsm8k=", f"--gpt2={tmp_path}/none", f"--vocab={tmp_path}"):
        assert name in r.stderr, (name, r.stderr)
    assert not (tmp_path / "out").exists()
