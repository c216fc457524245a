"""Which pretrained weights a net will get, before any GPU time is spent.

``caffe train --weights MODEL`` (and pycaffe's ``Net.copy_from``) builds the
net, fills every learnable layer with its fillers, then runs Caffe 1.0's
``Net::CopyTrainedLayersFrom`` on the (upgraded) weights file:

* each layer of the weights file, in file order, is looked up BY NAME among
  the net's layers (the first one of that name); a name the net lacks is
  ignored without a word;
* a found layer must have as many blobs as the net's layer
  ("Incompatible number of blobs for layer X"), and each blob must have the
  target's shape (``Blob::ShapeEquals``: a blob stored the old way, with
  ``num``/``channels``/``height``/``width``, is compared with the target's
  shape right-aligned and padded with 1s, so (1, 1, 10, 20) fits (10, 20));
  otherwise Caffe aborts ("Cannot copy param 0 weights from layer 'X'; shape
  mismatch. ...").

:func:`check` does the same without Caffe and reports, per learnable layer,
whether it is COPIED, FRESH (not in the weights: it keeps its fillers' values;
with a LIKELY TYPO flag when an ignored layer of the weights has a close name
and blobs that would fit) or a MISMATCH (the abort), plus the ignored layers.
:func:`init` writes the caffemodel Caffe would start from: copied blobs where
they fit, filler values elsewhere.

``caffe train`` copies the weights into the TRAIN net and then into each TEST
net; :func:`check` looks at one phase (TRAIN unless told).
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from google.protobuf.message import Message

from . import fillers, shapes
from ..formats.caffemodel import Blob, Model, NotFinite, all_finite, save_model, text
from ..errors import CaffeFtError, listing
from ..formats.upgrade import net_needs_upgrade, upgrade_net_with_map

Shape = Tuple[int, ...]

COPIED = "COPIED"
FRESH = "FRESH"
MISMATCH = "MISMATCH"

_BIAS_TERM_TYPES = ("Convolution", "Deconvolution", "InnerProduct", "Embed", "Scale")

# difflib ratios above which a FRESH layer's name is close to an ignored one's:
# a typo (when the blobs fit), or at least a rename worth mentioning.
_TYPO_CUTOFF = 0.8
_RENAME_CUTOFF = 0.6


# ---------------------------------------------------------------- results --


@dataclass(frozen=True)
class LayerCheck:
    """What Caffe does with one layer of the net.

    ``target_shapes`` are the net's parameter shapes; ``source_shapes`` the
    weights' blobs as Caffe prints them (4-D for blobs stored the old way),
    empty when the weights lack the layer.  ``fix`` says how to get past a
    MISMATCH; ``likely_typo`` names the ignored layer of the weights a FRESH
    layer was probably meant to be.
    """

    name: str
    type: str
    status: str
    target_shapes: Tuple[Shape, ...]
    source_shapes: Tuple[Shape, ...]
    reason: str
    fix: Optional[str] = None
    likely_typo: Optional[str] = None
    fillers: Tuple[str, ...] = ()
    source_blobs: Tuple[Blob, ...] = field(default=(), repr=False, compare=False)

    @property
    def param_count(self) -> int:
        return sum(math.prod(shape) for shape in self.target_shapes)


@dataclass(frozen=True)
class IgnoredLayer:
    """A layer of the weights that the net does not have (Caffe skips it)."""

    name: str
    type: str
    shapes: Tuple[Shape, ...]


@dataclass(frozen=True)
class CheckReport:
    """The outcome of :func:`check`.

    ``abort`` is the message Caffe would die with first (a filler it rejects
    while building the net, else the first failed copy in file order), or
    None when training would start.
    """

    phase: str
    layers: Tuple[LayerCheck, ...]
    ignored: Tuple[IgnoredLayer, ...]
    problems: Tuple[str, ...]
    abort: Optional[str]
    nonfinite: Tuple[str, ...] = ()  # copied blobs holding NaN or inf: Caffe loads them, training diverges

    @property
    def ok(self) -> bool:
        """Whether Caffe would load the weights and start."""
        return self.abort is None

    @property
    def usable(self) -> bool:
        """Whether training would start from finite weights."""
        return self.ok and not self.nonfinite

    def by_status(self, status: str) -> List[LayerCheck]:
        return [layer for layer in self.layers if layer.status == status]

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready form (shapes as lists)."""
        return {
            "ok": self.usable,
            "phase": self.phase,
            "abort": self.abort,
            "nonfinite": list(self.nonfinite),
            "problems": list(self.problems),
            "layers": [
                {
                    "name": layer.name,
                    "type": layer.type,
                    "status": layer.status,
                    "target_shapes": [list(s) for s in layer.target_shapes],
                    "source_shapes": [list(s) for s in layer.source_shapes],
                    "params": layer.param_count,
                    "reason": layer.reason,
                    "fix": layer.fix,
                    "likely_typo": layer.likely_typo,
                    "fillers": list(layer.fillers),
                }
                for layer in self.layers
            ],
            "ignored": [
                {"name": layer.name, "type": layer.type, "shapes": [list(s) for s in layer.shapes]}
                for layer in self.ignored
            ],
            "summary": {
                status.lower(): {
                    "layers": len(self.by_status(status)),
                    "params": sum(layer.param_count for layer in self.by_status(status)),
                }
                for status in (COPIED, FRESH, MISMATCH)
            },
        }


