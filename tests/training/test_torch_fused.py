"""The torch engine's fused BatchNorm+Scale computes what the two layers compute.

An in-place Scale right after a BatchNorm is folded into one ``batch_norm``
kernel (:func:`caffe_ft.training.torch.net.fuse_scales`): the same outputs,
loss, gradients and running statistics as the layer-by-layer path, with batch
statistics and with global ones, in both memory formats; pycaffe agrees after
20 iterations with global statistics too (batch statistics: the 20-iteration
tests of test_torch_train.py run the fused path); a BatchNorm whose
normalised value something else can see is left alone.
"""

from __future__ import annotations

import os
import sys
from typing import Dict, Tuple

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
import test_torch_train as base  # noqa: E402
from torch_parity import cached_dir, dumps, load_blobs, relative_error  # noqa: E402

pytestmark = pytest.mark.host
try:
    import torch
except ImportError:  # the reference environment, which deselects these host tests after collecting them
    torch = None

#: The 20-iteration net of test_torch_train.py with global statistics (eps 1: its blobs start at zero).
GLOBAL_NET = base.NET.replace("batch_norm_param { moving_average_fraction: 0.9 }",
                              "batch_norm_param { use_global_stats: true eps: 1 }")
GLOBAL_SOLVERS = {"sgd_global_stats": base.SOLVERS["sgd_fixed"]}


def _net(text: str, fuse: bool):  # type: ignore[no-untyped-def]
    from caffe_ft.formats import prototext
    from caffe_ft.formats.schema import load_schema
    from caffe_ft.training.torch.net import CaffeNet

    message = prototext.to_message(prototext.parse(text.encode()), load_schema().new("NetParameter"))
    return CaffeNet(message, "TRAIN", fuse=fuse)


def _pass(text: str, fuse: bool, channels_last: bool) -> Tuple[int, Dict[str, np.ndarray], Dict[str, np.ndarray]]:
    """Fold count, every blob and parameter after one forward+backward, and the gradients."""
    net = _net(text, fuse)
    rng = np.random.default_rng(7)
    with torch.no_grad():  # running statistics that are not zero, so the global path normalises
        mean, var, factor = net.blobs_of["bn1"]
        mean.copy_(torch.from_numpy(rng.normal(0, 1, mean.shape).astype(np.float32)))
        var.copy_(torch.from_numpy(rng.uniform(0.5, 2, var.shape).astype(np.float32)))
        factor.fill_(2.0)
        net.blobs_of["scale1"][0].copy_(torch.from_numpy(rng.uniform(0.5, 2, 6).astype(np.float32)))
        net.blobs_of["scale1"][1].copy_(torch.from_numpy(rng.normal(0, 1, 6).astype(np.float32)))
    data = torch.from_numpy(rng.normal(1, 2, (4, 3, 9, 9)).astype(np.float32))
    if channels_last:
        data = data.contiguous(memory_format=torch.channels_last)
    blobs = net({"data": data, "label": torch.tensor([0.0, 1, 2, 3])})
    net.loss.backward()
    values = {name: blob.detach().numpy().copy() for name, blob in blobs.items()}
    values.update({f"{layer}/{i}": array for layer, arrays in net.blob_arrays().items()
                   for i, array in enumerate(arrays)})
    grads = {f"{spec.layer}/{spec.index}": np.zeros(1) if spec.param.grad is None else spec.param.grad.numpy().copy()
             for spec in net.learnable}
    return net.fused, values, grads


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("text", [base.NET, GLOBAL_NET], ids=["batch_stats", "global_stats"])
def test_fused_batchnorm_scale_equals_the_two_layers(text: str, channels_last: bool) -> None:
    folded, fused, fused_grads = _pass(text, True, channels_last)
    plain_count, plain, plain_grads = _pass(text, False, channels_last)
    assert (folded, plain_count) == (1, 0)
    assert set(fused) == set(plain)
    for name in plain:
        assert relative_error(fused[name], plain[name]) < 1e-5, name
    assert set(fused_grads) == set(plain_grads)
    for name in plain_grads:
        assert relative_error(fused_grads[name], plain_grads[name]) < 1e-5, name
    # The Scale's gradients are real (they reach it through the fused kernel), and the statistics moved or not.
    assert np.abs(fused_grads["scale1/0"]).max() > 1e-3 and np.abs(fused_grads["scale1/1"]).max() > 1e-3
    moved = relative_error(fused["bn1/2"], np.array([2.0], np.float32)) > 0
    assert moved == (text is base.NET)


def test_fusion_leaves_a_visible_normalised_value_alone() -> None:
    out_of_place = base.NET
    for old, new in [('"Scale" bottom: "conv1" top: "conv1"', '"Scale" bottom: "conv1" top: "scaled"'),
                     ('"ReLU" bottom: "conv1" top: "conv1"', '"ReLU" bottom: "scaled" top: "scaled"'),
                     ('bottom: "conv1" top: "pool1"', 'bottom: "scaled" top: "pool1"')]:
        assert old in out_of_place
        out_of_place = out_of_place.replace(old, new)
    weighted = base.NET.replace('top: "conv1" batch_norm_param', 'top: "conv1" loss_weight: 0.5 batch_norm_param')
    assert weighted != base.NET
    assert _net(base.NET, True).fused == 1
    assert _net(out_of_place, True).fused == 0
    assert _net(weighted, True).fused == 0


def test_twenty_iterations_with_global_stats_match_pycaffe(schema) -> None:  # type: ignore[no-untyped-def]
    reference = cached_dir("train", {"net.prototxt": GLOBAL_NET.encode(), "data.npz": base._data(),
                                     "solvers.json": dumps(GLOBAL_SOLVERS)})
    trainer = base._trainer(reference, "sgd_global_stats", schema, GLOBAL_SOLVERS)
    assert trainer.net.fused == 1
    trainer.copy_from(os.path.join(reference, "init.caffemodel"))
    initial = trainer.net.blob_arrays()
    while trainer.iter < base.ITERATIONS:
        trainer.step()
    expected = load_blobs(os.path.join(reference, "sgd_global_stats", "params.npz"))
    base._compare(trainer, expected)
    assert relative_error(initial["scale1"][0], expected["scale1/0"]) > 1e-3
    assert float(expected["bn1/2"][0]) == 0  # global statistics: Caffe never touched them
