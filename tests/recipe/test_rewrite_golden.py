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
import gc
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


def _fill_sources(net, workdir: str, classes: int) -> None:
    """Write the image lists (and LMDBs, through Caffe's convert_imageset) that
    ``net``'s data layers read, with generated images and labels 0..classes-1."""
    import subprocess

    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    for layer in net.layer:
        if layer.type == "ImageData":
            source, param = layer.image_data_param.source, layer.image_data_param
        elif layer.type == "Data":
            source, param = layer.data_param.source, layer.data_param
        else:
            continue
        size = max(36, layer.transform_param.crop_size)
        colour = layer.type == "Data" or layer.image_data_param.is_color
        names = []
        for index in range(max(2 * param.batch_size, 4)):
            name = f"img/{source.replace('/', '_')}_{index}.png"
            os.makedirs(os.path.join(workdir, "img"), exist_ok=True)
            pixels = rng.integers(0, 256, (size, size, 3) if colour else (size, size), dtype=np.uint8)
            cv2.imwrite(os.path.join(workdir, name), pixels)
            names.append(f"{name} {index % classes}")
        listing = os.path.join(workdir, source if layer.type == "ImageData" else source + ".txt")
        with open(listing, "w") as handle:
            handle.write("\n".join(names) + "\n")
        if layer.type == "Data":
            subprocess.run(["convert_imageset", workdir + "/", listing, os.path.join(workdir, source)],
                           check=True, capture_output=True)


@pytest.mark.caffe
@pytest.mark.parametrize("case", CASES)
def test_golden_outputs_load_and_train_in_caffe(case, tmp_path):
    """Real Caffe reads every golden output: the deploy net runs forward, and two
    SGD steps of the train_val net change exactly the blobs with a nonzero lr_mult."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    import caffe
    import numpy as np

    caffe.set_mode_cpu()
    expected = os.path.join(GOLDEN, case, "expected")
    args = shlex.split(open(os.path.join(GOLDEN, case, "args")).read())
    classes = int(args[args.index("--num-classes") + 1])
    shutil.copytree(expected, tmp_path, dirs_exist_ok=True)

    deploy = caffe.Net(str(tmp_path / "deploy.prototxt"), caffe.TEST)
    for name in deploy.inputs:
        deploy.blobs[name].data[...] = np.random.default_rng(1).normal(size=deploy.blobs[name].data.shape)
    outputs = deploy.forward()
    assert all(np.isfinite(value).all() for value in outputs.values())

    schema = load_schema()
    train_val = files.load_net(str(tmp_path / "train_val.prototxt"), schema)
    _fill_sources(train_val, str(tmp_path), classes)
    solver = schema.new("SolverParameter")
    if os.path.exists(tmp_path / "solver.prototxt"):
        solver.CopyFrom(files.load_text(str(tmp_path / "solver.prototxt"), schema).message)
        solver.ClearField("test_iter")
        solver.ClearField("test_interval")
    else:
        solver.base_lr, solver.lr_policy, solver.momentum = 0.01, "fixed", 0.9
    solver.net = "train_val.prototxt"
    solver.max_iter, solver.snapshot, solver.display = 2, 0, 0
    solver.ClearField("snapshot_prefix")
    solver.solver_mode = solver.CPU
    (tmp_path / "run_solver.prototxt").write_text(prototext.print_message(solver))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        sgd = caffe.get_solver("run_solver.prototxt")
        rng = np.random.default_rng(2)  # weights that let gradients reach every layer (fillers may be 0)
        for name, blobs in sgd.net.params.items():
            if sgd.net.layer_dict[name].type != "BatchNorm":
                for blob in blobs:
                    blob.data[...] = rng.normal(0, 0.1, blob.data.shape)
        before = {name: [blob.data.copy() for blob in blobs] for name, blobs in sgd.net.params.items()}
        sgd.step(2)
        after = {name: [blob.data.copy() for blob in blobs] for name, blobs in sgd.net.params.items()}
        # Caffe's data layers read images ahead in a thread, from the working directory:
        # the solver goes before the directory changes back.
        del sgd
        gc.collect()
    finally:
        os.chdir(cwd)
    layers = {layer.name: layer for layer in train_val.layer}
    for name, blobs in after.items():
        params = layers[name].param
        for index, blob in enumerate(blobs):
            lr_mult = params[index].lr_mult if index < len(params) else 1.0
            if layers[name].type == "BatchNorm":
                continue  # its statistics move whatever lr_mult says, unless use_global_stats
            moved = not np.array_equal(blob, before[name][index])
            assert moved == (lr_mult != 0), f"{case}: {name} blob {index} (lr_mult {lr_mult}) moved={moved}"
