"""What ``caffe-ft inspect`` reports: plain data first, text tables second.

``describe_*`` return JSON-ready dicts (``inspect --json`` prints them as is),
or for a net a :class:`NetReport` (``as_json`` makes its dict); ``format_*``
lay the same data out for people.
"""

from __future__ import annotations

import functools
import math
from itertools import chain, islice
from operator import attrgetter
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from . import graph
from .shapes import LayerShapes, ShapeInference, is_included
from ..formats import prototext
from ..formats.wire import text
from ..errors import CaffeFtError
from ..formats.schema import Schema, is_repeated


def _rules(layer: Message) -> str:
    """The phases/stages a layer runs in, as a short text ('' for always)."""
    parts = []
    for keyword, rules in (("", layer.include), ("not ", layer.exclude)):
        for rule in rules:
            words = []
            if rule.HasField("phase"):
                words.append(rule.DESCRIPTOR.fields_by_name["phase"].enum_type.values_by_number[rule.phase].name)
            words.extend(f"stage={stage}" for stage in rule.stage)
            words.extend(f"not-stage={stage}" for stage in rule.not_stage)
            if rule.HasField("min_level"):
                words.append(f"level>={rule.min_level}")
            if rule.HasField("max_level"):
                words.append(f"level<={rule.max_level}")
            parts.append(keyword + " ".join(words))
    return ", ".join(parts)


class LayerReport(NamedTuple):
    """One layer as ``inspect`` shows it: ``params`` holds (lr_mult, decay_mult)
    per parameter blob, ``shapes`` its TEST-phase set-up (None where it does not
    run in TEST; not shown when the net's shapes are not inferred)."""

    name: str
    type: str
    bottom: Tuple[str, ...]
    top: Tuple[str, ...]
    phase: str
    params: Tuple[Tuple[float, float], ...]
    shapes: Optional[LayerShapes]

    @property
    def learnable(self) -> bool:
        """Whether the solver changes any of its parameters (graph.is_learnable)."""
        return any(lr_mult != 0 for lr_mult, _ in self.params)


# LayerReport(...) without its Python-level __new__, for the million plain layers of a big net.
_new_report = functools.partial(tuple.__new__, LayerReport)


class NetReport:
    """A net as ``inspect`` shows it; :meth:`to_json` gives ``inspect --json``'s data."""

    def __init__(self, name: str, layers: List[LayerReport], problem: Optional[str]) -> None:
        self.name = name
        self.layers = layers
        self.shapes_unknown = problem  # why shapes are not inferred; None when they are
        self.heads = graph.find_heads_in(layers, lambda layer: len(layer.params)).heads
        self.param_count = self.flops = 0  # TEST-phase totals
        if problem is None:
            steps = [layer.shapes for layer in layers if layer.shapes is not None]
            self.param_count = sum(step.param_count for step in steps)
            self.flops = sum(step.flops or 0 for step in steps)

    def to_json(self) -> Dict[str, Any]:
        layers = []
        for layer in self.layers:
            entry: Dict[str, Any] = {
                "name": layer.name,
                "type": layer.type,
                "bottom": list(layer.bottom),
                "top": list(layer.top),
                "phase": layer.phase,
                "params": [{"lr_mult": lr_mult, "decay_mult": decay_mult} for lr_mult, decay_mult in layer.params],
                "learnable": layer.learnable,
            }
            step = layer.shapes if self.shapes_unknown is None else None
            if step is not None:
                entry["output_shapes"] = [list(shape) for shape in step.tops]
                entry["param_shapes"] = [list(shape) for shape in step.params]
                entry["param_count"] = step.param_count
                entry["flops"] = step.flops
            layers.append(entry)
        info: Dict[str, Any] = {"kind": "net", "name": self.name, "layers": layers, "heads": list(self.heads)}
        if self.shapes_unknown is None:
            info["param_count"], info["flops"] = self.param_count, self.flops
        else:
            info["shapes_unknown"] = self.shapes_unknown
        return info


def as_json(info: Any) -> Any:
    """What ``inspect --json`` prints of ``describe_*``'s result."""
    return info.to_json() if isinstance(info, NetReport) else info


