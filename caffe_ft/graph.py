"""Read-only questions about a (current-format) net: who produces a blob,
which layers learn, where the classifier heads are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from google.protobuf.message import Message

from .errors import CaffeFtError

# Layers whose output is a prediction or a loss: a head feeds one of these.
SINK_TYPES = frozenset({
    "Softmax", "SoftmaxWithLoss", "Accuracy", "SigmoidCrossEntropyLoss", "EuclideanLoss",
    "HingeLoss", "MultinomialLogisticLoss", "InfogainLoss", "ArgMax",
})
# Learnable layers that can be a classifier head (their num_output is the class count).
HEAD_TYPES = frozenset({"InnerProduct", "Convolution", "Deconvolution"})
DATA_TYPES = frozenset({
    "Data", "ImageData", "HDF5Data", "MemoryData", "DummyData", "WindowData", "Input", "Python",
    "AnnotatedData", "VideoData",
})


def _has_bias(layer: Message, param_field: str, default: bool) -> bool:
    if not layer.HasField(param_field):
        return default
    params = getattr(layer, param_field)
    return params.bias_term if params.HasField("bias_term") else default


def param_blob_count(layer: Message) -> int:
    """How many parameter blobs Caffe gives ``layer`` (0 for parameter-free layers)."""
    kind = layer.type
    if kind in ("Convolution", "Deconvolution"):
        return 1 + _has_bias(layer, "convolution_param", True)
    if kind == "InnerProduct":
        return 1 + _has_bias(layer, "inner_product_param", True)
    if kind == "Embed":
        return 1 + _has_bias(layer, "embed_param", True)
    if kind == "Scale":
        return (len(layer.bottom) == 1) + _has_bias(layer, "scale_param", False)
    if kind == "Bias":
        return int(len(layer.bottom) == 1)
    if kind == "PReLU":
        return 1
    if kind == "BatchNorm":
        return 3
    if kind == "LSTM":
        return 3
    if kind == "RNN":
        return 5
    return 0


def lr_mults(layer: Message) -> List[float]:
    """The learning-rate multiplier of each parameter blob (a missing entry means 1)."""
    count = param_blob_count(layer)
    if layer.type == "BatchNorm":
        return [0.0] * count  # Caffe masks BN statistics from the solver
    mults = []
    for i in range(count):
        spec = layer.param[i] if i < len(layer.param) else None
        mults.append(spec.lr_mult if spec is not None else 1.0)
    return mults


def is_learnable(layer: Message) -> bool:
    """Whether the solver changes any of ``layer``'s parameters."""
    return any(mult != 0 for mult in lr_mults(layer))


def producers(layers: Sequence[Message]) -> List[List[Optional[int]]]:
    """For each layer and each of its bottoms, the index of the layer producing it.

    Caffe resolves a bottom to the latest earlier layer with that top, which is
    how in-place layers (``bottom: "x" top: "x"``) chain.
    """
    latest: Dict[str, int] = {}
    result = []
    for index, layer in enumerate(layers):
        result.append([latest.get(bottom) for bottom in layer.bottom])
        for top in layer.top:
            latest[top] = index
    return result


@dataclass(frozen=True)
class HeadSearch:
    """The outcome of looking for classifier heads."""

    heads: Tuple[str, ...]  # layer names, in net order
    blocked: Tuple[str, ...]  # learnable non-head layers met first (e.g. a Scale)


def find_heads(net: Message) -> HeadSearch:
    """The classifier heads: the last learnable layers whose output reaches a
    loss, Softmax or Accuracy layer through parameter-free layers only.
    """
    layers = list(net.layer)
    sources = producers(layers)
    heads: set = set()
    blocked: set = set()
    seen: set = set()
    stack = [i for i, layer in enumerate(layers) if layer.type in SINK_TYPES]
    for start in list(stack):
        seen.add(start)
    while stack:
        index = stack.pop()
        for source in sources[index]:
            if source is None or source in seen:
                continue
            seen.add(source)
            layer = layers[source]
            if layer.type in DATA_TYPES:
                continue
            if param_blob_count(layer):
                (heads if layer.type in HEAD_TYPES else blocked).add(source)
            elif layer.type not in SINK_TYPES:
                stack.append(source)
    order = lambda indices: tuple(layers[i].name for i in sorted(indices))  # noqa: E731
    return HeadSearch(order(heads), order(blocked))


def layer_index(net: Message, name: str) -> int:
    """Index of the layer called ``name``; an error lists close names."""
    for index, layer in enumerate(net.layer):
        if layer.name == name:
            return index
    import difflib

    close = difflib.get_close_matches(name, [layer.name for layer in net.layer], n=3)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    raise CaffeFtError(f"no layer named '{name}'{hint}")
