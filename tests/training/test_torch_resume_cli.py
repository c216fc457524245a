"""A snapshot the torch engine writes resumes in Caffe's own CLI.

The torch engine trains a small net reading an HDF5Data layer (conv, BatchNorm,
Scale, InnerProduct; SGD with momentum, weight decay, a multistep rate) for 10
iterations and snapshots.  In the reference environment, ``caffe train -snapshot``
continues that snapshot to iteration 20, and so does pycaffe (Solver.restore):
the two agree within 1e-5 relative, and so does the torch engine continuing its
own snapshot (the data read again from the first row, as Caffe's resume does).
tests/training/test_torch_train.py covers pycaffe resuming a torch snapshot of
every kind of solver history; this adds the real CLI and a data layer.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from torch_parity import cached_dir, relative_error  # noqa: E402

pytestmark = pytest.mark.host

HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_layers_ref.py")

NET = """name: "h5net"
layer { name: "data" type: "HDF5Data" top: "data" top: "label" hdf5_data_param { source: "data.txt" batch_size: 4 } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 bias_term: false weight_filler { type: "gaussian" std: 0.2 } } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }
layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""
SOLVER = """net: "net.prototxt"
type: "SGD" base_lr: 0.05 momentum: 0.9 weight_decay: 0.001
lr_policy: "multistep" stepvalue: 5 stepvalue: 15 gamma: 0.5
max_iter: 20 display: 0 snapshot_after_train: true solver_mode: CPU
"""


def _hdf5(path: str) -> None:
    import h5py

    rng = np.random.default_rng(4)
    with h5py.File(path, "w", track_order=False) as handle:
        handle.create_dataset("data", data=rng.normal(0, 1, (24, 2, 6, 6)).astype(np.float32), track_times=False)
        handle.create_dataset("label", data=rng.integers(0, 3, 24).astype(np.float32), track_times=False)


def _trainer(schema):  # type: ignore[no-untyped-def]
    from caffe_ft.formats import prototext
    from caffe_ft.training.nets import NetSpec
    from caffe_ft.training.torch.engine import Trainer

    solver = prototext.to_message(prototext.parse(SOLVER.encode()), schema.new("SolverParameter"))
    net = prototext.to_message(prototext.parse(NET.encode()), schema.new("NetParameter"))
    return Trainer(solver, schema, NetSpec(net, "TRAIN", (), 0, "net.prototxt"), [])


def test_caffe_train_resumes_a_torch_snapshot_as_pycaffe_does(tmp_path, monkeypatch, schema) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.txt").write_text("data.h5\n")
    _hdf5(str(tmp_path / "data.h5"))
    trainer = _trainer(schema)
    while trainer.iter < 10:
        trainer.step()
    trainer.save("torch_iter_10.caffemodel", "torch_iter_10.solverstate", learned_net="torch_iter_10.caffemodel")
    at_ten = {f"{layer}/{i}": blob for layer, blobs in trainer.net.blob_arrays().items() for i, blob in enumerate(blobs)}
    files = {name: (tmp_path / name).read_bytes() for name in
             ("data.txt", "data.h5", "torch_iter_10.caffemodel", "torch_iter_10.solverstate")}
    files.update({"net.prototxt": NET.encode(), "solver.prototxt": SOLVER.encode()})
    reference = cached_dir("resume", files, helper=HELPER)

    resumed = _trainer(schema)  # a fresh net: its data layer starts at the first row, as Caffe's does
    resumed.restore("torch_iter_10.solverstate")
    assert resumed.iter == 10
    while resumed.iter < 20:
        resumed.step()
    ours = {f"{layer}/{i}": blob for layer, blobs in resumed.net.blob_arrays().items() for i, blob in enumerate(blobs)}
    with np.load(os.path.join(reference, "cli.npz")) as cli, np.load(os.path.join(reference, "pycaffe.npz")) as py:
        assert set(cli.files) == set(py.files) == set(ours)
        for name in py.files:
            assert relative_error(cli[name], py[name]) < 1e-5, f"caffe train vs pycaffe: {name}"
            assert relative_error(ours[name], py[name]) < 1e-5, f"torch vs pycaffe: {name}"
        # Ten more iterations moved the weights well beyond the tolerance (BatchNorm's statistics too).
        assert relative_error(at_ten["fc/0"], py["fc/0"]) > 1e-3
        assert relative_error(at_ten["bn/0"], py["bn/0"]) > 1e-3
