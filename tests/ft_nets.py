"""Small nets shaped like the model-zoo ones, for the graph and strategy tests.

Only the structure matters here (names, bottoms/tops, parameters, phases,
loss weights); sizes are kept tiny.
"""

from __future__ import annotations

_DATA = """
layer {
  name: "data" type: "Data" top: "data" top: "label"
  include { phase: TRAIN }
  data_param { source: "train_lmdb" batch_size: 4 backend: LMDB }
}
layer {
  name: "data" type: "Data" top: "data" top: "label"
  include { phase: TEST }
  data_param { source: "val_lmdb" batch_size: 4 backend: LMDB }
}
"""

_MULTS = "param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }"

# CaffeNet's train_val, shortened: two conv blocks, fc6/fc7 with dropout, fc8.
CAFFENET = f"""
name: "CaffeNet"
{_DATA}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1" {_MULTS}
  convolution_param {{ num_output: 8 kernel_size: 3 stride: 2
    weight_filler {{ type: "gaussian" std: 0.01 }} bias_filler {{ type: "constant" value: 0 }} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param {{ pool: MAX kernel_size: 3 stride: 2 }} }}
layer {{ name: "norm1" type: "LRN" bottom: "pool1" top: "norm1" lrn_param {{ local_size: 5 }} }}
layer {{ name: "conv2" type: "Convolution" bottom: "norm1" top: "conv2" {_MULTS}
  convolution_param {{ num_output: 8 kernel_size: 3 group: 2 }} }}
layer {{ name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }}
layer {{ name: "fc6" type: "InnerProduct" bottom: "conv2" top: "fc6" {_MULTS}
  inner_product_param {{ num_output: 16 }} }}
layer {{ name: "relu6" type: "ReLU" bottom: "fc6" top: "fc6" }}
layer {{ name: "drop6" type: "Dropout" bottom: "fc6" top: "fc6" dropout_param {{ dropout_ratio: 0.5 }} }}
layer {{ name: "fc7" type: "InnerProduct" bottom: "fc6" top: "fc7" {_MULTS}
  inner_product_param {{ num_output: 16 }} }}
layer {{ name: "relu7" type: "ReLU" bottom: "fc7" top: "fc7" }}
layer {{ name: "drop7" type: "Dropout" bottom: "fc7" top: "fc7" dropout_param {{ dropout_ratio: 0.5 }} }}
layer {{ name: "fc8" type: "InnerProduct" bottom: "fc7" top: "fc8" {_MULTS}
  inner_product_param {{ num_output: 1000
    weight_filler {{ type: "xavier" }} bias_filler {{ type: "constant" value: 0.1 }} }} }}
layer {{ name: "accuracy" type: "Accuracy" bottom: "fc8" bottom: "label" top: "accuracy"
  include {{ phase: TEST }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "fc8" bottom: "label" top: "loss" }}
"""

# CaffeNet's deploy: an Input layer and a Softmax, fc8 without fillers or multipliers.
CAFFENET_DEPLOY = """
name: "CaffeNet"
layer { name: "data" type: "Input" top: "data"
  input_param { shape { dim: 1 dim: 3 dim: 32 dim: 32 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 8 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc7" type: "InnerProduct" bottom: "conv1" top: "fc7" inner_product_param { num_output: 16 } }
layer { name: "relu7" type: "ReLU" bottom: "fc7" top: "fc7" }
layer { name: "fc8" type: "InnerProduct" bottom: "fc7" top: "fc8" inner_product_param { num_output: 1000 } }
layer { name: "prob" type: "Softmax" bottom: "fc8" top: "prob" }
"""


def _aux(n: int, attach: str) -> str:
    """GoogLeNet's side classifier ``loss{n}``, leaving the trunk at blob ``attach``."""
    p = f"loss{n}"
    return f"""
layer {{ name: "{p}/ave_pool" type: "Pooling" bottom: "{attach}" top: "{p}/ave_pool"
  pooling_param {{ pool: AVE kernel_size: 5 stride: 3 }} }}
layer {{ name: "{p}/conv" type: "Convolution" bottom: "{p}/ave_pool" top: "{p}/conv" {_MULTS}
  convolution_param {{ num_output: 8 kernel_size: 1 }} }}
layer {{ name: "{p}/relu_conv" type: "ReLU" bottom: "{p}/conv" top: "{p}/conv" }}
layer {{ name: "{p}/fc" type: "InnerProduct" bottom: "{p}/conv" top: "{p}/fc" {_MULTS}
  inner_product_param {{ num_output: 16 }} }}
layer {{ name: "{p}/relu_fc" type: "ReLU" bottom: "{p}/fc" top: "{p}/fc" }}
layer {{ name: "{p}/drop_fc" type: "Dropout" bottom: "{p}/fc" top: "{p}/fc" dropout_param {{ dropout_ratio: 0.7 }} }}
layer {{ name: "{p}/classifier" type: "InnerProduct" bottom: "{p}/fc" top: "{p}/classifier" {_MULTS}
  inner_product_param {{ num_output: 1000 }} }}
layer {{ name: "{p}/loss" type: "SoftmaxWithLoss" bottom: "{p}/classifier" bottom: "label"
  top: "{p}/loss1" loss_weight: 0.3 }}
layer {{ name: "{p}/top-1" type: "Accuracy" bottom: "{p}/classifier" bottom: "label" top: "{p}/top-1"
  include {{ phase: TEST }} }}
"""


