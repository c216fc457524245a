"""A small net holding every layer type the torch engine runs that the
caffe-doc nets do not exercise (Deconvolution, Crop, Slice, the element-wise
layers, Eltwise PROD/MAX/SUM with coefficients, Bias, Reshape, InnerProduct
with transpose and axis, Threshold, ArgMax, SoftmaxWithLoss with ignore_label
and FULL normalization, EuclideanLoss with a loss weight, top-2 Accuracy),
for the forward and training parity tests."""

ZOO = """
name: "zoo"
layer { name: "data" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } shape { dim: 2 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "deconv" type: "Deconvolution" bottom: "conv1" top: "deconv"
  convolution_param { num_output: 4 kernel_size: 2 stride: 2 group: 2 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "crop" type: "Crop" bottom: "deconv" bottom: "conv1" top: "crop" crop_param { axis: 2 offset: 3 } }
layer { name: "tanh" type: "TanH" bottom: "crop" top: "tanh" }
layer { name: "slice" type: "Slice" bottom: "conv1" top: "s1" top: "s2" slice_param { axis: 1 slice_point: 1 } }
layer { name: "elu" type: "ELU" bottom: "s2" top: "elu" elu_param { alpha: 0.5 } }
layer { name: "abs" type: "AbsVal" bottom: "s1" top: "abs" }
layer { name: "power" type: "Power" bottom: "abs" top: "power" power_param { power: 2 scale: 0.5 shift: 1 } }
layer { name: "log" type: "Log" bottom: "power" top: "log" log_param { base: 2 } }
layer { name: "exp" type: "Exp" bottom: "log" top: "exp" exp_param { scale: 0.1 } }
layer { name: "bnll" type: "BNLL" bottom: "elu" top: "bnll" }
layer { name: "concat" type: "Concat" bottom: "exp" bottom: "bnll" top: "cat" }
layer { name: "fixed" type: "Convolution" bottom: "data" top: "fixed" param { lr_mult: 0 decay_mult: 0 }
  convolution_param { num_output: 4 kernel_size: 1 bias_term: false weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "threshold" type: "Threshold" bottom: "fixed" top: "mask" threshold_param { threshold: 0.2 } }
layer { name: "prod" type: "Eltwise" bottom: "cat" bottom: "mask" top: "prod" eltwise_param { operation: PROD } }
layer { name: "max" type: "Eltwise" bottom: "tanh" bottom: "prod" top: "emax" eltwise_param { operation: MAX } }
layer { name: "sum" type: "Eltwise" bottom: "emax" bottom: "cat" top: "esum"
  eltwise_param { operation: SUM coeff: 1 coeff: -0.5 } }
layer { name: "sigmoid" type: "Sigmoid" bottom: "esum" top: "sig" }
layer { name: "bias" type: "Bias" bottom: "sig" top: "biased" bias_param { filler { type: "constant" value: 0.1 } } }
layer { name: "reshape" type: "Reshape" bottom: "biased" top: "flat" reshape_param { shape { dim: 0 dim: -1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "flat" top: "ip"
  inner_product_param { num_output: 4 transpose: true weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "ip_axis" type: "InnerProduct" bottom: "biased" top: "ip_axis"
  inner_product_param { num_output: 1 axis: 2 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "flatten" type: "Flatten" bottom: "ip_axis" top: "ip_axis_flat" }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss"
  loss_param { ignore_label: 0 normalization: FULL } }
layer { name: "euclid" type: "EuclideanLoss" bottom: "ip" bottom: "ip_axis_flat" top: "euclid" loss_weight: 0.5 }
layer { name: "accuracy" type: "Accuracy" bottom: "ip" bottom: "label" top: "accuracy" accuracy_param { top_k: 2 } }
layer { name: "argmax" type: "ArgMax" bottom: "ip" top: "argmax" argmax_param { top_k: 2 out_max_val: true } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""
