"""The README's main job: examples/digits/demo.py, run for real (small)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.caffe
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "examples", "digits", "demo.py")


def test_demo_pretrains_finetunes_and_compares(tmp_path, monkeypatch):
    demo_dir = tmp_path / "demo-digits"
    done = subprocess.run([sys.executable, DEMO, "--outdir", str(demo_dir), "--per-class", "20", "--iters", "100"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = dict(re.findall(r"^(pretraining on 0-4|fine-tune: \S+|from scratch)\s.*?\s(\d\.\d{3})\s", done.stdout, re.M))
    assert set(rows) == {"pretraining on 0-4", "fine-tune: last-fc", "fine-tune: top", "fine-tune: full",
                         "from scratch"}
    assert float(rows["pretraining on 0-4"]) > 0.9  # a real, learnable task
    assert all(float(value) > 0.4 for value in rows.values())  # every run learned (chance is 0.2)
    for strategy in ("last-fc", "top", "full"):
        folder = demo_dir / f"finetune-{strategy}"
        for name in ("train_val.prototxt", "deploy.prototxt", "solver.prototxt", "init.caffemodel",
                     "final.caffemodel", "metrics.jsonl", "plot.png", "summary.md", "report.html",
                     "report.json"):
            assert (folder / name).exists(), (strategy, name)
        assert "final accuracy" in (folder / "summary.md").read_text()

    # The README's "Use from Python" example fine-tunes the demo's net without click.
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    section = readme.split("## Use from Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    os.symlink(os.path.join(REPO, "examples"), tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    from caffe_ft.recipe.job import last_test_outputs

    assert (demo_dir / "from-python" / "final.caffemodel").exists()
    assert last_test_outputs(str(demo_dir / "from-python" / "metrics.jsonl"))["accuracy"] > 0.4
