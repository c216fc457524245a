"""A well-formedness checker for nets, run after every transform in the tests.

:func:`check_net` lists what would make Caffe refuse a net: duplicate layer
names, bottoms nothing produced earlier, more ``param`` entries than blobs,
``num_output`` below 1, shared parameters with disagreeing multipliers.  The
tool itself relies on Caffe (and on :mod:`caffe_ft.net.shapes`) for these; the
tests use it as an independent oracle over every rewrite.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Set, Tuple

from google.protobuf.message import Message

from caffe_ft.errors import CaffeFtError
from caffe_ft.net.graph import HEAD_TYPES, param_blob_count


def _check_state(net: Message, phase: str) -> List[str]:
    """Duplicate names and unproduced bottoms among the layers of one phase."""
    from caffe_ft.net.shapes import filter_layers

    try:
        layers = filter_layers(net, phase, net.state.level, list(net.state.stage))
    except CaffeFtError as exc:
        return [str(exc)]
    problems = []
    available = set(net.input)
    names: Set[str] = set()
    for layer in layers:
        if layer.name in names:
            problems.append(f"{phase}: two layers are named '{layer.name}'")
        names.add(layer.name)
        for bottom in layer.bottom:
            if bottom not in available:
                problems.append(
                    f"{phase}: layer '{layer.name}': bottom '{bottom}' is not produced by an earlier layer"
                )
        available.update(layer.top)
    return problems


def _check_layer(layer: Message) -> List[str]:
    """Parameter specs and ``num_output`` of one layer."""
    from caffe_ft.net.shapes import RULES

    problems = []
    known = layer.type in RULES and layer.type != "Python"  # Python layers have any blobs
    if known and len(layer.param) > param_blob_count(layer):
        problems.append(
            f"layer '{layer.name}': {len(layer.param)} param entries for "
            f"{param_blob_count(layer)} parameter blob(s)"
        )
    field = {"InnerProduct": "inner_product_param"}.get(layer.type, "convolution_param")
    if layer.type in HEAD_TYPES and getattr(layer, field).num_output < 1:
        problems.append(f"layer '{layer.name}': num_output must be at least 1")
    return problems


def _check_sharing(layers: Sequence[Message]) -> List[str]:
    """Shared parameters whose explicit multipliers disagree (Caffe aborts on those)."""
    seen: Dict[Tuple[str, str], Tuple[float, str]] = {}
    problems = []
    for layer in layers:
        for spec in layer.param:
            if not spec.name:
                continue
            for field in ("lr_mult", "decay_mult"):
                if not spec.HasField(field):
                    continue
                value = getattr(spec, field)
                first = seen.setdefault((spec.name, field), (value, layer.name))
                if first[0] != value:
                    problems.append(
                        f"shared parameter '{spec.name}': {field} {value:g} in layer "
                        f"'{layer.name}' but {first[0]:g} in layer '{first[1]}'"
                    )
    return problems


def check_net(net: Message) -> List[str]:
    """Problems that would make Caffe refuse ``net`` (empty when none is found).

    Checks, in the TRAIN and TEST states (with the net's own level and
    stages): layer names are unique and every bottom is produced by an earlier
    layer of the same state (or is a net input).  For every layer: no more
    ``param`` entries than parameter blobs (for layer types whose blobs are
    known), ``num_output`` at least 1 for InnerProduct/Convolution/
    Deconvolution, and shared parameters with agreeing explicit multipliers.
    """
    problems: List[str] = []
    for phase in ("TRAIN", "TEST"):
        problems.extend(p for p in _check_state(net, phase) if p not in problems)
    for layer in net.layer:
        problems.extend(_check_layer(layer))
    problems.extend(_check_sharing(list(net.layer)))
    return problems
