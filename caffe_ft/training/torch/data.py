"""Batches for the torch engine's source layers, as Caffe's data layers make them.

``ImageData`` reads its image list in order (shuffled per epoch with
``shuffle: true``), wraps around at the end, decodes with OpenCV (BGR,
``new_height``/``new_width`` resize, ``is_color``) and applies
``transform_param`` in Caffe's order: crop (random in TRAIN, centre in TEST),
mirror (random, TRAIN), mean (file, indexed at the uncropped position, or
values), scale.  Random crops and mirrors come from a numpy generator seeded
by the item's position in the layer's stream (not Caffe's draws): runs are
reproducible, a process needs no earlier item's draws to make an item (so
worker processes make the batches reading in turn makes), and every torchrun
process draws for an item what one process would.

``Data`` reads an LMDB of ``Datum`` records in key order (as Caffe's
DataReader does, wrapping around at the end), raw or encoded (OpenCV,
``force_color``/``force_gray``), with the same transform.

``HDF5Data`` reads the ``.h5`` files its source lists, in order (with
``shuffle``: the files and each file's rows shuffled at every pass, by numpy's
generator, not Caffe's), a dataset per top named as the top, wrapping around at
the end, untransformed (Caffe gives HDF5Data no transform).

``DummyData`` fills its tops with its fillers: constant ones once, the others
at every batch (numpy's generator: the values differ from Caffe's draws).

``WindowData`` cuts R-CNN windows out of the images its window file lists
(see :class:`WindowDataSource`).

``Input`` tops come from the caller (:class:`Feed`); other source layers are
refused before any work.

Every reader can also skip a batch (:meth:`skip_batch`): what ``next()``
does to its state (cursor, shuffles, position), without reading or decoding
anything; :class:`WorkerPool` builds on it.  Worker ``w`` of ``N`` skips to
batch ``w``, makes it, skips ``N - 1``, makes batch ``w + N``...; the parent
takes batch ``b`` from worker ``b mod N``: the very batches, in the very order,
that one process reading in turn gives, for any ``N``, after a resume's skip
too.  Batches come back through shared memory (slots the parent owns and
reuses), not as pickled copies.
"""

from __future__ import annotations

import os
import signal
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from google.protobuf.message import Message

from ...errors import CaffeFtError
from ...formats.schema import Schema

#: ``feed(pass_index)`` -> arrays for the Input tops of a net, by top name.
Feed = Callable[[int], Mapping[str, np.ndarray]]

SOURCES_WITH_DATA = ("ImageData", "Data", "HDF5Data")


