"""``caffe-ft train --engine torch``: a solver with ImageData nets trained on
torch end to end (tests, metrics, Caffe-format snapshots), stopped and
resumed to the very same caffemodel; refusals in one line."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import synth_images  # noqa: E402
from conftest import cli_runner  # noqa: E402

pytestmark = pytest.mark.host

NET = """
name: "small"
layer { name: "data" type: "ImageData" top: "data" top: "label" include { phase: TRAIN }
  transform_param { mean_value: 110 scale: 0.02 }
  image_data_param { source: "LIST" batch_size: 4 new_height: 20 new_width: 20 } }
layer { name: "data" type: "ImageData" top: "data" top: "label" include { phase: TEST }
  transform_param { mean_value: 110 scale: 0.02 crop_size: 16 }
  image_data_param { source: "LIST" batch_size: 2 new_height: 20 new_width: 20 } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 stride: 2 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: AVE global_pooling: true } }
layer { name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc"
  inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
layer { name: "accuracy" type: "Accuracy" bottom: "fc" bottom: "label" top: "accuracy" include { phase: TEST } }
"""

SOLVER = """
net: "net.prototxt"
test_iter: 2 test_interval: 3
base_lr: 0.1 momentum: 0.9 lr_policy: "step" gamma: 0.5 stepsize: 2
max_iter: 6 snapshot: 3 snapshot_prefix: "snap/small" display: 1 solver_mode: CPU
"""


@pytest.fixture
def workdir(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    listing = synth_images.write_dataset(str(tmp_path / "images"), "noise", per_class=4, size=24)
    (tmp_path / "net.prototxt").write_text(NET.replace("LIST", listing))
    (tmp_path / "solver.prototxt").write_text(SOLVER)
    (tmp_path / "snap").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _train(*args: str):  # type: ignore[no-untyped-def]
    from caffe_ft.cli import main

    return cli_runner().invoke(main, ["train", "solver.prototxt", "--engine", "torch", "--cpu", *args])


def test_trains_tests_and_snapshots_in_caffe_format(workdir, schema) -> None:  # type: ignore[no-untyped-def]
    from caffe_ft.formats.caffemodel import load_model, load_solverstate

    result = _train("--metrics", "metrics.jsonl")
    assert result.exit_code == 0, result.stderr
    assert "on torch (cpu, fp32)" in result.stderr
    for iteration in (3, 6):
        model = load_model(f"snap/small_iter_{iteration}.caffemodel", schema)
        assert [layer.name for layer, blobs in zip(model.net.layer, model.blobs) if blobs] == ["conv1", "fc"]
        state = load_solverstate(f"snap/small_iter_{iteration}.solverstate", schema)
        assert state.state.iter == iteration
        assert state.state.learned_net == f"snap/small_iter_{iteration}.caffemodel"
        assert len(state.history) == 4
    records = [json.loads(line) for line in open("metrics.jsonl")]
    tests = [r for r in records if r["phase"] == "test"]
    assert [r["iteration"] for r in tests] == [0, 3, 6]
    assert all(0 <= r["outputs"]["accuracy"] <= 1 for r in tests)
    assert [r["iteration"] for r in records if r["phase"] == "train"] == list(range(6))
    assert not list(workdir.glob("snap/.caffe-ft-snapshot-*"))


def test_interrupted_and_resumed_run_ends_with_the_same_model(workdir) -> None:  # type: ignore[no-untyped-def]
    straight = _train()
    assert straight.exit_code == 0, straight.stderr
    final = (workdir / "snap/small_iter_6.caffemodel").read_bytes()
    for path in workdir.glob("snap/*"):
        path.unlink()
    stopped = _train("--stop-after", "4")
    assert stopped.exit_code == 130, stopped.stderr
    assert "resume with: caffe-ft train solver.prototxt --resume snap/small_iter_4.solverstate --engine torch " \
           "--cpu" in stopped.stderr
    resumed = _train("--resume", "snap/small_iter_4.solverstate")
    assert resumed.exit_code == 0, resumed.stderr
    assert (workdir / "snap/small_iter_6.caffemodel").read_bytes() == final


def test_a_layer_the_engine_lacks_is_refused_before_any_work(workdir) -> None:  # type: ignore[no-untyped-def]
    text = (workdir / "net.prototxt").read_text()
    text = text.replace('type: "ReLU"', 'type: "Python"')
    (workdir / "net.prototxt").write_text(text)
    result = _train()
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1] == \
        "caffe-ft: error: layer 'relu1': a Python layer runs a caffe.Layer subclass, which needs pycaffe: " \
        "train with --engine pycaffe"
    assert not list(workdir.glob("snap/*"))


def test_without_torch_the_engine_says_how_to_install_it(workdir, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(sys.modules, "torch", None)
    result = _train()
    assert result.exit_code == 2
    assert result.stderr.strip() == "caffe-ft: error: the torch engine needs PyTorch: pip install 'caffe-ft[torch]'"


DEPLOY = """
name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 20 dim: 20 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 stride: 2 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: AVE global_pooling: true } }
layer { name: "fc" type: "InnerProduct" bottom: "pool1" top: "fc" inner_product_param { num_output: 2 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


def test_opencv_reads_a_torch_snapshot_and_computes_the_same(workdir, schema) -> None:  # type: ignore[no-untyped-def]
    import cv2
    import numpy as np
    import torch

    from caffe_ft.formats.caffemodel import load_model
    from caffe_ft.formats.prototext import parse, to_message
    from caffe_ft.training.torch.net import CaffeNet

    assert _train().exit_code == 0
    (workdir / "deploy.prototxt").write_text(DEPLOY)
    model = "snap/small_iter_6.caffemodel"
    opencv = cv2.dnn.readNetFromCaffe("deploy.prototxt", model)
    data = np.random.default_rng(0).normal(0, 1, (2, 3, 20, 20)).astype(np.float32)
    opencv.setInput(data)
    theirs = opencv.forward("prob")
    net = CaffeNet(to_message(parse(DEPLOY.encode()), schema.new("NetParameter")), "TEST")
    assert sorted(net.load_blobs(load_model(model, schema).layer_blobs())) == ["conv1", "fc"]
    with torch.no_grad():
        ours = net({"data": torch.from_numpy(data)})["prob"].numpy()
    assert np.abs(ours - theirs).max() < 1e-5
    assert np.abs(theirs - 0.5).max() > 1e-3  # trained away from the uniform guess


def test_auto_picks_torch_where_pycaffe_is_missing_and_says_so(workdir) -> None:  # type: ignore[no-untyped-def]
    from caffe_ft.cli import main

    result = cli_runner().invoke(main, ["train", "solver.prototxt", "--engine", "auto", "--cpu"])
    assert result.exit_code == 0, result.stderr
    assert result.stderr.startswith("engine: torch (auto: pycaffe is not installed)\n")
    assert (workdir / "snap/small_iter_6.caffemodel").exists()


def _torchrun(*args: str):  # type: ignore[no-untyped-def]
    import subprocess

    bindir = os.path.dirname(sys.executable)
    command = [os.path.join(bindir, "torchrun"), "--standalone", "--nproc-per-node", "2", "--no-python",
               os.path.join(bindir, "caffe-ft"), "train", "solver.prototxt", "--engine", "torch", "--cpu", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, env=env)


def _weights(path: str, schema):  # type: ignore[no-untyped-def]
    from caffe_ft.formats.caffemodel import load_model

    return {f"{name}/{i}": blob.data for name, blobs in load_model(path, schema).layer_blobs().items()
            for i, blob in enumerate(blobs)}


def test_two_processes_under_torchrun_train_as_one_with_the_global_batch(workdir, schema) -> None:  # type: ignore[no-untyped-def]
    import numpy as np

    (workdir / "net.prototxt").write_text((workdir / "net.prototxt").read_text().replace(
        "batch_size: 4", "batch_size: 8"))
    one = _train()
    assert one.exit_code == 0, one.stderr
    single = _weights("snap/small_iter_6.caffemodel", schema)
    for path in workdir.glob("snap/*"):
        path.unlink()
    (workdir / "net.prototxt").write_text((workdir / "net.prototxt").read_text().replace(
        "batch_size: 8", "batch_size: 4"))
    two = _torchrun()
    assert two.returncode == 0, two.stderr[-3000:]
    assert "global batch 8 = batch 4 x iter_size 1 x 2 processes" in two.stderr
    both = _weights("snap/small_iter_6.caffemodel", schema)
    for name, value in single.items():
        error = np.abs(both[name] - value).max() / np.abs(value).max()
        assert error < 1e-5, f"{name}: {error:.3g}"
    # Interrupted at 4 and resumed, still two processes: the same model.
    for path in workdir.glob("snap/*"):
        path.unlink()
    stopped = _torchrun("--stop-after", "4")
    assert stopped.returncode != 0 and "resume with:" in stopped.stderr, stopped.stderr[-3000:]
    resumed = _torchrun("--resume", "snap/small_iter_4.solverstate")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = _weights("snap/small_iter_6.caffemodel", schema)
    for name, value in both.items():
        assert np.abs(again[name] - value).max() <= 1e-6 * np.abs(value).max(), name



def test_a_test_net_whose_blobs_cannot_be_shared_is_refused(schema) -> None:  # type: ignore[no-untyped-def]
    from caffe_ft.errors import CaffeFtError
    from caffe_ft.formats.prototext import parse, to_message
    from caffe_ft.training.torch.net import CaffeNet

    def net(outputs: int):  # type: ignore[no-untyped-def]
        return to_message(parse(DEPLOY.replace("num_output: 2", f"num_output: {outputs}").encode()),
                          schema.new("NetParameter"))

    train = CaffeNet(net(2), "TRAIN")
    shared = CaffeNet(net(2), "TEST", share_from=train)
    assert shared.blobs_of["fc"][0] is train.blobs_of["fc"][0]
    with pytest.raises(CaffeFtError, match="layer 'fc': cannot share the train net's blobs"):
        CaffeNet(net(3), "TEST", share_from=train)
