"""The torch engine trains as Caffe trains: 20 iterations from the same
weights on the same data give every blob (BatchNorm statistics included)
within 1e-5 relative of pycaffe's, for every solver type and lr_policy, with
iter_size, gradient clipping and L1 regularization; snapshots cross between
the engines both ways.
"""

from __future__ import annotations

import hashlib
import os
import sys
from typing import Dict

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from conftest import write_datum_lmdb  # noqa: E402
from torch_parity import cached_dir, dumps, load_blobs, relative_error, run_helper  # noqa: E402

pytestmark = pytest.mark.host

# (conv1 has no bias: BatchNorm cancels it, so its gradient is rounding noise,
# which the adaptive solvers would amplify.)  Every learnable kind the small net can hold: BatchNorm (its three blobs),
# Scale with bias, leaky ReLU, ceil-rounded MAX pooling, LRN, dilated grouped
# convolution, PReLU, padded AVE pooling, InnerProduct, lr/decay multipliers.
NET = """
name: "tiny"
layer { name: "data" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 4 dim: 3 dim: 9 dim: 9 } shape { dim: 4 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 1 }
  convolution_param { num_output: 6 kernel_size: 3 pad: 1 bias_term: false
    weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" batch_norm_param { moving_average_fraction: 0.9 } }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" relu_param { negative_slope: 0.1 } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "norm1" type: "LRN" bottom: "pool1" top: "norm1" lrn_param { local_size: 3 alpha: 0.1 beta: 0.75 } }
layer { name: "conv2" type: "Convolution" bottom: "norm1" top: "conv2"
  convolution_param { num_output: 4 kernel_size: 3 pad: 2 dilation: 2 group: 2 weight_filler { type: "xavier" } } }
layer { name: "prelu2" type: "PReLU" bottom: "conv2" top: "conv2" }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2" pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool2" top: "ip1"
  param { lr_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip1" bottom: "label" top: "loss" }
"""

_COMMON = "max_iter: 20 weight_decay: 0.001 "
SOLVERS: Dict[str, str] = {
    "sgd_fixed": _COMMON + 'type: "SGD" base_lr: 0.05 momentum: 0.9 lr_policy: "fixed"',
    "sgd_step": _COMMON + 'type: "SGD" base_lr: 0.05 momentum: 0.9 lr_policy: "step" gamma: 0.5 stepsize: 5',
    "sgd_exp": _COMMON + 'type: "SGD" base_lr: 0.05 momentum: 0.9 lr_policy: "exp" gamma: 0.95',
    "sgd_inv": _COMMON + 'type: "SGD" base_lr: 0.05 momentum: 0.9 lr_policy: "inv" gamma: 0.1 power: 0.75',
    "sgd_multistep": _COMMON + 'type: "SGD" base_lr: 0.05 momentum: 0.9 lr_policy: "multistep" gamma: 0.3 '
                               "stepvalue: 5 stepvalue: 12",
    "sgd_poly": _COMMON + 'type: "SGD" base_lr: 0.05 momentum: 0.9 lr_policy: "poly" power: 1.5',
    "sgd_sigmoid": _COMMON + 'type: "SGD" base_lr: 0.05 momentum: 0.9 lr_policy: "sigmoid" gamma: 0.3 stepsize: 10',
    "nesterov": _COMMON + 'type: "Nesterov" base_lr: 0.05 momentum: 0.9 lr_policy: "fixed"',
    "adagrad": _COMMON + 'type: "AdaGrad" base_lr: 0.05 lr_policy: "fixed"',
    "rmsprop": _COMMON + 'type: "RMSProp" base_lr: 0.01 rms_decay: 0.95 lr_policy: "fixed"',
    "adadelta": _COMMON + 'type: "AdaDelta" base_lr: 1.0 momentum: 0.95 delta: 1e-6 lr_policy: "fixed"',
    "adam": _COMMON + 'type: "Adam" base_lr: 0.01 momentum: 0.9 momentum2: 0.999 lr_policy: "fixed"',
    "sgd_itersize_clip_l1": 'max_iter: 20 type: "SGD" base_lr: 0.05 momentum: 0.9 lr_policy: "fixed" iter_size: 2 '
                            'clip_gradients: 0.5 regularization_type: "L1" weight_decay: 0.01',
}
#: Solvers whose torch snapshot pycaffe resumes (one per kind of history).
CROSS = ("sgd_multistep", "adam")
ITERATIONS = 20


