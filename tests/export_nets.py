"""Small nets for the export tests: one holding every layer type the ONNX
exporter knows besides the zoo nets' own, and single Pooling layers at the
shapes where Caffe's ceil rounding and pad clipping matter.
"""

from __future__ import annotations

from typing import List, Tuple

# Every other layer the exporter knows, on a small input.
LAYERS_NET = """
name: "layers"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 4 dim: 9 dim: 11 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 6 kernel_h: 3 kernel_w: 2 pad_h: 2 pad_w: 1 stride_h: 1 stride_w: 2 dilation: 2 group: 2 } }
layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "bn" }
layer { name: "bn_scale" type: "Scale" bottom: "bn" top: "bn_scale" scale_param { bias_term: true } }
layer { name: "bn_tap" type: "AbsVal" bottom: "bn" top: "bn_tap" }
layer { name: "prelu" type: "PReLU" bottom: "bn_scale" top: "bn_scale" }
layer { name: "elu" type: "ELU" bottom: "bn_tap" top: "elu" elu_param { alpha: 0.7 } }
layer { name: "sum" type: "Eltwise" bottom: "elu" bottom: "bn_scale" top: "sum" eltwise_param { coeff: 0.5 coeff: -2 } }
layer { name: "prod" type: "Eltwise" bottom: "sum" bottom: "elu" top: "prod" eltwise_param { operation: PROD } }
layer { name: "max" type: "Eltwise" bottom: "prod" bottom: "sum" top: "max" eltwise_param { operation: MAX } }
layer { name: "leaky" type: "ReLU" bottom: "max" top: "max" relu_param { negative_slope: 0.1 } }
layer { name: "lrn_across" type: "LRN" bottom: "max" top: "lrn_across" lrn_param { local_size: 3 alpha: 0.5 beta: 0.7 k: 2 } }
layer { name: "lrn_within" type: "LRN" bottom: "max" top: "lrn_within"
  lrn_param { local_size: 3 alpha: 0.5 beta: 0.7 norm_region: WITHIN_CHANNEL } }
layer { name: "concat" type: "Concat" bottom: "lrn_across" bottom: "lrn_within" top: "concat" }
layer { name: "slice" type: "Slice" bottom: "concat" top: "part_a" top: "part_b" top: "part_c"
  slice_param { slice_point: 2 slice_point: 7 } }
layer { name: "tanh" type: "TanH" bottom: "part_a" top: "tanh" }
layer { name: "sigmoid" type: "Sigmoid" bottom: "part_b" top: "sigmoid" }
layer { name: "bnll" type: "BNLL" bottom: "part_c" top: "bnll" }
layer { name: "exp" type: "Exp" bottom: "tanh" top: "exp" exp_param { base: 2 scale: 0.5 shift: 0.3 } }
layer { name: "log" type: "Log" bottom: "exp" top: "log" log_param { base: 10 scale: 2 shift: 1 } }
layer { name: "power" type: "Power" bottom: "sigmoid" top: "power" power_param { power: 2 scale: 0.5 shift: 1 } }
layer { name: "gain" type: "Pooling" bottom: "sigmoid" top: "channel_gain0" pooling_param { pool: AVE global_pooling: true } }
layer { name: "gain_flat" type: "Reshape" bottom: "channel_gain0" top: "channel_gain" reshape_param { shape { dim: 0 dim: -1 } } }
layer { name: "scale2" type: "Scale" bottom: "power" bottom: "channel_gain" top: "scaled" scale_param { axis: 0 } }
layer { name: "bias" type: "Bias" bottom: "scaled" top: "biased" }
layer { name: "threshold" type: "Threshold" bottom: "bnll" top: "threshold" threshold_param { threshold: 0.8 } }
layer { name: "split" type: "Split" bottom: "threshold" top: "t1" top: "t2" }
layer { name: "cat2" type: "Concat" bottom: "log" bottom: "biased" bottom: "t1" top: "cat2" }
layer { name: "deconv" type: "Deconvolution" bottom: "cat2" top: "deconv"
  convolution_param { num_output: 4 kernel_size: 3 stride: 2 pad: 1 group: 2 } }
layer { name: "pool" type: "Pooling" bottom: "deconv" top: "pool" pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "drop" type: "Dropout" bottom: "pool" top: "pool" }
layer { name: "flat" type: "Flatten" bottom: "pool" top: "flat" flatten_param { axis: 2 } }
layer { name: "ip_axis2" type: "InnerProduct" bottom: "flat" top: "ip_axis2" inner_product_param { num_output: 5 axis: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "ip_axis2" top: "ip" inner_product_param { num_output: 7 transpose: true } }
layer { name: "global_max" type: "Pooling" bottom: "deconv" top: "global_max" pooling_param { pool: MAX global_pooling: true } }
layer { name: "softmax" type: "Softmax" bottom: "ip" top: "prob" }
"""