def default_workers() -> int:
    """Worker processes per net when not told: ``min(4, usable cores) - 1``, at least one (1 to 3),
    leaving a core to the training process.

    Under torchrun the cores are shared out between the machine's processes first."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    cores //= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(4, cores) - 1)


class _Transformer:
    """Caffe's DataTransformer for one layer: crop, mirror, mean, scale, in that order.

    The random crop and mirror of an item come from a generator seeded with
    ``(seed, stream, position)``: the same item at the same position gets the
    same draws in whichever process makes it."""

    def __init__(self, layer: Message, schema: Schema, phase: str, seed: int, stream: int) -> None:
        from ...data.transform import Transform, mean_array

        t = layer.transform_param
        self.layer, self.phase = layer, phase
        self.crop, self.mirror, self.scale = t.crop_size, t.mirror, t.scale
        self.mean = mean_array(Transform(mean_values=tuple(t.mean_value), mean_file=t.mean_file or None), schema)
        self.random = phase == "TRAIN" and bool(self.crop or self.mirror)
        self.seed, self.stream = seed, stream

    def shape(self, image: Tuple[int, ...]) -> Tuple[int, ...]:
        """The shape of what an image of shape ``image`` (C x H x W) becomes."""
        return (image[0], self.crop, self.crop) if self.crop else tuple(image)

    def __call__(self, image: np.ndarray, where: str, position: int, out: Optional[np.ndarray] = None) -> np.ndarray:
        """``image`` transformed, into ``out`` when given (the crop taken before the float conversion)."""
        rng = np.random.default_rng((self.seed, self.stream, position)) if self.random else None
        channels, height, width = image.shape
        mean = self.mean
        if self.crop:
            if height < self.crop or width < self.crop:
                raise CaffeFtError(f"an image of {height}x{width} is smaller than crop_size {self.crop}", where)
            if rng is not None:
                top = int(rng.integers(0, height - self.crop + 1))
                left = int(rng.integers(0, width - self.crop + 1))
            else:
                top, left = (height - self.crop) // 2, (width - self.crop) // 2
            image = image[:, top:top + self.crop, left:left + self.crop]
            if mean is not None and mean.shape[1:] != (1, 1):
                mean = mean[:, top:top + self.crop, left:left + self.crop]
        if self.mirror and rng is not None and rng.integers(0, 2):
            image = image[:, :, ::-1]
            if mean is not None and mean.shape[1:] != (1, 1):
                mean = mean[:, :, ::-1]
        if out is None:
            out = np.empty(image.shape, np.float32)
        if mean is not None:
            np.subtract(image, mean, out=out, dtype=np.float32)
        else:
            out[...] = image
        if self.scale != 1:
            out *= np.float32(self.scale)
        return out


#: ``alloc(shape, dtype)`` -> an array to fill (a worker's lies in its shared-memory slot).
Alloc = Callable[[Tuple[int, ...], Any], np.ndarray]


class _Batch:
    """One batch of (image, label) items filled in place: the image array is made when the
    first item tells its shape; an item of another shape is refused, as Caffe does."""

    def __init__(self, layer: Message, size: int, transform: _Transformer, alloc: Optional[Alloc]) -> None:
        self.layer, self.size, self.transform = layer, size, transform
        self.alloc: Alloc = alloc or np.empty
        self.images: Optional[np.ndarray] = None
        self.labels: List[int] = []

    def add(self, image: np.ndarray, label: int, where: str, position: int) -> None:
        shape = self.transform.shape(image.shape)
        if self.images is None:
            self.images = self.alloc((self.size, *shape), np.float32)
        elif self.images.shape[1:] != shape:
            raise CaffeFtError(f"items of different sizes in one batch ({sorted({self.images.shape[1:], shape})}); "
                               "resize them or set crop_size", layer=self.layer.name)
        self.transform(image, where, position, self.images[len(self.labels)])
        self.labels.append(label)

    def arrays(self) -> Dict[str, np.ndarray]:
        assert self.images is not None
        tops = list(self.layer.top)
        out = {tops[0]: self.images}
        if len(tops) > 1:
            labels = out[tops[1]] = self.alloc((self.size,), np.float32)
            labels[...] = self.labels
        return out


_ENVIRONMENTS: Dict[str, Any] = {}


class LmdbDataSource:
    """One Data layer (LMDB backend): ``next()`` -> {data top, label top}."""

    def __init__(self, layer: Message, schema: Schema, phase: str, seed: int = 0, rank: int = 0,
                 world: int = 1) -> None:
        from ...data.transform import Transform

        p = layer.data_param
        self.rank, self.world = rank, world
        if p.backend != p.LMDB:
            raise CaffeFtError("the torch engine reads LMDB data only (backend: LMDB)", layer=layer.name)
        if not p.source:
            raise CaffeFtError("Data needs data_param.source", layer=layer.name)
        self.layer, self.schema, self.batch = layer, schema, p.batch_size
        self.rng = np.random.default_rng(seed)
        self.transform = _Transformer(layer, schema, phase, seed, 2)
        t = layer.transform_param
        self.decode = Transform(force_color=t.force_color, force_gray=t.force_gray)
        try:
            import lmdb
        except ImportError:
            raise CaffeFtError("reading an LMDB needs the Python 'lmdb' module: pip install lmdb",
                               layer=layer.name) from None
        self._lmdb_error = lmdb.Error
        if not os.path.isdir(p.source):
            raise CaffeFtError("no such LMDB directory", p.source)
        where = os.path.realpath(p.source)
        try:
            # py-lmdb opens an environment once per process; the nets' readers share it.
            if where not in _ENVIRONMENTS:
                _ENVIRONMENTS[where] = lmdb.open(where, readonly=True, lock=False, readahead=False)
            self.txn = _ENVIRONMENTS[where].begin()
            self.cursor = self.txn.cursor()
            if not self.cursor.first():
                raise CaffeFtError("the LMDB is empty", p.source)
        except lmdb.Error as exc:
            raise CaffeFtError(f"not a readable LMDB ({exc})", p.source) from None
        #: Records stepped over since the start: the position of the next one.
        self.position = 0
        for _ in range(int(self.rng.integers(0, p.rand_skip + 1)) if p.rand_skip else 0):
            self._advance()
        self.position = 0

    def _advance(self) -> None:
        try:
            if not self.cursor.next():
                self.cursor.first()
        except self._lmdb_error as exc:
            raise CaffeFtError(f"not a readable LMDB ({exc})", self.layer.data_param.source) from None
        self.position += 1

    def _advance_by(self, count: int) -> None:
        for _ in range(count):
            self._advance()

    def next(self, alloc: Optional[Alloc] = None) -> Dict[str, np.ndarray]:
        from ...data.transform import decode_datum

        batch = _Batch(self.layer, self.batch, self.transform, alloc)
        for _ in range(self.batch):
            # With several processes, process r takes records r, r + W, r + 2W... (Caffe's DataLayer::Skip).
            self._advance_by(self.rank)
            try:
                key, value = self.cursor.item()
                key, value = bytes(key), bytes(value)
            except self._lmdb_error as exc:
                raise CaffeFtError(f"not a readable LMDB ({exc})", self.layer.data_param.source) from None
            where = f"{self.layer.data_param.source} record '{key.decode(errors='replace')}'"
            try:
                image, label = decode_datum(value, self.schema, self.decode)
            except CaffeFtError as exc:
                raise exc.located(where) from None
            except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError: not a Datum
                raise CaffeFtError(f"not a Datum record ({type(exc).__name__}: {exc})", where) from None
            batch.add(image, label, where, self.position)
            self._advance_by(self.world - self.rank)
        return batch.arrays()

    def skip_batch(self) -> None:
        """What ``next()`` does to the cursor, without reading a record."""
        self._advance_by(self.batch * self.world)


class ImageDataSource:
    """One ImageData layer's batches: ``next()`` -> {data top: (N,C,H,W), label top: (N,)}."""

    def __init__(self, layer: Message, schema: Schema, phase: str, seed: int = 0, rank: int = 0,
                 world: int = 1) -> None:
        from ...data.sources import read_image_list
        from ...data.transform import Transform

        p = layer.image_data_param
        self.layer, self.phase = layer, phase
        if not p.source:
            raise CaffeFtError("ImageData needs image_data_param.source", layer=layer.name)
        self.entries = read_image_list(p.source)
        self.paths = [p.root_folder + name for name, _ in self.entries]  # Caffe joins the two strings as they are
        self.batch = p.batch_size
        self.shuffle = p.shuffle
        self.rank, self.world = rank, world
        # The list order is the same in every process, and so are an item's crop and mirror.
        self.rng = np.random.default_rng(seed)
        self.order = list(range(len(self.entries)))
        if self.shuffle:
            self.rng.shuffle(self.order)
        self.cursor = p.rand_skip and int(self.rng.integers(0, p.rand_skip + 1)) % len(self.order)
        #: Items stepped over since the start: the position of the next one.
        self.position = 0
        self.read = Transform(new_height=p.new_height, new_width=p.new_width, is_color=p.is_color)
        self.transform = _Transformer(layer, schema, phase, seed, 1)

    def next(self, alloc: Optional[Alloc] = None) -> Dict[str, np.ndarray]:
        from ...data.transform import read_image

        batch = _Batch(self.layer, self.batch, self.transform, alloc)
        for _ in range(self.batch):
            self._steps(self.rank)  # several processes: process r takes items r, r + W, ...
            index = self.order[self.cursor]
            path = self.paths[index]
            batch.add(read_image(path, self.read), self.entries[index][1], path, self.position)
            self._steps(self.world - self.rank)
        return batch.arrays()

    def skip_batch(self) -> None:
        """What ``next()`` does to the list's cursor and order, without reading an image."""
        self._steps(self.batch * self.world)

    def _steps(self, count: int) -> None:
        for _ in range(count):
            self.position += 1
            self.cursor += 1
            if self.cursor == len(self.order):
                self.cursor = 0
                if self.shuffle:
                    self.rng.shuffle(self.order)


