"""Every strategy's rewrite of every classifier Caffe ships trains in real Caffe.

For each net of Debian's caffe-doc that has a classifier head (and for the
pretrained nsfw ResNet-50), and for each strategy, ``caffe-ft rewrite`` is
pointed at a tiny generated image list; then, in a child process (a failed
Caffe CHECK aborts the process), pycaffe builds a solver on the written
solver.prototxt, trains two SGD steps from the original weights (or, for the
caffe-doc nets that come without weights, from random ones) and loads the
written deploy net with the trained weights.  caffe-doc ships no weights, so
a deploy net of the same model, built by Caffe and filled with random values,
stands in for the pretrained one: its layers must fit the new train net as
Caffe's CopyTrainedLayersFrom demands.  What the written prototxt says must
be what Caffe does:

* blobs with ``lr_mult: 0`` stay bit-identical, and so do the statistics of
  BatchNorm layers with ``use_global_stats: true``;
* every other blob moves, the new heads' included;
* the losses are finite;
* the deploy net has a parameter of the same shape for each of its
  learnable layers in the train net, and its outputs have num_classes
  channels.

Nets without a classifier (siamese), or whose head cannot take one label per
image, must be refused with one clear line; caffe-doc's own solvers,
rewritten along with their nets, must load in Caffe.  The rules behind the
fixes these tests found also have Caffe-free tests at the end, for the host.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest

from caffe_ft.formats import files
from caffe_ft.cli import main
from caffe_ft.formats.schema import load_schema
from conftest import CAFFE_DOC_DIRS, NSFW_DIR, cli_runner
from ft_nets import LMDB_TRAIN_VAL

DOC = CAFFE_DOC_DIRS[0]
NUM_CLASSES = 3
TRAIN_IMAGES = 4
VAL_IMAGES = 2
STEPS = 2
COLOUR_MEAN = (104, 117, 123)  # --mean-value: BGR, or its first value for grey nets
CONTRAST = 2.0  # standard deviation of the images' grey levels around the mean


@dataclass(frozen=True)
class Net:
    """A net to rewrite and what its rewrite needs to know."""

    path: str  # relative to caffe-doc, or absolute; may be gzipped
    size: int  # side of the generated images
    grey: bool = False
    args: Tuple[str, ...] = ()  # rewrite options this net needs beyond the common ones
    train_last: int = 3
    weights: Optional[str] = None  # the pretrained caffemodel, where there is one
    # caffe-doc ships no weights: a deploy net of the same model, built by
    # Caffe with random weights, stands in for the pretrained net.
    reference: Optional[str] = None

    @property
    def id(self) -> str:
        return self.path.replace(".prototxt", "").replace(".gz", "").strip("/").replace("/", "-")


CAFFENET = "models/bvlc_reference_caffenet/deploy.prototxt"
ALEXNET = "models/bvlc_alexnet/deploy.prototxt"
GOOGLENET = "models/bvlc_googlenet/deploy.prototxt.gz"
FLICKR = "models/finetune_flickr_style/deploy.prototxt.gz"
RCNN = "models/bvlc_reference_rcnn_ilsvrc13/deploy.prototxt"
FULL_CONV = "examples/net_surgery/bvlc_caffenet_full_conv.prototxt"
CIFAR_QUICK = "examples/cifar10/cifar10_quick.prototxt"
CIFAR_FULL = "examples/cifar10/cifar10_full.prototxt"
LENET = "examples/mnist/lenet.prototxt"

NETS = [
    Net("models/bvlc_reference_caffenet/train_val.prototxt.gz", 227, reference=CAFFENET),
    Net(CAFFENET, 227, reference=CAFFENET),
    Net("models/bvlc_alexnet/train_val.prototxt.gz", 227, reference=ALEXNET),
    Net(ALEXNET, 227, reference=ALEXNET),
    Net("models/bvlc_googlenet/train_val.prototxt.gz", 224, reference=GOOGLENET),
    Net(GOOGLENET, 224, reference=GOOGLENET),
    Net("models/finetune_flickr_style/train_val.prototxt.gz", 227, reference=FLICKR),
    Net(FLICKR, 227, reference=FLICKR),
    # R-CNN's SVM scores feed no Softmax or loss: its head must be named.
    Net(RCNN, 227, args=("--head", "fc-rcnn"), reference=RCNN),
    Net("examples/feature_extraction/imagenet_val.prototxt", 256, reference=CAFFENET),
    Net("examples/finetune_pascal_detection/pascal_finetune_trainval_test.prototxt", 227, reference=CAFFENET),
    # Fully convolutional at 451x451: trained on 227x227 crops so that each image gets one score.
    Net(FULL_CONV, 451, args=("--crop-size", "227"), reference=FULL_CONV),
    # LMDB-fed nets without a crop: the input size (and grey or colour) is the images' (read from their headers).
    Net("examples/cifar10/cifar10_quick_train_test.prototxt", 32, reference=CIFAR_QUICK),
    Net(CIFAR_QUICK, 32, reference=CIFAR_QUICK),
    Net("examples/cifar10/cifar10_full_train_test.prototxt", 32, reference=CIFAR_FULL),
    Net(CIFAR_FULL, 32, reference=CIFAR_FULL),
    Net("examples/cifar10/cifar10_full_sigmoid_train_test.prototxt", 32, reference=CIFAR_FULL),
    # No deploy net has its layers (convolutions without bias): random weights.
    Net("examples/cifar10/cifar10_full_sigmoid_train_test_bn.prototxt", 32),
    Net("examples/mnist/lenet_train_test.prototxt", 28, grey=True, reference=LENET),
    Net(LENET, 28, grey=True, reference=LENET),
    Net(os.path.join(NSFW_DIR, "deploy.prototxt"), 224,
        weights=os.path.join(NSFW_DIR, "resnet_50_1by2_nsfw.caffemodel")),
]

STRATEGIES = ("last-fc", "top", "full")


# ---------------------------------------------------------------------------
# Inputs: the net as a plain file, a tiny image list
# ---------------------------------------------------------------------------


def _plain_file(path: str, workdir: str) -> str:
    """A prototxt of caffe-doc (or an absolute path) as a plain file: Debian gzips the bigger ones."""
    source = path if os.path.isabs(path) else os.path.join(DOC, path)
    if not source.endswith(".gz"):
        return source
    target = os.path.join(workdir, os.path.basename(os.path.dirname(source)) + "-" + os.path.basename(source)[:-3])
    with gzip.open(source, "rb") as handle, open(target, "wb") as out:
        out.write(handle.read())
    return target


def _image_list(directory: str, name: str, size: int, grey: bool, count: int, seed: int) -> str:
    """``count`` random images of ``size`` x ``size`` and their image list, labels cycling below NUM_CLASSES.

    Noise of low contrast around the mean the data layers subtract keeps a
    randomly initialized net's features small, so that two steps at the
    solver's rate do not saturate the softmax (the losses stay meaningful
    and every gradient nonzero)."""
    import cv2

    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    lines = []
    for index in range(count):
        mean = np.array(COLOUR_MEAN[:1] if grey else COLOUR_MEAN, dtype=np.float64)
        shape = (size, size) if grey else (size, size, 3)
        path = os.path.join(directory, f"{name}_{index}.png")
        cv2.imwrite(path, np.clip(mean + rng.normal(0, CONTRAST, shape), 0, 255).round().astype(np.uint8))
        lines.append(f"{path} {index % NUM_CLASSES}\n")
    list_path = os.path.join(directory, f"{name}.txt")
    with open(list_path, "w", encoding="utf-8") as handle:
        handle.writelines(lines)
    return list_path


@pytest.fixture(scope="module")
def image_lists(tmp_path_factory):
    """``image_lists(size, grey)`` -> (train list, val list), made once per kind."""
    made: Dict[Tuple[int, bool], Tuple[str, str]] = {}

    def lists(size: int, grey: bool) -> Tuple[str, str]:
        if (size, grey) not in made:
            directory = str(tmp_path_factory.mktemp(f"images{size}{'grey' if grey else ''}"))
            made[(size, grey)] = (
                _image_list(directory, "train", size, grey, TRAIN_IMAGES, seed=size),
                _image_list(directory, "val", size, grey, VAL_IMAGES, seed=size + 1),
            )
        return made[(size, grey)]

    return lists


def _rewrite(net_path: str, outdir: str, strategy_args: List[str], *args: str):
    command = ["rewrite", net_path, "-o", outdir, "--num-classes", str(NUM_CLASSES), *strategy_args, *args]
    return cli_runner().invoke(main, command, catch_exceptions=False)


def _strategy_args(strategy: str, net: Net) -> List[str]:
    return ["--strategy", strategy] + (["--train-last", str(net.train_last)] if strategy == "top" else [])


def _data_args(net: Net, train: str, val: str, means: bool = True) -> List[str]:
    args = ["--train-data", train, "--val-data", val, "--batch-size", "2", "--val-batch-size", "2"]
    for value in (COLOUR_MEAN[:1] if net.grey else COLOUR_MEAN) if means else ():
        args += ["--mean-value", str(value)]
    return args + list(net.args)


# ---------------------------------------------------------------------------
# Training in pycaffe, in a child process
# ---------------------------------------------------------------------------

# argv: output directory, steps, pretrained weights ("" for none), reference
# deploy net ("" for none).  Prints one JSON line: the reference layers whose
# parameters do not fit the train net, the losses of each step, for each
# learnable layer its type, blob shapes and whether each blob moved, the
# deploy net's parameter shapes and its outputs.
_TRAIN_SCRIPT = r"""
import json, os, sys
import numpy as np
import caffe

