"""``caffe-ft export``: the ONNX model computes what pycaffe computes.

Every classifier deploy net of caffe-doc (with random weights of the right
shapes: caffe-doc ships none), a train_val net exported as its derived deploy
net, the nsfw ResNet-50 with its real weights, a net holding every other
layer type the exporter knows, and pooling shapes where Caffe's ceil rounding
and pad clipping matter: each is exported through the CLI, checked by
``onnx.checker``, run in ONNX Runtime and in pycaffe on the same random input,
and the outputs must agree within 1e-4 of their largest magnitude, at batch 1
and (where it is cheap) batch 8 through the model's symbolic batch axis.
"""

from __future__ import annotations

import gzip
import os
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import pytest

from caffe_ft.cli import main
from caffe_ft.formats.files import load_net
from caffe_ft.formats.schema import load_schema

from conftest import NSFW_DIR, cli_runner
from export_nets import DEPLOY_NETS, LAYERS_NET, POOLING_CASES, pooling_net

pytestmark = pytest.mark.caffe

DOC = "/usr/share/doc/caffe-doc"
RELATIVE = 1e-4


@pytest.fixture(scope="module")
def caffe():
    os.environ.setdefault("GLOG_minloglevel", "2")
    import caffe as pycaffe

    pycaffe.set_mode_cpu()
    return pycaffe


def _plain(path: str, directory: str) -> str:
    """A caffe-doc prototxt as a plain file (Debian gzips the bigger ones)."""
    source = os.path.join(DOC, path)
    if not source.endswith(".gz"):
        return source
    target = os.path.join(directory, os.path.basename(os.path.dirname(source)) + ".prototxt")
    with gzip.open(source, "rb") as handle, open(target, "wb") as out:
        out.write(handle.read())
    return target


def _randomize(net, rng: np.random.Generator) -> None:
    """Weights of a trained net's magnitudes: N(0, 1/fan_in), BatchNorm statistics
    stored times a scale factor of 2 (as Caffe's moving averages are), Scale near 1."""
    types = {name: layer.type for name, layer in zip(net._layer_names, net.layers)}
    for name, blobs in net.params.items():
        kind = types[name]
        if kind == "BatchNorm":
            channels = blobs[0].data.shape
            blobs[0].data[...] = 2 * rng.normal(0, 0.1, channels)
            blobs[1].data[...] = 2 * rng.uniform(0.5, 1.5, channels)
            blobs[2].data[...] = 2
            continue
        for index, blob in enumerate(blobs):
            shape = blob.data.shape
            if kind in ("Scale", "PReLU") and index == 0:
                blob.data[...] = rng.uniform(0.5, 1.5, shape)
            else:
                std = np.sqrt(1.0 / max(1, int(np.prod(shape[1:])))) if len(shape) > 1 else 0.1
                blob.data[...] = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)


def _export(tmp_path, net: str, weights: Optional[str], *args: str) -> str:
    out = str(tmp_path / (os.path.basename(net).split(".")[0] + ".onnx"))
    command = ["export", net, "-o", out, *args] + (["--weights", weights] if weights else [])
    result = cli_runner().invoke(main, command)
    assert result.exit_code == 0, result.output + result.stderr
    return out