class Hdf5DataSource:
    """One HDF5Data layer: ``next()`` -> a batch of each top's dataset, rows in Caffe's order.

    A file's datasets are read when a row of it is first taken (skipping over a
    file reads only its row count)."""

    def __init__(self, layer: Message, schema: Schema, phase: str, seed: int = 0, rank: int = 0,
                 world: int = 1) -> None:
        p = layer.hdf5_data_param
        self.layer, self.batch, self.shuffle = layer, p.batch_size, p.shuffle
        self.rank, self.world = rank, world
        if not p.source:
            raise CaffeFtError("HDF5Data needs hdf5_data_param.source", layer=layer.name)
        if self.batch < 1:
            raise CaffeFtError("HDF5Data needs a batch_size of at least 1", layer=layer.name)
        try:
            with open(p.source, encoding="utf-8") as handle:
                self.files = [line.strip() for line in handle if line.strip()]
        except OSError as exc:
            raise CaffeFtError(f"cannot read the list of HDF5 files ({exc.strerror})", p.source) from None
        if not self.files:
            raise CaffeFtError("lists no HDF5 files", p.source)
        for name in self.files:
            if not os.path.isfile(name):
                raise CaffeFtError(f"no such HDF5 file (listed in {p.source})", name)
        self.rng = np.random.default_rng(seed)
        self.file_order = list(range(len(self.files)))
        if self.shuffle:
            self.rng.shuffle(self.file_order)
        self.current = 0
        self._arrays: Optional[List[np.ndarray]] = None
        self._open(self.file_order[0])

    def _h5py(self) -> Any:
        try:
            import h5py
        except ImportError:
            raise CaffeFtError("reading HDF5 files needs the Python 'h5py' module: pip install h5py",
                               layer=self.layer.name) from None
        return h5py

    def _open(self, index: int) -> None:
        """Start on one file: its row count (the same in every dataset) and row order, as
        HDF5DataLayer::LoadHDF5FileData (whose datasets :meth:`arrays` reads)."""
        path = self.files[index]
        try:
            with self._h5py().File(path, "r") as handle:
                rows = set()
                for top in self.layer.top:
                    if top not in handle:
                        raise CaffeFtError(f"has no dataset '{top}' (layer '{self.layer.name}')", path)
                    shape = handle[top].shape
                    rows.add(shape[0] if shape else 0)
        except OSError as exc:
            raise CaffeFtError(f"not a readable HDF5 file ({exc})", path) from None
        if len(rows) != 1 or 0 in rows:
            raise CaffeFtError("its datasets must all have the same number of rows, at least one", path)
        self.index, self._arrays = index, None
        self.rows = list(range(rows.pop()))
        if self.shuffle:
            self.rng.shuffle(self.rows)
        self.row = 0

    def arrays(self) -> List[np.ndarray]:
        """The current file's datasets, one per top (float32), read once."""
        if self._arrays is None:
            path = self.files[self.index]
            try:
                with self._h5py().File(path, "r") as handle:
                    self._arrays = [np.asarray(handle[top][()], np.float32) for top in self.layer.top]
            except OSError as exc:
                raise CaffeFtError(f"not a readable HDF5 file ({exc})", path) from None
        return self._arrays

    def _steps(self, count: int) -> None:
        for _ in range(count):
            self.row += 1
            if self.row < len(self.rows):
                continue
            if len(self.files) > 1:
                self.current += 1
                if self.current == len(self.files):
                    self.current = 0
                    if self.shuffle:
                        self.rng.shuffle(self.file_order)
                self._open(self.file_order[self.current])
            else:
                self.row = 0
                if self.shuffle:
                    self.rng.shuffle(self.rows)

    def next(self, alloc: Optional[Alloc] = None) -> Dict[str, np.ndarray]:
        out: List[np.ndarray] = []
        for item in range(self.batch):
            self._steps(self.rank)  # several processes: process r takes rows r, r + W, ...
            arrays = self.arrays()
            if not out:
                out = [(alloc or np.empty)((self.batch, *array.shape[1:]), np.float32) for array in arrays]
            for top, values, array in zip(self.layer.top, out, arrays):
                if array.shape[1:] != values.shape[1:]:
                    raise CaffeFtError(f"dataset '{top}' has rows of shape {array.shape[1:]}, another file's "
                                       f"{values.shape[1:]}", self.files[self.index])
                values[item] = array[self.rows[self.row]]
            self._steps(self.world - self.rank)
        return dict(zip(self.layer.top, out))

    def skip_batch(self) -> None:
        """What ``next()`` does to the file and row order, without reading a dataset."""
        self._steps(self.batch * self.world)

