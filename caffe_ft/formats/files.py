"""Reading and writing files: Caffe's text files, atomic writes, fingerprints.

Every write of caffe-ft goes through :func:`write_atomic` or
:func:`atomic_output`; binary Caffe files are read by
:mod:`caffe_ft.formats.caffemodel`, image lists by :mod:`caffe_ft.data`.
Text or binary is decided by content (a ``.prototxt`` that is really a
caffemodel is caught), nets and solvers by the fields they use.  Every problem
becomes a :class:`~caffe_ft.errors.CaffeFtError` naming the file; writes go to
a temporary file that is renamed over the target, so nothing is half-written.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Optional, Union

from google.protobuf.message import Message

from . import prototext
from ..errors import CaffeFtError
from .schema import Schema

_CHUNK = 1 << 20  # bytes hashed at a time

NET = "NetParameter"
SOLVER = "SolverParameter"
_CONTROL = frozenset(range(0x20)) - {0x09, 0x0A, 0x0B, 0x0C, 0x0D}
_SNIFF = 65536


def read_bytes(path: str) -> bytes:
    """The bytes of ``path``, or an error saying why it cannot be read."""
    if os.path.isdir(path):
        raise CaffeFtError("is a directory, not a file", path)
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise CaffeFtError("no such file", path) from None
    except OSError as exc:
        raise CaffeFtError(f"cannot read: {exc.strerror}", path) from None
    if not data.strip():
        raise CaffeFtError("file is empty", path)
    return data


def is_binary(data: bytes) -> bool:
    """Whether ``data`` looks like protobuf wire format rather than text."""
    head = data[:_SNIFF]
    if any(byte in _CONTROL for byte in head):
        return True
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut off at the sniff boundary is still text.
        return exc.start < len(head) - 4
    return False


def require_text(data: bytes, path: str) -> None:
    if is_binary(data):
        raise CaffeFtError(
            "this is a binary file (a caffemodel or binaryproto?); a text prototxt is expected here", path
        )


def guess_kind(tree: prototext.Node, schema: Schema) -> str:
    """``NetParameter`` or ``SolverParameter``, from the top-level field names."""
    names = {child.name for child in tree.children or ()}
    net_fields = schema.descriptor(NET).fields_by_name
    solver_fields = schema.descriptor(SOLVER).fields_by_name
    if names and all(name in solver_fields for name in names) and not all(
        name in net_fields for name in names
    ):
        return SOLVER
    return NET


@dataclass
class TextFile:
    """A parsed text prototxt: its path, bytes, syntax tree and message."""

    path: str
    data: bytes
    tree: prototext.Node
    message: Message

    @property
    def kind(self) -> str:
        return self.message.DESCRIPTOR.name


def parse_text(data: bytes, path: str, schema: Schema, kind: Optional[str] = None) -> TextFile:
    """Parse prototxt ``data``; ``kind`` is a message name, or None to guess."""
    require_text(data, path)
    tree = prototext.parse(data, path)
    kind = kind or guess_kind(tree, schema)
    message = prototext.to_message(tree, schema.new(kind), path)
    return TextFile(path, data, tree, message)


def load_text(path: str, schema: Schema, kind: Optional[str] = None) -> TextFile:
    """Read and parse a text net or solver."""
    return parse_text(read_bytes(path), path, schema, kind)


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: a synced temporary file in the
    same directory, renamed over ``path`` (keeping its mode) only when the
    block ends without an error, and removed otherwise."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, temp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise CaffeFtError(f"cannot write: {exc.strerror}", path) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, _file_mode(path))
        os.replace(temp, path)
    except BaseException as exc:
        try:
            os.unlink(temp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise CaffeFtError(f"cannot write: {exc.strerror}", path) from None
        raise


def _file_mode(path: str) -> int:
    """The mode of the file being replaced, or what ``open`` would give a new one."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_atomic(path: str, content: Union[str, bytes]) -> None:
    """Write ``content`` to ``path`` atomically (see :func:`atomic_output`)."""
    with atomic_output(path) as handle:
        handle.write(content.encode("utf-8") if isinstance(content, str) else content)


def load_net(path: str, schema: Schema) -> Message:
    """A text net in the current format (a legacy one is upgraded on load)."""
    from .upgrade import net_needs_upgrade, upgrade_net

    net = load_text(path, schema, NET).message
    if net_needs_upgrade(net):
        try:
            upgrade_net(net)
        except CaffeFtError as exc:
            raise exc.located(path) from None
    return net


def sha256_file(path: str) -> str:
    """Hex SHA-256 of a file's content."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(_CHUNK), b""):
                digest.update(chunk)
    except OSError as exc:
        raise CaffeFtError(f"cannot read: {exc.strerror}", path) from None
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
