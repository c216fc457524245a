"""What ``caffe-ft inspect`` reports: plain data first, text tables second.

``describe_*`` return JSON-ready dicts (``inspect --json`` prints them as is);
``format_*`` lay the same dicts out for people.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from . import graph, textformat
from .schema import is_repeated


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


def describe_net(net: Message) -> Dict[str, Any]:
    """Layers (with multipliers and phases) and detected heads of a current-format net."""
    layers = []
    for layer in net.layer:
        count = graph.param_blob_count(layer)
        params = []
        for i in range(count):
            spec = layer.param[i] if i < len(layer.param) else None
            params.append({
                "lr_mult": graph.lr_mults(layer)[i],
                "decay_mult": spec.decay_mult if spec is not None else 1.0,
            })
        layers.append({
            "name": layer.name,
            "type": layer.type,
            "bottom": list(layer.bottom),
            "top": list(layer.top),
            "phase": _rules(layer),
            "params": params,
            "learnable": graph.is_learnable(layer),
        })
    search = graph.find_heads(net)
    return {"kind": "net", "name": net.name, "layers": layers, "heads": list(search.heads)}


def _table(header: Sequence[str], rows: List[Sequence[str]]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [str(cell).ljust(width) for cell, width in zip(row, widths)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _mult(value: float) -> str:
    return f"{value:g}"


def format_net(info: Dict[str, Any]) -> str:
    rows = []
    for layer in info["layers"]:
        params = layer["params"]
        mults = "/".join(f"{_mult(p['lr_mult'])}:{_mult(p['decay_mult'])}" for p in params) or "-"
        flow = f"{','.join(layer['bottom']) or '-'} -> {','.join(layer['top']) or '-'}"
        learn = "yes" if layer["learnable"] else ("frozen" if params else "")
        rows.append([layer["name"], layer["type"], flow, layer["phase"], mults, learn])
    header = ["layer", "type", "bottom -> top", "phase", "lr:decay", "learns"]
    text = f"net {info['name']!r}: {len(info['layers'])} layers\n" + _table(header, rows)
    heads = ", ".join(info["heads"]) or "none found"
    return f"{text}\nclassifier head(s): {heads}\n"


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
                text = ", ".join(textformat.format_value(field, v) for v in values)
                settings.append({"name": field.name, "value": text, "default": False})
            continue
        is_set = solver.HasField(field.name)
        if not is_set and field.name in ("solver_type",):
            continue  # deprecated and unset: not worth showing
        value = textformat.format_value(field, getattr(solver, field.name))
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


def describe_model(model: Any) -> Dict[str, Any]:
    """Layers with their blob shapes and parameter counts, and totals."""
    layers = []
    for layer, blobs in zip(model.layers, model.blobs):
        if "layer" in layer.DESCRIPTOR.fields_by_name and layer.HasField("layer"):
            layer = layer.layer  # V0: the real layer sits inside
        type_field = layer.DESCRIPTOR.fields_by_name["type"]
        kind = textformat.format_value(type_field, layer.type).strip('"')
        name = layer.name
        layers.append({
            "name": name,
            "type": kind,
            "blobs": [list(blob.shape) for blob in blobs],
            "params": sum(blob.count for blob in blobs),
        })
    return {
        "kind": "caffemodel",
        "name": model.net.name,
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