class DummyDataSource:
    """One DummyData layer: its tops filled by its fillers (constant ones once)."""

    def __init__(self, layer: Message, schema: Schema, phase: str, seed: int = 0, rank: int = 0,
                 world: int = 1) -> None:
        from ...net.shapes import RULES

        p = layer.dummy_data_param
        self.layer = layer
        self.shapes = [tuple(shape or ()) for shape in RULES["DummyData"](layer, []).tops]
        count = len(p.data_filler)
        if count not in (0, 1, len(layer.top)):
            raise CaffeFtError("give data_filler once, or once per top", layer=layer.name)
        self.fillers: List[Optional[Message]] = [
            p.data_filler[0 if count == 1 else i] if count else None for i in range(len(layer.top))]
        self.rng = np.random.default_rng(seed + rank)
        self.fixed = {top: self._fill(i) for i, (top, filler) in enumerate(zip(layer.top, self.fillers))
                      if filler is None or filler.type == "constant"}

    def _fill(self, index: int) -> np.ndarray:
        from ...net.fillers import fill

        filler = self.fillers[index]
        shape = self.shapes[index]
        if filler is None:
            return np.zeros(shape, np.float32)
        return fill(filler, shape, self.rng, layer=self.layer.name)

    def next(self) -> Dict[str, np.ndarray]:
        return {top: self.fixed[top] if top in self.fixed else self._fill(i) for i, top in enumerate(self.layer.top)}


def _c_round(value: np.float32) -> int:
    """C's round(): halves away from zero (Python's round() takes them to even)."""
    return int(np.sign(value) * np.floor(np.abs(value) + np.float32(0.5)))


