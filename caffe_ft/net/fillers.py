"""Caffe 1.0's weight fillers, in numpy.

A ``FillerParameter`` names how Caffe initialises a parameter blob
(``include/caffe/filler.hpp``): ``constant``, ``gaussian`` (optionally
sparse), ``uniform``, ``xavier``, ``msra``, ``bilinear`` and
``positive_unitball``.  :func:`fill` makes a float32 array with the same
distribution, the same scale (fan-in and fan-out worked out from the blob
shape exactly as Caffe's legacy ``num``/``channels`` accessors do) and, for
``constant`` and ``bilinear``, the same values.  Random values cannot be
Caffe's own: Caffe draws from boost's generators seeded by the solver, so
only the distribution matches; with the same ``np.random.Generator`` seed the
result is reproducible.

Caffe fills every learnable layer when it builds a net, before any weights
are copied in, so a filler Caffe rejects (an unknown type, a zero ``std``, a
``sparse`` it does not support...) stops training even for a layer whose
weights would be copied.  :func:`filler_problem` says what Caffe would fail
on; :func:`fill` raises it as a :class:`CaffeFtError`.

:func:`layer_fillers` gives the fillers each layer type applies to its
blobs, with the defaults Caffe's layers use when the prototxt gives none.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from google.protobuf.message import Message

from ..errors import CaffeFtError
from .graph import recurrent_blobs

Shape = Tuple[int, ...]

# FillerParameter.VarianceNorm values.
FAN_IN, FAN_OUT, AVERAGE = 0, 1, 2
_NO_SPARSE = -1


# ------------------------------------------------------------------ shapes --


def legacy_dim(shape: Sequence[int], index: int) -> int:
    """Caffe's ``Blob::LegacyShape(index)``: an axis, or 1 past the blob's axes.

    ``num`` is index 0 and ``channels`` index 1; negative indices count from
    the end.  Caffe refuses these accessors on blobs with more than 4 axes.
    """
    if len(shape) > 4:
        raise ValueError(f"Caffe's legacy num/channels accessors refuse a {len(shape)}-axis blob {tuple(shape)}")
    if index >= len(shape) or index < -len(shape):
        return 1
    return int(shape[index])


def fans(shape: Sequence[int]) -> Tuple[int, int]:
    """(fan_in, fan_out) as Caffe's xavier and msra fillers compute them.

    fan_in = count / num and fan_out = count / channels, in integer
    arithmetic: (out, in, kh, kw) -> (in*kh*kw, out*kh*kw); an InnerProduct
    weight (out, in) -> (in, out); a bias (n,) -> (1, n).
    """
    count = math.prod(shape)
    return count // legacy_dim(shape, 0), count // legacy_dim(shape, 1)


def _variance_n(param: Message, shape: Sequence[int]) -> float:
    """The ``n`` of xavier and msra: fan_in, fan_out or their mean, per variance_norm."""
    fan_in, fan_out = fans(shape)
    if param.variance_norm == AVERAGE:
        return (fan_in + fan_out) / 2.0
    if param.variance_norm == FAN_OUT:
        return float(fan_out)
    return float(fan_in)


# ----------------------------------------------------------------- checks --
# Each returns what Caffe would abort with for this filler on this shape, or None.


def _needs_values(param: Message, shape: Shape) -> Optional[str]:
    return None if math.prod(shape) else f"cannot fill the empty blob {shape} (Caffe: CHECK(count) fails)"


def _not_sparse(param: Message, shape: Shape) -> Optional[str]:
    if param.sparse != _NO_SPARSE:
        return f"'{param.type}' filler does not support sparse (got sparse: {param.sparse}; only gaussian does)"
    return None


def _check_constant(param: Message, shape: Shape) -> Optional[str]:
    return _needs_values(param, shape) or _not_sparse(param, shape)


def _check_uniform(param: Message, shape: Shape) -> Optional[str]:
    if param.min > param.max:
        return f"uniform filler needs min <= max (got min {param.min:g}, max {param.max:g})"
    return _check_constant(param, shape)


def _check_gaussian(param: Message, shape: Shape) -> Optional[str]:
    if not param.std > 0:
        return f"gaussian filler needs std > 0 (got {param.std:g})"
    if param.sparse < _NO_SPARSE:
        return f"gaussian filler needs sparse >= -1 (got {param.sparse})"
    problem = _needs_values(param, shape)
    if problem or param.sparse == _NO_SPARSE:
        return problem
    if not shape:
        return "a sparse gaussian filler needs a blob with at least one axis"
    if param.sparse > shape[0]:
        return (
            f"sparse {param.sparse} exceeds the blob's {shape[0]} outputs (axis 0): the non-zero "
            f"probability sparse / outputs must be at most 1"
        )
    return None


def _check_legacy(param: Message, shape: Shape) -> Optional[str]:
    """Xavier and msra: legacy accessors (at most 4 axes), no sparse."""
    if len(shape) > 4:
        return f"'{param.type}' filler cannot fill the {len(shape)}-axis blob {shape} (Caffe allows at most 4 axes)"
    return _check_constant(param, shape)


def _check_unitball(param: Message, shape: Shape) -> Optional[str]:
    problem = _check_legacy(param, shape)
    if problem is None and math.prod(shape) // legacy_dim(shape, 0) == 0:
        return f"positive_unitball filler cannot fill {shape}: no values per row"
    return problem


def _check_bilinear(param: Message, shape: Shape) -> Optional[str]:
    if len(shape) != 4:
        return f"bilinear filler needs a 4-axis blob, got {shape}"
    if shape[2] != shape[3]:
        return f"bilinear filler needs a square kernel, got {shape[2]}x{shape[3]}"
    return _not_sparse(param, shape)


# ---------------------------------------------------------------- makers --


def _constant(param: Message, shape: Shape, rng: np.random.Generator) -> np.ndarray:
    return np.full(shape, param.value, dtype=np.float32)


def _uniform_in(shape: Shape, low: float, high: float, rng: np.random.Generator) -> np.ndarray:
    """U[low, high) as float32, scaled in place (no float64 temporary)."""
    values = rng.random(shape, dtype=np.float32)
    values *= np.float32(high) - np.float32(low)
    values += np.float32(low)
    return values


def _normal(shape: Shape, mean: float, std: float, rng: np.random.Generator) -> np.ndarray:
    values = rng.standard_normal(shape, dtype=np.float32)
    values *= np.float32(std)
    values += np.float32(mean)
    return values


def _uniform(param: Message, shape: Shape, rng: np.random.Generator) -> np.ndarray:
    return _uniform_in(shape, param.min, param.max, rng)


def _gaussian(param: Message, shape: Shape, rng: np.random.Generator) -> np.ndarray:
    """N(mean, std); with ``sparse`` = k >= 0 each value is kept with probability k / shape[0]."""
    values = _normal(shape, param.mean, param.std, rng)
    if param.sparse >= 0:
        keep = np.float32(param.sparse) / np.float32(shape[0])
        values *= rng.random(shape, dtype=np.float32) < keep
    return values


def _xavier(param: Message, shape: Shape, rng: np.random.Generator) -> np.ndarray:
    """U(-a, a) with a = sqrt(3 / n)."""
    scale = float(np.sqrt(np.float32(3) / np.float32(_variance_n(param, shape))))
    return _uniform_in(shape, -scale, scale, rng)


def _msra(param: Message, shape: Shape, rng: np.random.Generator) -> np.ndarray:
    """N(0, 2 / n)."""
    std = float(np.sqrt(np.float32(2) / np.float32(_variance_n(param, shape))))
    return _normal(shape, 0.0, std, rng)


def _positive_unitball(param: Message, shape: Shape, rng: np.random.Generator) -> np.ndarray:
    """U[0, 1) values, each of the ``num`` rows scaled to sum to 1."""
    values = rng.random(shape, dtype=np.float32)
    rows = values.reshape(legacy_dim(shape, 0), -1)
    rows /= rows.sum(axis=1, dtype=np.float32, keepdims=True)
    return values


def _bilinear(param: Message, shape: Shape, rng: np.random.Generator) -> np.ndarray:
    """Caffe's bilinear upsampling kernel, the same for every (num, channel) pair.

    With f = ceil(K / 2) and c = (2f - 1 - f % 2) / 2f, entry (y, x) is
    (1 - |x/f - c|) (1 - |y/f - c|), computed in float32 as Caffe does.
    """
    size = shape[3]
    f = math.ceil(size / 2.0)
    c = np.float32((2 * f - 1 - f % 2) / (2.0 * f))
    ramp = np.float32(1) - np.abs(np.arange(size, dtype=np.float32) / np.float32(f) - c)
    kernel = ramp[:, None] * ramp[None, :]
    return np.ascontiguousarray(np.broadcast_to(kernel, shape), dtype=np.float32)


# The generator's type named, not looked up: numpy >= 2 imports numpy.random on first
# use (~10 ms), and ``init`` of a net whose layers are all copied never draws a value.
Maker = Callable[[Message, Shape, "np.random.Generator"], np.ndarray]
Check = Callable[[Message, Shape], Optional[str]]

#: Filler type -> (what Caffe refuses, how to make the values).
FILLERS: Dict[str, Tuple[Check, Maker]] = {
    "constant": (_check_constant, _constant),
    "gaussian": (_check_gaussian, _gaussian),
    "positive_unitball": (_check_unitball, _positive_unitball),
    "uniform": (_check_uniform, _uniform),
    "xavier": (_check_legacy, _xavier),
    "msra": (_check_legacy, _msra),
    "bilinear": (_check_bilinear, _bilinear),
}


# ----------------------------------------------------------------- public --


def filler_problem(param: Message, shape: Sequence[int]) -> Optional[str]:
    """Why Caffe would abort filling a blob of ``shape`` with ``param``, or None."""
    entry = FILLERS.get(param.type)
    if entry is None:
        known = ", ".join(sorted(FILLERS))
        return f"unknown filler type '{param.type}' (Caffe knows {known})"
    return entry[0](param, tuple(int(d) for d in shape))


def fill(
    param: Message, shape: Sequence[int], rng: np.random.Generator, layer: Optional[str] = None
) -> np.ndarray:
    """A float32 array of ``shape`` filled as Caffe's filler ``param`` would fill it.

    ``param`` is a ``FillerParameter``; ``layer`` names the layer in errors.
    Raises :class:`CaffeFtError` where Caffe would abort.
    """
    dims = tuple(int(d) for d in shape)
    problem = filler_problem(param, dims)
    if problem is not None:
        raise CaffeFtError(problem, layer=layer)
    return FILLERS[param.type][1](param, dims, rng)


def _new_filler(like: Message, kind: str, value: float) -> Message:
    """A FillerParameter of ``like``'s schema: ``kind`` with ``value``."""
    param = type(like)()
    param.type = kind
    param.value = value
    return param