# ------------------------------------------------------ Caffe's blob rules --


def shape_string(shape: Sequence[int]) -> str:
    """``Blob::shape_string``: each axis followed by a space, then the count in parentheses."""
    return "".join(f"{dim} " for dim in shape) + f"({math.prod(shape)})"


def shape_equals(target: Sequence[int], blob: Blob) -> bool:
    """``Blob::ShapeEquals(BlobProto)``: whether ``blob`` fits a target blob of shape ``target``.

    A blob stored with num/channels/height/width fits a target of at most 4
    axes whose shape, right-aligned and padded with 1s, equals them (absent
    fields count as 0); otherwise the shapes must be equal.
    """
    if blob.legacy_dims:
        if len(target) > 4:
            return False
        return tuple(fillers.legacy_dim(target, index) for index in range(-4, 0)) == tuple(blob.shape)
    return tuple(target) == tuple(blob.shape)


def _blobs_fit(targets: Sequence[Shape], blobs: Sequence[Blob]) -> bool:
    return len(targets) == len(blobs) and all(shape_equals(t, b) for t, b in zip(targets, blobs))


# ------------------------------------------------------------ the weights --


@dataclass(frozen=True)
class _Source:
    """One layer of the weights file, as Caffe sees it after upgrading."""

    name: str
    type: str
    blobs: Tuple[Blob, ...]


def source_layers(model: Model) -> List[_Source]:
    """The weights' layers after Caffe's upgrade (V0/V1 files), with their blobs."""
    net = model.net
    if net_needs_upgrade(net):
        net = type(model.net)()
        net.CopyFrom(model.net)
        _, index_map = upgrade_net_with_map(net)
    else:
        index_map = list(range(len(model.blobs)))
    return [
        _Source(text(layer.name), text(layer.type), tuple(model.blobs[old]) if old is not None else ())
        for layer, old in zip(net.layer, index_map)
    ]


# ---------------------------------------------------------------- the net --


@dataclass(frozen=True)
class _Target:
    layer: Message
    params: Tuple[Shape, ...]


def _current(net: Message) -> Message:
    """``net`` in the current format (a legacy net is upgraded on a copy)."""
    if not net_needs_upgrade(net):
        return net
    copy = type(net)()
    copy.CopyFrom(net)
    upgrade_net_with_map(copy)
    return copy