class WindowDataSource:
    """One WindowData layer (R-CNN windows): ``next()`` -> {data: (N, C, crop, crop), label: (N,)}.

    The window file lists, per image, ``# index``, its path (after
    ``root_folder``), channels, height, width, a window count and the windows
    ``label overlap x1 y1 x2 y2``: at least ``fg_threshold`` overlap makes a
    foreground window, under ``bg_threshold`` a background one (label 0).  A
    batch holds ``N - int(N * fg_fraction)`` background windows then the
    foreground ones, each drawn at random (numpy's generator, not Caffe's),
    cut out with ``context_pad`` (``crop_mode: square``: the tightest square),
    clipped to the image, warped bilinearly to ``crop_size`` (the clipped part
    zero), mirrored at random when ``mirror`` is set (in either phase, as
    Caffe), less the mean, times ``window_data_param.scale``: WindowDataLayer's
    arithmetic, float32 and C rounding included.
    """

    def __init__(self, layer: Message, schema: Schema, phase: str, seed: int = 0, rank: int = 0,
                 world: int = 1) -> None:
        from ...data.transform import Transform, mean_array

        p, t = layer.window_data_param, layer.transform_param
        self.layer, self.batch, self.crop, self.mirror = layer, p.batch_size, t.crop_size, t.mirror
        self.scale, self.context_pad, self.square = np.float32(p.scale), p.context_pad, p.crop_mode == "square"
        if not p.source:
            raise CaffeFtError("WindowData needs window_data_param.source", layer=layer.name)
        if self.crop <= 0:
            raise CaffeFtError("WindowData needs transform_param.crop_size", layer=layer.name)
        if 2 * self.context_pad >= self.crop:
            raise CaffeFtError("context_pad must be less than half of crop_size", layer=layer.name)
        self.images: List[str] = []
        self.windows: Tuple[List[Tuple[int, int, int, int, int, int]], ...] = ([], [])  # background, foreground
        self.channels = 3
        self._read_windows(p.source, p.root_folder, p.fg_threshold, p.bg_threshold)
        if not self.windows[0] or not self.windows[1]:
            raise CaffeFtError("WindowData needs both foreground and background windows", p.source)
        self.fg = int(np.float32(self.batch) * np.float32(p.fg_fraction))
        self.mean = mean_array(Transform(mean_values=tuple(t.mean_value), mean_file=t.mean_file or None), schema)
        if self.mean is not None and self.mean.shape[1:] != (1, 1):
            if self.mean.shape[1] < self.crop or self.mean.shape[2] < self.crop:
                raise CaffeFtError(f"the mean is smaller than crop_size {self.crop}", t.mean_file)
        self.rng = np.random.default_rng(seed + 1 + rank)

    def _read_windows(self, source: str, root: str, fg_threshold: float, bg_threshold: float) -> None:
        try:
            with open(source, encoding="utf-8") as handle:
                tokens = handle.read().split()
        except (OSError, UnicodeDecodeError) as exc:
            raise CaffeFtError(f"cannot read the window file ({getattr(exc, 'strerror', None) or exc})",
                               source) from None
        at = 0
        try:
            while at < len(tokens):
                if tokens[at] != "#":
                    raise ValueError(f"expected '#' where '{tokens[at]}' is")
                index, path = int(tokens[at + 1]), tokens[at + 2]
                channels, count = int(tokens[at + 3]), int(tokens[at + 6])
                if channels != 3:
                    raise ValueError(f"image {index} has {channels} channels; WindowData reads colour images (3)")
                if index != len(self.images):
                    raise ValueError(f"image {index} is listed as number {len(self.images)}")
                self.images.append(root + path)
                at += 7
                for _ in range(count):
                    label, overlap = int(tokens[at]), float(np.float32(tokens[at + 1]))
                    box = tuple(int(value) for value in tokens[at + 2:at + 6])
                    if len(box) != 4:
                        raise ValueError("a window needs label, overlap, x1, y1, x2, y2")
                    at += 6
                    if overlap >= np.float32(fg_threshold):
                        if label <= 0:
                            raise ValueError(f"a foreground window of image {index} has label {label}")
                        self.windows[1].append((index, label, *box))
                    elif overlap < np.float32(bg_threshold):
                        self.windows[0].append((index, 0, *box))
        except (ValueError, IndexError) as exc:
            reason = str(exc) if isinstance(exc, ValueError) and str(exc) else "it ends inside an entry"
            raise CaffeFtError(f"not a window file: {reason}", source) from None
        if not self.images:
            raise CaffeFtError("the window file is empty", source)

    def _window(self, window: Tuple[int, int, int, int, int, int]) -> np.ndarray:
        import cv2

        path = self.images[window[0]]
        image = cv2.imread(path, cv2.IMREAD_COLOR)
        if image is None:
            raise CaffeFtError("cannot read this image", path)
        crop, f32 = self.crop, np.float32
        x1, y1, x2, y2 = window[2:]
        do_mirror = bool(self.mirror and self.rng.integers(0, 2))
        size_w = size_h = crop
        pad_w = pad_h = 0
        if self.context_pad > 0 or self.square:
            context = f32(crop) / f32(crop - 2 * self.context_pad)
            half_h, half_w = f32((y2 - y1 + 1) / 2.0), f32((x2 - x1 + 1) / 2.0)
            centre_x, centre_y = f32(x1) + half_w, f32(y1) + half_h
            if self.square:
                half_h = half_w = max(half_h, half_w)
            x1, x2 = _c_round(centre_x - half_w * context), _c_round(centre_x + half_w * context)
            y1, y2 = _c_round(centre_y - half_h * context), _c_round(centre_y + half_h * context)
            unclipped_h, unclipped_w = y2 - y1 + 1, x2 - x1 + 1
            pad_x1, pad_y1 = max(0, -x1), max(0, -y1)
            pad_x2, pad_y2 = max(0, x2 - image.shape[1] + 1), max(0, y2 - image.shape[0] + 1)
            x1, x2, y1, y2 = x1 + pad_x1, x2 - pad_x2, y1 + pad_y1, y2 - pad_y2
            scale_x, scale_y = f32(crop) / f32(unclipped_w), f32(crop) / f32(unclipped_h)
            size_w, size_h = _c_round(f32(x2 - x1 + 1) * scale_x), _c_round(f32(y2 - y1 + 1) * scale_y)
            pad_h = _c_round(f32(pad_y1) * scale_y)
            pad_w = _c_round(f32(pad_x2 if do_mirror else pad_x1) * scale_x)
            size_h, size_w = min(size_h, crop - pad_h), min(size_w, crop - pad_w)
        if not (0 <= x1 <= x2 < image.shape[1] and 0 <= y1 <= y2 < image.shape[0]) or size_w < 1 or size_h < 1:
            raise CaffeFtError(f"window ({window[2]}, {window[3]}, {window[4]}, {window[5]}) does not fit "
                               f"its {image.shape[1]}x{image.shape[0]} image", path)
        warped = cv2.resize(image[y1:y2 + 1, x1:x2 + 1], (size_w, size_h), interpolation=cv2.INTER_LINEAR)
        if do_mirror:
            warped = warped[:, ::-1]
        values = warped.transpose(2, 0, 1).astype(np.float32)
        if self.mean is not None:
            mean = self.mean
            if mean.shape[1:] != (1, 1):
                top = (mean.shape[2] - crop) // 2 + pad_h  # Caffe offsets both axes by the width's margin
                left = (mean.shape[2] - crop) // 2 + pad_w
                mean = mean[:, top:top + size_h, left:left + size_w]
            values = values - mean
        out = np.zeros((self.channels, crop, crop), np.float32)
        out[:, pad_h:pad_h + size_h, pad_w:pad_w + size_w] = values * self.scale
        return out

    def next(self, alloc: Optional[Alloc] = None) -> Dict[str, np.ndarray]:
        alloc = alloc or np.empty
        tops = list(self.layer.top)
        out = {tops[0]: alloc((self.batch, self.channels, self.crop, self.crop), np.float32)}
        labels: List[int] = []
        for foreground, count in ((0, self.batch - self.fg), (1, self.fg)):
            pool = self.windows[foreground]
            for _ in range(count):
                window = pool[int(self.rng.integers(0, len(pool)))]
                out[tops[0]][len(labels)] = self._window(window)
                labels.append(window[1])
        if len(tops) > 1:
            out[tops[1]] = alloc((self.batch,), np.float32)
            out[tops[1]][...] = labels
        return out

    def skip_batch(self) -> None:
        """What ``next()`` draws (the windows, their mirrors; neither depends on the images), without
        reading an image."""
        for foreground, count in ((0, self.batch - self.fg), (1, self.fg)):
            for _ in range(count):
                self.rng.integers(0, len(self.windows[foreground]))
                if self.mirror:
                    self.rng.integers(0, 2)


_READERS: Dict[str, Any] = {"ImageData": ImageDataSource, "Data": LmdbDataSource, "HDF5Data": Hdf5DataSource,
                            "WindowData": WindowDataSource, "DummyData": DummyDataSource}
#: The layers worker processes read (DummyData, made from nothing, is made in ``next()`` itself).
POOLED = ("ImageData", "Data", "HDF5Data", "WindowData")


# ------------------------------------------------------------- worker processes --

#: Shared-memory slots per worker: the batch the caller holds and the ones made ahead.
DEPTH = 3
_ALIGN = 64


