"""The wheel: built from the tree, installed in a fresh virtual environment,
run from outside the source tree (so only what the wheel ships is used)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.host
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_installs_and_runs_outside_the_tree(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), ROOT],
        check=True, cwd=tmp_path,
    )
    for leftover in ("build", "caffe_ft.egg-info"):
        shutil.rmtree(os.path.join(ROOT, leftover), ignore_errors=True)
    (wheel,) = glob.glob(str(wheels / "caffe_ft-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", wheel]
    subprocess.run(pip, check=True, cwd=tmp_path)
    cli = str(venv / "bin" / "caffe-ft")
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(os.path.join(ROOT, "examples", "digits", "train_val.prototxt"), work / "net.prototxt")

    def run(*args):
        return subprocess.run([cli, *args], cwd=work, capture_output=True, text=True, check=False)

    version = run("--version")
    assert version.returncode == 0 and version.stdout.startswith("caffe-ft, version ")
    formatted = run("fmt", "net.prototxt")
    assert formatted.returncode == 0 and "name: \"DigitsNet\"" in formatted.stdout
    inspected = run("inspect", "net.prototxt")
    assert "classifier head(s): fc2" in inspected.stdout
    found = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import caffe_ft.formats.schema as s; print(s.default_proto_path())"],
        cwd=work, capture_output=True, text=True, check=True,
    ).stdout
    assert found.startswith(str(venv))  # the schema shipped in the wheel, not the checkout's