def _targets(
    net: Message,
    phase: str,
    input_shapes: Optional[Mapping[str, Sequence[int]]],
    stages: Sequence[str],
    level: int,
) -> List[_Target]:
    """The layers Caffe instantiates in ``phase``, with their parameter shapes."""
    inferred = shapes.infer(net, phase, input_shapes, stages, level)
    layers = shapes.filter_layers(net, phase, level, [*net.state.stage, *stages])
    return [_Target(layer, tuple(entry.params)) for layer, entry in zip(layers, inferred.layers)]


# ------------------------------------------------------------------ check --


def _count_message(source: _Source, target: _Target) -> str:
    """Caffe's failed CHECK_EQ on the blob count, as glog prints it."""
    return (
        f"Check failed: target_blobs.size() == source_layer.blobs_size() "
        f"({len(target.params)} vs. {len(source.blobs)}) Incompatible number of blobs for layer {source.name}"
    )


def _shape_message(index: int, source: _Source, target: Shape) -> str:
    return (
        f"Cannot copy param {index} weights from layer '{source.name}'; shape mismatch.  "
        f"Source param shape is {shape_string(source.blobs[index].shape)}; "
        f"target param shape is {shape_string(target)}. To learn this layer's parameters "
        f"from scratch rather than copying from a saved net, rename the layer."
    )


def _copy_failure(source: _Source, target: _Target) -> Optional[str]:
    """What Caffe aborts with when copying ``source`` into ``target``, or None."""
    if len(source.blobs) != len(target.params):
        return _count_message(source, target)
    for index, (shape, blob) in enumerate(zip(target.params, source.blobs)):
        if not shape_equals(shape, blob):
            return _shape_message(index, source, shape)
    return None


def _outputs(layer: Message, blob_shapes: Sequence[Sequence[int]]) -> Optional[int]:
    """The num_output that parameter blobs of these shapes mean for ``layer``, or None.

    Read from the bias when there is one, else from the weight; the shapes
    may be stored the old way ((1, 1, out, in) for an InnerProduct weight).
    """
    if layer.type not in ("Convolution", "Deconvolution", "InnerProduct", "Embed") or not blob_shapes:
        return None
    if len(blob_shapes) > 1 and len(blob_shapes[1]):
        return int(blob_shapes[1][-1])
    weight = tuple(blob_shapes[0])
    if len(weight) < 2:
        return None
    if layer.type == "InnerProduct":
        return int(weight[-1] if layer.inner_product_param.transpose else weight[-2])
    if layer.type == "Embed":
        return int(weight[-1])
    if layer.type == "Deconvolution":
        return int(weight[1] * layer.convolution_param.group)
    return int(weight[0])


def _mismatch_fix(layer: Message, source: _Source, target: _Target) -> str:
    """How to get past a MISMATCH: rename, or make the layer match the weights."""
    rename = f"rename the layer (e.g. '{layer.name}_new') to learn it from scratch"
    if len(source.blobs) != len(target.params):
        hint = ", or set bias_term to match" if layer.type in _BIAS_TERM_TYPES else ""
        return f"{rename}{hint}: the weights have {len(source.blobs)} blob(s), the layer {len(target.params)}"
    outputs = _outputs(layer, [blob.shape for blob in source.blobs])
    if outputs is not None and outputs != _outputs(layer, target.params):
        return f"{rename}, or set num_output: {outputs} to copy the weights"
    return f"{rename}; the layer's input differs from the pretrained net's (check the layers below it)"


def _close_names(name: str, ignored: Mapping[str, _Source]) -> List[Tuple[_Source, float]]:
    """Ignored layers whose names look like ``name`` (case aside), most similar first.

    Close means a difflib ratio of at least 0.6, or one name extending the
    other (``fc8`` -> ``fc8_ft``).
    """
    found = []
    for candidate in ignored.values():
        a, b = name.lower(), candidate.name.lower()
        ratio = difflib.SequenceMatcher(None, a, b).ratio()
        if ratio >= _RENAME_CUTOFF or (a and b and (a.startswith(b) or b.startswith(a))):
            found.append((candidate, ratio))
    return sorted(found, key=lambda pair: -pair[1])


