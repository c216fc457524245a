"""The frozen trunk of a net: the layers that compute one feature blob, as a deploy net.

:func:`feature_source` finds the blob (by default the classifier head's
input); :func:`cut_net` keeps only the TEST-phase layers that compute it,
behind an ``Input`` where the data layer was.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

from google.protobuf.message import Message

from ..errors import CaffeFtError
from ..formats.files import sha256_text
from ..formats.schema import Schema
from ..net import graph
from ..net.shapes import filter_layers


@dataclass(frozen=True)
class Trunk:
    """A deploy net computing ``feature_blob`` from ``input_blob`` and nothing more."""

    net: Message
    input_blob: str
    feature_blob: str
    layer: str  # the layer whose output the features are (the last one writing the blob)

    def text(self) -> str:
        from ..formats.prototext import print_message

        return print_message(self.net)

    def with_batch(self, batch: int) -> "Trunk":
        net = type(self.net)()
        net.CopyFrom(self.net)
        net.layer[0].input_param.shape[0].dim[0] = batch
        return replace(self, net=net)

    def fingerprint(self) -> str:
        """Digest of the layers and the input's C x H x W (not the batch size)."""
        return sha256_text(self.with_batch(1).text())


def net_at_test(net: Message) -> Message:
    """A copy of ``net`` holding only the layers Caffe builds in the TEST phase."""
    copy = type(net)()
    copy.CopyFrom(net)
    del copy.layer[:]
    copy.layer.extend(filter_layers(net, "TEST", net.state.level, list(net.state.stage)))
    return copy


def _chain_end(layers: Sequence[Message], index: int, blob: str) -> int:
    """The last of the in-place layers (ReLU, BatchNorm, Dropout...) rewriting
    ``blob`` right after layer ``index``: its value is what readers see."""
    end = index
    for later in range(index + 1, len(layers)):
        if blob in layers[later].top:
            if blob not in layers[later].bottom:
                break
            end = later
    return end


def feature_source(net: Message, layer: Optional[str] = None) -> int:
    """Index (in ``net.layer``) of the layer whose output is the feature.

    ``layer`` names a layer (its first top, after the in-place layers that
    follow it, as Caffe's extract_features sees the blob) or a blob (its final
    value); by default, the blob the classifier head reads.
    """
    layers = list(net.layer)
    if layer is None:
        heads = graph.find_heads(net).heads
        if not heads:
            raise CaffeFtError("no classifier head found to take the features before; pass --layer")
        head = graph.layer_index(net, heads[-1])
        source = graph.producers(layers)[head][0]
        if source is None or layers[source].type in graph.DATA_TYPES:
            raise CaffeFtError(f"the head '{heads[-1]}' reads the input directly: there is no trunk; pass --layer")
        return source
    names = [each.name for each in layers]
    if layer in names:
        index = len(names) - 1 - names[::-1].index(layer)
        if not len(layers[index].top):
            raise CaffeFtError(f"layer '{layer}' has no output")
        return _chain_end(layers, index, layers[index].top[0])
    writers = [i for i, each in enumerate(layers) if layer in each.top]
    if writers:
        return writers[-1]
    graph.layer_index(net, layer)  # raises, with close names
    raise AssertionError("unreachable")


def cut_net(net: Message, schema: Schema, input_shape: Sequence[int], layer: Optional[str] = None,
            batch: int = 1) -> Trunk:
    """The TEST-phase layers of ``net`` that compute the feature (see
    :func:`feature_source`), behind an ``Input`` of shape batch x ``input_shape``
    in place of the data layer."""
    net = net_at_test(net)
    layers = list(net.layer)
    source = feature_source(net, layer)
    needed = sorted(graph.upstream(layers, [source]))
    feeds = [i for i in needed if layers[i].type in graph.DATA_TYPES]
    used = {bottom for i in needed for bottom in layers[i].bottom}
    if len(feeds) != 1 or layers[feeds[0]].type == "Python":
        raise CaffeFtError("the features must come from one image input (an Input, Data or ImageData layer)")
    data = layers[feeds[0]]
    if set(data.top[1:]) & used:
        raise CaffeFtError(f"the layers before the features read the labels of '{data.name}'")
    out = schema.new("NetParameter")
    out.name = net.name
    head = out.layer.add()
    head.name, head.type = data.name, "Input"
    head.top.append(data.top[0])
    head.input_param.shape.add().dim.extend([batch, *input_shape])
    for index in needed:
        if index == feeds[0]:
            continue
        copy = out.layer.add()
        copy.CopyFrom(layers[index])
        for name in ("include", "exclude", "phase"):
            copy.ClearField(name)
    return Trunk(out, data.top[0], layers[source].top[0], layers[source].name)
