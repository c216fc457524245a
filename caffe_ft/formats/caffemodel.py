"""Binary Caffe files (``.caffemodel``, ``.binaryproto``, ``.solverstate``), fast and lean.

A caffemodel is a serialized ``NetParameter`` whose layers carry their weights
as ``BlobProto`` records: almost all of the file is packed float arrays.
Parsing it with python-protobuf and then copying ``blob.data`` into numpy is
slow and holds the weights twice, so this module reads the protobuf wire
format of the outer messages itself:

* the file is memory-mapped; each blob's arrays become ``np.frombuffer``
  views on the map (no copy, read-only: assign a new array to change one);
* everything else (the layers without their blobs, the other top-level
  fields) is small, and is parsed by protobuf with the caller's schema.

Writing does the reverse: protobuf serializes each layer without its blobs
and the blob records are spliced in where C++ protobuf puts them (fields in
number order, known fields before unknown ones), with the arrays streamed to
disk.  So a caffemodel that Caffe wrote, read and written back, is
byte-identical to the input.  An array that is still an unchanged view on a
mapped file is copied from that file by the kernel (``copy_file_range``, else
``sendfile``), so ``upgrade``/``init`` of a big model cost about what ``cp``
does and never read its weights into this process; the copies start the
output's writeback as they go, so the final fsync waits for little.  Files
are written atomically (temp file in the same directory, fsync, rename).
"""

from __future__ import annotations

import errno
import functools
import math
import mmap
import os
import weakref
from dataclasses import dataclass
from typing import BinaryIO, Callable, Collection, Dict, List, NamedTuple, Optional, Sequence, Tuple, TypeVar, Union

import numpy as np
from google.protobuf.message import DecodeError, Message

from ..errors import CaffeFtError
from .wire import text  # noqa: F401  (re-exported: caffemodel.text)
from .wire import (
    BYTES,
    FIXED32,
    FIXED64,
    VARINT,
    Buffer,
    Corrupt,
    Record,
    key_bytes,
    read_record,
    read_varint,
    records,
    varint_bytes,
)
from .files import compression_error
from .limits import shape_problem
from .schema import Schema

T = TypeVar("T")


# Where the blobs live.  These numbers are Caffe's wire format, fixed since
# 2014; _check_layout makes sure a custom schema agrees with them.
_LAYER = 100  # NetParameter.layer (LayerParameter)
_LAYERS = 2  # NetParameter.layers (V1LayerParameter)
_LAYER_BLOBS = 7  # LayerParameter.blobs
_V1_BLOBS = 6  # V1LayerParameter.blobs
_V1_V0_LAYER = 1  # V1LayerParameter.layer: the V0LayerParameter of ancient nets
_V0_BLOBS = 50  # V0LayerParameter.blobs
_HISTORY = 3  # SolverState.history

# BlobProto fields.
_LEGACY_DIMS = ("num", "channels", "height", "width")  # fields 1..4, int32
_F32 = np.dtype("<f4")
_F64 = np.dtype("<f8")
# field number -> (which array, its element type on the wire)
_ARRAYS: Dict[int, Tuple[str, np.dtype]] = {5: ("data", _F32), 6: ("diff", _F32), 8: ("data", _F64), 9: ("diff", _F64)}
_ARRAY_FIELD = {(name, dtype): number for number, (name, dtype) in _ARRAYS.items()}
_SHAPE = 7  # BlobShape, whose field 1 is packed int64 dim
# One-byte keys of the array fields written unpacked (fixed32 floats, fixed64 doubles).
_UNPACKED_KEYS = {number << 3 | (FIXED32 if dtype == _F32 else FIXED64) for number, (_, dtype) in _ARRAYS.items()}

_WRITE_CHUNK = 1 << 22  # elements converted at a time when an array needs conversion


@dataclass(eq=False)
class Blob:
    """One ``BlobProto``: an array and what its record looked like.

    ``data`` has shape ``shape``; it is float32 (``data`` on the wire) or
    float64 (``double_data``), and so is ``diff`` when present.  Arrays read
    from a file are read-only views on it.  ``legacy_dims`` names the
    ``num``/``channels``/``height``/``width`` fields the record had (old files
    give the 4-D shape that way) and ``shape_field`` says whether it had a
    ``BlobShape``: both exist only so that a file is written back exactly.
    """

    shape: Tuple[int, ...]
    data: np.ndarray
    diff: Optional[np.ndarray] = None
    legacy_dims: Tuple[str, ...] = ()
    shape_field: bool = True

    @classmethod
    def of(cls, data: np.ndarray, diff: Optional[np.ndarray] = None) -> "Blob":
        """A current-format blob holding ``data`` (float32 unless it is float64) and ``diff``."""
        array = np.asarray(data)
        if array.dtype != np.float64:
            array = array.astype(np.float32)
        return cls(tuple(array.shape), array, None if diff is None else np.asarray(diff, array.dtype))

    @property
    def count(self) -> int:
        """Number of values in ``data``."""
        return math.prod(self.shape)