def _suffixed(name: str, base: str) -> bool:
    """Whether ``name`` is ``base`` plus a separated suffix (``fc8_ft``, ``fc8-new``, ``fc8/cats``)."""
    return len(name) > len(base) + 1 and name.startswith(base) and name[len(base)] in "_-/."


def _fresh(target: _Target, ignored: Mapping[str, _Source], duplicate: bool) -> Tuple[str, Optional[str]]:
    """Why a layer gets no weights, and the ignored layer it was likely meant to be.

    A name close to an ignored layer's whose blobs would fit is a LIKELY TYPO:
    those weights are silently dropped.  A close name whose blobs do not fit
    is a renamed layer (e.g. a new head), which is what fine-tuning wants; so
    is the old name with a suffix after a separator (``fc_nsfw`` ->
    ``fc_nsfw_ft``), the way heads are renamed on purpose, even when the class
    count and so the blobs stay the same.
    """
    name = target.layer.name
    if duplicate:
        return f"an earlier layer is also named '{name}'; Caffe copies weights into the first only", None
    close = _close_names(name, ignored)
    for candidate, similarity in close:
        if similarity >= _TYPO_CUTOFF and not _suffixed(name, candidate.name) \
                and _blobs_fit(target.params, candidate.blobs):
            return (
                f"LIKELY TYPO: not in the weights, but '{candidate.name}' is, with blobs that fit; "
                f"its weights are ignored and this layer starts from its fillers",
                candidate.name,
            )
    if close:
        other = close[0][0]
        shown = _shapes_text([blob.shape for blob in other.blobs])
        return f"not in the weights: renamed from '{other.name}' ({shown})? starts from its fillers", None
    return "not in the weights (a new layer): starts from its fillers", None


def with_new_heads(report: "CheckReport", renamed: Mapping[str, str]) -> "CheckReport":
    """``report`` with the heads a rewrite renamed on purpose (new name -> old) shown
    as such, not as LIKELY TYPO when their blobs happen to fit the old head's
    (the same class count)."""
    import dataclasses

    layers = []
    for layer in report.layers:
        old = renamed.get(layer.name)
        if old is not None and old != layer.name and layer.status == FRESH:
            layer = dataclasses.replace(layer, likely_typo=None,
                                        reason=f"the new head, renamed from '{old}' so that it starts from its fillers")
        layers.append(layer)
    return dataclasses.replace(report, layers=tuple(layers))


def _filler_problems(targets: Sequence[_Target]) -> List[str]:
    """Fillers Caffe rejects while building the net, before any copying."""
    problems = []
    for target in targets:
        for param, shape in zip(fillers.layer_fillers(target.layer), target.params):
            problem = fillers.filler_problem(param, shape)
            if problem is not None:
                problems.append(f"layer '{target.layer.name}': {problem}")
    return problems


def check(
    net: Message,
    model: Model,
    phase: str = "TRAIN",
    input_shapes: Optional[Mapping[str, Sequence[int]]] = None,
    stages: Sequence[str] = (),
    level: int = 0,
) -> CheckReport:
    """What Caffe does when it loads ``model``'s weights into ``net`` in ``phase``.

    ``net`` is a NetParameter (a legacy one is upgraded on a copy); the net
    state and ``input_shapes`` are as for :func:`caffe_ft.net.shapes.infer`.
    """
    phase = phase.upper()
    return _check(_targets(_current(net), phase, input_shapes, stages, level), model, phase)


