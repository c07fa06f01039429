"""bench.py runs each step in its own process and prints one table row per (step, implementation)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_smoke():
    r = subprocess.run([sys.executable, "bench.py", "--preset=test", "--iters=1", "--warmup=0", "--device=cpu",
                        "--steps=sft,sample", "--impl=before,now", "--batch=2", "--prompt_len=4",
                        "--resp_len=4"], cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in r.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [(c[0].strip(), c[1].strip()) for c in rows] == [("sft", "before"), ("sft", "now"), ("sample", "before"),
                                                            ("sample", "now")]
    assert rows[1][-1].strip().endswith("x") and all(float(c[2]) > 0 for c in rows)  # now's ratio to before
