"""A Caffe net as a ``torch.nn.Module``, computing what Caffe 1.0 computes.

:class:`CaffeNet` is built from a ``NetParameter`` and a net state (phase,
level, stages): it keeps the layers Caffe keeps (:func:`~caffe_ft.net.shapes.filter_layers`),
works out every shape with :func:`~caffe_ft.net.shapes.infer`, and runs each
layer with Caffe's formulas, not torch's defaults where they differ (pooling's
ceil-rounded output and clipped last window, the divisor of AVE pooling,
LRN's ``alpha / n``, BatchNorm's three blobs with the scale-factor accumulator,
Eltwise MAX routing the gradient to the first maximum, ...).

Parameters live per layer in Caffe's blob order and shapes
(:attr:`CaffeNet.blobs_of`), so a caffemodel is read into them and written back
from them exactly; ``param { name: ... }`` shares one ``nn.Parameter`` between
layers, as Caffe shares one blob.  A layer type the engine lacks is refused
before anything is built, with one line naming the layer and its type; so are
the two Caffe 1.0 layers it cannot give a meaning to (:data:`REFUSED`:
MemoryData, Python), saying why and what to do instead.

The loss is Caffe's: the sum over every top with a loss weight of the
weight times the sum of the top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from google.protobuf.message import Message
from torch import Tensor, nn

from ...errors import CaffeFtError
from ...net.graph import recurrent_blobs
from ...net.shapes import LayerShapes, Shape, infer, pooling_geometry, spp_levels

#: Caffe's FLT_MIN, the floor of probabilities inside log() in the losses.
_FLT_MIN = 1.17549435e-38
#: Caffe's kLOG_THRESHOLD, the floor of MultinomialLogisticLoss's probabilities.
_LOG_THRESHOLD = 1e-20
#: Loss layers: their first top weighs 1 unless loss_weight says otherwise.
_LOSSES = frozenset({"SoftmaxWithLoss", "SigmoidCrossEntropyLoss", "EuclideanLoss", "InfogainLoss",
                     "ContrastiveLoss", "HingeLoss", "MultinomialLogisticLoss"})
#: Layers that make data without bottoms and that the engine feeds from outside.
_SOURCES = frozenset({"Input", "ImageData", "Data", "HDF5Data", "DummyData", "WindowData"})
#: Caffe 1.0 layers the engine cannot give a meaning to, and what to do instead.
REFUSED = {
    "MemoryData": "MemoryData is filled by a pycaffe caller (MemoryDataLayer.set_input_arrays), which the torch "
                  "engine has none of: train with --engine pycaffe, or feed the net through an Input layer",
    "Python": "a Python layer runs a caffe.Layer subclass, which needs pycaffe: train with --engine pycaffe",
}
#: Layers that work on however many items (axis 0) their bottoms hold, so may follow a Filter.
_ANY_BATCH = frozenset({
    "AbsVal", "BNLL", "Concat", "ContrastiveLoss", "Convolution", "Deconvolution", "Dropout", "ELU", "Eltwise",
    "EuclideanLoss", "Exp", "Filter", "HDF5Output", "HingeLoss", "Im2col", "InnerProduct", "Log", "LRN",
    "MultinomialLogisticLoss", "Pooling", "Power", "PReLU", "ReLU", "Sigmoid", "Silence", "Softmax",
    "SoftmaxWithLoss", "Split", "TanH", "Threshold",
})


# ------------------------------------------------------------------ helpers --


def _fail(layer: Message, message: str) -> CaffeFtError:
    return CaffeFtError(message, layer=layer.name)


def _canonical(axis: int, num_axes: int) -> int:
    return axis + num_axes if axis < 0 else axis


def _pair(values: Sequence[int], h: Optional[int], w: Optional[int], default: int, n: int) -> List[int]:
    """A ConvolutionParameter setting per spatial axis (``_h``/``_w`` or the repeated field)."""
    if h is not None:
        return [h, w if w is not None else default]
    if not values:
        return [default] * n
    if len(values) == 1:
        return list(values) * n
    return list(values)


def _operand_view(operand: Tensor, shape: Shape, axis: int) -> Tensor:
    """Scale/Bias: ``operand`` (spanning ``shape[axis:axis+k]``) shaped to broadcast against ``shape``."""
    k = operand.dim()
    return operand.reshape((1,) * axis + tuple(operand.shape) + (1,) * (len(shape) - axis - k))


# ----------------------------------------------------------------- pooling --


def _torch_ceil_size(size: int, kernel: int, stride: int, pad: int) -> int:
    """The output size of torch's ``ceil_mode`` pooling: no window starts past the left padding's end."""
    n = -(-(size + 2 * pad - kernel) // stride) + 1
    return n - 1 if (n - 1) * stride >= size + pad else n


def caffe_pool(x: Tensor, kernel: Sequence[int], stride: Sequence[int], pad: Sequence[int],
               out: Sequence[int], average: bool) -> Tensor:
    """MAX or AVE pooling exactly as Caffe: windows start at ``i*stride - pad``,
    end at most ``pad`` past the input; MAX ignores the padding, AVE divides by
    the window clipped to the padded input (padding counted, the overhang not)."""
    height, width = x.shape[-2:]
    if not average and all(2 * p <= k for p, k in zip(pad, kernel)) and list(out) == [
            _torch_ceil_size(size, k, s, p) for size, k, s, p in zip((height, width), kernel, stride, pad)]:
        # The same windows as torch's ceil mode, without padding a copy of the input.
        return F.max_pool2d(x, tuple(kernel), tuple(stride), tuple(pad), ceil_mode=True)
    extra = [max(0, (o - 1) * s + k - size - p) for o, s, k, size, p in zip(out, stride, kernel, (height, width), pad)]
    padding = (pad[1], extra[1], pad[0], extra[0])
    if not average:
        padded = F.pad(x, padding, value=-math.inf) if any(padding) else x
        y = F.max_pool2d(padded, tuple(kernel), tuple(stride))
        return y[..., : out[0], : out[1]]
    padded = F.pad(x, padding) if any(padding) else x
    sums = F.avg_pool2d(padded, tuple(kernel), tuple(stride), divisor_override=1)[..., : out[0], : out[1]]
    sizes = []
    for o, s, k, size, p in zip(out, stride, kernel, (height, width), pad):
        starts = np.arange(o) * s - p
        sizes.append(np.minimum(starts + k, size + p) - starts)
    divisor = torch.from_numpy(np.outer(sizes[0], sizes[1]).astype(np.float32)).to(x.device, x.dtype)
    return sums / divisor


def stochastic_pool(kernel: Sequence[int], stride: Sequence[int], out: Sequence[int],
                    train: bool) -> Callable[[List[Tensor]], List[Tensor]]:
    """STOCHASTIC pooling as Caffe's GPU kernels (its CPU has none): windows start at
    ``i * stride`` (no padding) and end at the input's edge.  TEST: the activations
    weighted by themselves, ``sum(x^2) / (FLT_MIN + sum(x))``; TRAIN: one activation
    drawn with probability proportional to its value (torch's generator, not Caffe's:
    the draws differ), which alone receives the gradient.  Inputs must be non-negative."""

    def windows(x: Tensor, fill: float) -> Tensor:
        height, width = x.shape[-2:]
        extra = [max(0, (o - 1) * s + k - size) for o, s, k, size in zip(out, stride, kernel, (height, width))]
        padded = F.pad(x, (0, extra[1], 0, extra[0]), value=fill) if any(extra) else x
        patches = padded.unfold(2, kernel[0], stride[0]).unfold(3, kernel[1], stride[1])
        return patches[:, :, : out[0], : out[1]].reshape(*x.shape[:2], out[0], out[1], -1)

    def run(b: List[Tensor]) -> List[Tensor]:
        values = windows(b[0], 0.0)
        if not train:
            return [(values * values).sum(-1) / ((values.sum(-1) + _FLT_MIN))]
        with torch.no_grad():
            total = values.sum(-1, keepdim=True)
            threshold = torch.rand_like(total) * total
            chosen = (torch.cumsum(values, -1) < threshold).sum(-1, keepdim=True)
            chosen = chosen.clamp(max=values.shape[-1] - 1)
        return [values.gather(-1, chosen).squeeze(-1)]

    return run


# ------------------------------------------------------------------ layers --


@dataclass
class Step:
    """One Caffe layer as the module runs it."""

    layer: Message
    shapes: LayerShapes
    run: Callable[[List[Tensor]], List[Tensor]]
    params: List[nn.Parameter] = field(default_factory=list)
    #: BatchNorm: its forward with an in-place Scale's weight and bias folded in (see :func:`fuse_scales`).
    fuse: Optional[Callable[[Optional[Tensor], Optional[Tensor]], Callable[[List[Tensor]], List[Tensor]]]] = None


class _Builder:
    """Makes the forward function of each layer type; one method per type."""

    def __init__(self, net: "CaffeNet") -> None:
        self.net = net

    # -- helpers
    def param(self, layer: Message, shapes: Sequence[Shape]) -> List[nn.Parameter]:
        return self.net._layer_params(layer, shapes)

    # -- learnable
    def Convolution(self, layer: Message, s: LayerShapes, deconv: bool = False) -> Step:
        p = layer.convolution_param
        params = self.param(layer, s.params)
        bottom = s.bottoms[0]
        axis = _canonical(p.axis, len(bottom))
        n = len(bottom) - axis - 1
        if axis != 1 or n not in (1, 2, 3):
            raise _fail(layer, f"the torch engine runs 1-3-D convolution over axis 1 only (axis {p.axis})")
        h = lambda name: getattr(p, name) if p.HasField(name) else None  # noqa: E731
        stride = _pair(p.stride, h("stride_h"), h("stride_w"), 1, n)
        pad = _pair(p.pad, h("pad_h"), h("pad_w"), 0, n)
        dilation = _pair(p.dilation, None, None, 1, n)
        group = p.group
        weight, bias = params[0], params[1] if p.bias_term else None
        fn: Callable[..., Tensor]
        if deconv:
            fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[n]
            run = lambda b: [fn(x, weight, bias, stride, pad, 0, group, dilation) for x in b]  # noqa: E731
        else:
            fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]
            run = lambda b: [fn(x, weight, bias, stride, pad, dilation, group) for x in b]  # noqa: E731
        return Step(layer, s, run, params)

    def Deconvolution(self, layer: Message, s: LayerShapes) -> Step:
        return self.Convolution(layer, s, deconv=True)

    def InnerProduct(self, layer: Message, s: LayerShapes) -> Step:
        p = layer.inner_product_param
        params = self.param(layer, s.params)
        bottom = s.bottoms[0]
        axis = _canonical(p.axis, len(bottom))
        inputs = int(np.prod(bottom[axis:], dtype=np.int64))
        weight, bias, transpose = params[0], params[1] if p.bias_term else None, p.transpose

        def run(b: List[Tensor]) -> List[Tensor]:
            x = b[0].reshape(-1, inputs)  # the leading axes as run (a Filter's top varies)
            y = x @ weight if transpose else x @ weight.t()
            if bias is not None:
                y = y + bias
            return [y.reshape(*b[0].shape[:axis], -1)]

        return Step(layer, s, run, params)

    def BatchNorm(self, layer: Message, s: LayerShapes) -> Step:
        p = layer.batch_norm_param
        params = self.param(layer, s.params)
        for blob in params:
            blob.requires_grad_(False)
        mean_blob, var_blob, factor_blob = params
        global_stats = p.use_global_stats if p.HasField("use_global_stats") else self.net.phase == "TEST"
        fraction, eps = p.moving_average_fraction, p.eps
        shape = s.bottoms[0]
        channels = shape[1] if len(shape) > 1 else 1
        view = (1, channels) + (1,) * (len(shape) - 2)
        dims = [0] + list(range(2, len(shape)))
        m = int(np.prod(shape, dtype=np.int64)) // channels
        correction = m / (m - 1) if m > 1 else 1.0

        def update(mean: Tensor, var: Tensor) -> None:
            """Caffe's running statistics: blobs times fraction plus the batch's (unbiased variance)."""
            factor_blob.mul_(fraction).add_(1)
            mean_blob.mul_(fraction).add_(mean)
            var_blob.mul_(fraction).add_(var)

        def make(weight: Optional[Tensor], bias: Optional[Tensor]) -> Callable[[List[Tensor]], List[Tensor]]:
            """The forward pass; with ``weight``/``bias`` also an in-place Scale's, in one kernel."""

            def run(b: List[Tensor]) -> List[Tensor]:
                x = b[0]
                fused = x.dim() >= 2 and x.dtype == mean_blob.dtype
                if global_stats:
                    factor = 0.0 if float(factor_blob[0]) == 0 else 1.0 / float(factor_blob[0])
                    if fused:
                        # torch's fused kernel computes Caffe's (x - mean) / sqrt(var + eps) (* scale + bias).
                        return [F.batch_norm(x, mean_blob * factor, var_blob * factor, weight, bias, False, 0.0, eps)]
                    mean, var = mean_blob * factor, var_blob * factor
                    y = (x - mean.reshape(view)) / torch.sqrt(var.reshape(view) + eps)
                elif fused and self.net.training_updates and m > 1:
                    # Batch statistics, the biased variance inside the square root, as Caffe; the kernel
                    # hands back the batch mean and unbiased variance through momentum-1 "running" buffers.
                    batch_mean = torch.zeros(channels, dtype=x.dtype, device=x.device)
                    batch_var = torch.zeros(channels, dtype=x.dtype, device=x.device)
                    y = F.batch_norm(x, batch_mean, batch_var, weight, bias, True, 1.0, eps)
                    with torch.no_grad():
                        update(batch_mean, batch_var)
                    return [y]
                else:
                    if self.net.training_updates:
                        with torch.no_grad():
                            var, mean = torch.var_mean(x.detach(), dim=dims, correction=0)
                            update(mean, var * correction)
                    if fused:
                        return [F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)]
                    mean = x.mean(dim=dims)
                    var = ((x - mean.reshape(view)) ** 2).mean(dim=dims)
                    y = (x - mean.reshape(view)) / torch.sqrt(var.reshape(view) + eps)
                if weight is not None:
                    y = y * weight.reshape(view)
                if bias is not None:
                    y = y + bias.reshape(view)
                return [y]

            return run

        return Step(layer, s, make(None, None), params, fuse=make)

    def _scale_or_bias(self, layer: Message, s: LayerShapes, p: Message, scale: bool) -> Step:
        params = self.param(layer, s.params)
        shape = s.bottoms[0]
        two = len(s.bottoms) == 2
        operand_shape = s.bottoms[1] if two else s.params[0]
        axis = 0 if not operand_shape else _canonical(p.axis, len(shape))
        has_bias = scale and p.bias_term
        bias = params[-1] if has_bias else None

        def run(b: List[Tensor]) -> List[Tensor]:
            operand = b[1] if two else params[0]
            operand = _operand_view(operand, shape, axis)
            y = b[0] * operand if scale else b[0] + operand
            if bias is not None:
                y = y + _operand_view(bias, shape, axis)
            return [y]

        return Step(layer, s, run, params)

    def Scale(self, layer: Message, s: LayerShapes) -> Step:
        return self._scale_or_bias(layer, s, layer.scale_param, True)

    def Bias(self, layer: Message, s: LayerShapes) -> Step:
        return self._scale_or_bias(layer, s, layer.bias_param, False)

    def PReLU(self, layer: Message, s: LayerShapes) -> Step:
        params = self.param(layer, s.params)
        shape = s.bottoms[0]
        view = (1, -1) + (1,) * (len(shape) - 2)
        slope = params[0]
        return Step(layer, s, lambda b: [torch.where(b[0] > 0, b[0], b[0] * slope.reshape(view))], params)

    # -- element-wise
    def ReLU(self, layer: Message, s: LayerShapes) -> Step:
        slope = layer.relu_param.negative_slope
        if slope:
            return Step(layer, s, lambda b: [F.leaky_relu(b[0], slope)])
        return Step(layer, s, lambda b: [F.relu(b[0])])

    def Sigmoid(self, layer: Message, s: LayerShapes) -> Step:
        return Step(layer, s, lambda b: [torch.sigmoid(b[0])])

    def TanH(self, layer: Message, s: LayerShapes) -> Step:
        return Step(layer, s, lambda b: [torch.tanh(b[0])])

    def ELU(self, layer: Message, s: LayerShapes) -> Step:
        alpha = layer.elu_param.alpha
        return Step(layer, s, lambda b: [F.elu(b[0], alpha)])

    def AbsVal(self, layer: Message, s: LayerShapes) -> Step:
        return Step(layer, s, lambda b: [torch.abs(b[0])])

    def BNLL(self, layer: Message, s: LayerShapes) -> Step:
        return Step(layer, s, lambda b: [F.relu(b[0]) + torch.log1p(torch.exp(-torch.abs(b[0])))])

    def Power(self, layer: Message, s: LayerShapes) -> Step:
        p = layer.power_param
        power, scale, shift = p.power, p.scale, p.shift

        def run(b: List[Tensor]) -> List[Tensor]:
            x = b[0] * scale + shift if (scale != 1 or shift != 0) else b[0]
            return [x if power == 1 else torch.pow(x, power)]

        return Step(layer, s, run)

    def Exp(self, layer: Message, s: LayerShapes) -> Step:
        p = layer.exp_param
        log_base = 1.0 if p.base == -1 else math.log(p.base)
        inner, outer = log_base * p.scale, log_base * p.shift
        return Step(layer, s, lambda b: [torch.exp(b[0] * inner + outer)])

    def Log(self, layer: Message, s: LayerShapes) -> Step:
        p = layer.log_param
        factor = 1.0 if p.base == -1 else 1.0 / math.log(p.base)
        scale, shift = p.scale, p.shift
        return Step(layer, s, lambda b: [torch.log(b[0] * scale + shift) * factor])

    def Threshold(self, layer: Message, s: LayerShapes) -> Step:
        t = layer.threshold_param.threshold
        return Step(layer, s, lambda b: [(b[0] > t).to(b[0].dtype)])

    def Dropout(self, layer: Message, s: LayerShapes) -> Step:
        ratio = layer.dropout_param.dropout_ratio
        scale = 1.0 / (1.0 - ratio)
        if self.net.phase != "TRAIN":
            return Step(layer, s, lambda b: [b[0]])
        return Step(layer, s, lambda b: [b[0] * (torch.rand_like(b[0]) >= ratio).to(b[0].dtype) * scale])

    def Softmax(self, layer: Message, s: LayerShapes) -> Step:
        axis = _canonical(layer.softmax_param.axis, len(s.bottoms[0]))
        return Step(layer, s, lambda b: [torch.softmax(b[0], axis)])

    def LRN(self, layer: Message, s: LayerShapes) -> Step:
        p = layer.lrn_param
        size, alpha, beta, k = p.local_size, p.alpha, p.beta, p.k
        if size % 2 == 0:
            raise _fail(layer, "LRN only supports an odd local_size")
        pre = (size - 1) // 2
        if p.norm_region == p.ACROSS_CHANNELS:

            def across(b: List[Tensor]) -> List[Tensor]:
                x = b[0]
                squares = F.pad(x * x, (0, 0, 0, 0, pre, size - 1 - pre))
                channels = x.shape[1]
                total = squares[:, 0:channels]
                for i in range(1, size):
                    total = total + squares[:, i : i + channels]
                return [x * torch.pow(total * (alpha / size) + k, -beta)]

            return Step(layer, s, across)
        height, width = s.bottoms[0][2:]
        kernel, stride, pad = [size, size], [1, 1], [pre, pre]
        out = [-(-(dim + 2 * pre - size) // 1) + 1 for dim in (height, width)]

        def within(b: List[Tensor]) -> List[Tensor]:
            x = b[0]
            mean = caffe_pool(x * x, kernel, stride, pad, out, average=True)
            return [x * torch.pow(mean * alpha + 1, -beta)]

        return Step(layer, s, within)

    def Pooling(self, layer: Message, s: LayerShapes) -> Step:
        p = layer.pooling_param
        kernel, stride, pad, out = pooling_geometry(layer, s.bottoms[0])
        if p.pool == p.STOCHASTIC:
            return Step(layer, s, stochastic_pool(kernel, stride, out, self.net.phase == "TRAIN"))
        average = p.pool == p.AVE
        return Step(layer, s, lambda b: [caffe_pool(b[0], kernel, stride, pad, out, average)])

    def Eltwise(self, layer: Message, s: LayerShapes) -> Step:
        p = layer.eltwise_param
        coeffs = list(p.coeff) or [1.0] * len(s.bottoms)
        op = p.operation

        def run(b: List[Tensor]) -> List[Tensor]:
            if op == p.PROD:
                y = b[0]
                for x in b[1:]:
                    y = y * x
            elif op == p.SUM:
                y = b[0] * coeffs[0] if coeffs[0] != 1 else b[0]
                for c, x in zip(coeffs[1:], b[1:]):
                    y = y + (x * c if c != 1 else x)
            else:  # MAX: the first maximum wins, in value and in gradient
                y = b[0]
                for x in b[1:]:
                    y = torch.where(x > y, x, y)
            return [y]

        return Step(layer, s, run)

    # -- moving data
    def Concat(self, layer: Message, s: LayerShapes) -> Step:
        p = layer.concat_param
        axis = p.concat_dim if p.HasField("concat_dim") else _canonical(p.axis, len(s.bottoms[0]))
        return Step(layer, s, lambda b: [torch.cat(b, axis)])

    def Slice(self, layer: Message, s: LayerShapes) -> Step:
        p = layer.slice_param
        axis = p.slice_dim if p.HasField("slice_dim") else _canonical(p.axis, len(s.bottoms[0]))
        sizes = [top[axis] for top in s.tops]
        return Step(layer, s, lambda b: list(torch.split(b[0], sizes, axis)))

    def Split(self, layer: Message, s: LayerShapes) -> Step:
        count = len(s.tops)
        return Step(layer, s, lambda b: [b[0]] * count)

    def _reshaped(self, layer: Message, s: LayerShapes) -> Step:
        top = s.tops[0]
        return Step(layer, s, lambda b: [b[0].reshape(top)])

    Flatten = _reshaped
    Reshape = _reshaped

    def Crop(self, layer: Message, s: LayerShapes) -> Step:
        p = layer.crop_param
        data = s.bottoms[0]
        start = _canonical(p.axis, len(data))
        offsets = list(p.offset)
        index: List[slice] = []
        for i, size in enumerate(data):
            if i < start:
                index.append(slice(None))
                continue
            offset = 0 if not offsets else offsets[0] if len(offsets) == 1 else offsets[i - start]
            index.append(slice(offset, offset + s.tops[0][i]))
        where = tuple(index)
        return Step(layer, s, lambda b: [b[0][where]])

    def Silence(self, layer: Message, s: LayerShapes) -> Step:
        return Step(layer, s, lambda b: [])

    # -- losses and metrics
    def SoftmaxWithLoss(self, layer: Message, s: LayerShapes) -> Step:
        axis = _canonical(layer.softmax_param.axis, len(s.bottoms[0]))
        ignore = layer.loss_param.ignore_label if layer.loss_param.HasField("ignore_label") else None
        normalization = _normalization(layer)
        shape = s.bottoms[0]
        inner = int(np.prod(shape[axis + 1:], dtype=np.int64))

        def run(b: List[Tensor]) -> List[Tensor]:
            outer = int(np.prod(b[0].shape[:axis], dtype=np.int64))  # as run (a Filter's top varies)
            prob = torch.softmax(b[0], axis)
            prob = prob.reshape(outer, shape[axis], inner)
            label = b[1].reshape(outer, inner).to(torch.int64)
            valid = torch.ones_like(label, dtype=torch.bool) if ignore is None else label != ignore
            safe = torch.where(valid, label, torch.zeros_like(label))
            picked = prob.gather(1, safe.unsqueeze(1)).squeeze(1)
            losses = -torch.log(torch.clamp(picked, min=_FLT_MIN))
            loss = torch.where(valid, losses, torch.zeros_like(losses)).sum()
            count = valid.sum() if ignore is not None else None
            return [loss / _normalizer(normalization, outer, inner, count)]

        return Step(layer, s, run)

    def SigmoidCrossEntropyLoss(self, layer: Message, s: LayerShapes) -> Step:
        shape = s.bottoms[0]
        ignore = layer.loss_param.ignore_label if layer.loss_param.HasField("ignore_label") else None
        has_mode = layer.loss_param.HasField("normalization") or layer.loss_param.HasField("normalize")
        normalization = _normalization(layer) if has_mode else "BATCH_SIZE"
        count_all = int(np.prod(shape, dtype=np.int64))

        def run(b: List[Tensor]) -> List[Tensor]:
            x, target = b[0], b[1].reshape(b[0].shape)
            positive = (x >= 0).to(x.dtype)
            losses = -(x * (target - positive) - torch.log1p(torch.exp(x - 2 * x * positive)))
            count = None
            if ignore is not None:
                valid = target != ignore
                losses = torch.where(valid, losses, torch.zeros_like(losses))
                count = valid.sum()
            return [losses.sum() / _normalizer(normalization, shape[0], count_all // shape[0], count)]

        return Step(layer, s, run)

    def EuclideanLoss(self, layer: Message, s: LayerShapes) -> Step:
        return Step(layer, s, lambda b: [((b[0] - b[1].reshape(b[0].shape)) ** 2).sum() / (2 * b[0].shape[0])])

    def Accuracy(self, layer: Message, s: LayerShapes) -> Step:
        p = layer.accuracy_param
        shape = s.bottoms[0]
        axis = _canonical(p.axis, len(shape))
        top_k = p.top_k
        ignore = p.ignore_label if p.HasField("ignore_label") else None
        outer = int(np.prod(shape[:axis], dtype=np.int64))
        inner = int(np.prod(shape[axis + 1:], dtype=np.int64))
        classes = shape[axis]

        def run(b: List[Tensor]) -> List[Tensor]:
            with torch.no_grad():
                scores = b[0].reshape(outer, classes, inner)
                label = b[1].reshape(outer, inner).to(torch.int64)
                valid = torch.ones_like(label, dtype=torch.bool) if ignore is None else label != ignore
                safe = torch.where(valid, label, torch.zeros_like(label))
                truth = scores.gather(1, safe.unsqueeze(1))
                better = (scores > truth).sum(1)
                hit = (better < top_k) & valid
                count = valid.sum()
                tops = [hit.sum().to(scores.dtype) / count.clamp(min=1).to(scores.dtype)]
                if len(s.tops) > 1:
                    per_class = []
                    for c in range(classes):
                        mine = valid & (label == c)
                        n = mine.sum().to(scores.dtype)
                        per_class.append(torch.where(n > 0, (hit & mine).sum().to(scores.dtype) / n.clamp(min=1),
                                                     torch.zeros_like(n)))
                    tops.append(torch.stack(per_class))
            return tops

        return Step(layer, s, run)

    def ArgMax(self, layer: Message, s: LayerShapes) -> Step:
        p = layer.argmax_param
        top_k, out_max = p.top_k, p.out_max_val
        top_shape = s.tops[0]

        def run(b: List[Tensor]) -> List[Tensor]:
            with torch.no_grad():
                x = b[0]
                if p.HasField("axis"):
                    axis = _canonical(p.axis, x.dim())
                    values, indices = torch.topk(x, top_k, dim=axis)
                    return [values if out_max else indices.to(x.dtype)]
                flat = x.reshape(x.shape[0], -1)
                values, indices = torch.topk(flat, top_k, dim=1)
                if out_max:
                    y = torch.stack([indices.to(x.dtype), values], 1)
                else:
                    y = indices.to(x.dtype).unsqueeze(1)
                return [y.reshape(top_shape)]

        return Step(layer, s, run)

    # -- Caffe 1.0's other layers (tests/training/test_torch_layers.py checks each against pycaffe)
    def InfogainLoss(self, layer: Message, s: LayerShapes) -> Step:
        """Softmax over ``axis``, then ``-sum_l H[label, l] log p_l`` per item (H from a second
        bottom or a ``.binaryproto`` source), normalised as SoftmaxWithLoss; top 1: the probabilities."""
        p = layer.infogain_loss_param
        shape = s.bottoms[0]
        axis = _canonical(p.axis if "axis" in p.DESCRIPTOR.fields_by_name else 1, len(shape))
        ignore = layer.loss_param.ignore_label if layer.loss_param.HasField("ignore_label") else None
        normalization = _normalization(layer)
        classes = shape[axis]
        outer = int(np.prod(shape[:axis], dtype=np.int64))
        inner = int(np.prod(shape[axis + 1:], dtype=np.int64))
        fixed: Optional[Tensor] = None
        if len(s.bottoms) < 3:
            if not p.source:
                raise _fail(layer, "InfogainLoss needs infogain_loss_param.source or a third bottom (H)")
            from ...formats.caffemodel import load_blob
            from ...formats.schema import load_schema

            matrix = np.asarray(load_blob(p.source, load_schema()).data, np.float32)
            if matrix.size != classes * classes:
                raise _fail(layer, f"H in {p.source} has {matrix.size} values, not {classes} x {classes}")
            fixed = torch.from_numpy(matrix.reshape(classes, classes).copy())
        elif int(np.prod(s.bottoms[2], dtype=np.int64)) != classes * classes:
            raise _fail(layer, f"H (bottom '{layer.bottom[2]}') must hold {classes} x {classes} values")

        def run(b: List[Tensor]) -> List[Tensor]:
            h = (b[2] if fixed is None else fixed.to(b[0].device)).reshape(classes, classes).to(b[0].dtype)
            prob = torch.softmax(b[0], axis)
            flat = prob.reshape(outer, classes, inner)
            label = b[1].reshape(outer, inner).to(torch.int64)
            valid = torch.ones_like(label, dtype=torch.bool) if ignore is None else label != ignore
            safe = torch.where(valid, label, torch.zeros_like(label))
            rows = h.detach()[safe]  # (outer, inner, classes): H's row of each item's label
            logs = torch.log(torch.clamp(flat, min=_FLT_MIN)).permute(0, 2, 1)
            losses = -(rows * logs).sum(-1)
            loss = torch.where(valid, losses, torch.zeros_like(losses)).sum()
            count = valid.sum() if ignore is not None else None
            tops = [loss / _normalizer(normalization, outer, inner, count)]
            return tops + [prob] if len(s.tops) > 1 else tops

        return Step(layer, s, run)

    def Reduction(self, layer: Message, s: LayerShapes) -> Step:
        p = layer.reduction_param
        shape = s.bottoms[0]
        axis = _canonical(p.axis, len(shape))
        dims = list(range(axis, len(shape)))
        coeff, op = p.coeff, p.operation
        top = s.tops[0]

        def run(b: List[Tensor]) -> List[Tensor]:
            x = b[0]
            if op == p.ASUM:
                x = torch.abs(x)
            elif op == p.SUMSQ:
                x = x * x
            y = x.mean(dim=dims) if op == p.MEAN else x.sum(dim=dims) if dims else x
            return [(y * coeff if coeff != 1 else y).reshape(top)]

        return Step(layer, s, run)

    def MVN(self, layer: Message, s: LayerShapes) -> Step:
        """Mean (and, with normalize_variance, the standard deviation plus eps) per item and
        channel, or per item across channels, as MVNLayer."""
        p = layer.mvn_param
        shape = s.bottoms[0]
        lead = 1 if p.across_channels else min(2, len(shape))
        rows = int(np.prod(shape[:lead], dtype=np.int64))
        scale, eps = p.normalize_variance, p.eps

        def run(b: List[Tensor]) -> List[Tensor]:
            x = b[0].reshape(rows, -1)
            centred = x - x.mean(dim=1, keepdim=True)
            if scale:
                centred = centred / (torch.sqrt((centred * centred).mean(dim=1, keepdim=True)) + eps)
            return [centred.reshape(b[0].shape)]

        return Step(layer, s, run)

    def Tile(self, layer: Message, s: LayerShapes) -> Step:
        p = layer.tile_param
        axis = _canonical(p.axis, len(s.bottoms[0]))
        repeats = [1] * len(s.bottoms[0])
        repeats[axis] = p.tiles
        return Step(layer, s, lambda b: [b[0].repeat(*repeats)])

    def Embed(self, layer: Message, s: LayerShapes) -> Step:
        p = layer.embed_param
        params = self.param(layer, s.params)
        weight, bias = params[0], params[1] if p.bias_term else None
        size = p.input_dim

        def run(b: List[Tensor]) -> List[Tensor]:
            index = b[0].detach()
            if bool(((index != torch.floor(index)) | (index < 0) | (index >= size)).any()):
                raise _fail(layer, f"Embed inputs must be whole numbers in [0, {size})")
            y = F.embedding(index.to(torch.int64), weight)
            return [y + bias if bias is not None else y]

        return Step(layer, s, run, params)

    def Parameter(self, layer: Message, s: LayerShapes) -> Step:
        params = self.param(layer, s.params)
        return Step(layer, s, lambda b: [params[0]], params)

    def BatchReindex(self, layer: Message, s: LayerShapes) -> Step:
        count = s.bottoms[0][0]

        def run(b: List[Tensor]) -> List[Tensor]:
            index = b[1].detach().to(torch.int64)
            if bool(((index < 0) | (index >= count)).any()):
                raise _fail(layer, f"BatchReindex indices must lie in [0, {count})")
            return [b[0].index_select(0, index)]

        return Step(layer, s, run)

    def SPP(self, layer: Message, s: LayerShapes) -> Step:
        """Spatial pyramid pooling: at level i, 2^i x 2^i bins of MAX or AVE pooling (Caffe's
        kernel, stride and pad per level), flattened and concatenated; one level: the pooled blob."""
        p = layer.spp_param
        if p.pool == p.STOCHASTIC:
            raise _fail(layer, "the torch engine does not do STOCHASTIC pyramid pooling (Caffe has no CPU one)")
        levels = spp_levels(layer, s.bottoms[0])
        average = p.pool == p.AVE

        def run(b: List[Tensor]) -> List[Tensor]:
            pooled = [caffe_pool(b[0], kernel, stride, pad, out, average) for kernel, stride, pad, out in levels]
            if len(pooled) == 1:
                return pooled
            return [torch.cat([y.reshape(y.shape[0], -1) for y in pooled], 1)]

        return Step(layer, s, run)

    def ContrastiveLoss(self, layer: Message, s: LayerShapes) -> Step:
        """Pairs (a, b) with a similarity label: ``d^2`` for similar pairs,
        ``max(margin - d, 0)^2`` for the others (legacy_version: ``max(margin - d^2, 0)``),
        summed over ``2 N``.  As Caffe's backward, the dissimilar gradient divides by
        ``d + 1e-4``, not ``d`` (so a pair at distance 0 gets a finite one)."""
        p = layer.contrastive_loss_param
        margin, legacy = p.margin, p.legacy_version

        def run(b: List[Tensor]) -> List[Tensor]:
            num = b[0].shape[0]
            diff = b[0].reshape(num, -1) - b[1].reshape(num, -1)
            dist_sq = (diff * diff).sum(1)
            similar = torch.trunc(b[2].detach().reshape(num)) != 0  # Caffe: static_cast<int>(label)
            if legacy:
                apart = F.relu(margin - dist_sq)
            else:
                dist = torch.sqrt(dist_sq.detach())
                gap = (margin - dist).clamp(min=0)
                # Value gap^2; gradient -gap / (d + 1e-4) * 2 diff, Caffe's, through a zero-valued term.
                pull = -(gap / (dist + 1e-4)) * dist_sq
                apart = gap * gap + (pull - pull.detach())
            return [torch.where(similar, dist_sq, apart).sum() / (2 * num)]

        return Step(layer, s, run)

    def HingeLoss(self, layer: Message, s: LayerShapes) -> Step:
        """``max(0, 1 - x)`` at each item's label, ``max(0, 1 + x)`` elsewhere, summed
        (L1) or squared and summed (L2), over the number of items."""
        p = layer.hinge_loss_param
        squared = p.norm == p.L2

        def run(b: List[Tensor]) -> List[Tensor]:
            num = b[0].shape[0]
            x = b[0].reshape(num, -1)
            label = _labels(layer, b[1], num, x.shape[1])
            sign = torch.ones_like(x).scatter(1, label.unsqueeze(1), -1.0)
            margins = F.relu(1 + sign * x)
            return [(margins * margins if squared else margins).sum() / num]

        return Step(layer, s, run)

    def MultinomialLogisticLoss(self, layer: Message, s: LayerShapes) -> Step:
        """``-log(max(p[label], 1e-20))`` over the number of items (bottom 0 holds
        probabilities); the gradient ``-1 / max(p, 1e-20)`` also below the floor, as Caffe's."""

        def run(b: List[Tensor]) -> List[Tensor]:
            num = b[0].shape[0]
            prob = b[0].reshape(num, -1)
            picked = prob.gather(1, _labels(layer, b[1], num, prob.shape[1]).unsqueeze(1)).squeeze(1)
            floor = picked.detach().clamp(min=_LOG_THRESHOLD)
            return [(-torch.log(floor) - (picked - picked.detach()) / floor).sum() / num]

        return Step(layer, s, run)

    def Filter(self, layer: Message, s: LayerShapes) -> Step:
        """The items (axis 0) of each bottom whose selector (the last bottom) is
        nonzero; gradients flow back to those items, zero to the rest."""

        def run(b: List[Tensor]) -> List[Tensor]:
            keep = torch.nonzero(b[-1].detach().reshape(-1) != 0).reshape(-1)
            return [x.index_select(0, keep) for x in b[:-1]]

        return Step(layer, s, run)

    def Im2col(self, layer: Message, s: LayerShapes) -> Step:
        """Each window of the convolution geometry as a column: channel-major, then
        the kernel offsets, as Caffe's im2col (the values a Convolution multiplies)."""
        p = layer.convolution_param
        bottom, top = s.bottoms[0], s.tops[0]
        axis = _canonical(p.axis, len(bottom))
        n = len(bottom) - axis - 1
        h = lambda name: getattr(p, name) if p.HasField(name) else None  # noqa: E731
        kernel = _pair(p.kernel_size, h("kernel_h"), h("kernel_w"), 1, n)
        stride = _pair(p.stride, h("stride_h"), h("stride_w"), 1, n)
        pad = _pair(p.pad, h("pad_h"), h("pad_w"), 0, n)
        dilation = _pair(p.dilation, None, None, 1, n)
        padding = [side for value in reversed(pad) for side in (value, value)]
        order = [0, 1, *range(2 + n, 2 + 2 * n), *range(2, 2 + n)]
        every: Any = (Ellipsis, *(slice(None, None, d) for d in dilation))

        def run(b: List[Tensor]) -> List[Tensor]:
            x = b[0].reshape(-1, *b[0].shape[axis:])
            x = F.pad(x, padding) if any(padding) else x
            for i in range(n):
                x = x.unfold(2 + i, dilation[i] * (kernel[i] - 1) + 1, stride[i])
            x = x[every] if any(d != 1 for d in dilation) else x
            # (items, channels, outputs..., kernel...) -> (items, channels x kernel, outputs...)
            return [x.permute(order).reshape(*b[0].shape[:axis], *top[axis:])]

        return Step(layer, s, run)

    def HDF5Output(self, layer: Message, s: LayerShapes) -> Step:
        """Writes its two bottoms to ``file_name`` as the datasets "data" and "label"
        (each item's values in Caffe's legacy 4-axis shape) at each forward pass.  Caffe
        creates the file when the net is made and fails at a second pass (the datasets
        exist); here each pass replaces the file, atomically, with the latest batch."""
        file_name = layer.hdf5_output_param.file_name
        if len(s.bottoms) < 2:
            raise _fail(layer, "HDF5Output needs two bottoms (data and label)")
        if not file_name:
            raise _fail(layer, "HDF5Output needs hdf5_output_param.file_name")
        if any(len(shape) > 4 or not shape for shape in s.bottoms[:2]):
            raise _fail(layer, "HDF5Output writes blobs of 1 to 4 axes")
        try:
            import h5py
        except ImportError:
            raise _fail(layer, "writing HDF5 files needs the Python 'h5py' module: pip install h5py") from None

        def legacy(x: Tensor) -> np.ndarray:
            array = x.detach().to("cpu", torch.float32).numpy()
            return array.reshape(*array.shape, *(1,) * (4 - array.ndim))

        def save(data: Optional[np.ndarray], label: Optional[np.ndarray]) -> None:
            import io

            from ...formats.files import write_atomic

            buffer = io.BytesIO()
            with h5py.File(buffer, "w") as handle:
                if data is not None and label is not None:
                    handle.create_dataset("data", data=data)
                    handle.create_dataset("label", data=label)
            write_atomic(file_name, buffer.getvalue())

        save(None, None)  # Caffe creates (empties) the file when it sets the layer up

        def run(b: List[Tensor]) -> List[Tensor]:
            if b[0].shape[0] != b[1].shape[0]:
                raise _fail(layer, f"data and label have {b[0].shape[0]} and {b[1].shape[0]} items")
            save(legacy(b[0]), legacy(b[1]))
            return []

        return Step(layer, s, run)

    def _recurrent(self, layer: Message, s: LayerShapes, lstm: bool) -> Step:
        """Caffe's RecurrentLayer, its unrolled net in one loop over the T timesteps of
        x (T, N, ...).  The hidden state entering step t is multiplied by cont_t (0
        starts a new sequence).  LSTM: gates [i, f, o, g] = W_hc (cont_t h_{t-1}) +
        W_xc x_t + b_c (+ W_xc_static x_static), c_t = cont_t sigmoid(f) c_{t-1} +
        sigmoid(i) tanh(g), h_t = sigmoid(o) tanh(c_t); top h.  RNN: h_t = tanh(W_hh
        (cont_t h_{t-1}) + W_xh x_t + b_h (+ W_xh_static x_static)), top o_t = tanh(W_ho
        h_t + b_o).  The first state is the exposed bottoms (expose_hidden) or else the
        previous pass's last state, zero at first; as in Caffe no gradient reaches the
        first state, the cont markers or the exposed last-state tops.  (Caffe's LSTM
        backward takes cont to be 0 or 1, as does the gradient here.)"""
        params = self.param(layer, s.params)
        states, static = recurrent_blobs(layer)
        exposed = layer.recurrent_param.expose_hidden
        hidden = layer.recurrent_param.num_output
        w_x, b_x = params[0], params[1]
        w_static = params[2] if static else None
        w_h = params[3 if static else 2]
        w_o, b_o = (params[-2], params[-1]) if not lstm else (None, None)
        carried: List[Tensor] = []

        def run(b: List[Tensor]) -> List[Tensor]:
            x, cont = b[0], b[1].detach().to(b[0].dtype)
            steps, streams = x.shape[0], x.shape[1]
            inputs = x.reshape(steps, streams, -1) @ w_x.t() + b_x
            if w_static is not None:
                inputs = inputs + (b[2].reshape(streams, -1) @ w_static.t()).unsqueeze(0)
            if exposed:
                first = [state.detach().reshape(streams, hidden) for state in b[2 + int(static):]]
            elif carried and carried[0].shape == (streams, hidden):
                first = list(carried)
            else:
                first = [x.new_zeros(streams, hidden) for _ in range(states)]
            h, c = first[0], first[-1]
            outputs = []
            for t in range(steps):
                keep = cont[t].reshape(streams, 1)
                total = inputs[t] + (h * keep) @ w_h.t()
                if lstm:
                    i, f, o, g = total.split(hidden, 1)
                    c = keep * torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    h = torch.sigmoid(o) * torch.tanh(c)
                    outputs.append(h)
                else:
                    assert w_o is not None and b_o is not None
                    h = torch.tanh(total)
                    outputs.append(torch.tanh(h @ w_o.t() + b_o))
            last = [h.detach(), c.detach()][:states]
            if not exposed:
                carried[:] = last
            tops = [torch.stack(outputs)]
            return tops + [state.reshape(1, streams, hidden) for state in last] if exposed else tops

        return Step(layer, s, run, params)

    def LSTM(self, layer: Message, s: LayerShapes) -> Step:
        return self._recurrent(layer, s, lstm=True)

    def RNN(self, layer: Message, s: LayerShapes) -> Step:
        return self._recurrent(layer, s, lstm=False)


def _normalization(layer: Message) -> str:
    """LossLayer's normalization mode, honouring the legacy ``normalize`` flag."""
    p = layer.loss_param
    if not p.HasField("normalization") and p.HasField("normalize"):
        return "VALID" if p.normalize else "BATCH_SIZE"
    return str(p.DESCRIPTOR.fields_by_name["normalization"].enum_type.values_by_number[p.normalization].name)


def _labels(layer: Message, label: Tensor, num: int, classes: int) -> Tensor:
    """One class index per item (Caffe truncates the float labels), each in ``[0, classes)``."""
    index = label.detach().reshape(num).to(torch.int64)
    if bool(((index < 0) | (index >= classes)).any()):
        raise _fail(layer, f"labels must lie in [0, {classes})")
    return index


def _normalizer(mode: str, outer: int, inner: int, valid: Optional[Tensor]) -> Any:
    """LossLayer::GetNormalizer: at least 1."""
    if mode == "FULL":
        return float(max(1, outer * inner))
    if mode == "VALID":
        if valid is None:
            return float(max(1, outer * inner))
        return valid.clamp(min=1).to(torch.float32)
    if mode == "BATCH_SIZE":
        return float(max(1, outer))
    return 1.0


#: The layer types the engine runs.
SUPPORTED = frozenset(
    name for name in dir(_Builder) if name[0].isupper()
) | _SOURCES


def check_supported(layers: Sequence[Message]) -> None:
    """Refuse, before any work, a net with a layer the engine lacks."""
    for layer in layers:
        if layer.type in REFUSED:
            raise CaffeFtError(REFUSED[layer.type], layer=layer.name)
        if layer.type not in SUPPORTED:
            raise CaffeFtError(f"the torch engine has no '{layer.type}' layer", layer=layer.name)
    filtered: Dict[str, str] = {}  # blob -> the Filter whose choice of items it carries
    for layer in layers:
        source = next((filtered[name] for name in layer.bottom if name in filtered), None)
        if layer.type == "Filter":
            source = layer.name
        elif source is None:
            continue
        if layer.type not in _ANY_BATCH:
            raise CaffeFtError(f"the torch engine runs '{layer.type}' on a fixed number of items, not on the "
                               f"items Filter '{source}' selects", layer=layer.name)
        filtered.update((name, source) for name in layer.top)


def fuse_scales(steps: Sequence[Step], loss_weights: Mapping[Tuple[int, int], float]) -> int:
    """Fold each in-place Scale that directly follows a BatchNorm into its kernel; the fold count.

    Caffe's ResNet idiom, BatchNorm then Scale (one weight and bias per
    channel) in place on its top, is ``(x - mean) / sqrt(var + eps) * w + b``:
    torch's ``batch_norm`` computes that in one pass forward and one backward
    instead of three and four, with the running-statistics update unchanged.
    Only where nothing can see the normalised value before the scaling: the
    Scale writes over the BatchNorm's top, which carries no loss weight.
    The Scale keeps its parameters (gradients reach them through the kernel)
    and passes its bottom through.
    """
    folded = 0
    for index in range(len(steps) - 1):
        norm, scale = steps[index], steps[index + 1]
        if norm.fuse is None or scale.layer.type != "Scale" or (index, 0) in loss_weights:
            continue
        top = norm.layer.top[0] if len(norm.layer.top) else None
        shape = norm.shapes.bottoms[0]
        if (top is None or list(scale.layer.bottom) != [top] or list(scale.layer.top) != [top] or len(shape) < 2
                or not scale.params or [list(p.shape) for p in scale.params[:1]] != [[shape[1]]]
                or _canonical(scale.layer.scale_param.axis, len(shape)) != 1):
            continue
        bias = scale.params[1] if scale.layer.scale_param.bias_term else None
        norm.run = norm.fuse(scale.params[0], bias)
        scale.run = _passed
        folded += 1
    return folded


def _passed(b: List[Tensor]) -> List[Tensor]:
    """A layer folded into the one before it: its bottom already holds its result."""
    return [b[0]]


# --------------------------------------------------------------------- net --


def _tops(layer: Message) -> List[str]:
    """A layer's tops; a loss layer given none gets Caffe's anonymous "(automatic)" one."""
    if not len(layer.top) and layer.type in _LOSSES:
        return ["(automatic)"]
    return list(layer.top)


@dataclass
class LearnableSpec:
    """A parameter the solver updates (an owner, not a share), with its multipliers."""

    param: nn.Parameter
    lr_mult: float
    decay_mult: float
    layer: str
    index: int


class CaffeNet(nn.Module):
    """A phase-filtered Caffe net; ``forward(inputs)`` returns every blob by name.

    ``inputs`` maps the tops of the net's source layers (Input, ImageData,
    Data...) to tensors.  After a forward pass, :attr:`loss` holds Caffe's
    loss (a tensor to call ``backward`` on) and :attr:`outputs` the blobs no
    layer consumes, as pycaffe's ``net.outputs``.
    """

    def __init__(self, net: Message, phase: str = "TEST", stages: Sequence[str] = (), level: int = 0,
                 input_shapes: Optional[Mapping[str, Sequence[int]]] = None,
                 share_from: Optional["CaffeNet"] = None, fuse: bool = True) -> None:
        super().__init__()
        from ...net.shapes import filter_layers

        self.phase = phase.upper()
        all_stages = [*net.state.stage, *stages]
        layers = filter_layers(net, self.phase, level, all_stages)
        check_supported(layers)
        if len(net.input):
            raise CaffeFtError("the torch engine needs Input layers, not net-level 'input' fields; "
                               "upgrade the net (caffe-ft fmt --upgrade)")
        self.shapes = infer(net, self.phase, input_shapes=input_shapes, stages=stages, level=level)
        self.layer_params: List[Message] = layers
        self.training_updates = self.phase == "TRAIN"
        self._store = nn.ParameterList()
        self._named: Dict[str, nn.Parameter] = {}
        self._share_from = share_from
        self.blobs_of: Dict[str, List[nn.Parameter]] = {}
        self.learnable: List[LearnableSpec] = []
        self.sources: List[Message] = [layer for layer in layers if layer.type in _SOURCES]
        builder = _Builder(self)
        self.steps: List[Step] = []
        for layer, shapes in zip(layers, self.shapes.layers):
            if layer.type in _SOURCES:
                continue
            make = getattr(builder, layer.type)
            self.steps.append(make(layer, shapes))
        self.loss_weights = self._loss_weights(layers)
        #: In-place Scales folded into their BatchNorm (``fuse``; off only to compare against the plain path).
        self.fused = fuse_scales(self.steps, self.loss_weights) if fuse else 0
        for spec in self.learnable:
            if spec.lr_mult == 0:
                spec.param.requires_grad_(False)
        # Caffe's net outputs: blobs whose last use, in layer order, writes them.
        available: Dict[str, None] = {}
        for layer in layers:
            for name in layer.bottom:
                available.pop(name, None)
            for name in _tops(layer):
                available[name] = None
        self.output_names = list(available)
        self.loss: Optional[Tensor] = None
        self.outputs: Dict[str, Tensor] = {}

    # -- parameters
    def _layer_params(self, layer: Message, shapes: Sequence[Shape]) -> List[nn.Parameter]:
        from ...net.fillers import fill_layer

        if self._share_from is not None and layer.name in self._share_from.blobs_of:
            # A test net shares the train net's blobs by layer name (Net::ShareTrainedLayersWith).
            theirs = self._share_from.blobs_of[layer.name]
            if [tuple(p.shape) for p in theirs] != [tuple(shape) for shape in shapes]:
                raise _fail(layer, f"cannot share the train net's blobs: shapes {[tuple(p.shape) for p in theirs]} "
                                   f"there, {[tuple(shape) for shape in shapes]} here")
            self.blobs_of[layer.name] = list(theirs)
            return list(theirs)
        params: List[nn.Parameter] = []
        fresh = None
        for index, shape in enumerate(shapes):
            spec = layer.param[index] if index < len(layer.param) else None
            name = spec.name if spec is not None and spec.name else ""
            if name and name in self._named:
                owner = self._named[name]
                if int(np.prod(owner.shape, dtype=np.int64)) != int(np.prod(shape, dtype=np.int64)):
                    raise _fail(layer, f"shared parameter '{name}' has {tuple(owner.shape)} here {shape}")
                params.append(owner)
                if not any(entry.param is owner for entry in self.learnable):
                    self._add_learnable(owner, layer, index, spec)
                continue
            if fresh is None:
                fresh = fill_layer(layer, shapes, np.random.default_rng(0))
            param = nn.Parameter(torch.from_numpy(np.ascontiguousarray(fresh[index], np.float32)).reshape(shape))
            self._store.append(param)
            params.append(param)
            if name:
                self._named[name] = param
            self._add_learnable(param, layer, index, spec)
        self.blobs_of[layer.name] = params
        return params

    def _add_learnable(self, param: nn.Parameter, layer: Message, index: int, spec: Optional[Message]) -> None:
        lr = spec.lr_mult if spec is not None else 1.0
        decay = spec.decay_mult if spec is not None else 1.0
        if layer.type == "BatchNorm":
            lr, decay = 0.0, decay
        self.learnable.append(LearnableSpec(param, lr, decay, layer.name, index))

    def _loss_weights(self, layers: Sequence[Message]) -> Dict[Tuple[int, int], float]:
        weights = {}
        step = 0
        for layer in layers:
            if layer.type in _SOURCES:
                continue
            for i, _ in enumerate(_tops(layer)):
                if i < len(layer.loss_weight):
                    w = layer.loss_weight[i]
                else:
                    w = 1.0 if (layer.type in _LOSSES and i == 0) else 0.0
                if w:
                    weights[(step, i)] = float(w)
            step += 1
        return weights

    def load_blobs(self, blobs: Mapping[str, Sequence[Any]], strict: bool = False) -> List[str]:
        """Copy weights in, by layer name, as ``Net::CopyTrainedLayersFrom``: the
        counts must match (Caffe's shape check); returns the layers filled."""
        filled = []
        for name, params in self.blobs_of.items():
            source = blobs.get(name)
            if source is None:
                if strict:
                    raise CaffeFtError(f"the weights have no layer '{name}'")
                continue
            if len(source) != len(params):
                raise CaffeFtError(f"layer '{name}' has {len(params)} blobs here but {len(source)} in the weights")
            for index, (param, blob) in enumerate(zip(params, source)):
                data = np.asarray(getattr(blob, "data", blob), np.float32)
                if data.size != param.numel():
                    raise CaffeFtError(f"layer '{name}' blob {index}: shape {tuple(param.shape)} here, "
                                       f"{data.shape} in the weights")
                with torch.no_grad():
                    param.copy_(torch.from_numpy(np.array(data, np.float32).reshape(param.shape)))
            filled.append(name)
        return filled

    def blob_arrays(self) -> Dict[str, List[np.ndarray]]:
        """Every layer's parameter blobs as float32 arrays, in Caffe's order."""
        return {name: [p.detach().cpu().numpy().astype(np.float32, copy=True) for p in params]
                for name, params in self.blobs_of.items()}

    # -- running
    def forward(self, inputs: Mapping[str, Tensor]) -> Dict[str, Tensor]:  # type: ignore[override]
        blobs: Dict[str, Tensor] = dict(inputs)
        loss: Optional[Tensor] = None
        for index, step in enumerate(self.steps):
            layer = step.layer
            try:
                bottoms = [blobs[name] for name in layer.bottom]
            except KeyError as exc:
                raise _fail(layer, f"no blob {exc} was fed to the net") from None
            tops = step.run(bottoms)
            for i, (name, value) in enumerate(zip(_tops(layer), tops)):
                blobs[name] = value
                weight = self.loss_weights.get((index, i))
                if weight:
                    term = value.sum() * weight
                    loss = term if loss is None else loss + term
        self.loss = loss
        self.outputs = {name: blobs[name] for name in self.output_names if name in blobs}
        return blobs
