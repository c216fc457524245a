"""Blob and parameter shapes of a net, worked out without Caffe.

:func:`infer` walks a current-format ``NetParameter`` the way Caffe 1.0's
``Net::Init`` does: it drops the layers the net state excludes
(:func:`filter_layers`), then sets each remaining layer up in order, computing
its top shapes and its parameter blob shapes with the same formulas as the
layer's ``LayerSetUp``/``Reshape`` in Caffe (ceil-rounded pooling that clips a
last window starting in the padding, dilated and grouped convolution, ``0``
and ``-1`` in Reshape, ...).  A configuration Caffe would refuse with a failed
``CHECK`` becomes a :class:`~caffe_ft.errors.CaffeFtError` naming the layer.

Each layer type has one rule in :data:`RULES`: a function from the layer and
its bottom shapes to its top shapes, parameter shapes and, for the layers
that dominate compute, its multiply-accumulate count.  A data layer whose
shapes live in a database or file (``Data``, ``HDF5Data``...) yields unknown
tops that the caller fills in through ``input_shapes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from google.protobuf.message import Message

from ..errors import CaffeFtError
from ..formats.limits import shape_problem
from .graph import recurrent_blobs

Shape = Tuple[int, ...]
# A top whose shape the layer's parameters do not determine is None.
MaybeShape = Optional[Shape]

PHASES = {"TRAIN": 0, "TEST": 1}


# --------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class LayerShapes:
    """One layer as set up: its blobs' shapes, its parameters and its cost."""

    name: str
    type: str
    bottom_names: Tuple[str, ...]
    bottoms: Tuple[Shape, ...]
    top_names: Tuple[str, ...]
    tops: Tuple[Shape, ...]
    params: Tuple[Shape, ...]
    param_count: int
    # Multiply-accumulates of one forward pass (Convolution, Deconvolution,
    # InnerProduct only; bias additions not counted); None for other layers.
    flops: Optional[int]


@dataclass(frozen=True)
class NetShapes:
    """Shapes of a whole net.

    ``blobs`` holds each blob's shape after the last layer that writes it (an
    in-place layer reuses its bottom's name; ``layers`` keeps every step);
    ``params`` holds, like pycaffe's ``Net.params``, only the layers that have
    parameter blobs, in Caffe's blob order.
    """

    blobs: Dict[str, Shape]
    params: Dict[str, List[Shape]]
    layers: List[LayerShapes]

    def layer(self, name: str) -> LayerShapes:
        """The entry of the layer called ``name``."""
        for entry in self.layers:
            if entry.name == name:
                return entry
        raise KeyError(name)


@dataclass(frozen=True)
class Inferred:
    """What one rule computes for one layer."""

    tops: Tuple[MaybeShape, ...]
    params: Tuple[Shape, ...] = ()
    flops: Optional[int] = None


Rule = Callable[[Message, Sequence[Shape]], Inferred]


# --------------------------------------------------------------------------
# Phase, level and stage filtering (Caffe's Net::FilterNet)


def _phase_number(phase: Union[str, int]) -> int:
    if isinstance(phase, int):
        return phase
    try:
        return PHASES[phase.upper()]
    except KeyError:
        raise CaffeFtError(f"unknown phase '{phase}' (use TRAIN or TEST)") from None


def state_meets_rule(rule: Message, phase: int, level: int, stages: Sequence[str]) -> bool:
    """Whether a net state meets one ``NetStateRule``: same phase when the rule
    names one, level within ``[min_level, max_level]``, every ``stage`` present
    and no ``not_stage`` present.
    """
    if rule.HasField("phase") and rule.phase != phase:
        return False
    if rule.HasField("min_level") and level < rule.min_level:
        return False
    if rule.HasField("max_level") and level > rule.max_level:
        return False
    if any(stage not in stages for stage in rule.stage):
        return False
    return not any(stage in stages for stage in rule.not_stage)


def is_included(
    layer: Message, phase: Union[str, int] = "TEST", level: int = 0, stages: Sequence[str] = ()
) -> bool:
    """Whether Caffe instantiates ``layer`` in the given net state.

    A layer with ``include`` rules is kept when it meets any of them; one with
    ``exclude`` rules is dropped when it meets any of them; giving both is an
    error, as in Caffe.
    """
    if len(layer.include) and len(layer.exclude):
        raise CaffeFtError("specify either include rules or exclude rules, not both", layer=layer.name)
    number = _phase_number(phase)
    if len(layer.include):
        return any(state_meets_rule(rule, number, level, stages) for rule in layer.include)
    return not any(state_meets_rule(rule, number, level, stages) for rule in layer.exclude)


def filter_layers(
    net: Message, phase: Union[str, int] = "TEST", level: int = 0, stages: Sequence[str] = ()
) -> List[Message]:
    """The layers of ``net`` that Caffe instantiates in the given state (Net::FilterNet).

    ``stages`` are the state's stages as given; pycaffe adds the ones passed
    to ``caffe.Net`` to those of the net's own ``state``, and :func:`infer`
    does the same.
    """
    number = _phase_number(phase)
    # Most layers have no rules: kept without looking further (a net may have a million layers).
    return [layer for layer in net.layer
            if not (layer.include or layer.exclude) or is_included(layer, number, level, stages)]


# --------------------------------------------------------------------------
# Helpers shared by the rules


def _fail(layer: Message, message: str) -> CaffeFtError:
    return CaffeFtError(message, layer=layer.name)


def count(shape: Sequence[int], start: int = 0, end: Optional[int] = None) -> int:
    """Product of ``shape[start:end]`` (1 for an empty range), as Blob::count."""
    total = 1
    for dim in shape[start:end]:
        total *= dim
    return total


def _axis(layer: Message, axis: int, num_axes: int, what: str = "axis") -> int:
    """Blob::CanonicalAxisIndex: ``axis`` in ``[-num_axes, num_axes)``, made non-negative."""
    if not -num_axes <= axis < num_axes:
        raise _fail(layer, f"{what} {axis} is out of range for a {num_axes}-axis blob")
    return axis + num_axes if axis < 0 else axis