def _inception(name: str, bottom: str) -> str:
    """Two parallel convolutions joined by a Concat (an inception module, shortened)."""
    return f"""
layer {{ name: "{name}/1x1" type: "Convolution" bottom: "{bottom}" top: "{name}/1x1" {_MULTS}
  convolution_param {{ num_output: 4 kernel_size: 1 }} }}
layer {{ name: "{name}/3x3" type: "Convolution" bottom: "{bottom}" top: "{name}/3x3" {_MULTS}
  convolution_param {{ num_output: 4 kernel_size: 3 pad: 1 }} }}
layer {{ name: "{name}/output" type: "Concat" bottom: "{name}/1x1" bottom: "{name}/3x3" top: "{name}/output" }}
"""


# GoogLeNet's train_val, shortened: the side heads loss1 (after inception_4a)
# and loss2 (after inception_4d) come in net order right after their modules.
GOOGLENET = f"""
name: "GoogleNet"
{_DATA}
layer {{ name: "conv1/7x7_s2" type: "Convolution" bottom: "data" top: "conv1/7x7_s2" {_MULTS}
  convolution_param {{ num_output: 4 kernel_size: 7 stride: 2 }} }}
layer {{ name: "pool1/3x3_s2" type: "Pooling" bottom: "conv1/7x7_s2" top: "pool1/3x3_s2"
  pooling_param {{ pool: MAX kernel_size: 3 stride: 2 }} }}
{_inception("inception_4a", "pool1/3x3_s2")}
{_aux(1, "inception_4a/output")}
{_inception("inception_4d", "inception_4a/output")}
{_aux(2, "inception_4d/output")}
{_inception("inception_5b", "inception_4d/output")}
layer {{ name: "pool5/7x7_s1" type: "Pooling" bottom: "inception_5b/output" top: "pool5/7x7_s1"
  pooling_param {{ pool: AVE kernel_size: 7 stride: 1 }} }}
layer {{ name: "pool5/drop_7x7_s1" type: "Dropout" bottom: "pool5/7x7_s1" top: "pool5/7x7_s1"
  dropout_param {{ dropout_ratio: 0.4 }} }}
layer {{ name: "loss3/classifier" type: "InnerProduct" bottom: "pool5/7x7_s1" top: "loss3/classifier" {_MULTS}
  inner_product_param {{ num_output: 1000 }} }}
layer {{ name: "loss3/loss3" type: "SoftmaxWithLoss" bottom: "loss3/classifier" bottom: "label"
  top: "loss3/loss3" loss_weight: 1 }}
layer {{ name: "loss3/top-1" type: "Accuracy" bottom: "loss3/classifier" bottom: "label" top: "loss3/top-1"
  include {{ phase: TEST }} }}
"""

# SqueezeNet's end: the classifier is a 1x1 Convolution, then an in-place
# ReLU and a global average pooling.
SQUEEZENET = f"""
name: "SqueezeNet"
{_DATA}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: 8 kernel_size: 3 }} }}
layer {{ name: "relu_conv1" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "drop9" type: "Dropout" bottom: "conv1" top: "conv1" }}
layer {{ name: "conv10" type: "Convolution" bottom: "conv1" top: "conv10"
  convolution_param {{ num_output: 1000 kernel_size: 1 weight_filler {{ type: "gaussian" mean: 0 std: 0.01 }} }} }}
layer {{ name: "relu_conv10" type: "ReLU" bottom: "conv10" top: "conv10" }}
layer {{ name: "pool10" type: "Pooling" bottom: "conv10" top: "pool10"
  pooling_param {{ pool: AVE global_pooling: true }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "pool10" bottom: "label" top: "loss" include {{ phase: TRAIN }} }}
layer {{ name: "accuracy" type: "Accuracy" bottom: "pool10" bottom: "label" top: "accuracy" include {{ phase: TEST }} }}
"""