class _NetDescriber:
    """Builds a :class:`NetReport` from a net's layers given one at a time, in
    order, each as its name, type, bottoms and tops and a ``source`` that
    ``build`` makes its message of: the message is asked for only where the
    report needs more (parameters, phase rules, shapes)."""

    def __init__(self, net: Message, input_shapes: Optional[Dict[str, Tuple[int, ...]]],
                 build: Callable[[Any], Message]) -> None:
        self.build = build
        self.layers: List[LayerReport] = []
        self.stages = list(net.state.stage)
        self.problem: Optional[str] = None
        self.filter_problem: Optional[str] = None
        self.inference: Optional[ShapeInference] = None
        try:
            self.inference = ShapeInference(net, input_shapes)
        except CaffeFtError as exc:
            self.problem = str(exc)

    def add(self, name: str, kind: str, bottom: Tuple[str, ...], top: Tuple[str, ...], has_rules: bool,
            source: Any, layer: Optional[Message] = None) -> None:
        """One more layer; ``layer`` is its message where the caller has it already."""
        if not (kind in graph.PARAM_TYPES or has_rules or self.inference is not None):
            self.layers.append(_new_report((name, kind, bottom, top, "", (), None)))  # nothing more to ask
            return
        if layer is None:
            layer = self.build(source)
        params: Tuple[Tuple[float, float], ...] = ()
        if kind in graph.PARAM_TYPES:
            specs = layer.param
            params = tuple((lr_mult, specs[i].decay_mult if i < len(specs) else 1.0)
                           for i, lr_mult in enumerate(graph.lr_mults(layer)))
        phase = ""
        included = True
        if has_rules:
            phase = _rules(layer)
            try:
                included = is_included(layer, "TEST", 0, self.stages)
            except CaffeFtError as exc:  # include and exclude both: Caffe's first complaint
                self.filter_problem = self.filter_problem or str(exc)
        shapes = None
        if self.inference is not None and included:
            try:
                shapes = self.inference.add(layer)
            except CaffeFtError as exc:
                self.fail(str(exc))
        self.layers.append(LayerReport(name, kind, bottom, top, phase, params, shapes))

    def fail(self, problem: str) -> None:
        """Shapes cannot be inferred: none is shown (as Caffe would set up no layer)."""
        self.problem, self.inference = problem, None

    def finish(self, name: str) -> NetReport:
        if self.filter_problem is not None:  # Caffe filters the layers before it sets any up
            self.fail(self.filter_problem)
        elif self.inference is not None:
            try:
                self.inference.finish()
            except CaffeFtError as exc:
                self.fail(str(exc))
        return NetReport(name, self.layers, self.problem)


def describe_net(net: Message, input_shapes: Optional[Dict[str, Tuple[int, ...]]] = None) -> NetReport:
    """Layers (with multipliers, phases, shapes and costs) and heads of a current-format net.

    Shapes are those of the TEST phase; layers that only run in TRAIN have none.
    """
    describer = _NetDescriber(net, input_shapes, lambda layer: layer)
    for layer in net.layer:
        describer.add(text(layer.name), text(layer.type), tuple(map(text, layer.bottom)), tuple(map(text, layer.top)),
                      bool(layer.include or layer.exclude), layer)
    return describer.finish(text(net.name))


# Net-level fields that only a legacy net has (upgrade.net_needs_upgrade).
_LEGACY_FIELDS = frozenset({"layers", "input", "input_dim", "input_shape"})


class _HeadAfterLayers(Exception):
    """A net-level field comes after the net's first layer."""


