"""report.py on a fake out/ tree (with and without matplotlib, and with stages missing), and pipeline.py's
skip-what-exists logic (dry runs: no stage is run)."""
import json
import os
import runpy
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        if path.endswith(".jsonl"):
            f.write("".join(json.dumps(r) + "\n" for r in obj))
        else:
            json.dump(obj, f)


def ramp(a, b, n):
    return [a + (b - a) * i / max(1, n - 1) for i in range(n)]


def fake_out(root):
    """An out/ tree with the files each stage writes (their keys as the scripts write them today), numbers
    shaped like the README's: PPO default gains gold, the weak-KL run is over-optimised."""
    write(f"{root}/sft/summary.json", {"steps": 900, "elapsed_s": 126.0, "checkpoint": "x", "val_loss": 0.092,
                                       "n_test_prompts": 256,
                                       "start": {"gold": 0.0, "pass": 0.0, "length": 43.6, "eos": 0.15},
                                       "final": {"gold": 0.646, "pass": 0.5, "length": 23.8, "eos": 1.0}})
    write(f"{root}/sft/metrics.jsonl", [{"step": s, "loss": 4.0 / s ** 0.5} for s in range(10, 910, 10)]
          + [{"step": s, "val_loss": 0.1 + 1.0 / s, "gold": 0.6, "pass": 0.5, "length": 24.0, "eos": 1.0}
             for s in (300, 600, 900)])
    for name, kind, acc in (("rm", "outcome", 0.861), ("prm", "process", 0.749)):
        final = {"eval/acc_labels": acc - 0.1, "eval/acc_gold": acc, "eval/label_gold_agreement": 0.943}
        if kind == "process":
            final["eval/step_acc"] = 0.901
        write(f"{root}/{name}/summary.json", {"kind": kind, "steps": 600, "elapsed_s": 80.0, "final": final,
                                              "start": final, "baseline": {"loglik/acc_gold": 0.859}})
        write(f"{root}/{name}/metrics.jsonl", [{"step": s, "loss": 0.7 - s / 2000} for s in range(10, 610, 10)]
              + [{"step": s, **final} for s in (200, 400, 600)])
    for name, mode, kls, golds in (("dpo", "offline", [0.3, 0.5, 0.54], [0.78, 0.82, 0.839]),
                                   ("dpo_online", "online", [0.4, 0.7, 0.85], [0.8, 0.88, 0.906])):
        evals = [{"step": s, "eval/win_rate": 0.5 + g - 0.64, "eval/kl": k, "eval/gold": g, "eval/length": 23.6}
                 for s, k, g in zip((100, 200, 300), kls, golds)]
        summary = {"loss": "dpo", "mode": mode, "steps": 300, "elapsed_s": 90.0, "n_eval_prompts": 512,
                   "start": {"eval/gold": 0.640, "eval/length": 23.6}, "final": evals[-1]}
        if mode == "online":
            summary.update(judge="gold", ref_update="round",
                           rounds=[{"round": r + 1, "round/pairs": 800 - 100 * r, "round/tied_frac": 0.16 + 0.1 * r,
                                    "round/judge_mean": 0.66 + 0.05 * r, "round/gold_mean": 0.66 + 0.05 * r,
                                    "round/eos_frac": 1.0} for r in range(5)])
        write(f"{root}/{name}/summary.json", summary)
        write(f"{root}/{name}/metrics.jsonl",
              [{"step": s, "loss": 0.69 - s / 1000} for s in range(10, 310, 10)] + evals)
    for name, rm, gold, kl, held in (("ppo", (0.07, 0.44), (0.687, 0.753), (0.06, 0.76), (0.646, 0.730)),
                                     ("ppo_weak_kl", (0.14, 0.71), (0.684, 0.301), (0.03, 16.0), (0.646, 0.249))):
        rows = [{"iter": i + 1, "rm": r, "gold": g, "kl": k, "len": 24.0}
                for i, (r, g, k) in enumerate(zip(ramp(*rm, 100), ramp(*gold, 100), ramp(*kl, 100)))]
        for r, g in zip(rows[24::25], ramp(held[0], held[1], 5)[1:]):
            r.update({"eval/gold": g, "eval/pass": g - 0.1, "eval/length": 23.8, "eval/eos": 1.0})
        write(f"{root}/{name}/metrics.jsonl", rows)
        with open(f"{root}/{name}/curves.csv", "w") as f:
            f.write("iter,kl,rm,gold\n" + "".join(f"{r['iter']},{r['kl']},{r['rm']},{r['gold']}\n" for r in rows))
        write(f"{root}/{name}/summary.json", {
            "iters": 100, "elapsed_s": 150.0, "n_eval_prompts": 256,
            "start": {"eval/gold": held[0], "eval/pass": 0.5, "eval/length": 23.8, "eval/eos": 1.0},
            "final": {k: v for k, v in rows[-1].items() if k.startswith("eval/")},
            "last_iter": {k: rows[-1][k] for k in ("rm", "gold", "kl")}})
    summary = json.load(open(f"{root}/ppo/summary.json"))  # the evals.py keys, as a stage will log them
    summary["start"].update({"eval/distinct_2": 0.31, "eval/demo_nll": 0.092})
    summary["final"].update({"eval/distinct_2": 0.27, "eval/demo_nll": 0.118})
    write(f"{root}/ppo/summary.json", summary)
    rows = [{"step": s + 1, "reward": r, "len_mean": 24.0} for s, r in enumerate(ramp(0.5, 0.83, 120))]
    rows += [{"step": s, "eval/pass@1": p, "eval/pass@4": p + 0.1, "eval/gold": p + 0.05}
             for s, p in zip((40, 80, 120), (0.7, 0.8, 0.833))]
    write(f"{root}/grpo/metrics.jsonl", rows)
    write(f"{root}/grpo/summary.json", {"steps": 120, "elapsed_s": 80.0, "n_eval_prompts": 256, "samples_per_prompt": 4,
                                        "start": {"eval/pass@1": 0.535, "eval/pass@4": 0.875, "eval/gold": 0.674},
                                        "final": rows[-1]})
    golds = {"outcome": [0.676, 0.781, 0.817, 0.785, 0.763], "process": [0.676, 0.772, 0.776, 0.728, 0.644],
             "gold (ceiling)": [0.676, 0.827, 0.910, 0.957, 0.983]}
    write(f"{root}/best_of_n.json", {"config": {}, "table": {j: {str(n): {"gold": g, "pass": g - 0.13}
                                                                for n, g in zip((1, 2, 4, 8, 16), gs)}
                                                            for j, gs in golds.items()}})
    os.makedirs(f"{root}/logs")  # a directory that is no stage's: ignored


