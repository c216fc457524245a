"""The torch engine's other Caffe 1.0 layers compute what Caffe computes, forward
and backward: InfogainLoss (H from a .binaryproto or a bottom), HDF5Data,
DummyData, Reduction, MVN, Tile, Embed, Parameter, BatchReindex, SPP,
ContrastiveLoss, HingeLoss, MultinomialLogisticLoss, Filter, Im2col,
HDF5Output (the file it writes), LSTM and RNN (cont resets, the state carried
from one pass to the next, a static input, exposed hidden states), WindowData
(windows with context padding, square crops, mean file or values).

Small nets made here run in pycaffe (tests/training/torch_layers_ref.py, in the
reference environment) and in the torch engine on the host: every blob after
the forward pass, and every parameter's gradient after the backward pass, agree
within 1e-4 relative.  A learnable layer (Scale, InnerProduct) before or after
the layer under test carries its backward pass into a compared gradient.
STOCHASTIC pooling has no CPU implementation in Caffe: it is checked against
Caffe's GPU kernels' formulas.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Dict, List

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from torch_parity import cached_dir, dumps, relative_error  # noqa: E402

pytestmark = pytest.mark.host

HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_layers_ref.py")


def _input(name: str, *shape: int) -> str:
    return f'layer {{ name: "{name}" type: "Input" top: "{name}" input_param {{ shape {{ {" ".join(f"dim: {d}" for d in shape)} }} }} }}\n'


def _scale(bottom: str, top: str, axis: int = 1, axes: int = 1) -> str:
    return (f'layer {{ name: "{top}" type: "Scale" bottom: "{bottom}" top: "{top}" '
            f'scale_param {{ axis: {axis} num_axes: {axes} bias_term: true }} }}\n')


def _ip(bottom: str, top: str, axis: int = 1) -> str:
    return (f'layer {{ name: "{top}" type: "InnerProduct" bottom: "{bottom}" top: "{top}" loss_weight: 1 '
            f'inner_product_param {{ num_output: 2 axis: {axis} }} }}\n')


def _values(rng: np.random.Generator, *shape: int) -> List[Any]:
    return np.round(rng.normal(0, 1, shape), 4).tolist()


def _nets() -> List[Dict[str, Any]]:
    rng = np.random.default_rng(11)
    nets: List[Dict[str, Any]] = []

    def add(name: str, text: str, **entry: Any) -> None:
        nets.append({"name": name, "prototxt": f"{name}.prototxt", "text": text, **entry})

    h = np.abs(rng.normal(0, 1, (5, 5))) + np.eye(5)
    add("infogain_source",
        _input("data", 4, 3) + _input("label", 4) + _scale("data", "scaled", 0, 2)
        + 'layer { name: "fc" type: "InnerProduct" bottom: "scaled" top: "fc" inner_product_param { num_output: 5 } }\n'
        'layer { name: "loss" type: "InfogainLoss" bottom: "fc" bottom: "label" top: "loss" top: "prob" '
        'loss_weight: 1 loss_weight: 0 infogain_loss_param { source: "H.binaryproto" } }\n',
        inputs={"data": _values(rng, 4, 3), "label": [0, 4, 2, 2]},
        binaryproto={"H.binaryproto": np.round(h, 4).reshape(1, 1, 5, 5).tolist()})
    add("infogain_bottom_axis_ignore",
        _input("data", 2, 4, 3) + _input("label", 2, 3) + _input("H", 1, 1, 4, 4) + _scale("data", "scaled", 1, 1)
        + 'layer { name: "loss" type: "InfogainLoss" bottom: "scaled" bottom: "label" bottom: "H" top: "loss" '
        'loss_param { ignore_label: 1 } infogain_loss_param { axis: 1 } }\n',
        inputs={"data": _values(rng, 2, 4, 3), "label": [[0, 1, 3], [2, 1, 1]],
                "H": np.round(np.abs(rng.normal(0, 1, (1, 1, 4, 4))), 4).tolist()})
    add("reduction",
        _input("data", 2, 3, 4) + _scale("data", "x")
        + "".join(f'layer {{ name: "r{i}" type: "Reduction" bottom: "x" top: "r{i}" loss_weight: {w} '
                  f'reduction_param {{ operation: {op} axis: {axis} coeff: {coeff} }} }}\n'
                  for i, (op, axis, coeff, w) in enumerate([("SUM", 1, 2, 1), ("ASUM", 0, 1, 0.5),
                                                            ("SUMSQ", 2, -0.5, 1), ("MEAN", -1, 3, 2)])),
        inputs={"data": _values(rng, 2, 3, 4)})
    add("mvn",
        _input("data", 2, 3, 4, 5) + _scale("data", "x")
        + 'layer { name: "m0" type: "MVN" bottom: "x" top: "m0" }\n'
        'layer { name: "m1" type: "MVN" bottom: "x" top: "m1" mvn_param { across_channels: true } }\n'
        'layer { name: "m2" type: "MVN" bottom: "x" top: "m2" mvn_param { normalize_variance: false } }\n'
        + _ip("m0", "f0") + _ip("m1", "f1") + _ip("m2", "f2"),
        inputs={"data": _values(rng, 2, 3, 4, 5)})
    add("tile",
        _input("data", 2, 3, 4) + _scale("data", "x")
        + 'layer { name: "t0" type: "Tile" bottom: "x" top: "t0" tile_param { axis: 1 tiles: 3 } }\n'
        'layer { name: "t1" type: "Tile" bottom: "x" top: "t1" tile_param { axis: -1 tiles: 2 } }\n'
        + _ip("t0", "f0") + _ip("t1", "f1"),
        inputs={"data": _values(rng, 2, 3, 4)})
    add("embed",
        _input("words", 2, 3)
        + 'layer { name: "embed" type: "Embed" bottom: "words" top: "e" embed_param { input_dim: 7 num_output: 4 } }\n'
        + _ip("e", "f", axis=2),
        inputs={"words": [[0, 6, 3], [3, 3, 1]]})
    add("parameter",
        'layer { name: "p" type: "Parameter" top: "p" parameter_param { shape { dim: 3 dim: 4 } } }\n'
        'layer { name: "sq" type: "Power" bottom: "p" top: "sq" loss_weight: 1 power_param { power: 2 } }\n'
        + _ip("p", "f"))
    add("batch_reindex",
        _input("data", 4, 3) + _input("permut", 5) + _scale("data", "x", 0, 2)
        + 'layer { name: "re" type: "BatchReindex" bottom: "x" bottom: "permut" top: "re" }\n' + _ip("re", "f"),
        inputs={"data": _values(rng, 4, 3), "permut": [3, 0, 0, 2, 1]})
    add("spp",
        _input("data", 2, 3, 13, 11) + _scale("data", "x")
        + 'layer { name: "s0" type: "SPP" bottom: "x" top: "s0" spp_param { pyramid_height: 3 } }\n'
        'layer { name: "s1" type: "SPP" bottom: "x" top: "s1" spp_param { pyramid_height: 2 pool: AVE } }\n'
        'layer { name: "s2" type: "SPP" bottom: "x" top: "s2" spp_param { pyramid_height: 1 } }\n'
        + _ip("s0", "f0") + _ip("s1", "f1") + _ip("s2", "f2"),
        inputs={"data": _values(rng, 2, 3, 13, 11)})
    add("dummy_data",
        'layer { name: "dummy" type: "DummyData" top: "a" top: "b" dummy_data_param { '
        'shape { dim: 2 dim: 3 } shape { dim: 2 dim: 3 dim: 2 } data_filler { type: "constant" value: 1.5 } '
        'data_filler { type: "constant" value: -0.25 } } }\n'
        'layer { name: "zeros" type: "DummyData" top: "z" dummy_data_param { num: 2 channels: 1 height: 2 width: 1 } }\n'
        + _ip("a", "fa") + _ip("b", "fb") + _ip("z", "fz"))
    add("hdf5_data",
        'layer { name: "h5" type: "HDF5Data" top: "data" top: "label" hdf5_data_param { source: "h5.txt" '
        'batch_size: 3 } }\n' + _scale("data", "x", 0, 2) + _ip("x", "f")
        + 'layer { name: "copy" type: "Power" bottom: "label" top: "label_out" }\n',
        passes=3, text_files={"h5.txt": "one.h5\ntwo.h5\n"},
        hdf5={"one.h5": {"data": _values(rng, 4, 2, 3), "label": [0, 1, 2, 3]},
              "two.h5": {"data": _values(rng, 2, 2, 3), "label": [4, 5]}})
    add("contrastive",
        _input("a", 6, 3) + _input("b", 6, 3) + _input("similar", 6) + _scale("a", "sa", 0, 2) + _scale("b", "sb", 0, 2)
        + 'layer { name: "c0" type: "ContrastiveLoss" bottom: "sa" bottom: "sb" bottom: "similar" top: "c0" '
        'contrastive_loss_param { margin: 3 } }\n'
        'layer { name: "c1" type: "ContrastiveLoss" bottom: "sa" bottom: "sb" bottom: "similar" top: "c1" '
        'loss_weight: 0.5 contrastive_loss_param { margin: 4 legacy_version: true } }\n',
        inputs={"a": _values(rng, 6, 3), "b": _values(rng, 6, 3), "similar": [1, 0, 0, 1, 0, 0]})
    add("hinge",
        _input("data", 4, 5) + _input("label", 4) + _scale("data", "x", 0, 2)
        + 'layer { name: "l1" type: "HingeLoss" bottom: "x" bottom: "label" top: "l1" }\n'
        'layer { name: "l2" type: "HingeLoss" bottom: "x" bottom: "label" top: "l2" loss_weight: 0.5 '
        'hinge_loss_param { norm: L2 } }\n',
        inputs={"data": _values(rng, 4, 5), "label": [0, 4, 2, 2]})
    # Some scaled probabilities fall below the 1e-20 floor (or below zero): Caffe's gradient there too.
    add("multinomial_logistic",
        _input("prob", 4, 5) + _input("label", 4) + _scale("prob", "p", 0, 2)
        + 'layer { name: "loss" type: "MultinomialLogisticLoss" bottom: "p" bottom: "label" top: "loss" }\n',
        inputs={"prob": np.round(rng.uniform(0.05, 1, (4, 5)), 4).tolist(), "label": [1, 0, 3, 4]})
    add("filter",
        _input("data", 5, 3) + _input("label", 5) + _input("target", 5, 3) + _input("keep", 5)
        + _scale("data", "x", 0, 2)
        + 'layer { name: "filter" type: "Filter" bottom: "x" bottom: "label" bottom: "target" bottom: "keep" '
        'top: "fx" top: "fl" top: "ft" }\n'
        'layer { name: "score" type: "InnerProduct" bottom: "fx" top: "score" inner_product_param { num_output: 2 } }\n'
        'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "fl" top: "loss" '
        'propagate_down: true propagate_down: false }\n'
        'layer { name: "e" type: "EuclideanLoss" bottom: "fx" bottom: "ft" top: "e" }\n',
        inputs={"data": _values(rng, 5, 3), "label": [1, 0, 1, 1, 0], "target": _values(rng, 5, 3),
                "keep": [1, 0, 1, 1, 0]})
    add("im2col",
        _input("data", 2, 3, 7, 6) + _input("seq", 2, 3, 8) + _scale("data", "x") + _scale("seq", "y")
        + 'layer { name: "i0" type: "Im2col" bottom: "x" top: "i0" convolution_param { kernel_size: 3 stride: 2 '
        'pad: 1 } }\n'
        'layer { name: "i1" type: "Im2col" bottom: "x" top: "i1" convolution_param { kernel_h: 2 kernel_w: 3 '
        'dilation: 2 } }\n'
        'layer { name: "i2" type: "Im2col" bottom: "y" top: "i2" convolution_param { kernel_size: 3 stride: 2 } }\n'
        + _ip("i0", "f0") + _ip("i1", "f1") + _ip("i2", "f2"),
        inputs={"data": _values(rng, 2, 3, 7, 6), "seq": _values(rng, 2, 3, 8)})
    add("hdf5_output",
        _input("data", 3, 2, 2) + _input("label", 3) + _scale("data", "x", 0, 3)
        + 'layer { name: "out" type: "HDF5Output" bottom: "x" bottom: "label" hdf5_output_param { '
        'file_name: "written.h5" } }\n' + _ip("x", "f"),
        inputs={"data": _values(rng, 3, 2, 2), "label": [2, 0, 1]}, written=["written.h5"])
    # One foreground and one background window (a third, between the thresholds, is dropped): the draws
    # cannot differ from Caffe's.  Context padding past the image's edge; a square crop with a mean file.
    add("window_data",
        'layer { name: "w1" type: "WindowData" top: "data1" top: "label1" transform_param { crop_size: 10 '
        'mean_value: 100 } window_data_param { source: "windows.txt" batch_size: 4 fg_fraction: 0.5 '
        'bg_threshold: 0.2 context_pad: 2 scale: 0.5 } }\n'
        'layer { name: "w2" type: "WindowData" top: "data2" top: "label2" transform_param { crop_size: 9 '
        'mean_file: "window_mean.binaryproto" } window_data_param { source: "windows.txt" batch_size: 3 '
        'fg_fraction: 0.34 bg_threshold: 0.2 crop_mode: "square" } }\n' + _ip("data1", "f1") + _ip("data2", "f2"),
        passes=2, text_files={"windows.txt": "# 0\nimg0.png\n3 20 16\n2\n3 0.9 2 3 12 17\n1 0.3 0 0 5 5\n"
                                             "# 1\nimg1.png\n3 12 18\n1\n0 0.1 4 1 15 10\n"},
        images={"img0.png": rng.integers(0, 256, (20, 16, 3)).tolist(),
                "img1.png": rng.integers(0, 256, (12, 18, 3)).tolist()},
        binaryproto={"window_mean.binaryproto": np.round(rng.uniform(0, 255, (1, 3, 12, 12)), 2).tolist()})
    # Streams 0 and 1 start sequences inside the batch; stream 2 carries its state over from the pass before.
    cont = [[0, 0, 1], [1, 1, 1], [1, 0, 1], [1, 1, 0]]
    for kind in ("LSTM", "RNN"):
        add(kind.lower(),
            _input("data", 4, 3, 2, 2) + _input("cont", 4, 3) + _scale("data", "x", 0, 4)
            + f'layer {{ name: "rec" type: "{kind}" bottom: "x" bottom: "cont" top: "h" '
            'recurrent_param { num_output: 3 } }\n' + _ip("h", "f", axis=2),
            inputs={"data": _values(rng, 4, 3, 2, 2), "cont": cont}, passes=2)
        states = ["h0", "c0"] if kind == "LSTM" else ["h0"]
        add(kind.lower() + "_static_exposed",
            _input("data", 3, 2, 4) + _input("cont", 3, 2) + _input("static", 2, 5)
            + "".join(_input(name, 1, 2, 3) for name in states)
            + _scale("data", "x", 0, 3) + _scale("static", "xs", 0, 2)
            + f'layer {{ name: "rec" type: "{kind}" bottom: "x" bottom: "cont" bottom: "xs" '
            + "".join(f'bottom: "{name}" ' for name in states) + 'top: "h" '
            + "".join(f'top: "{name}_last" ' for name in states)
            + 'recurrent_param { num_output: 3 expose_hidden: true } }\n'
            + _ip("h", "f", axis=2) + "".join(_ip(f"{name}_last", f"f_{name}", axis=2) for name in states),
            inputs={"data": _values(rng, 3, 2, 4), "cont": [[0, 1], [1, 0], [1, 1]], "static": _values(rng, 2, 5),
                    **{name: _values(rng, 1, 2, 3) for name in states}}, passes=2)
    return nets


NETS = _nets()


def _png(pixels: List[Any]) -> bytes:
    import cv2

    ok, data = cv2.imencode(".png", np.asarray(pixels, np.uint8))
    assert ok
    return bytes(data.tobytes())


@pytest.fixture(scope="module")
def reference() -> str:
    files = {"nets.json": dumps([{key: value for key, value in net.items()
                                  if key not in ("text", "text_files", "images")}
                                 for net in NETS])}
    for net in NETS:
        files[net["prototxt"]] = net["text"].encode()
        files.update({name: text.encode() for name, text in net.get("text_files", {}).items()})
        files.update({name: _png(pixels) for name, pixels in net.get("images", {}).items()})
    return cached_dir("layers", files, helper=HELPER)


@pytest.mark.parametrize("name", [net["name"] for net in NETS])
def test_layer_matches_pycaffe_forward_and_backward(reference: str, schema, name: str,  # type: ignore[no-untyped-def]
                                                    monkeypatch, tmp_path) -> None:
    import shutil

    import torch

    from caffe_ft.formats.caffemodel import load_model
    from caffe_ft.formats.files import load_net
    from caffe_ft.training.torch.data import input_shapes
    from caffe_ft.training.torch.feed import NetFeeder
    from caffe_ft.training.torch.net import CaffeNet

    entry = next(net for net in NETS if net["name"] == name)
    monkeypatch.chdir(reference)  # sources are named relative to it, as in pycaffe's run
    param = load_net(entry["prototxt"], schema)
    if entry.get("written"):  # files the net writes: ours go elsewhere, beside pycaffe's
        shutil.copy(entry["prototxt"], tmp_path)
        monkeypatch.chdir(tmp_path)
    sources = [layer for layer in param.layer if layer.type in ("HDF5Data", "DummyData", "WindowData")]
    net = CaffeNet(param, entry.get("phase", "TEST"),
                   input_shapes=input_shapes(sources, schema, entry.get("phase", "TEST")) or None)
    net.load_blobs(load_model(os.path.join(reference, name, "weights.caffemodel"), schema).layer_blobs(), strict=True)
    feeder = NetFeeder(sources, schema, entry.get("phase", "TEST"))
    for index in range(entry.get("passes", 1)):
        with np.load(os.path.join(reference, name, f"pass_{index}.npz")) as saved:
            expected = {key: saved[key] for key in saved.files}
        inputs = {top: torch.tensor(np.asarray(values, np.float32)) for top, values in entry.get("inputs", {}).items()}
        inputs.update({top: torch.from_numpy(array) for top, array in feeder.next().items()})
        for spec in net.learnable:
            spec.param.grad = None
        blobs = net(inputs)
        assert net.loss is not None
        net.loss.backward()
        theirs = {key[5:]: value for key, value in expected.items()
                  if key.startswith("blob:") and "_split_" not in key}
        assert set(theirs) <= set(blobs), sorted(set(theirs) - set(blobs))
        for blob, value in theirs.items():
            assert tuple(blobs[blob].shape) == value.shape, f"pass {index}, blob {blob}"
            error = relative_error(blobs[blob].detach().numpy(), value)
            assert error < 1e-4, f"pass {index}, blob {blob}: relative error {error:.3g}"
        grads = {key[5:]: value for key, value in expected.items() if key.startswith("grad:")}
        assert grads and any(np.abs(value).max() > 0 for value in grads.values())
        for key, value in grads.items():
            layer, i = key.rsplit("/", 1)
            assert tuple(net.blobs_of[layer][int(i)].shape) == value.shape, f"blob {key}"
            grad = net.blobs_of[layer][int(i)].grad
            ours = np.zeros_like(value) if grad is None else grad.numpy()
            error = relative_error(ours, value)
            assert error < 1e-4, f"pass {index}, gradient of {key}: relative error {error:.3g}"
        for written in entry.get("written", []):
            import h5py

            with h5py.File(written, "r") as ours_file, h5py.File(os.path.join(reference, written), "r") as theirs_file:
                assert sorted(ours_file) == sorted(theirs_file) == ["data", "label"]
                for key in theirs_file:
                    assert ours_file[key].shape == theirs_file[key].shape
                    assert np.array_equal(ours_file[key][()], theirs_file[key][()]), f"{written}: {key}"


def _refused(schema, text: str) -> str:  # type: ignore[no-untyped-def]
    from caffe_ft.errors import CaffeFtError
    from caffe_ft.formats import prototext
    from caffe_ft.training.torch.net import CaffeNet

    param = prototext.to_message(prototext.parse(text.encode()), schema.new("NetParameter"))
    with pytest.raises(CaffeFtError) as caught:
        CaffeNet(param, "TRAIN", input_shapes={"data": (2, 3)})
    return str(caught.value)


@pytest.mark.parametrize("layer, says", [
    ('layer { name: "src" type: "MemoryData" top: "data" top: "label" memory_data_param { batch_size: 2 channels: 3 '
     'height: 1 width: 1 } }', "MemoryData is filled by a pycaffe caller (MemoryDataLayer.set_input_arrays), which "
     "the torch engine has none of: train with --engine pycaffe, or feed the net through an Input layer"),
    ('layer { name: "src" type: "Python" top: "data" python_param { module: "m" layer: "L" } }',
     "a Python layer runs a caffe.Layer subclass, which needs pycaffe: train with --engine pycaffe"),
    ('layer { name: "src" type: "LSTMUnit" bottom: "x" top: "data" }', "the torch engine has no 'LSTMUnit' layer"),
])
def test_layers_the_engine_cannot_run_are_refused_saying_why(schema, layer: str,  # type: ignore[no-untyped-def]
                                                            says: str) -> None:
    """Refused when the net is made, before shapes or data, naming the layer; the
    layer comes after one the engine could run, and before one it could not set up."""
    text = (_input("x", 2, 3) + layer + "\n"
            + 'layer { name: "later" type: "Nonesuch" bottom: "data" top: "out" }\n')
    assert _refused(schema, text) == f"layer 'src': {says}"


def test_a_filter_feeds_only_layers_that_take_any_number_of_items(schema) -> None:  # type: ignore[no-untyped-def]
    """A BatchNorm two layers after a Filter would see fewer items than it was made for: refused by name."""
    text = (_input("x", 4, 3) + _input("keep", 4)
            + 'layer { name: "filter" type: "Filter" bottom: "x" bottom: "keep" top: "fx" }\n'
            'layer { name: "relu" type: "ReLU" bottom: "fx" top: "fx" }\n'
            'layer { name: "bn" type: "BatchNorm" bottom: "fx" top: "bn" }\n')
    assert _refused(schema, text) == ("layer 'bn': the torch engine runs 'BatchNorm' on a fixed number of items, "
                                      "not on the items Filter 'filter' selects")


@pytest.mark.parametrize("windows, says", [
    ("# 0\nimg.png\n3 8 8\n1\n2 0.9 0 0 5 5\n",
     "windows.txt: WindowData needs both foreground and background windows"),
    ("# 0\nimg.png\n3 8 8\n2\n0 0.9 0 0 5 5\n0 0.1 0 0 5 5\n",
     "windows.txt: not a window file: a foreground window of image 0 has label 0"),
    ("# 0\nimg.png\n1 8 8\n1\n0 0.1 0 0 5 5\n",
     "windows.txt: not a window file: image 0 has 1 channels; WindowData reads colour images (3)"),
    ("# 0\nimg.png\n3 8 8\n2\n1 0.9 0 0 5 5\n", "windows.txt: not a window file: it ends inside an entry"),
    ("0\nimg.png\n", "windows.txt: not a window file: expected '#' where '0' is"),
])
def test_window_files_caffe_would_refuse_are_errors(schema, tmp_path, monkeypatch,  # type: ignore[no-untyped-def]
                                                    windows: str, says: str) -> None:
    from caffe_ft.errors import CaffeFtError
    from caffe_ft.formats import prototext
    from caffe_ft.training.torch.data import WindowDataSource

    monkeypatch.chdir(tmp_path)
    (tmp_path / "windows.txt").write_text(windows)
    text = ('layer { name: "w" type: "WindowData" top: "data" top: "label" transform_param { crop_size: 4 } '
            'window_data_param { source: "windows.txt" batch_size: 2 } }')
    layer = prototext.to_message(prototext.parse(text.encode()), schema.new("NetParameter")).layer[0]
    with pytest.raises(CaffeFtError) as caught:
        WindowDataSource(layer, schema, "TRAIN")
    assert str(caught.value) == says


def test_window_data_mirrors_at_random_in_either_phase(schema, tmp_path,  # type: ignore[no-untyped-def]
                                                       monkeypatch) -> None:
    """With mirror, each window comes out as it is or flipped left to right, both
    seen over a few batches, in TEST as in TRAIN (Caffe's WindowData ignores the phase)."""
    import cv2

    from caffe_ft.formats import prototext
    from caffe_ft.training.torch.data import WindowDataSource

    monkeypatch.chdir(tmp_path)
    cv2.imwrite("img.png", np.random.default_rng(3).integers(0, 256, (10, 12, 3)).astype(np.uint8))
    (tmp_path / "windows.txt").write_text("# 0\nimg.png\n3 10 12\n2\n1 0.9 1 2 9 8\n0 0.1 0 0 11 9\n")
    layers = {}
    for mirror in ("false", "true"):
        text = ('layer { name: "w" type: "WindowData" top: "data" top: "label" transform_param { crop_size: 6 '
                f'mirror: {mirror} }} window_data_param {{ source: "windows.txt" batch_size: 4 fg_fraction: 0.5 }} }}')
        layers[mirror] = prototext.to_message(prototext.parse(text.encode()), schema.new("NetParameter")).layer[0]
    plain = WindowDataSource(layers["false"], schema, "TEST").next()["data"]
    assert np.array_equal(plain[0], plain[1]) and np.array_equal(plain[2], plain[3])
    flips = 0
    reader = WindowDataSource(layers["true"], schema, "TEST")
    for _ in range(5):
        batch = reader.next()
        for item, expected in zip(batch["data"], plain):
            flipped = np.array_equal(item, expected[:, :, ::-1])
            assert flipped or np.array_equal(item, expected)
            flips += flipped
        assert batch["label"].tolist() == [0, 0, 1, 1]
    assert 0 < flips < 20


def _stochastic_net(schema, phase: str):  # type: ignore[no-untyped-def]
    from caffe_ft.formats import prototext
    from caffe_ft.training.torch.net import CaffeNet

    text = (_input("data", 2, 3, 7, 6)
            + 'layer { name: "pool" type: "Pooling" bottom: "data" top: "pool" '
              'pooling_param { pool: STOCHASTIC kernel_size: 3 stride: 2 } }\n')
    return CaffeNet(prototext.to_message(prototext.parse(text.encode()), schema.new("NetParameter")), phase)


def test_stochastic_pooling_follows_caffes_gpu_kernels(schema) -> None:  # type: ignore[no-untyped-def]
    """TEST: sum(x^2) / (FLT_MIN + sum(x)) over each window (from i*stride, clipped at the
    edge: output 3x3 from 7x6, the last column of windows two wide); TRAIN: a value of
    the window, drawn in proportion, the only one that receives the gradient."""
    import torch

    x = np.random.default_rng(2).uniform(0, 1, (2, 3, 7, 6)).astype(np.float32)
    test = _stochastic_net(schema, "TEST")({"data": torch.from_numpy(x)})["pool"].numpy()
    assert test.shape == (2, 3, 3, 3)
    expected = np.zeros_like(test)
    for i in range(3):
        for j in range(3):
            window = x[:, :, 2 * i:min(2 * i + 3, 7), 2 * j:min(2 * j + 3, 6)].reshape(2, 3, -1)
            expected[:, :, i, j] = (window ** 2).sum(-1) / (1.17549435e-38 + window.sum(-1))
    assert relative_error(test, expected) < 1e-6

    data = torch.from_numpy(x).requires_grad_(True)
    torch.manual_seed(0)
    train = _stochastic_net(schema, "TRAIN")({"data": data})["pool"]
    train.sum().backward()
    grad = data.grad.numpy()
    for i in range(3):
        for j in range(3):
            window = x[:, :, 2 * i:min(2 * i + 3, 7), 2 * j:min(2 * j + 3, 6)].reshape(2, 3, -1)
            picked = train.detach().numpy()[:, :, i, j]
            assert np.all(np.min(np.abs(window - picked[..., None]), -1) == 0)  # one of the window's values
    # One value per window gets gradient 1 (a value in two overlapping windows may get 2).
    assert grad.sum() == pytest.approx(2 * 3 * 9)
    assert set(np.unique(grad)) <= {0.0, 1.0, 2.0, 3.0, 4.0}


def test_hdf5_shuffle_reads_every_row_once_per_pass_over_the_files(schema, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """With shuffle, the files and each file's rows come in a new order at every
    pass (numpy's generator, not Caffe's), each row once; without, in order."""
    import h5py

    from caffe_ft.formats import prototext
    from caffe_ft.training.torch.data import Hdf5DataSource

    monkeypatch.chdir(tmp_path)
    for name, rows in (("a.h5", range(0, 5)), ("b.h5", range(5, 8))):
        with h5py.File(name, "w") as handle:
            handle.create_dataset("data", data=np.asarray([[r, -r] for r in rows], np.float32))
            handle.create_dataset("label", data=np.asarray(list(rows), np.float32))
    (tmp_path / "list.txt").write_text("a.h5\nb.h5\n")
    seen = {}
    for shuffle in (False, True):
        text = ('layer { name: "h5" type: "HDF5Data" top: "data" top: "label" hdf5_data_param { source: "list.txt" '
                f'batch_size: 4 shuffle: {str(shuffle).lower()} }} }}')
        layer = prototext.to_message(prototext.parse(text.encode()), schema.new("NetParameter")).layer[0]
        reader = Hdf5DataSource(layer, schema, "TRAIN")
        batches = [reader.next() for _ in range(6)]  # 24 rows: three passes over the 8
        labels = np.concatenate([batch["label"] for batch in batches])
        assert all(np.array_equal(batch["data"][:, 0], batch["label"]) for batch in batches)  # rows stay whole
        for start in (0, 8, 16):
            assert sorted(labels[start:start + 8]) == list(range(8))
        seen[shuffle] = labels
    assert seen[False].tolist() == list(range(8)) * 3
    assert seen[True].tolist() != seen[False].tolist()
    assert seen[True][:8].tolist() != seen[True][8:16].tolist()  # a new order at each pass