def _given_or_constant(param: Message, field: str, value: float) -> Message:
    """``param.<field>`` when the prototxt sets it, else constant ``value`` (Scale, PReLU)."""
    given = getattr(param, field)
    return given if param.HasField(field) else _new_filler(given, "constant", value)


def _weight_and_bias(param: Message) -> List[Message]:
    """Convolution, Deconvolution, InnerProduct, Embed: weight_filler, then bias_filler if bias_term."""
    return [param.weight_filler, param.bias_filler] if param.bias_term else [param.weight_filler]


def layer_fillers(layer: Message) -> List[Message]:
    """The filler Caffe's ``LayerSetUp`` applies to each of ``layer``'s parameter blobs.

    Unset ``weight_filler``/``bias_filler``/``filler`` fields read as
    FillerParameter's defaults (constant 0), as in Caffe, except where the
    layer has its own default: Scale's factor is constant 1, PReLU's slope
    constant 0.25.  BatchNorm and Parameter blobs start at zero.  RNN and
    LSTM fill their unrolled net's blobs from recurrent_param's fillers.  A layer
    without parameters gives ``[]``; so does a type Caffe-ft does not know
    the fillers of.
    """
    kind = layer.type
    if kind in ("Convolution", "Deconvolution"):
        return _weight_and_bias(layer.convolution_param)
    if kind == "InnerProduct":
        return _weight_and_bias(layer.inner_product_param)
    if kind == "Embed":
        return _weight_and_bias(layer.embed_param)
    if kind == "Scale":
        param = layer.scale_param
        factor = [_given_or_constant(param, "filler", 1.0)] if len(layer.bottom) == 1 else []
        return factor + ([param.bias_filler] if param.bias_term else [])
    if kind == "Bias":
        return [layer.bias_param.filler] if len(layer.bottom) == 1 else []
    if kind == "PReLU":
        return [_given_or_constant(layer.prelu_param, "filler", 0.25)]
    if kind in ("RNN", "LSTM"):
        # The unrolled net's InnerProducts: x (weight, bias), the static input, the hidden state;
        # an RNN's output projection (weight, bias) last.
        param = layer.recurrent_param
        _, static = recurrent_blobs(layer)
        weight, bias = param.weight_filler, param.bias_filler
        return [weight, bias, *([weight] if static else []), weight, *([weight, bias] if kind == "RNN" else [])]
    # Reading an unset sub-message leaves it unset; here it only lends its class.
    zero = _new_filler(layer.prelu_param.filler, "constant", 0.0)
    if kind == "BatchNorm":
        return [zero, zero, zero]
    if kind == "Parameter":
        return [zero]
    return []


