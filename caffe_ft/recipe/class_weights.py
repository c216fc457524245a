"""``--class-weights auto|FILE``: weight the loss per class, as Caffe can train it.

Caffe has no class weights in SoftmaxWithLoss; its InfogainLoss multiplies
the log-probability of each label by a row of a matrix H read from a
``.binaryproto``.  With H diagonal, ``H[k][k] = w_k``, the loss of an example
of class k is ``-w_k log p_k``: a weighted softmax loss.  The Caffe this
project runs (1.0 with BVLC/caffe#3855) computes the softmax inside
InfogainLoss, so the SoftmaxWithLoss layers of the new heads simply become
InfogainLoss layers (an extra Softmax before it would apply the softmax
twice); the deploy net does not change.

``auto`` weights are "balanced" (scikit-learn's rule): ``w_k = N / (K n_k)``
for ``n_k`` training examples of class k among N, so every class contributes
as much to the loss as it would in a balanced set; a FILE gives one weight
per line, in label order (``#`` starts a comment).
"""

from __future__ import annotations

import math
from typing import List, Sequence, Set

import numpy as np
from google.protobuf.message import Message

from ..errors import CaffeFtError
from ..formats.caffemodel import Blob

#: The H matrix's file, beside the nets in OUTDIR (InfogainLoss names it from there).
H_FILE = "class_weights.binaryproto"


def label_counts(labels: Sequence[int], num_classes: int) -> List[int]:
    """How many training examples each class 0..K-1 has."""
    counts = [0] * num_classes
    for label in labels:
        if 0 <= label < num_classes:
            counts[label] += 1
    return counts


def balanced(counts: Sequence[int]) -> List[float]:
    """``N / (K n_k)``: each class weighs as much in the loss as in a balanced set (0 for an absent class)."""
    total, classes = sum(counts), len(counts)
    return [total / (classes * count) if count else 0.0 for count in counts]


def read_weights(path: str, num_classes: int) -> List[float]:
    """One non-negative weight per line, in label order; there must be one per class."""
    weights: List[float] = []
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        raise CaffeFtError(f"cannot read the class weights: {exc.strerror}", path) from None
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            value = float(text)
        except ValueError:
            raise CaffeFtError(f"{path}:{number}: '{text}' is not a number (one class weight per line)") from None
        if not math.isfinite(value) or value < 0:
            raise CaffeFtError(f"{path}:{number}: a class weight must be finite and not negative, not {text}")
        weights.append(value)
    if len(weights) != num_classes:
        raise CaffeFtError(f"{len(weights)} class weight(s) for {num_classes} classes (one per line, label order)",
                           path)
    if not any(weights):
        raise CaffeFtError("every class weight is 0: nothing would be learnt", path)
    return weights


def h_matrix(weights: Sequence[float]) -> Blob:
    """InfogainLoss's H: ``weights`` on the diagonal, shape 1 x 1 x K x K as Caffe checks it."""
    size = len(weights)
    return Blob.of(np.diag(np.asarray(weights, dtype=np.float32)).reshape(1, 1, size, size))


def use_infogain(net: Message, heads: Set[str], source: str = H_FILE) -> List[str]:
    """Turn the SoftmaxWithLoss layers reading the ``heads`` layers' outputs into
    InfogainLoss layers reading H from ``source``; returns their names."""
    tops = {top for layer in net.layer if layer.name in heads for top in layer.top}
    changed = []
    for layer in net.layer:
        if layer.type == "SoftmaxWithLoss" and len(layer.bottom) and layer.bottom[0] in tops:
            layer.type = "InfogainLoss"
            axis = layer.softmax_param.axis if layer.HasField("softmax_param") else None
            layer.ClearField("softmax_param")
            layer.infogain_loss_param.source = source
            if axis is not None and axis != 1:
                layer.infogain_loss_param.axis = axis
            changed.append(layer.name)
    if not changed:
        raise CaffeFtError("--class-weights: no SoftmaxWithLoss layer reads the new head(s) "
                           f"({', '.join(sorted(heads))}); there is no loss to weight")
    return changed


def describe(counts: Sequence[int], weights: Sequence[float], how: str) -> str:
    """The summary line: each class's count and weight."""
    classes = ", ".join(f"{label}: {count} -> {weight:.4g}" for label, (count, weight) in enumerate(zip(counts,
                                                                                                      weights)))
    return f"class weights ({how}; class: training examples -> weight): {classes}"