def describe_text(fields: Iterator[prototext.Node], data: bytes, path: str, schema: Schema,
                  input_shapes: Optional[Dict[str, Tuple[int, ...]]] = None) -> Optional[NetReport]:
    """:func:`describe_net` of the text-format net ``data``, whose top-level
    nodes ``fields`` gives as they are parsed (:func:`prototext.parse_fields`),
    checked and described a layer at a time: the net's tree and message never
    exist whole (for a big net they are most of the memory and of the time), a
    layer's message is built only where the report needs it.  Errors are those
    of parsing and then checking the whole file (syntax first, then the first
    field that does not fit the schema).  None for a net Caffe would upgrade
    first (legacy fields, an old BatchNorm): describe its upgraded message."""
    try:
        return _describe_fields(fields, path, schema, input_shapes)
    except _HeadAfterLayers:
        pass
    except CaffeFtError:
        for _ in fields:  # a syntax error further on is the one to report, as every command does
            pass
        raise
    # A net-level field after the layers: the whole file, checked, its net-level fields first.
    root = prototext.parse(data, path)
    prototext.check_tree(root, schema.table("NetParameter"), path)
    nodes = sorted(root.children or (), key=lambda node: node.name == "layer")  # stable: layers keep their order
    del root
    return _describe_fields(iter(nodes), path, schema, input_shapes)