def _data() -> bytes:
    import io

    rng = np.random.default_rng(3)
    arrays = {}
    for i in range(ITERATIONS):
        arrays[f"data_{i}"] = rng.normal(0, 1, (4, 3, 9, 9)).astype(np.float32)
        arrays[f"label_{i}"] = rng.integers(0, 5, 4).astype(np.float32)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def reference() -> str:
    return cached_dir("train", {"net.prototxt": NET.encode(), "data.npz": _data(), "solvers.json": dumps(SOLVERS)})


def _trainer(reference: str, name: str, schema, solvers: Dict[str, str] = SOLVERS):  # type: ignore[no-untyped-def]
    from caffe_ft.formats import prototext
    from caffe_ft.formats.files import load_net
    from caffe_ft.training.nets import NetSpec
    from caffe_ft.training.torch.engine import Trainer

    solver = prototext.to_message(prototext.parse(solvers[name].encode()), schema.new("SolverParameter"))
    net = load_net(os.path.join(reference, "net.prototxt"), schema)
    data = np.load(os.path.join(reference, "data.npz"))
    iter_size = solver.iter_size

    def feed(index: int) -> Dict[str, np.ndarray]:
        i = index // iter_size
        return {"data": data[f"data_{i}"], "label": data[f"label_{i}"]}

    spec = NetSpec(net, "TRAIN", (), 0, "net.prototxt")
    trainer = Trainer(solver, schema, spec, [], feeds=[feed])
    return trainer


def _compare(trainer, expected: Dict[str, np.ndarray], tolerance: float = 1e-5) -> None:  # type: ignore[no-untyped-def]
    ours = {f"{layer}/{i}": blob for layer, blobs in trainer.net.blob_arrays().items() for i, blob in enumerate(blobs)}
    assert set(ours) == set(expected)
    errors = {name: relative_error(ours[name], expected[name]) for name in expected}
    worst = max(errors, key=errors.get)  # type: ignore[arg-type]
    assert errors[worst] < tolerance, f"{worst}: relative error {errors[worst]:.3g}"


@pytest.mark.parametrize("name", list(SOLVERS))
def test_twenty_iterations_match_pycaffe(reference: str, schema, name: str) -> None:  # type: ignore[no-untyped-def]
    trainer = _trainer(reference, name, schema)
    trainer.copy_from(os.path.join(reference, "init.caffemodel"))
    initial = trainer.net.blob_arrays()
    while trainer.iter < ITERATIONS:
        trainer.step()
    expected = load_blobs(os.path.join(reference, name, "params.npz"))
    _compare(trainer, expected)
    # Training moved the weights (and the BatchNorm statistics) well beyond the tolerance.
    moved = relative_error(initial["ip1"][0], expected["ip1/0"])
    assert moved > 1e-3
    assert float(expected["bn1/2"][0]) > 1


@pytest.mark.parametrize("name", ["sgd_multistep", "adadelta", "adam", "sgd_itersize_clip_l1"])
def test_resumes_a_caffe_snapshot(reference: str, schema, name: str) -> None:  # type: ignore[no-untyped-def]
    trainer = _trainer(reference, name, schema)
    trainer.restore(os.path.join(reference, name, "caffe_iter_10.solverstate"),
                    os.path.join(reference, name, "caffe_iter_10.caffemodel"))
    assert trainer.iter == 10
    trainer.feeder.passes = 10 * trainer.settings.iter_size
    while trainer.iter < ITERATIONS:
        trainer.step()
    _compare(trainer, load_blobs(os.path.join(reference, name, "params.npz")))


def test_pycaffe_resumes_a_torch_snapshot(reference: str, schema) -> None:  # type: ignore[no-untyped-def]
    from caffe_ft.formats.caffemodel import load_solverstate

    pairs, digest = [], hashlib.sha256()
    for name in CROSS:
        trainer = _trainer(reference, name, schema)
        trainer.copy_from(os.path.join(reference, "init.caffemodel"))
        while trainer.iter < 10:
            trainer.step()
        model = os.path.join(reference, name, "torch_iter_10.caffemodel")
        state = os.path.join(reference, name, "torch_iter_10.solverstate")
        trainer.save(model, state)
        # Caffe's own snapshot of the same point has the same fields and history layout.
        caffe_state = load_solverstate(os.path.join(reference, name, "caffe_iter_10.solverstate"), schema)
        ours = load_solverstate(state, schema)
        assert ours.state.iter == caffe_state.state.iter == 10
        assert ours.state.current_step == caffe_state.state.current_step
        assert [h.shape for h in ours.history] == [h.shape for h in caffe_state.history]
        for path in (model, state):
            with open(path, "rb") as handle:
                digest.update(handle.read())
        pairs += [name, state]
    mark = "resume-" + digest.hexdigest()[:16]
    if not os.path.exists(os.path.join(reference, mark + ".done")):
        run_helper("resume", reference, mark, *pairs)
    for name in CROSS:
        resumed = load_blobs(os.path.join(reference, name, "resumed.npz"))
        straight = load_blobs(os.path.join(reference, name, "params.npz"))
        for blob in straight:
            assert relative_error(resumed[blob], straight[blob]) < 1e-5, f"{name} {blob}"