def describe(param: Message) -> str:
    """A short human form of a filler: ``xavier``, ``constant 0.25``, ``gaussian std 0.01``."""
    kind = param.type
    if kind == "constant":
        return f"constant {param.value:g}"
    if kind == "gaussian":
        text = f"gaussian mean {param.mean:g} std {param.std:g}" if param.mean else f"gaussian std {param.std:g}"
        return text + (f" sparse {param.sparse}" if param.sparse >= 0 else "")
    if kind == "uniform":
        return f"uniform [{param.min:g}, {param.max:g}]"
    if kind in ("xavier", "msra") and param.variance_norm != FAN_IN:
        return f"{kind} {'FAN_OUT' if param.variance_norm == FAN_OUT else 'AVERAGE'}"
    return kind


def fill_layer(layer: Message, shapes: Sequence[Sequence[int]], rng: np.random.Generator) -> List[np.ndarray]:
    """Fresh values for each of ``layer``'s parameter blobs (``shapes`` in Caffe's blob order)."""
    fillers = layer_fillers(layer)
    if len(fillers) != len(shapes):
        raise CaffeFtError(
            f"caffe-ft does not know how Caffe fills the {len(shapes)} blobs of a {layer.type} layer",
            layer=layer.name,
        )
    return [fill(param, shape, rng, layer.name) for param, shape in zip(fillers, shapes)]
