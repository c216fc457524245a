"""The console script: the plainest read-only command lines run without click,
and print, fail and exit exactly as the click command line does."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from caffe_ft.commands import run_plain

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(os.path.dirname(HERE), "examples", "digits")
FUZZ = os.path.join(HERE, "fuzz_cases")


def _run(module: str, args, cwd) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS``: stdout and stderr as bytes, the exit status."""
    env = {name: value for name, value in os.environ.items() if name != "CAFFE_FT_PROTO"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True)


@pytest.fixture
def files(tmp_path):
    shutil.copy(os.path.join(EXAMPLE, "train_val.prototxt"), tmp_path / "a.prototxt")
    text = (tmp_path / "a.prototxt").read_text()
    (tmp_path / "b.prototxt").write_text(text.replace("num_output: 10", "num_output: 7", 1))
    assert (tmp_path / "b.prototxt").read_text() != text
    (tmp_path / "bad.prototxt").write_text('layer { name: "x" type: "ReLU" bogus: 1 }\n')
    shutil.copy(os.path.join(FUZZ, "comment-latin1.prototxt"), tmp_path / "latin1.prototxt")
    shutil.copy(os.path.join(FUZZ, "names-not-utf8.caffemodel"), tmp_path / "m.caffemodel")
    return tmp_path


@pytest.mark.parametrize("args", [
    ["fmt", "a.prototxt"], ["fmt", "latin1.prototxt"], ["inspect", "a.prototxt"], ["inspect", "m.caffemodel"],
    ["diff", "a.prototxt", "a.prototxt"], ["diff", "a.prototxt", "b.prototxt"],
    ["fmt", "bad.prototxt"], ["inspect", "missing.prototxt"], ["diff", "a.prototxt", "bad.prototxt"],
])
def test_plain_command_lines_match_the_click_command_line(files, args):
    """Same stdout bytes, stderr and exit status through the console script and through click;
    the errors come from click's path (the plain run gives up on them)."""
    plain, click = _run("caffe_ft.console", args, files), _run("caffe_ft.cli", args, files)
    assert (plain.returncode, plain.stdout, plain.stderr) == (click.returncode, click.stdout, click.stderr)
    assert plain.returncode == (2 if "bad" in " ".join(args) or "missing" in " ".join(args) else 1 if "b.prototxt" in args else 0)


def test_plain_command_lines_do_not_import_click(files, monkeypatch, capsys):
    """The point of it: neither click nor the cli module is imported (checked in a
    fresh interpreter); anything else is left to click."""
    probe = ("import sys; from caffe_ft.commands import run_plain; code = run_plain(sys.argv[1:]); "
             "print(code, 'click' in sys.modules, 'caffe_ft.cli' in sys.modules, file=sys.stderr)")
    for args, expected in ((["fmt", "a.prototxt"], "0 False False"), (["diff", "a.prototxt", "b.prototxt"],
                           "1 False False"), (["inspect", "m.caffemodel"], "0 False False")):
        done = subprocess.run([sys.executable, "-c", probe, *args], cwd=files, capture_output=True, text=True)
        assert done.stderr.strip().splitlines()[-1] == expected, done.stderr
    monkeypatch.chdir(files)
    for args in (["fmt", "--check", "a.prototxt"], ["fmt", "a.prototxt", "b.prototxt"], ["inspect", "-h"],
                 ["diff", "a.prototxt"], ["inspect", "a.prototxt", "--json"], ["check", "a.prototxt"], [],
                 ["fmt", "bad.prototxt"], ["fmt", "-"]):
        assert run_plain(args) is None, args
    assert capsys.readouterr().out == ""  # a plain run that gives up has printed nothing