caffe.set_mode_cpu()
caffe.set_random_seed(0)  # shuffling and dropout
outdir, steps, weights, reference = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
rng = np.random.default_rng(0)


def layer_types(net):
    return {name: layer.type for name, layer in zip(net._layer_names, net.layers)}


def shapes(params):
    return {name: [list(blob.data.shape) for blob in blobs] for name, blobs in params.items()}


NOISE = rng.standard_normal(1 << 20, dtype=np.float32)


def noise(shape):
    # Standard normal values, tiled from one block from a random start (fast for fc6's 38M weights).
    return np.resize(np.roll(NOISE, int(rng.integers(NOISE.size))), shape)


def randomize(net, skip=()):
    # Xavier-style weights (Caffe's default filler is zeros, which trains
    # nothing below the top); BatchNorm gets plausible statistics.
    types = layer_types(net)
    for name, blobs in net.params.items():
        if name in skip:
            continue
        if types[name] == "BatchNorm":
            blobs[0].data[...] = 0.1 * noise(blobs[0].data.shape)
            blobs[1].data[...] = rng.uniform(0.5, 1.5, blobs[1].data.shape)
            blobs[2].data[...] = 1
            continue
        for blob in blobs:
            shape = blob.data.shape
            fan_in = max(1, int(np.prod(shape[1:]))) if len(shape) > 1 else 10000
            blob.data[...] = noise(shape) * np.float32(np.sqrt(1.0 / fan_in))


def copy_by_name(source, target):
    # What Net::CopyTrainedLayersFrom does, but reporting instead of aborting:
    # a same-named layer must have the same blobs.
    misfits, copied = [], []
    for name, blobs in source.params.items():
        if name not in target.params:
            continue
        if shapes(source.params)[name] != shapes(target.params)[name]:
            misfits.append(name)
            continue
        for old, new in zip(blobs, target.params[name]):
            new.data[...] = old.data
        copied.append(name)
    return misfits, copied