def _bottoms(layer: Message, bottoms: Sequence[Shape], least: int, most: Optional[int] = None) -> None:
    if len(bottoms) < least or (most is not None and len(bottoms) > most):
        wanted = str(least) if most == least else f"{least}..{most if most is not None else ''}"
        raise _fail(layer, f"{layer.type} takes {wanted} bottoms, got {len(bottoms)}")


def _has(message: Message, name: str) -> bool:
    """Whether this schema has field ``name`` and it is set (forks differ)."""
    return name in message.DESCRIPTOR.fields_by_name and message.HasField(name)


def _same(layer: Message, bottoms: Sequence[Shape]) -> Shape:
    """Check every bottom has bottom 0's shape and return it."""
    for other in bottoms[1:]:
        if other != bottoms[0]:
            raise _fail(layer, f"bottoms must have one shape, got {bottoms[0]} and {other}")
    return bottoms[0]


def _trunc_div(numerator: int, denominator: int) -> int:
    """C++ integer division (rounds toward zero)."""
    quotient = abs(numerator) // denominator
    return quotient if numerator >= 0 else -quotient


def _checked(layer: Message, shape: Shape) -> Shape:
    if any(dim < 0 for dim in shape):
        raise _fail(layer, f"the output shape {shape} has a negative dimension")
    return shape


# --------------------------------------------------------------------------
# Rules: layers whose tops keep their bottom's shape


def _like_bottom(layer: Message, bottoms: Sequence[Shape]) -> Inferred:
    """Element-wise layers: every top is shaped like bottom 0."""
    _bottoms(layer, bottoms, 1)
    return Inferred(tuple(bottoms[0] for _ in layer.top))


def _four_axes(layer: Message, bottoms: Sequence[Shape]) -> Inferred:
    """LRN: like its bottom, which must be (num, channels, height, width)."""
    _bottoms(layer, bottoms, 1, 1)
    if len(bottoms[0]) != 4:
        raise _fail(layer, f"{layer.type} needs a 4-axis bottom, got {bottoms[0]}")
    return _like_bottom(layer, bottoms)


def _eltwise(layer: Message, bottoms: Sequence[Shape]) -> Inferred:
    _bottoms(layer, bottoms, 2)
    param = layer.eltwise_param
    if len(param.coeff) not in (0, len(bottoms)):
        raise _fail(layer, "Eltwise takes one coeff per bottom, or none")
    return Inferred((_same(layer, bottoms),))


def _softmax(layer: Message, bottoms: Sequence[Shape]) -> Inferred:
    _bottoms(layer, bottoms, 1, 1)
    _axis(layer, layer.softmax_param.axis, len(bottoms[0]))
    return Inferred((bottoms[0],))


def _silence(layer: Message, bottoms: Sequence[Shape]) -> Inferred:
    """Layers with no tops (Silence, HDF5Output)."""
    return Inferred(())


# --------------------------------------------------------------------------
# Rules: learnable layers


def _spatial(
    layer: Message,
    param: Message,
    name: str,
    spatial_axes: int,
    default: Optional[int],
    h_w: Optional[Tuple[str, str]],
) -> List[int]:
    """One per-axis setting of ConvolutionParameter: the ``_h``/``_w`` pair
    (2-D only) or the repeated field given once or once per spatial axis.
    """
    if h_w is not None and (param.HasField(h_w[0]) or param.HasField(h_w[1])):
        if spatial_axes != 2:
            raise _fail(layer, f"{h_w[0]} and {h_w[1]} only work for 2-D convolution")
        if len(getattr(param, name)):
            raise _fail(layer, f"give either {name} or {h_w[0]}/{h_w[1]}, not both")
        return [getattr(param, h_w[0]), getattr(param, h_w[1])]
    values = list(getattr(param, name))
    if not values and default is not None:
        return [default] * spatial_axes
    if len(values) == 1:
        return values * spatial_axes
    if len(values) != spatial_axes:
        raise _fail(
            layer,
            f"{name} must be given once or once per spatial axis "
            f"({len(values)} given, {spatial_axes} spatial axes)",
        )
    return values


