"""The README's main job: examples/digits/demo.py, run for real (small)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.caffe
DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "digits", "demo.py")


def test_demo_pretrains_finetunes_and_compares(tmp_path):
    done = subprocess.run([sys.executable, DEMO, "--outdir", str(tmp_path), "--per-class", "20", "--iters", "100"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = dict(re.findall(r"^(pretraining on 0-4|fine-tune: \S+|from scratch)\s.*?\s(\d\.\d{3})\s", done.stdout, re.M))
    assert set(rows) == {"pretraining on 0-4", "fine-tune: last-fc", "fine-tune: top", "fine-tune: full",
                         "from scratch"}
    assert float(rows["pretraining on 0-4"]) > 0.9  # a real, learnable task
    assert all(float(value) > 0.4 for value in rows.values())  # every run learned (chance is 0.2)
    for strategy in ("last-fc", "top", "full"):
        folder = tmp_path / f"finetune-{strategy}"
        for name in ("train_val.prototxt", "deploy.prototxt", "solver.prototxt", "init.caffemodel",
                     "final.caffemodel", "metrics.jsonl", "plot.png", "summary.md", "report.html",
                     "report.json"):
            assert (folder / name).exists(), (strategy, name)
        assert "final accuracy" in (folder / "summary.md").read_text()