solver = caffe.SGDSolver(os.path.join(outdir, "solver.prototxt"))
net = solver.net
misfits, copied = [], []
if reference:
    pretrained = caffe.Net(reference, caffe.TEST)
    randomize(pretrained)
    misfits, copied = copy_by_name(pretrained, net)
    del pretrained
randomize(net, skip=copied)
if weights:
    net.copy_from(weights)
before = {name: [blob.data.copy() for blob in blobs] for name, blobs in net.params.items()}
losses = []
for _ in range(steps):
    solver.step(1)
    losses.append([float(net._blobs[blob].data.flat[0]) for i, layer in enumerate(net.layers)
                   if layer.type.endswith("Loss") for blob in net._top_ids(i)])
moved = {name: [not np.array_equal(old, blob.data) for old, blob in zip(before[name], blobs)]
         for name, blobs in net.params.items()}

deploy_path = os.path.join(outdir, "deploy.prototxt")
deploy = caffe.Net(deploy_path, weights, caffe.TEST) if weights else caffe.Net(deploy_path, caffe.TEST)
deploy_misfits = copy_by_name(net, deploy)[0]
for name in deploy.inputs:
    deploy.blobs[name].data[...] = rng.normal(0, 50, deploy.blobs[name].data.shape)
result = deploy.forward()
producers = {top: layer.type for i, layer in enumerate(deploy.layers)
             for top in deploy.top_names[deploy._layer_names[i]]}
outputs = {name: {"shape": list(value.shape), "finite": bool(np.isfinite(value).all()), "layer": producers[name],
                  "sums": np.asarray(value).sum(axis=1).ravel().tolist()} for name, value in result.items()}
print(json.dumps({
    "misfits": misfits, "losses": losses, "types": {name: layer_types(net)[name] for name in net.params},
    "moved": moved, "train_params": shapes(net.params), "deploy_params": shapes(deploy.params),
    "deploy_misfits": deploy_misfits, "outputs": outputs,
}))
"""


def _train(outdir: str, weights: Optional[str], reference: Optional[str]) -> dict:
    run = subprocess.run(
        [sys.executable, "-c", _TRAIN_SCRIPT, os.path.abspath(outdir), str(STEPS), weights or "", reference or ""],
        capture_output=True, text=True, env={**os.environ, "GLOG_minloglevel": "2"}, cwd=outdir,
    )
    assert run.returncode == 0, f"Caffe failed on {outdir}:\n{run.stderr[-3000:]}"
    return json.loads(run.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------
# What the written train_val says must happen
# ---------------------------------------------------------------------------


def _train_layers(path: str) -> Dict[str, object]:
    """The TRAIN-phase layers of a written net, by name."""
    from caffe_ft.net.shapes import filter_layers

    message = files.load_text(path, load_schema()).message
    return {layer.name: layer for layer in filter_layers(message, "TRAIN")}


def _lr_mults(layer: object, blobs: int) -> List[float]:
    """Each blob's lr_mult as Caffe applies it (1 where no param spec says otherwise)."""
    specs = list(layer.param)
    return [specs[i].lr_mult if i < len(specs) else 1.0 for i in range(blobs)]


def _heads(layers: Dict[str, object]) -> List[str]:
    """Layers whose output a SoftmaxWithLoss scores: the classifier heads."""
    producers = {}
    for layer in layers.values():
        for top in layer.top:
            producers[top] = layer.name
    return [producers[layer.bottom[0]] for layer in layers.values()
            if layer.type == "SoftmaxWithLoss"]


def _check_training(outdir: str, report: dict) -> None:
    assert not report["misfits"], "pretrained layers Caffe would refuse to copy"
    layers = _train_layers(os.path.join(outdir, "train_val.prototxt"))
    frozen, trained = [], []
    for name, moved in report["moved"].items():
        layer = layers[name]
        if report["types"][name] == "BatchNorm":
            # Caffe never lets the solver touch the statistics; only use_global_stats keeps them still.
            still = layer.batch_norm_param.use_global_stats
            (frozen if still else trained).extend((name, i, flag) for i, flag in enumerate(moved))
            continue
        for i, (mult, flag) in enumerate(zip(_lr_mults(layer, len(moved)), moved)):
            (frozen if mult == 0 else trained).append((name, i, flag))
    assert not [blob for blob in frozen if blob[2]], "frozen blobs moved"
    assert not [blob for blob in trained if not blob[2]], "trained blobs did not move"
    heads = _heads(layers)
    assert heads
    for head in heads:
        assert report["train_params"][head][0][0] == NUM_CLASSES, head
        assert all(report["moved"][head]), head
    for step in report["losses"]:
        assert step and np.isfinite(step).all(), report["losses"]


def _check_deploy(report: dict) -> None:
    train, deploy = report["train_params"], report["deploy_params"]
    assert set(deploy) <= set(train), "deploy layers with parameters the train net does not have"
    assert not report["deploy_misfits"], "trained layers that do not fit the deploy net"
    assert report["outputs"]
    for name, output in report["outputs"].items():
        assert output["shape"][1] == NUM_CLASSES, (name, output["shape"])
        assert output["finite"], name
        if output["layer"] == "Softmax":
            assert np.allclose(output["sums"], 1.0, atol=1e-4), name


@pytest.mark.caffe
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("net", NETS, ids=[net.id for net in NETS])
def test_rewrite_trains_in_caffe(net, strategy, image_lists, tmp_path):
    train, val = image_lists(net.size, net.grey)
    outdir = str(tmp_path / "out")
    result = _rewrite(_plain_file(net.path, str(tmp_path)), outdir, _strategy_args(strategy, net),
                      *_data_args(net, train, val))
    assert result.exit_code == 0, result.stderr
    report = _train(outdir, net.weights, net.reference and _plain_file(net.reference, str(tmp_path)))
    _check_training(outdir, report)
    _check_deploy(report)


