"""
A recipe for GPT-2 124M on real data, on one 80 GB GPU: every stage's command, in order, each starting from
the checkpoint the one before it wrote.

    GPT-2 -> SFT on Alpaca -> outcome reward model on HH-RLHF -> DPO on HH-RLHF
          -> PPO on HH-RLHF prompts, judged by that reward model -> GRPO on GSM8K

    python -m nanoalign.recipe                       # print the commands (paths as published; see --help)
    python -m nanoalign.recipe --gpt2=models/gpt2 --out=runs/gpt2

`gpt2_recipe()` is the one place the recipe is written: the docs show what this module prints, and
tests/test_recipe.py runs these very commands, in this order, with size overrides appended (a later --key=value
wins), for two steps each on CPU, on a tiny GPT-2 directory and tiny files in each format; so the documented
commands and the tested ones cannot drift apart. The settings are untuned starting points, not measured here.
"""
import shlex

from nanoalign.utils import configure

# ---- config (override with --key=value; --help lists them)
gpt2 = "gpt2"  # a GPT-2 directory as published: config.json + model.safetensors (+ vocab.json + merges.txt)
alpaca = "alpaca_data.json"  # Stanford Alpaca (a JSON array of instruction/input/output)
hh = "hh-rlhf/helpful-base/train.jsonl.gz"  # Anthropic HH-RLHF (gzipped JSONL of chosen/rejected dialogues)
gsm8k = "gsm8k/train.jsonl"  # GSM8K (JSONL of question/answer "... #### 72")
out = "out/gpt2"  # every stage's out_dir is <out>/<stage>
# ---- end config

GPU = "--device=cuda --dtype=bfloat16 --compile=True"  # every stage: one CUDA GPU, bf16 autocast, torch.compile


def gpt2_recipe(gpt2=gpt2, alpaca=alpaca, hh=hh, gsm8k=gsm8k, out=out):
    """[(stage, command)] in the order they run. The reward model scores the SFT model's kind of text; the
    policy stages chain (SFT -> DPO -> PPO -> GRPO), each one's start being its reference."""
    return [
        ("sft", f"train_sft.py --init_from={gpt2} --data_path={alpaca} --out_dir={out}/sft "
                "--batch_size=16 --grad_accum=4 --lr=5e-5 --min_lr=5e-6 --warmup_steps=50 --max_steps=1600 "
                f"--eval_interval=200 --ckpt_interval=400 --sample_tokens=256 {GPU}"),
        ("rm", f"train_rm.py --init_from={out}/sft/ckpt.pt --data_path={hh} --on_error=skip --truncate=left "
               f"--out_dir={out}/rm --batch_size=16 --grad_accum=4 --lr=1e-4 --min_lr=1e-5 --warmup_steps=30 "
               f"--max_steps=650 --eval_interval=100 --ckpt_interval=200 {GPU}"),
        ("dpo", f"train_dpo.py --init_from={out}/sft/ckpt.pt --data_path={hh} --on_error=skip --truncate=left "
                f"--out_dir={out}/dpo --beta=0.1 --batch_size=8 --grad_accum=8 --lr=5e-6 --min_lr=5e-7 "
                f"--warmup_steps=150 --max_steps=650 --eval_interval=100 --ckpt_interval=200 --n_eval=256 {GPU}"),
        ("ppo", f"train_ppo.py --init_from={out}/dpo/ckpt.pt --reward_model={out}/rm/ckpt.pt --data_path={hh} "
                f"--on_error=skip --out_dir={out}/ppo --batch_size=64 --minibatches=4 --grad_accum=2 --lr=5e-6 "
                f"--vf_lr=1e-5 --max_new_tokens=128 --max_iters=200 --eval_interval=25 --ckpt_interval=50 "
                f"--n_eval=256 {GPU}"),
        ("grpo", f"train_grpo.py --init_from={out}/ppo/ckpt.pt --data_path={gsm8k} --out_dir={out}/grpo "
                 "--prompts_per_step=16 --group_size=16 --minibatches=4 --grad_accum=4 --lr=2e-6 --warmup_steps=10 "
                 f"--max_new_tokens=256 --max_steps=200 --eval_interval=50 --ckpt_interval=50 --n_eval=256 {GPU}"),
    ]


def render(stages, width=110):
    """The commands as a shell block: `python <command>`, long ones continued over lines with ` \\`."""
    blocks = []
    for _, command in stages:
        lines, line = [], "python"
        for word in (shlex.quote(w) for w in shlex.split(command)):
            if len(line) + 1 + len(word) > width - 2:
                lines.append(line)
                line = "    " + word
            else:
                line += " " + word
        blocks.append(" \\\n".join(lines + [line]))
    return "\n".join(blocks)


if __name__ == "__main__":
    configure(globals())
    print(render(gpt2_recipe(gpt2, alpaca, hh, gsm8k, out)))
