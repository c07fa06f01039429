"""
The whole pipeline on the built-in task, one command: SFT, the outcome and process reward models, offline
DPO, best-of-N (judged by both reward models and DPO's implicit reward), online DPO, PPO (default: the
outcome RM, adaptive KL), PPO with the process RM and no KL penalty (the over-optimisation run), GRPO,
then report.py's out/report.md. Each stage is the README's command, run as a subprocess with its paths
spelled out (they are the scripts' defaults for --out=out), so its output and numbers are those of the
command run by hand.

    python pipeline.py                      # everything that has not run yet, then the report
    python pipeline.py --redo=dpo,ppo       # run these again even though their outputs exist
    python pipeline.py --redo=all           # everything again
    python pipeline.py --dry_run=True       # print what would run or be skipped, run nothing

A stage is skipped when its output (summary.json; best-of-N: best_of_n.json) exists: a stage's script
writes it last, so a stage that was killed runs again from the start (or continue it by hand with its
command and --resume=True). Redoing a stage does not redo the ones after it that read its checkpoint:
name them too (or --redo=all). The report is always rewritten. Each stage's wall time is printed and
kept in <out>/pipeline.json, which the report reads. A stage that fails stops the pipeline (its error is
above); fix it and run the command again: what finished is skipped.
"""
import json
import os
import subprocess
import sys
import time

from nanoalign.utils import configure

# ---- config (override with --key=value; --help lists them)
out = "out"  # every stage's out_dir is <out>/<stage>; the report is <out>/report.md
redo = ""  # stages to run again although their outputs exist, comma-separated, or "all"
dry_run = False  # print each stage's command (or why it is skipped) and run nothing
# ---- end config


def stages(out):
    """[(name, output that marks it done, command)] in the order they run; later stages read the
    checkpoints of earlier ones."""
    sft = f"--init_from={out}/sft/ckpt.pt"
    return [
        ("sft", f"{out}/sft/summary.json", f"train_sft.py --out_dir={out}/sft"),
        ("rm", f"{out}/rm/summary.json", f"train_rm.py {sft} --out_dir={out}/rm"),
        ("prm", f"{out}/prm/summary.json", f"train_rm.py --kind=process {sft} --out_dir={out}/prm --max_steps=1500"),
        ("dpo", f"{out}/dpo/summary.json", f"train_dpo.py {sft} --out_dir={out}/dpo"),
        ("best_of_n", f"{out}/best_of_n.json",
         f"best_of_n.py --policy={out}/sft/ckpt.pt --rms={out}/rm/ckpt.pt --prm={out}/prm/ckpt.pt "
         f"--dpo={out}/dpo/ckpt.pt --out={out}/best_of_n.json"),
        ("dpo_online", f"{out}/dpo_online/summary.json",
         f"train_dpo.py --online=True {sft} --out_dir={out}/dpo_online"),
        ("ppo", f"{out}/ppo/summary.json", f"train_ppo.py {sft} --reward_model={out}/rm/ckpt.pt --out_dir={out}/ppo"),
        ("ppo_weak_kl", f"{out}/ppo_weak_kl/summary.json",
         f"train_ppo.py {sft} --reward_model={out}/prm/ckpt.pt --init_kl_coef=0 --adaptive_kl=False "
         f"--out_dir={out}/ppo_weak_kl"),
        ("grpo", f"{out}/grpo/summary.json", f"train_grpo.py {sft} --out_dir={out}/grpo"),
        ("report", None, f"report.py --out={out}"),  # always rewritten
    ]


def duration(s):
    return f"{int(s // 60)} min {s % 60:.0f} s" if s >= 60 else f"{s:.1f} s"


if __name__ == "__main__":
    configure(globals())
    plan = stages(out)
    names = [n for n, _, _ in plan]
    again = set(names) if redo == "all" else {r for r in redo.split(",") if r}
    if again - set(names):
        raise SystemExit(f"error: --redo={redo}: unknown stage {', '.join(sorted(again - set(names)))}; the stages are "
                         f"{', '.join(names)} (or all)")
    times_path = os.path.join(out, "pipeline.json")
    times = {} if dry_run or not os.path.exists(times_path) else json.load(open(times_path))
    t_all = time.time()
    for i, (name, done_file, command) in enumerate(plan):
        where = f"[{i + 1}/{len(plan)}] {name}"
        if done_file and os.path.exists(done_file) and name not in again:
            print(f"{where}: skip ({done_file} exists; --redo={name} runs it again)", flush=True)
            continue
        print(f"{where}: run python {command}", flush=True)
        if dry_run:
            continue
        t0 = time.time()
        rc = subprocess.run([sys.executable] + command.split()).returncode  # its progress goes to this terminal
        if rc != 0:
            raise SystemExit(f"error: stage {name} failed (exit status {rc}): python {command}")
        wall = time.time() - t0
        if name != "report":
            times[name] = {"command": f"python {command}", "wall_s": round(wall, 1)}
            with open(times_path, "w") as f:
                json.dump(times, f, indent=2)
        print(f"{where}: done in {duration(wall)} ({duration(time.time() - t_all)} since the pipeline started)",
              flush=True)
