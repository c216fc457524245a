"""Where images and labels come from: Caffe image lists and LMDB directories.

:class:`DataSource` reads either, in order, and yields transformed batches;
its fingerprint changes whenever the list or any image it names changes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, List, Optional, Tuple

from ..errors import CaffeFtError
from ..formats.files import sha256_file
from ..formats.schema import Schema
from .transform import Transform, decode_datum, read_image, transform_image

if TYPE_CHECKING:
    import numpy as np


def image_path(root: str, name: str) -> str:
    """Where an image list entry lives: Caffe prefixes the root folder as a
    string; a root given without a trailing slash is taken as a directory."""
    if root and not root.endswith("/"):
        root += "/"
    return root + name


def read_image_list(path: str) -> List[Tuple[str, int]]:
    """The ``path label`` lines of an image list (split at the last space, as Caffe does)."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except OSError as exc:
        raise CaffeFtError(f"cannot read: {exc.strerror}", path) from None
    except UnicodeDecodeError:
        raise CaffeFtError("an image list must be UTF-8 text", path) from None
    entries = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        name, _, label = line.rpartition(" ")
        try:
            entries.append((name.strip(), int(label)))
        except ValueError:
            raise CaffeFtError("expected 'path label' with an integer label", path, number) from None
        if not name.strip():
            raise CaffeFtError("expected 'path label' with an integer label", path, number)
    if not entries:
        raise CaffeFtError("the image list is empty", path)
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


def count_items(path: str) -> int:
    """Examples in an image list (its entries) or an LMDB (its record count, when the
    ``lmdb`` module is there); 0 when that cannot be told."""
    if os.path.isdir(path):
        try:
            return len(DataSource.open(path))
        except CaffeFtError:
            return 0
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return sum(1 for line in handle if line.strip())
    except OSError:
        return 0


def image_header(path: str) -> Optional[Tuple[int, int, int]]:
    """(channels, height, width) of an image as Caffe's ImageData would load it
    in colour mode, read from the file's header (PNG, JPEG, BMP, PNM) without
    decoding the pixels; channels is 1 for grey-scale files, else 3.  Other
    formats are decoded with OpenCV when it is there; None if nothing can tell."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(64 * 1024)
    except OSError:
        return None
    found = _header_shape(head)
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


def _header_shape(head: bytes) -> Optional[Tuple[int, int, int]]:
    import struct

    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        width, height = struct.unpack(">II", head[16:24])
        colour_type = head[25]
        return (1 if colour_type in (0, 4) else 3, height, width)
    if head[:2] == b"\xff\xd8":
        index = 2
        while index + 9 < len(head):
            if head[index] != 0xFF:
                index += 1
                continue
            marker = head[index + 1]
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
                index += 1 if marker == 0xFF else 2
                continue
            length = struct.unpack(">H", head[index + 2:index + 4])[0]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                height, width = struct.unpack(">HH", head[index + 5:index + 9])
                components = head[index + 9] if index + 9 < len(head) else 3
                return (1 if components == 1 else 3, height, width)
            index += 2 + length
        return None
    if head[:2] == b"BM" and len(head) >= 30:
        width, height = struct.unpack("<ii", head[18:26])
        return (3, abs(height), width)
    if head[:1] == b"P" and head[1:2] in (b"2", b"3", b"5", b"6"):
        tokens: List[bytes] = []
        for line in head[2:].split(b"\n"):
            tokens.extend(line.split(b"#")[0].split())
            if len(tokens) >= 2:
                break
        if len(tokens) >= 2:
            return (1 if head[1:2] in (b"2", b"5") else 3, int(tokens[1]), int(tokens[0]))
    return None


def first_item_shape(path: str, schema: Schema, root: str = "") -> Optional[Tuple[int, int, int]]:
    """(C, H, W) of the first example of an image list (its image's header) or of
    an LMDB (its first Datum); None when it cannot be told."""
    if os.path.isdir(path):
        try:
            env = _lmdb_env(path)
        except CaffeFtError:
            return None
        datum = schema.new("Datum")
        with env, env.begin() as txn:
            for _, value in txn.cursor():
                datum.ParseFromString(bytes(value))
                if datum.encoded:
                    return _header_shape(bytes(datum.data[:64 * 1024]))
                return (int(datum.channels), int(datum.height), int(datum.width))
        return None
    try:
        entries = read_image_list(path)
    except CaffeFtError:
        return None
    name = entries[0][0]
    for candidate in (image_path(root, name), os.path.join(os.path.dirname(path), name)):
        if os.path.exists(candidate):
            return image_header(candidate)
    return None
