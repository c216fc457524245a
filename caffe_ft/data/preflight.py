"""Pre-flight of training data: what Caffe would abort on, found before it starts.

Caffe's ``ImageData`` layer reads its list line by line (``path label``,
split at the last space, the label through ``atoi``) and dies with a glog
stack trace on the first image it cannot load, on an image whose size does
not fit the batch, and on an empty list; a label outside ``[0, num_output)``
does not abort at all but trains on garbage.  :func:`check_nets` looks at
every ``ImageData`` layer of the nets a run builds, before any engine starts:

* every line parses (a path, a space, an integer label), and there is one;
* every image opens: its header is read (PNG, JPEG, BMP, GIF, PNM give their
  size; other formats must at least be readable), many files at a time;
* unless the layer resizes (``new_height``/``new_width``), the sizes fit:
  at least ``crop_size`` when it crops, otherwise all the same;
* labels lie in ``[0, num_output)`` of the classifier the loss reads (its
  ``ignore_label`` excepted).

Every problem is one :class:`~caffe_ft.errors.CaffeFtError` naming the
list, the line and the file.
"""

from __future__ import annotations

import os
import re
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO, Dict, Iterable, List, Optional, Sequence, Tuple

from google.protobuf.message import Message

from ..errors import CaffeFtError

Size = Tuple[int, int]  # height, width
_LABEL = re.compile(r"[+-]?\d+")
_WORKERS = 16


@dataclass(frozen=True)
class ListCheck:
    """What an ``ImageData`` layer asks of its list."""

    layer: str
    source: str
    root: str = ""
    resize: bool = False  # new_height and new_width set: every image is resized first
    crop: int = 0
    num_classes: Optional[int] = None
    ignore_label: Optional[int] = None


# ------------------------------------------------------------- image headers --


def _png(handle: BinaryIO, head: bytes) -> Optional[Size]:
    if head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return height, width


def _gif(handle: BinaryIO, head: bytes) -> Optional[Size]:
    width, height = struct.unpack("<HH", head[6:10])
    return height, width


def _bmp(handle: BinaryIO, head: bytes) -> Optional[Size]:
    if struct.unpack("<I", head[14:18])[0] == 12:  # OS/2 header
        width, height = struct.unpack("<HH", head[18:22])
    else:
        width, height = struct.unpack("<ii", head[18:26])
    return abs(height), width


def _jpeg(handle: BinaryIO, head: bytes) -> Optional[Size]:
    handle.seek(2)
    while True:
        marker = handle.read(2)
        while marker[:1] == b"\xff" and marker[1:2] == b"\xff":  # fill bytes
            marker = marker[1:] + handle.read(1)
        if len(marker) < 2 or marker[0] != 0xFF:
            return None
        kind = marker[1]
        if kind in (0xD8, 0x01) or 0xD0 <= kind <= 0xD7:
            continue
        length_bytes = handle.read(2)
        if len(length_bytes) < 2:
            return None
        length = struct.unpack(">H", length_bytes)[0]
        if 0xC0 <= kind <= 0xCF and kind not in (0xC4, 0xC8, 0xCC):
            frame = handle.read(5)
            if len(frame) < 5:
                return None
            height, width = struct.unpack(">HH", frame[1:5])
            return height, width
        if length < 2:
            return None
        handle.seek(length - 2, os.SEEK_CUR)


def _pnm(handle: BinaryIO, head: bytes) -> Optional[Size]:
    text = re.sub(rb"#[^\n]*", b" ", head[2:])
    numbers = text.split()
    if len(numbers) < 2 or not (numbers[0].isdigit() and numbers[1].isdigit()):
        return None
    return int(numbers[1]), int(numbers[0])


_FORMATS = [
    (b"\x89PNG\r\n\x1a\n", _png),
    (b"\xff\xd8", _jpeg),
    (b"GIF8", _gif),
    (b"BM", _bmp),
    (b"P5", _pnm), (b"P6", _pnm), (b"P2", _pnm), (b"P3", _pnm),
]