@pytest.mark.caffe
@pytest.mark.parametrize("net", [net for net in NETS if net.path in (LENET, CIFAR_QUICK)], ids=["lenet", "cifar_quick"])
def test_default_preprocessing_trains_in_caffe(net, image_lists, tmp_path):
    """No --mean-value: the defaults must suit the input (no BGR mean on a grey net)."""
    train, val = image_lists(net.size, net.grey)
    outdir = str(tmp_path / "out")
    result = _rewrite(_plain_file(net.path, str(tmp_path)), outdir, _strategy_args("last-fc", net),
                      *_data_args(net, train, val, means=False))
    assert result.exit_code == 0, result.stderr
    report = _train(outdir, net.weights, _plain_file(net.reference, str(tmp_path)))
    _check_training(outdir, report)
    _check_deploy(report)


# ---------------------------------------------------------------------------
# Nets without a classifier, or whose head cannot take one label per image
# ---------------------------------------------------------------------------


@pytest.mark.caffe
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("net, message, remedy", [
    (Net("examples/siamese/mnist_siamese_train_test.prototxt", 28, grey=True), "no classifier head found", "--head"),
    (Net("examples/siamese/mnist_siamese.prototxt", 28, grey=True), "no classifier head found", "--head"),
    (Net(RCNN, 227), "no classifier head found", "--head"),
    # At 451x451 the head scores 8x8 positions, and an image list has one label per image.
    (Net(FULL_CONV, 451), "64 scores per image", "--crop-size"),
], ids=["siamese-train_test", "siamese-deploy", "rcnn-no-head", "full_conv-no-crop"])
def test_rewrite_refuses_clearly(net, message, remedy, strategy, image_lists, tmp_path):
    train, val = image_lists(net.size, net.grey)
    outdir = tmp_path / "out"
    result = _rewrite(_plain_file(net.path, str(tmp_path)), str(outdir), _strategy_args(strategy, net),
                      *_data_args(net, train, val))
    assert result.exit_code == 2
    assert message in result.stderr and remedy in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not outdir.exists()


# ---------------------------------------------------------------------------
# A SqueezeNet-style head: conv10 -> ReLU -> global AVE pool -> loss / prob
# ---------------------------------------------------------------------------

# The layers of DeepScale's SqueezeNet v1.1 train_val.prototxt (github.com/DeepScale/SqueezeNet), one fire
# module kept and the input made small: the classifier is a 1x1 convolution whose scores reach the loss
# through a ReLU and a global average pooling.
_SQUEEZE_BODY = """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 16 kernel_size: 3 stride: 2 weight_filler { type: "xavier" } } }
layer { name: "relu_conv1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "fire2/squeeze1x1" type: "Convolution" bottom: "pool1" top: "fire2/squeeze1x1"
  convolution_param { num_output: 8 kernel_size: 1 weight_filler { type: "xavier" } } }
layer { name: "fire2/relu_squeeze1x1" type: "ReLU" bottom: "fire2/squeeze1x1" top: "fire2/squeeze1x1" }
layer { name: "fire2/expand1x1" type: "Convolution" bottom: "fire2/squeeze1x1" top: "fire2/expand1x1"
  convolution_param { num_output: 16 kernel_size: 1 weight_filler { type: "xavier" } } }
layer { name: "fire2/relu_expand1x1" type: "ReLU" bottom: "fire2/expand1x1" top: "fire2/expand1x1" }
layer { name: "fire2/expand3x3" type: "Convolution" bottom: "fire2/squeeze1x1" top: "fire2/expand3x3"
  convolution_param { num_output: 16 pad: 1 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "fire2/relu_expand3x3" type: "ReLU" bottom: "fire2/expand3x3" top: "fire2/expand3x3" }
layer { name: "fire2/concat" type: "Concat" bottom: "fire2/expand1x1" bottom: "fire2/expand3x3" top: "fire2/concat" }
layer { name: "drop9" type: "Dropout" bottom: "fire2/concat" top: "fire2/concat" dropout_param { dropout_ratio: 0.5 } }
layer { name: "conv10" type: "Convolution" bottom: "fire2/concat" top: "conv10"
  convolution_param { num_output: 1000 kernel_size: 1 weight_filler { type: "gaussian" mean: 0.0 std: 0.01 } } }
layer { name: "relu_conv10" type: "ReLU" bottom: "conv10" top: "conv10" }
layer { name: "pool10" type: "Pooling" bottom: "conv10" top: "pool10" pooling_param { pool: AVE global_pooling: true } }
"""
SQUEEZE_TRAIN_VAL = """name: "SqueezeNet"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { mirror: true mean_value: 104 mean_value: 117 mean_value: 123 }
  data_param { source: "examples/imagenet/ilsvrc12_train_lmdb" batch_size: 32 backend: LMDB } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { mean_value: 104 mean_value: 117 mean_value: 123 }
  data_param { source: "examples/imagenet/ilsvrc12_val_lmdb" batch_size: 25 backend: LMDB } }
""" + _SQUEEZE_BODY + """
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "pool10" bottom: "label" top: "loss" include { phase: TRAIN } }
layer { name: "accuracy" type: "Accuracy" bottom: "pool10" bottom: "label" top: "accuracy" include { phase: TEST } }
"""
SQUEEZE_DEPLOY = """name: "SqueezeNet"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 32 dim: 32 } } }
""" + _SQUEEZE_BODY + """
layer { name: "prob" type: "Softmax" bottom: "pool10" top: "prob" }
"""

