"""The command line: output, exit codes, one-line errors, nothing half-written."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from caffe_ft.cli import main
from conftest import cli_runner
from ft_nets import LMDB_TRAIN_VAL

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLE = os.path.join(os.path.dirname(HERE), "examples", "digits")


def run(*args: str):
    result = cli_runner().invoke(main, list(args), catch_exceptions=False)
    return result


def stderr_of(result) -> str:
    return result.stderr


@pytest.fixture
def net(tmp_path):
    path = tmp_path / "net.prototxt"
    shutil.copy(os.path.join(EXAMPLE, "train_val.prototxt"), path)
    return path


def test_version_and_help():
    assert run("--version").output.strip().startswith("caffe-ft, version ")
    out = run("--help").output
    for command in ("fmt", "upgrade", "inspect"):
        assert command in out


def test_fmt_prints_canonical_text_and_keeps_comments(net):
    before = net.read_bytes()
    result = run("fmt", str(net))
    assert result.exit_code == 0
    assert net.read_bytes() == before  # never touches the input unasked
    assert "# The classifier: one output per digit class." in result.output
    assert "  param {\n    lr_mult: 2\n  }  # biases learn twice as fast\n" in result.output
    again = net.parent / "again.prototxt"
    again.write_text(result.output)
    assert run("fmt", str(again)).output == result.output  # idempotent


def test_fmt_check_and_in_place(net, tmp_path):
    result = run("fmt", "--check", str(net))
    assert result.exit_code == 1 and f"would reformat {net}" in result.output
    assert run("fmt", "--in-place", str(net)).exit_code == 0
    result = run("fmt", "--check", str(net))
    assert result.exit_code == 0 and result.output == ""
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".caffe-ft-")]


def test_fmt_refuses_many_files_without_a_mode(net):
    result = run("fmt", str(net), str(net))
    assert result.exit_code == 2 and "--check or --in-place" in result.stderr


def test_one_bad_file_means_nothing_is_written(net, tmp_path):
    bad = tmp_path / "bad.prototxt"
    bad.write_text("layer { name: 'x'\n")
    before = net.read_bytes()
    result = run("fmt", "--in-place", str(net), str(bad))
    assert result.exit_code == 2
    assert net.read_bytes() == before


@pytest.mark.parametrize(
    "content, words",
    [
        (b"layer {\n  name: 'x'\n  nmae: 'y'\n}\n", ':3:3: Message type "caffe.LayerParameter" has no field named "nmae"'),
        (b"layer {\n  name: 'x'\n", ':3:1: Expected "}", found end of file.'),
        (b"", ": file is empty"),
        (b"\n\x08CaffeNet\xa2\x06\x00", ": this is a binary file"),
    ],
)
def test_errors_are_one_line_with_location_and_exit_2(tmp_path, content, words):
    path = tmp_path / "in.prototxt"
    path.write_bytes(content)
    for command in (["fmt"], ["upgrade"], ["inspect"]):
        if command != ["fmt"] and b"\xa2" in content:
            continue  # upgrade and inspect read binary files as caffemodels
        result = run(*command, str(path))
        assert result.exit_code == 2, (command, result.output)
        lines = stderr_of(result).strip().splitlines()
        assert len(lines) == 1, lines
        assert lines[0] == f"caffe-ft: error: {path}{words}" or lines[0].startswith(f"caffe-ft: error: {path}{words}")


@pytest.mark.parametrize("compress, name, undo", [("gzip", "gzip", "gunzip"), ("bz2", "bzip2", "bunzip2"),
                                                  ("lzma", "xz", "unxz")])
def test_compressed_files_are_named_as_such(net, tmp_path, compress, name, undo):
    """caffe-doc ships its prototxts gzipped: a compressed net or model is
    called compressed by every reader, not 'binary' or 'not a valid caffemodel'."""
    import importlib

    packed = tmp_path / "train_val.prototxt.z"
    packed.write_bytes(importlib.import_module(compress).compress(net.read_bytes()))
    for command in (["fmt", str(packed)], ["inspect", str(packed)], ["upgrade", str(packed)],
                    ["diff", str(net), str(packed)], ["check", str(net), "--weights", str(packed)]):
        result = run(*command)
        assert result.exit_code == 2, (command, result.output)
        assert stderr_of(result).strip() == (f"caffe-ft: error: {packed}: this file is {name}-compressed; "
                                             f"decompress it first (e.g. with {undo})"), (command, result.output)


def test_missing_file_and_directory(tmp_path):
    result = run("fmt", str(tmp_path / "nope.prototxt"))
    assert result.exit_code == 2 and "nope.prototxt: no such file" in stderr_of(result)
    result = run("inspect", str(tmp_path))
    assert result.exit_code == 2 and "is a directory" in stderr_of(result)


def test_inspect_net_lists_layers_and_head(net):
    result = run("inspect", str(net))
    assert result.exit_code == 0
    assert "classifier head(s): fc2" in result.output
    assert "conv1" in result.output and "1:1/2:1" in result.output
    info = json.loads(run("inspect", "--json", str(net)).output)
    assert info["heads"] == ["fc2"]
    layer = {entry["name"]: entry for entry in info["layers"]}
    assert layer["conv1"]["params"] == [{"lr_mult": 1.0, "decay_mult": 1.0}, {"lr_mult": 2.0, "decay_mult": 1.0}]
    assert layer["accuracy"]["phase"] == "TEST"
    assert layer["relu1"]["learnable"] is False


def test_inspect_solver_shows_defaults():
    info = json.loads(run("inspect", "--json", os.path.join(EXAMPLE, "solver.prototxt")).output)
    settings = {s["name"]: s for s in info["settings"]}
    assert settings["base_lr"] == {"name": "base_lr", "value": "0.01", "default": False}
    assert settings["type"] == {"name": "type", "value": '"SGD"', "default": True}
    assert settings["solver_mode"]["value"] == "CPU"


def test_upgrade_refuses_to_overwrite_input_unless_asked(net):
    result = run("upgrade", str(net), "-o", str(net))
    assert result.exit_code == 2 and "--in-place" in stderr_of(result)


def test_inspect_net_shows_shapes_params_and_costs():
    info = json.loads(run("inspect", "--json", os.path.join(EXAMPLE, "deploy.prototxt")).output)
    layer = {entry["name"]: entry for entry in info["layers"]}
    assert layer["conv1"]["output_shapes"] == [[1, 16, 16, 16]]
    assert layer["conv1"]["param_shapes"] == [[16, 1, 3, 3], [16]]
    assert layer["fc1"]["param_shapes"] == [[64, 512], [64]]  # 32 channels x 4 x 4 after two poolings
    assert layer["fc1"]["flops"] == 64 * 512
    assert info["param_count"] == sum(entry.get("param_count", 0) for entry in info["layers"])
    text = run("inspect", os.path.join(EXAMPLE, "deploy.prototxt")).output
    assert "1x16x16x16" in text and f"{info['param_count']:,} parameters" in text


def test_inspect_asks_for_input_shapes_it_cannot_infer(tmp_path):
    net = tmp_path / "net.prototxt"
    net.write_text('layer { name: "data" type: "Data" top: "data" top: "label" data_param { source: "db" batch_size: 4 } }\n'
                   'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 3 } }\n')
    assert "give --input-shape" in run("inspect", str(net)).output
    info = json.loads(run("inspect", "--json", "--input-shape", "data=4,3,8,8", "--input-shape", "label=4",
                          str(net)).output)
    assert info["layers"][1]["param_shapes"] == [[3, 192], [3]]
    result = run("inspect", "--input-shape", "data=4,x", str(net))
    assert result.exit_code == 2 and "--input-shape" in result.stderr


def test_inspect_mean_file_and_solverstate(schema, tmp_path):
    import numpy as np

    from caffe_ft.formats.caffemodel import Blob, save_blob

    mean = np.zeros((1, 3, 2, 2), dtype=np.float32)
    mean[0, 0], mean[0, 1], mean[0, 2] = 104, 117, 123
    save_blob(Blob.of(mean), str(tmp_path / "mean.binaryproto"))
    info = json.loads(run("inspect", "--json", str(tmp_path / "mean.binaryproto")).output)
    assert info["shape"] == [1, 3, 2, 2] and info["channel_means"] == [104.0, 117.0, 123.0]
    assert "per-channel means: 104, 117, 123" in run("inspect", str(tmp_path / "mean.binaryproto")).output

    state = schema.new("SolverState")
    state.iter, state.learned_net = 300, "snap_iter_300.caffemodel"
    history = state.history.add()
    history.shape.dim.extend([4, 2])
    history.data.extend([0.5] * 8)
    (tmp_path / "snap.solverstate").write_bytes(state.SerializeToString())
    text = run("inspect", str(tmp_path / "snap.solverstate")).output
    assert "iteration 300" in text and "snap_iter_300.caffemodel" in text and "1 blobs, 8 values" in text


def _pretrained(schema, net_path, path, change=None):
    """A caffemodel with weights of the right shapes for ``net_path`` (optionally altered)."""
    import numpy as np

    from caffe_ft.formats import files as cio
    from caffe_ft.formats.caffemodel import Blob, Model, save_model
    from caffe_ft.net.shapes import infer

    net = cio.load_text(net_path, schema).message
    params = infer(net, phase="TEST").params
    if change:
        params = change(params)
    weights = schema.new("NetParameter")
    blobs = []
    for name, shapes in params.items():
        layer = weights.layer.add(name=name, type="InnerProduct")
        blobs.append([Blob.of(np.full(shape, 0.5, dtype=np.float32)) for shape in shapes])
        del layer
    save_model(Model(weights, blobs), str(path))


def test_rewrite_checks_the_weights_it_will_start_from(schema, tmp_path):
    deploy = os.path.join(EXAMPLE, "deploy.prototxt")
    _pretrained(schema, deploy, tmp_path / "w.caffemodel")
    result = run("rewrite", deploy, "--strategy", "last-fc", "--num-classes", "3", "-o", str(tmp_path / "out"),
                 "--weights", str(tmp_path / "w.caffemodel"))
    assert result.exit_code == 0, result.stderr
    assert "Caffe would load these weights" in result.stderr
    assert "fc2_ft" in result.stderr and "fc2 " in result.stderr  # fresh head, ignored old head

    def wrong_conv(params):
        params = dict(params)
        params["conv1"] = [(8, 1, 3, 3), (8,)]
        return params

    _pretrained(schema, deploy, tmp_path / "bad.caffemodel", wrong_conv)
    result = run("rewrite", deploy, "--strategy", "last-fc", "--num-classes", "3", "-o", str(tmp_path / "out2"),
                 "--weights", str(tmp_path / "bad.caffemodel"))
    assert result.exit_code == 2
    assert "Cannot copy param 0 weights from layer 'conv1'" in result.stderr
    assert not (tmp_path / "out2").exists()  # nothing written


def test_finetune_needs_data_and_writes_nothing_without_it(tmp_path):
    deploy = os.path.join(EXAMPLE, "deploy.prototxt")
    result = run("finetune", deploy, "--weights", str(tmp_path / "w.caffemodel"), "--strategy", "last-fc",
                 "--num-classes", "3", "-o", str(tmp_path / "out"))
    assert result.exit_code == 2 and "--train-data" in result.stderr
    assert not (tmp_path / "out").exists()


def test_finetune_names_a_bad_list_from_where_the_user_stands(schema, tmp_path, monkeypatch):
    """OUTDIR's train_val names the list '../train.txt': the error names it as
    the user gave it, and comes before OUTDIR is written."""
    deploy = os.path.join(EXAMPLE, "deploy.prototxt")
    _pretrained(schema, deploy, tmp_path / "w.caffemodel")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.txt").write_text("nope.png 0\nnope.png 1\n")
    (tmp_path / "val.txt").write_text("nope.png 2\n")
    result = run("finetune", deploy, "--weights", "w.caffemodel", "--strategy", "last-fc", "--num-classes", "3",
                 "--train-data", "train.txt", "--val-data", "val.txt", "--max-iter", "1", "-o", "out")
    assert result.exit_code == 2, result.output
    assert stderr_of(result).strip().splitlines()[-1].startswith("caffe-ft: error: train.txt:1: cannot load image")
    assert not (tmp_path / "out").exists()  # refused before anything was written: the retry needs no --force


def test_finetune_refuses_an_outdir_it_would_overwrite_before_reading_weights_or_data(schema, tmp_path, monkeypatch):
    """A written OUTDIR without --force is refused first: the weights check and the data
    pre-flight (here it would refuse the list) take long on a real job."""
    deploy = os.path.join(EXAMPLE, "deploy.prototxt")
    _pretrained(schema, deploy, tmp_path / "w.caffemodel")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.txt").write_text("nope.png 0\nnope.png 1\n")
    (tmp_path / "val.txt").write_text("nope.png 2\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "solver.prototxt").write_text("# an earlier job's\n")
    result = run("finetune", deploy, "--weights", "w.caffemodel", "--strategy", "last-fc", "--num-classes", "3",
                 "--train-data", "train.txt", "--val-data", "val.txt", "--max-iter", "1", "-o", "out")
    assert result.exit_code == 2, result.output
    assert stderr_of(result).strip().splitlines()[-1] == (
        f"caffe-ft: error: {os.path.join('out', 'solver.prototxt')}: exists; choose another --outdir or pass --force "
        "to overwrite")
    assert (tmp_path / "out" / "solver.prototxt").read_text() == "# an earlier job's\n"


def test_rewrite_fits_test_iter_to_the_new_validation_list(tmp_path):
    (tmp_path / "train.txt").write_text("a.png 0\nb.png 1\n")
    (tmp_path / "val.txt").write_text("c.png 0\nd.png 1\ne.png 2\n")
    result = run("rewrite", os.path.join(EXAMPLE, "train_val.prototxt"), "--solver",
                 os.path.join(EXAMPLE, "solver.prototxt"), "--strategy", "last-fc", "--num-classes", "3",
                 "--train-data", str(tmp_path / "train.txt"), "--val-data", str(tmp_path / "val.txt"),
                 "--val-batch-size", "2", "-o", str(tmp_path / "out"))
    assert result.exit_code == 0, result.stderr
    assert "test_iter: 10 -> 2 (3 validation examples, batches of 2" in result.output
    assert "\ntest_iter: 2\n" in (tmp_path / "out" / "solver.prototxt").read_text()
    train_val = (tmp_path / "out" / "train_val.prototxt").read_text()
    assert "scale: 0.00390625" in train_val and "mean_value" not in train_val  # preprocessing kept as it was


def _list(path, labels) -> str:
    path.write_text("".join(f"img{index}.png {label}\n" for index, label in enumerate(labels)))
    return str(path)


def test_num_classes_defaults_to_the_training_labels(net, tmp_path):
    train = _list(tmp_path / "train.txt", [0, 1, 2, 1])
    val = _list(tmp_path / "val.txt", [0, 1])
    result = run("rewrite", str(net), "--strategy", "last-fc", "--train-data", train, "--val-data", val,
                 "-o", str(tmp_path / "out"))
    assert result.exit_code == 0, result.stderr
    assert "--num-classes 3: the labels 0..2 of" in result.stderr
    assert "num_output 10 -> 3" in result.output
    # Labels must be 0..K-1, and a given count must cover them.
    gap = _list(tmp_path / "gap.txt", [0, 2])
    result = run("rewrite", str(net), "--strategy", "last-fc", "--train-data", gap, "--val-data", val,
                 "-o", str(tmp_path / "gap"))
    assert result.exit_code == 2 and "1 never occur(s)" in result.stderr and "--num-classes 3" in result.stderr
    result = run("rewrite", str(net), "--strategy", "last-fc", "--num-classes", "2", "--train-data", train,
                 "--val-data", val, "-o", str(tmp_path / "few"))
    assert result.exit_code == 2 and "label 2 needs at least 3 classes" in result.stderr
    assert not (tmp_path / "gap").exists() and not (tmp_path / "few").exists()


def test_bare_rewrite_keeps_the_class_count_and_says_so(net, tmp_path):
    result = run("rewrite", str(net), "--strategy", "top", "--train-last", "2", "-o", str(tmp_path / "out"))
    assert result.exit_code == 0, result.stderr
    assert "num_output 10 kept (no --num-classes or --train-data" in result.output
    assert "num_output: 10" in (tmp_path / "out" / "deploy.prototxt").read_text()


@pytest.mark.parametrize("args, message", [
    ([], "Missing option '--strategy'"),
    (["--strategy", "last-fc", "--num-classes", "1"], "'--num-classes'"),
    (["--strategy", "nope"], "Invalid value for '--strategy'"),
])
def test_usage_errors_are_one_line_with_a_hint(net, args, message):
    result = run("rewrite", str(net), *args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("caffe-ft: error: ") and message in lines[0]
    assert "(see 'caffe-ft rewrite --help')" in lines[0]


def test_a_solver_given_as_the_net_is_named_so(tmp_path):
    result = run("rewrite", os.path.join(EXAMPLE, "solver.prototxt"), "--strategy", "last-fc")
    assert result.exit_code == 2
    assert "solver.prototxt: this is a solver, not a net" in result.stderr
    result = run("rewrite", os.path.join(EXAMPLE, "train_val.prototxt"), "--strategy", "last-fc",
                 "--solver", os.path.join(EXAMPLE, "train_val.prototxt"), "-o", str(tmp_path / "out"))
    assert result.exit_code == 2 and "this is a net, not a solver" in result.stderr


def test_schedule_in_epochs_of_the_new_data(net, tmp_path, monkeypatch):
    """100 training images in batches of 32: 4 iterations an epoch; `full` on a small data set runs
    6 epochs; the step keeps its place (300 of 400), tests are an epoch apart and the last is at max_iter."""
    monkeypatch.chdir(tmp_path)
    train = os.path.basename(_list(tmp_path / "train.txt", [index % 5 for index in range(100)]))
    val = os.path.basename(_list(tmp_path / "val.txt", [index % 5 for index in range(30)]))
    result = run("rewrite", str(net), "--solver", os.path.join(EXAMPLE, "solver.prototxt"), "--strategy", "full",
                 "--train-data", train, "--val-data", val, "-o", "out")
    assert result.exit_code == 0, result.stderr
    solver = (tmp_path / "out" / "solver.prototxt").read_text()
    for line in ("max_iter: 24", "stepsize: 18", "test_interval: 4", "test_iter: 1", "base_lr: 0.001",
                 'net: "train_val.prototxt"', 'snapshot_prefix: "digitsnet"'):
        assert f"\n{line}\n" in solver, line
    assert "- max_iter: 400 -> 24 (6 epochs (full on a small data set) of 100 examples in batches of 32" in result.output
    assert "- stepsize: 300 -> 18 (0.75 of the run, as before)" in result.output
    assert "- base_lr: 0.01 -> 0.001" in result.output
    result = run("rewrite", str(net), "--solver", os.path.join(EXAMPLE, "solver.prototxt"), "--strategy", "full",
                 "--train-data", train, "--val-data", val, "--epochs", "10", "-o", str(tmp_path / "ten"))
    assert "\nmax_iter: 40\n" in (tmp_path / "ten" / "solver.prototxt").read_text()
    # Paths relative to the output folder.
    train_val = (tmp_path / "out" / "train_val.prototxt").read_text()
    assert 'source: "../train.txt"' in train_val and str(tmp_path) not in train_val


@pytest.mark.parametrize("magic, extra, channels", [(b"P6", [], 3), (b"P5", [], 1), (b"P6", ["--gray"], 1),
                                                    (b"P5", ["--color"], 3), (b"P6", ["weights"], 1)])
def test_input_shape_and_channels_from_what_exists(tmp_path, schema, magic, extra, channels):
    """An LMDB net without crop gets the first image's size (its header) and, unless --gray/--color
    or the first convolution's weights say otherwise, its channels."""
    import numpy as np

    from caffe_ft.formats.caffemodel import Blob, Model, save_model

    net = tmp_path / "net.prototxt"
    net.write_text(LMDB_TRAIN_VAL)
    for index in range(2):
        (tmp_path / f"img{index}.pnm").write_bytes(magic + b"\n# a comment\n20 12\n255\n" + b"\0" * 20 * 12 * 3)
    _list(tmp_path / "list.txt", [0, 1])
    (tmp_path / "list.txt").write_text(f"{tmp_path}/img0.pnm 0\n{tmp_path}/img1.pnm 1\n")
    if extra == ["weights"]:
        model = schema.new("NetParameter")
        layer = model.layer.add()
        layer.name, layer.type = "conv1", "Convolution"
        save_model(Model(model, [[Blob.of(np.zeros((4, 1, 5, 5), np.float32)), Blob.of(np.zeros(4, np.float32))]]),
                   str(tmp_path / "w.caffemodel"))
        extra = ["--weights", str(tmp_path / "w.caffemodel")]
    result = run("rewrite", str(net), "--strategy", "last-fc", "--train-data", str(tmp_path / "list.txt"),
                 "--val-data", str(tmp_path / "list.txt"), "-o", str(tmp_path / "out"), *extra)
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr, result.exception)
    if extra[:1] == ["--weights"]:
        assert "input channels: 1 ('conv1' of" in result.stderr
    deploy = (tmp_path / "out" / "deploy.prototxt").read_text()
    assert f"shape {{ dim: 1 dim: {channels} dim: 12 dim: 20 }}" in deploy, deploy
    assert ("is_color: false" in (tmp_path / "out" / "train_val.prototxt").read_text()) == (channels == 1)


@pytest.mark.parametrize("case", sorted(os.listdir(os.path.join(HERE, "fuzz_cases"))))
def test_json_output_of_every_fuzz_case_is_json_or_an_error(case):
    """Odd input (a name that is not UTF-8, odd numbers) gives JSON or a one-line
    error, never a traceback: ``--json`` once crashed on bytes."""
    path = os.path.join(HERE, "fuzz_cases", case)
    for args in (["inspect", "--json", path], ["diff", "--json", path, path]):
        result = run(*args)  # an uncaught exception fails the test (catch_exceptions=False)
        if result.exit_code == 0:
            json.loads(result.output)
        else:
            assert result.exit_code == 2 and len(stderr_of(result).strip().splitlines()) == 1, result.output