def _layer_name(layer: Message) -> str:
    """A layer's name; an ancient (V0) layer keeps it in its nested ``layer``."""
    if layer.name:
        return text(layer.name)
    if "layer" in layer.DESCRIPTOR.fields_by_name and layer.HasField("layer"):
        return text(layer.layer.name)
    return ""


@dataclass(eq=False)
class Model:
    """A caffemodel: its ``NetParameter`` without weights, and the weights.

    ``blobs[i]`` are the blobs of the ``i``-th entry of ``net.layer`` (or of
    ``net.layers`` for a V1/V0 file, which has no ``layer``); the blob fields
    of ``net`` itself stay empty.  ``v0`` marks an ancient file whose blobs sit
    in each entry's nested V0 ``layer`` message.
    """

    net: Message
    blobs: List[List[Blob]]
    v0: bool = False

    @property
    def layer_field(self) -> str:
        """``"layer"`` (current format) or ``"layers"`` (V1 and V0 files)."""
        return "layers" if len(self.net.layers) and not len(self.net.layer) else "layer"

    @property
    def layers(self) -> Sequence[Message]:
        """The layer messages ``blobs`` is aligned with."""
        return getattr(self.net, self.layer_field)  # type: ignore[no-any-return]

    def layer_blobs(self) -> Dict[str, List[Blob]]:
        """Blobs by layer name; of two layers with one name the later wins, as in Caffe's copy."""
        return {_layer_name(layer): blobs for layer, blobs in zip(self.layers, self.blobs)}

    @property
    def param_count(self) -> int:
        """Number of weights (``data`` values) over all blobs."""
        return sum(blob.count for blobs in self.blobs for blob in blobs)

    @property
    def nbytes(self) -> int:
        """Bytes of all ``data`` and ``diff`` arrays."""
        return sum(
            blob.data.nbytes + (0 if blob.diff is None else blob.diff.nbytes)
            for blobs in self.blobs
            for blob in blobs
        )


@dataclass(eq=False)
class SolverState:
    """A ``.solverstate``: the ``SolverState`` message without ``history``, and the history."""

    state: Message
    history: List[Blob]


# --------------------------------------------------------------- wire reading --


def _need_bytes(record: Record, what: str) -> None:
    if record.wire != BYTES:
        raise Corrupt(record.start, f"{what} (field {record.field}) has wire type {record.wire}, not a message")


def _int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _int32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


# -------------------------------------------------------------- blob decoding --


def _unpacked_run(buf: Buffer, pos: int, end: int, key: int, dtype: np.dtype) -> Tuple[np.ndarray, int]:
    """A strided view on the run of unpacked fixed-size values starting at ``pos``.

    Unpacked repeated floats are ``key value key value …``; their keys are one
    byte, so the run is found by comparing every ``1 + itemsize``-th byte with
    the key, in windows that double, without a Python loop per value.
    """
    stride = 1 + dtype.itemsize
    slots = (end - pos) // stride
    if slots == 0:
        raise Corrupt(pos, f"truncated: a {dtype.itemsize}-byte value runs past byte {end}")
    keys = np.frombuffer(buf, np.uint8, count=slots * stride, offset=pos)[::stride]
    count, window = 0, 1024
    while count < slots:
        chunk = keys[count : count + window]
        misses = np.flatnonzero(chunk != key)
        if misses.size:
            count += int(misses[0])
            break
        count += chunk.size
        window *= 2
    view = np.ndarray((count,), dtype, buffer=buf, offset=pos + 1, strides=(stride,))  # type: ignore[call-overload]
    return view, pos + count * stride