# In the output folder: random weights into the TEST net of train_val.prototxt, one forward pass over the
# validation images; the deploy net gets the same weights and input.  Then two SGD steps of the solver.
_SQUEEZE_SCRIPT = r"""
import json
import numpy as np
import caffe

caffe.set_mode_cpu()
rng = np.random.default_rng(0)
test = caffe.Net("train_val.prototxt", caffe.TEST)
for blobs in test.params.values():
    for blob in blobs:
        blob.data[...] = rng.normal(0, 0.1, blob.data.shape)
test.forward()
deploy = caffe.Net("deploy.prototxt", caffe.TEST)
for name, blobs in deploy.params.items():
    for blob, source in zip(blobs, test.params[name]):
        blob.data[...] = source.data
deploy.blobs["data"].reshape(*test.blobs["data"].data.shape)
deploy.blobs["data"].data[...] = test.blobs["data"].data
output = deploy.forward()
name = deploy.outputs[0]
scores = test.blobs["pool10"].data.reshape(test.blobs["pool10"].data.shape[:2])
expected = np.exp(scores - scores.max(axis=1, keepdims=True))
expected /= expected.sum(axis=1, keepdims=True)
solver = caffe.SGDSolver("solver.prototxt")
solver.step(2)
print(json.dumps({"output": name, "shape": list(output[name].shape),
                  "error": float(np.abs(output[name].reshape(expected.shape) - expected).max()),
                  "loss": float(solver.net.blobs["loss"].data)}))
"""


