"""The protobuf wire format, read and written by hand: varints, keys, records.

Caffe's binary files (caffemodel, binaryproto, solverstate) are protobuf
messages whose bulk is packed float arrays; decoding them field by field here
lets :mod:`caffe_ft.formats.caffemodel` map those arrays straight from the
file, and lets snapshots be edited without parsing them whole.  Errors are
:class:`Corrupt` with the byte offset; callers add the file name.
"""

from __future__ import annotations

import mmap
from typing import Iterator, NamedTuple, Tuple, Union

Buffer = Union[bytes, mmap.mmap]

# Wire types.
VARINT, FIXED64, BYTES, START_GROUP, END_GROUP, FIXED32 = 0, 1, 2, 3, 4, 5


class Corrupt(ValueError):
    """Malformed input at byte ``offset``; the public functions add the file name."""

    def __init__(self, offset: int, message: str) -> None:
        super().__init__(message)
        self.offset = offset
        self.message = message


class Record(NamedTuple):
    """One field occurrence: key at ``start``, payload ``[value_start, end)``."""

    field: int
    wire: int
    start: int
    value_start: int
    end: int
    value: int  # the number, for a varint; else 0


def read_varint(buf: Buffer, pos: int, end: int) -> Tuple[int, int]:
    """Decode the varint at ``pos``; return it and the position after it."""
    result = shift = 0
    start = pos
    while pos < end:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise Corrupt(start, "a varint is longer than 10 bytes")
    raise Corrupt(start, "truncated: the data ends inside a varint")


def read_payload(buf: Buffer, key_pos: int, pos: int, end: int, field: int, wire: int) -> Tuple[int, int, int]:
    """Read the payload of a field whose key ended at ``pos``: (varint value, start, end)."""
    if wire == VARINT:
        value, after = read_varint(buf, pos, end)
        return value, pos, after
    if wire == FIXED64:
        size = 8
    elif wire == FIXED32:
        size = 4
    elif wire == BYTES:
        size, pos = read_varint(buf, pos, end)
    elif wire == START_GROUP:
        return 0, pos, skip_group(buf, pos, end, field)
    else:
        raise Corrupt(key_pos, f"field {field} has invalid wire type {wire}")
    if pos + size > end:
        raise Corrupt(
            key_pos,
            f"truncated: field {field} needs {size} bytes from byte {pos}, "
            f"but its message ends at byte {end}",
        )
    return 0, pos, pos + size


def skip_group(buf: Buffer, pos: int, end: int, group: int) -> int:
    """Skip a (deprecated) group's fields up to its end-group key."""
    while pos < end:
        key, value_pos = read_varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if wire == END_GROUP:
            if field != group:
                raise Corrupt(pos, f"group {group} closed as group {field}")
            return value_pos
        pos = read_payload(buf, pos, value_pos, end, field, wire)[2]
    raise Corrupt(pos, f"truncated: group {group} never ends")


def read_record(buf: Buffer, pos: int, end: int) -> Record:
    """The field occurrence whose key starts at ``pos``."""
    key, value_pos = read_varint(buf, pos, end)
    field, wire = key >> 3, key & 7
    if field == 0:
        raise Corrupt(pos, "field number 0 is invalid")
    if wire == END_GROUP:
        raise Corrupt(pos, f"end of group {field} that never started")
    value, start, stop = read_payload(buf, pos, value_pos, end, field, wire)
    return Record(field, wire, pos, start, stop, value)


def records(buf: Buffer, start: int, end: int) -> Iterator[Record]:
    """The field occurrences of the message in ``buf[start:end]``, in order."""
    pos = start
    while pos < end:
        record = read_record(buf, pos, end)
        yield record
        pos = record.end


def varint_bytes(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative numbers take ten bytes, as in C++
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def key_bytes(field: int, wire: int) -> bytes:
    return varint_bytes(field << 3 | wire)