def _check(targets: Sequence[_Target], model: Model, phase: str, scan_floats: bool = True) -> CheckReport:
    """Walk the weights' layers in file order, as CopyTrainedLayersFrom does.

    ``scan_floats=False`` leaves float32 blobs out of the NaN/inf scan (for
    :func:`init_and_save`, whose writer checks them as it copies them)."""
    first: Dict[str, int] = {}
    for index, target in enumerate(targets):
        first.setdefault(target.layer.name, index)
    matched: Dict[int, _Source] = {}  # target index -> the last source copied into it
    failures: Dict[int, Tuple[_Source, str]] = {}  # target index -> its first failure
    ignored: Dict[str, _Source] = {}
    copy_abort = None
    for source in source_layers(model):
        found = first.get(source.name)
        if found is None:
            if source.blobs:
                ignored[source.name] = source
            continue
        index = found
        failure = _copy_failure(source, targets[index])
        if failure is not None:
            failures.setdefault(index, (source, failure))
            copy_abort = copy_abort or failure
        matched[index] = source
    rows = [
        _row(index, target, matched, failures, ignored, first)
        for index, target in enumerate(targets)
        if target.params or index in failures
    ]
    problems = _filler_problems(targets)
    nonfinite = tuple(
        _blob_note(row.name, index, note)
        for row in rows if row.status == COPIED
        for index, blob in enumerate(row.source_blobs)
        if scan_floats or blob.data.dtype != np.float32
        for note in [_nonfinite(blob)] if note
    )
    return CheckReport(
        phase=phase,
        layers=tuple(rows),
        ignored=tuple(IgnoredLayer(s.name, s.type, tuple(b.shape for b in s.blobs)) for s in ignored.values()),
        problems=tuple(problems),
        abort=problems[0] if problems else copy_abort,
        nonfinite=nonfinite,
    )


def _blob_note(layer: str, index: int, note: str) -> str:
    return f"layer '{layer}' blob {index}: {note}"


def _diverging(where: str) -> CaffeFtError:
    """The refusal of weights that hold NaN or inf (``where``: :func:`_blob_note`)."""
    return CaffeFtError(f"the weights hold NaN or inf values ({where}); training from them diverges")


def _nonfinite(blob: Blob) -> Optional[str]:
    """How many NaN and inf values ``blob`` holds, or None when all are finite."""
    data = blob.data
    if data.size == 0 or all_finite(data):  # chunked (it lives with the writer, which checks as it copies)
        return None
    nans = int(np.isnan(data).sum())
    infs = int(np.isinf(data).sum())
    return f"{nans:,} NaN and {infs:,} inf of {data.size:,} values"


def _filler_notes(layer: Message) -> Tuple[str, ...]:
    """Each parameter blob's filler, labelled where the blobs have names (``weight: xavier``)."""
    params = fillers.layer_fillers(layer)
    names = [fillers.describe(param) for param in params]
    if layer.type in _BIAS_TERM_TYPES and len(names) == 2:
        first = "scale" if layer.type == "Scale" else "weight"
        return (f"{first}: {names[0]}", f"bias: {names[1]}")
    return tuple(names)


def _row(
    index: int,
    target: _Target,
    matched: Mapping[int, _Source],
    failures: Mapping[int, Tuple[_Source, str]],
    ignored: Mapping[str, _Source],
    first: Mapping[str, int],
) -> LayerCheck:
    layer = target.layer
    filler_names = _filler_notes(layer)
    common = dict(name=layer.name, type=layer.type, target_shapes=target.params, fillers=filler_names)
    if index in failures:
        source, message = failures[index]
        return LayerCheck(
            status=MISMATCH,
            source_shapes=tuple(blob.shape for blob in source.blobs),
            reason=message,
            fix=_mismatch_fix(layer, source, target),
            **common,  # type: ignore[arg-type]
        )
    if index in matched:
        source = matched[index]
        return LayerCheck(
            status=COPIED,
            source_shapes=tuple(blob.shape for blob in source.blobs),
            reason="copied from the weights",
            source_blobs=source.blobs,
            **common,  # type: ignore[arg-type]
        )
    reason, typo = _fresh(target, ignored, first[layer.name] != index)
    return LayerCheck(status=FRESH, source_shapes=(), reason=reason, likely_typo=typo, **common)  # type: ignore[arg-type]


# ----------------------------------------------------------------- format --


def _shapes_text(shapes_: Sequence[Shape]) -> str:
    return ", ".join("x".join(str(d) for d in shape) or "scalar" for shape in shapes_) or "-"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]