# A solver whose nets read an LMDB of raw Datums through Data layers, with
# Caffe's transform (mean values, scale): the engine
# reads the records in Caffe's order and transforms them as Caffe does.
LMDB_NET = """
name: "lmdb"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { mean_value: 120 mean_value: 110 mean_value: 100 scale: 0.02 }
  data_param { source: "items_lmdb" batch_size: 3 backend: LMDB } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { mean_value: 120 mean_value: 110 mean_value: 100 scale: 0.02 }
  data_param { source: "items_lmdb" batch_size: 2 backend: LMDB } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 stride: 2 weight_filler { type: "gaussian" std: 0.2 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "ip1" type: "InnerProduct" bottom: "conv1" top: "ip1"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip1" bottom: "label" top: "loss" }
layer { name: "accuracy" type: "Accuracy" bottom: "ip1" bottom: "label" top: "accuracy" include { phase: TEST } }
"""
LMDB_SOLVER = {"sgd_lmdb": 'max_iter: 20 type: "SGD" base_lr: 0.05 momentum: 0.9 lr_policy: "fixed" '
                           "weight_decay: 0.001 test_iter: 2 test_interval: 10"}


def _lmdb_bytes(schema, tmp: str) -> bytes:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(5)
    # 7 records, not a multiple of the batch: reading wraps around mid-batch.
    write_datum_lmdb(tmp, schema, ((3, 12, 12, rng.integers(0, 256, 3 * 12 * 12).astype(np.uint8).tobytes(),
                                    index % 3) for index in range(7)), map_size=1 << 24)
    with open(os.path.join(tmp, "data.mdb"), "rb") as handle:
        return handle.read()


def _reference_trainer(schema, monkeypatch, net: str, solvers: Dict[str, str], name: str,
                       files: Dict[str, bytes]):  # type: ignore[no-untyped-def]
    """pycaffe's run of solver ``name`` over ``net`` reading ``files`` (its data, no
    fed arrays; made once in the reference environment), and the torch engine's
    trainer of the same solver in that folder, from the same initial weights:
    ``(trainer, folder)``."""
    import io

    from caffe_ft.formats import prototext
    from caffe_ft.training.nets import solver_nets
    from caffe_ft.training.torch.engine import Trainer

    empty = io.BytesIO()
    np.savez(empty)
    reference = cached_dir("train", {"net.prototxt": net.encode(), "data.npz": empty.getvalue(),
                                     "solvers.json": dumps(solvers), **files})
    monkeypatch.chdir(reference)
    text = 'net: "net.prototxt" ' + solvers[name]
    solver = prototext.to_message(prototext.parse(text.encode()), schema.new("SolverParameter"))
    train, tests = solver_nets(solver, schema)
    trainer = Trainer(solver, schema, train, tests)
    trainer.copy_from("init.caffemodel")
    return trainer, reference


