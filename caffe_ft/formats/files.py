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
import os
import re
from itertools import chain
from operator import attrgetter

# shutil, tempfile, fcntl, time and hashlib are imported where they are used: the commands
# that only read (fmt, inspect, diff) never need them, and every start would pay for them.
from typing import BinaryIO, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

from typing import TYPE_CHECKING

from . import prototext
from ..errors import CaffeFtError
from .schema import Schema

if TYPE_CHECKING:
    from google.protobuf.message import Message

_CHUNK = 1 << 20  # bytes hashed at a time

NET = "NetParameter"
SOLVER = "SolverParameter"
_CONTROL = bytes(sorted(frozenset(range(0x20)) - {0x09, 0x0A, 0x0B, 0x0C, 0x0D}))
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


def read_head(path: str) -> bytes:
    """The first bytes of ``path``, enough for :func:`is_binary` to tell text
    from wire format, with the errors :func:`read_bytes` gives (a missing,
    unreadable or empty file) and a compressed file's.  A caffemodel is never
    read whole to sniff it."""
    if os.path.isdir(path):
        raise CaffeFtError("is a directory, not a file", path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(_SNIFF)
    except FileNotFoundError:
        raise CaffeFtError("no such file", path) from None
    except OSError as exc:
        raise CaffeFtError(f"cannot read: {exc.strerror}", path) from None
    if not head.strip():
        return read_bytes(path)  # all white space so far: empty, or text
    compressed = compression_error(head, path)
    if compressed is not None:
        raise compressed
    return head


def is_binary(data: bytes) -> bool:
    """Whether ``data`` looks like protobuf wire format rather than text.

    Text starts (after white space) with a field name or a comment and holds
    no NUL; a few stray control or non-UTF-8 bytes do not make it binary
    (Caffe's parser accepts control bytes in strings and reports the others
    at their line and column, and so does caffe-ft).  Wire format starts with
    a field key, a control byte for every field Caffe's files begin with.
    """
    head = data[:_SNIFF]
    if b"\x00" in head:
        return True
    start = head.lstrip(b" \t\r\n\f\v")[:1]
    if start and not (start.isalpha() or start in b"_#"):
        return True
    bad = len(head) - len(head.translate(None, _CONTROL))  # counted in C, not byte by byte
    bad += head.decode("utf-8", "replace").count("\ufffd")
    return bad * 4 > len(head)


#: Magic numbers of the compressors Caffe files travel in (caffe-doc ships
#: its prototxts gzipped), with the command that undoes each.
_COMPRESSORS = (
    (b"\x1f\x8b", "gzip", "gunzip"),
    (b"\xfd7zXZ\x00", "xz", "unxz"),
    (b"\x28\xb5\x2f\xfd", "zstd", "unzstd"),
    (b"PK\x03\x04", "zip", "unzip"),
)


def compression_error(head: bytes, path: str) -> Optional[CaffeFtError]:
    """The error for a compressed file (by its first bytes), or None: neither
    Caffe nor caffe-ft reads one, and 'binary file' would not say why."""
    kinds = [(name, undo) for magic, name, undo in _COMPRESSORS if head.startswith(magic)]
    if re.match(rb"BZh[1-9]1AY&SY", head):  # bzip2's magic, block size, block header
        kinds.append(("bzip2", "bunzip2"))
    if not kinds:
        return None
    name, undo = kinds[0]
    return CaffeFtError(f"this file is {name}-compressed; decompress it first (e.g. with {undo})", path)


def require_text(data: bytes, path: str) -> None:
    compressed = compression_error(data[:16], path)
    if compressed is not None:
        raise compressed
    if is_binary(data):
        raise CaffeFtError(
            "this is a binary file (a caffemodel or binaryproto?); a text prototxt is expected here", path
        )


def guess_kind(tree: prototext.Node, schema: Schema) -> str:
    """``NetParameter`` or ``SolverParameter``, from the top-level field names."""
    names = set(map(attrgetter("name"), tree.children or ()))
    net_fields = schema.table(NET).fields_by_name
    solver_fields = schema.table(SOLVER).fields_by_name
    if names and all(name in solver_fields for name in names) and not all(
        name in net_fields for name in names
    ):
        return SOLVER
    return NET


def read_fields(data: bytes, path: str, schema: Schema) -> Tuple[str, Iterator[prototext.Node]]:
    """What text file ``data`` holds (``NET`` or ``SOLVER``, as :func:`guess_kind`
    says) and its top-level nodes, parsed as they are read
    (:func:`prototext.parse_fields`): a net is known by its first field that a
    solver does not have, without parsing further."""
    fields = prototext.parse_fields(data, path)
    solver_fields = schema.table(SOLVER).fields_by_name
    read = []
    for node in fields:
        read.append(node)
        if node.name not in solver_fields:
            return NET, chain(read, fields)
    return guess_kind(prototext.Node("", read), schema), iter(read)


class TextFile(NamedTuple):
    """A parsed text prototxt: its path, bytes, syntax tree and message.

    (A named tuple, not a dataclass: ``fmt`` and ``diff`` would import
    ``dataclasses``, and with it ``inspect``, for this one class: ~4 ms a start.)"""

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
    guessed = guess_kind(tree, schema)
    if kind is not None and kind != guessed:
        try:
            message = prototext.to_message(tree, schema.new(kind), path)
        except CaffeFtError:
            wanted, found = ("net", "solver") if kind == NET else ("solver", "net")
            raise CaffeFtError(f"this is a {found}, not a {wanted} (give it where a {found} goes"
                               f"{', e.g. --solver' if found == 'solver' else ''})", path) from None
        return TextFile(path, data, tree, message)
    message = prototext.to_message(tree, schema.new(kind or guessed), path)
    return TextFile(path, data, tree, message)


def load_text(path: str, schema: Schema, kind: Optional[str] = None) -> TextFile:
    """Read and parse a text net or solver."""
    return parse_text(read_bytes(path), path, schema, kind)


def load_checked_tree(path: str, schema: Schema) -> Tuple[bytes, prototext.Node]:
    """Read a text net or solver and check it as :func:`load_text` does, without
    building its message (see :func:`prototext.check_tree`): its bytes and tree."""
    data = read_bytes(path)
    require_text(data, path)
    tree = prototext.parse(data, path)
    prototext.check_tree(tree, schema.table(guess_kind(tree, schema)), path)
    return data, tree


# ------------------------------------------------------------------ outputs --
#
# The output policy every writing command follows:
#
# * a target that is one of the command's inputs (same real path, or same
#   inode through a hard link) is refused, ``--force`` or not;
# * an existing target needs ``force``;
# * a write through a symlink goes to the link's target (the link stays);
# * a single file is written to a temporary file beside it and renamed over
#   it; several files are written into a staging folder beside them and moved
#   in only when all are written, under an exclusive lock on the folder, so a
#   failure leaves the previous state and a concurrent run fails clearly;
# * temporary files and staging folders of a killed run are removed by the
#   next one (each is locked while its writer lives, so a live one is left);
# * every ``OSError`` becomes one :class:`CaffeFtError` line naming the path.

STAGE_PREFIX = ".caffe-ft-stage-"
_PENDING = ".caffe-ft-pending-"  # a temporary file or folder not locked yet


def real_target(path: str) -> str:
    """Where a write to ``path`` lands: through symlinks, to the link's target."""
    return os.path.realpath(path)


def same_file(a: str, b: str) -> bool:
    """Whether ``a`` and ``b`` are one file: the same real path, or the same inode."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output(
    target: str, inputs: Iterable[Optional[str]] = (), force: bool = False, option: str = "-o",
    instead: str = "write elsewhere",
) -> str:
    """Refuse writing ``target`` when it is an input, or exists without ``force``.

    ``inputs`` are the command's input paths (None entries are skipped);
    ``option`` names the option that gave the target, and ``instead`` what to
    do when it names an input, for the message.  Returns the real path the
    write will go to.
    """
    for source in inputs:
        if source and same_file(target, source):
            raise CaffeFtError(f"{option} names an input of this command ({source}); {instead}", target)
    if os.path.isdir(target):
        raise CaffeFtError("is a directory, not a file", target)
    if not force and os.path.lexists(target):
        raise CaffeFtError(f"exists; choose another {option} or pass --force to overwrite", target)
    return real_target(target)


def _os_error(exc: OSError, path: str, verb: str = "cannot write") -> CaffeFtError:
    """One line for an ``OSError`` on an output, naming the path it happened to."""
    where = exc.filename if isinstance(exc.filename, str) else path
    return CaffeFtError(f"{verb}: {exc.strerror or exc}", where)


def make_dirs(directory: str) -> None:
    """Create ``directory`` and its parents, or say in one line why not."""
    if os.path.isdir(directory):
        return
    if os.path.lexists(directory):
        raise CaffeFtError("exists and is not a directory", directory)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise _os_error(exc, directory, "cannot create the directory") from None


def _try_lock(fd: int) -> bool:
    """Take an exclusive ``flock`` on ``fd`` without waiting; whether it was free."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def locked_temp(directory: str, prefix: str, suffix: str = "", folder: bool = False) -> Tuple[str, int]:
    """A new temporary file (or folder) ``prefix*suffix`` in ``directory``, and an
    open descriptor holding an exclusive ``flock`` on it.

    It is created under a pending name and renamed once locked, so a run
    cleaning up (:func:`remove_stale`) never sees it unlocked.
    """
    import fcntl
    import shutil
    import tempfile

    if folder:
        pending = tempfile.mkdtemp(prefix=_PENDING, dir=directory)
        fd = os.open(pending, os.O_RDONLY)
    else:
        fd, pending = tempfile.mkstemp(prefix=_PENDING, dir=directory)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        final = os.path.join(directory, prefix + os.path.basename(pending)[len(_PENDING):] + suffix)
        os.rename(pending, final)
    except BaseException:
        os.close(fd)
        shutil.rmtree(pending, ignore_errors=True) if folder else _unlink(pending)
        raise
    return final, fd


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def remove_stale(directory: str, prefix: str, suffix: str = "") -> List[str]:
    """Remove the temporary files and folders ``prefix*suffix`` in ``directory``
    left by killed runs: those nobody holds a lock on (and pending ones over a
    minute old).  Returns what went."""
    import shutil
    import time

    removed: List[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        path = os.path.join(directory, name)
        if name.startswith(_PENDING):
            try:
                if time.time() - os.lstat(path).st_mtime < 60:
                    continue
            except OSError:
                continue
        elif not (name.startswith(prefix) and name.endswith(suffix)):
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            if not _try_lock(fd):
                continue  # a live run is writing it
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
            removed.append(path)
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[BinaryIO]:
    """A binary file to write ``path`` through: a synced temporary file in the
    same directory, renamed over ``path`` (keeping its mode) only when the
    block ends without an error, and removed otherwise.

    A symlink ``path`` keeps being a link: its target is written.  The
    temporary file is locked while it is written, so the leftovers of a
    killed run (``.NAME.*.tmp``) are told from a live writer's and removed.
    """
    target = real_target(path)
    directory = os.path.dirname(target)
    prefix = f".{os.path.basename(target)}."
    if not os.path.isdir(directory):
        raise CaffeFtError("cannot write: the directory does not exist", path)
    remove_stale(directory, prefix, ".tmp")
    try:
        temp, fd = locked_temp(directory, prefix, ".tmp")
    except OSError as exc:
        raise _os_error(exc, path) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
            os.chmod(temp, _file_mode(target))
            os.replace(temp, target)
    except BaseException as exc:
        try:
            os.unlink(temp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise _os_error(exc, path) from None
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
        handle.write(content.encode("utf-8", "surrogateescape") if isinstance(content, str) else content)


class Staging:
    """Files being written into a staging folder, to be moved in together."""

    def __init__(self, stage: str, targets: Dict[str, str]) -> None:
        self.stage = stage
        self.targets = targets  # name -> real final path

    def path(self, name: str) -> str:
        """Where to write the file that will become ``name`` in the output folder."""
        if name not in self.targets:
            raise KeyError(name)
        return os.path.join(self.stage, name)

    def write(self, name: str, content: Union[str, bytes]) -> None:
        """Write ``name`` into the staging folder (synced)."""
        path = self.path(name)
        try:
            with open(path, "wb") as handle:
                handle.write(content.encode("utf-8", "surrogateescape") if isinstance(content, str) else content)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            raise _os_error(exc, self.targets[name]) from None


@contextlib.contextmanager
def staged_outputs(
    directory: str, names: Sequence[str], inputs: Iterable[Optional[str]] = (), force: bool = False,
    option: str = "-o",
) -> Iterator[Staging]:
    """Write the files ``names`` into ``directory`` all or nothing.

    The folder is created if needed and locked (``flock``) for the whole
    write, so a second run into it fails at once with a clear message.  Each
    target is checked as :func:`check_output` does (inputs refused, existing
    files only with ``force``) before anything is written; the files are
    written into a staging folder beside them and moved in only when the
    block ends without an error.  Staging folders of killed runs are removed.
    """
    import shutil

    make_dirs(directory)
    inputs = [source for source in inputs if source]
    try:
        lock = os.open(directory, os.O_RDONLY)
    except OSError as exc:
        raise _os_error(exc, directory, "cannot open the directory") from None
    try:
        if not _try_lock(lock):
            raise CaffeFtError("another caffe-ft run is writing to this directory; wait for it to finish", directory)
        real_dir = os.path.realpath(directory)
        remove_stale(real_dir, STAGE_PREFIX)
        for name in names:  # single-file writes of killed runs
            remove_stale(real_dir, f".{name}.", ".tmp")
        targets: Dict[str, str] = {}
        for name in names:
            shown = os.path.join(directory, name)
            check_output(shown, inputs, force, option)
            targets[name] = real_target(shown)
        try:
            stage, stage_fd = locked_temp(real_dir, STAGE_PREFIX, folder=True)
        except OSError as exc:
            raise _os_error(exc, directory) from None
        try:
            staging = Staging(stage, targets)
            yield staging
            for name in names:
                if not os.path.exists(staging.path(name)):
                    raise CaffeFtError(f"internal error: {name} was not written", directory)
            for name in names:
                temp = staging.path(name)
                target = targets[name]
                try:
                    os.chmod(temp, _file_mode(target))
                    os.replace(temp, target)
                except OSError as exc:
                    raise _os_error(exc, os.path.join(directory, name)) from None
            _fsync_dir(real_dir)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
            os.close(stage_fd)
    finally:
        os.close(lock)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
    import hashlib

    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(_CHUNK), b""):
                digest.update(chunk)
    except OSError as exc:
        raise CaffeFtError(f"cannot read: {exc.strerror}", path) from None
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()
