"""Pre-flight of training data: what Caffe would abort on, found before it starts.

Caffe's ``ImageData`` layer reads its list line by line (``path label``,
split at the last space, the label through ``atoi``) and dies with a glog
stack trace on the first image it cannot load, on an image whose size does
not fit the batch, and on an empty list; a label outside ``[0, num_output)``
does not abort at all but trains on garbage.  :func:`check_nets` looks at
every ``ImageData`` layer of the nets a run builds, before any engine starts:

* every line parses (a path, a space, an integer label; no blank lines),
  and there is one (the list read as :func:`~caffe_ft.data.sources.read_image_list`
  reads it, for every command);
* every image opens: its header is read (PNG, JPEG, BMP, GIF, PNM give their
  size, :func:`~caffe_ft.data.sources.read_header`; other formats must at least
  be readable), many files at a time;
* unless the layer resizes (``new_height``/``new_width``), the sizes fit:
  at least ``crop_size`` when it crops, otherwise all the same;
* labels lie in ``[0, num_output)`` of the classifier the loss reads (its
  ``ignore_label`` excepted).

Every problem is one :class:`~caffe_ft.errors.CaffeFtError` naming the
list, the line and the file.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from google.protobuf.message import Message

from ..errors import CaffeFtError
from .sources import DamagedHeader, read_header, read_image_list

Size = Tuple[int, int]  # height, width
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


def image_size(path: str) -> Tuple[Optional[Size], Optional[str]]:
    """(height, width) from the image's header (None for a format not read
    here, :func:`~caffe_ft.data.sources.read_header`), or (None, why the file
    cannot be an image)."""
    try:
        with open(path, "rb") as handle:
            if not handle.read(1):
                return None, "the file is empty"
            handle.seek(0)
            header = read_header(handle)
    except DamagedHeader as exc:
        return None, str(exc)
    except IsADirectoryError:
        return None, "it is a directory"
    except OSError as exc:
        return None, exc.strerror or str(exc)
    return (None if header is None else header[1:]), None


# ---------------------------------------------------------------- the lists --


def check_list(check: ListCheck) -> int:
    """Check one list as :mod:`this module <caffe_ft.data.preflight>` says; the number of images."""
    entries = read_image_list(check.source, f"the image list of layer '{check.layer}'")
    if check.num_classes is not None:
        for number, (_, label) in enumerate(entries, 1):
            if label != check.ignore_label and not 0 <= label < check.num_classes:
                raise CaffeFtError(f"label {label} is outside 0..{check.num_classes - 1} (the classifier of layer "
                                   f"'{check.layer}'s net has {check.num_classes} outputs)", check.source, number)
    paths = [check.root + name for name, _ in entries]
    with ThreadPoolExecutor(_WORKERS) as pool:
        results = list(pool.map(image_size, paths, chunksize=64))
    first: Optional[Tuple[int, str, Size]] = None
    for number, (path, (size, problem)) in enumerate(zip(paths, results), 1):
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


def check_nets(specs: Iterable[Tuple[Message, str, int, Sequence[str]]], folder: str = "") -> int:
    """Pre-flight every ``ImageData`` list of the nets (net, phase, level, stages);
    each list is checked once.  Returns the number of images seen.  ``folder``:
    where the nets' relative paths start (the directory they will run in, which
    need not exist yet); errors name the files from here."""
    done = set()
    total = 0
    for net, phase, level, stages in specs:
        for check in list_checks(net, phase, level, stages):
            if folder:
                check = dataclasses.replace(check, source=_from(folder, check.source),
                                            root=_from(folder, check.root) if check.root else "")
            key = (check.source, check.root, check.resize, check.crop, check.num_classes)
            if key in done:
                continue
            done.add(key)
            total += check_list(check)
    return total


def _from(folder: str, path: str) -> str:
    """``path``, named relative to ``folder``, as named from here, by its text
    (``folder`` need not exist); a trailing '/' is kept: a root folder is a prefix."""
    if os.path.isabs(path):
        return path
    found = os.path.relpath(os.path.normpath(os.path.join(folder, path)))
    return found + "/" if path.endswith("/") and not found.endswith("/") else found