def pooling_net(size: Tuple[int, int], pool: str, kernel: Tuple[int, int], stride: Tuple[int, int],
                pad: Tuple[int, int]) -> str:
    """A net of one Pooling layer over a (1, 2, H, W) input."""
    return f"""
layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 1 dim: 2 dim: {size[0]} dim: {size[1]} }} }} }}
layer {{ name: "pool" type: "Pooling" bottom: "data" top: "pool"
  pooling_param {{ pool: {pool} kernel_h: {kernel[0]} kernel_w: {kernel[1]} stride_h: {stride[0]} stride_w: {stride[1]}
                  pad_h: {pad[0]} pad_w: {pad[1]} }} }}
"""


# (input H, W), kernel, stride, pad: Caffe's output size and AVE divisors at each edge.
POOLING_CASES = [
    ((13, 13), (3, 3), (2, 2), (0, 0)),  # exact fit: no rounding
    ((14, 12), (3, 3), (2, 2), (0, 0)),  # ceil adds a last window overhanging the bottom/right
    ((6, 7), (3, 3), (2, 2), (1, 1)),  # AVE's last window counts one pad cell, not two
    ((5, 5), (2, 2), (2, 2), (1, 1)),  # a last window starting in the padding is dropped
    ((7, 9), (2, 3), (4, 3), (1, 1)),  # ...leaving windows that stop short of the end
    ((8, 5), (3, 2), (1, 3), (2, 1)),  # rectangular, pad on one axis wider than the other
    ((3, 3), (3, 3), (1, 1), (1, 1)),  # pad all around a tiny input
]


def random_weights(net_path: str, out: str, seed: int = 0) -> str:
    """A caffemodel of random weights of the right shapes for ``net_path``,
    written without Caffe (N(0, 1/fan_in); BatchNorm statistics stored times a
    scale factor of 2, as Caffe's moving averages are; Scale and PReLU near 1)."""
    import numpy as np

    from caffe_ft.formats.caffemodel import Blob, Model, save_model
    from caffe_ft.formats.files import load_net
    from caffe_ft.formats.schema import load_schema
    from caffe_ft.net.shapes import infer

    schema = load_schema()
    net = load_net(net_path, schema)
    rng = np.random.default_rng(seed)
    saved = schema.new("NetParameter")
    blobs = []
    for entry in infer(net, "TEST").layers:
        if not entry.params:
            continue
        layer = saved.layer.add()
        layer.name, layer.type = entry.name, entry.type
        arrays = []
        for index, shape in enumerate(entry.params):
            if entry.type == "BatchNorm":
                value = [rng.normal(0, 0.2, shape), rng.uniform(1, 3, shape), np.full(shape, 2.0)][index]
            elif entry.type in ("Scale", "PReLU") and index == 0:
                value = rng.uniform(0.5, 1.5, shape)
            else:
                std = np.sqrt(1.0 / max(1, int(np.prod(shape[1:])))) if len(shape) > 1 else 0.1
                value = rng.normal(0, std, shape)
            arrays.append(Blob.of(np.asarray(value, np.float32)))
        blobs.append(arrays)
    save_model(Model(saved, blobs), out)
    return out


# Classifier deploy nets of caffe-doc (paths below /usr/share/doc/caffe-doc), the
# batch sizes to compare at, and an input shape to run them at instead of their
# own (empty: their own).
DEPLOY_NETS: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = [
    ("models/bvlc_reference_caffenet/deploy.prototxt", (1,), ()),
    ("models/bvlc_alexnet/deploy.prototxt", (1, 8), (1, 3, 99, 99)),
    ("models/bvlc_googlenet/deploy.prototxt.gz", (1,), ()),
    ("models/finetune_flickr_style/deploy.prototxt.gz", (1,), (1, 3, 99, 99)),
    ("models/bvlc_reference_rcnn_ilsvrc13/deploy.prototxt", (1,), (1, 3, 99, 99)),
    # Fully convolutional: a 2x2 score map from 259x259 instead of 451x451.
    ("examples/net_surgery/bvlc_caffenet_full_conv.prototxt", (1,), (1, 3, 259, 259)),
    ("examples/cifar10/cifar10_quick.prototxt", (1, 8), ()),
    ("examples/cifar10/cifar10_full.prototxt", (1, 8), ()),
    ("examples/mnist/lenet.prototxt", (1, 8), ()),
]