def image_size(path: str) -> Tuple[Optional[Size], Optional[str]]:
    """(height, width) from the image's header (None for a format not read
    here), or (None, why the file cannot be an image)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(64)
            if not head:
                return None, "the file is empty"
            for magic, reader in _FORMATS:
                if head.startswith(magic):
                    try:
                        size = reader(handle, head)
                    except (struct.error, OSError, ValueError):
                        size = None
                    if size is None or min(size) <= 0:
                        return None, "its header is damaged"
                    return size, None
    except IsADirectoryError:
        return None, "it is a directory"
    except OSError as exc:
        return None, exc.strerror or str(exc)
    return None, None


# ---------------------------------------------------------------- the lists --


def read_list(check: ListCheck) -> List[Tuple[int, str, int]]:
    """(line number, image path, label) for each line, refusing what Caffe misreads."""
    try:
        with open(check.source, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise CaffeFtError(f"cannot read the image list of layer '{check.layer}': {exc.strerror}",
                           check.source) from None
    text = data.decode("utf-8", "surrogateescape")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline ending the last line starts no line of its own
    entries = []
    for number, line in enumerate(lines, 1):
        line = line.rstrip("\r")
        name, space, label = line.rpartition(" ")
        if not line.strip():
            raise CaffeFtError("empty line (Caffe would try to load an image named '')", check.source, number)
        if not space or not name or not _LABEL.fullmatch(label):
            raise CaffeFtError(f"expected 'path label' with an integer label, found {line!r}", check.source, number)
        entries.append((number, name, int(label)))
    if not entries:
        raise CaffeFtError(f"the image list of layer '{check.layer}' is empty (Caffe aborts on it)", check.source)
    return entries


def check_list(check: ListCheck) -> int:
    """Check one list as :mod:`this module <caffe_ft.data.preflight>` says; the number of images."""
    entries = read_list(check)
    if check.num_classes is not None:
        for number, _, label in entries:
            if label != check.ignore_label and not 0 <= label < check.num_classes:
                raise CaffeFtError(f"label {label} is outside 0..{check.num_classes - 1} (the classifier of layer "
                                   f"'{check.layer}'s net has {check.num_classes} outputs)", check.source, number)
    paths = [check.root + name for _, name, _ in entries]
    with ThreadPoolExecutor(_WORKERS) as pool:
        results = list(pool.map(image_size, paths, chunksize=64))
    first: Optional[Tuple[int, str, Size]] = None
    for (number, _, _), path, (size, problem) in zip(entries, paths, results):
        if problem is not None:
            raise CaffeFtError(f"cannot load image '{path}': {problem}", check.source, number)
        if size is None or check.resize:
            continue
        if check.crop:
            if min(size) < check.crop:
                raise CaffeFtError(f"image '{path}' is {size[0]}x{size[1]}, smaller than crop_size {check.crop} "
                                   f"of layer '{check.layer}'", check.source, number)
        elif first is None:
            first = (number, path, size)
        elif size != first[2]:
            raise CaffeFtError(
                f"image '{path}' is {size[0]}x{size[1]} but '{first[1]}' (line {first[0]}) is "
                f"{first[2][0]}x{first[2][1]}; layer '{check.layer}' neither resizes (new_height, new_width) "
                "nor crops, and Caffe needs one size", check.source, number)
    return len(entries)


# ----------------------------------------------------------------- the nets --


def _classes(layers: Sequence[Message]) -> Tuple[Optional[int], Optional[int]]:
    """num_output of the InnerProduct a SoftmaxWithLoss reads, and its ignore_label."""
    producers: Dict[str, Message] = {}
    for layer in layers:
        for top in layer.top:
            producers[top] = layer
    for layer in layers:
        if layer.type == "SoftmaxWithLoss" and len(layer.bottom) >= 2:
            scores = producers.get(layer.bottom[0])
            if scores is not None and scores.type == "InnerProduct":
                ignore = layer.loss_param.ignore_label if layer.loss_param.HasField("ignore_label") else None
                return scores.inner_product_param.num_output, ignore
    return None, None


def list_checks(net: Message, phase: str, level: int = 0, stages: Iterable[str] = (),
                where: str = "") -> List[ListCheck]:
    """The ``ImageData`` lists the net reads in this state, with what each must satisfy."""
    from ..net.shapes import filter_layers

    layers = filter_layers(net, phase, level, list(stages))
    classes, ignore = _classes(layers)
    checks = []
    for layer in layers:
        if layer.type != "ImageData":
            continue
        param = layer.image_data_param
        checks.append(ListCheck(
            layer=layer.name, source=param.source, root=param.root_folder,
            resize=bool(param.new_height and param.new_width), crop=layer.transform_param.crop_size,
            num_classes=classes, ignore_label=ignore,
        ))
    return checks


def check_nets(specs: Iterable[Tuple[Message, str, int, Sequence[str]]]) -> int:
    """Pre-flight every ``ImageData`` list of the nets (net, phase, level, stages);
    each list is checked once.  Returns the number of images seen."""
    done = set()
    total = 0
    for net, phase, level, stages in specs:
        for check in list_checks(net, phase, level, stages):
            key = (check.source, check.root, check.resize, check.crop, check.num_classes)
            if key in done:
                continue
            done.add(key)
            total += check_list(check)
    return total
