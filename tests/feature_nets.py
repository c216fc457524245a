"""A small image classifier (train_val with ImageData layers, and its deploy
twin) for the feature, linear-head and advisor tests, and a way to give it
random weights with pycaffe.

The transform is the usual one (resize, centre crop, BGR mean, scale) so
that every step of the data transform is exercised; a BatchNorm layer gives
the advisor something to measure.
"""

from __future__ import annotations

import os
from typing import Optional

MEAN = (104.0, 117.0, 123.0)
SCALE = 0.0078125
RESIZE = 36
CROP = 32

_TRANSFORM = (f"crop_size: {CROP} mean_value: {MEAN[0]:g} mean_value: {MEAN[1]:g} mean_value: {MEAN[2]:g} "
              f"scale: {SCALE}")

_TRUNK = """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 8 kernel_size: 3 pad: 1
    weight_filler { type: "msra" } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param { num_output: 16 kernel_size: 3 pad: 1
    weight_filler { type: "msra" } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
  pooling_param { pool: AVE kernel_size: 4 stride: 4 } }
layer { name: "fc1" type: "InnerProduct" bottom: "pool2" top: "fc1"
  inner_product_param { num_output: 32 weight_filler { type: "msra" } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu3" type: "ReLU" bottom: "fc1" top: "fc1" }
layer { name: "drop1" type: "Dropout" bottom: "fc1" top: "fc1" dropout_param { dropout_ratio: 0.5 } }
layer { name: "fc2" type: "InnerProduct" bottom: "fc1" top: "fc2"
  inner_product_param { num_output: 10 weight_filler { type: "gaussian" std: 0.01 } } }
"""


def train_val(train_list: str, test_list: str, root_folder: str = "", batch_size: int = 8,
              test_batch_size: Optional[int] = None, shuffle: bool = False) -> str:
    """The train_val net reading the two image lists (``shuffle``: the TRAIN list)."""
    root = f' root_folder: "{root_folder}"' if root_folder else ""
    data = "".join(
        f"""layer {{ name: "data" type: "ImageData" top: "data" top: "label" include {{ phase: {phase} }}
  transform_param {{ {_TRANSFORM}{' mirror: true' if phase == 'TRAIN' else ''} }}
  image_data_param {{ source: "{source}" batch_size: {size} new_height: {RESIZE} new_width: {RESIZE}{root}{extra} }} }}
"""
        for phase, source, size, extra in (
            ("TRAIN", train_list, batch_size, " shuffle: true" if shuffle else ""),
            ("TEST", test_list, test_batch_size or batch_size, "")))
    tail = """layer { name: "accuracy" type: "Accuracy" bottom: "fc2" bottom: "label" top: "accuracy"
  include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc2" bottom: "label" top: "loss" }
"""
    return f'name: "small"\n{data}{_TRUNK}{tail}'


def deploy() -> str:
    """The deploy twin (Input of one crop, Softmax output)."""
    return (f'name: "small"\nlayer {{ name: "data" type: "Input" top: "data" '
            f"input_param {{ shape {{ dim: 1 dim: 3 dim: {CROP} dim: {CROP} }} }} }}\n{_TRUNK}"
            'layer { name: "prob" type: "Softmax" bottom: "fc2" top: "prob" }\n')


def make_weights(directory: str, seed: int = 1, name: Optional[str] = None) -> str:
    """Random weights for the small net (fillers seeded by ``seed``; BatchNorm
    statistics set to a plausible mean 0, variance 1); returns the caffemodel."""
    import numpy as np

    from caffe_ft.training.pycaffe import quiet_caffe

    caffe = quiet_caffe()
    caffe.set_random_seed(seed)
    path = os.path.join(directory, "small_deploy.prototxt")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(deploy())
    net = caffe.Net(path, caffe.TEST)
    bn = net.params["bn1"]
    bn[0].data[...] = 0.0
    bn[1].data[...] = 1.0
    bn[2].data[...] = 1.0
    rng = np.random.default_rng(seed)
    net.params["scale1"][0].data[...] = rng.uniform(0.5, 1.5, net.params["scale1"][0].data.shape)
    weights = os.path.join(directory, name or f"small_{seed}.caffemodel")
    net.save(weights)
    return weights
