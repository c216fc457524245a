"""The torch engine computes what Caffe computes: every blob of real nets'
TEST-phase forward pass equals pycaffe's within 1e-4 relative.

pycaffe runs in the reference environment (tests/training/torch_parity_ref.py) and
torch on the host; the arrays meet in a cache directory (tests/training/torch_parity.py).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import sys

sys.path.insert(0, os.path.dirname(__file__))
from torch_parity import cached_dir, dumps, in_root, load_blobs, relative_error  # noqa: E402
from torch_zoo import ZOO  # noqa: E402

pytestmark = pytest.mark.host

DOC = "/usr/share/doc/caffe-doc"
NETS = [
    {"name": "lenet", "prototxt": f"{DOC}/examples/mnist/lenet.prototxt", "weights": None, "batch": 2},
    {"name": "cifar10_quick", "prototxt": f"{DOC}/examples/cifar10/cifar10_quick.prototxt", "weights": None,
     "batch": 2},
    {"name": "cifar10_full", "prototxt": f"{DOC}/examples/cifar10/cifar10_full.prototxt", "weights": None,
     "batch": 2},
    {"name": "caffenet", "prototxt": f"{DOC}/models/bvlc_reference_caffenet/deploy.prototxt", "weights": None,
     "batch": 1},
    {"name": "alexnet", "prototxt": f"{DOC}/models/bvlc_alexnet/deploy.prototxt", "weights": None, "batch": 1},
    {"name": "googlenet", "prototxt": f"{DOC}/models/bvlc_googlenet/deploy.prototxt.gz", "weights": None,
     "batch": 1},
    {"name": "nsfw_resnet50", "prototxt": "/opt/models/nsfw/deploy.prototxt",
     "weights": "/opt/models/nsfw/resnet_50_1by2_nsfw.caffemodel", "batch": 1},
]
# train_val nets, their data layers made Input layers: both phases where the
# TRAIN pass is deterministic (no Dropout), TEST for the others.
_MNIST = {"inputs": {"data": [1, 28, 28]}, "labels": {"label": 10}}
_CIFAR = {"inputs": {"data": [3, 32, 32]}, "labels": {"label": 10}}
_IMAGENET = {"labels": {"label": 1000}, "batch": 1, "weights": None}
for _phase in ("TRAIN", "TEST"):
    NETS += [
        {"name": f"lenet_train_test_{_phase}", "prototxt": f"{DOC}/examples/mnist/lenet_train_test.prototxt",
         "weights": None, "batch": 4, "phase": _phase, **_MNIST},
        {"name": f"cifar10_bn_{_phase}", "prototxt": f"{DOC}/examples/cifar10/cifar10_full_sigmoid_train_test_bn.prototxt",
         "weights": None, "batch": 4, "phase": _phase, **_CIFAR},
        {"name": f"mnist_autoencoder_{_phase}", "prototxt": f"{DOC}/examples/mnist/mnist_autoencoder.prototxt",
         "weights": None, "batch": 4, "phase": _phase, "inputs": {"data": [1, 28, 28]},
         **({"stages": ["test-on-test"]} if _phase == "TEST" else {})},
    ]
NETS += [
    {"name": "cifar10_quick_train_test_TRAIN", "prototxt": f"{DOC}/examples/cifar10/cifar10_quick_train_test.prototxt",
     "weights": None, "batch": 4, "phase": "TRAIN", **_CIFAR},
    {"name": "caffenet_train_val_TEST", "prototxt": f"{DOC}/models/bvlc_reference_caffenet/train_val.prototxt.gz",
     "phase": "TEST", "inputs": {"data": [3, 227, 227]}, **_IMAGENET},
    {"name": "googlenet_train_val_TEST", "prototxt": f"{DOC}/models/bvlc_googlenet/train_val.prototxt.gz",
     "phase": "TEST", "inputs": {"data": [3, 224, 224]}, **_IMAGENET},
]


_HDF5 = {"inputs": {"data": [4]}, "labels": {"label": 2}, "batch": 8, "weights": None}
for _phase in ("TRAIN", "TEST"):
    NETS += [
        {"name": f"hdf5_nonlinear_{_phase}", "prototxt": f"{DOC}/examples/hdf5_classification/nonlinear_train_val.prototxt",
         "phase": _phase, **_HDF5},
        {"name": f"cifar10_sigmoid_{_phase}", "prototxt": f"{DOC}/examples/cifar10/cifar10_full_sigmoid_train_test.prototxt",
         "weights": None, "batch": 4, "phase": _phase, **_CIFAR},
    ]
NETS += [
    {"name": "hdf5_logreg_TEST", "prototxt": f"{DOC}/examples/hdf5_classification/train_val.prototxt", "phase": "TEST",
     **_HDF5},
    {"name": "cifar10_full_train_test_TEST", "prototxt": f"{DOC}/examples/cifar10/cifar10_full_train_test.prototxt",
     "weights": None, "batch": 4, "phase": "TEST", **_CIFAR},
    {"name": "flickr_style_train_val_TEST", "prototxt": f"{DOC}/models/finetune_flickr_style/train_val.prototxt.gz",
     "phase": "TEST", "inputs": {"data": [3, 227, 227]}, **{**_IMAGENET, "labels": {"label": 20}}},
    {"name": "pascal_detection_TEST", "prototxt": f"{DOC}/examples/finetune_pascal_detection/"
     "pascal_finetune_trainval_test.prototxt", "phase": "TEST", "inputs": {"data": [3, 227, 227]},
     **{**_IMAGENET, "labels": {"label": 21}}},
    {"name": "imagenet_val_features", "prototxt": f"{DOC}/examples/feature_extraction/imagenet_val.prototxt",
     "phase": "TEST", "inputs": {"data": [3, 227, 227]}, **_IMAGENET},
    {"name": "rcnn_ilsvrc13", "prototxt": f"{DOC}/models/bvlc_reference_rcnn_ilsvrc13/deploy.prototxt",
     "weights": None, "batch": 1},
]
NETS += [{"name": "zoo_TRAIN", "prototxt": "zoo.prototxt", "weights": None, "batch": 2, "phase": "TRAIN",
          "labels": {"label": 4}}]


@pytest.fixture(scope="module")
def reference() -> str:
    missing = [net["prototxt"] for net in NETS
               if net["prototxt"].startswith("/") and not os.path.exists(in_root(net["prototxt"]))]
    assert not missing, f"the reference environment lacks {missing}"
    return cached_dir("forward", {"nets.json": dumps(NETS), "zoo.prototxt": ZOO.encode()})


@pytest.mark.parametrize("name", [net["name"] for net in NETS])
def test_forward_matches_pycaffe(reference: str, schema, name: str) -> None:  # type: ignore[no-untyped-def]
    import torch

    from caffe_ft.formats.caffemodel import load_model
    from caffe_ft.formats.files import load_net
    from caffe_ft.training.torch.net import CaffeNet

    where = os.path.join(reference, name)
    blobs = load_blobs(os.path.join(where, "blobs.npz"))
    entry = next(net for net in NETS if net["name"] == name)
    net = CaffeNet(load_net(os.path.join(where, "net.prototxt"), schema), entry.get("phase", "TEST"),
                   stages=entry.get("stages", ()))
    filled = net.load_blobs(load_model(os.path.join(where, "weights.caffemodel"), schema).layer_blobs())
    assert sorted(filled) == sorted(net.blobs_of)
    inputs = {top: torch.from_numpy(blobs[top]) for layer in net.sources for top in layer.top}
    with torch.no_grad():
        ours = net(inputs)
    # Caffe adds a Split layer (tops NAME_LAYER_0_split_K) where a blob feeds several layers.
    blobs = {blob: value for blob, value in blobs.items() if blob in ours or "_split_" not in blob}
    assert set(ours) == set(blobs)
    errors = {blob: relative_error(ours[blob].numpy(), blobs[blob]) for blob in blobs}
    worst = max(errors, key=errors.get)  # type: ignore[arg-type]
    assert errors[worst] < 1e-4, f"blob {worst}: relative error {errors[worst]:.3g}"
    # The outputs are not all constant: a net of constant blobs would match anything.
    assert any(np.std(blobs[name]) > 0 for name in blobs if name not in net.output_names or blobs[name].size > 1)
