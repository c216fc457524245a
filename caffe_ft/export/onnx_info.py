"""What an ONNX file holds, for ``caffe-ft inspect model.onnx``: inputs, outputs, opset and size."""

from __future__ import annotations

import os
from typing import Any, Dict, List

from ..errors import CaffeFtError


def _dims(value: Any) -> List[Any]:
    """A value's shape: numbers, symbolic names, or '?' for unknown axes."""
    dims: List[Any] = []
    for dim in value.type.tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        else:
            dims.append(dim.dim_param or "?")
    return dims


def describe_onnx(path: str) -> Dict[str, Any]:
    """A JSON-ready summary of the ONNX model at ``path``."""
    from .to_onnx import _onnx

    onnx = _onnx()
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # a DecodeError, or onnx's own complaint
        raise CaffeFtError(f"not an ONNX model: {exc}", path) from None
    graph = model.graph
    initializers = {tensor.name for tensor in graph.initializer}

    def tensor(value: Any) -> Dict[str, Any]:
        dtype = onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type).lower()
        return {"name": value.name, "dtype": dtype, "shape": _dims(value)}

    params = 0
    for tensor_proto in graph.initializer:
        count = 1
        for dim in tensor_proto.dims:
            count *= dim
        params += count
    ops: Dict[str, int] = {}
    for node in graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {
        "file": path,
        "size": os.path.getsize(path),
        "ir_version": int(model.ir_version),
        "opsets": {entry.domain or "ai.onnx": int(entry.version) for entry in model.opset_import},
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "graph": graph.name,
        "inputs": [tensor(value) for value in graph.input if value.name not in initializers],
        "outputs": [tensor(value) for value in graph.output],
        "nodes": len(graph.node),
        "ops": dict(sorted(ops.items())),
        "parameters": params,
        "metadata": {prop.key: prop.value for prop in model.metadata_props},
    }


def _shape(dims: List[Any]) -> str:
    return "(" + ", ".join(str(dim) for dim in dims) + ")"


def format_onnx(info: Dict[str, Any]) -> str:
    """``describe_onnx``'s summary as text."""
    opsets = ", ".join(f"{domain} {version}" for domain, version in info["opsets"].items())
    lines = [
        f"ONNX model {info['file']}: {info['size'] / 2 ** 20:.1f} MiB, IR version {info['ir_version']}, opset {opsets}",
        f"producer: {info['producer'] or '-'}; graph '{info['graph']}': {info['nodes']} nodes, "
        f"{info['parameters']:,} parameters",
        "inputs:",
        *(f"  {value['name']}  {value['dtype']}  {_shape(value['shape'])}" for value in info["inputs"]),
        "outputs:",
        *(f"  {value['name']}  {value['dtype']}  {_shape(value['shape'])}" for value in info["outputs"]),
        "ops: " + ", ".join(f"{op} {count}" for op, count in info["ops"].items()),
    ]
    if info["metadata"]:
        lines.append("metadata:")
        lines.extend(f"  {key}: {value}" for key, value in info["metadata"].items())
    return "\n".join(lines) + "\n"
