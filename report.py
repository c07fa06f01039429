"""
The report of a pipeline run: reads every <out>/*/summary.json and metrics.jsonl (and <out>/best_of_n.json,
PPO's curves.csv, pipeline.py's wall times in <out>/pipeline.json) and writes <out>/report.md, plus PNG
figures in <out>/figures/ when matplotlib is installed (an optional dependency: without it the report has
the tables only). Nothing here trains or samples; a stage that has not run is left out.

    python report.py               # out/report.md (and out/figures/*.png)
    python report.py --out=runs/a  # another pipeline's out directory

What is in it:
- results at a glance: every policy run's held-out gold, pass rate and length at the start and the end,
  its KL to the start policy and gold win rate against it where the stage measures them, and its time;
- the other evaluations (length std, distinct-1/2, entropy, the alignment tax as held-out demonstration
  NLL) for the runs whose summary.json has them (nanoalign/evals.py);
- the release gate (`evals.release_gate`) for every run with a proxy score (the judge or reward it
  optimised, measured on its own samples during training) and a gold score;
- reward models (held-out pair accuracy against the labels and against gold), best-of-N per judge,
  online DPO's rounds;
- figures: the gold-vs-KL frontier of every method (best-of-N at its analytic KL log N - (N-1)/N),
  PPO's judge score and gold against KL, reward models and best-of-N, the training curves of each run.

Held-out numbers are each stage's own evaluation (SFT, PPO: 256 test prompts, one sample each; DPO: 512;
GRPO: 256 x 4 samples; best-of-N: 256), so the start policy's gold differs a little between rows.
"""
import csv
import json
import math
import os

from nanoalign.bandit import best_of_n_kl_bound
from nanoalign.evals import release_gate

# ---- config (override with --key=value; --help lists them)
out = "out"  # the pipeline's out directory: reads <out>/*/summary.json, writes <out>/report.md and <out>/figures/
max_length_delta = 20  # the release gate's limit on the change of mean response length (tokens)
# ---- end config

EXTRA = [("length_std", "length std"), ("distinct_1", "distinct-1"), ("distinct_2", "distinct-2"),
         ("entropy", "entropy"), ("demo_nll", "demo NLL (alignment tax)"), ("judge", "judge score"),
         ("judge_win_rate", "judge win rate vs start")]  # evals.evaluate_policy's keys, where a stage logs them


# -------------------------------------------------------------------------- reading
def read_jsonl(path):
    """The rows of a metrics.jsonl; a line cut short by a killed run is skipped."""
    rows = []
    if os.path.exists(path):
        for line in open(path):
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    return rows


def read_runs(out_dir):
    """{run name: {"summary", "metrics", "curves"}} for each <out_dir>/<name>/summary.json that parses."""
    runs = {}
    for name in sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []:
        path = os.path.join(out_dir, name, "summary.json")
        try:
            summary = json.load(open(path))
        except (OSError, ValueError):  # not a stage's directory, or a stage still running
            continue
        curves = None
        if os.path.exists(os.path.join(out_dir, name, "curves.csv")):
            with open(os.path.join(out_dir, name, "curves.csv")) as f:
                curves = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
        runs[name] = {"summary": summary, "metrics": read_jsonl(os.path.join(out_dir, name, "metrics.jsonl")),
                      "curves": curves}
    order = ["sft", "rm", "dpo", "ppo", "grpo", "other"]  # the pipeline's order, then by name
    return dict(sorted(runs.items(), key=lambda kv: (order.index(kind_of(kv[1]["summary"])), kv[0])))


def read_json(path):
    try:
        return json.load(open(path))
    except (OSError, ValueError):
        return None


def kind_of(summary):
    """Which script wrote a summary.json, from the keys only it writes."""
    if "val_loss" in summary:
        return "sft"
    if "kind" in summary:
        return "rm"
    if "mode" in summary:
        return "dpo"
    if "iters" in summary:
        return "ppo"
    if "samples_per_prompt" in summary:
        return "grpo"
    return "other"