def test_data_layers_read_and_transform_an_lmdb_as_caffe(schema, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    trainer, reference = _reference_trainer(schema, monkeypatch, LMDB_NET, LMDB_SOLVER, "sgd_lmdb",
                                            {"items_lmdb/data.mdb": _lmdb_bytes(schema, str(tmp_path))})
    while trainer.iter < ITERATIONS:
        trainer.step()
    _compare(trainer, load_blobs(os.path.join(reference, "sgd_lmdb", "params.npz")))
    outputs = trainer.test(0, 2)
    assert outputs is not None and 0 <= outputs["accuracy"] <= 1 and outputs["loss"] > 0


ZOO_SOLVERS = {"zoo_sgd": _COMMON + 'type: "SGD" base_lr: 0.01 momentum: 0.9 lr_policy: "fixed"'}


def test_every_layer_trains_as_in_caffe(schema) -> None:  # type: ignore[no-untyped-def]
    """Gradients through every layer of the zoo net equal Caffe's (20 iterations of SGD)."""
    import io

    from torch_zoo import ZOO

    rng = np.random.default_rng(4)
    arrays = {}
    for i in range(ITERATIONS):
        arrays[f"data_{i}"] = rng.normal(0, 1, (2, 3, 8, 8)).astype(np.float32)
        arrays[f"label_{i}"] = rng.integers(0, 4, 2).astype(np.float32)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    reference = cached_dir("train", {"net.prototxt": ZOO.encode(), "data.npz": buffer.getvalue(),
                                     "solvers.json": dumps(ZOO_SOLVERS)})
    trainer = _trainer(reference, "zoo_sgd", schema, ZOO_SOLVERS)
    trainer.copy_from(os.path.join(reference, "init.caffemodel"))
    initial = trainer.net.blob_arrays()
    while trainer.iter < ITERATIONS:
        trainer.step()
    expected = load_blobs(os.path.join(reference, "zoo_sgd", "params.npz"))
    _compare(trainer, expected)
    for layer in ("conv1", "deconv", "bias", "ip", "ip_axis"):
        assert relative_error(initial[layer][0], expected[f"{layer}/0"]) > 1e-4, layer
    assert relative_error(initial["fixed"][0], expected["fixed/0"]) == 0


# LSTM and RNN over sequences read from HDF5 (3 steps of 2 streams per batch): the
# hidden state carries from one iteration to the next where cont says so, in both engines.
RECURRENT_NET = """
name: "recurrent"
layer { name: "data" type: "HDF5Data" top: "x" top: "cont" top: "label"
  hdf5_data_param { source: "seq.txt" batch_size: 6 } }
layer { name: "x_steps" type: "Reshape" bottom: "x" top: "x_steps" reshape_param { shape { dim: 3 dim: 2 dim: -1 } } }
layer { name: "cont_steps" type: "Reshape" bottom: "cont" top: "cont_steps" reshape_param { shape { dim: 3 dim: 2 } } }
layer { name: "lstm" type: "LSTM" bottom: "x_steps" bottom: "cont_steps" top: "h"
  recurrent_param { num_output: 4 weight_filler { type: "uniform" min: -0.5 max: 0.5 }
    bias_filler { type: "constant" value: 0.1 } } }
layer { name: "rnn" type: "RNN" bottom: "x_steps" bottom: "cont_steps" top: "o"
  recurrent_param { num_output: 3 weight_filler { type: "uniform" min: -0.5 max: 0.5 } } }
layer { name: "both" type: "Concat" bottom: "h" bottom: "o" top: "both" concat_param { axis: 2 } }
layer { name: "score" type: "InnerProduct" bottom: "both" top: "score"
  inner_product_param { num_output: 3 axis: 2 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "flat" type: "Reshape" bottom: "score" top: "flat" reshape_param { shape { dim: -1 dim: 3 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "flat" bottom: "label" top: "loss" }
"""
RECURRENT_SOLVER = {"sgd_recurrent": 'max_iter: 20 type: "SGD" base_lr: 0.1 momentum: 0.9 lr_policy: "fixed" '
                                     "weight_decay: 0.001"}


def _sequences() -> bytes:
    """15 rows (not a multiple of the batch: reading wraps mid-batch); a row is (step, stream)."""
    import io

    import h5py

    rng = np.random.default_rng(6)
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as handle:
        handle.create_dataset("x", data=rng.normal(0, 1, (15, 2, 2)).astype(np.float32))
        handle.create_dataset("cont", data=(rng.uniform(0, 1, 15) < 0.7).astype(np.float32))
        handle.create_dataset("label", data=rng.integers(0, 3, 15).astype(np.float32))
    return buffer.getvalue()


def test_recurrent_nets_train_as_in_caffe(schema, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    trainer, reference = _reference_trainer(schema, monkeypatch, RECURRENT_NET, RECURRENT_SOLVER, "sgd_recurrent",
                                            {"seq.txt": b"seq.h5\n", "seq.h5": _sequences()})
    initial = trainer.net.blob_arrays()
    while trainer.iter < ITERATIONS:
        trainer.step()
    expected = load_blobs(os.path.join(reference, "sgd_recurrent", "params.npz"))
    _compare(trainer, expected)
    for layer in ("lstm", "rnn"):
        for index, blob in enumerate(initial[layer]):
            assert relative_error(blob, expected[f"{layer}/{index}"]) > 1e-3, f"{layer}/{index} did not train"
