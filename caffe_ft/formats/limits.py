"""Caffe's limits on blobs, checked wherever a shape comes from a file.

``Blob::Reshape`` aborts on more than ``kMaxBlobAxes`` axes, on a negative
dimension and on a blob of more than INT_MAX values; caffe-ft says so in one
line instead, both for blobs stored in files and for shapes inferred from a
net.  (No numpy here: ``import caffe_ft.cli`` stays light.)
"""

from __future__ import annotations

from typing import Optional, Sequence

INT_MAX = 2**31 - 1
MAX_AXES = 32  # Caffe's kMaxBlobAxes


def shape_problem(shape: Sequence[int]) -> Optional[str]:
    """What Caffe's ``Blob::Reshape`` aborts with for ``shape``, or None: more
    than 32 axes (kMaxBlobAxes), a negative dimension, or more than INT_MAX
    values (checked axis by axis as Caffe does)."""
    shape = tuple(shape)
    if len(shape) > MAX_AXES:
        return f"the shape has {len(shape)} axes; Caffe allows at most {MAX_AXES}"
    total = 1
    for dim in shape:
        if dim < 0:
            return f"the shape {shape} has a negative dimension"
        if dim > INT_MAX or (total and dim > INT_MAX // total):
            return f"the shape {shape} holds more than INT_MAX values (Caffe: blob size exceeds INT_MAX)"
        total *= dim
    return None
