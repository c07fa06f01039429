"""Shared fixtures."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def sft_ckpt(tmp_path_factory):
    """A tiny SFT checkpoint (1 layer, 3 steps) for the later stages' end-to-end tests."""
    out = tmp_path_factory.mktemp("sft")
    r = subprocess.run([sys.executable, "train_sft.py", f"--out_dir={out}", "--n_layer=1", "--n_head=2",
                        "--n_embd=32", "--batch_size=8", "--n_train=200", "--n_eval=8", "--max_steps=3",
                        "--eval_interval=1000", "--device=cpu"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return str(out / "ckpt.pt")
