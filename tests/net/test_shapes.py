"""Shape inference (caffe_ft.net.shapes) against hand-worked formulas and real Caffe.

Host tests check small inline nets whose expected shapes are worked out by
hand from Caffe's formulas (each derivation is in a comment).  The ``caffe``
tests instantiate the same nets, every net Debian's caffe-doc ships and the
nsfw ResNet-50 with pycaffe, and compare every blob's and every parameter's
shape with our inference.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import pytest

from caffe_ft.formats import prototext
from caffe_ft.errors import CaffeFtError
from caffe_ft.net.shapes import RULES, filter_layers, infer, is_included
from conftest import NSFW_DIR, caffe_doc_files

Shape = Tuple[int, ...]


# --------------------------------------------------------------------------
# Odd cases: inline nets with hand-derived shapes (checked on the host and,
# in the reference environment, against pycaffe too)


@dataclass
class Case:
    id: str
    text: str
    blobs: Dict[str, Shape]
    params: Dict[str, List[Shape]] = field(default_factory=dict)
    flops: Dict[str, int] = field(default_factory=dict)


def _input(name: str, *dims: int) -> str:
    shape = " ".join(f"dim: {d}" for d in dims)
    return f'layer {{ name: "{name}" type: "Input" top: "{name}" input_param {{ shape {{ {shape} }} }} }}\n'


CASES = [
    Case(
        "conv-dilated-grouped",
        _input("x", 2, 8, 17, 19)
        + """layer { name: "c" type: "Convolution" bottom: "x" top: "c"
          convolution_param { num_output: 12 group: 4 kernel_size: 3 dilation: 2 pad: 1 stride: 2 } }""",
        # extent = 2*(3-1)+1 = 5; H = (17+2-5)/2+1 = 8; W = (19+2-5)/2+1 = 9 (16/2)
        {"c": (2, 12, 8, 9)},
        {"c": [(12, 2, 3, 3), (12,)]},  # in/group = 8/4
        {"c": 2 * 12 * 8 * 9 * 2 * 3 * 3},
    ),
    Case(
        "conv-h-w-forms",
        _input("x", 1, 3, 10, 20)
        + """layer { name: "c" type: "Convolution" bottom: "x" top: "c"
          convolution_param { num_output: 4 kernel_h: 3 kernel_w: 5 stride_h: 1 stride_w: 2
                              pad_h: 0 pad_w: 2 bias_term: false } }""",
        # H = (10-3)/1+1 = 8; W = (20+4-5)/2+1 = 9+1 = 10 (19/2 truncates)
        {"c": (1, 4, 8, 10)},
        {"c": [(4, 3, 3, 5)]},
    ),
    Case(
        "conv-3d-per-axis",
        _input("x", 1, 2, 5, 6, 7)
        + """layer { name: "c" type: "Convolution" bottom: "x" top: "c"
          convolution_param { num_output: 4 kernel_size: 3 kernel_size: 2 kernel_size: 1
                              stride: 2 stride: 1 stride: 3 } }""",
        # D = (5-3)/2+1 = 2; H = (6-2)/1+1 = 5; W = (7-1)/3+1 = 3
        {"c": (1, 4, 2, 5, 3)},
        {"c": [(4, 2, 3, 2, 1), (4,)]},
    ),
    Case(
        "conv-axis-2",
        _input("x", 2, 3, 4, 10)
        + """layer { name: "c" type: "Convolution" bottom: "x" top: "c"
          convolution_param { num_output: 5 kernel_size: 3 axis: 2 } }""",
        # channels on axis 2 (4), one spatial axis: 10-3+1 = 8
        {"c": (2, 3, 5, 8)},
        {"c": [(5, 4, 3), (5,)]},
    ),
    Case(
        "deconv-grouped",
        _input("x", 1, 16, 7, 7)
        + """layer { name: "d" type: "Deconvolution" bottom: "x" top: "d"
          convolution_param { num_output: 8 group: 2 kernel_size: 4 stride: 2 pad: 1 } }""",
        # out = 2*(7-1) + 4 - 2*1 = 14; weight (in, out/group, k, k)
        {"d": (1, 8, 14, 14)},
        {"d": [(16, 4, 4, 4), (8,)]},
        {"d": 16 * 7 * 7 * 4 * 4 * 4},
    ),
    Case(
        "deconv-dilated",
        _input("x", 1, 3, 5, 6)
        + """layer { name: "d" type: "Deconvolution" bottom: "x" top: "d"
          convolution_param { num_output: 2 kernel_size: 3 dilation: 2 stride: 3 } }""",
        # extent 5: H = 3*(5-1)+5 = 17; W = 3*(6-1)+5 = 20
        {"d": (1, 2, 17, 20)},
        {"d": [(3, 2, 3, 3), (2,)]},
    ),
    Case(
        "pool-ceil-clipped",
        _input("x", 1, 2, 5, 6)
        + """layer { name: "p" type: "Pooling" bottom: "x" top: "p"
          pooling_param { pool: MAX kernel_size: 2 stride: 2 pad_h: 1 pad_w: 0 } }""",
        # H: ceil((5+2-2)/2)+1 = 4, but window 3 would start at 3*2 = 6 >= 5+1,
        # inside the padding: dropped -> 3.  W: ceil((6-2)/2)+1 = 3.
        {"p": (1, 2, 3, 3)},
    ),
    Case(
        "pool-clip-on-unpadded-axis",
        _input("x", 1, 1, 6, 3)
        + """layer { name: "p" type: "Pooling" bottom: "x" top: "p"
          pooling_param { pool: MAX kernel_h: 3 kernel_w: 1 stride_h: 2 stride_w: 5 pad_h: 1 pad_w: 0 } }
        layer { name: "q" type: "Pooling" bottom: "x" top: "q"
          pooling_param { pool: MAX kernel_h: 3 kernel_w: 1 stride_h: 2 stride_w: 5 } }""",
        # p, H: ceil((6+2-3)/2)+1 = 4, last start 6 < 7, kept.
        # p, W: ceil((3-1)/5)+1 = 2, but with any padding Caffe also clips the
        # unpadded axis: start 5 >= 3+0 -> 1.  q (no padding at all) keeps W = 2
        # even though its last window starts past the edge; H = ceil(3/2)+1 = 3.
        {"p": (1, 1, 4, 1), "q": (1, 1, 3, 2)},
    ),
    Case(
        "pool-ceil-kept",
        _input("x", 1, 2, 6, 7)
        + """layer { name: "p" type: "Pooling" bottom: "x" top: "p"
          pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }""",
        # H: ceil((6+2-3)/2)+1 = 4; last start 6 < 6+1, kept.
        # W: ceil((7+2-3)/2)+1 = 4; last start 6 < 8, kept.
        {"p": (1, 2, 4, 4)},
    ),
    Case(
        "pool-ceil-no-pad-two-tops",
        _input("x", 3, 4, 6, 6)
        + """layer { name: "p" type: "Pooling" bottom: "x" top: "p" top: "mask"
          pooling_param { pool: MAX kernel_size: 3 stride: 2 } }""",
        # ceil((6-3)/2)+1 = 3 (floor would give 2); the mask is shaped alike
        {"p": (3, 4, 3, 3), "mask": (3, 4, 3, 3)},
    ),
    Case(
        "pool-floor-round-mode",
        _input("x", 1, 1, 6, 6)
        + """layer { name: "p" type: "Pooling" bottom: "x" top: "p"
          pooling_param { pool: MAX kernel_size: 3 stride: 2 round_mode: FLOOR } }""",
        # floor((6-3)/2)+1 = 2
        {"p": (1, 1, 2, 2)},
    ),
    Case(
        "pool-global",
        _input("x", 2, 5, 7, 9)
        + """layer { name: "p" type: "Pooling" bottom: "x" top: "p"
          pooling_param { pool: AVE global_pooling: true } }""",
        {"p": (2, 5, 1, 1)},
    ),
    Case(
        "ip-axis-2",
        _input("x", 2, 3, 4, 5)
        + """layer { name: "f" type: "InnerProduct" bottom: "x" top: "f"
          inner_product_param { num_output: 6 axis: 2 } }""",
        # K = 4*5 = 20 per row, rows = 2*3
        {"f": (2, 3, 6)},
        {"f": [(6, 20), (6,)]},
        {"f": 6 * 20 * 6},
    ),
    Case(
        "ip-transpose-no-bias",
        _input("x", 2, 3, 4)
        + """layer { name: "f" type: "InnerProduct" bottom: "x" top: "f"
          inner_product_param { num_output: 7 transpose: true bias_term: false } }""",
        {"f": (2, 7)},
        {"f": [(12, 7)]},
    ),
    Case(
        "crop-offsets",
        _input("x", 1, 3, 20, 30)
        + _input("ref", 1, 5, 10, 12)
        + _input("small", 1, 2, 4, 4)
        + """layer { name: "c" type: "Crop" bottom: "x" bottom: "ref" top: "c"
          crop_param { axis: 2 offset: 5 offset: 7 } }
        layer { name: "c1" type: "Crop" bottom: "x" bottom: "small" top: "c1"
          crop_param { axis: 1 offset: 1 } }""",
        # c: axes 2.. take ref's sizes (20-5 >= 10, 30-7 >= 12); channels stay 3.
        # c1: one offset for every axis from 1 on.
        {"c": (1, 3, 10, 12), "c1": (1, 2, 4, 4)},
    ),
    Case(
        "slice-points-and-even",
        _input("x", 2, 10, 3)
        + """layer { name: "s" type: "Slice" bottom: "x" top: "a" top: "b" top: "c"
          slice_param { axis: 1 slice_point: 2 slice_point: 7 } }
        layer { name: "e" type: "Slice" bottom: "x" top: "e0" top: "e1"
          slice_param { slice_dim: 0 } }""",
        {"a": (2, 2, 3), "b": (2, 5, 3), "c": (2, 3, 3), "e0": (1, 10, 3), "e1": (1, 10, 3)},
    ),
    Case(
        "reshape-zero-minus-one",
        _input("x", 2, 3, 4, 5)
        + """layer { name: "r" type: "Reshape" bottom: "x" top: "r"
          reshape_param { shape { dim: 0 dim: -1 dim: 10 } } }
        layer { name: "r2" type: "Reshape" bottom: "x" top: "r2"
          reshape_param { axis: 1 num_axes: 2 shape { dim: -1 } } }
        layer { name: "r3" type: "Reshape" bottom: "x" top: "r3"
          reshape_param { axis: -1 num_axes: 0 shape { dim: 1 } } }""",
        # r: 0 copies 2; 120/(2*10) = 6.  r2: axes 1..2 (3*4) become 12.
        # r3: axis -1 means after the last axis; nothing replaced.
        {"r": (2, 6, 10), "r2": (2, 12, 5), "r3": (2, 3, 4, 5, 1)},
    ),
    Case(
        "concat-axis-1-and-flatten",
        _input("x", 2, 3, 4, 4)
        + _input("y", 2, 5, 4, 4)
        + """layer { name: "cat" type: "Concat" bottom: "x" bottom: "y" top: "cat" }
        layer { name: "fl" type: "Flatten" bottom: "cat" top: "fl" flatten_param { axis: 1 end_axis: 2 } }""",
        {"cat": (2, 8, 4, 4), "fl": (2, 32, 4)},
    ),
    Case(
        "scale-bias-batchnorm-prelu",
        _input("x", 2, 3, 4, 5)
        + _input("s", 3, 4)
        + """layer { name: "bn" type: "BatchNorm" bottom: "x" top: "x" }
        layer { name: "sc" type: "Scale" bottom: "x" top: "x" scale_param { bias_term: true } }
        layer { name: "sc_all" type: "Scale" bottom: "x" top: "y" scale_param { num_axes: -1 } }
        layer { name: "sc_scalar" type: "Scale" bottom: "x" top: "z" scale_param { num_axes: 0 bias_term: true } }
        layer { name: "sc_two" type: "Scale" bottom: "x" bottom: "s" top: "w" scale_param { bias_term: true } }
        layer { name: "bias_two" type: "Bias" bottom: "x" bottom: "s" top: "v" }
        layer { name: "bias_axis2" type: "Bias" bottom: "x" top: "u" bias_param { axis: 2 num_axes: 2 } }
        layer { name: "pr" type: "PReLU" bottom: "x" top: "p" }
        layer { name: "pr_shared" type: "PReLU" bottom: "x" top: "q" prelu_param { channel_shared: true } }""",
        {"x": (2, 3, 4, 5), "y": (2, 3, 4, 5), "w": (2, 3, 4, 5), "v": (2, 3, 4, 5)},
        {
            "bn": [(3,), (3,), (1,)],
            "sc": [(3,), (3,)],
            "sc_all": [(3, 4, 5)],
            "sc_scalar": [(), ()],
            "sc_two": [(3, 4)],  # only the bias: the factor is bottom 1
            "bias_axis2": [(4, 5)],
            "pr": [(3,)],
            "pr_shared": [()],
        },
    ),
    Case(
        "heads-and-metrics",
        _input("x", 4, 10, 2, 3)
        + _input("label", 4, 2, 3)
        + _input("h", 1, 1, 10, 10)
        + """layer { name: "loss" type: "SoftmaxWithLoss" bottom: "x" bottom: "label" top: "loss" }
        layer { name: "ig" type: "InfogainLoss" bottom: "x" bottom: "label" bottom: "h" top: "ig" top: "prob"
                loss_weight: 1 loss_weight: 0 }
        layer { name: "acc" type: "Accuracy" bottom: "x" bottom: "label" top: "acc" top: "per_class" }
        layer { name: "am" type: "ArgMax" bottom: "x" top: "am" argmax_param { out_max_val: true top_k: 3 } }
        layer { name: "am1" type: "ArgMax" bottom: "x" top: "am1" argmax_param { axis: 1 top_k: 2 } }
        layer { name: "red" type: "Reduction" bottom: "x" top: "red" reduction_param { axis: 1 } }
        layer { name: "tile" type: "Tile" bottom: "x" top: "tile" tile_param { axis: -1 tiles: 3 } }
        layer { name: "copy" type: "Split" bottom: "x" top: "copy" }
        layer { name: "eu" type: "EuclideanLoss" bottom: "x" bottom: "copy" top: "eu" }""",
        {
            "loss": (), "ig": (), "prob": (4, 10, 2, 3), "acc": (), "per_class": (10,),
            # without an axis: (num, index and value, top_k), padded with 1s to the bottom's axes
            "am": (4, 2, 3, 1),
            "am1": (4, 2, 2, 3), "red": (4,), "tile": (4, 10, 2, 9), "eu": (), "copy": (4, 10, 2, 3),
        },
    ),
    Case(
        "embed-eltwise-inplace",
        _input("ids", 4, 7)
        + """layer { name: "emb" type: "Embed" bottom: "ids" top: "e" embed_param { num_output: 16 input_dim: 100 } }
        layer { name: "relu" type: "ReLU" bottom: "e" top: "e" }
        layer { name: "pow" type: "Power" bottom: "e" top: "e2" }
        layer { name: "sum" type: "Eltwise" bottom: "e" bottom: "e2" top: "sum" }""",
        {"e": (4, 7, 16), "e2": (4, 7, 16), "sum": (4, 7, 16)},
        {"emb": [(100, 16), (16,)]},
    ),
    Case(
        "elementwise-and-misc",
        _input("x", 2, 6, 5, 4)
        + _input("v", 3, 10)
        + _input("idx", 5)
        + "".join(
            f'layer {{ name: "{kind.lower()}" type: "{kind}" bottom: "x" top: "x" }}\n'
            for kind in ("BNLL", "Clip", "Dropout", "ELU", "Exp", "Log", "Power",
                         "ReLU", "Sigmoid", "Swish", "TanH", "Threshold", "MVN")
        )
        + """layer { name: "abs" type: "AbsVal" bottom: "x" top: "abs" }
        layer { name: "clip" type: "Clip" bottom: "x" top: "clipped" clip_param { min: 0 max: 1 } }
        layer { name: "lrn" type: "LRN" bottom: "x" top: "lrn" lrn_param { norm_region: WITHIN_CHANNEL } }
        layer { name: "sm" type: "Softmax" bottom: "x" top: "sm" softmax_param { axis: 2 } }
        layer { name: "cat" type: "Concat" bottom: "x" bottom: "x" top: "cat" concat_param { concat_dim: 2 } }
        layer { name: "flat" type: "Flatten" bottom: "x" top: "flat" }
        layer { name: "am" type: "ArgMax" bottom: "v" top: "am" }
        layer { name: "reindex" type: "BatchReindex" bottom: "x" bottom: "idx" top: "reindexed" }
        layer { name: "w" type: "Parameter" top: "w" parameter_param { shape { dim: 7 dim: 2 } } }
        layer { name: "silence" type: "Silence" bottom: "w" }""",
        {
            "x": (2, 6, 5, 4), "abs": (2, 6, 5, 4), "lrn": (2, 6, 5, 4), "sm": (2, 6, 5, 4), "cat": (2, 6, 10, 4),
            "flat": (2, 120),
            "am": (3, 1, 1),  # (num, 1, top_k), padded to 3 axes
            "reindexed": (5, 6, 5, 4), "w": (7, 2),
        },
        {"w": [(7, 2)]},
    ),
    Case(
        "dummy-and-memory-data",
        """layer { name: "dd" type: "DummyData" top: "a" top: "b"
          dummy_data_param { num: 2 channels: 3 channels: 4 height: 5 width: 6 } }
        layer { name: "dd2" type: "DummyData" top: "c"
          dummy_data_param { shape { dim: 7 dim: 2 } } }
        layer { name: "mem" type: "MemoryData" top: "m" top: "ml"
          memory_data_param { batch_size: 8 channels: 1 height: 9 width: 10 } }""",
        {"a": (2, 3, 5, 6), "b": (2, 4, 5, 6), "c": (7, 2), "m": (8, 1, 9, 10), "ml": (8,)},
    ),
    Case(
        "recurrent-im2col-filter",
        _input("x", 5, 2, 3, 2)
        + _input("cont", 5, 2)
        + _input("xs", 2, 7)
        + _input("h0", 1, 2, 4)
        + _input("c0", 1, 2, 4)
        + _input("img", 2, 3, 7, 6)
        + _input("keep", 2, 1)
        + """layer { name: "lstm" type: "LSTM" bottom: "x" bottom: "cont" top: "h"
                recurrent_param { num_output: 4 } }
        layer { name: "lstm_all" type: "LSTM" bottom: "x" bottom: "cont" bottom: "xs" bottom: "h0" bottom: "c0"
                top: "h2" top: "hT" top: "cT" recurrent_param { num_output: 4 expose_hidden: true } }
        layer { name: "rnn" type: "RNN" bottom: "x" bottom: "cont" bottom: "xs" top: "o"
                recurrent_param { num_output: 3 } }
        layer { name: "im" type: "Im2col" bottom: "img" top: "im"
                convolution_param { kernel_h: 2 kernel_w: 3 stride: 2 pad: 1 dilation: 2 } }
        layer { name: "f" type: "Filter" bottom: "img" bottom: "xs" bottom: "keep" top: "fimg" top: "fxs" }""",
        # LSTM blobs: W_xc (4H, 3*2), b_c, [W_xc_static (4H, 7)], W_hc (4H, H); RNN adds W_ho, b_o.
        # Im2col: 3*2*3 columns; (7 + 2 - 3) // 2 + 1 = 4 rows, (6 + 2 - 5) // 2 + 1 = 2 columns.
        {"h": (5, 2, 4), "h2": (5, 2, 4), "hT": (1, 2, 4), "cT": (1, 2, 4), "o": (5, 2, 3), "im": (2, 18, 4, 2),
         "fimg": (2, 3, 7, 6), "fxs": (2, 7)},
        {
            "lstm": [(16, 6), (16,), (16, 4)],
            "lstm_all": [(16, 6), (16,), (16, 7), (16, 4)],
            "rnn": [(3, 6), (3,), (3, 7), (3, 3), (3, 3), (3,)],
        },
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_odd_cases_match_hand_derivation(parse_net, case: Case) -> None:
    result = infer(parse_net(case.text))
    for name, shape in case.blobs.items():
        assert result.blobs[name] == shape, name
    for name, shapes in case.params.items():
        assert result.params[name] == shapes, name
    for name, flops in case.flops.items():
        assert result.layer(name).flops == flops, name


def test_layers_keep_each_in_place_step(parse_net) -> None:
    net = parse_net(
        _input("x", 1, 4, 8, 8)
        + """layer { name: "p" type: "Pooling" bottom: "x" top: "x2" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
        layer { name: "r" type: "ReLU" bottom: "x2" top: "x2" }
        layer { name: "f" type: "InnerProduct" bottom: "x2" top: "f" inner_product_param { num_output: 3 } }"""
    )
    result = infer(net)
    assert [entry.name for entry in result.layers] == ["x", "p", "r", "f"]
    relu = result.layer("r")
    assert relu.bottom_names == relu.top_names == ("x2",)
    assert relu.bottoms == relu.tops == ((1, 4, 4, 4),)
    assert relu.params == () and relu.param_count == 0 and relu.flops is None
    fc = result.layer("f")
    assert fc.param_count == 3 * 64 + 3
    assert set(result.params) == {"f"}  # like pycaffe's Net.params


# --------------------------------------------------------------------------
# Data layers and the caller's input shapes


DATA_NET = """
layer { name: "train" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  data_param { source: "train_lmdb" batch_size: 32 } transform_param { crop_size: 24 } }
layer { name: "test" type: "Data" top: "data" top: "label" include { phase: TEST }
  data_param { source: "test_lmdb" batch_size: 10 } }
layer { name: "c" type: "Convolution" bottom: "data" top: "c" convolution_param { num_output: 2 kernel_size: 3 } }
"""


def test_data_layer_needs_input_shape(parse_net) -> None:
    net = parse_net(DATA_NET)
    with pytest.raises(CaffeFtError) as info:
        infer(net, "TEST")
    assert info.value.layer == "test"
    assert "'data'" in str(info.value) and "pass the input shape" in str(info.value)
    result = infer(net, "TEST", input_shapes={"data": (10, 3, 8, 8)})
    assert result.blobs == {"data": (10, 3, 8, 8), "label": (10,), "c": (10, 2, 6, 6)}
    train = infer(net, "TRAIN", input_shapes={"data": [32, 1, 24, 24]})
    assert train.blobs["label"] == (32,) and train.blobs["c"] == (32, 2, 22, 22)


def test_input_shapes_override_input_layers_and_reject_strays(parse_net) -> None:
    net = parse_net(_input("x", 1, 3, 10, 10) + """layer { name: "r" type: "ReLU" bottom: "x" top: "y" }""")
    assert infer(net, input_shapes={"x": (2, 3, 5, 5)}).blobs["y"] == (2, 3, 5, 5)
    with pytest.raises(CaffeFtError, match="'y'"):
        infer(net, input_shapes={"y": (1,)})


def test_image_data_known_when_cropped_or_resized(parse_net) -> None:
    base = 'layer {{ name: "img" type: "ImageData" top: "data" top: "label" {} }}'
    cropped = base.format(
        "image_data_param { source: 'l.txt' batch_size: 5 new_height: 256 new_width: 300 }"
        " transform_param { crop_size: 227 }"
    )
    assert infer(parse_net(cropped)).blobs == {"data": (5, 3, 227, 227), "label": (5,)}
    gray = base.format("image_data_param { source: 'l.txt' batch_size: 2 new_height: 30 new_width: 40 is_color: false }")
    assert infer(parse_net(gray)).blobs["data"] == (2, 1, 30, 40)
    with pytest.raises(CaffeFtError, match="pass the input shape"):
        infer(parse_net(base.format("image_data_param { source: 'l.txt' batch_size: 2 }")))


def test_python_layer_needs_its_top_shapes(parse_net) -> None:
    net = parse_net(
        _input("x", 4, 3)
        + """layer { name: "py" type: "Python" bottom: "x" top: "loss"
          python_param { module: "m" layer: "L" } }"""
    )
    with pytest.raises(CaffeFtError, match="'loss'.*pass the input shape"):
        infer(net)
    assert infer(net, input_shapes={"loss": (1,)}).blobs["loss"] == (1,)


def test_net_level_inputs(parse_net) -> None:
    net = parse_net(
        'input: "a" input_shape { dim: 1 dim: 2 dim: 3 dim: 4 } input: "b" input_shape { dim: 5 }\n'
        'layer { name: "f" type: "Flatten" bottom: "a" top: "f" }'
    )
    assert infer(net).blobs == {"a": (1, 2, 3, 4), "b": (5,), "f": (1, 24)}
    legacy = parse_net('input: "a" input_dim: 1 input_dim: 2 input_dim: 3 input_dim: 4')
    assert infer(legacy).blobs == {"a": (1, 2, 3, 4)}


# --------------------------------------------------------------------------
# Phase, level and stage filtering


FILTER_NET = """
state { stage: "always" }
layer { name: "all" type: "Input" top: "x" input_param { shape { dim: 1 } } }
layer { name: "train" type: "ReLU" bottom: "x" top: "t1" include { phase: TRAIN } }
layer { name: "not_test" type: "ReLU" bottom: "x" top: "t2" exclude { phase: TEST } }
layer { name: "deploy" type: "ReLU" bottom: "x" top: "t3" include { stage: "deploy" } }
layer { name: "deploy_and_always" type: "ReLU" bottom: "x" top: "t4" include { stage: "deploy" stage: "always" } }
layer { name: "not_deploy" type: "ReLU" bottom: "x" top: "t5" include { not_stage: "deploy" } }
layer { name: "either" type: "ReLU" bottom: "x" top: "t6" include { stage: "a" } include { stage: "deploy" } }
layer { name: "level_1_to_2" type: "ReLU" bottom: "x" top: "t7" include { min_level: 1 max_level: 2 } }
layer { name: "not_level_0" type: "ReLU" bottom: "x" top: "t8" exclude { max_level: 0 } }
"""


@pytest.mark.parametrize(
    "phase, level, stages, expected",
    [
        ("TEST", 0, (), ["all", "not_deploy"]),
        ("TRAIN", 0, (), ["all", "train", "not_test", "not_deploy"]),
        ("TEST", 0, ("deploy",), ["all", "deploy", "either"]),
        ("TEST", 1, ("a",), ["all", "not_deploy", "either", "level_1_to_2", "not_level_0"]),
        ("TEST", 3, (), ["all", "not_deploy", "not_level_0"]),
        (1, 2, (), ["all", "not_deploy", "level_1_to_2", "not_level_0"]),
    ],
)
def test_filter_layers(parse_net, phase, level, stages, expected) -> None:
    net = parse_net(FILTER_NET)
    assert [layer.name for layer in filter_layers(net, phase, level, stages)] == expected


def test_infer_adds_the_nets_own_stages(parse_net) -> None:
    # "always" comes from the net's state, "deploy" from the caller.
    result = infer(parse_net(FILTER_NET), "TEST", stages=("deploy",))
    assert "t4" in result.blobs and "t5" not in result.blobs


def test_include_and_exclude_together_is_an_error(parse_net) -> None:
    net = parse_net('layer { name: "x" type: "ReLU" include { phase: TRAIN } exclude { phase: TEST } }')
    with pytest.raises(CaffeFtError, match="not both"):
        filter_layers(net)


# --------------------------------------------------------------------------
# Errors


ERROR_CASES = [
    ('layer { name: "x" type: "Fancy" top: "y" }', "cannot infer shapes for layer 'x' of type 'Fancy'"),
    ('layer { name: "r" type: "ReLU" bottom: "nope" top: "y" }', "unknown bottom blob 'nope'"),
    (
        _input("x", 1, 3, 4, 4) + 'layer { name: "r" type: "ReLU" bottom: "x" top: "x2" }'
        'layer { name: "r2" type: "Sigmoid" bottom: "x" top: "x2" }',
        "already produced",
    ),
    (
        _input("x", 1, 6, 4, 4)
        + 'layer { name: "c" type: "Convolution" bottom: "x" top: "c" convolution_param { num_output: 4 group: 4 kernel_size: 1 } }',
        "group 4 must divide",
    ),
    (
        _input("x", 1, 3, 4, 4) + _input("y", 1, 3, 5, 4)
        + 'layer { name: "cat" type: "Concat" bottom: "x" bottom: "y" top: "c" }',
        "differ outside the concat axis",
    ),
    (
        _input("x", 1, 3, 4, 4) + _input("y", 1, 3, 5, 4)
        + 'layer { name: "c" type: "Crop" bottom: "x" bottom: "y" top: "c" }',
        "cannot crop axis 2",
    ),
    (
        _input("x", 2, 3, 5)
        + 'layer { name: "r" type: "Reshape" bottom: "x" top: "r" reshape_param { shape { dim: -1 dim: 4 } } }',
        "not divisible",
    ),
    (
        _input("x", 1, 3, 4, 4)
        + 'layer { name: "p" type: "Pooling" bottom: "x" top: "p" pooling_param { pool: MAX kernel_size: 2 pad: 2 } }',
        "pad must be smaller",
    ),
    (
        _input("x", 1, 3, 2, 2)
        + 'layer { name: "c" type: "Convolution" bottom: "x" top: "c" convolution_param { num_output: 1 kernel_size: 5 } }',
        "negative dimension",
    ),
    (
        _input("x", 1, 10)
        + 'layer { name: "s" type: "Slice" bottom: "x" top: "a" top: "b" top: "c" slice_param { slice_point: 4 } }',
        "1 slice points need 2 tops",
    ),
    (
        _input("x", 2, 3) + 'layer { name: "r" type: "ReLU" bottom: "x" top: "y" top: "y" }',
        "top 'y' is already produced",
    ),
    (
        _input("x", 2, 3) + _input("y", 2)
        + 'layer { name: "a" type: "Accuracy" bottom: "x" bottom: "y" top: "a" top: "b" top: "c" }',
        "Accuracy here makes 2 tops, but 3 are named",
    ),
    (
        _input("x", 2, 3) + 'layer { name: "a" type: "AbsVal" bottom: "x" top: "x" }',
        "AbsVal does not allow in-place computation",
    ),
    (
        _input("x", 2, 3) + 'layer { name: "a" type: "Flatten" bottom: "x" top: "x" }',
        "Flatten does not allow in-place computation",
    ),
    (
        _input("x", 2, 3) + _input("y", 2)
        + 'layer { name: "l" type: "EuclideanLoss" bottom: "x" bottom: "x" top: "l" top: "m" }',
        "loss_weight must be unspecified or given once per top (2 tops, 1 weights by default)",
    ),
    (
        _input("x", 2, 3) + _input("y", 2)
        + 'layer { name: "l" type: "SoftmaxWithLoss" bottom: "x" bottom: "y" top: "l" top: "p"'
        " loss_weight: 1 loss_weight: 0 }",
        "cannot set up SoftmaxWithLoss with two tops",
    ),
    (
        _input("x", 4, 2, 3) + _input("cont", 4, 3)
        + 'layer { name: "l" type: "LSTM" bottom: "x" bottom: "cont" top: "h" recurrent_param { num_output: 2 } }',
        "bottom 1 (cont) must be (4, 2), got (4, 3)",
    ),
    (
        _input("x", 4, 2, 3) + _input("cont", 4, 2)
        + 'layer { name: "r" type: "RNN" bottom: "x" bottom: "cont" top: "h" }',
        "num_output must be positive",
    ),
    (
        _input("x", 4, 2, 3) + _input("cont", 4, 2) + _input("h0", 1, 2, 3)
        + 'layer { name: "r" type: "RNN" bottom: "x" bottom: "cont" bottom: "h0" top: "h" top: "hT" '
        "recurrent_param { num_output: 2 expose_hidden: true } }",
        "each initial hidden state must be (1, 2, 2), got (1, 2, 3)",
    ),
    (
        _input("x", 4, 3) + _input("keep", 4, 2)
        + 'layer { name: "f" type: "Filter" bottom: "x" bottom: "keep" top: "y" }',
        "the selector (last bottom) must be (N, 1, ...), got (4, 2)",
    ),
    (
        _input("x", 1, 3, 2, 2)
        + 'layer { name: "i" type: "Im2col" bottom: "x" top: "i" convolution_param { kernel_size: 5 } }',
        "negative dimension",
    ),
]


@pytest.mark.parametrize("text, message", ERROR_CASES)
def test_errors_name_the_problem(parse_net, text: str, message: str) -> None:
    with pytest.raises(CaffeFtError) as info:
        infer(parse_net(text))
    assert message in str(info.value)


# --------------------------------------------------------------------------
# Against real Caffe (reference environment)


# Runs in a child process: a failed CHECK in Caffe aborts the process, and
# should fail one test, not the session.
_CAFFE_SHAPES = """
import json, sys
job = json.loads(sys.argv[1])
sys.path[:0] = job["python_path"]
import caffe
phase = caffe.TRAIN if job["phase"] == "TRAIN" else caffe.TEST
net = caffe.Net(job["path"], phase, stages=job["stages"])
# Blob.shape is what .data.shape reports, without allocating big activations.
print(json.dumps({
    "blobs": {name: list(blob.shape) for name, blob in net.blobs.items()},
    "params": {name: [list(p.shape) for p in blobs] for name, blobs in net.params.items()},
}))
"""


def _caffe_shapes(path: str, phase: str, stages: Sequence[str] = (), python_path: Sequence[str] = ()):
    """Blob and parameter shapes of the net pycaffe builds from ``path``."""
    pytest.importorskip("caffe")
    job = {"path": path, "phase": phase, "stages": list(stages), "python_path": list(python_path)}
    run = subprocess.run(
        [sys.executable, "-c", _CAFFE_SHAPES, json.dumps(job)],
        capture_output=True, text=True, env={**os.environ, "GLOG_minloglevel": "2"},
    )
    assert run.returncode == 0, f"pycaffe could not build {path}:\n{run.stderr[-3000:]}"
    found = json.loads(run.stdout.strip().splitlines()[-1])
    blobs = {name: tuple(shape) for name, shape in found["blobs"].items()}
    params = {name: [tuple(shape) for shape in shapes] for name, shapes in found["params"].items()}
    return blobs, params


def _assert_same_as_caffe(
    net,
    path: str,
    phase: str,
    input_shapes: Optional[dict] = None,
    stages: Sequence[str] = (),
    python_path: Sequence[str] = (),
) -> int:
    """Infer ``net`` and compare with pycaffe's instantiation of ``path``; return the blob count."""
    ours = infer(net, phase, input_shapes, stages)
    blobs, params = _caffe_shapes(path, phase, stages, python_path)
    # Caffe adds split blobs (x_..._split_N) and anonymous loss tops; ours are the named ones.
    extra = {name for name in blobs if "_split_" in name or name == "(automatic)"}
    assert set(ours.blobs) == set(blobs) - extra
    for name, shape in ours.blobs.items():
        assert shape == blobs[name], f"blob {name}"
    assert ours.params == params
    return len(ours.blobs)


@pytest.mark.caffe
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_odd_cases_match_caffe(parse_net, case: Case, tmp_path) -> None:
    path = tmp_path / "net.prototxt"
    path.write_text(case.text)
    _assert_same_as_caffe(parse_net(case.text), str(path), "TEST")


@pytest.mark.caffe
@pytest.mark.parametrize("text, message", ERROR_CASES)
def test_caffe_refuses_what_we_refuse(text: str, message: str, tmp_path) -> None:
    pytest.importorskip("caffe")
    path = tmp_path / "net.prototxt"
    path.write_text(text)
    job = {"path": str(path), "phase": "TEST", "stages": [], "python_path": []}
    run = subprocess.run(
        [sys.executable, "-c", _CAFFE_SHAPES, json.dumps(job)],
        capture_output=True, text=True, env={**os.environ, "GLOG_minloglevel": "2"},
    )
    assert run.returncode != 0, f"pycaffe accepted a net we reject ({message})"


@pytest.mark.caffe
def test_rules_name_only_layer_types_caffe_knows() -> None:
    caffe = pytest.importorskip("caffe")
    assert set(RULES) <= set(caffe.layer_type_list())


# caffe-doc nets reach data we do not have (LMDBs, HDF5 files, images).  Each
# data layer is pointed at a small stand-in instead, made in tmp_path:
#   - Data (LMDB, which pycaffe here cannot write) -> an Input layer with the
#     dataset's item shape, given to our inference as input_shapes;
#   - HDF5Data -> a real HDF5 file with the example's (N, 4) features;
#   - ImageData / WindowData -> a real image (and window file);
#   mean files are dropped (they do not change shapes).
# Data item shapes, picked by the layer's source, are the datasets' own.
DATASET_ITEMS = (("siamese", (2, 28, 28)), ("mnist", (1, 28, 28)), ("cifar", (3, 32, 32)))


def _item_shape(layer) -> Shape:
    crop = layer.transform_param.crop_size
    if crop:
        return (3, crop, crop)
    for key, shape in DATASET_ITEMS:
        if key in layer.data_param.source:
            return shape
    raise AssertionError(f"no stand-in data shape for source {layer.data_param.source!r}")


def _write_image(path: str, height: int = 50, width: int = 40) -> None:
    import cv2
    import numpy as np

    pixels = (np.arange(height * width * 3) % 251).astype(np.uint8).reshape(height, width, 3)
    assert cv2.imwrite(path, pixels)


def _stand_in_data(net, phase: str, stages: Sequence[str], tmp: str) -> Dict[str, Shape]:
    """Point ``net``'s data layers at stand-ins (in place); return our input_shapes."""
    given: Dict[str, Shape] = {}
    image = os.path.join(tmp, "image.png")
    for index, layer in enumerate(net.layer):
        if not is_included(layer, phase, 0, stages):
            continue
        if layer.HasField("transform_param"):
            layer.transform_param.ClearField("mean_file")
        if layer.type == "Data":
            batch = layer.data_param.batch_size
            shapes = [(batch, *_item_shape(layer)), (batch,)][: len(layer.top)]
            given.update(zip(layer.top, shapes))
            layer.type = "Input"
            for name in ("data_param", "transform_param"):
                layer.ClearField(name)
            for shape in shapes:
                layer.input_param.shape.add().dim.extend(shape)
        elif layer.type == "HDF5Data":
            import h5py
            import numpy as np

            h5 = os.path.join(tmp, f"data{index}.h5")
            with h5py.File(h5, "w") as handle:
                for i, top in enumerate(layer.top):
                    handle[top] = np.zeros((10, 4) if i == 0 else (10,), np.float32)
            listing = os.path.join(tmp, f"data{index}.txt")
            with open(listing, "w") as handle:
                handle.write(h5 + "\n")
            layer.hdf5_data_param.source = listing
            batch = layer.hdf5_data_param.batch_size
            given.update((top, (batch, 4) if i == 0 else (batch,)) for i, top in enumerate(layer.top))
        elif layer.type == "ImageData":
            _write_image(image)
            listing = os.path.join(tmp, "images.txt")
            with open(listing, "w") as handle:
                handle.write("image.png 1\n")
            layer.image_data_param.source = listing
            layer.image_data_param.root_folder = tmp + "/"
        elif layer.type == "WindowData":
            _write_image(image, 60, 80)
            windows = os.path.join(tmp, "windows.txt")
            with open(windows, "w") as handle:
                # one image (channels, height, width), two windows: object, background
                handle.write(f"# 0\n{image}\n3\n60\n80\n2\n1 0.9 0 0 30 30\n0 0.1 10 10 50 40\n")
            layer.window_data_param.source = windows
            layer.window_data_param.ClearField("mean_file")
            batch, crop = layer.window_data_param.batch_size, layer.transform_param.crop_size
            given[layer.top[0]] = (batch, 3, crop, crop)
    return given


def _load(schema, path: str):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        net = prototext.to_message(prototext.parse(handle.read(), path), schema.new("NetParameter"))
    try:
        from caffe_ft.formats.upgrade import upgrade_net
    except ImportError:  # pragma: no cover - while upgrade.py is being written
        return net
    upgrade_net(net)
    return net


# Nets whose TEST phase needs a stage to have any data layer.
TEST_STAGES = {"mnist_autoencoder.prototxt": ("test-on-test",)}


def _doc_nets() -> List[str]:
    found = caffe_doc_files() + caffe_doc_files("**/*.prototxt.gz")
    return sorted(path for path in found if "solver" not in os.path.basename(path))


def _compare_doc_net(schema, path: str, phase: str, tmp) -> int:
    net = _load(schema, path)
    stages = TEST_STAGES.get(os.path.basename(path), ()) if phase == "TEST" else ()
    given = _stand_in_data(net, phase, stages, str(tmp))
    python_path = []
    if any(layer.type == "Python" for layer in filter_layers(net, phase, 0, stages)):
        # pycaffe's example loss layer (examples/pycaffe/layers/pyloss.py)
        # gives its top the shape (1,): a Python layer's shape is the caller's to say.
        python_path.append(os.path.join(os.path.dirname(path), "layers"))
        given.update({layer.top[0]: (1,) for layer in net.layer if layer.type == "Python"})
    rewritten = tmp / f"{phase}.prototxt"
    rewritten.write_text(prototext.print_message(net))
    return _assert_same_as_caffe(net, str(rewritten), phase, given, stages, python_path)


@pytest.mark.caffe
@pytest.mark.parametrize("phase", ["TRAIN", "TEST"])
@pytest.mark.parametrize("path", _doc_nets(), ids=lambda p: os.path.relpath(p, "/usr/share/doc/caffe-doc"))
def test_caffe_doc_nets_match_caffe(schema, path: str, phase: str, tmp_path) -> None:
    assert _compare_doc_net(schema, path, phase, tmp_path) > 0


@pytest.mark.caffe
def test_caffe_doc_nets_are_there() -> None:
    assert len(_doc_nets()) >= 25


@pytest.mark.caffe
def test_nsfw_resnet50_matches_caffe(schema) -> None:
    path = os.path.join(NSFW_DIR, "deploy.prototxt")
    net = _load(schema, path)
    assert _assert_same_as_caffe(net, path, "TEST") > 50
    ours = infer(net)
    assert ours.blobs["prob"] == (1, 2)
    # every BatchNorm has its 3 blobs and every Scale its factor and bias
    assert all(len(ours.params[l.name]) == 3 for l in ours.layers if l.type == "BatchNorm")
