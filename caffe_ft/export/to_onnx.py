"""A deploy net and its weights as an ONNX model that computes what Caffe computes.

:func:`convert` walks the net's TEST-phase layers in order, as Caffe's
forward pass does, and emits for each one the ONNX nodes with Caffe's
semantics, including the corners other converters get wrong:

* Pooling: Caffe rounds the output size up and drops a last window that would
  start in the bottom/right padding (:func:`caffe_ft.net.shapes.infer` gives
  that size); ONNX gets explicit, possibly asymmetric pads that produce exactly
  those windows.  AVE divides each window's sum by the window clipped to the
  padded input (not to the image, not the full kernel): the sum is taken over
  a zero-padded input and multiplied by a constant map of ``kernel / divisor``
  where the two differ, so no runtime's ``count_include_pad`` reading matters.
* BatchNorm: the stored mean and variance are divided by the scale factor
  (blob 2); a following Scale is folded into the one BatchNormalization node.
* LRN: ACROSS_CHANNELS is ONNX's LRN; WITHIN_CHANNEL is composed (x² averaged
  over the padded window, ``(1 + alpha * avg) ^ -beta``, times x).
* In-place layers: ONNX values are written once, so the value a blob holds at
  the end of the forward pass keeps the blob's name (what pycaffe shows in
  ``net.blobs``) and earlier versions are called ``blob@layer``.

Layer names become node names; the batch axis can be left symbolic
(``dynamic_batch``): the net's shapes are inferred at two batch sizes, and
the axes that differ are the ones that follow the batch.  A layer with no
faithful ONNX equivalent is an error naming it.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np
from google.protobuf.message import Message

from ..version import __version__
from ..errors import CaffeFtError, listing
from ..formats.caffemodel import Model
from ..net import shapes, weights

if TYPE_CHECKING:  # the onnx package is optional: imported where used
    import onnx

Shape = Tuple[int, ...]

DEFAULT_OPSET = 13  # the first with Softmax over one axis (Caffe's); ONNX Runtime 1.10 runs up to 15
MIN_OPSET = 13
BATCH = "N"  # the symbolic batch dimension
_PROTOBUF_LIMIT = 2 ** 31 - 1

# Caffe enums (caffe.proto).
_MAX, _AVE, _STOCHASTIC = 0, 1, 2
_PROD, _SUM, _EMAX = 0, 1, 2
_WITHIN_CHANNEL = 1


@dataclass(frozen=True)
class ExportOptions:
    """How to export: ONNX opset, input shapes that replace the net's, a
    symbolic batch axis, and what to do with the final Softmax (None: as the
    net says; True: add one to each score output; False: strip it, logits out).
    """

    opset: int = DEFAULT_OPSET
    input_shapes: Mapping[str, Sequence[int]] = field(default_factory=dict)
    dynamic_batch: bool = True
    softmax: Optional[bool] = None


def _onnx() -> Any:
    try:
        import onnx
        import onnx.checker
        import onnx.helper
        import onnx.numpy_helper  # onnx 1.12 (the reference environment's) does not import it itself
    except ImportError:
        raise CaffeFtError("exporting to ONNX needs the onnx package: pip install 'caffe-ft[onnx]'") from None
    return onnx


def max_opset() -> int:
    """The newest default-domain opset the installed onnx package knows."""
    return int(_onnx().defs.onnx_opset_version())


# --------------------------------------------------------------------------
# The net before conversion


def _outputs(layers: Sequence[Message]) -> List[str]:
    """Blobs left unconsumed after the last layer (pycaffe's ``net.outputs``), in production order."""
    available: Dict[str, None] = {}
    for layer in layers:
        for bottom in layer.bottom:
            available.pop(bottom, None)
        for top in layer.top:
            available[top] = None
    return list(available)


def with_softmax(net: Message, softmax: Optional[bool]) -> Message:
    """``net`` (TEST phase, a copy) with a Softmax added on each score output
    (``softmax=True``) or the output Softmax layers removed (``False``).
    """
    copy = type(net)()
    copy.CopyFrom(net)
    del copy.layer[:]
    copy.layer.extend(shapes.filter_layers(net, "TEST"))
    if softmax is None:
        return copy
    producer = {top: layer for layer in copy.layer for top in layer.top}
    if softmax is False:
        keep = [layer for layer in copy.layer
                if not (layer.type == "Softmax" and set(layer.top) <= set(_outputs(copy.layer)))]
        del copy.layer[:]
        copy.layer.extend(keep)
        return copy
    blobs = {top for layer in copy.layer for top in layer.top}
    scores = [top for top in _outputs(copy.layer)
              if producer[top].type not in ("Softmax", "Input") and not producer[top].type.endswith("Data")]
    for top in scores:
        name = "prob" if len(scores) == 1 and "prob" not in blobs else f"{top}_prob"
        layer = copy.layer.add()
        layer.name, layer.type = name, "Softmax"
        layer.bottom.append(top)
        layer.top.append(name)
    return copy


def layer_blobs(net: Message, model: Optional[Model], input_shapes: Mapping[str, Sequence[int]]) -> Dict[str, List[np.ndarray]]:
    """Each learnable TEST-phase layer's blobs, matched to ``model`` by name as Caffe copies them.

    A learnable layer the weights lack would keep its fillers' random values in
    Caffe: that is an error here, since no exported model could match it.
    """
    learnable = [entry.name for entry in shapes.infer(net, "TEST", input_shapes).layers if entry.params]
    if model is None:
        if learnable:
            raise CaffeFtError(f"the net has learnable layers ({listing(learnable)}): give their weights")
        return {}
    report = weights.check(net, model, "TEST", input_shapes)
    if not report.ok:
        raise CaffeFtError(f"Caffe would not load these weights: {report.abort}")
    fresh = [layer.name for layer in report.by_status(weights.FRESH)]
    if fresh:
        raise CaffeFtError(
            f"the weights have no blobs for {listing(fresh)}: Caffe would run them with random filler values"
        )
    loaded = weights.init(net, model, phase="TEST", input_shapes=input_shapes, report=report)
    return {
        layer.name: [np.asarray(blob.data, np.float32).reshape(blob.shape) for blob in blobs]
        for layer, blobs in zip(loaded.net.layer, loaded.blobs) if blobs
    }


# --------------------------------------------------------------------------
# Building the graph


def _unsupported(layer: Message, why: str) -> CaffeFtError:
    return CaffeFtError(f"{layer.type} {why}: no faithful ONNX equivalent; nothing written", layer=layer.name)


@dataclass
class _Layer:
    """One layer being converted: its message, weights, ONNX inputs and
    outputs, and its blobs' shapes at the net's batch (``*_a``) and at
    another batch (``*_b``), whose differences mark the batch-following axes.
    """

    message: Message
    blobs: List[np.ndarray]
    inputs: List[str]
    outputs: List[str]
    bottoms_a: Sequence[Shape]
    bottoms_b: Sequence[Shape]
    tops_a: Sequence[Shape]
    tops_b: Sequence[Shape]


class _Graph:
    """Nodes, initializers and the names already taken."""

    def __init__(self, onnx: Any, taken: Set[str], dynamic: bool) -> None:
        self.onnx = onnx
        self.nodes: List[Any] = []
        self.initializers: List[Tuple[str, np.ndarray]] = []
        self.taken = set(taken)
        self.node_names: Set[str] = set()
        self.dynamic = dynamic

    def fresh(self, base: str) -> str:
        """A value name not used yet: ``base``, else ``base_1``, ``base_2``..."""
        name, number = base, 0
        while name in self.taken:
            number += 1
            name = f"{base}_{number}"
        self.taken.add(name)
        return name

    def const(self, base: str, array: np.ndarray) -> str:
        """A new initializer holding ``array`` (float32 or int64), kept as an
        array until :meth:`fill` writes it into the model."""
        name = self.fresh(base)
        self.initializers.append((name, array))
        return name

    def fill(self, graph: Any) -> None:
        """Write the initializers into ``graph`` in place (one copy of each
        array's bytes: VGG16's weights alone are half a gigabyte)."""
        for name, array in self.initializers:
            tensor = graph.initializer.add()
            tensor.name = name
            integer = array.dtype == np.int64
            tensor.data_type = self.onnx.TensorProto.INT64 if integer else self.onnx.TensorProto.FLOAT
            tensor.dims.extend(array.shape)
            tensor.raw_data = np.ascontiguousarray(array, dtype="<i8" if integer else "<f4").tobytes()

    def ints(self, base: str, values: Sequence[int]) -> str:
        return self.const(base, np.asarray(values, np.int64))

    def scalar(self, base: str, value: float) -> str:
        return self.const(base, np.asarray(value, np.float32))

    def node(self, op: str, inputs: Sequence[str], outputs: Sequence[str], name: str, **attrs: Any) -> None:
        node_name, number = name, 0
        while node_name in self.node_names:
            number += 1
            node_name = f"{name}/{op}" if number == 1 else f"{name}/{op}_{number}"
        self.node_names.add(node_name)
        self.nodes.append(self.onnx.helper.make_node(op, list(inputs), list(outputs), name=node_name, **attrs))

    def step(self, op: str, inputs: Sequence[str], name: str, out: Optional[str] = None, **attrs: Any) -> str:
        """One node with one output (``out``, or a fresh ``name/op`` value)."""
        target = out if out is not None else self.fresh(f"{name}/{op.lower()}")
        self.node(op, inputs, [target], name, **attrs)
        return target

    def shape_for(self, layer: _Layer, a: Shape, b: Shape, what: str) -> str:
        """A Reshape target for shape ``a``: the one axis that follows the batch is -1."""
        moving = [i for i, (x, y) in enumerate(zip(a, b)) if x != y] if self.dynamic else []
        if len(moving) > 1:
            raise CaffeFtError(
                f"{what} spreads the batch over several axes {tuple(a)}: export with --static-batch",
                layer=layer.message.name,
            )
        return self.ints(f"{layer.message.name}/shape", [-1 if i in moving else d for i, d in enumerate(a)])


def _axis(axis: int, ndim: int) -> int:
    return axis + ndim if axis < 0 else axis


def _conv_dims(param: Message, name: str, axes: int, default: int, h_w: bool = True) -> List[int]:
    """ConvolutionParameter's per-axis ``name`` (``_h``/``_w``, once, or once per axis)."""
    if h_w and param.HasField(f"{name}_h"):
        return [getattr(param, f"{name}_h"), getattr(param, f"{name}_w")]
    key = name if name != "kernel" else "kernel_size"
    values = list(getattr(param, key))
    if not values:
        return [default] * axes
    return values * axes if len(values) == 1 else values


# --------------------------------------------------------------------------
# Layer rules: each emits the nodes for one layer


def _convolution(g: _Graph, layer: _Layer) -> None:
    message, param = layer.message, layer.message.convolution_param
    ndim = len(layer.bottoms_a[0])
    if _axis(param.axis, ndim) != 1:
        raise _unsupported(message, "over an axis other than 1")
    axes = ndim - 2
    kernel = _conv_dims(param, "kernel", axes, 0)
    stride = _conv_dims(param, "stride", axes, 1)
    pad = _conv_dims(param, "pad", axes, 0)
    dilation = _conv_dims(param, "dilation", axes, 1, h_w=False)
    weight = g.const(f"{message.name}/weight", layer.blobs[0])
    extra = [g.const(f"{message.name}/bias", layer.blobs[1])] if param.bias_term else []
    op = "ConvTranspose" if message.type == "Deconvolution" else "Conv"
    for x, out in zip(layer.inputs, layer.outputs):  # several bottoms share the weights
        g.node(op, [x, weight, *extra], [out], message.name, kernel_shape=kernel, strides=stride,
               pads=pad + pad, dilations=dilation, group=param.group)


def _inner_product(g: _Graph, layer: _Layer) -> None:
    message, param = layer.message, layer.message.inner_product_param
    shape, top_a, top_b = layer.bottoms_a[0], layer.tops_a[0], layer.tops_b[0]
    axis = _axis(param.axis, len(shape))
    x, name = layer.inputs[0], message.name
    weight = layer.blobs[0]
    bias = [g.const(f"{name}/bias", layer.blobs[1])] if param.bias_term else []
    if axis == 1:
        if len(shape) > 2:
            x = g.step("Flatten", [x], name, axis=1)
        g.node("Gemm", [x, g.const(f"{name}/weight", weight), *bias], layer.outputs, name,
               transB=0 if param.transpose else 1)
        return
    rows_a = (*top_a[:-1], weight.size // top_a[-1])
    rows_b = (*top_b[:-1], weight.size // top_b[-1])
    x = g.step("Reshape", [x, g.shape_for(layer, rows_a, rows_b, "InnerProduct")], name)
    matrix = weight if param.transpose else weight.T
    product = layer.outputs[0] if not bias else None
    y = g.step("MatMul", [x, g.const(f"{name}/weight", matrix)], name, product)
    if bias:
        g.node("Add", [y, bias[0]], layer.outputs, name)


def _pool_windows(size: int, out: int, kernel: int, stride: int, pad: int) -> Tuple[int, List[int]]:
    """The end padding that makes ``out`` windows, and each window's Caffe AVE divisor."""
    end = (out - 1) * stride + kernel - size - pad
    divisors = []
    for i in range(out):
        start = i * stride - pad
        divisors.append(min(start + kernel, size + pad) - start)
    return end, divisors


def _pooling(g: _Graph, layer: _Layer) -> None:
    message, param = layer.message, layer.message.pooling_param
    name, x, out = message.name, layer.inputs[0], layer.outputs[0]
    if param.pool == _STOCHASTIC:
        raise _unsupported(message, "STOCHASTIC pooling")
    if len(layer.outputs) > 1:  # Caffe's optional mask top: MAX's argmax indices
        raise _unsupported(message, f"with a second top '{message.top[1]}' (the argmax mask)")
    if param.global_pooling:
        g.node("GlobalMaxPool" if param.pool == _MAX else "GlobalAveragePool", [x], [out], name)
        return
    kernel, stride, pad, _ = shapes.pooling_geometry(message, layer.bottoms_a[0])
    sizes, outs = layer.bottoms_a[0][2:], layer.tops_a[0][2:]
    ends, divisors = [], []
    for size, o, k, s, p in zip(sizes, outs, kernel, stride, pad):
        end, divisor = _pool_windows(size, o, k, s, p)
        if end >= k or min(divisor) <= 0:
            raise _unsupported(message, f"with a window wholly outside the input (kernel {k}, stride {s})")
        ends.append(end)
        divisors.append(divisor)
    # A negative end pad: the windows stop short of the input's end; pad 0
    # and cut the extra windows off afterwards.
    cut = any(end < 0 for end in ends)
    ends = [max(end, 0) for end in ends]
    target = out if not cut else None
    if param.pool == _MAX:
        pads = {"pads": pad + ends} if any(pad + ends) else {}
        y = g.step("MaxPool", [x], name, target, kernel_shape=kernel, strides=stride, **pads)
    else:
        if any(pad + ends):
            x = g.step("Pad", [x, g.ints(f"{name}/pads", [0, 0, *pad, 0, 0, *ends])], name, mode="constant")
        scale = (kernel[0] * kernel[1]) / np.outer(divisors[0], divisors[1])
        exact = bool(np.all(scale == 1))
        y = g.step("AveragePool", [x], name, target if exact else None, kernel_shape=kernel, strides=stride)
        if not exact:
            if cut:
                target = None
            y = g.step("Mul", [y, g.const(f"{name}/divisors", scale.astype(np.float32)[None, None])], name, target)
    if cut:
        g.node("Slice", [y, g.ints(f"{name}/starts", [0, 0]), g.ints(f"{name}/ends", list(outs)),
                         g.ints(f"{name}/axes", [2, 3])], [out], name)


def _lrn(g: _Graph, layer: _Layer) -> None:
    message, param = layer.message, layer.message.lrn_param
    name, x, out = message.name, layer.inputs[0], layer.outputs[0]
    size = param.local_size
    if size % 2 == 0:
        raise _unsupported(message, "with an even local_size (Caffe refuses it)")
    if param.norm_region != _WITHIN_CHANNEL:
        g.node("LRN", [x], [out], name, size=size, alpha=param.alpha, beta=param.beta, bias=param.k)
        return
    # Caffe: x * (1 + alpha * avg(x^2 over size x size, zero-padded)) ^ -beta.
    pad = (size - 1) // 2
    squared = g.step("Mul", [x, x], name)
    padded = g.step("Pad", [squared, g.ints(f"{name}/pads", [0, 0, pad, pad, 0, 0, pad, pad])], name, mode="constant")
    average = g.step("AveragePool", [padded], name, kernel_shape=[size, size], strides=[1, 1])
    scaled = g.step("Mul", [average, g.scalar(f"{name}/alpha", param.alpha)], name)
    shifted = g.step("Add", [scaled, g.scalar(f"{name}/one", 1.0)], name)
    power = g.step("Pow", [shifted, g.scalar(f"{name}/beta", -param.beta)], name)
    g.node("Mul", [x, power], [out], name)


def _batch_norm_arrays(layer: _Layer) -> Tuple[np.ndarray, np.ndarray, float]:
    message = layer.message
    param = message.batch_norm_param
    if param.HasField("use_global_stats") and not param.use_global_stats:
        raise _unsupported(message, "with use_global_stats: false (normalizes by each batch's own statistics)")
    mean, variance, factor = layer.blobs
    scale = 0.0 if factor.reshape(-1)[0] == 0 else 1.0 / float(factor.reshape(-1)[0])
    return (mean * np.float32(scale)).astype(np.float32), (variance * np.float32(scale)).astype(np.float32), param.eps


def _batch_norm(g: _Graph, layer: _Layer, scale: Optional[_Layer] = None) -> None:
    """BatchNorm, with the Scale layer that follows it folded in when given."""
    message = layer.message
    mean, variance, eps = _batch_norm_arrays(layer)
    channels = mean.shape[0]
    gamma = np.ones(channels, np.float32)
    beta = np.zeros(channels, np.float32)
    outputs = layer.outputs
    if scale is not None:
        gamma = scale.blobs[0].reshape(channels)
        if scale.message.scale_param.bias_term:
            beta = scale.blobs[1].reshape(channels)
        outputs = scale.outputs
    name = message.name
    g.node("BatchNormalization", [
        layer.inputs[0], g.const(f"{name}/scale", gamma), g.const(f"{name}/bias", beta),
        g.const(f"{name}/mean", mean), g.const(f"{name}/var", variance),
    ], outputs, name, epsilon=eps)


def _broadcast(g: _Graph, layer: _Layer, ndim: int, axis: int, operand: str, shape_a: Shape, shape_b: Shape) -> str:
    """A bottom operand of Scale/Bias, shaped to broadcast from ``axis``."""
    trailing = (1,) * (ndim - axis - len(shape_a))
    if not trailing:
        return operand
    target = g.shape_for(layer, (*shape_a, *trailing), (*shape_b, *trailing), layer.message.type)
    return g.step("Reshape", [operand, target], layer.message.name)


def _operand_axes(param: Message, ndim: int, count: Optional[int]) -> Tuple[int, int]:
    axis = _axis(param.axis, ndim)
    if count is not None:
        return axis, count
    return axis, (ndim - axis if param.num_axes == -1 else param.num_axes)


def _scale_or_bias(g: _Graph, layer: _Layer) -> None:
    message = layer.message
    is_scale = message.type == "Scale"
    param = message.scale_param if is_scale else message.bias_param
    x, ndim = layer.inputs[0], len(layer.bottoms_a[0])
    blobs = list(layer.blobs)
    if len(layer.inputs) == 2:
        axis, _ = _operand_axes(param, ndim, len(layer.bottoms_a[1]))
        operand = _broadcast(g, layer, ndim, axis, layer.inputs[1], layer.bottoms_a[1], layer.bottoms_b[1])
    else:
        value = blobs.pop(0)
        axis, _ = _operand_axes(param, ndim, value.ndim)
        trailing = (1,) * (ndim - axis - value.ndim)
        operand = g.const(f"{message.name}/{'scale' if is_scale else 'bias'}", value.reshape(value.shape + trailing))
    has_bias = is_scale and param.bias_term
    first = g.step("Mul" if is_scale else "Add", [x, operand], message.name, None if has_bias else layer.outputs[0])
    if has_bias:
        bias = blobs[0]
        trailing = (1,) * (ndim - axis - bias.ndim)
        g.node("Add", [first, g.const(f"{message.name}/bias", bias.reshape(bias.shape + trailing))],
               layer.outputs, message.name)


def _eltwise(g: _Graph, layer: _Layer) -> None:
    message, param = layer.message, layer.message.eltwise_param
    name, inputs = message.name, list(layer.inputs)
    if param.operation == _PROD:
        y = inputs[0]
        for i, other in enumerate(inputs[1:], 2):
            y = g.step("Mul", [y, other], name, layer.outputs[0] if i == len(inputs) else None)
        return
    if param.operation == _EMAX:
        g.node("Max", inputs, layer.outputs, name)
        return
    if len(param.coeff):
        inputs = [x if c == 1 else g.step("Mul", [x, g.scalar(f"{name}/coeff", c)], name)
                  for x, c in zip(inputs, param.coeff)]
    g.node("Sum", inputs, layer.outputs, name)


def _concat(g: _Graph, layer: _Layer) -> None:
    param = layer.message.concat_param
    axis = param.concat_dim if param.HasField("concat_dim") else _axis(param.axis, len(layer.bottoms_a[0]))
    if len(layer.inputs) == 1:
        g.node("Identity", layer.inputs, layer.outputs, layer.message.name)
        return
    g.node("Concat", layer.inputs, layer.outputs, layer.message.name, axis=axis)


def _slice(g: _Graph, layer: _Layer) -> None:
    message, param = layer.message, layer.message.slice_param
    shape = layer.bottoms_a[0]
    axis = param.slice_dim if param.HasField("slice_dim") else _axis(param.axis, len(shape))
    if g.dynamic and shape[axis] != layer.bottoms_b[0][axis]:
        raise CaffeFtError("slices the batch axis: export with --static-batch", layer=message.name)
    sizes = [top[axis] for top in layer.tops_a]
    if len(sizes) == 1:
        g.node("Identity", layer.inputs, layer.outputs, message.name)
        return
    g.node("Split", [layer.inputs[0], g.ints(f"{message.name}/split", sizes)], layer.outputs, message.name, axis=axis)


def _reshape(g: _Graph, layer: _Layer) -> None:
    message = layer.message
    if message.type == "Flatten":
        param = message.flatten_param
        ndim = len(layer.bottoms_a[0])
        if _axis(param.axis, ndim) == 1 and _axis(param.end_axis, ndim) == ndim - 1:
            g.node("Flatten", layer.inputs, layer.outputs, message.name, axis=1)
            return
    target = g.shape_for(layer, layer.tops_a[0], layer.tops_b[0], message.type)
    g.node("Reshape", [layer.inputs[0], target], layer.outputs, message.name)


def _identity(g: _Graph, layer: _Layer) -> None:
    """Split (each top is the bottom) and Dropout (a no-op at TEST)."""
    for out in layer.outputs:
        g.node("Identity", layer.inputs[:1], [out], layer.message.name)


def _relu(g: _Graph, layer: _Layer) -> None:
    slope = layer.message.relu_param.negative_slope
    if slope:
        g.node("LeakyRelu", layer.inputs, layer.outputs, layer.message.name, alpha=slope)
    else:
        g.node("Relu", layer.inputs, layer.outputs, layer.message.name)


def _prelu(g: _Graph, layer: _Layer) -> None:
    slope = layer.blobs[0].reshape(-1)
    ndim = len(layer.bottoms_a[0])
    shaped = slope.reshape((1,) if layer.message.prelu_param.channel_shared else (slope.size,) + (1,) * (ndim - 2))
    g.node("PRelu", [layer.inputs[0], g.const(f"{layer.message.name}/slope", shaped)], layer.outputs,
           layer.message.name)


def _elementwise(op: str, **attrs: Any) -> Callable[[_Graph, _Layer], None]:
    def emit(g: _Graph, layer: _Layer) -> None:
        g.node(op, layer.inputs, layer.outputs, layer.message.name, **attrs)
    return emit


def _elu(g: _Graph, layer: _Layer) -> None:
    g.node("Elu", layer.inputs, layer.outputs, layer.message.name, alpha=layer.message.elu_param.alpha)


def _affine(g: _Graph, name: str, x: str, scale: float, shift: float, out: Optional[str] = None) -> str:
    """``shift + scale * x`` with the no-op steps left out."""
    if scale != 1:
        x = g.step("Mul", [x, g.scalar(f"{name}/scale", scale)], name, out if shift == 0 else None)
    if shift != 0:
        x = g.step("Add", [x, g.scalar(f"{name}/shift", shift)], name, out)
    if out is not None and x != out:
        x = g.step("Identity", [x], name, out)
    return x


def _power(g: _Graph, layer: _Layer) -> None:
    message, param = layer.message, layer.message.power_param
    if param.power == 1:
        _affine(g, message.name, layer.inputs[0], param.scale, param.shift, layer.outputs[0])
        return
    base = _affine(g, message.name, layer.inputs[0], param.scale, param.shift)
    g.node("Pow", [base, g.scalar(f"{message.name}/power", param.power)], layer.outputs, message.name)


def _log_base(layer: Message, base: float) -> float:
    if base == -1:
        return 1.0
    if base <= 0:
        raise _unsupported(layer, f"with base {base}")
    return math.log(base)


def _exp(g: _Graph, layer: _Layer) -> None:
    """Caffe: ``base ^ (shift + scale * x)`` as ``pow(base, shift) * exp(ln(base) * scale * x)``."""
    message, param = layer.message, layer.message.exp_param
    log_base = _log_base(message, param.base)
    outer = 1.0 if param.shift == 0 else (math.exp(param.shift) if param.base == -1 else param.base ** param.shift)
    x = _affine(g, message.name, layer.inputs[0], log_base * param.scale, 0.0)
    y = g.step("Exp", [x], message.name, layer.outputs[0] if outer == 1 else None)
    if outer != 1:
        g.node("Mul", [y, g.scalar(f"{message.name}/outer", outer)], layer.outputs, message.name)


def _log(g: _Graph, layer: _Layer) -> None:
    """Caffe: ``log_base(shift + scale * x)``."""
    message, param = layer.message, layer.message.log_param
    factor = 1.0 / _log_base(message, param.base)
    x = _affine(g, message.name, layer.inputs[0], param.scale, param.shift)
    y = g.step("Log", [x], message.name, layer.outputs[0] if factor == 1 else None)
    if factor != 1:
        g.node("Mul", [y, g.scalar(f"{message.name}/factor", factor)], layer.outputs, message.name)


def _threshold(g: _Graph, layer: _Layer) -> None:
    name = layer.message.name
    above = g.step("Greater", [layer.inputs[0], g.scalar(f"{name}/threshold", layer.message.threshold_param.threshold)], name)
    g.node("Cast", [above], layer.outputs, name, to=1)  # FLOAT


def _softmax(g: _Graph, layer: _Layer) -> None:
    axis = _axis(layer.message.softmax_param.axis, len(layer.bottoms_a[0]))
    g.node("Softmax", layer.inputs, layer.outputs, layer.message.name, axis=axis)


def _nothing(g: _Graph, layer: _Layer) -> None:
    """Silence: consumes its bottoms, computes nothing."""


Rule = Callable[[_Graph, _Layer], None]

#: Layer type -> the function emitting its nodes.
RULES: Dict[str, Rule] = {
    "AbsVal": _elementwise("Abs"),
    "BatchNorm": _batch_norm,
    "Bias": _scale_or_bias,
    "BNLL": _elementwise("Softplus"),
    "Concat": _concat,
    "Convolution": _convolution,
    "Deconvolution": _convolution,
    "Dropout": _identity,
    "Eltwise": _eltwise,
    "ELU": _elu,
    "Exp": _exp,
    "Flatten": _reshape,
    "InnerProduct": _inner_product,
    "Log": _log,
    "LRN": _lrn,
    "Pooling": _pooling,
    "Power": _power,
    "PReLU": _prelu,
    "ReLU": _relu,
    "Reshape": _reshape,
    "Scale": _scale_or_bias,
    "Sigmoid": _elementwise("Sigmoid"),
    "Silence": _nothing,
    "Slice": _slice,
    "Softmax": _softmax,
    "Split": _identity,
    "TanH": _elementwise("Tanh"),
    "Threshold": _threshold,
}

# Layers that compute nothing at TEST: their in-place tops keep the bottom's value.
_PASS_THROUGH = frozenset({"Dropout"})


# --------------------------------------------------------------------------
# The walk


def _other_batch(inferred: shapes.NetShapes, net_layers: Sequence[Message]) -> Dict[str, Shape]:
    """Input shapes with the batch axis one larger."""
    given = {}
    for layer, entry in zip(net_layers, inferred.layers):
        if entry.type == "Input":
            for top, shape in zip(entry.top_names, entry.tops):
                given[top] = (shape[0] + 1, *shape[1:]) if shape else shape
    return given


def _folds(layers: Sequence[Message], readers: Dict[Tuple[int, str], List[int]]) -> Dict[int, int]:
    """BatchNorm index -> the Scale index folded into it: a per-channel Scale
    that is the only reader of the BatchNorm's output."""
    folds = {}
    for i, layer in enumerate(layers[:-1]):
        after = layers[i + 1]
        if layer.type != "BatchNorm" or after.type != "Scale" or len(after.bottom) != 1:
            continue
        param = after.scale_param
        if after.bottom[0] == layer.top[0] and param.axis == 1 and param.num_axes == 1 \
                and readers.get((i, layer.top[0]), []) == [i + 1]:
            folds[i] = i + 1
    return folds


def convert(
    net: Message,
    blobs: Mapping[str, Sequence[np.ndarray]],
    options: ExportOptions = ExportOptions(),
    metadata: Optional[Mapping[str, str]] = None,
) -> "onnx.ModelProto":
    """The ONNX model of ``net`` (current format; its TEST phase) with ``blobs`` (layer name -> arrays)."""
    onnx = _onnx()
    if not MIN_OPSET <= options.opset <= max_opset():
        raise CaffeFtError(f"opset {options.opset} is not between {MIN_OPSET} and {max_opset()}")
    layers = shapes.filter_layers(net, "TEST")
    given = {name: tuple(shape) for name, shape in options.input_shapes.items()}
    inferred_a = shapes.infer(net, "TEST", given)
    inferred_b = shapes.infer(net, "TEST", _other_batch(inferred_a, layers)) if options.dynamic_batch else inferred_a
    for layer in layers:
        if layer.type not in RULES and layer.type != "Input":
            raise CaffeFtError(f"{layer.type} has no ONNX equivalent in caffe-ft; nothing written", layer=layer.name)

    # Which layer writes each blob last, and who reads each written version.
    last_writer: Dict[str, int] = {}
    readers: Dict[Tuple[int, str], List[int]] = {}
    writer: Dict[str, int] = {}
    for i, layer in enumerate(layers):
        for bottom in layer.bottom:
            if bottom in writer:
                readers.setdefault((writer[bottom], bottom), []).append(i)
        if layer.type in _PASS_THROUGH and list(layer.top) == list(layer.bottom):
            continue
        for top in layer.top:
            writer[top] = i
            last_writer[top] = i
    folds = _folds(layers, readers)
    folded = set(folds.values())

    inputs = [(top, shape) for layer, entry in zip(layers, inferred_a.layers) if layer.type == "Input"
              for top, shape in zip(entry.top_names, entry.tops)]
    input_names = {name for name, _ in inputs}
    blob_names = {top for layer in layers for top in layer.top}
    g = _Graph(onnx, blob_names, options.dynamic_batch)
    values: Dict[str, str] = {name: name for name in input_names}  # blob -> its current ONNX value

    for i, (layer, a, b) in enumerate(zip(layers, inferred_a.layers, inferred_b.layers)):
        if layer.type == "Input" or i in folded:
            continue
        if layer.type in _PASS_THROUGH and list(layer.top) == list(layer.bottom):
            continue
        sources = [values[bottom] for bottom in layer.bottom]
        written = layers[folds[i]] if i in folds else layer
        outputs = []
        for top in written.top:
            bare = last_writer.get(top) == (folds.get(i, i)) and top not in input_names
            outputs.append(top if bare else g.fresh(f"{top}@{written.name}"))
        entry = _Layer(layer, list(blobs.get(layer.name, [])), sources, outputs, a.bottoms, b.bottoms, a.tops, b.tops)
        if i in folds:
            after = layers[folds[i]]
            scale = _Layer(after, list(blobs.get(after.name, [])), [], outputs, a.tops, b.tops, a.tops, b.tops)
            _batch_norm(g, entry, scale)
        else:
            RULES[layer.type](g, entry)
        values.update(zip(written.top, outputs))

    def dims(a: Shape, b: Shape) -> List[Any]:
        return [BATCH if x != y else x for x, y in zip(a, b)]

    blobs_b = inferred_b.blobs
    graph_inputs = [
        onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, dims(shape, blobs_b.get(name, shape)))
        for name, shape in inputs
    ]
    outputs = [top for top in _outputs(layers) if top not in input_names and top in values]
    graph_outputs = []
    for top in outputs:
        value = values[top]
        if value != top:  # a pass-through layer's top, or an output an in-place Dropout rewrote
            g.node("Identity", [value], [top], f"{top}/output")
        graph_outputs.append(onnx.helper.make_tensor_value_info(
            top, onnx.TensorProto.FLOAT, dims(inferred_a.blobs[top], blobs_b[top])))
    graph = onnx.helper.make_graph(g.nodes, net.name or "caffe_net", graph_inputs, graph_outputs)
    opset = onnx.helper.make_opsetid("", options.opset)
    model = onnx.helper.make_model(graph, opset_imports=[opset], producer_name="caffe-ft",
                                   producer_version=__version__)
    g.fill(model.graph)
    model.ir_version = onnx.helper.find_min_ir_version_for([opset])
    onnx.helper.set_model_props(model, dict(metadata or {}))
    return model


def export(
    net: Message, model: Optional[Model], options: ExportOptions = ExportOptions(),
    metadata: Optional[Mapping[str, str]] = None,
) -> "onnx.ModelProto":
    """``net`` (a current-format deploy net) with ``model``'s weights as an ONNX model,
    its output Softmax added or removed as ``options.softmax`` says.
    """
    net = with_softmax(net, options.softmax)
    return convert(net, layer_blobs(net, model, options.input_shapes), options, metadata)


# --------------------------------------------------------------------------
# Files


def fingerprint(path: str) -> str:
    """The sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def source_metadata(net_path: str, weights_path: Optional[str], options: ExportOptions) -> Dict[str, str]:
    """What the model's metadata records: the source files, their sha256, caffe-ft's version."""
    metadata = {
        "caffe_ft_version": __version__,
        "source_net": os.path.basename(net_path),
        "source_net_sha256": fingerprint(net_path),
        "dynamic_batch": str(options.dynamic_batch).lower(),
    }
    if weights_path is not None:
        metadata["source_weights"] = os.path.basename(weights_path)
        metadata["source_weights_sha256"] = fingerprint(weights_path)
    return metadata


def summary(model: "onnx.ModelProto", path: str) -> str:
    """One line on what was written."""

    def values(entries: Any) -> str:
        return ", ".join(
            f"{entry.name} ("
            + ", ".join(dim.dim_param or str(dim.dim_value) for dim in entry.type.tensor_type.shape.dim) + ")"
            for entry in entries
        )

    return (f"wrote {path}: opset {model.opset_import[0].version}, {len(model.graph.node)} nodes; "
            f"inputs {values(model.graph.input)}; outputs {values(model.graph.output)}\n")


def serialize(model: "onnx.ModelProto") -> bytes:
    """The model's bytes, after the ONNX checker has passed it."""
    onnx = _onnx()
    size = model.ByteSize()
    if size > _PROTOBUF_LIMIT:
        raise CaffeFtError(f"the model is {size / 2 ** 30:.1f} GiB, over protobuf's 2 GiB limit for one ONNX file")
    data = bytes(model.SerializeToString())
    onnx.checker.check_model(data)  # bytes: the checker would serialize a ModelProto once more
    return data


def write(net: Message, model: Optional[Model], options: ExportOptions, output: str, net_path: str,
          weights_path: Optional[str]) -> "onnx.ModelProto":
    """Export ``net`` (read from ``net_path``) with ``model`` (from
    ``weights_path``), their files' metadata recorded, and write it to
    ``output`` whole or not at all."""
    from ..formats.files import write_atomic

    result = export(net, model, options, source_metadata(net_path, weights_path, options))
    write_atomic(output, serialize(result))
    return result