def _bn(name: str, blob: str, stats: bool = False) -> str:
    """ResNet's BatchNorm + Scale pair, in place on ``blob``."""
    global_stats = "batch_norm_param { use_global_stats: true }" if stats else ""
    return f"""
layer {{ name: "bn_{name}" type: "BatchNorm" bottom: "{blob}" top: "{blob}" {global_stats}
  param {{ lr_mult: 0 }} param {{ lr_mult: 0 }} param {{ lr_mult: 0 }} }}
layer {{ name: "scale_{name}" type: "Scale" bottom: "{blob}" top: "{blob}" scale_param {{ bias_term: true }} }}
"""


# ResNet's shape: conv1 + BN, one residual block with an Eltwise, fc1000.
RESNET = f"""
name: "ResNet"
{_DATA}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: 4 kernel_size: 7 stride: 2 bias_term: false }} }}
{_bn("conv1", "conv1")}
layer {{ name: "conv1_relu" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "res2a_branch2a" type: "Convolution" bottom: "conv1" top: "res2a_branch2a"
  convolution_param {{ num_output: 4 kernel_size: 3 pad: 1 bias_term: false }} }}
{_bn("res2a_branch2a", "res2a_branch2a")}
layer {{ name: "res2a" type: "Eltwise" bottom: "conv1" bottom: "res2a_branch2a" top: "res2a" }}
layer {{ name: "res2a_relu" type: "ReLU" bottom: "res2a" top: "res2a" }}
layer {{ name: "pool5" type: "Pooling" bottom: "res2a" top: "pool5"
  pooling_param {{ pool: AVE global_pooling: true }} }}
layer {{ name: "fc1000" type: "InnerProduct" bottom: "pool5" top: "fc1000"
  inner_product_param {{ num_output: 1000 }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "fc1000" bottom: "label" top: "loss" }}
"""


def _tower(suffix: str, bottom: str) -> str:
    """One branch of a siamese classifier; parameters shared by name."""
    s = suffix
    return f"""
layer {{ name: "conv1{s}" type: "Convolution" bottom: "{bottom}" top: "conv1{s}"
  param {{ name: "conv1_w" lr_mult: 1 }} param {{ name: "conv1_b" lr_mult: 2 }}
  convolution_param {{ num_output: 4 kernel_size: 3 }} }}
layer {{ name: "ip1{s}" type: "InnerProduct" bottom: "conv1{s}" top: "ip1{s}"
  param {{ name: "ip1_w" lr_mult: 1 }} param {{ name: "ip1_b" lr_mult: 2 }}
  inner_product_param {{ num_output: 8 }} }}
layer {{ name: "relu1{s}" type: "ReLU" bottom: "ip1{s}" top: "ip1{s}" }}
layer {{ name: "cls{s}" type: "InnerProduct" bottom: "ip1{s}" top: "cls{s}"
  param {{ name: "cls_w" lr_mult: 1 }} param {{ name: "cls_b" lr_mult: 2 }}
  inner_product_param {{ num_output: 10 }} }}
layer {{ name: "loss{s}" type: "SoftmaxWithLoss" bottom: "cls{s}" bottom: "label" top: "loss{s}" }}
"""


# A siamese net (two towers sharing every parameter), each tower classifying.
SIAMESE = f"""
name: "Siamese"
layer {{ name: "pair" type: "Input" top: "pair" top: "label"
  input_param {{ shape {{ dim: 2 dim: 2 dim: 8 dim: 8 }} shape {{ dim: 2 }} }} }}
layer {{ name: "slice" type: "Slice" bottom: "pair" top: "a" top: "b" slice_param {{ slice_dim: 1 }} }}
{_tower("", "a")}
{_tower("_p", "b")}
"""

#: A train_val fed by two LMDB Data layers (TRAIN and TEST), for the data-layer rewrites.
LMDB_TRAIN_VAL = """name: "lmdb"
layer { name: "d" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { scale: 0.00390625 } data_param { source: "train_lmdb" batch_size: 64 backend: LMDB } }
layer { name: "d" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { scale: 0.00390625 } data_param { source: "test_lmdb" batch_size: 100 backend: LMDB } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1" convolution_param { num_output: 4 kernel_size: 5 } }
layer { name: "ip" type: "InnerProduct" bottom: "conv1" top: "ip" inner_product_param { num_output: 10 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""