def _packed(buf: Buffer, record: Record, dtype: np.dtype) -> np.ndarray:
    size = record.end - record.value_start
    if size % dtype.itemsize:
        raise Corrupt(record.start, f"packed field {record.field} holds {size} bytes, not a whole number of values")
    return np.frombuffer(buf, dtype, count=size // dtype.itemsize, offset=record.value_start)


def _dims(buf: Buffer, start: int, end: int) -> List[int]:
    """The ``dim`` values of a ``BlobShape``, packed or not."""
    dims: List[int] = []
    for record in records(buf, start, end):
        if record.field == 1 and record.wire == VARINT:
            dims.append(_int64(record.value))
        elif record.field == 1 and record.wire == BYTES:
            pos = record.value_start
            while pos < record.end:
                value, pos = read_varint(buf, pos, record.end)
                dims.append(_int64(value))
        else:
            raise Corrupt(record.start, f"unexpected field {record.field} in a BlobShape")
    return dims


def _join(parts: List[np.ndarray], dtype: np.dtype) -> np.ndarray:
    """One array from the occurrences of a repeated field: a view if there was one."""
    if not parts:
        return np.empty(0, dtype)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _decode_blob(buf: Buffer, start: int, end: int) -> Blob:
    """Decode the ``BlobProto`` in ``buf[start:end]`` with views for its arrays."""
    legacy: Dict[str, int] = {}
    dims: Optional[List[int]] = None
    parts: Dict[Tuple[str, np.dtype], List[np.ndarray]] = {key: [] for key in _ARRAY_FIELD}
    pos = start
    while pos < end:
        if buf[pos] in _UNPACKED_KEYS:
            name, dtype = _ARRAYS[buf[pos] >> 3]
            view, pos = _unpacked_run(buf, pos, end, buf[pos], dtype)
            parts[(name, dtype)].append(view)
            continue
        record = read_record(buf, pos, end)
        array = _ARRAYS.get(record.field)
        if 1 <= record.field <= 4 and record.wire == VARINT:
            legacy[_LEGACY_DIMS[record.field - 1]] = _int32(record.value)
        elif array is not None and record.wire == BYTES:
            if record.end > record.value_start:
                parts[array].append(_packed(buf, record, array[1]))
        elif record.field == _SHAPE and record.wire == BYTES:
            dims = (dims or []) + _dims(buf, record.value_start, record.end)
        else:
            raise Corrupt(pos, f"unexpected field {record.field} (wire type {record.wire}) in a BlobProto")
        pos = record.end
    arrays = {}
    for name in ("data", "diff"):
        floats, doubles = parts[(name, _F32)], parts[(name, _F64)]
        if floats and doubles:
            raise Corrupt(start, f"the blob has both float and double {name}")
        arrays[name] = _join(doubles, _F64) if doubles else _join(floats, _F32)
    return _shaped_blob(legacy, dims, arrays["data"], arrays["diff"], start)


def _shaped_blob(
    legacy: Dict[str, int], dims: Optional[List[int]], data: np.ndarray, diff: np.ndarray, offset: int
) -> Blob:
    """Check the arrays against the shape (as Caffe's ``Blob::FromProto`` does) and reshape them."""
    if legacy:
        shape = tuple(legacy.get(name, 0) for name in _LEGACY_DIMS)
        if dims is not None and tuple(dims) != shape:
            raise Corrupt(offset, f"the blob's 4-D shape {shape} and its BlobShape {tuple(dims)} differ")
    else:
        shape = tuple(dims or ())
    problem = shape_problem(shape)
    if problem is not None:
        raise Corrupt(offset, f"the blob's {problem[4:]}")
    count = math.prod(shape)
    if data.size != count:
        raise Corrupt(offset, f"the blob's shape {shape} holds {count} values but its data has {data.size}")
    if diff.size not in (0, count):
        raise Corrupt(offset, f"the blob's shape {shape} holds {count} values but its diff has {diff.size}")
    return Blob(
        shape,
        data.reshape(shape),
        diff.reshape(shape) if diff.size else None,
        tuple(name for name in _LEGACY_DIMS if name in legacy),
        dims is not None,
    )


# --------------------------------------------------------------- file reading --


class _Source(NamedTuple):
    """A mapped file: a descriptor open on it (closed with the map) and where the map starts."""

    fd: int
    address: int


# Each live map made by _map -> its file, so that unchanged arrays can be copied
# file to file (see _file_range).  Entries go away with their maps.
_SOURCES: "weakref.WeakKeyDictionary[mmap.mmap, _Source]" = weakref.WeakKeyDictionary()


def _map(path: str) -> mmap.mmap:
    """Memory-map ``path`` read-only, remembering the file for :func:`_file_range`."""
    try:
        with open(path, "rb") as handle:
            if os.fstat(handle.fileno()).st_size == 0:
                raise CaffeFtError("the file is empty", path)
            buf = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            fd = os.dup(handle.fileno())
        weakref.finalize(buf, os.close, fd)
        _SOURCES[buf] = _Source(fd, np.frombuffer(buf, np.uint8, count=1).ctypes.data)
        return buf
    except OSError as exc:
        raise CaffeFtError(f"cannot read: {exc.strerror}", path) from None
    except ValueError as exc:  # mmap refuses e.g. a pipe
        raise CaffeFtError(f"cannot map the file: {exc}", path) from None


def _looks_like_text(head: bytes) -> bool:
    """Whether ``head`` is printable UTF-8 text, as a prototxt is."""
    for cut in range(4):  # the head may end inside a multi-byte character
        try:
            text = head[: len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        return bool(text) and all(ch.isprintable() or ch in "\t\n\r\f\v" for ch in text)
    return False


def _corrupt_error(path: str, buf: Buffer, kind: str, exc: Corrupt) -> CaffeFtError:
    """The user's error for a malformed file, guessing what the file is instead."""
    head = bytes(buf[:4096])
    compressed = compression_error(head, path)
    if compressed is not None:
        return compressed
    if head.startswith(b"\x89HDF"):
        return CaffeFtError(f"this is an HDF5 file; caffe-ft reads only binary protobuf {kind} files", path)
    if _looks_like_text(head):
        return CaffeFtError(f"this is a text file (a prototxt?), not a binary {kind}", path)
    return CaffeFtError(f"not a valid {kind}: {exc.message} (at byte {exc.offset})", path)


def _parse_into(message: Message, data: bytes, offset: int, what: str) -> None:
    try:
        message.MergeFromString(data)
    except (DecodeError, ValueError) as exc:
        if "codec can't decode" in str(exc):  # only protobuf's pure-Python runtime checks proto2 strings
            field = str(exc).rpartition("in field: ")[2] or "a string"
            raise Corrupt(offset, f"{what}: {field} is not UTF-8, which protobuf's pure-Python runtime refuses "
                                  "(Caffe and protobuf's C runtimes read it): unset "
                                  "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION") from None
        raise Corrupt(offset, f"{what} does not parse ({exc})") from None


@functools.lru_cache(maxsize=None)
def _check_layout(schema: Schema) -> None:
    """Refuse a schema whose blob fields are not where Caffe's are (this module hard-codes them)."""
    expected = {
        ("NetParameter", "layer"): _LAYER,
        ("NetParameter", "layers"): _LAYERS,
        ("LayerParameter", "blobs"): _LAYER_BLOBS,
        ("V1LayerParameter", "blobs"): _V1_BLOBS,
        ("SolverState", "history"): _HISTORY,
        ("BlobProto", "shape"): _SHAPE,
        **{("BlobProto", name): number for number, name in enumerate(_LEGACY_DIMS, 1)},
        **{("BlobProto", ("double_" if dtype == _F64 else "") + name): number for (name, dtype), number in _ARRAY_FIELD.items()},
    }
    for (message, name), number in expected.items():
        found = schema.descriptor(message).fields_by_name.get(name)
        if found is None or found.number != number:
            raise CaffeFtError(f"the schema's {message}.{name} is not field {number} as in Caffe", schema.path)


@dataclass
class _ScannedLayer:
    """A layer record split into its bytes without blobs and its blob payloads."""

    offset: int
    stripped: bytes
    blob_spans: List[Tuple[int, int]]
    v0: bool  # the blobs were in the nested V0 layer


def _strip(buf: Buffer, start: int, end: int, blob_field: int) -> Tuple[bytes, List[Tuple[int, int]]]:
    """The message in ``buf[start:end]`` without its ``blob_field`` records, and their payloads."""
    kept: List[bytes] = []
    spans: List[Tuple[int, int]] = []
    gap = start
    for record in records(buf, start, end):
        if record.field == blob_field:
            _need_bytes(record, "blobs")
            kept.append(buf[gap : record.start])
            spans.append((record.value_start, record.end))
            gap = record.end
    kept.append(buf[gap:end])
    return b"".join(kept), spans


def _scan_v1_layer(buf: Buffer, record: Record) -> _ScannedLayer:
    """Split a V1 layer, whose blobs may instead be inside its nested V0 layer."""
    kept: List[bytes] = []
    spans: List[Tuple[int, int]] = []
    nested: List[Tuple[int, int]] = []
    for part in records(buf, record.value_start, record.end):
        if part.field == _V1_BLOBS:
            _need_bytes(part, "blobs")
            spans.append((part.value_start, part.end))
            continue
        if part.field == _V1_V0_LAYER and part.wire == BYTES:
            inner, inner_spans = _strip(buf, part.value_start, part.end, _V0_BLOBS)
            if inner_spans:
                nested.extend(inner_spans)
                kept.append(key_bytes(_V1_V0_LAYER, BYTES) + varint_bytes(len(inner)) + inner)
                continue
        kept.append(buf[part.start : part.end])
    if spans and nested:
        raise Corrupt(record.start, "a layer has blobs both in itself and in its nested V0 layer")
    return _ScannedLayer(record.start, b"".join(kept), spans or nested, bool(nested))


def _scan_net(buf: Buffer) -> Tuple[bytes, int, List[_ScannedLayer]]:
    """Split a NetParameter: (other top-level fields, layer field number, layers)."""
    other: List[bytes] = []
    layers: List[_ScannedLayer] = []
    numbers = set()
    for record in records(buf, 0, len(buf)):
        if record.field == _LAYER:
            _need_bytes(record, "layer")
            stripped, spans = _strip(buf, record.value_start, record.end, _LAYER_BLOBS)
            layers.append(_ScannedLayer(record.start, stripped, spans, False))
        elif record.field == _LAYERS:
            _need_bytes(record, "layers")
            layers.append(_scan_v1_layer(buf, record))
        else:
            other.append(buf[record.start : record.end])
            continue
        numbers.add(record.field)
    if not layers:
        raise Corrupt(0, "it holds no layers")
    if len(numbers) > 1:
        raise Corrupt(0, "it has both 'layer' and V1 'layers' fields, which Caffe refuses")
    if len({layer.v0 for layer in layers if layer.blob_spans}) > 1:
        raise Corrupt(0, "some layers keep their blobs in V0 layers and some do not")
    return b"".join(other), numbers.pop(), layers


def _decode_blobs(buf: Buffer, spans: List[Tuple[int, int]], owner: str) -> List[Blob]:
    blobs = []
    for index, (start, end) in enumerate(spans):
        try:
            blobs.append(_decode_blob(buf, start, end))
        except Corrupt as exc:
            raise Corrupt(exc.offset, f"{owner}, blob {index}: {exc.message}") from None
    return blobs


def _read_model(buf: Buffer, schema: Schema) -> Model:
    other, number, scanned = _scan_net(buf)
    net = schema.new("NetParameter")
    _parse_into(net, other, 0, "the net's top-level fields")
    container = net.layer if number == _LAYER else net.layers
    blobs = []
    for index, layer in enumerate(scanned):
        message = container.add()
        _parse_into(message, layer.stripped, layer.offset, f"layer {index}")
        owner = f"layer {index} '{_layer_name(message)}'"
        blobs.append(_decode_blobs(buf, layer.blob_spans, owner))
    return Model(net, blobs, any(layer.v0 for layer in scanned))


def _read_file(path: str, schema: Schema, kind: str, read: Callable[[Buffer, Schema], T]) -> T:
    """Map ``path`` and decode it with ``read(buf, schema)``, turning wire errors into ours."""
    _check_layout(schema)
    buf = _map(path)
    try:
        return read(buf, schema)
    except Corrupt as exc:
        raise _corrupt_error(path, buf, kind, exc) from None


def load_model(path: str, schema: Schema) -> Model:
    """Read a binary caffemodel (current, V1 or V0 format) without copying its weights."""
    return _read_file(path, schema, "caffemodel", _read_model)


def _read_blob(buf: Buffer, schema: Schema) -> Blob:
    return _decode_blob(buf, 0, len(buf))


def load_blob(path: str, schema: Schema) -> Blob:
    """Read a ``.binaryproto`` file (one ``BlobProto``, e.g. a mean image)."""
    return _read_file(path, schema, "binaryproto blob", _read_blob)


def _read_solverstate(buf: Buffer, schema: Schema) -> SolverState:
    other: List[bytes] = []
    spans: List[Tuple[int, int]] = []
    for record in records(buf, 0, len(buf)):
        if record.field == _HISTORY:
            _need_bytes(record, "history")
            spans.append((record.value_start, record.end))
        else:
            other.append(buf[record.start : record.end])
    state = schema.new("SolverState")
    _parse_into(state, b"".join(other), 0, "the solver state's fields")
    return SolverState(state, _decode_blobs(buf, spans, "history"))


def load_solverstate(path: str, schema: Schema) -> SolverState:
    """Read a binary ``.solverstate`` snapshot with its history blobs as views."""
    return _read_file(path, schema, "solverstate", _read_solverstate)


# --------------------------------------------------------------- wire writing --


class _Array(NamedTuple):
    """An array to stream as little-endian ``dtype`` values; ``finite`` is the
    (layer, blob) of a ``data`` array that must hold finite values only."""

    array: np.ndarray
    dtype: np.dtype
    finite: Optional[Tuple[int, int]] = None


class NotFinite(CaffeFtError):
    """A blob that :func:`save_model`'s ``finite`` named holds a NaN or an inf;
    nothing was written.  ``layer_index`` and ``blob_index`` index ``Model.blobs``."""

    def __init__(self, layer: int, blob: int) -> None:
        super().__init__(f"layer {layer}, blob {blob} holds NaN or inf values")
        self.layer_index, self.blob_index = layer, blob


Piece = Union[bytes, _Array]


def _size(pieces: Sequence[Piece]) -> int:
    return sum(len(p) if isinstance(p, bytes) else p.array.size * p.dtype.itemsize for p in pieces)


def _delimited(field: int, pieces: List[Piece]) -> List[Piece]:
    """``pieces`` as the payload of length-delimited field ``field``."""
    return [key_bytes(field, BYTES) + varint_bytes(_size(pieces)), *pieces]


def _wire_dtype(array: np.ndarray, what: str) -> np.dtype:
    if array.dtype.kind != "f":
        raise CaffeFtError(f"{what} must hold floating-point values, not {array.dtype}")
    return _F64 if array.dtype.itemsize == 8 else _F32


def _blob_pieces(blob: Blob, what: str, finite: Optional[Tuple[int, int]] = None) -> List[Piece]:
    """The ``BlobProto`` payload of ``blob``, fields in number order as C++ writes them
    (``finite``: the blob's (layer, blob) when its ``data`` must be finite)."""
    shape = tuple(int(dim) for dim in blob.shape)
    if any(dim < 0 for dim in shape):
        raise CaffeFtError(f"{what}: the shape {shape} has a negative dimension")
    fields: Dict[int, List[Piece]] = {}
    if blob.legacy_dims:
        if len(shape) != 4 or max(shape) >= 1 << 31:
            raise CaffeFtError(f"{what}: a blob with num/channels/height/width needs a 4-D int32 shape, not {shape}")
        for number, (name, dim) in enumerate(zip(_LEGACY_DIMS, shape), 1):
            if name in blob.legacy_dims or dim:
                fields[number] = [key_bytes(number, VARINT) + varint_bytes(dim)]
    if blob.shape_field or (not blob.legacy_dims and shape):
        dims = b"".join(varint_bytes(dim) for dim in shape)
        fields[_SHAPE] = _delimited(_SHAPE, _delimited(1, [dims]) if dims else [])
    for name, array in (("data", blob.data), ("diff", blob.diff)):
        if array is None:
            continue
        array = np.asarray(array)
        if array.size != math.prod(shape):
            raise CaffeFtError(f"{what}: its {name} has {array.size} values but its shape {shape} holds {math.prod(shape)}")
        dtype = _wire_dtype(array, f"{what}: its {name}")
        if array.size:
            number = _ARRAY_FIELD[(name, dtype)]
            fields[number] = _delimited(number, [_Array(array, dtype, finite if name == "data" else None)])
    return [piece for number in sorted(fields) for piece in fields[number]]


def _serialize(message: Message) -> bytes:
    try:
        return message.SerializeToString(deterministic=True)  # type: ignore[no-any-return]
    except TypeError:  # a runtime without the keyword
        return message.SerializeToString()  # type: ignore[no-any-return]


def _splice(body: bytes, blob_field: int, known: Dict[int, object], blobs: List[List[Piece]]) -> List[Piece]:
    """Insert blob records into a serialized message where C++ would write them.

    C++ writes known fields in number order, then unknown ones; the blobs go
    before the first field with a higher number or the first unknown one.
    """
    where = len(body)
    for record in records(body, 0, len(body)):
        if record.field > blob_field or record.field not in known:
            where = record.start
            break
    pieces = [piece for blob in blobs for piece in _delimited(blob_field, blob)]
    return [body[:where], *pieces, body[where:]]


def _v0_splice(body: bytes, v1: Message, blobs: List[List[Piece]], what: str) -> List[Piece]:
    """Insert blob records into the nested V0 layer of a serialized V1 layer."""
    known = v1.layer.DESCRIPTOR.fields_by_number
    for record in records(body, 0, len(body)):
        if record.field == _V1_V0_LAYER:
            inner = _splice(body[record.value_start : record.end], _V0_BLOBS, known, blobs)
            return [body[: record.start], *_delimited(_V1_V0_LAYER, inner), body[record.end :]]
    raise CaffeFtError(f"{what} has no nested V0 layer to hold its blobs")


def _model_pieces(model: Model, finite: Collection[Tuple[int, int]] = ()) -> List[Piece]:
    """The whole caffemodel as pieces, checking that ``model`` is consistent
    (``finite`` as for :func:`save_model`)."""
    if len(model.net.layer) and len(model.net.layers):
        raise CaffeFtError("the net has both 'layer' and V1 'layers' fields, which Caffe refuses")
    layers = model.layers
    if len(model.blobs) != len(layers):
        raise CaffeFtError(f"the model has blobs for {len(model.blobs)} layers but its net has {len(layers)}")
    number = _LAYER if model.layer_field == "layer" else _LAYERS
    v0 = model.v0 and number == _LAYERS
    data = _serialize(model.net)
    out: List[Piece] = []
    index = 0
    for record in records(data, 0, len(data)):
        if record.field != number:
            out.append(data[record.start : record.end])
            continue
        layer, blobs = layers[index], model.blobs[index]
        what = f"layer {index} '{_layer_name(layer)}'"
        if len(layer.blobs) or (v0 and layer.HasField("layer") and len(layer.layer.blobs)):
            raise CaffeFtError(f"{what} holds blobs in its message; keep them in Model.blobs")
        pieces = [_blob_pieces(blob, f"{what}, blob {k}", (index, k) if (index, k) in finite else None)
                  for k, blob in enumerate(blobs)]
        body = data[record.value_start : record.end]
        if v0 and pieces:
            out.extend(_delimited(number, _v0_splice(body, layer, pieces, what)))
        else:
            blob_field = _LAYER_BLOBS if number == _LAYER else _V1_BLOBS
            out.extend(_delimited(number, _splice(body, blob_field, layer.DESCRIPTOR.fields_by_number, pieces)))
        index += 1
    return out


def _write_array(handle: BinaryIO, array: np.ndarray, dtype: np.dtype) -> None:
    """Stream ``array`` in C order as ``dtype``, converting a bounded chunk at a time."""
    if array.dtype == dtype and array.flags.c_contiguous:
        handle.write(array.reshape(-1).view(np.uint8).data)
        return
    rows = array.reshape(-1, 1) if array.ndim < 2 else array  # a view, even of a strided vector
    step = max(1, _WRITE_CHUNK // max(1, rows[0].size))
    for first in range(0, rows.shape[0], step):
        handle.write(np.ascontiguousarray(rows[first : first + step], dtype=dtype).reshape(-1).view(np.uint8).data)


def _file_range(array: np.ndarray, dtype: np.dtype) -> Optional[Tuple[int, int]]:
    """(descriptor, offset) of the file bytes that ``array`` written as ``dtype`` would be, if any.

    That is when ``array`` is a contiguous ``dtype`` view on a map made by
    :func:`_map` (numpy keeps the map as the base of its views, possibly
    through a memoryview): its bytes are then exactly the file's bytes from
    the offset on.
    """
    if array.dtype != dtype or not array.flags.c_contiguous or not array.size:
        return None
    base: object = array
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):
        base = base.obj
    source = _SOURCES.get(base) if isinstance(base, mmap.mmap) else None
    if source is None:
        return None
    offset = array.ctypes.data - source.address
    if offset < 0 or offset + array.nbytes > len(base):  # type: ignore[arg-type]
        return None
    return source.fd, offset


# Errors that mean "this kernel or file system cannot copy this way": fall back.
_NO_KERNEL_COPY = {errno.ENOSYS, errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM, errno.EBADF}


#: The buffer of :func:`_buffered_copy`: small enough to stay in the CPU's cache.
_COPY_BUFFER = 1 << 19

_CHUNK = 1 << 16  # values checked at a time by all_finite: a 64 KiB bool temporary stays in the cache


def all_finite(data: np.ndarray) -> bool:
    """Whether every value of ``data`` is finite, without a temporary the size
    of ``data``: ``isfinite`` a chunk at a time (faster than one float64 sum,
    which ``init`` of a 500 MB model used to spend 0.12 s on, and exact)."""
    flat = data.reshape(-1)
    isfinite = np.isfinite
    return all(isfinite(flat[start:start + _CHUNK]).all() for start in range(0, flat.size, _CHUNK))


def _read_into(fd: int, buffer: memoryview, offset: int) -> int:
    """Fill ``buffer`` from ``fd`` at ``offset``; the bytes read (fewer only at the file's end)."""
    done = 0
    while done < len(buffer):
        got = os.preadv(fd, [buffer[done:]], offset + done) if hasattr(os, "preadv") else \
            _pread_into(fd, buffer[done:], offset + done)
        if got <= 0:
            break
        done += got
    return done


def _buffered_copy(src: int, offset: int, count: int, dst: int, piece: _Array) -> int:
    """Copy ``count`` bytes of ``src`` from ``offset`` to ``dst``'s position
    through one small buffer; the number of bytes copied (fewer at the source's end).

    A ``piece`` whose values must be finite is checked in the buffer as it
    passes (one read of the weights, from the cache, instead of a scan of the
    map before the copy): :class:`NotFinite` on the first NaN or inf."""
    buffer = memoryview(bytearray(min(_COPY_BUFFER, count)))
    check = piece.finite is not None
    if check:
        flags = np.empty(len(buffer) // piece.dtype.itemsize, np.bool_)
        isfinite = np.isfinite
    done = flushed = 0
    position = os.lseek(dst, 0, os.SEEK_CUR)
    while done < count:
        got = _read_into(src, buffer[:min(len(buffer), count - done)], offset + done)
        if got <= 0:
            break
        if check:
            values = np.frombuffer(buffer, piece.dtype, count=got // piece.dtype.itemsize)
            if not isfinite(values, out=flags[:values.size]).all():
                raise NotFinite(*piece.finite)  # type: ignore[misc]
        written = 0
        while written < got:
            written += os.write(dst, buffer[written:got])
        done += got
        if done - flushed >= _FLUSH_EVERY or done == count:
            _start_writeback(dst, position + flushed, done - flushed)
            flushed = done
    return done


#: Bytes copied between two calls of :func:`_start_writeback`.
_FLUSH_EVERY = 1 << 24


def _start_writeback(fd: int, offset: int, count: int) -> None:
    """Have the kernel start writing ``fd``'s bytes ``offset`` to ``offset + count``
    to disk now, without waiting for it.

    The output is fsynced at the end; a copy that leaves all of its dirty
    pages to that fsync waits for the disk after the copy (~0.25 s for 500 MB
    here), while pages handed to the disk as the copy goes are written during
    it.  Linux's ``sync_file_range(SYNC_FILE_RANGE_WRITE)`` starts that and
    keeps the pages cached (training reads a model it was just given);
    where it is missing the fsync does it all, as before."""
    start = _sync_file_range()
    if start is not None:
        start(fd, offset, count, _SYNC_FILE_RANGE_WRITE)  # a refusal (errno) changes only the speed


#: sync_file_range's flag: start writing the range's dirty pages, do not wait.
_SYNC_FILE_RANGE_WRITE = 2


@functools.lru_cache(maxsize=None)
def _sync_file_range() -> Optional[Callable[[int, int, int, int], int]]:
    """libc's ``sync_file_range`` (Linux), or None; Python's os module lacks it."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        call = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    call.restype = ctypes.c_int
    return call  # type: ignore[no-any-return]


def _pread_into(fd: int, buffer: memoryview, offset: int) -> int:
    data = os.pread(fd, len(buffer), offset)
    buffer[:len(data)] = data
    return len(data)


def _kernel_copy(src: int, offset: int, piece: _Array, handle: BinaryIO) -> int:
    """Copy ``piece``'s bytes, which are ``src``'s from ``offset`` on, to the
    end of ``handle`` file to file, never through the process's memory whole;
    the number of bytes copied, a multiple of the item size (fewer than all
    when the kernel cannot copy them all).

    Where the two files' offsets differ within a page (``init``'s output has
    other layer headers than its input), the kernel's copy shifts every page
    and takes twice the time of an aligned one (0.3-0.8 s for 500 MB on these
    machines); reading and writing through a buffer that stays in the CPU's
    cache takes about the aligned copy's time, so it is done that way there,
    checking ``piece.finite`` values on the way.  The kernel's copy never
    shows the bytes: those are checked on the map first."""
    count, unit = piece.array.nbytes, piece.dtype.itemsize
    handle.flush()
    dst, start = handle.fileno(), handle.tell()
    if (offset - start) % mmap.PAGESIZE:
        done = _buffered_copy(src, offset, count, dst, piece)
        done -= done % unit
        handle.seek(start + done)
        return done
    if piece.finite is not None and not all_finite(piece.array):
        raise NotFinite(*piece.finite)
    done = 0
    for how in ("copy_file_range", "sendfile"):
        if not hasattr(os, how):
            continue
        try:
            while done < count:
                want = min(count - done, _FLUSH_EVERY)
                if how == "copy_file_range":
                    step = os.copy_file_range(src, dst, want, offset + done, start + done)
                else:
                    os.lseek(dst, start + done, os.SEEK_SET)
                    step = os.sendfile(dst, src, offset + done, want)
                if step <= 0:  # the source is shorter than its map said: write from the map
                    break
                _start_writeback(dst, start + done, step)
                done += step
            break
        except OSError as exc:
            if exc.errno not in _NO_KERNEL_COPY:
                raise
    done -= done % unit
    handle.seek(start + done)
    return done


def _write_pieces(path: str, pieces: List[Piece]) -> None:
    """Write ``pieces`` to ``path`` atomically, streaming the arrays (unchanged
    ones file to file, see :func:`_file_range`); :class:`NotFinite`, and no
    file, when an array tagged ``finite`` holds a NaN or inf."""
    from .files import atomic_output

    with atomic_output(path) as handle:
        for piece in pieces:
            if isinstance(piece, bytes):
                handle.write(piece)
                continue
            source = _file_range(piece.array, piece.dtype)
            done = 0 if source is None else _kernel_copy(*source, piece, handle)
            if done < piece.array.nbytes:
                array = piece.array.reshape(-1)[done // piece.dtype.itemsize:] if done else piece.array
                if piece.finite is not None and not all_finite(array):
                    raise NotFinite(*piece.finite)
                _write_array(handle, array, piece.dtype)


def save_model(model: Model, path: str, finite: Collection[Tuple[int, int]] = ()) -> None:
    """Write ``model`` as Caffe would, atomically; arrays are streamed, never copied whole.

    ``finite`` names (layer, blob) indices of ``model.blobs`` whose ``data``
    must hold finite values only: they are checked as they are copied (one
    pass over the weights, not two) and a NaN or inf raises
    :class:`NotFinite`, leaving no output."""
    _write_pieces(path, _model_pieces(model, frozenset(finite)))


def save_blob(blob: Blob, path: str) -> None:
    """Write ``blob`` as a ``.binaryproto`` file, atomically."""
    _write_pieces(path, _blob_pieces(blob, "the blob"))


def upgrade_model(model: Model) -> List[str]:
    """Upgrade a legacy caffemodel in place, as Caffe does when it loads one.

    The net is upgraded like a prototxt; the blobs follow their layers (V0
    padding layers, which hold no weights, disappear).
    """
    from .upgrade import upgrade_net_with_map

    notes, index_map = upgrade_net_with_map(model.net)
    if notes:
        model.blobs = [model.blobs[i] if i is not None else [] for i in index_map]
        model.v0 = False
    return notes


def save_solverstate(state: SolverState, path: str) -> None:
    """Write a binary ``.solverstate`` as Caffe's ``SGDSolver`` does (fields in
    number order, history blobs spliced in at field 3), atomically."""
    if len(state.state.history):
        raise CaffeFtError("the SolverState message holds history blobs; keep them in SolverState.history")
    body = _serialize(state.state)
    pieces = [_blob_pieces(blob, f"history blob {k}") for k, blob in enumerate(state.history)]
    _write_pieces(path, _splice(body, _HISTORY, state.state.DESCRIPTOR.fields_by_number, pieces))