def _session(path: str, blobs: Sequence[str] = ()):
    """An ONNX Runtime session on the model at ``path``, which must pass the
    checker; ``blobs`` that the graph computes become extra outputs."""
    import onnx
    import onnxruntime

    model = onnx.load(path)
    onnx.checker.check_model(model)
    values = {output for node in model.graph.node for output in node.output}
    present = {value.name for value in model.graph.output}
    for name in blobs:
        if name in values and name not in present:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 2
    return onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _compare(caffe, prototxt: str, weights: Optional[str], model: str, batches: Sequence[int],
             scale: float = 1.0, seed: int = 0, feeds: Sequence[Dict[str, np.ndarray]] = ()) -> Dict[str, float]:
    """Run pycaffe and ONNX Runtime on the same random inputs (and ``feeds``); assert that the
    outputs agree, and so does every blob the ONNX model has a value of that
    name for (the value the blob holds after the forward pass; a Softmax's
    scores are checked before they saturate).  Returns each output's largest
    relative difference."""
    net = caffe.Net(prototxt, weights, caffe.TEST) if weights else caffe.Net(prototxt, caffe.TEST)
    session = _session(model, [name for name in net.blobs if name not in net.inputs])
    rng = np.random.default_rng(seed)
    worst: Dict[str, float] = {}
    onnx_inputs = {value.name: value for value in session.get_inputs()}
    assert sorted(onnx_inputs) == sorted(net.inputs)
    random = [{name: (scale * rng.standard_normal((batch, *net.blobs[name].data.shape[1:]))).astype(np.float32)
               for name in net.inputs} for batch in batches]
    for feed in [*random, *feeds]:
        for name, value in feed.items():
            assert onnx_inputs[name].shape[0] == "N"
            net.blobs[name].reshape(*value.shape)
        net.reshape()
        batch = len(next(iter(feed.values())))
        outputs = net.forward(**feed)
        got = dict(zip([value.name for value in session.get_outputs()], session.run(None, feed)))
        assert set(outputs) <= set(got)
        for name in got:
            want = net.blobs[name].data
            assert got[name].shape == want.shape, (name, batch)
            assert np.isfinite(want).all()
            difference = float(np.abs(got[name] - want).max()) / max(float(np.abs(want).max()), 1e-30)
            assert difference <= RELATIVE, f"{name} at batch {batch}: relative difference {difference:.2e}"
            if name in outputs:
                worst[name] = max(worst.get(name, 0.0), difference)
    return worst


def _random_weights(caffe, prototxt: str, path: str, seed: int = 0) -> str:
    net = caffe.Net(prototxt, caffe.TEST)
    _randomize(net, np.random.default_rng(seed))
    net.save(path)
    return path


# DEPLOY_NETS (export_nets.py): batch 8 where a forward pass is cheap. Where an
# input shape is given, the net runs at that size (in pycaffe from a copy of
# the prototxt, in the export through --input-shape): AlexNet's family at
# 99 x 99 has a 2 x 2 pool5 (ceil rounding at every pooling) and fc6 a ninth of
# its 38 million weights; CaffeNet keeps its own size.

def _at_size(prototxt: str, shape: Tuple[int, ...], directory: str) -> str:
    """A copy of ``prototxt`` whose input has ``shape``."""
    from google.protobuf import text_format

    net = load_net(prototxt, load_schema())
    assert net.layer[0].type == "Input"
    net.layer[0].input_param.shape[0].dim[:] = shape
    path = os.path.join(directory, "at_size.prototxt")
    with open(path, "w") as handle:
        handle.write(text_format.MessageToString(net))
    return path


@pytest.mark.parametrize("path,batches,shape", DEPLOY_NETS, ids=[n[0].split("/")[-2] for n in DEPLOY_NETS])
def test_caffe_doc_deploy_nets(caffe, tmp_path, path: str, batches: Tuple[int, ...], shape: Tuple[int, ...]) -> None:
    prototxt = _plain(path, str(tmp_path))
    reference = _at_size(prototxt, shape, str(tmp_path)) if shape else prototxt
    weights = _random_weights(caffe, reference, str(tmp_path / "random.caffemodel"))
    args = ["--input-shape", "data=" + ",".join(map(str, shape))] if shape else []
    model = _export(tmp_path, prototxt, weights, *args)
    _compare(caffe, reference, weights, model, batches, scale=50.0)


def test_nsfw_resnet50_real_weights(caffe, tmp_path) -> None:
    prototxt = os.path.join(NSFW_DIR, "deploy.prototxt")
    weights = os.path.join(NSFW_DIR, "resnet_50_1by2_nsfw.caffemodel")
    model = _export(tmp_path, prototxt, weights)
    # Photo-like images as open_nsfw feeds them (BGR, mean subtracted), and noise.
    from synth_images import photo_image

    rng = np.random.default_rng(4)
    photos = np.stack([photo_image(rng, label % 3, 224).astype(np.float32) - np.float32([104, 117, 123])
                       for label in range(4)]).transpose(0, 3, 1, 2)
    worst = _compare(caffe, prototxt, weights, model, (1, 8), scale=50.0, feeds=[{"data": photos}])
    assert set(worst) == {"prob"}


