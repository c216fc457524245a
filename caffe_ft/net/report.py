"""What ``caffe-ft inspect`` reports: plain data first, text tables second.

``describe_*`` return JSON-ready dicts (``inspect --json`` prints them as is);
``format_*`` lay the same dicts out for people.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from . import graph
from ..formats import prototext
from ..formats.wire import text
from ..errors import CaffeFtError
from ..formats.schema import is_repeated


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


def _shapes(net: Message, input_shapes: Optional[Dict[str, Tuple[int, ...]]]) -> Tuple[Any, Optional[str]]:
    """Inferred TEST-phase shapes, or the reason they cannot be inferred."""
    from .shapes import infer

    try:
        return infer(net, phase="TEST", input_shapes=input_shapes), None
    except CaffeFtError as exc:
        return None, str(exc)


def describe_net(net: Message, input_shapes: Optional[Dict[str, Tuple[int, ...]]] = None) -> Dict[str, Any]:
    """Layers (with multipliers, phases, shapes and costs) and heads of a current-format net.

    Shapes are those of the TEST phase; layers that only run in TRAIN have none.
    """
    from .shapes import is_included

    inferred, problem = _shapes(net, input_shapes)
    steps = iter(inferred.layers) if inferred is not None else iter(())
    layers = []
    for layer in net.layer:
        params = []
        learnable = False
        if graph.param_blob_count(layer):  # most layers have no parameters: nothing more to ask
            mults = graph.lr_mults(layer)
            specs = layer.param
            for i, mult in enumerate(mults):
                params.append({"lr_mult": mult, "decay_mult": specs[i].decay_mult if i < len(specs) else 1.0})
            learnable = any(mult != 0 for mult in mults)  # graph.is_learnable
        entry: Dict[str, Any] = {
            "name": text(layer.name),  # bytes where the file's string is not UTF-8
            "type": text(layer.type),
            "bottom": list(map(text, layer.bottom)),
            "top": list(map(text, layer.top)),
            "phase": _rules(layer) if layer.include or layer.exclude else "",
            "params": params,
            "learnable": learnable,
        }
        if inferred is not None and is_included(layer, "TEST"):
            step = next(steps)
            entry["output_shapes"] = [list(shape) for shape in step.tops]
            entry["param_shapes"] = [list(shape) for shape in step.params]
            entry["param_count"] = step.param_count
            entry["flops"] = step.flops
        layers.append(entry)
    info: Dict[str, Any] = {"kind": "net", "name": text(net.name), "layers": layers, "heads": list(graph.find_heads(net).heads)}
    if inferred is not None:
        info["param_count"] = sum(step.param_count for step in inferred.layers)
        info["flops"] = sum(step.flops or 0 for step in inferred.layers)
    else:
        info["shapes_unknown"] = problem
    return info


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns two spaces apart, trailing spaces cut (one format
    call a row: a net may have a million layers)."""
    widths = [max(map(len, map(str, column))) for column in zip(header, *rows)]
    line = "  ".join(f"{{!s:<{width}}}" for width in widths).format
    return "\n".join([line(*row).rstrip() for row in [header, *rows]])


def _mult(value: float) -> str:
    return f"{value:g}"


def _dims(shapes: List[List[int]]) -> str:
    return " ".join("x".join(map(str, shape)) or "()" for shape in shapes)


def _count(value: Optional[int]) -> str:
    if value is None:
        return ""
    for limit, suffix in ((10**9, "G"), (10**6, "M"), (10**3, "k")):
        if value >= limit:
            return f"{value / limit:.1f}{suffix}"
    return str(value)


def format_net(info: Dict[str, Any]) -> str:
    shapes = "shapes_unknown" not in info
    rows = []
    for layer in info["layers"]:
        params = layer["params"]
        mults = "/".join(f"{_mult(p['lr_mult'])}:{_mult(p['decay_mult'])}" for p in params) if params else "-"
        flow = f"{','.join(layer['bottom']) or '-'} -> {','.join(layer['top']) or '-'}"
        learn = "yes" if layer["learnable"] else ("frozen" if params else "")
        row = [layer["name"], layer["type"], flow, layer["phase"], mults, learn]
        if shapes:
            row += [_dims(layer.get("output_shapes", [])), _dims(layer.get("param_shapes", [])),
                    _count(layer.get("param_count")) if layer.get("param_shapes") else "",
                    _count(layer.get("flops"))]
        rows.append(row)
    header = ["layer", "type", "bottom -> top", "phase", "lr:decay", "learns"]
    if shapes:
        header += ["output", "param shapes", "params", "MACs"]
    text = f"net {info['name']!r}: {len(info['layers'])} layers\n" + _table(header, rows) + "\n"
    if shapes:
        text += f"total (TEST phase): {info['param_count']:,} parameters, {_count(info['flops'])} multiply-adds\n"
    else:
        text += f"shapes not inferred (give --input-shape BLOB=N,C,H,W): {info['shapes_unknown']}\n"
    heads = ", ".join(info["heads"]) or "none found"
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
