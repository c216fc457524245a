"""Where images and labels come from: Caffe image lists and LMDB directories.

:class:`DataSource` reads either, in order, and yields transformed batches;
its fingerprint changes whenever the list or any image it names changes.
This module holds the one reader of image lists (:func:`read_image_list`, as
Caffe's ``ImageData`` reads them) and of image headers (:func:`read_header`)
that pre-flight, the data sources, planning and the torch engine share, and
:func:`summarize`, what planning reads of a source, once.
"""

from __future__ import annotations

import io
import os
import re
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, Iterator, List, Optional, Tuple

from ..errors import CaffeFtError
from ..formats.files import sha256_file
from ..formats.schema import Schema
from .transform import Transform, decode_datum, read_image, transform_image

if TYPE_CHECKING:
    import numpy as np

_LABEL = re.compile(r"[+-]?\d+")


def image_path(root: str, name: str) -> str:
    """Where an image list entry lives: Caffe prefixes the root folder as a
    string; a root given without a trailing slash is taken as a directory."""
    if root and not root.endswith("/"):
        root += "/"
    return root + name


def read_image_list(path: str, what: str = "the image list") -> List[Tuple[str, int]]:
    """The ``(path, label)`` entries of a Caffe image list, line ``n`` entry ``n - 1``.

    Read as Caffe's ``ImageData`` reads it: each line (a final newline starts
    none; a trailing carriage return is dropped) split at its last space, the
    label an integer.  Caffe knows no comments and no blank lines: it would
    load an image named ``''`` (or ``'# ...'``) and abort, or train a line
    without a label as class 0, so such lines are refused here, naming the
    line.  ``what`` names the list in messages (preflight names its layer)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise CaffeFtError(f"cannot read {what}: {exc.strerror}", path) from None
    lines = data.decode("utf-8", "surrogateescape").split("\n")
    if lines[-1] == "":
        lines.pop()  # the newline ending the last line starts no line of its own
    entries = []
    for number, line in enumerate(lines, 1):
        line = line[:-1] if line.endswith("\r") else line
        name, space, label = line.rpartition(" ")
        if not line.strip():
            raise CaffeFtError("empty line (Caffe would try to load an image named '')", path, number)
        if not space or not name or not _LABEL.fullmatch(label):
            raise CaffeFtError(f"expected 'path label' with an integer label, found {line!r}", path, number)
        entries.append((name, int(label)))
    if not entries:
        raise CaffeFtError(f"{what} is empty (Caffe aborts on it)", path)
    return entries


@dataclass
class DataSource:
    """Images with labels, read in batches: an image list or an LMDB directory."""

    path: str
    root: str = ""
    entries: List[Tuple[str, int]] = field(default_factory=list)  # image lists only
    limit: Optional[int] = None  # LMDB: read only the first records

    @classmethod
    def open(cls, path: str, root: str = "") -> "DataSource":
        if os.path.isdir(path):
            if not os.path.exists(os.path.join(path, "data.mdb")):
                raise CaffeFtError("a directory given as data must be an LMDB (it has no data.mdb)", path)
            return cls(path)
        return cls(path, root, read_image_list(path))

    @property
    def is_lmdb(self) -> bool:
        return not self.entries

    def labels(self, schema: Schema) -> List[int]:
        """Every example's label (an LMDB's read from its Datums, as :func:`labels_of` does)."""
        return labels_of(self.path, schema) if self.is_lmdb else [label for _, label in self.entries]

    def __len__(self) -> int:
        if self.is_lmdb:
            with self._lmdb() as env:
                count = int(env.stat()["entries"])
            return count if self.limit is None else min(count, self.limit)
        return len(self.entries)

    def fingerprint(self) -> str:
        """Digest of the list and of each image's size and mtime (LMDB: of data.mdb's)."""
        import hashlib

        digest = hashlib.sha256()
        if self.is_lmdb:
            stat = os.stat(os.path.join(self.path, "data.mdb"))
            digest.update(f"lmdb {stat.st_size} {stat.st_mtime_ns}".encode())
            return digest.hexdigest()
        digest.update(sha256_file(self.path).encode())
        digest.update(self.root.encode("utf-8"))
        for name, _ in self.entries:
            where = image_path(self.root, name)
            try:
                stat = os.stat(where)
            except OSError:
                raise CaffeFtError(f"image '{name}' not found (looked at {where})", self.path) from None
            digest.update(f"{where}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode("utf-8"))
        return digest.hexdigest()

    def _lmdb(self) -> Any:
        try:
            import lmdb
        except ImportError:
            raise CaffeFtError(
                "reading an LMDB needs the Python 'lmdb' module (Debian: python3-lmdb), "
                "or give an image list instead", self.path) from None
        return lmdb.open(self.path, readonly=True, lock=False, readahead=False)

    def items(self, schema: Schema, transform: Transform) -> Iterator[Tuple["np.ndarray", int, str]]:
        """(C x H x W image before the TEST transform, label, source name) in order."""
        if not self.is_lmdb:
            for name, label in self.entries:
                yield read_image(image_path(self.root, name), transform), label, name
            return
        with self._lmdb() as env, env.begin() as txn:
            for index, (key, value) in enumerate(txn.cursor()):
                if index == self.limit:
                    return
                try:
                    image, label = decode_datum(bytes(value), schema, transform)
                except Exception as exc:  # noqa: BLE001 - protobuf and OpenCV errors alike
                    message = exc.message if isinstance(exc, CaffeFtError) else f"not a Datum ({exc})"
                    raise CaffeFtError(f"record '{bytes(key).decode(errors='replace')}': {message}",
                                       self.path) from None
                yield image, label, bytes(key).decode("utf-8", errors="replace")

    def batches(self, schema: Schema, transform: Transform, mean: Optional["np.ndarray"], size: int
                ) -> Iterator[Tuple["np.ndarray", "np.ndarray", List[str]]]:
        """Transformed inputs (N x C x H x W float32), labels and names, ``size`` at a time."""
        import numpy as np

        images: List[np.ndarray] = []
        labels: List[int] = []
        names: List[str] = []
        for image, label, name in self.items(schema, transform):
            images.append(transform_image(image, transform, mean))
            labels.append(label)
            names.append(name)
            if len(images) == size:
                yield _stack(images, names), np.asarray(labels, np.int64), names
                images, labels, names = [], [], []
        if images:
            yield _stack(images, names), np.asarray(labels, np.int64), names


def _stack(images: List["np.ndarray"], names: List[str]) -> "np.ndarray":
    import numpy as np

    first = images[0].shape
    for image, name in zip(images, names):
        if image.shape != first:
            raise CaffeFtError(
                f"image '{name}' is {'x'.join(map(str, image.shape))} after the transform, "
                f"others are {'x'.join(map(str, first))}; set a resize or crop size")
    return np.stack(images)


def input_shape(source: DataSource, schema: Schema, transform: Transform, mean: Optional["np.ndarray"]
                ) -> Tuple[int, ...]:
    """C x H x W of the first transformed image (the Input the trunk gets)."""
    for image, _, _ in source.items(schema, transform):
        return tuple(transform_image(image, transform, mean).shape)
    raise CaffeFtError("the data source holds no images", source.path)


# ---------------------------------------------------------------------------
# What a data source says without decoding it: labels, count, item shape
# ---------------------------------------------------------------------------


def _lmdb_env(path: str) -> Any:
    return DataSource(path)._lmdb()


def labels_of(path: str, schema: Schema) -> List[int]:
    """Every label of an image list or LMDB (a Datum's label field; its pixels are not decoded)."""
    if not os.path.isdir(path):
        return [label for _, label in read_image_list(path)]
    datum = schema.new("Datum")
    labels = []
    with _lmdb_env(path) as env, env.begin() as txn:
        for _, value in txn.cursor():
            datum.ParseFromString(bytes(value))
            labels.append(int(datum.label))
    return labels


#: (channels, height, width): channels 1 for a grey-scale file, else 3 (how Caffe loads it in colour mode).
Header = Tuple[int, int, int]


class DamagedHeader(ValueError):
    """A file that starts like an image of a known format but whose header does not hold."""


def read_header(handle: BinaryIO) -> Optional[Header]:
    """The :data:`Header` of an image file open at its start, read from its
    header (PNG, JPEG, GIF, BMP, PNM) without decoding the pixels.  A JPEG's
    markers are followed to its frame header wherever it lies (APP segments,
    an EXIF thumbnail or an ICC profile, can hold hundreds of kilobytes before
    it).  None for a format not read here; :class:`DamagedHeader` for a file
    that starts like one of these formats but breaks off or holds no size."""
    head = handle.read(64)
    try:
        found = _read_header(handle, head)
    except (struct.error, IndexError):  # it breaks off inside a field
        raise DamagedHeader("its header is damaged") from None
    if found is not None and min(found[1:]) <= 0:
        raise DamagedHeader("its header is damaged")
    return found


def _read_header(handle: BinaryIO, head: bytes) -> Optional[Header]:
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        if head[12:16] != b"IHDR":
            raise DamagedHeader("its header is damaged")
        width, height = struct.unpack(">II", head[16:24])
        return (1 if head[25] in (0, 4) else 3, height, width)  # colour types 0, 4: grey (+ alpha)
    if head.startswith(b"\xff\xd8"):
        return _jpeg_header(handle)
    if head.startswith(b"GIF8"):
        width, height = struct.unpack("<HH", head[6:10])
        return (3, height, width)
    if head.startswith(b"BM"):
        if struct.unpack("<I", head[14:18])[0] == 12:  # OS/2 header
            width, height = struct.unpack("<HH", head[18:22])
        else:
            width, height = struct.unpack("<ii", head[18:26])
        return (3, abs(height), width)
    if head[:1] == b"P" and head[1:2] in (b"2", b"3", b"5", b"6"):
        numbers = re.sub(rb"#[^\n]*", b" ", head[2:] + handle.read(1024)).split()
        if len(numbers) < 2 or not (numbers[0].isdigit() and numbers[1].isdigit()):
            raise DamagedHeader("its header is damaged")
        return (1 if head[1:2] in (b"2", b"5") else 3, int(numbers[1]), int(numbers[0]))
    return None


def _jpeg_header(handle: BinaryIO) -> Header:
    """Follow a JPEG's markers from its start to the first frame header (SOFn)."""
    handle.seek(2)
    while True:
        marker = handle.read(2)
        while marker == b"\xff\xff":  # fill bytes
            marker = marker[1:] + handle.read(1)
        if len(marker) < 2 or marker[0] != 0xFF:
            raise DamagedHeader("its header is damaged")
        kind = marker[1]
        if kind in (0xD8, 0x01) or 0xD0 <= kind <= 0xD7:  # markers without a length
            continue
        length = struct.unpack(">H", handle.read(2))[0]
        if 0xC0 <= kind <= 0xCF and kind not in (0xC4, 0xC8, 0xCC):  # SOFn, not DHT, JPG, DAC
            _, height, width, components = struct.unpack(">BHHB", handle.read(6))
            return (1 if components == 1 else 3, height, width)
        if length < 2:
            raise DamagedHeader("its header is damaged")
        handle.seek(length - 2, os.SEEK_CUR)


def image_header(path: str) -> Optional[Header]:
    """The :data:`Header` of an image file (:func:`read_header`); other formats
    are decoded with OpenCV when it is there; None if nothing can tell."""
    try:
        with open(path, "rb") as handle:
            found = read_header(handle)
    except (OSError, DamagedHeader):
        return None
    if found is not None:
        return found
    try:
        import cv2
    except ImportError:
        return None
    image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if image is None:
        return None
    return (1 if image.ndim == 2 else 3, int(image.shape[0]), int(image.shape[1]))


@dataclass(frozen=True)
class DataSummary:
    """What planning needs of a data source, read once (:func:`summarize`) and
    passed to all who ask: the labels (so the count), the first entry of an
    image list and the first example's :data:`Header`.  ``problem`` says why
    the source could not be read (it is missing, or an LMDB without the
    ``lmdb`` module); then it holds no examples."""

    path: str
    labels: Tuple[int, ...] = ()
    first_name: Optional[str] = None  # an image list's first entry, as written
    first_shape: Optional[Header] = None
    problem: Optional[str] = None

    @property
    def count(self) -> int:
        return len(self.labels)


def summarize(path: str, schema: Schema, root: str = "") -> DataSummary:
    """Read an image list (its first image's header too, found under ``root``
    or beside the list) or an LMDB (its Datums' labels, the first one's shape)
    once.  A list Caffe would misread raises (:func:`read_image_list`); a source
    that cannot be read at all is summarized with its ``problem``."""
    if not os.path.exists(path):
        return DataSummary(path, problem="cannot read: No such file or directory")
    if not os.path.isdir(path):
        entries = read_image_list(path)
        name = entries[0][0]
        image = next((candidate for candidate in (image_path(root, name), os.path.join(os.path.dirname(path), name))
                      if os.path.exists(candidate)), None)
        return DataSummary(path, tuple(label for _, label in entries), name,
                           image_header(image) if image is not None else None)
    try:
        env = _lmdb_env(path)
    except CaffeFtError as exc:
        return DataSummary(path, problem=exc.message)
    datum = schema.new("Datum")
    labels: List[int] = []
    first: Optional[Header] = None
    with env, env.begin() as txn:
        for _, value in txn.cursor():
            datum.ParseFromString(bytes(value))
            labels.append(int(datum.label))
            if len(labels) == 1:
                first = _datum_shape(datum)
    return DataSummary(path, tuple(labels), None, first)


def _datum_shape(datum: Any) -> Optional[Header]:
    """An LMDB Datum's (C, H, W): an encoded image's header, else its fields."""
    if not datum.encoded:
        return (int(datum.channels), int(datum.height), int(datum.width))
    try:
        return read_header(io.BytesIO(bytes(datum.data)))
    except DamagedHeader:
        return None