class _SlotAlloc:
    """A worker's ``alloc``: arrays laid out one after the other in a slot, while they fit
    (the readers then write a batch straight into it); beyond, private arrays."""

    def __init__(self, memory: Any) -> None:
        self.memory, self.offset = memory, 0
        self.placed: List[Tuple[np.ndarray, int]] = []

    def __call__(self, shape: Tuple[int, ...], dtype: Any) -> np.ndarray:
        dtype = np.dtype(dtype)
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if self.memory is None or self.offset + size > self.memory.size:
            return np.empty(shape, dtype)
        array = _view(self.memory, dtype, shape, self.offset)
        self.placed.append((array, self.offset))
        self.offset += -(-size // _ALIGN) * _ALIGN
        return array

    def layout(self, batch: Mapping[str, np.ndarray]) -> Optional[List[Tuple[str, str, Tuple[int, ...], int]]]:
        """Where each top's array lies in the slot; None when one does not (the batch goes pickled)."""
        found = []
        for top, array in batch.items():
            offset = next((at for placed, at in self.placed if placed is array), None)
            if offset is None:
                return None
            found.append((top, array.dtype.str, tuple(array.shape), offset))
        return found


class _Spec:
    """What a worker process needs to make its readers (plain data: it crosses a 'spawn')."""

    def __init__(self, schema: Schema, layers: Sequence[Message], phase: str, seed: int, rank: int,
                 world: int, workers: int) -> None:
        # The schema's own text, so the worker reads the very schema (not one found again by path).
        self.schema = (schema.path, getattr(schema, "_text"))
        self.layers = [layer.SerializeToString() for layer in layers]
        self.phase, self.seed, self.rank, self.world, self.workers = phase, seed, rank, world, workers


def _failure(exc: Exception) -> Tuple[str, Any]:
    """What a worker sends for an exception: a CaffeFtError's parts (to be raised again as
    it was), or another exception's traceback (a bug, shown with its place)."""
    if isinstance(exc, CaffeFtError):
        return "error", (exc.message, exc.path, exc.line, exc.column, exc.layer)
    import traceback

    return "crash", "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def _work(conn: Any, spec: _Spec, first: int) -> None:
    """A worker process: skip to batch ``first``, then for every credit the parent
    sends make a batch, hand it over and skip the other workers' batches.

    A credit is ``(slot, shared memory name or None)``; the answer ``("shm",
    slot, layout)`` (the arrays written into that slot), ``("pickled", slot,
    arrays)`` (no slot yet, or too small), ``("error", slot, parts)`` (a
    CaffeFtError, rebuilt by the parent) or ``("crash", slot, traceback)``.
    ``None`` or the parent's end closing stops it."""
    # Ctrl-C and SIGTERM are the parent's to handle: it finishes the iteration, snapshots, then stops us.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        import cv2

        cv2.setNumThreads(1)  # the parallelism is the workers
    except ImportError:
        pass
    from multiprocessing import shared_memory

    attached: Dict[int, Any] = {}
    failure: Optional[Tuple[str, Any]] = None
    readers: List[Any] = []
    try:
        try:
            schema = Schema(*spec.schema)
            for data in spec.layers:
                layer = schema.new("LayerParameter")
                layer.ParseFromString(data)
                readers.append(_READERS[layer.type](layer, schema, spec.phase, spec.seed, spec.rank, spec.world))
            for _ in range(first):
                for reader in readers:
                    reader.skip_batch()
        except Exception as exc:  # noqa: BLE001 - said at this worker's first batch
            failure = _failure(exc)
        while True:
            credit = conn.recv()
            if credit is None:
                return
            slot, name = credit
            memory = attached.get(slot)
            if name is not None and (memory is None or memory.name != name.lstrip("/")):
                if memory is not None:
                    _close(memory)
                memory = attached[slot] = shared_memory.SharedMemory(name=name)
            alloc = _SlotAlloc(memory if name is not None else None)
            if failure is None:
                try:
                    batch: Dict[str, np.ndarray] = {}
                    for reader in readers:
                        batch.update(reader.next(alloc))
                except Exception as exc:  # noqa: BLE001 - the parent raises it
                    failure = _failure(exc)
            if failure is not None:
                conn.send((failure[0], slot, failure[1]))
                continue
            layout = alloc.layout(batch)
            if layout is not None:
                conn.send(("shm", slot, layout))
            else:
                conn.send(("pickled", slot, batch))
            del batch, alloc  # no view of a slot outlives its turn
            try:
                for _ in range(spec.workers - 1):
                    for reader in readers:
                        reader.skip_batch()
            except Exception as exc:  # noqa: BLE001 - the batch's own worker reports it first
                failure = _failure(exc)
    except (EOFError, OSError, KeyboardInterrupt):
        return  # the parent is gone or stopped us
    finally:
        for memory in attached.values():
            _close(memory)


def _view(memory: Any, dtype: Any, shape: Tuple[int, ...], offset: int) -> np.ndarray:
    """An array in a slot.  ``np.frombuffer`` (unlike ``np.ndarray(buffer=...)``) holds an export
    of the slot's buffer, so the slot cannot be unmapped under it (see :func:`_close`)."""
    count = int(np.prod(shape, dtype=np.int64))
    return np.frombuffer(memory.buf, dtype, count, offset).reshape(shape)


def _close(memory: Any) -> None:
    """Let go of a slot.  While views of it are held (a batch kept past its turn), the mapping
    stays with them, and goes when they go, instead of leaving them dangling."""
    try:
        memory.close()
    except BufferError:
        memory._buf = memory._mmap = None  # the views keep the mapping; close() then shuts the descriptor only
        memory.close()


def _nbytes(batch: Mapping[str, np.ndarray]) -> int:
    """The bytes a batch takes in a slot (each array aligned as :class:`_SlotAlloc` lays them out)."""
    return sum(-(-array.nbytes // _ALIGN) * _ALIGN for array in batch.values())


def _shut_down(processes: List[Any], conns: List[Any], slots: List[List[Any]]) -> None:
    """Stop the workers (asked, then terminated, then killed) and free the shared memory."""
    for conn in conns:
        try:
            conn.send(None)
        except (OSError, ValueError):
            pass
        conn.close()  # a worker blocked on sending a batch gets EPIPE
    for process in processes:
        process.join(5)
        if process.is_alive():
            process.terminate()
            process.join(2)
        if process.is_alive():
            process.kill()
            process.join()
    for memories in slots:
        for memory in memories:
            if memory is not None:
                _close(memory)
                try:
                    memory.unlink()
                except FileNotFoundError:
                    pass
        memories[:] = [None] * len(memories)
    processes.clear()
    conns.clear()


def _start_bare(process: Any) -> None:
    """Start a 'spawn' process without running the caller's main script in it.

    'spawn' imports the parent's ``__main__`` in the child (so that functions
    defined there can be found); the workers need nothing from it, and a
    script without an ``if __name__ == "__main__"`` guard would run again in
    every worker.  So the child is shown a bare ``__main__`` while it starts."""
    import sys
    import types

    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        process.start()
    finally:
        sys.modules["__main__"] = main


class WorkerPool:
    """The data layers of one net read by ``workers`` processes (started with 'spawn': no
    torch, no threads inherited), batch ``b`` by worker ``b mod workers``.

    ``next()`` gives the batches that the layers' own ``next()`` would give in
    turn, from batch ``start`` on.  Each worker has :data:`DEPTH` shared-memory
    slots that this process creates, reuses and frees: the readers write a
    batch straight into one, and ``next()`` gives views of it, which stay valid
    until the following ``next()`` (the slot then goes back to its worker) or
    :meth:`close`: no copy on either side.  A worker's first batches (before
    their slot is sized), a batch larger than its slot, and every batch when
    /dev/shm has no room come pickled instead.  An error in a worker is raised
    here, at the batch it belongs to, as the CaffeFtError it was; the pool is
    then closed.  :meth:`close` (also run when the pool is collected and at
    exit) stops the workers and frees the memory.
    """

    def __init__(self, layers: Sequence[Message], schema: Schema, phase: str, seed: int, rank: int, world: int,
                 workers: int, start: int = 0) -> None:
        import multiprocessing

        if workers < 1:
            raise ValueError("a pool needs at least one worker")
        context = multiprocessing.get_context("spawn")
        self.names = ", ".join(layer.name for layer in layers)
        spec = _Spec(schema, layers, phase, seed, rank, world, workers)
        self.processes: List[Any] = []
        self.conns: List[Any] = []
        self.slots: List[List[Any]] = [[None] * DEPTH for _ in range(workers)]
        self._finalizer = weakref.finalize(self, _shut_down, self.processes, self.conns, self.slots)
        self.turn = 0
        self._lent: Optional[Tuple[int, int]] = None  # (worker, slot) of the batch the caller holds
        for index in range(workers):
            ours, theirs = context.Pipe()
            process = context.Process(target=_work, args=(theirs, spec, start + index), daemon=True,
                                      name=f"caffe-ft-data-{index}")
            _start_bare(process)
            theirs.close()  # so that the worker's end closing shows here as EOF
            self.processes.append(process)
            self.conns.append(ours)
            for slot in range(DEPTH):
                ours.send((slot, None))

    @property
    def pids(self) -> List[int]:
        return [process.pid for process in self.processes]

    def next(self) -> Dict[str, np.ndarray]:
        """The next batch; its arrays may be views of a slot, valid until the next call."""
        if not self.processes:
            raise CaffeFtError("the data workers were stopped", layer=self.names)
        if self._lent is not None:
            self._give_back(*self._lent)
            self._lent = None
        index = self.turn
        self.turn = (index + 1) % len(self.processes)
        try:
            kind, slot, payload = self.conns[index].recv()
        except (EOFError, OSError):
            process = self.processes[index]
            process.join(1)
            self.close()
            why = f"exit code {process.exitcode}"
            if process.exitcode == -signal.SIGBUS:
                why += ": out of shared memory? (/dev/shm; --data-workers 0 reads without it)"
            raise CaffeFtError(f"a data worker stopped unexpectedly ({why})", layer=self.names) from None
        if kind == "error":
            self.close()
            raise CaffeFtError(*payload)
        if kind == "crash":
            self.close()
            raise RuntimeError(f"a data worker of layer(s) {self.names} failed:\n{payload}")
        if kind == "pickled":
            self._size(index, _nbytes(payload), slot)
            self._give_back(index, slot)
            return payload  # type: ignore[no-any-return]
        memory = self.slots[index][slot]
        self._lent = (index, slot)
        return {top: _view(memory, dtype, shape, offset) for top, dtype, shape, offset in payload}

    def _give_back(self, index: int, slot: int) -> None:
        """The slot's turn is over: the worker may fill it again."""
        memory = self.slots[index][slot]
        self.conns[index].send((slot, None if memory is None else memory.name))

    def _size(self, index: int, size: int, back: int) -> None:
        """Slots of ``size`` bytes for a worker: the one it has just handed back (``back``) when
        too small, and those it has not been told of yet (it uses neither now)."""
        from multiprocessing import shared_memory

        for slot, memory in enumerate(self.slots[index]):
            if memory is not None and (memory.size >= size or slot != back):
                continue
            try:
                room = os.statvfs("/dev/shm")
                if size > room.f_bavail * room.f_frsize // 2:
                    return  # no room: the batches come pickled
            except OSError:
                pass
            if memory is not None:
                _close(memory)
                memory.unlink()
            self.slots[index][slot] = shared_memory.SharedMemory(create=True, size=max(size, 1))

    def close(self) -> None:
        """Stop the workers and free the slots (again: nothing)."""
        self._finalizer()


class NetFeeder:
    """Every source layer of one net, read together: ``next()`` gives one pass's inputs.

    With ``workers`` > 0 the data layers (ImageData, Data, HDF5Data, WindowData) are read
    by that many worker processes (:class:`WorkerPool`, started at the first
    batch); otherwise here, and with ``prefetch`` one batch ahead in a
    background thread while the caller trains on this one (OpenCV decoding and
    LMDB reads release the GIL).  Either way: the same batches in the same
    order, and an error in a batch is raised when that batch is asked for.
    The caller's ``feed`` and DummyData are read in ``next()`` itself.  A
    batch's arrays are the caller's until the next ``next()``: with workers
    they lie in shared memory that is then filled again (copy what must live on).
    :meth:`close` stops the workers (the end of a run; also done at exit).
    """

    def __init__(self, sources: Sequence[Message], schema: Schema, phase: str, feed: Optional[Feed] = None,
                 seed: int = 0, rank: int = 0, world: int = 1, prefetch: bool = False, workers: int = 0) -> None:
        self.readers: List[Any] = []
        self.inputs: List[str] = []
        self.feed = feed
        self.passes = 0
        self.prefetch = prefetch
        self._worker: Optional[ThreadPoolExecutor] = None
        self._pending: Optional["Future[Dict[str, np.ndarray]]"] = None
        self._pooled: List[Message] = []
        self._args = (schema, phase, seed, rank, world)
        self.workers = workers
        self.pool: Optional[WorkerPool] = None
        self._batches = 0  # data batches taken (or skipped): where a pool starts
        for layer in sources:
            if layer.type in _READERS:
                # Built here in any case: a missing list, LMDB or file is said before any work.
                reader = _READERS[layer.type](layer, schema, phase, seed, rank, world)
                if workers > 0 and layer.type in POOLED:
                    self._pooled.append(layer)
                else:
                    self.readers.append(reader)
            elif layer.type == "Input":
                self.inputs.extend(layer.top)
            else:
                raise CaffeFtError(f"the torch engine cannot read '{layer.type}' data (ImageData, Data (LMDB), "
                                   "HDF5Data, DummyData, WindowData and Input only)", layer=layer.name)
        if self.inputs and feed is None:
            raise CaffeFtError(f"the net reads its data from Input layers ({', '.join(self.inputs)}), "
                               "which only a caller can feed; train with a data layer (ImageData)")

    def next(self) -> Dict[str, np.ndarray]:
        out = self._read()
        if self.feed is not None:
            out.update(self.feed(self.passes))
        self.passes += 1
        return out

    def _read_now(self) -> Dict[str, np.ndarray]:
        out: Dict[str, np.ndarray] = {}
        for reader in self.readers:
            out.update(reader.next())
        return out

    def _read(self) -> Dict[str, np.ndarray]:
        """The data layers' next batch: the one read ahead, and the one after it started."""
        if self._pooled:
            if self.pool is None:
                self.pool = WorkerPool(self._pooled, *self._args, workers=self.workers, start=self._batches)
            out = self.pool.next()
            out.update(self._read_now())
            self._batches += 1
            return out
        if not self.prefetch or not self.readers:
            return self._read_now()
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix="caffe-ft-data")
        pending = self._pending or self._worker.submit(self._read_now)
        self._pending = None
        batch = pending.result()
        self._pending = self._worker.submit(self._read_now)
        return batch

    def skip(self, passes: int) -> None:
        """Read and drop ``passes`` batches (a resumed run reads on where the first one was).

        Before the workers start, they skip them themselves, reading nothing."""
        if self._pooled and self.pool is None:
            self._batches += passes
            for _ in range(passes):
                for reader in self.readers:
                    reader.next()
        else:
            for _ in range(passes):
                self._read()
        self.passes += passes

    def close(self) -> None:
        """Stop the worker processes and the read-ahead thread (the feeder reads no more)."""
        if self.pool is not None:
            self.pool.close()
        if self._worker is not None:
            self._worker.shutdown(wait=True)
            self._worker = None
            self._pending = None


def input_shapes(sources: Sequence[Message], schema: Schema, phase: str) -> Dict[str, Tuple[int, ...]]:
    """Top shapes of ImageData, Data and HDF5Data layers whose size only the data tell (first item's)."""
    shapes: Dict[str, Tuple[int, ...]] = {}
    for layer in sources:
        if layer.type == "WindowData":
            windows = WindowDataSource(layer, schema, phase)
            shapes[layer.top[0]] = (windows.batch, windows.channels, windows.crop, windows.crop)
            continue
        if layer.type == "HDF5Data":
            files = Hdf5DataSource(layer, schema, phase)
            for top, array in zip(layer.top, files.arrays()):
                shapes[top] = (layer.hdf5_data_param.batch_size, *array.shape[1:])
            continue
        if layer.type == "Data":
            reader = LmdbDataSource(layer, schema, phase)
            reader.batch = 1
            item = reader.next()[layer.top[0]]
            shapes[layer.top[0]] = (layer.data_param.batch_size, *item.shape[1:])
            continue
        if layer.type == "ImageData" and not layer.transform_param.crop_size and not layer.image_data_param.new_height:
            first = ImageDataSource(layer, schema, phase)
            first.batch = 1
            image = first.next()[layer.top[0]]
            shapes[layer.top[0]] = (layer.image_data_param.batch_size, *image.shape[1:])
    return shapes