def get(d, name):
    """A held-out score from a start/final dict: "eval/<name>", or the bare name (SFT's keys); GRPO's pass
    rate is its pass@1."""
    d = d or {}
    for key in (f"eval/{name}", name) + (("eval/pass@1",) if name == "pass" else ()):
        if d.get(key) is not None:
            return d[key]
    return None


def method_of(name, run):
    s, kind = run["summary"], kind_of(run["summary"])
    if kind == "dpo":
        label = {"offline": s.get("loss", "dpo").upper(), "online": f"online {s.get('loss', 'dpo').upper()}",
                 "spin": "SPIN"}.get(s["mode"], s["mode"])
        return label + (f", judge {s['judge']}" if s.get("judge") else "")
    if kind == "rm":
        return f"{s['kind']} reward model"
    return {"sft": "SFT", "ppo": "PPO", "grpo": "GRPO"}.get(kind, name)


def eval_points(run):
    """The (KL to the start policy, held-out gold) points of a policy run, the start first (KL 0). Every stage
    that logs eval/kl: its evaluations; a PPO run written before its evaluation measured a KL: each evaluation's
    gold at the KL of the rollouts of that iteration."""
    s, kind = run["summary"], kind_of(run["summary"])
    start = get(s.get("start"), "gold")
    pts = [(0.0, start)] if start is not None else []
    for row in run["metrics"]:
        g = row.get("eval/gold")
        kl = row.get("eval/kl", row.get("kl") if kind == "ppo" else None)
        if g is not None and kl is not None:
            pts.append((kl, g))
    return pts if len(pts) > 1 else []


def final_kl(run):
    s = run["summary"]
    if get(s.get("final"), "kl") is not None:
        return get(s.get("final"), "kl")
    return (s.get("last_iter") or {}).get("kl")  # PPO: the last iteration's rollouts


def proxy_series(run):
    """(what, [values in training order], [lengths or None]) of the score a run optimised, measured on its
    own samples: PPO's judge score of the rollouts, GRPO's reward, online DPO's judge score per round."""
    s, kind, rows = run["summary"], kind_of(run["summary"]), run["metrics"]
    if kind == "ppo":
        rows = [r for r in rows if r.get("rm") is not None]
        return "judge score of the rollouts", [r["rm"] for r in rows], [r.get("len") for r in rows]
    if kind == "grpo":
        rows = [r for r in rows if r.get("reward") is not None]
        return "reward of the rollouts", [r["reward"] for r in rows], [r.get("len_mean") for r in rows]
    if kind == "dpo" and s.get("mode") == "online":
        rounds = [r for r in s.get("rounds") or [] if r.get("round/judge_mean") is not None]
        return f"judge ({s.get('judge')}) score per round", [r["round/judge_mean"] for r in rounds], None
    return None, [], None