def test_logits_and_train_val_derived_deploy(caffe, tmp_path, parse_net) -> None:
    """A train_val net (BatchNorm, no deploy twin in caffe-doc) is exported as its
    derived deploy net; --logits leaves out the Softmax; the scores match Caffe's."""
    from google.protobuf import text_format

    from caffe_ft.recipe.rewrite import to_deploy
    from caffe_ft.net.graph import find_heads

    schema = load_schema()
    train_val = os.path.join(DOC, "examples/cifar10/cifar10_full_sigmoid_train_test_bn.prototxt")
    net = load_net(train_val, schema)
    deploy = to_deploy(schema, net, find_heads(net).heads, input_shapes={"data": (1, 3, 32, 32)})
    prototxt = str(tmp_path / "deploy.prototxt")
    with open(prototxt, "w") as handle:
        handle.write(text_format.MessageToString(deploy))
    weights = _random_weights(caffe, prototxt, str(tmp_path / "bn.caffemodel"))
    model = _export(tmp_path, train_val, weights, "--logits", "--input-shape", "data=1,3,32,32")
    caffe_net = caffe.Net(prototxt, weights, caffe.TEST)
    session = _session(model)
    assert [value.name for value in session.get_outputs()] == ["ip1"]
    rng = np.random.default_rng(1)
    data = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
    caffe_net.blobs["data"].reshape(*data.shape)
    caffe_net.forward(data=data)
    want = caffe_net.blobs["ip1"].data
    got = session.run(None, {"data": data})[0]
    assert np.abs(got - want).max() <= RELATIVE * np.abs(want).max()




def test_every_layer_type(caffe, tmp_path) -> None:
    prototxt = str(tmp_path / "layers.prototxt")
    with open(prototxt, "w") as handle:
        handle.write(LAYERS_NET)
    weights = _random_weights(caffe, prototxt, str(tmp_path / "layers.caffemodel"))
    model = _export(tmp_path, prototxt, weights)
    worst = _compare(caffe, prototxt, weights, model, (1, 8))
    assert set(worst) == {"prob", "global_max", "t2"}


@pytest.mark.parametrize("pool", ["MAX", "AVE"])
@pytest.mark.parametrize("size,kernel,stride,pad", POOLING_CASES)
def test_pooling_edges(caffe, tmp_path, pool: str, size, kernel, stride, pad) -> None:
    prototxt = str(tmp_path / "pool.prototxt")
    with open(prototxt, "w") as handle:
        handle.write(pooling_net(size, pool, kernel, stride, pad))
    model = _export(tmp_path, prototxt, None)
    _compare(caffe, prototxt, None, model, (1, 3))


SOLVER = """net: "train_val.prototxt"
test_iter: 2
test_interval: 10
base_lr: 0.01
momentum: 0.9
lr_policy: "fixed"
display: 0
max_iter: 10
snapshot_prefix: "small"
solver_mode: CPU
random_seed: 1
"""


def test_finetune_export_onnx(tmp_path) -> None:
    """``finetune --export-onnx`` writes final.onnx beside final.caffemodel, and
    its summary says how it was checked; the check holds."""
    import subprocess
    import sys

    import feature_nets
    from synth_images import write_dataset

    from caffe_ft.export.verify import compare_with_pycaffe

    train = write_dataset(str(tmp_path / "train"), "photo", 4, classes=3, size=20, seed=5)
    val = write_dataset(str(tmp_path / "val"), "photo", 2, classes=3, size=20, seed=6)
    net, solver = tmp_path / "train_val.prototxt", tmp_path / "solver.prototxt"
    net.write_text(feature_nets.train_val(train, val, batch_size=4, test_batch_size=3))
    solver.write_text(SOLVER)
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "caffe_ft.cli", "finetune", str(net), "--weights", feature_nets.make_weights(str(tmp_path)),
         "--strategy", "last-fc", "--num-classes", "3", "--solver", str(solver), "--cpu", "--export-onnx",
         "-o", str(out)], capture_output=True, text=True, env={**os.environ, "GLOG_minloglevel": "2"})
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    assert "ONNX model: final.onnx (opset 13, batch axis N); onnx.checker passed; ONNX Runtime" in summary
    assert "pycaffe outputs equal within 0.0001 relative" in summary, summary
    assert "wrote " + str(out / "final.onnx") in done.stderr
    agreement = compare_with_pycaffe(str(out / "deploy.prototxt"), str(out / "final.caffemodel"),
                                     str(out / "final.onnx"), (2,), seed=7)
    assert agreement.ok and agreement.difference > 0  # two implementations, not one file read twice
