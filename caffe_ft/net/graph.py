"""Read-only questions about a (current-format) net: who produces a blob,
which layers learn, where the classifier heads are, which layers share
parameters.

Layers are addressed by their index in ``net.layer``; functions that walk the
graph take the layer list (``list(net.layer)``) so that callers computing
several answers build it once.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Optional, Sequence, Set, Tuple

from google.protobuf.message import Message

from ..errors import CaffeFtError

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


def recurrent_blobs(layer: Message) -> Tuple[int, bool]:
    """RNN/LSTM: how many hidden-state blobs it carries (1 or 2: h, and c for an
    LSTM), and whether it takes a static input (a bottom beyond x, cont and the
    exposed hidden states), as RecurrentLayer::LayerSetUp decides."""
    states = 2 if layer.type == "LSTM" else 1
    exposed = states if layer.recurrent_param.expose_hidden else 0
    return states, len(layer.bottom) > 2 + exposed


# How many parameter blobs Caffe gives a layer, by type; other types have none.
_BLOB_COUNTS: Dict[str, Callable[[Message], int]] = {
    "Convolution": lambda layer: 1 + _has_bias(layer, "convolution_param", True),
    "Deconvolution": lambda layer: 1 + _has_bias(layer, "convolution_param", True),
    "InnerProduct": lambda layer: 1 + _has_bias(layer, "inner_product_param", True),
    "Embed": lambda layer: 1 + _has_bias(layer, "embed_param", True),
    "Scale": lambda layer: (len(layer.bottom) == 1) + _has_bias(layer, "scale_param", False),
    "Bias": lambda layer: int(len(layer.bottom) == 1),
    "PReLU": lambda layer: 1,
    "Parameter": lambda layer: 1,
    "BatchNorm": lambda layer: 3,
    "LSTM": lambda layer: 3 + recurrent_blobs(layer)[1],  # a static input has its own weights
    "RNN": lambda layer: 5 + recurrent_blobs(layer)[1],
}
# The layer types that may have parameters: no other type needs a closer look.
PARAM_TYPES = frozenset(_BLOB_COUNTS)


def param_blob_count(layer: Message) -> int:
    """How many parameter blobs Caffe gives ``layer`` (0 for parameter-free layers)."""
    count = _BLOB_COUNTS.get(layer.type)
    return count(layer) if count is not None else 0


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
    return find_heads_in(list(net.layer), param_blob_count)


def find_heads_in(layers: Sequence[Any], blob_count: Callable[[Any], int]) -> HeadSearch:
    """:func:`find_heads` on ``layers``: anything with a layer's ``name``,
    ``type``, ``bottom`` and ``top``, whose parameter blobs ``blob_count`` counts."""
    types = list(map(attrgetter("type"), layers))
    if SINK_TYPES.isdisjoint(types):  # no loss, Softmax or Accuracy: no head (the common pass runs in C)
        return HeadSearch((), ())
    stack = [i for i, kind in enumerate(types) if kind in SINK_TYPES]
    sources = producers(layers)
    heads: set = set()
    blocked: set = set()
    seen: set = set()
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
            if blob_count(layer):
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


def bias_blobs(layer: Message) -> FrozenSet[int]:
    """Indices of ``layer``'s bias blobs (by Caffe convention they train at
    twice the rate, without weight decay)."""
    count = param_blob_count(layer)
    if layer.type in ("Convolution", "Deconvolution", "InnerProduct", "Embed"):
        return frozenset({1}) if count == 2 else frozenset()
    if layer.type == "Scale":
        has_bias = layer.HasField("scale_param") and layer.scale_param.bias_term
        return frozenset({count - 1}) if has_bias else frozenset()
    if layer.type == "Bias":
        return frozenset(range(count))
    return frozenset()


def has_parameters(layer: Message) -> bool:
    """Whether ``layer`` has parameter blobs that the solver may train.

    BatchNorm is excluded: its blobs are running statistics, which Caffe never
    lets the solver touch, so fine-tuning counts and freezes it differently.
    This is the meaning of "learnable layer" used by the strategies (it does
    not look at ``lr_mult``, so a frozen layer still counts).
    """
    return layer.type != "BatchNorm" and param_blob_count(layer) > 0


def consumers(layers: Sequence[Message]) -> List[List[int]]:
    """For each layer, the indices of the later layers reading one of its tops
    (resolved as :func:`producers` does, so an in-place layer takes over)."""
    result: List[List[int]] = [[] for _ in layers]
    for index, sources in enumerate(producers(layers)):
        for source in sources:
            if source is not None and index not in result[source]:
                result[source].append(index)
    return result


def downstream(layers: Sequence[Message], starts: Iterable[int]) -> Set[int]:
    """``starts`` and every layer that reads, directly or not, one of their outputs."""
    readers = consumers(layers)
    found = set(starts)
    stack = list(found)
    while stack:
        for reader in readers[stack.pop()]:
            if reader not in found:
                found.add(reader)
                stack.append(reader)
    return found


def head_outputs(layers: Sequence[Message], head: int) -> Tuple[List[int], str]:
    """Where a head's scores go: the sink layers (loss, Softmax, Accuracy, ArgMax)
    reached from layer ``head`` through parameter-free layers only (ReLU, global
    pooling, Flatten, Dropout: SqueezeNet's conv10 -> ReLU -> AVE pool -> loss),
    and the blob that carries the scores: the one those sinks read, else the end
    of the parameter-free chain after the head (its own top when none follows)."""
    readers = consumers(layers)
    sinks: List[int] = []
    seen = {head}
    stack = [head]
    while stack:
        for reader in readers[stack.pop()]:
            if reader in seen:
                continue
            seen.add(reader)
            layer = layers[reader]
            if layer.type in SINK_TYPES:
                sinks.append(reader)
            elif not param_blob_count(layer) and layer.type not in DATA_TYPES:
                stack.append(reader)
    sinks.sort()
    scored = [layers[i].bottom[0] for i in sinks if layers[i].bottom and layers[i].type != "Accuracy"]
    if scored or sinks:
        return sinks, (scored or [layers[sinks[0]].bottom[0]])[0]
    blob, index = layers[head].top[0], head
    while True:
        chain = [reader for reader in readers[index] if not param_blob_count(layers[reader])
                 and layers[reader].type not in DATA_TYPES and blob in layers[reader].bottom]
        if len(chain) != 1 or len(readers[index]) != 1 or not layers[chain[0]].top:
            return [], blob
        index = chain[0]
        blob = layers[index].top[0]


def upstream(layers: Sequence[Message], starts: Iterable[int]) -> Set[int]:
    """``starts`` and every layer whose output they read, directly or not."""
    sources = producers(layers)
    found = set(starts)
    stack = list(found)
    while stack:
        for source in sources[stack.pop()]:
            if source is not None and source not in found:
                found.add(source)
                stack.append(source)
    return found


def exclusive_branch(layers: Sequence[Message], seed: Iterable[int]) -> Set[int]:
    """``seed`` grown backwards by every layer that only feeds it.

    A layer joins when all the layers reading its outputs are already in the
    set, so removing the result leaves no dangling layer behind and cuts no
    other path.  Data layers never join (the label also feeds other losses).
    """
    readers = consumers(layers)
    found = set(seed)
    for index in range(max(found, default=-1), -1, -1):  # readers come after producers
        if index in found or layers[index].type in DATA_TYPES:
            continue
        if readers[index] and all(reader in found for reader in readers[index]):
            found.add(index)
    return found


def sharing_groups(layers: Sequence[Message]) -> List[Set[int]]:
    """Sets of layers tied together by shared parameters (``param { name: ... }``).

    Only groups of two or more layers are returned; layers sharing with a
    layer that shares with a third are one group.
    """
    owners: Dict[str, int] = {}
    parent = list(range(len(layers)))

    def root(index: int) -> int:
        while parent[index] != index:
            parent[index] = parent[parent[index]]
            index = parent[index]
        return index

    for index, layer in enumerate(layers):
        for spec in layer.param:
            if not spec.name:
                continue
            if spec.name in owners:
                parent[root(index)] = root(owners[spec.name])
            else:
                owners[spec.name] = index
    groups: Dict[int, Set[int]] = {}
    for index in range(len(layers)):
        groups.setdefault(root(index), set()).add(index)
    return [group for group in groups.values() if len(group) > 1]


def loss_weight(layer: Message) -> float:
    """The weight of ``layer``'s (first) output in the training loss: its
    ``loss_weight`` when given, else 1 for ``*Loss`` layers and 0 otherwise."""
    if len(layer.loss_weight):
        return layer.loss_weight[0]
    return 1.0 if layer.type.endswith("Loss") else 0.0


def head_candidates(net: Message, count: int = 4) -> Tuple[str, ...]:
    """Names of the last ``count`` layers with parameters (for error messages)."""
    named = [f"{layer.name} ({layer.type})" for layer in net.layer if has_parameters(layer)]
    return tuple(named[-count:])
