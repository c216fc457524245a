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
anything; the worker processes of :mod:`.feed` build on it.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from google.protobuf.message import Message

from ...errors import CaffeFtError
from ...formats.schema import Schema

SOURCES_WITH_DATA = ("ImageData", "Data", "HDF5Data")


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

    def skip_batch(self) -> None:
        """What :meth:`next` does to the fillers' draws (they are its state)."""
        self.next()


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


READERS: Dict[str, Any] = {"ImageData": ImageDataSource, "Data": LmdbDataSource, "HDF5Data": Hdf5DataSource,
                            "WindowData": WindowDataSource, "DummyData": DummyDataSource}
#: The layers worker processes read (DummyData, made from nothing, is made in ``next()`` itself).
POOLED = ("ImageData", "Data", "HDF5Data", "WindowData")


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