@pytest.mark.caffe
@pytest.mark.parametrize("given", ["train_val", "deploy"])
def test_squeezenet_style_head_keeps_its_pooling(given, image_lists, tmp_path):
    """The loss and the deploy net's Softmax read the pooled scores (N x K), not the conv head's
    N x K x H x W, whether the net given is the train_val or the deploy net."""
    train, val = image_lists(32, False)
    net = tmp_path / f"{given}.prototxt"
    net.write_text(SQUEEZE_TRAIN_VAL if given == "train_val" else SQUEEZE_DEPLOY)
    outdir = tmp_path / "out"
    result = cli_runner().invoke(main, ["rewrite", str(net), "--strategy", "last-fc", "--train-data", train,
                                        "--val-data", val, "--batch-size", "2", "--val-batch-size", "2",
                                        "-o", str(outdir)], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    written = files.load_text(str(outdir / "train_val.prototxt"), load_schema()).message
    losses = [layer for layer in written.layer if layer.type in ("SoftmaxWithLoss", "Accuracy")]
    assert losses and all(layer.bottom[0] == "pool10" for layer in losses)
    run = subprocess.run([sys.executable, "-c", _SQUEEZE_SCRIPT], cwd=str(outdir), capture_output=True, text=True,
                         env={**os.environ, "GLOG_minloglevel": "2"})
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["shape"][:2] == [VAL_IMAGES, NUM_CLASSES] and all(d == 1 for d in report["shape"][2:])
    assert report["error"] < 1e-5
    assert np.isfinite(report["loss"])


def test_head_feeding_another_head_is_refused(tmp_path):
    net = tmp_path / "net.prototxt"
    net.write_text(SQUEEZE_DEPLOY)
    result = _rewrite(str(net), str(tmp_path / "out"), ["--strategy", "last-fc", "--head", "fire2/expand1x1"])
    assert result.exit_code == 2
    assert "--head 'fire2/expand1x1' feeds 'conv10'" in result.stderr


# ---------------------------------------------------------------------------
# The bare command: a net and a strategy, nothing else
# ---------------------------------------------------------------------------

DOC_NETS = [net for net in NETS if not os.path.isabs(net.path)]
DIGITS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples", "digits")


def digits_weights(path: str, env: Dict[str, str]) -> str:
    """The digits deploy net's weights as pycaffe initialises them (its fillers), saved at ``path``."""
    made = subprocess.run([sys.executable, "-c", "import caffe, sys; caffe.Net(sys.argv[1], caffe.TEST).save(sys.argv[2])",
                           os.path.join(DIGITS, "deploy.prototxt"), path], capture_output=True, text=True, env=env)
    assert made.returncode == 0, made.stderr
    return path
QUOTED_ABSOLUTE = re.compile(r'"(/[^"]*)"')


def _check_review_promises(source: str, outdir, command: List[str]) -> None:
    """`--diff` is no longer than `diff -u` on the same files, and every comment of the input is in
    the output or in the summary's list of dropped comments (by its line number)."""
    from caffe_ft.formats.prototext import comment_lines

    shown = cli_runner().invoke(main, [*command, "--diff", "--dry-run"], catch_exceptions=False)
    assert shown.exit_code == 0, shown.stderr
    summary = (outdir / "summary.md").read_text()
    plain = 0
    for name in ("train_val.prototxt", "deploy.prototxt"):
        if not (outdir / name).exists():
            continue
        done = subprocess.run(["diff", "-u", source, str(outdir / name)], capture_output=True, text=True)
        plain += len(done.stdout.splitlines())
        kept = [comment for _, comment in comment_lines((outdir / name).read_text())]
        for number, comment in comment_lines(open(source, encoding="utf-8").read()):
            if comment in kept:
                kept.remove(comment)
                continue
            listed = " ".join(re.findall(rf"^- {name}: .*", summary, re.M))
            ranges = [(int(a), int(b or a)) for a, b in re.findall(r"lines? (\d+)(?:-(\d+))? '", listed)]
            assert any(a <= number <= b for a, b in ranges), (name, number, comment)
    assert len(shown.output.splitlines()) <= plain


@pytest.mark.caffe
@pytest.mark.parametrize("net", DOC_NETS, ids=[net.id for net in DOC_NETS])
def test_bare_rewrite_of_every_caffe_doc_net(net, tmp_path):
    """`caffe-ft rewrite NET --strategy last-fc` alone works (--head only where no Softmax or
    loss names the head), keeps the heads' class count and says so, and writes no absolute path."""
    source = _plain_file(net.path, str(tmp_path))
    outdir = tmp_path / "out"
    head = [arg for arg in net.args if arg != "--crop-size" and not arg.isdigit()]
    result = cli_runner().invoke(main, ["rewrite", source, "--strategy", "last-fc", "-o", str(outdir), *head],
                                 catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    assert "kept (no --num-classes or --train-data" in result.output
    with open(source, encoding="utf-8") as handle:
        given = set(QUOTED_ABSOLUTE.findall(handle.read()))
    written = sorted(os.listdir(outdir))
    assert "summary.md" in written and ("deploy.prototxt" in written or "train_val.prototxt" in written)
    for name in written:
        absolute = set(QUOTED_ABSOLUTE.findall((outdir / name).read_text())) - given
        assert not absolute, (name, absolute)
    _check_review_promises(source, outdir, ["rewrite", source, "--strategy", "last-fc", "-o", str(outdir), *head])
    if "deploy.prototxt" in written:  # it loads in Caffe
        run = subprocess.run([sys.executable, "-c", "import caffe, sys; caffe.Net(sys.argv[1], caffe.TEST)",
                              str(outdir / "deploy.prototxt")], capture_output=True, text=True,
                             env={**os.environ, "GLOG_minloglevel": "2"})
        assert run.returncode == 0, run.stderr[-2000:]


# ---------------------------------------------------------------------------
# caffe-doc's own solvers, rewritten along with their nets
# ---------------------------------------------------------------------------

# Parses the written solver with Caffe's own protobuf classes and builds it:
# prints its type, base_lr, the number of test nets and the train net's losses.
_SOLVER_SCRIPT = r"""
import json, sys
import caffe
from caffe.proto import caffe_pb2
from google.protobuf import text_format

caffe.set_mode_cpu()
param = caffe_pb2.SolverParameter()
text_format.Merge(open(sys.argv[1]).read(), param)
solver = caffe.get_solver(sys.argv[1])
print(json.dumps({"type": param.type, "base_lr": param.base_lr, "test_nets": len(solver.test_nets),
                  "losses": [layer.type for layer in solver.net.layers if layer.type.endswith("Loss")]}))
"""

SOLVERS = [
    ("models/bvlc_reference_caffenet/solver.prototxt", "models/bvlc_reference_caffenet/train_val.prototxt.gz"),
    ("models/bvlc_alexnet/solver.prototxt", "models/bvlc_alexnet/train_val.prototxt.gz"),
    ("models/bvlc_googlenet/solver.prototxt", "models/bvlc_googlenet/train_val.prototxt.gz"),
    ("models/bvlc_googlenet/quick_solver.prototxt", "models/bvlc_googlenet/train_val.prototxt.gz"),
    ("models/finetune_flickr_style/solver.prototxt", "models/finetune_flickr_style/train_val.prototxt.gz"),
    ("examples/finetune_pascal_detection/pascal_finetune_solver.prototxt",
     "examples/finetune_pascal_detection/pascal_finetune_trainval_test.prototxt"),
    ("examples/cifar10/cifar10_quick_solver.prototxt", "examples/cifar10/cifar10_quick_train_test.prototxt"),
    ("examples/cifar10/cifar10_quick_solver_lr1.prototxt", "examples/cifar10/cifar10_quick_train_test.prototxt"),
    ("examples/cifar10/cifar10_full_solver.prototxt", "examples/cifar10/cifar10_full_train_test.prototxt"),
    ("examples/cifar10/cifar10_full_solver_lr1.prototxt", "examples/cifar10/cifar10_full_train_test.prototxt"),
    ("examples/cifar10/cifar10_full_solver_lr2.prototxt", "examples/cifar10/cifar10_full_train_test.prototxt"),
    ("examples/cifar10/cifar10_full_sigmoid_solver.prototxt",
     "examples/cifar10/cifar10_full_sigmoid_train_test.prototxt"),
    ("examples/cifar10/cifar10_full_sigmoid_solver_bn.prototxt",
     "examples/cifar10/cifar10_full_sigmoid_train_test_bn.prototxt"),
    ("examples/mnist/lenet_solver.prototxt", "examples/mnist/lenet_train_test.prototxt"),
    ("examples/mnist/lenet_multistep_solver.prototxt", "examples/mnist/lenet_train_test.prototxt"),
    ("examples/mnist/lenet_adadelta_solver.prototxt", "examples/mnist/lenet_train_test.prototxt"),
    ("examples/mnist/lenet_solver_adam.prototxt", "examples/mnist/lenet_train_test.prototxt"),
    ("examples/mnist/lenet_solver_rmsprop.prototxt", "examples/mnist/lenet_train_test.prototxt"),
    ("examples/mnist/lenet_consolidated_solver.prototxt", "examples/mnist/lenet_train_test.prototxt"),
]


@pytest.mark.caffe
@pytest.mark.parametrize("solver_path, net_path", SOLVERS,
                         ids=[f"{path.split('/')[1]}-{os.path.basename(path)[:-9]}" for path, _ in SOLVERS])
def test_rewritten_caffe_doc_solvers_load_in_caffe(solver_path, net_path, image_lists, tmp_path):
    from caffe_ft.recipe.solver import looks_like_finetuning, solver_originals

    net = next(net for net in NETS if net.path == net_path)
    train, val = image_lists(net.size, net.grey)
    outdir = tmp_path / "out"
    solver = _plain_file(solver_path, str(tmp_path))
    result = _rewrite(_plain_file(net_path, str(tmp_path)), str(outdir), _strategy_args("last-fc", net),
                      "--solver", solver, *_data_args(net, train, val))
    assert result.exit_code == 0, result.stderr
    run = subprocess.run([sys.executable, "-c", _SOLVER_SCRIPT, "solver.prototxt"], cwd=str(outdir),
                         capture_output=True, text=True, env={**os.environ, "GLOG_minloglevel": "2"})
    assert run.returncode == 0, run.stderr[-3000:]
    built = json.loads(run.stdout.strip().splitlines()[-1])
    schema = load_schema()
    original = files.load_text(solver, schema).message
    assert built["type"] == (original.type or "SGD")
    scale = 1.0 if looks_like_finetuning(original, files.load_text(_plain_file(net_path, str(tmp_path)), schema).message) else 0.1
    assert (scale == 1.0) == ("already looks like a fine-tuning solver" in result.output)
    assert built["base_lr"] == pytest.approx(float(solver_originals(original)["base_lr"]) * scale, rel=1e-6)
    assert built["test_nets"] == max(len(original.test_iter), 1)
    assert built["losses"] == ["SoftmaxWithLoss"]
    # A few epochs of the 4-image list in batches of 2, and the last test scores the final weights.
    written = files.load_text(str(outdir / "solver.prototxt"), schema).message
    assert written.max_iter <= 10 * 2, written.max_iter
    if len(written.test_iter):
        assert written.max_iter % written.test_interval == 0
        assert list(written.test_iter) == [1] * len(written.test_iter)  # 2 validation images, batches of 2


# ---------------------------------------------------------------------------
# The same rules without Caffe (these also run on the host)
# ---------------------------------------------------------------------------

GREY_DEPLOY = """name: "grey"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: CHANNELS dim: 28 dim: 28 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 10 } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""

FULLY_CONVOLUTIONAL = """name: "fcn"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 12 dim: 12 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param { num_output: 10 kernel_size: 3 } }
layer { name: "prob" type: "Softmax" bottom: "conv" top: "prob" }
"""


def _written_data_layers(tmp_path, text: str, *args: str):
    """Rewrite ``text`` (last-fc, an image list as data); the new train net's data layers."""
    net = tmp_path / "net.prototxt"
    net.write_text(text)
    images = tmp_path / "list.txt"
    images.write_text("a.png 0\nb.png 1\n")
    result = _rewrite(str(net), str(tmp_path / "out"), ["--strategy", "last-fc"],
                      "--train-data", str(images), "--val-data", str(images), *args)
    assert result.exit_code == 0, result.stderr
    written = files.load_text(str(tmp_path / "out" / "train_val.prototxt"), load_schema()).message
    return [layer for layer in written.layer if layer.type == "ImageData"]


@pytest.mark.parametrize("channels, colour, means", [(1, False, []), (3, True, [104, 117, 123])])
def test_deploy_input_decides_colour_and_default_mean(tmp_path, channels, colour, means):
    layers = _written_data_layers(tmp_path, GREY_DEPLOY.replace("CHANNELS", str(channels)))
    assert len(layers) == 2
    for layer in layers:
        assert layer.image_data_param.is_color == colour
        assert list(layer.transform_param.mean_value) == means


@pytest.mark.parametrize("means, colour", [(["0"], False), (["1", "2", "3"], True), ([], True)])
def test_lmdb_net_is_grey_when_given_one_mean_value(tmp_path, means, colour):
    args = ["--crop-size", "28"] + [arg for value in means for arg in ("--mean-value", value)]
    layers = _written_data_layers(tmp_path, LMDB_TRAIN_VAL, *args)
    assert [layer.image_data_param.is_color for layer in layers] == [colour, colour]
    assert all(layer.transform_param.scale == pytest.approx(0.00390625) for layer in layers)


def test_fully_convolutional_head_needs_a_crop(tmp_path):
    net = tmp_path / "fcn.prototxt"
    net.write_text(FULLY_CONVOLUTIONAL)
    images = tmp_path / "list.txt"
    images.write_text("a.png 0\n")
    data = ["--train-data", str(images), "--val-data", str(images), "--batch-size", "2"]
    refused = _rewrite(str(net), str(tmp_path / "out"), ["--strategy", "last-fc"], *data)
    assert refused.exit_code == 2
    assert "2 x 3 x 10 x 10" in refused.stderr and "100 scores per image" in refused.stderr
    assert "--crop-size" in refused.stderr
    # cropped to the kernel's size, the head scores each image once
    layers = _written_data_layers(tmp_path, FULLY_CONVOLUTIONAL, "--crop-size", "3")
    assert [layer.transform_param.crop_size for layer in layers] == [3, 3]


@pytest.mark.parametrize("top_k, num_classes, kept", [(5, 3, False), (5, 5, False), (5, 6, True), (1, 2, True)])
def test_top_k_accuracy_that_cannot_tell_anything_is_removed(parse_net, top_k, num_classes, kept):
    from caffe_ft.recipe.strategies import StrategyOptions, apply_strategy

    net = parse_net(LMDB_TRAIN_VAL + (
        'layer { name: "top-k" type: "Accuracy" bottom: "ip" bottom: "label" top: "top-k" '
        f'accuracy_param {{ top_k: {top_k} }} include {{ phase: TEST }} }}'
    ))
    result = apply_strategy("last-fc", net, StrategyOptions(num_classes=num_classes))
    assert ("top-k" in [layer.name for layer in result.net.layer]) == kept
    assert ("top-k" in result.removed) != kept
    assert any("top-k" in note for note in result.notes) != kept


@pytest.mark.caffe
def test_output_folder_moves_with_its_data_and_trains_from_anywhere(tmp_path):
    """A rewrite run with relative paths names everything relative to the output folder (the grey
    16x16 list needs no --crop-size or --gray); the whole tree moved elsewhere, `caffe-ft train`
    started from a third folder trains, tests the final weights and snapshots inside the folder."""
    import shutil

    work = tmp_path / "work"
    digits = DIGITS
    _image_list(str(work / "data"), "train", 16, True, 6, seed=1)
    _image_list(str(work / "data"), "val", 16, True, 3, seed=2)
    for name in ("train", "val"):  # entries relative to the working directory, as Caffe reads them
        listed = (work / "data" / f"{name}.txt").read_text().replace(str(work) + "/", "")
        (work / "data" / f"{name}.txt").write_text(listed)
    run = subprocess.run([sys.executable, "-m", "caffe_ft.cli", "rewrite", os.path.join(digits, "train_val.prototxt"),
                          "--solver", os.path.join(digits, "solver.prototxt"), "--strategy", "full",
                          "--train-data", "data/train.txt", "--val-data", "data/val.txt", "--batch-size", "2",
                          "--val-batch-size", "3", "--epochs", "2", "-o", "ft"], cwd=str(work),
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    for name in ("train_val.prototxt", "solver.prototxt", "deploy.prototxt", "summary.md"):
        assert str(tmp_path) not in (work / "ft" / name).read_text(), name
    assert "is_color: false" in (work / "ft" / "train_val.prototxt").read_text()
    moved = tmp_path / "elsewhere" / "moved"
    shutil.move(str(work), str(moved))
    (tmp_path / "third").mkdir()
    run = subprocess.run([sys.executable, "-m", "caffe_ft.cli", "train", "../elsewhere/moved/ft/solver.prototxt",
                          "--cpu", "--metrics", "m.jsonl"], cwd=str(tmp_path / "third"), capture_output=True,
                         text=True, env={**os.environ, "GLOG_minloglevel": "2"})
    assert run.returncode == 0, run.stderr[-3000:]
    tests = [json.loads(line) for line in (tmp_path / "third" / "m.jsonl").read_text().splitlines()
             if json.loads(line).get("phase") == "test"]
    assert tests and tests[-1]["iteration"] == 6  # 2 epochs of 3 batches: the final weights are tested
    assert (moved / "ft" / "digitsnet_iter_6.caffemodel").exists()


@pytest.mark.caffe
def test_finetune_stopped_prints_how_to_resume_and_resumes(tmp_path):
    """Ctrl-C in `caffe-ft finetune` snapshots and prints the same command with --resume; that command
    finishes the job, whose last test scores the final weights."""
    import shlex
    import signal
    import time

    digits = DIGITS
    train = _image_list(str(tmp_path / "data"), "train", 16, True, 8, seed=3)
    val = _image_list(str(tmp_path / "data"), "val", 16, True, 3, seed=4)
    env = {**os.environ, "GLOG_minloglevel": "2"}
    weights = digits_weights(str(tmp_path / "pretrained.caffemodel"), env)
    command = ["finetune", os.path.join(digits, "train_val.prototxt"), "--weights", weights, "--strategy", "full",
               "--train-data", train, "--val-data", val, "--batch-size", "2", "--max-iter", "400", "--cpu",
               "-o", "ft"]
    proc = subprocess.Popen([sys.executable, "-m", "caffe_ft.cli", *command], cwd=str(tmp_path), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    metrics = tmp_path / "ft" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and any(json.loads(line).get("iteration", 0) >= 20
                                    for line in metrics.read_text().splitlines()[:-1]):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    line = next(line for line in stderr.splitlines() if line.startswith("resume with: caffe-ft finetune "))
    words = shlex.split(line[len("resume with: "):])
    assert words[-2] == "--resume" and words[-1].endswith(".solverstate")
    done = subprocess.run([sys.executable, "-m", "caffe_ft.cli", *words[1:]], cwd=str(tmp_path), env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the final weights' test: accuracy" in done.stdout
    tests = [json.loads(line) for line in metrics.read_text().splitlines() if json.loads(line).get("phase") == "test"]
    assert tests[-1]["iteration"] == 400
    assert (tmp_path / "ft" / "final.caffemodel").exists()


@pytest.mark.caffe
def test_finetune_keeps_the_best_test(tmp_path):
    """`finetune --keep-best accuracy`: OUTDIR/best.caffemodel is the snapshot of the best test the
    metrics record, and summary.md gives the best and the last result with their iterations."""
    train = _image_list(str(tmp_path / "data"), "train", 16, True, 8, seed=3)
    val = _image_list(str(tmp_path / "data"), "val", 16, True, 4, seed=4)
    env = {**os.environ, "GLOG_minloglevel": "2"}
    weights = digits_weights(str(tmp_path / "pretrained.caffemodel"), env)
    done = subprocess.run([sys.executable, "-m", "caffe_ft.cli", "finetune", os.path.join(DIGITS, "train_val.prototxt"),
                           "--weights", weights, "--strategy", "full", "--train-data", train, "--val-data", val,
                           "--batch-size", "2", "--epochs", "6", "--cpu", "--keep-best", "accuracy", "-o", "ft"],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    tests = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    tests = [t for t in tests if t["phase"] == "test"]
    accuracies = [t["outputs"]["accuracy"] for t in tests]
    at = tests[accuracies.index(max(accuracies))]["iteration"]
    summary = (tmp_path / "ft" / "summary.md").read_text()
    assert f"best accuracy: {max(accuracies):.4f} at iteration {at}" in summary
    assert f"last accuracy: {accuracies[-1]:.4f} at iteration {tests[-1]['iteration']}" in summary
    # The best weights score, on the same test batches, what the best test recorded.
    count = int(re.search(r"test_iter: (\d+)", (tmp_path / "ft" / "solver.prototxt").read_text()).group(1))
    script = ("import caffe, sys; caffe.set_mode_cpu(); net = caffe.Net('train_val.prototxt', 'best.caffemodel', "
              f"caffe.TEST); print(sum(float(net.forward()['accuracy']) for _ in range({count})) / {count})")
    scored = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path / "ft"), capture_output=True, text=True,
                            env=env)
    assert scored.returncode == 0, scored.stderr
    assert float(scored.stdout) == pytest.approx(max(accuracies), abs=1e-6)