def format_check(report: CheckReport) -> str:
    """The report as a table, the ignored layers, and the verdict."""
    rows = []
    for layer in report.layers:
        status = "FRESH (LIKELY TYPO)" if layer.likely_typo else layer.status
        if layer.status == MISMATCH:
            shapes_ = f"{_shapes_text(layer.target_shapes)} <- weights {_shapes_text(layer.source_shapes)}"
            note = f"fix: {layer.fix}"
        elif layer.status == FRESH:
            shapes_ = _shapes_text(layer.target_shapes)
            note = f"{layer.reason} ({', '.join(layer.fillers) or 'no fillers'})"
        else:
            shapes_ = _shapes_text(layer.target_shapes)
            note = ""
        rows.append([layer.name, layer.type, status, shapes_, note])
    lines = [f"weights -> net ({report.phase} phase)", *_table(["LAYER", "TYPE", "STATUS", "SHAPES", "NOTE"], rows)]
    if report.ignored:
        lines.append("")
        lines.append("ignored (in the weights, not in the net):")
        lines.extend(f"  {layer.name} ({layer.type}: {_shapes_text(layer.shapes)})" for layer in report.ignored)
    lines.append("")
    for problem in report.problems:
        lines.append(f"filler problem: {problem}")
    summary = report.to_dict()["summary"]
    lines.append(
        ", ".join(f"{entry['layers']} {status} ({entry['params']:,} params)" for status, entry in summary.items())
    )
    for note in report.nonfinite:
        lines.append(f"not finite: {note}")
    if report.usable:
        lines.append("OK: Caffe would load these weights and start training")
    elif report.ok:
        lines.append("NOT OK: Caffe would load these weights, but some hold NaN or inf values: training would diverge")
    else:
        lines.append(f"Caffe would abort: {report.abort}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------- init --


def _written(blob: Blob, shape: Shape) -> Blob:
    """``blob``'s values as Caffe writes a blob of ``shape``: float32 ``data`` and a BlobShape.

    A float32 source stays a view on the weights file; a float64 one
    (``double_data``) is converted, as Caffe converts it on load.
    """
    data = blob.data if blob.data.dtype == np.float32 else blob.data.astype(np.float32)
    return Blob(tuple(shape), data.reshape(shape))


def available_memory() -> Optional[int]:
    """Bytes of memory this process can still get (MemAvailable, or free pages), or None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def _check_memory(needed: int) -> None:
    """Refuse to fill blobs that cannot fit in memory, before allocating any."""
    available = available_memory()
    if available is not None and needed > available:
        raise CaffeFtError(f"the fresh layers' blobs need {needed / 2**30:.1f} GiB, but only "
                           f"{available / 2**30:.1f} GiB of memory is available")


def init(
    net: Message,
    model: Model,
    seed: Optional[int] = 0,
    phase: str = "TRAIN",
    input_shapes: Optional[Mapping[str, Sequence[int]]] = None,
    stages: Sequence[str] = (),
    level: int = 0,
    report: Optional[CheckReport] = None,
) -> Model:
    """The caffemodel Caffe would start ``net`` from (see :func:`init_checked`)."""
    return init_checked(net, model, seed, phase, input_shapes, stages, level, report)[1]


def init_checked(
    net: Message,
    model: Model,
    seed: Optional[int] = 0,
    phase: str = "TRAIN",
    input_shapes: Optional[Mapping[str, Sequence[int]]] = None,
    stages: Sequence[str] = (),
    level: int = 0,
    report: Optional[CheckReport] = None,
) -> Tuple[CheckReport, Model]:
    """The :func:`check` report and the caffemodel Caffe would start ``net`` from:
    copied blobs, filler values elsewhere.

    Holds one entry per layer of ``net`` in ``phase`` (param-free layers
    without blobs), as pycaffe's ``net.save`` would write it right after
    ``copy_from``, except for the random values of FRESH layers, which come
    from ``np.random.default_rng(seed)`` in layer order.  Copied blobs are
    views on ``model``'s file.  Refuses a net Caffe would abort on.  One call
    does both so that the weights are scanned for NaN/inf once, not twice; a
    caller that has already shown :func:`check`'s ``report`` of the same net,
    model and phase passes it, and the weights are not scanned again.
    """
    report, out, _ = _init(net, model, seed, phase, input_shapes, stages, level, report, True)
    return report, out


def init_and_save(
    net: Message,
    model: Model,
    path: str,
    seed: Optional[int] = 0,
    phase: str = "TRAIN",
    input_shapes: Optional[Mapping[str, Sequence[int]]] = None,
) -> CheckReport:
    """:func:`init_checked`'s caffemodel written to ``path``; its report.

    The copied float32 blobs are checked for NaN/inf while the writer copies
    them, in one pass over the weights instead of a scan and then a copy
    (``init -o`` of a big model is mostly that copy); a NaN or inf refuses
    with :func:`init_checked`'s error and leaves no file.
    """
    report, out, deferred = _init(net, model, seed, phase, input_shapes, (), 0, None, False)
    try:
        save_model(out, path, deferred)
    except NotFinite as exc:
        name, index, blob = deferred[(exc.layer_index, exc.blob_index)]
        raise _diverging(_blob_note(name, index, _nonfinite(blob) or "")) from None
    return report


def _init(
    net: Message,
    model: Model,
    seed: Optional[int],
    phase: str,
    input_shapes: Optional[Mapping[str, Sequence[int]]],
    stages: Sequence[str],
    level: int,
    report: Optional[CheckReport],
    scan_floats: bool,
) -> Tuple[CheckReport, Model, Dict[Tuple[int, int], Tuple[str, int, Blob]]]:
    """:func:`init_checked`, and with ``scan_floats=False`` (and no ``report``)
    the copied float32 blobs left unscanned: (layer, blob) of the result ->
    (layer name, blob index, source blob) of each."""
    phase = phase.upper()
    current = _current(net)
    targets = _targets(current, phase, input_shapes, stages, level)
    report = report if report is not None else _check(targets, model, phase, scan_floats)
    if not report.ok:
        mismatched = listing([layer.name for layer in report.by_status(MISMATCH)])
        where = f" (mismatched: {mismatched}; rename or fix them first)" if mismatched else ""
        raise CaffeFtError(f"Caffe would abort loading these weights: {report.abort}{where}")
    if report.nonfinite:
        raise _diverging(report.nonfinite[0])
    copied: Dict[str, LayerCheck] = {}
    for checked in report.by_status(COPIED):
        copied.setdefault(checked.name, checked)  # rows are in net order: the first layer of a name
    _check_memory(sum(shapes.count(shape) for target in targets if target.layer.name not in copied
                      for shape in target.params) * 4)
    rng: Optional[np.random.Generator] = None  # made at the first fresh layer: numpy.random's import is ~10 ms
    out = type(current)()
    out.name = current.name
    blobs: List[List[Blob]] = []
    unscanned: Dict[Tuple[int, int], Tuple[str, int, Blob]] = {}
    for target in targets:
        layer = out.layer.add()
        layer.CopyFrom(target.layer)
        layer.ClearField("blobs")
        if not layer.HasField("phase"):
            layer.phase = shapes.PHASES[phase]  # as Net::Init sets it
        row: Optional[LayerCheck] = copied.pop(layer.name, None)
        if row is not None:
            blobs.append([_written(blob, shape) for blob, shape in zip(row.source_blobs, target.params)])
            if not scan_floats:
                unscanned.update(((len(blobs) - 1, k), (row.name, k, blob)) for k, blob in
                                 enumerate(row.source_blobs) if blob.data.dtype == np.float32 and blob.data.size)
        elif target.params:
            if rng is None:
                rng = np.random.default_rng(seed)
            arrays = fillers.fill_layer(target.layer, target.params, rng)
            blobs.append([Blob(tuple(shape), array) for shape, array in zip(target.params, arrays)])
        else:
            blobs.append([])
    return report, Model(out, blobs), unscanned