def ends(values, k=5):
    """Means of the first and the last k values (k at most half of them): one rollout batch is noisy."""
    k = max(1, min(k, len(values) // 2))
    return sum(values[:k]) / k, sum(values[-k:]) / k


def gate(run, limit):
    """The release gate of a run with a proxy and a gold score: {what, proxy: (start, end), gold_delta,
    length_delta, ship, reasons}, or None. Gold and length: held-out, start vs final; where a stage's held-out
    evaluation has no length (GRPO), the rollouts' length, first vs last steps."""
    what, proxy, lengths = proxy_series(run)
    s = run["summary"]
    g0, g1 = get(s.get("start"), "gold"), get(s.get("final"), "gold")
    if len(proxy) < 2 or g0 is None or g1 is None:
        return None
    l0, l1 = get(s.get("start"), "length"), get(s.get("final"), "length")
    if (l0 is None or l1 is None) and lengths and None not in lengths:
        l0, l1 = ends(lengths)
    if l0 is None or l1 is None:
        return None
    p0, p1 = ends(proxy)
    ship, reasons = release_gate(p1 - p0, g1 - g0, l1 - l0, max_length_delta=limit)
    return {"what": what, "proxy": (p0, p1), "gold_delta": g1 - g0, "length_delta": l1 - l0, "ship": ship,
            "reasons": reasons}


# -------------------------------------------------------------------------- markdown
def f(x, spec=".3f"):
    return "" if x is None else format(x, spec)


def arrow(a, b, spec=".3f"):
    if a is None and b is None:
        return ""
    return f"{f(a, spec)} → {f(b, spec)}" if a is not None else f(b, spec)


def table(header, rows, left=(0,)):
    """A markdown table; the columns numbered in `left` (names, text) are left-aligned, the rest (numbers) right."""
    if not rows:
        return []
    rule = ["---" if i in left else "---:" for i in range(len(header))]
    return ["| " + " | ".join(cells) + " |" for cells in [header, rule] + [[str(c) for c in r] for r in rows]] + [""]


def duration(s):
    if s is None:
        return ""
    return f"{int(s // 60)} min {int(round(s % 60))} s" if s >= 60 else f"{s:.0f} s"


def markdown(out_dir, runs, bon, times, figures, limit):
    policies = {n: r for n, r in runs.items() if kind_of(r["summary"]) in ("sft", "dpo", "ppo", "grpo")}
    rms = {n: r for n, r in runs.items() if kind_of(r["summary"]) == "rm"}
    lines = [f"# nanoalign report: {out_dir}", "",
             "Written by `python report.py` from each stage's summary.json and metrics.jsonl. Held-out numbers are "
             "each stage's own evaluation (its start is the policy it began from), so the start's gold differs a "
             "little between stages; exact values depend on the machine's floating-point kernels.", ""]
    if not runs and bon is None:
        return lines + ["No stage has finished yet: nothing to report (run `python pipeline.py`).", ""]
    if times:
        total = sum(t["wall_s"] for t in times.values() if t.get("wall_s") is not None)
        lines += [f"Pipeline wall time (the stages run by pipeline.py, as recorded in pipeline.json): "
                  f"{duration(total)}.", ""]

    def time_of(name, run):
        t = (times or {}).get(name, {}).get("wall_s")
        return duration(t) if t is not None else f"{duration(run['summary'].get('elapsed_s'))} (training)"

    lines += ["## Results at a glance", ""]
    rows = []
    for n, r in policies.items():
        s = r["summary"]
        st, fi = s.get("start"), s.get("final")
        win = get(fi, "win_rate")
        rows.append([f"`{n}`", method_of(n, r), arrow(get(st, "gold"), get(fi, "gold")),
                     arrow(*(None if v is None else 100 * v for v in (get(st, "pass"), get(fi, "pass"))), ".1f"),
                     f(final_kl(r), ".2f"), arrow(get(st, "length"), get(fi, "length"), ".1f"),
                     "" if win is None else f"{100 * win:.1f}%", time_of(n, r)])
    lines += table(["run", "method", "held-out gold", "pass (%)", "KL", "length (tokens)", "win rate vs start",
                    "time"], rows, left=(0, 1))
    if policies:
        lines += ["KL: nats per response to the start policy on the held-out samples (the k1 estimate; a PPO run "
                  "without eval/kl: the last iteration's rollouts); empty where the stage does not measure it. Win "
                  "rate: gold of one policy sample against one start-policy sample per prompt, ties half.", ""]

    extra = []
    for n, r in policies.items():
        st, fi = r["summary"].get("start"), r["summary"].get("final")
        cells = [arrow(get(st, k), get(fi, k)) for k, _ in EXTRA]
        if any(cells):
            extra.append([f"`{n}`"] + cells)
    if extra:
        lines += ["### Diversity, entropy and the alignment tax", ""]
        lines += table(["run"] + [label for _, label in EXTRA], extra)
        lines += ["distinct-n: unique n-grams / all n-grams over the held-out samples; demo NLL: mean NLL per token "
                  "of held-out SFT demonstrations, which no alignment stage trains on (its rise is the tax); judge: "
                  "the mean score of the run's learned judge (its reward model) and its win rate against the start.",
                  ""]

    gates = [(n, gate(r, limit)) for n, r in policies.items()]
    gates = [(n, g) for n, g in gates if g]
    if gates:
        lines += ["## Release gate", "",
                  f"`evals.release_gate`: a run ships iff held-out gold rose and the mean length moved by at most "
                  f"{limit} tokens; the proxy is the score the run optimised, on its own samples: its mean over the "
                  "first and over the last 5 iterations or steps (online DPO: rounds; fewer when a run has fewer "
                  "than 10).",
                  ""]
        lines += table(["run", "proxy", "proxy start → end", "Δ gold", "Δ length", "ship?", "why not"],
                       [[f"`{n}`", g["what"], arrow(*g["proxy"]), f(g["gold_delta"], "+.3f"),
                         f(g["length_delta"], "+.1f"), "yes" if g["ship"] else "**no**", "; ".join(g["reasons"])]
                        for n, g in gates], left=(0, 1, 5, 6))

    if rms:
        lines += ["## Reward models", ""]
        rows = []
        for n, r in rms.items():
            fi, base = r["summary"].get("final") or {}, r["summary"].get("baseline") or {}
            pct = lambda v: "" if v is None else f"{100 * v:.1f}%"
            rows.append([f"`{n}`", r["summary"]["kind"], pct(fi.get("eval/acc_labels")), pct(fi.get("eval/acc_gold")),
                         pct(fi.get("eval/step_acc")), pct(base.get("loglik/acc_gold")),
                         pct(fi.get("eval/label_gold_agreement")), time_of(n, r)])
        lines += table(["run", "kind", "acc. vs labels", "acc. vs gold", "step acc.", "SFT log-likelihood vs gold",
                        "labels vs gold", "time"], rows, left=(0, 1))
        lines += ["Held-out pairs; against gold on the pairs whose gold scores differ. The SFT log-likelihood "
                  "column is the untrained baseline a reward model must beat.", ""]

    if bon:
        ns = sorted({int(k) for row in bon["table"].values() for k in row})
        lines += ["## Best-of-N", "", "Gold score (pass rate) of the response each judge keeps among N samples "
                  "of the start policy; KL is the analytic log N - (N-1)/N.", ""]
        rows = [[judge] + [f"{row[str(k)]['gold']:.3f} ({100 * row[str(k)]['pass']:.0f}%)" if str(k) in row else ""
                           for k in ns] for judge, row in bon["table"].items()]
        rows.append(["KL (nats)"] + [f"{best_of_n_kl_bound(k):.2f}" for k in ns])
        lines += table(["judge"] + [f"N={k}" for k in ns], rows)

    online = {n: r for n, r in policies.items() if r["summary"].get("rounds")}
    for n, r in online.items():
        lines += [f"### Online rounds: `{n}`", ""]
        lines += table(["round", "pairs", "tied", "judge mean", "samples' gold", "EOS"],
                       [[x.get("round"), x.get("round/pairs"), f(x.get("round/tied_frac"), ".2f"),
                         f(x.get("round/judge_mean")), f(x.get("round/gold_mean")), f(x.get("round/eos_frac"), ".2f")]
                        for x in r["summary"]["rounds"]])

    others = [n for n, r in runs.items() if kind_of(r["summary"]) == "other"]
    if others:
        lines += ["Other runs with a summary.json (not tabled): " + ", ".join(f"`{n}`" for n in others), ""]
    if figures:
        lines += ["## Figures", ""] + [f"![{t}](figures/{os.path.basename(p)})\n" for p, t in figures]
    elif figures is None:
        lines += ["(No figures: matplotlib is not installed; `pip install matplotlib` and rerun `python report.py`.)",
                  ""]
    return lines


# -------------------------------------------------------------------------- figures
def moving_mean(x, k=5):
    return [sum(x[max(0, i - k + 1):i + 1]) / len(x[max(0, i - k + 1):i + 1]) for i in range(len(x))]


def kl_axis(ax, kls, to):
    """KL on a symlog x axis, linear below 1 nat and log above: the runs that stay near their start and the
    one that runs away to 16 nats are all readable on one axis. Plain-number ticks."""
    ax.set_xscale("symlog", linthresh=1.0)
    top = max(kls + [1.0])
    ticks = [t for t in (0, 0.25, 0.5, 0.75, 1, 2, 5, 10, 20, 50, 100, 200) if t <= 1.5 * top]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_xlabel(f"KL to the {to} (nats per response; linear below 1, log above)")


def figures(out_dir, runs, bon):
    """PNG figures in <out_dir>/figures/; -> [(path, title)], or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig_dir = os.path.join(out_dir, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    made = []

    def save(fig, name, title):
        path = os.path.join(fig_dir, name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append((path, title))

    policies = {n: r for n, r in runs.items() if kind_of(r["summary"]) in ("sft", "dpo", "ppo", "grpo")}
    # 1) the gold-vs-KL frontier
    frontier = {n: eval_points(r) for n, r in policies.items()}
    frontier = {n: p for n, p in frontier.items() if p}
    if frontier or bon:
        fig, ax = plt.subplots(figsize=(8, 5))
        for i, (n, pts) in enumerate(frontier.items()):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=f"C{i % 10}", ms=4,
                    label=f"{n} ({method_of(n, policies[n])})")
        for j, (judge, row) in enumerate((bon or {}).get("table", {}).items()):
            ns = sorted(int(k) for k in row)
            ax.plot([best_of_n_kl_bound(k) for k in ns], [row[str(k)]["gold"] for k in ns], "s--", ms=4,
                    color=f"C{(len(frontier) + j) % 10}", alpha=0.8, label=f"best-of-N, {judge} (N={ns[0]}..{ns[-1]})")
        kl_axis(ax, [p[0] for pts in frontier.values() for p in pts] + [best_of_n_kl_bound(16)], "start policy")
        ax.set_ylabel("held-out gold score")
        ax.set_title("Gold vs KL: every method's evaluations (best-of-N at log N - (N-1)/N)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        save(fig, "frontier.png", "gold-vs-KL frontier")
    # 2) PPO: judge score and gold against KL
    ppo = {n: r for n, r in runs.items() if r["curves"]}
    if ppo:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        for i, (n, r) in enumerate(ppo.items()):
            kl = [c["kl"] for c in r["curves"]]
            for ax, key in ((a1, "rm"), (a2, "gold")):
                y = [c[key] for c in r["curves"]]
                ax.plot(kl, y, ".", color=f"C{i}", alpha=0.3)
                ax.plot(moving_mean(kl), moving_mean(y), "-", color=f"C{i}", label=n)
        a1.set_ylabel("judge score of the rollouts (normalised)")
        a2.set_ylabel("gold score of the same rollouts")
        for ax in (a1, a2):
            kl_axis(ax, [c["kl"] for r in ppo.values() for c in r["curves"]], "reference")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        a1.set_title("what PPO optimises")
        a2.set_title("what it gets (dots: iterations; lines: 5-iteration means)")
        save(fig, "ppo_overoptimisation.png", "PPO: judge score and gold against KL")
    # 3) reward models and best-of-N
    rms = {n: r for n, r in runs.items() if kind_of(r["summary"]) == "rm"}
    if rms or bon:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        names = list(rms)
        bars = [("eval/acc_labels", "vs labels", "final"), ("eval/acc_gold", "vs gold", "final"),
                ("loglik/acc_gold", "SFT log-likelihood vs gold (untrained)", "baseline")]
        w = 0.8 / len(bars)
        for j, (key, label, part) in enumerate(bars):
            vals = [(rms[n]["summary"].get(part) or {}).get(key) for n in names]
            bar = a1.bar([i + (j - 1) * w for i in range(len(names))], [100 * (v or 0) for v in vals], w, label=label)
            a1.bar_label(bar, fmt="%.0f", fontsize=7)
        a1.axhline(50, color="gray", lw=0.8, ls=":")
        a1.set_xticks(range(len(names)), names)
        a1.set_ylabel("held-out pair accuracy (%)")
        a1.set_ylim(0, 125)  # room for the legend above the bars
        a1.set_yticks(range(0, 101, 20))
        a1.set_title("reward models (dotted: chance)")
        a1.legend(fontsize=7, loc="upper center", ncol=2)
        for j, (judge, row) in enumerate((bon or {}).get("table", {}).items()):
            ns = sorted(int(k) for k in row)
            a2.plot(ns, [row[str(k)]["gold"] for k in ns], "o-", label=judge)
        a2.set_xscale("log", base=2)
        if bon:
            ns = sorted({int(k) for row in bon["table"].values() for k in row})
            a2.set_xticks(ns, [str(k) for k in ns])
        a2.set_xlabel("N (samples per prompt)")
        a2.set_ylabel("gold score of the kept response")
        a2.set_title("best-of-N per judge")
        a2.grid(alpha=0.3)
        if bon:
            a2.legend(fontsize=8)
        save(fig, "reward_models.png", "reward models and best-of-N")
    # 4) training curves, one panel per run: the training signal (left axis) and held-out scores (right)
    panels = {"sft": (["loss", "val_loss"], "loss (nats per token)", ["gold"], "held-out gold"),
              "rm": (["loss"], "loss", ["eval/acc_labels", "eval/acc_gold"], "held-out accuracy"),
              "dpo": (["loss"], "loss", ["eval/win_rate", "eval/gold"], "held-out win rate, gold"),
              "ppo": (["rm"], "judge score (rollouts)", ["gold", "eval/gold"], "gold (rollouts, held-out)"),
              "grpo": (["reward"], "reward (rollouts)", ["eval/pass@1", "eval/gold"], "held-out pass@1, gold")}
    curves = {n: r for n, r in runs.items() if kind_of(r["summary"]) in panels and r["metrics"]}
    if curves:
        cols = min(3, len(curves))
        rows = math.ceil(len(curves) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.3 * rows), squeeze=False)
        for ax, (n, r) in zip(axes.flat, curves.items()):
            left, left_label, right, right_label = panels[kind_of(r["summary"])]
            ax2 = ax.twinx()
            handles = []
            for keys, a in ((left, ax), (right, ax2)):
                for key in keys:
                    pts = [(row.get("step", row.get("iter")), row[key]) for row in r["metrics"]
                           if row.get(key) is not None and row.get("step", row.get("iter")) is not None]
                    if pts:  # a logged series as a line, a few evaluations as dots
                        style = "-" if len(pts) > 20 else "o--"
                        handles += a.plot([p[0] for p in pts], [p[1] for p in pts], style, color=f"C{len(handles)}",
                                          ms=3, label=key + (" (right)" if a is ax2 else ""))
            ax.set_title(f"{n}: {method_of(n, r)}", fontsize=9)
            ax.set_xlabel("iteration" if kind_of(r["summary"]) == "ppo" else "step")
            ax.set_ylabel(left_label)
            ax2.set_ylabel(right_label)
            ax.grid(alpha=0.3)
            if handles:  # on the twin axes, which are drawn over the first
                ax2.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="best")
        for ax in list(axes.flat)[len(curves):]:
            ax.axis("off")
        save(fig, "training_curves.png", "training curves")
    return made


def write_report(out_dir, limit=20):
    """Reads out_dir, writes out_dir/report.md (and the figures). -> the report's path."""
    runs = read_runs(out_dir)
    bon = read_json(os.path.join(out_dir, "best_of_n.json"))
    times = read_json(os.path.join(out_dir, "pipeline.json"))
    os.makedirs(out_dir, exist_ok=True)
    figs = figures(out_dir, runs, bon)
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as fh:
        fh.write("\n".join(markdown(out_dir, runs, bon, times, figs, limit)))
    return path


if __name__ == "__main__":
    from nanoalign.utils import configure
    configure(globals())
    print(f"wrote {write_report(out, max_length_delta)}")
