"""Number formatting exactly as protobuf's C++ text printer does it.

Caffe's tools print floats with ``SimpleFtoa``/``SimpleDtoa``: ``%g`` with the
type's guaranteed digits (6 for float, 15 for double), widened to 9 or 17
digits only when the short form would not read back as the same value.  So a
learning-rate multiplier prints as ``1``, not ``1.0``, and ``0.1`` stays ``0.1``.
"""

from __future__ import annotations

import math
import struct

_FLOAT = struct.Struct("<f")


def to_float32(value: float) -> float:
    """Round ``value`` to the nearest IEEE single, returned as a Python float."""
    try:
        return _FLOAT.unpack(_FLOAT.pack(value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def _special(value: float) -> str | None:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return None


def format_float(value: float) -> str:
    """Format a ``float`` (single precision) field value like ``SimpleFtoa``."""
    special = _special(value)
    if special is not None:
        return special
    value = to_float32(value)
    text = "%.6g" % value
    if to_float32(float(text)) != value:
        text = "%.9g" % value
    return text


def format_double(value: float) -> str:
    """Format a ``double`` field value like ``SimpleDtoa``."""
    special = _special(value)
    if special is not None:
        return special
    text = "%.15g" % value
    if float(text) != value:
        text = "%.17g" % value
    return text