def _describe_fields(fields: Iterator[prototext.Node], path: str, schema: Schema,
                     input_shapes: Optional[Dict[str, Tuple[int, ...]]]) -> Optional[NetReport]:
    """:func:`describe_text` of a net's top-level nodes, net-level ones first
    (else :class:`_HeadAfterLayers`), each checked as it is read."""
    head = []
    first = None
    for node in fields:
        if node.name == "layer":
            first = node
            break
        head.append(node)
    if {node.name for node in head} & _LEGACY_FIELDS:
        return None
    builder = prototext.MessageBuilder(path)
    net = builder.build(prototext.Node("", head), schema.new("NetParameter"))
    del head
    net_table, layer_table = schema.table("NetParameter"), schema.table("LayerParameter")
    new_layer = schema.message_class("LayerParameter")
    describer = _NetDescriber(net, input_shapes, lambda node: builder.build(node, new_layer()))
    strings: Dict[str, str] = {}  # canonical text -> value: names and types repeat

    def value(canonical: str) -> str:
        found = strings.get(canonical)
        if found is None:
            found = strings[canonical] = text(prototext.string_value(canonical))
        return found

    layers, param_types, new_report = describer.layers, graph.PARAM_TYPES, _new_report
    for node in chain([first], fields) if first is not None else ():
        if node.name != "layer":
            if node.name in _LEGACY_FIELDS:
                return None
            raise _HeadAfterLayers
        children = node.children
        layer = None
        if children is None:  # ``layer: []`` (no layer), or a value where a layer goes
            builder.check(prototext.Node("", [node]), net_table)
            continue
        if children:  # checked as it is read (the message, when one is needed, checks it)
            if describer.inference is not None:
                layer = builder.build(node, new_layer())
            else:
                builder.check(node, layer_table)
        name = kind = ""
        bottom: Tuple[str, ...] = ()
        top: Tuple[str, ...] = ()
        has_rules = False
        param_specs = 0
        for child in children:
            field = child.name
            canonical = child.canonical
            if canonical is not None:  # a value (or ``param: []``, which adds nothing)
                if field == "name":
                    name = value(canonical[0])
                elif field == "type":
                    kind = value(canonical[0])
                elif field == "bottom":
                    bottom += tuple(map(value, canonical))
                elif field == "top":
                    top += tuple(map(value, canonical))
            elif field == "include" or field == "exclude":
                has_rules = True
            elif field == "param":
                param_specs += 1
        if has_rules or kind in param_types or describer.inference is not None:
            if kind == "BatchNorm" and param_specs == 3:
                return None  # Caffe zeroes such a layer's multipliers (upgrade.needs_batch_norm_upgrade)
            describer.add(name, kind, bottom, top, has_rules, node, layer)
        else:  # add()'s first lines, without the call: a big net's layers are mostly these
            layers.append(new_report((name, kind, bottom, top, "", (), None)))
    return describer.finish(text(net.name))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns two spaces apart, trailing spaces cut."""
    return _columns(header, [list(map(str, column)) for column in zip(*rows)] or [[] for _ in header])


def _columns(header: Sequence[str], columns: Sequence[Sequence[str]]) -> str:
    """:func:`_table` given its cells column by column: every row is laid out
    in C (``map``, ``%``), none in Python (a net may have a million layers)."""
    widths = [max(len(title), max(map(len, column), default=0)) for title, column in zip(header, columns)]
    line = "  ".join(f"%-{width}s" for width in widths)
    rows = chain([tuple(header)], zip(*columns))
    # A block of lines at a time: a million lines never exist as a million strings, only as the text.
    blocks: List[str] = []
    while True:
        block = list(map(str.rstrip, map(line.__mod__, islice(rows, 16384))))
        if not block:
            return "\n".join(blocks)
        blocks.append("\n".join(block))


def _mult(value: float) -> str:
    return f"{value:g}"


def _dims(shapes: Sequence[Sequence[int]]) -> str:
    return " ".join("x".join(map(str, shape)) or "()" for shape in shapes)


def _count(value: Optional[int]) -> str:
    if value is None:
        return ""
    for limit, suffix in ((10**9, "G"), (10**6, "M"), (10**3, "k")):
        if value >= limit:
            return f"{value / limit:.1f}{suffix}"
    return str(value)


def _mults(params: Tuple[Tuple[float, float], ...]) -> str:
    return "/".join(f"{_mult(lr_mult)}:{_mult(decay_mult)}" for lr_mult, decay_mult in params)


def _learns(params: Tuple[Tuple[float, float], ...]) -> str:
    return "yes" if any(lr_mult != 0 for lr_mult, _ in params) else "frozen"


def _shape_cells(step: Optional[LayerShapes]) -> Tuple[str, str, str, str]:
    if step is None:
        return ("", "", "", "")
    return (_dims(step.tops), _dims(step.params), _count(step.param_count) if step.params else "",
            _count(step.flops))


def format_net(report: NetReport) -> str:
    # Column by column, each cell made in C where it can be: a million layers print in about a second.
    layers = report.layers
    params = list(map(attrgetter("params"), layers))
    bottoms = [blobs or "-" for blobs in map(",".join, map(attrgetter("bottom"), layers))]
    tops = [blobs or "-" for blobs in map(",".join, map(attrgetter("top"), layers))]
    columns = [
        list(map(attrgetter("name"), layers)),
        list(map(attrgetter("type"), layers)),
        list(map(" -> ".join, zip(bottoms, tops))),
        list(map(attrgetter("phase"), layers)),
        [_mults(layer_params) if layer_params else "-" for layer_params in params],
        [_learns(layer_params) if layer_params else "" for layer_params in params],
    ]
    del params, bottoms, tops
    header = ["layer", "type", "bottom -> top", "phase", "lr:decay", "learns"]
    shapes = report.shapes_unknown is None
    if shapes:
        header += ["output", "param shapes", "params", "MACs"]
        columns += map(list, zip(*map(_shape_cells, map(attrgetter("shapes"), layers)))) if layers else [[]] * 4
    text = f"net {report.name!r}: {len(layers)} layers\n" + _columns(header, columns) + "\n"
    del columns
    if shapes:
        text += f"total (TEST phase): {report.param_count:,} parameters, {_count(report.flops)} multiply-adds\n"
    else:
        text += f"shapes not inferred (give --input-shape BLOB=N,C,H,W): {report.shapes_unknown}\n"
    heads = ", ".join(report.heads) or "none found"
    return f"{text}classifier head(s): {heads}\n"


def describe_solver(solver: Message) -> Dict[str, Any]:
    """Every scalar setting of a solver, marking the ones left at their default."""
    settings = []
    descriptor = solver.DESCRIPTOR
    for field in sorted(descriptor.fields, key=lambda f: f.number):
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if solver.HasField(field.name) if not is_repeated(field) else len(getattr(solver, field.name)):
                settings.append({"name": field.name, "value": "{…}", "default": False})
            continue
        if is_repeated(field):
            values = getattr(solver, field.name)
            if values:
                text = ", ".join(prototext.format_value(field, v) for v in values)
                settings.append({"name": field.name, "value": text, "default": False})
            continue
        is_set = solver.HasField(field.name)
        if not is_set and field.name in ("solver_type",):
            continue  # deprecated and unset: not worth showing
        value = prototext.format_value(field, getattr(solver, field.name))
        settings.append({"name": field.name, "value": value, "default": not is_set})
    return {"kind": "solver", "settings": settings}


def format_solver(info: Dict[str, Any]) -> str:
    rows = [[s["name"], s["value"], "(default)" if s["default"] else ""] for s in info["settings"]]
    return _table(["setting", "value", ""], rows) + "\n"


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024  # type: ignore[assignment]
    raise AssertionError  # pragma: no cover


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by "nan", "inf" or "-inf"
    (JSON has no such numbers; ``json.dumps`` would write invalid ``NaN``) and
    every ``bytes`` (a string field that is not UTF-8) shown as :func:`text` shows it."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, bytes):
        return text(value)
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def describe_model(model: Any) -> Dict[str, Any]:
    """Layers with their blob shapes and parameter counts, and totals."""
    layers = []
    for layer, blobs in zip(model.layers, model.blobs):
        if "layer" in layer.DESCRIPTOR.fields_by_name and layer.HasField("layer"):
            layer = layer.layer  # V0: the real layer sits inside
        type_field = layer.DESCRIPTOR.fields_by_name["type"]
        kind = prototext.format_value(type_field, layer.type).strip('"')
        name = text(layer.name)
        layers.append({
            "name": name,
            "type": kind,
            "blobs": [list(blob.shape) for blob in blobs],
            "params": sum(blob.count for blob in blobs),
        })
    return {
        "kind": "caffemodel",
        "name": text(model.net.name),
        "format": "current" if model.layer_field == "layer" else ("V0" if model.v0 else "V1"),
        "layers": layers,
        "params": model.param_count,
        "bytes": model.nbytes,
    }


def format_model(info: Dict[str, Any]) -> str:
    rows = []
    for layer in info["layers"]:
        if not layer["blobs"]:
            continue
        shapes = " ".join("x".join(map(str, shape)) or "scalar" for shape in layer["blobs"])
        rows.append([layer["name"], layer["type"], shapes, f"{layer['params']:,}"])
    head = (f"caffemodel {info['name']!r} ({info['format']} format): {len(info['layers'])} layers, "
            f"{len(rows)} with weights\n")
    total = f"total: {info['params']:,} parameters, {_size(info['bytes'])}\n"
    return head + _table(["layer", "type", "blobs", "params"], rows) + "\n" + total


def describe_blob(blob: Any) -> Dict[str, Any]:
    """A single array (a mean file): shape, and per-channel means of 4-D/3-D data."""
    data = blob.data
    info: Dict[str, Any] = {"kind": "blob", "shape": list(blob.shape), "count": blob.count,
                            "dtype": str(data.dtype)}
    if blob.count:
        import numpy as np

        with np.errstate(all="ignore"):  # inf and nan values give inf and nan, silently
            info["min"], info["max"], info["mean"] = float(data.min()), float(data.max()), float(data.mean())
            if data.ndim >= 3:
                channels = data.reshape((-1,) + data.shape[-3:]).mean(axis=(0, 2, 3))
                info["channel_means"] = [float(value) for value in channels]
    return info


def format_blob(info: Dict[str, Any]) -> str:
    lines = [f"blob {'x'.join(map(str, info['shape'])) or 'scalar'} ({info['count']:,} {info['dtype']} values)"]
    if "mean" in info:
        lines.append(f"min {info['min']:g}, max {info['max']:g}, mean {info['mean']:g}")
    if "channel_means" in info:
        lines.append("per-channel means: " + ", ".join(f"{value:g}" for value in info["channel_means"]))
    return "\n".join(lines) + "\n"


def describe_solverstate(state: Any) -> Dict[str, Any]:
    """Where a snapshot stopped, and its solver history blobs."""
    message = state.state
    return {
        "kind": "solverstate",
        "iter": message.iter,
        "current_step": message.current_step,
        "learned_net": text(message.learned_net),
        "history": [list(blob.shape) for blob in state.history],
        "history_values": sum(blob.count for blob in state.history),
    }


def format_solverstate(info: Dict[str, Any]) -> str:
    return (f"solver state at iteration {info['iter']} (learning-rate step {info['current_step']})\n"
            f"weights: {info['learned_net'] or '(not recorded)'}\n"
            f"history: {len(info['history'])} blobs, {info['history_values']:,} values\n")