def run_report(out, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["report.py", f"--out={out}"])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # configure() sets its own
    runpy.run_path(os.path.join(ROOT, "report.py"), run_name="__main__")
    return open(os.path.join(out, "report.md")).read()


def row_of(report, run):
    return next(line for line in report.splitlines() if line.startswith(f"| `{run}` |"))


def test_report_without_matplotlib(tmp_path, monkeypatch):
    fake_out(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    report = run_report(tmp_path, monkeypatch)
    assert "matplotlib is not installed" in report and not (tmp_path / "figures").exists()
    # results at a glance: start -> final, KL, win rate
    assert "0.646 → 0.730" in row_of(report, "ppo") and "0.76" in row_of(report, "ppo")
    dpo = row_of(report, "dpo")
    assert "0.640 → 0.839" in dpo and "0.54" in dpo and "69.9%" in dpo
    assert "53.5 → 83.3" in row_of(report, "grpo")  # GRPO's pass is its pass@1
    tax = report.split("### Diversity, entropy and the alignment tax")[1].split("\n## ")[0]
    assert "| `ppo` |  |  | 0.310 → 0.270 |  | 0.092 → 0.118 |" in tax and "`dpo`" not in tax
    # the release gate on every run with a proxy and gold: the over-optimised run is stopped, the default ships
    gate = report.split("## Release gate")[1].split("\n## ")[0]
    assert "| `ppo` | judge score of the rollouts |" in gate and "**no**" not in row_of(gate, "ppo")
    weak = row_of(gate, "ppo_weak_kl")
    assert "**no**" in weak and "gold fell by 0.397 while the proxy rose by 0.547" in weak
    assert "`grpo`" in gate and "`dpo_online`" in gate and "`dpo` |" not in gate  # offline DPO has no proxy
    # reward models, best-of-N with the analytic KL, online rounds
    assert "86.1%" in row_of(report, "rm") and "90.1%" in row_of(report, "prm")
    assert "| KL (nats) | 0.00 | 0.19 | 0.64 | 1.20 | 1.84 |" in report
    assert "### Online rounds: `dpo_online`" in report and "`logs`" not in report


def test_report_with_matplotlib(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    fake_out(tmp_path)
    report = run_report(tmp_path, monkeypatch)
    names = ("frontier.png", "ppo_overoptimisation.png", "reward_models.png", "training_curves.png")
    for name in names:
        assert os.path.getsize(tmp_path / "figures" / name) > 10_000 and f"(figures/{name})" in report


def test_report_on_a_partial_tree(tmp_path, monkeypatch):
    """Stages missing, a stage still running (no summary.json yet), a metrics line cut short: no crash."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert "No stage has finished yet" in run_report(tmp_path, monkeypatch)
    fake_out(tmp_path / "full")
    for name in ("sft", "ppo"):
        os.rename(tmp_path / "full" / name, tmp_path / name)
    os.remove(tmp_path / "ppo" / "summary.json")  # PPO still running
    with open(tmp_path / "sft" / "metrics.jsonl", "a") as f:
        f.write('{"step": 910, "lo')
    report = run_report(tmp_path, monkeypatch)
    assert "`sft`" in report and "`ppo`" not in report and "## Release gate" not in report


def dry_run(out, capsys, monkeypatch, *args):
    """pipeline.py --dry_run=True, in this process (no stage runs): -> what it printed."""
    monkeypatch.setattr(sys, "argv", ["pipeline.py", f"--out={out}", "--dry_run=True", *args])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    runpy.run_path(os.path.join(ROOT, "pipeline.py"), run_name="__main__")
    return capsys.readouterr().out


def planned(stdout):
    """{stage: "run" or "skip"} from a dry run's lines "[i/n] stage: run ..." / "[i/n] stage: skip ..."."""
    lines = [l for l in stdout.splitlines() if l.startswith("[")]
    return {l.split("] ")[1].split(":")[0]: l.split(": ")[1].split()[0] for l in lines}


def test_pipeline_skips_what_exists(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    run = lambda *args: dry_run(out, capsys, monkeypatch, *args)
    stdout = run()
    plan = planned(stdout)
    assert list(plan) == ["sft", "rm", "prm", "dpo", "best_of_n", "dpo_online", "ppo", "ppo_weak_kl", "grpo", "report"]
    assert set(plan.values()) == {"run"}
    assert f"python train_sft.py --out_dir={out}/sft" in stdout
    assert (f"python train_ppo.py --init_from={out}/sft/ckpt.pt --reward_model={out}/prm/ckpt.pt --init_kl_coef=0 "
            f"--adaptive_kl=False --out_dir={out}/ppo_weak_kl") in stdout
    assert not out.exists()  # a dry run writes nothing
    write(f"{out}/sft/summary.json", {})
    write(f"{out}/best_of_n.json", {})
    os.makedirs(out / "rm")  # started, not finished: no summary.json, so it runs again
    plan = planned(run())
    assert plan["sft"] == plan["best_of_n"] == "skip" and plan["rm"] == plan["grpo"] == "run"
    assert plan["report"] == "run"  # the report is always rewritten
    plan = planned(run("--redo=sft,grpo"))
    assert plan["sft"] == "run" and plan["best_of_n"] == "skip"
    assert set(planned(run("--redo=all")).values()) == {"run"}
    with pytest.raises(SystemExit, match="unknown stage sfx; the stages are sft, rm"):
        run("--redo=sft,sfx")