def _convolution(layer: Message, bottoms: Sequence[Shape], deconv: bool = False) -> Inferred:
    """Convolution and (``deconv``) Deconvolution, N-D, grouped and dilated."""
    _bottoms(layer, bottoms, 1)
    param = layer.convolution_param
    shape = _same(layer, bottoms)
    axis = _axis(layer, param.axis, len(shape))
    spatial_axes = len(shape) - axis - 1
    kernel = _spatial(layer, param, "kernel_size", spatial_axes, None, ("kernel_h", "kernel_w"))
    stride = _spatial(layer, param, "stride", spatial_axes, 1, ("stride_h", "stride_w"))
    pad = _spatial(layer, param, "pad", spatial_axes, 0, ("pad_h", "pad_w"))
    dilation = _spatial(layer, param, "dilation", spatial_axes, 1, None)
    if any(k <= 0 for k in kernel):
        raise _fail(layer, "kernel dimensions must be nonzero")
    if any(s <= 0 for s in stride):
        raise _fail(layer, "stride dimensions must be nonzero")
    channels, outputs, group = shape[axis], param.num_output, param.group
    if outputs <= 0:
        raise _fail(layer, "num_output must be positive")
    if group <= 0 or channels % group or outputs % group:
        raise _fail(
            layer, f"group {group} must divide both the input channels ({channels}) "
            f"and num_output ({outputs})"
        )
    extents = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    inputs = shape[axis + 1:]
    if deconv:
        spatial = [s * (i - 1) + e - 2 * p for i, s, e, p in zip(inputs, stride, extents, pad)]
        weight = (channels, outputs // group, *kernel)
    else:
        spatial = [
            _trunc_div(i + 2 * p - e, s) + 1 for i, s, e, p in zip(inputs, stride, extents, pad)
        ]
        weight = (outputs, channels // group, *kernel)
    top = _checked(layer, (*shape[:axis], outputs, *spatial))
    params = (weight, (outputs,)) if param.bias_term else (weight,)
    # Each output (conv) or input (deconv) element takes one kernel's worth of
    # multiply-adds over its group's channels.
    if deconv:
        macs = count(shape) * (outputs // group) * count(kernel)
    else:
        macs = count(top) * (channels // group) * count(kernel)
    return Inferred(tuple(top for _ in layer.top), params, macs * len(bottoms))


def _deconvolution(layer: Message, bottoms: Sequence[Shape]) -> Inferred:
    return _convolution(layer, bottoms, deconv=True)


def _inner_product(layer: Message, bottoms: Sequence[Shape]) -> Inferred:
    _bottoms(layer, bottoms, 1, 1)
    param = layer.inner_product_param
    shape = bottoms[0]
    axis = _axis(layer, param.axis, len(shape))
    inputs, outputs = count(shape, axis), param.num_output
    weight = (inputs, outputs) if param.transpose else (outputs, inputs)
    params = (weight, (outputs,)) if param.bias_term else (weight,)
    return Inferred(((*shape[:axis], outputs),), params, count(shape, 0, axis) * inputs * outputs)


def _embed(layer: Message, bottoms: Sequence[Shape]) -> Inferred:
    _bottoms(layer, bottoms, 1, 1)
    param = layer.embed_param
    weight = (param.input_dim, param.num_output)
    params = (weight, (param.num_output,)) if param.bias_term else (weight,)
    return Inferred(((*bottoms[0], param.num_output),), params)


def _batch_norm(layer: Message, bottoms: Sequence[Shape]) -> Inferred:
    """Mean, variance and the moving-average factor (a single number)."""
    _bottoms(layer, bottoms, 1, 1)
    channels = bottoms[0][1] if len(bottoms[0]) > 1 else 1
    return Inferred((bottoms[0],), ((channels,), (channels,), (1,)))


def _slice_shape(layer: Message, shape: Shape, axis_field: int, num_axes: int, what: str) -> Shape:
    """``shape[axis:axis+num_axes]`` (to the end for -1), as Scale/Bias shape their blob."""
    axis = _axis(layer, axis_field, len(shape))
    if num_axes < -1:
        raise _fail(layer, "num_axes must be non-negative, or -1 for all")
    if num_axes >= 0 and axis + num_axes > len(shape):
        raise _fail(layer, f"the {what} blob would extend past bottom 0's {len(shape)} axes")
    return shape[axis:] if num_axes == -1 else shape[axis:axis + num_axes]


def _check_operand(layer: Message, shape: Shape, axis_field: int, operand: Shape, what: str) -> None:
    """Scale/Bias Reshape: the operand must match bottom 0 from the axis on."""
    axis = 0 if not operand else _axis(layer, axis_field, len(shape))
    if shape[axis:axis + len(operand)] != operand:
        raise _fail(layer, f"the {what} shape {operand} does not match bottom 0 {shape} at axis {axis}")


def _operand(layer: Message, bottoms: Sequence[Shape], param: Message, what: str) -> Tuple[Shape, Tuple[Shape, ...]]:
    """The Scale/Bias operand: a learned blob spanning ``num_axes`` from ``axis``
    (one bottom, returned as a parameter shape too) or bottom 1 (no parameter)."""
    _bottoms(layer, bottoms, 1, 2)
    shape = bottoms[0]
    if len(bottoms) == 1:
        operand = _slice_shape(layer, shape, param.axis, param.num_axes, what)
        params: Tuple[Shape, ...] = (operand,)
    else:
        operand, params = bottoms[1], ()
    _check_operand(layer, shape, param.axis, operand, what)
    return operand, params


def _scale(layer: Message, bottoms: Sequence[Shape]) -> Inferred:
    """Scale: a factor (learned, or bottom 1), plus an optional bias spanning the factor's axes."""
    param = layer.scale_param
    _, params = _operand(layer, bottoms, param, "scale")
    if param.bias_term:
        bias_axes = len(bottoms[1]) if len(bottoms) > 1 else param.num_axes
        params += (_slice_shape(layer, bottoms[0], param.axis, bias_axes, "bias"),)
    return Inferred((bottoms[0],), params)


def _bias(layer: Message, bottoms: Sequence[Shape]) -> Inferred:
    _, params = _operand(layer, bottoms, layer.bias_param, "bias")
    return Inferred((bottoms[0],), params)


def _prelu(layer: Message, bottoms: Sequence[Shape]) -> Inferred:
    _bottoms(layer, bottoms, 1, 1)
    if len(bottoms[0]) < 2:
        raise _fail(layer, f"PReLU needs a bottom with at least 2 axes, got {bottoms[0]}")
    shared = layer.prelu_param.channel_shared
    return Inferred((bottoms[0],), ((),) if shared else ((bottoms[0][1],),))


def _parameter(layer: Message, bottoms: Sequence[Shape]) -> Inferred:
    shape = tuple(layer.parameter_param.shape.dim)
    return Inferred((shape,), (shape,))


# --------------------------------------------------------------------------
# Rules: pooling


def _pool_pair(layer: Message, param: Message, name: str) -> List[int]:
    """Pooling's ``name`` for both axes, or its ``name_h`` and ``name_w`` (both, and alone)."""
    has_h, has_w = param.HasField(f"{name}_h"), param.HasField(f"{name}_w")
    if has_h != has_w or (has_h and param.HasField(name)):
        raise _fail(layer, f"give {name}, or {name}_h and {name}_w")
    if has_h:
        return [getattr(param, f"{name}_h"), getattr(param, f"{name}_w")]
    return [getattr(param, name)] * 2


def pooling_geometry(layer: Message, shape: Shape) -> Tuple[List[int], List[int], List[int], List[int]]:
    """Kernel, stride, pad and output size per spatial axis of the Pooling
    ``layer`` over a 4-axis ``shape``, checked and computed as Caffe's
    PoolingLayer: ceil rounding (or floor where the schema has round_mode), and
    a last window that would start in the bottom/right padding is dropped.
    """
    param = layer.pooling_param
    if param.global_pooling:
        if any(param.HasField(name) for name in ("kernel_size", "kernel_h", "kernel_w")):
            raise _fail(layer, "global_pooling takes no kernel size")
        kernel = [shape[2], shape[3]]
    elif param.HasField("kernel_size") == (param.HasField("kernel_h") and param.HasField("kernel_w")):
        raise _fail(layer, "give kernel_size, or kernel_h and kernel_w")
    elif param.HasField("kernel_size"):
        kernel = [param.kernel_size] * 2
    else:
        kernel = [param.kernel_h, param.kernel_w]
    pad = _pool_pair(layer, param, "pad")
    stride = _pool_pair(layer, param, "stride")
    if any(k <= 0 for k in kernel) or any(s <= 0 for s in stride):
        raise _fail(layer, "kernel and stride dimensions must be nonzero")
    if param.global_pooling and (any(pad) or any(s != 1 for s in stride)):
        raise _fail(layer, "global_pooling needs pad 0 and stride 1")
    if any(pad):
        if param.pool == param.STOCHASTIC:
            raise _fail(layer, "padding only works with MAX and AVE pooling")
        if any(p >= k for p, k in zip(pad, kernel)):
            raise _fail(layer, "pad must be smaller than the kernel")
    floor = _has(param, "round_mode") and param.round_mode == 1  # FLOOR
    return kernel, stride, pad, _pooled_sizes(shape, kernel, stride, pad, floor)


def _pooled_sizes(shape: Shape, kernel: Sequence[int], stride: Sequence[int], pad: Sequence[int],
                  floor: bool = False) -> List[int]:
    """PoolingLayer::Reshape's output size per spatial axis: ceil (or floor)
    rounding, and a last window that would start in the padding dropped."""
    pooled = []
    for size, k, p, s in zip(shape[2:], kernel, pad, stride):
        span = size + 2 * p - k
        out = (span // s if floor else -(-span // s)) + 1
        # Caffe clips on both axes as soon as either is padded.
        if any(pad) and (out - 1) * s >= size + p:
            out -= 1
        pooled.append(out)
    return pooled


def _pooling(layer: Message, bottoms: Sequence[Shape]) -> Inferred:
    """Pooling: :func:`pooling_geometry`'s output size."""
    _bottoms(layer, bottoms, 1, 1)
    shape = bottoms[0]
    if len(shape) != 4:
        raise _fail(layer, f"Pooling needs a 4-axis bottom (num, channels, height, width), got {shape}")
    pooled = pooling_geometry(layer, shape)[3]
    top = _checked(layer, (shape[0], shape[1], *pooled))
    return Inferred(tuple(top for _ in layer.top))


def spp_levels(layer: Message, shape: Shape) -> List[Tuple[List[int], List[int], List[int], List[int]]]:
    """Kernel, stride, pad and output size of each pyramid level of the SPP
    ``layer`` over a 4-axis ``shape``, as SPPLayer::GetPoolingParam (level i:
    2^i bins a side, kernel ceil(size / bins), stride the kernel, pad half the
    overhang) and PoolingLayer::Reshape."""
    height = layer.spp_param.pyramid_height
    if height < 1:
        raise _fail(layer, "pyramid_height must be at least 1")
    levels = []
    for level in range(height):
        bins = 2 ** level
        kernel = [-(-size // bins) for size in shape[2:]]
        pad = [(k * bins - size + 1) // 2 for k, size in zip(kernel, shape[2:])]
        if any(p >= k for p, k in zip(pad, kernel)):
            raise _fail(layer, f"pyramid level {level} pads as much as its kernel: the bottom is too small")
        levels.append((kernel, kernel, pad, _pooled_sizes(shape, kernel, kernel, pad)))
    return levels


def _spp(layer: Message, bottoms: Sequence[Shape]) -> Inferred:
    """SPP: each pyramid level's pooled blob (:func:`spp_levels`) flattened and
    concatenated; a pyramid of one level gives the pooled blob itself."""
    _bottoms(layer, bottoms, 1, 1)
    shape = bottoms[0]
    if len(shape) != 4:
        raise _fail(layer, f"SPP needs a 4-axis bottom (num, channels, height, width), got {shape}")
    sizes = [out for _, _, _, out in spp_levels(layer, shape)]
    if len(sizes) == 1:
        return Inferred(((shape[0], shape[1], *sizes[0]),))
    return Inferred(((shape[0], sum(shape[1] * h * w for h, w in sizes)),))


# --------------------------------------------------------------------------
# Rules: layers that move data between axes or blobs


def _concat(layer: Message, bottoms: Sequence[Shape]) -> Inferred:
    _bottoms(layer, bottoms, 1)
    param = layer.concat_param
    if param.HasField("axis") and param.HasField("concat_dim"):
        raise _fail(layer, "give either axis or concat_dim, not both")
    first = bottoms[0]
    axis = param.concat_dim if param.HasField("concat_dim") else _axis(layer, param.axis, len(first))
    if axis >= len(first):
        raise _fail(layer, f"concat_dim {axis} is out of range for a {len(first)}-axis blob")
    total = 0
    for shape in bottoms:
        if len(shape) != len(first) or shape[:axis] + shape[axis + 1:] != first[:axis] + first[axis + 1:]:
            raise _fail(layer, f"bottoms {first} and {shape} differ outside the concat axis {axis}")
        total += shape[axis]
    return Inferred(((*first[:axis], total, *first[axis + 1:]),))


def _slice(layer: Message, bottoms: Sequence[Shape]) -> Inferred:
    _bottoms(layer, bottoms, 1, 1)
    param = layer.slice_param
    shape = bottoms[0]
    if param.HasField("axis") and param.HasField("slice_dim"):
        raise _fail(layer, "give either axis or slice_dim, not both")
    if param.HasField("slice_dim"):
        axis = param.slice_dim
        if axis >= len(shape):
            raise _fail(layer, f"slice_dim {axis} is out of range for a {len(shape)}-axis blob")
    else:
        axis = _axis(layer, param.axis, len(shape))
    size, tops = shape[axis], len(layer.top)
    points = list(param.slice_point)
    if points:
        if len(points) != tops - 1:
            raise _fail(layer, f"{len(points)} slice points need {len(points) + 1} tops, got {tops}")
        if tops > size:
            raise _fail(layer, f"cannot slice {size} into {tops} tops")
        bounds = [0, *points, size]
        if any(b <= a for a, b in zip(bounds[:-2], bounds[1:-1])):
            raise _fail(layer, "slice points must increase")
        sizes = [b - a for a, b in zip(bounds, bounds[1:])]
        if sizes[-1] < 0:
            raise _fail(layer, f"slice point {points[-1]} is past the axis size {size}")
    else:
        if size % tops:
            raise _fail(layer, f"{tops} tops do not evenly divide the slice axis ({size})")
        sizes = [size // tops] * tops
    return Inferred(tuple((*shape[:axis], n, *shape[axis + 1:]) for n in sizes))


def _flatten(layer: Message, bottoms: Sequence[Shape]) -> Inferred:
    _bottoms(layer, bottoms, 1, 1)
    param = layer.flatten_param
    shape = bottoms[0]
    start = _axis(layer, param.axis, len(shape))
    end = _axis(layer, param.end_axis, len(shape), "end_axis")
    return Inferred(((*shape[:start], count(shape, start, end + 1), *shape[end + 1:]),))


def _reshape(layer: Message, bottoms: Sequence[Shape]) -> Inferred:
    """Reshape: ``0`` copies the bottom's dimension, one ``-1`` is inferred;
    ``axis``/``num_axes`` pick the bottom axes replaced.
    """
    _bottoms(layer, bottoms, 1, 1)
    param = layer.reshape_param
    shape, wanted = bottoms[0], list(param.shape.dim)
    start = param.axis if param.axis >= 0 else len(shape) + param.axis + 1
    if not 0 <= start <= len(shape):
        raise _fail(layer, f"axis {param.axis} is out of range for a {len(shape)}-axis blob")
    if param.num_axes < -1:
        raise _fail(layer, "num_axes must be >= 0, or -1 for all")
    end = len(shape) if param.num_axes == -1 else start + param.num_axes
    if end > len(shape):
        raise _fail(layer, "axis + num_axes is out of range")
    if wanted.count(-1) > 1:
        raise _fail(layer, "at most one -1 may be given in the new shape")
    new = list(wanted)
    for i, dim in enumerate(wanted):
        if dim == 0:
            if start + i >= len(shape):
                raise _fail(layer, "the new shape has a 0 with no bottom axis to copy")
            new[i] = shape[start + i]
    if -1 in wanted:
        known = count(shape, 0, start) * count(shape, end) * count([d for d in new if d != -1])
        if known == 0 or count(shape) % known:
            raise _fail(layer, f"bottom count {count(shape)} is not divisible by {known}")
        new[wanted.index(-1)] = count(shape) // known
    top = (*shape[:start], *new, *shape[end:])
    if count(top) != count(shape):
        raise _fail(layer, f"reshaping {shape} to {top} changes the count")
    return Inferred((_checked(layer, top),))


def _crop(layer: Message, bottoms: Sequence[Shape]) -> Inferred:
    """Crop bottom 0 to bottom 1's size on every axis from ``axis`` on."""
    _bottoms(layer, bottoms, 2, 2)
    param = layer.crop_param
    data, reference = bottoms
    start = _axis(layer, param.axis, len(data))
    offsets = list(param.offset)
    if len(offsets) > 1 and start + len(offsets) != len(data):
        raise _fail(layer, "give one crop offset, or one per axis from axis on")
    top = list(data)
    for i in range(start, len(data)):
        offset = 0 if not offsets else offsets[0] if len(offsets) == 1 else offsets[i - start]
        if data[i] - offset < reference[i]:
            raise _fail(layer, f"cannot crop axis {i}: {data[i]} - offset {offset} < {reference[i]}")
        top[i] = reference[i]
    return Inferred((tuple(top),))


def _split(layer: Message, bottoms: Sequence[Shape]) -> Inferred:
    _bottoms(layer, bottoms, 1, 1)
    return Inferred(tuple(bottoms[0] for _ in layer.top))


def _tile(layer: Message, bottoms: Sequence[Shape]) -> Inferred:
    _bottoms(layer, bottoms, 1, 1)
    param = layer.tile_param
    shape = list(bottoms[0])
    axis = _axis(layer, param.axis, len(shape))
    if param.tiles <= 0:
        raise _fail(layer, "tiles must be positive")
    shape[axis] *= param.tiles
    return Inferred((tuple(shape),))


def _reduction(layer: Message, bottoms: Sequence[Shape]) -> Inferred:
    _bottoms(layer, bottoms, 1, 1)
    axis = _axis(layer, layer.reduction_param.axis, len(bottoms[0]))
    return Inferred((bottoms[0][:axis],))


def _argmax(layer: Message, bottoms: Sequence[Shape]) -> Inferred:
    """ArgMax: ``top_k`` along ``axis``, or without one (num, 1 or 2, top_k, 1...)."""
    _bottoms(layer, bottoms, 1, 1)
    param = layer.argmax_param
    shape = bottoms[0]
    if param.top_k < 1:
        raise _fail(layer, "top_k must be at least 1")
    if param.HasField("axis"):
        axis = _axis(layer, param.axis, len(shape))
        if param.top_k > shape[axis]:
            raise _fail(layer, f"top_k {param.top_k} exceeds the axis size {shape[axis]}")
        return Inferred(((*shape[:axis], param.top_k, *shape[axis + 1:]),))
    if param.top_k > count(shape, 1):
        raise _fail(layer, f"top_k {param.top_k} exceeds the per-item size {count(shape, 1)}")
    top = [1] * max(len(shape), 3)
    top[0], top[1], top[2] = shape[0], 2 if param.out_max_val else 1, param.top_k
    return Inferred((tuple(top),))


def _batch_reindex(layer: Message, bottoms: Sequence[Shape]) -> Inferred:
    _bottoms(layer, bottoms, 2, 2)
    if len(bottoms[1]) != 1:
        raise _fail(layer, "the index bottom must have one axis")
    return Inferred(((bottoms[1][0], *bottoms[0][1:]),))


def _filter(layer: Message, bottoms: Sequence[Shape]) -> Inferred:
    """Filter: the last bottom selects items (axis 0) of the others.  How many is
    known only from its values, so each top is shaped as Caffe's first Reshape
    shapes it: like its bottom, every item kept."""
    _bottoms(layer, bottoms, 2)
    selector = bottoms[-1]
    if len(layer.top) != len(bottoms) - 1:
        raise _fail(layer, f"Filter makes one top per bottom but the selector: {len(bottoms) - 1}, "
                           f"not {len(layer.top)}")
    if not selector or any(dim != 1 for dim in selector[1:]):
        raise _fail(layer, f"the selector (last bottom) must be (N, 1, ...), got {selector}")
    for shape in bottoms[:-1]:
        if not shape or shape[0] != selector[0]:
            raise _fail(layer, f"each bottom must have the selector's {selector[0]} items, got {shape}")
    return Inferred(tuple(bottoms[:-1]))


def _im2col(layer: Message, bottoms: Sequence[Shape]) -> Inferred:
    """Im2col: each window of the convolution's geometry as a column, (channels x
    kernel) values per output position."""
    _bottoms(layer, bottoms, 1, 1)
    param = layer.convolution_param
    shape = bottoms[0]
    axis = _axis(layer, param.axis, len(shape))
    spatial_axes = len(shape) - axis - 1
    if spatial_axes < 1:
        raise _fail(layer, "Im2col needs at least one spatial axis after the channel axis")
    kernel = _spatial(layer, param, "kernel_size", spatial_axes, None, ("kernel_h", "kernel_w"))
    stride = _spatial(layer, param, "stride", spatial_axes, 1, ("stride_h", "stride_w"))
    pad = _spatial(layer, param, "pad", spatial_axes, 0, ("pad_h", "pad_w"))
    dilation = _spatial(layer, param, "dilation", spatial_axes, 1, None)
    if any(k <= 0 for k in kernel) or any(s <= 0 for s in stride):
        raise _fail(layer, "kernel and stride dimensions must be nonzero")
    spatial = [_trunc_div(i + 2 * p - (d * (k - 1) + 1), s) + 1
               for i, k, s, p, d in zip(shape[axis + 1:], kernel, stride, pad, dilation)]
    return Inferred((_checked(layer, (*shape[:axis], shape[axis] * count(kernel), *spatial)),))


def _recurrent(layer: Message, bottoms: Sequence[Shape]) -> Inferred:
    """RNN and LSTM over x (T, N, ...) with the continuation markers cont (T, N):
    top (T, N, num_output), with expose_hidden the last hidden states (1, N,
    num_output) too.  The blobs, in the order of Caffe's unrolled net: LSTM
    W_xc, b_c, [W_xc_static], W_hc (four gates each); RNN W_xh, b_h,
    [W_xh_static], W_hh, W_ho, b_o."""
    param = layer.recurrent_param
    states, static = recurrent_blobs(layer)
    exposed = states if param.expose_hidden else 0
    _bottoms(layer, bottoms, 2 + exposed, 3 + exposed)
    x, cont = bottoms[0], bottoms[1]
    if len(x) < 2:
        raise _fail(layer, f"bottom 0 must be (timesteps, streams, ...), got {x}")
    steps, streams = x[0], x[1]
    if tuple(cont) != (steps, streams):
        raise _fail(layer, f"bottom 1 (cont) must be ({steps}, {streams}), got {cont}")
    hidden = param.num_output
    if hidden <= 0:
        raise _fail(layer, "num_output must be positive")
    if static and (not bottoms[2] or bottoms[2][0] != streams):
        raise _fail(layer, f"the static input (bottom 2) must have {streams} items, got {bottoms[2]}")
    state = (1, streams, hidden)
    for shape in bottoms[2 + int(static):]:
        if tuple(shape) != state:
            raise _fail(layer, f"each initial hidden state must be {state}, got {shape}")
    if len(layer.top) != 1 + exposed:
        raise _fail(layer, f"{layer.type} makes {1 + exposed} tops here, {len(layer.top)} are named")
    gates = 4 * hidden if layer.type == "LSTM" else hidden
    weights = [(gates, count(x, 2)), (gates,)]
    if static:
        weights.append((gates, count(bottoms[2], 1)))
    weights.append((gates, hidden))
    if layer.type == "RNN":
        weights += [(hidden, hidden), (hidden,)]
    return Inferred(((steps, streams, hidden), *(state for _ in range(exposed))), tuple(weights))


# --------------------------------------------------------------------------
# Rules: losses and metrics


def _loss(layer: Message, bottoms: Sequence[Shape]) -> Inferred:
    """A scalar loss; a second top (InfogainLoss) holds the probabilities,
    shaped like bottom 0.
    """
    _bottoms(layer, bottoms, 2)
    return Inferred(((), bottoms[0])[: len(layer.top)])


def _softmax_loss(layer: Message, bottoms: Sequence[Shape]) -> Inferred:
    """SoftmaxWithLoss.  Caffe 1.0 cannot set one up with a second top: its
    inner Softmax inherits the layer's loss weights, so one of two loss-weight
    checks always fails (forks fixed it by clearing them).
    """
    if len(layer.top) > 1:
        raise _fail(
            layer, "Caffe 1.0 cannot set up SoftmaxWithLoss with two tops (its inner Softmax "
            "inherits the loss weights); add a separate Softmax layer for the probabilities"
        )
    return _loss(layer, bottoms)


def _accuracy(layer: Message, bottoms: Sequence[Shape]) -> Inferred:
    """A scalar accuracy, and optionally one per class."""
    _bottoms(layer, bottoms, 2, 2)
    axis = _axis(layer, layer.accuracy_param.axis, len(bottoms[0]))
    return Inferred(((), (bottoms[0][axis],))[: len(layer.top)])


# --------------------------------------------------------------------------
# Rules: layers that make data (no bottoms)


def _input(layer: Message, bottoms: Sequence[Shape]) -> Inferred:
    shapes = layer.input_param.shape
    if len(shapes) not in (1, len(layer.top)):
        raise _fail(layer, "give input_param.shape once, or once per top")
    return Inferred(tuple(tuple(shapes[0 if len(shapes) == 1 else i].dim) for i in range(len(layer.top))))


def _dummy_data(layer: Message, bottoms: Sequence[Shape]) -> Inferred:
    param = layer.dummy_data_param
    tops = len(layer.top)
    legacy = [list(param.num), list(param.channels), list(param.height), list(param.width)]
    if any(legacy):
        if len(param.shape):
            raise _fail(layer, "give shape or the num/channels/height/width fields, not both")
        if any(len(values) not in (1, tops) for values in legacy):
            raise _fail(layer, "give num, channels, height and width once, or once per top")
        pick = lambda values, i: values[0 if len(values) == 1 else i]  # noqa: E731
        return Inferred(tuple(tuple(pick(v, i) for v in legacy) for i in range(tops)))
    if len(param.shape) not in (1, tops):
        raise _fail(layer, "give shape once, or once per top")
    return Inferred(tuple(tuple(param.shape[0 if len(param.shape) == 1 else i].dim) for i in range(tops)))


def _with_label(layer: Message, data: MaybeShape, batch: int) -> Inferred:
    """Data layers: top 0 the data, an optional top 1 the labels (one per item)."""
    return Inferred((data, (batch,))[: len(layer.top)])


def _data(layer: Message, bottoms: Sequence[Shape]) -> Inferred:
    """Data: the item shape lives in the database, so the data top is unknown."""
    return _with_label(layer, None, layer.data_param.batch_size)


def _image_data(layer: Message, bottoms: Sequence[Shape]) -> Inferred:
    """ImageData: known when images are cropped, or resized to new_height x new_width."""
    param = layer.image_data_param
    crop = layer.transform_param.crop_size
    channels = 3 if param.is_color else 1
    if (param.new_height > 0) != (param.new_width > 0):
        raise _fail(layer, "give both new_height and new_width, or neither")
    if crop > 0:
        data: MaybeShape = (param.batch_size, channels, crop, crop)
    elif param.new_height > 0:
        data = (param.batch_size, channels, param.new_height, param.new_width)
    else:
        data = None
    return _with_label(layer, data, param.batch_size)


def _memory_data(layer: Message, bottoms: Sequence[Shape]) -> Inferred:
    param = layer.memory_data_param
    data = (param.batch_size, param.channels, param.height, param.width)
    return _with_label(layer, data, param.batch_size)


def _window_data(layer: Message, bottoms: Sequence[Shape]) -> Inferred:
    """WindowData: the channel count comes from the window file."""
    return _with_label(layer, None, layer.window_data_param.batch_size)


def _unknown_tops(layer: Message, bottoms: Sequence[Shape]) -> Inferred:
    """Python: only the caller can say."""
    return Inferred(tuple(None for _ in layer.top))


def _hdf5_data(layer: Message, bottoms: Sequence[Shape]) -> Inferred:
    """HDF5Data: shapes come from the files, which it does not transform."""
    if layer.HasField("transform_param"):
        raise _fail(layer, "HDF5Data does not transform data: remove transform_param")
    return _unknown_tops(layer, bottoms)


_ELEMENTWISE = (
    "AbsVal", "BNLL", "Clip", "Dropout", "ELU", "Exp", "Log", "MVN", "Power", "ReLU",
    "Sigmoid", "Swish", "TanH", "Threshold",
)
_LOSSES = (
    "ContrastiveLoss", "EuclideanLoss", "HingeLoss", "InfogainLoss",
    "MultinomialLogisticLoss", "SigmoidCrossEntropyLoss", "SoftmaxWithLoss",
)

# Layers whose setup refuses a top that is their bottom.
_NO_IN_PLACE = frozenset({"AbsVal", "Flatten", "Reshape", "Split"})

#: Layer type -> shape rule.
RULES: Dict[str, Rule] = {
    **{name: _like_bottom for name in _ELEMENTWISE},
    **{name: _loss for name in _LOSSES},
    "SoftmaxWithLoss": _softmax_loss,
    "Accuracy": _accuracy,
    "ArgMax": _argmax,
    "BatchNorm": _batch_norm,
    "BatchReindex": _batch_reindex,
    "Bias": _bias,
    "Concat": _concat,
    "Convolution": _convolution,
    "Crop": _crop,
    "Data": _data,
    "Deconvolution": _deconvolution,
    "DummyData": _dummy_data,
    "Eltwise": _eltwise,
    "Embed": _embed,
    "Filter": _filter,
    "Flatten": _flatten,
    "HDF5Data": _hdf5_data,
    "HDF5Output": _silence,
    "ImageData": _image_data,
    "Im2col": _im2col,
    "InnerProduct": _inner_product,
    "Input": _input,
    "LRN": _four_axes,
    "LSTM": _recurrent,
    "MemoryData": _memory_data,
    "Parameter": _parameter,
    "Pooling": _pooling,
    "PReLU": _prelu,
    "Python": _unknown_tops,
    "Reduction": _reduction,
    "Reshape": _reshape,
    "RNN": _recurrent,
    "Scale": _scale,
    "Silence": _silence,
    "Slice": _slice,
    "Softmax": _softmax,
    "SPP": _spp,
    "Split": _split,
    "Tile": _tile,
    "WindowData": _window_data,
}


# --------------------------------------------------------------------------
# The walk


def _net_inputs(net: Message) -> List[Tuple[str, MaybeShape]]:
    """Net-level ``input`` blobs (the pre-Input-layer way of declaring inputs)."""
    names = list(net.input)
    if len(net.input_dim) and len(net.input_shape):
        raise CaffeFtError("give input_shape or input_dim, not both")
    if len(net.input_dim):
        if len(net.input_dim) != 4 * len(names):
            raise CaffeFtError("input_dim needs 4 values per input")
        dims = list(net.input_dim)
        return [(name, tuple(dims[4 * i:4 * i + 4])) for i, name in enumerate(names)]
    if len(net.input_shape) not in (0, len(names)):
        raise CaffeFtError("give one input_shape per input")
    if not len(net.input_shape):
        return [(name, None) for name in names]
    return [(name, tuple(shape.dim)) for name, shape in zip(names, net.input_shape)]


def _check_loss_weights(layer: Message) -> None:
    """``loss_weight`` is unset or given once per top; a loss layer counts as
    giving one (its default weight 1), so a two-top loss must list both.
    """
    is_loss = layer.type in _LOSSES
    weights = len(layer.loss_weight) or int(is_loss)
    # A loss layer given no top gets an anonymous one.
    tops = len(layer.top) or int(is_loss)
    if weights and weights != tops:
        default = "" if len(layer.loss_weight) else " by default"
        raise _fail(
            layer,
            f"loss_weight must be unspecified or given once per top ({tops} tops, {weights} weights{default})",
        )


def _missing_shape(layer_name: str, layer_type: str, top: str) -> CaffeFtError:
    return CaffeFtError(
        f"the shape of top '{top}' comes from outside the net ({layer_type}); "
        f"pass the input shape: --input-shape {top}=N,C,H,W (from Python: input_shapes={{'{top}': (N, C, H, W)}})",
        layer=layer_name or None,
    )


def _resolve(
    layer: Message, inferred: Inferred, given: Mapping[str, Sequence[int]], overridable: bool
) -> Tuple[Shape, ...]:
    """The layer's top shapes: the caller's shape where it may override, else
    the rule's; an unknown top with no shape given is an error.
    """
    if len(inferred.tops) != len(layer.top):
        raise _fail(layer, f"{layer.type} here makes {len(inferred.tops)} tops, but {len(layer.top)} are named")
    tops = []
    for name, shape in zip(layer.top, inferred.tops):
        if overridable and name in given:
            shape = tuple(int(d) for d in given[name])
        if shape is None:
            raise _missing_shape(layer.name, layer.type, name)
        tops.append(shape)
    return tuple(tops)


class ShapeInference:
    """:func:`infer`, one layer at a time: give it the layers Caffe instantiates,
    in order (:meth:`add`), then ask for the result (:meth:`finish`).  A caller
    that holds no whole net (``inspect`` reading a million layers straight from
    the text) builds each layer's message only while it is added."""

    def __init__(self, net: Message, input_shapes: Optional[Mapping[str, Sequence[int]]] = None) -> None:
        self.given = dict(input_shapes or {})
        self.blobs: Dict[str, Shape] = {}
        self.overridable_tops = set()
        for name, shape in _net_inputs(net):
            self.overridable_tops.add(name)
            if name in self.given:
                shape = tuple(int(d) for d in self.given[name])
            if shape is None:
                raise _missing_shape("", "net input", name)
            self.blobs[name] = shape
        self.entries: List[LayerShapes] = []
        self.params: Dict[str, List[Shape]] = {}

    def add(self, layer: Message) -> LayerShapes:
        """Set up ``layer`` on the blobs of the layers added before it."""
        blobs, given = self.blobs, self.given
        rule = RULES.get(layer.type)
        if rule is None:
            raise CaffeFtError(f"cannot infer shapes for layer '{layer.name}' of type '{layer.type}'")
        bottoms = []
        for bottom in layer.bottom:
            if bottom not in blobs:
                raise _fail(layer, f"unknown bottom blob '{bottom}'")
            bottoms.append(blobs[bottom])
        for index, top in enumerate(layer.top):
            in_place = index < len(layer.bottom) and layer.bottom[index] == top
            if (top in blobs or top in layer.top[:index]) and not in_place:
                raise _fail(layer, f"top '{top}' is already produced by an earlier layer")
            if in_place and layer.type in _NO_IN_PLACE:
                raise _fail(layer, f"{layer.type} does not allow in-place computation (top '{top}')")
        overridable = not len(layer.bottom) or layer.type == "Python"
        inferred = rule(layer, bottoms)
        _check_loss_weights(layer)
        tops = _resolve(layer, inferred, given, overridable)
        for what, shape in [*((f"top '{top}'", s) for top, s in zip(layer.top, tops)),
                            *((f"parameter blob {i}", s) for i, s in enumerate(inferred.params))]:
            problem = shape_problem(shape)
            if problem is not None:
                raise _fail(layer, f"{what}: {problem}")
        if overridable:
            self.overridable_tops.update(layer.top)
        blobs.update(zip(layer.top, tops))
        entry = LayerShapes(
            name=layer.name,
            type=layer.type,
            bottom_names=tuple(layer.bottom),
            bottoms=tuple(bottoms),
            top_names=tuple(layer.top),
            tops=tops,
            params=inferred.params,
            param_count=sum(count(shape) for shape in inferred.params),
            flops=inferred.flops,
        )
        self.entries.append(entry)
        if inferred.params:
            self.params[layer.name] = list(inferred.params)
        return entry

    def finish(self) -> NetShapes:
        """The shapes of the layers added; an error if ``input_shapes`` named a
        blob that none of them (nor the net's inputs) may take from outside."""
        stray = sorted(set(self.given) - self.overridable_tops)
        if stray:
            raise CaffeFtError(
                "input_shapes names blobs that no data, Input or Python layer produces: "
                + ", ".join(repr(name) for name in stray)
            )
        return NetShapes(blobs=self.blobs, params=self.params, layers=self.entries)


def infer(
    net: Message,
    phase: Union[str, int] = "TEST",
    input_shapes: Optional[Mapping[str, Sequence[int]]] = None,
    stages: Sequence[str] = (),
    level: int = 0,
) -> NetShapes:
    """Every blob's and every parameter's shape in ``net`` (current format).

    The net state is ``phase``, ``level``, and the net's own ``state.stage``
    plus ``stages``, as pycaffe's ``caffe.Net(path, phase, level=, stages=)``.
    ``input_shapes`` maps top names of data, Input and Python layers (and
    net-level ``input`` blobs) to shapes; a shape given there replaces what
    the layer's parameters say, and is required where they say nothing
    (``Data``, ``HDF5Data``, ``WindowData``, ``Python``...).  Naming any other
    blob there is an error, which catches misspelt names.
    """
    layers = filter_layers(net, phase, level, [*net.state.stage, *stages])
    inference = ShapeInference(net, input_shapes)
    for layer in layers:
        inference.add(layer)
    return inference.finish()
