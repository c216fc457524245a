"""Golden cases for `caffe-ft rewrite`.

Each directory of tests/golden/rewrite holds the inputs of one rewrite
(``train_val.prototxt`` or ``deploy.prototxt``, maybe ``solver.prototxt`` and
data lists), its options (``args``) and the files it must write
(``expected/``).  Every case is also rewritten a second time, from its own
output with the same options, which must change nothing; and the textual diff
between input and output may only hold lines that carry a change.

To (re)generate after an intended change: ``CAFFE_FT_GOLDEN=update pytest
tests/test_rewrite_golden.py``, then review ``git diff tests/golden``.
"""

from __future__ import annotations

import difflib
import os
import shlex
import shutil

import pytest

from caffe_ft.formats import files, prototext
from caffe_ft.cli import main
from caffe_ft.formats.schema import load_schema
from conftest import cli_runner

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "rewrite")
CASES = sorted(os.listdir(GOLDEN))
OUTPUTS = ("train_val.prototxt", "deploy.prototxt", "solver.prototxt", "summary.md")


def _net_input(case_dir: str) -> str:
    return "deploy.prototxt" if os.path.exists(os.path.join(case_dir, "deploy.prototxt")) else "train_val.prototxt"


def _rewrite(workdir: str, net: str, solver: str, args: list, outdir: str, *extra: str):
    command = ["rewrite", net, *args, "-o", outdir, *extra]
    if solver:
        command += ["--solver", solver]
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        return cli_runner().invoke(main, command, catch_exceptions=False)
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("case", CASES)
def test_golden_rewrite(case, tmp_path):
    source = os.path.join(GOLDEN, case)
    work = tmp_path / case
    shutil.copytree(source, work, ignore=shutil.ignore_patterns("expected"))
    args = shlex.split(open(os.path.join(source, "args")).read())
    net = _net_input(source)
    solver = "solver.prototxt" if os.path.exists(work / "solver.prototxt") else ""
    result = _rewrite(str(work), net, solver, args, "out")
    assert result.exit_code == 0, result.stderr
    out = work / "out"
    expected_dir = os.path.join(source, "expected")
    written = sorted(os.listdir(out))
    if os.environ.get("CAFFE_FT_GOLDEN") == "update":
        shutil.rmtree(expected_dir, ignore_errors=True)
        shutil.copytree(out, expected_dir)
    assert written == sorted(os.listdir(expected_dir))
    for name in written:
        with open(os.path.join(expected_dir, name), encoding="utf-8") as handle:
            assert (out / name).read_text() == handle.read(), name

    # Every written prototxt parses and is what its message prints, comments aside.
    schema = load_schema()
    for name in written:
        if name.endswith(".prototxt"):
            parsed = files.load_text(str(out / name), schema)
            assert parsed.message.ListFields()

    # The diff against the input holds only changed lines: no line of the input
    # that carries no change moved or changed.
    before = (work / net).read_text().splitlines()
    edited = out / ("deploy.prototxt" if net == "deploy.prototxt" else "train_val.prototxt")
    after = edited.read_text().splitlines()
    changed = [line for line in difflib.ndiff(before, after) if line[:2] in ("- ", "+ ")]
    removed = [line[2:] for line in changed if line.startswith("- ")]
    old_tree = prototext.parse((work / net).read_bytes())
    new_message = files.load_text(str(edited), schema).message
    kept_lines = prototext.render_minimal(old_tree, (work / net).read_bytes(), new_message)
    assert kept_lines == edited.read_text()
    assert len(removed) <= len(before) // 2

    # A second run on its own output (a copy: an input is never overwritten),
    # with the same options, changes nothing.
    snapshot = {name: (out / name).read_bytes() for name in written}
    refused = _rewrite(str(work), f"out/{net}", "", args, "out", "--force")
    assert refused.exit_code == 2 and "names an input" in refused.stderr
    assert {name: (out / name).read_bytes() for name in written} == snapshot
    shutil.copytree(out, work / "prev")
    result = _rewrite(str(work), f"prev/{net}", "prev/solver.prototxt" if solver else "", args, "out", "--force")
    assert result.exit_code == 0, result.stderr
    for name in written:
        if name != "summary.md":  # the account of the second run says nothing changed
            assert (out / name).read_bytes() == snapshot[name], f"second run changed {name}"
