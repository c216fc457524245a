"""Features of a frozen trunk, computed once and cached in a ``.npz`` file.

Training only a new classifier on a pretrained net (the "fixed feature
extractor" recipe) does not need Caffe's solver: every image goes through the
frozen layers once, and a linear model learns from the stored outputs
(:mod:`caffe_ft.heads.linear`).  This module does the forward part:

* :func:`cut_net` keeps only the layers that compute one blob (by default the
  input of the classifier head) and puts an ``Input`` layer where the data
  layer was, as a deploy net;
* :class:`Transform` does what Caffe's ``DataTransformer`` does at TEST phase
  (centre crop, then mean subtraction, then scaling), after ``ImageData``'s
  colour/grey read and resize, so that the features are those the net sees;
* :func:`extract` runs the cut net with pycaffe, batch by batch, with a
  progress bar;
* :func:`compute_or_reuse` writes a compressed archive holding the features,
  labels, image sources and fingerprints of everything they depend on, and
  reuses an existing archive only while every fingerprint still matches.

Fingerprints are SHA-256 digests: of the cut net's text (so editing layers
the features do not depend on, such as the old head, keeps the cache), of the
whole weights file (read in 1 MiB chunks: it costs less than one forward batch
of the net it holds), of the image list's bytes together with each image's
size and mtime (an LMDB: its ``data.mdb`` size and mtime, since any write
rewrites it), of the layer choice and of the transform, mean file included.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from google.protobuf.message import Message

from ..net import graph
from ..errors import CaffeFtError
from ..formats.files import load_net  # noqa: F401  (the trunk's net: read here, used by linear/advise)
from ..formats.schema import Schema
from ..net.shapes import filter_layers

if TYPE_CHECKING:  # heavy imports stay out of `caffe-ft --help`
    import numpy as np

FORMAT = "caffe-ft-features/1"
_CHUNK = 1 << 20
# Data layer types whose transform_param and sources this module understands.
_IMAGE_LAYERS = ("ImageData", "Data")


# --------------------------------------------------------------------------
# Fingerprints


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


def stale_parts(stored: Dict[str, str], current: Dict[str, str]) -> List[str]:
    """The names of the fingerprints that differ (or exist on one side only)."""
    return sorted(name for name in set(stored) | set(current) if stored.get(name) != current.get(name))


# --------------------------------------------------------------------------
# The data transform


@dataclass(frozen=True)
class Transform:
    """How an image becomes the net's input, as a TEST-phase Caffe data layer does it.

    ``new_height``/``new_width`` (both or neither) and ``is_color`` are
    ``ImageData``'s; ``force_color``/``force_gray`` apply to encoded LMDB
    records.  The rest is ``transform_param``: centre crop to ``crop_size``,
    subtract ``mean_file`` (indexed at the uncropped position, so it must have
    the image's size) or ``mean_values`` (one, or one per channel), multiply by
    ``scale``.  ``mirror`` is not applied: a fixed feature is computed once.
    """

    crop_size: int = 0
    mean_values: Tuple[float, ...] = ()
    mean_file: Optional[str] = None
    scale: float = 1.0
    new_height: int = 0
    new_width: int = 0
    is_color: bool = True
    force_color: bool = False
    force_gray: bool = False

    def __post_init__(self) -> None:
        if self.mean_file and self.mean_values:
            raise CaffeFtError("give a mean file or mean values, not both")
        if (self.new_height > 0) != (self.new_width > 0):
            raise CaffeFtError("resizing needs both a new height and a new width")
        if self.force_color and self.force_gray:
            raise CaffeFtError("force_color and force_gray exclude each other")

    def describe(self) -> Dict[str, Any]:
        """The settings as plain JSON values (for fingerprints and summaries)."""
        return {**asdict(self), "mean_values": list(self.mean_values)}

    def fingerprint(self) -> str:
        described = self.describe()
        if self.mean_file:
            described["mean_file"] = sha256_file(self.mean_file)
        return sha256_text(json.dumps(described, sort_keys=True))


def _transform_of(layer: Message) -> Transform:
    """The Transform a data layer's ``transform_param`` (and ``image_data_param``) describe."""
    param = layer.transform_param
    image = layer.image_data_param if layer.type == "ImageData" else None
    return Transform(
        crop_size=param.crop_size,
        mean_values=tuple(param.mean_value),
        mean_file=param.mean_file or None,
        scale=param.scale,
        new_height=image.new_height if image is not None else 0,
        new_width=image.new_width if image is not None else 0,
        is_color=image.is_color if image is not None else True,
        force_color=param.force_color,
        force_gray=param.force_gray,
    )


def net_data_layer(net: Message, phase: Optional[str] = None) -> Optional[Message]:
    """The net's image data layer in ``phase``; by default the TEST one
    preferred (its crop is the deterministic centre crop), else the TRAIN
    one; None for a deploy net."""
    for each in (phase,) if phase else ("TEST", "TRAIN"):
        for layer in filter_layers(net, each, net.state.level, list(net.state.stage)):
            if layer.type in _IMAGE_LAYERS:
                return layer
    return None


def _input_hw(net: Message) -> Optional[Tuple[int, int]]:
    """Height and width of a deploy net's 4-D Input, if it has one."""
    for layer in net.layer:
        if layer.type == "Input" and len(layer.input_param.shape):
            dims = list(layer.input_param.shape[0].dim)
            if len(dims) == 4:
                return int(dims[2]), int(dims[3])
    return None


def default_transform(net: Message, phase: Optional[str] = None) -> Transform:
    """What the net's data layer (of ``phase``, see :func:`net_data_layer`)
    does; for a deploy net (Input only), a plain resize to the input's height
    and width, which is all it tells."""
    layer = net_data_layer(net, phase)
    if layer is not None:
        return _transform_of(layer)
    size = _input_hw(net)
    return Transform(new_height=size[0], new_width=size[1]) if size else Transform()


def net_root_folder(net: Message, phase: Optional[str] = None) -> str:
    layer = net_data_layer(net, phase)
    return layer.image_data_param.root_folder if layer is not None and layer.type == "ImageData" else ""


def override(transform: Transform, **changes: Any) -> Transform:
    """``transform`` with the given (not None) settings replaced; a mean of
    one kind replaces a mean of the other."""
    given = {key: value for key, value in changes.items() if value is not None}
    if given.get("mean_values"):
        given["mean_file"] = None
    elif given.get("mean_file"):
        given["mean_values"] = ()
    return replace(transform, **given)


def mean_array(transform: Transform, schema: Schema) -> Optional["np.ndarray"]:
    """The mean to subtract as float32, shaped (C, H, W) for a mean file and
    (C, 1, 1) or (1, 1, 1) for mean values; None for no mean."""
    import numpy as np

    if transform.mean_file:
        from ..formats.caffemodel import load_blob

        blob = load_blob(transform.mean_file, schema)
        data = np.asarray(blob.data, np.float32)
        if data.ndim == 4 and data.shape[0] == 1:
            data = data[0]
        if data.ndim != 3:
            raise CaffeFtError(f"a mean file must hold one C x H x W image, not shape {blob.shape}",
                               transform.mean_file)
        return data
    if transform.mean_values:
        return np.asarray(transform.mean_values, np.float32).reshape(-1, 1, 1)
    return None


def transform_image(image: "np.ndarray", transform: Transform, mean: Optional["np.ndarray"]) -> "np.ndarray":
    """One C x H x W image (uint8 or float) as the net's float32 input:
    centre crop, subtract the mean, multiply by the scale, in Caffe's order."""
    import numpy as np

    channels, height, width = image.shape
    crop = transform.crop_size
    if mean is not None:
        if mean.shape[1:] != (1, 1) and mean.shape != image.shape:
            raise CaffeFtError(
                f"the mean file is {'x'.join(map(str, mean.shape))} but an image is "
                f"{channels}x{height}x{width}; they must match before cropping"
            )
        if mean.shape[0] not in (1, channels):
            raise CaffeFtError(f"{mean.shape[0]} mean values for {channels}-channel images (give 1 or {channels})")
    if crop:
        if height < crop or width < crop:
            raise CaffeFtError(f"an image of {height}x{width} is smaller than crop_size {crop}")
        top, left = (height - crop) // 2, (width - crop) // 2
        image = image[:, top : top + crop, left : left + crop]
        if mean is not None and mean.shape[1:] != (1, 1):
            mean = mean[:, top : top + crop, left : left + crop]
    out = image.astype(np.float32)
    if mean is not None:
        out -= mean
    if transform.scale != 1:
        out *= np.float32(transform.scale)
    return out


# --------------------------------------------------------------------------
# Data sources


def read_image(path: str, transform: Transform) -> "np.ndarray":
    """An image file as Caffe's ImageData reads it: BGR (or grey), resized
    with bilinear interpolation when a size is set, as C x H x W uint8."""
    import cv2

    flag = cv2.IMREAD_COLOR if transform.is_color else cv2.IMREAD_GRAYSCALE
    image = cv2.imread(path, flag)
    if image is None:
        raise CaffeFtError("cannot read this image", path)
    if transform.new_height:
        image = cv2.resize(image, (transform.new_width, transform.new_height))
    return to_chw(image)


def to_chw(image: "np.ndarray") -> "np.ndarray":
    """An OpenCV H x W (x C) array as C x H x W."""
    return image[None] if image.ndim == 2 else image.transpose(2, 0, 1)


def decode_datum(record: bytes, schema: Schema, transform: Transform) -> Tuple["np.ndarray", int]:
    """A serialized ``Datum`` as (C x H x W array, label).  An encoded one is
    decoded by OpenCV as Caffe's Data layer does (``force_color``/``force_gray``,
    else as stored); a raw one holds uint8 ``data`` or ``float_data``."""
    import numpy as np

    datum = schema.new("Datum")
    datum.ParseFromString(record)
    if datum.encoded:
        import cv2

        flag = cv2.IMREAD_COLOR if transform.force_color else (
            cv2.IMREAD_GRAYSCALE if transform.force_gray else cv2.IMREAD_UNCHANGED)
        image = cv2.imdecode(np.frombuffer(datum.data, np.uint8), flag)
        if image is None:
            raise CaffeFtError("an encoded Datum does not decode as an image")
        return to_chw(image), datum.label
    shape = (datum.channels, datum.height, datum.width)
    values = np.frombuffer(datum.data, np.uint8) if datum.data else np.asarray(datum.float_data, np.float32)
    if values.size != shape[0] * shape[1] * shape[2] or not values.size:
        raise CaffeFtError(f"a Datum of shape {shape} holds {values.size} values")
    return values.reshape(shape), datum.label


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

    def __len__(self) -> int:
        if self.is_lmdb:
            with self._lmdb() as env:
                count = int(env.stat()["entries"])
            return count if self.limit is None else min(count, self.limit)
        return len(self.entries)

    def fingerprint(self) -> str:
        """Digest of the list and of each image's size and mtime (LMDB: of data.mdb's)."""
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


# --------------------------------------------------------------------------
# Cutting the net


@dataclass(frozen=True)
class Trunk:
    """A deploy net computing ``feature_blob`` from ``input_blob`` and nothing more."""

    net: Message
    input_blob: str
    feature_blob: str
    layer: str  # the layer whose output the features are (the last one writing the blob)

    def text(self) -> str:
        from ..formats.prototext import print_message

        return print_message(self.net)

    def with_batch(self, batch: int) -> "Trunk":
        net = type(self.net)()
        net.CopyFrom(self.net)
        net.layer[0].input_param.shape[0].dim[0] = batch
        return replace(self, net=net)

    def fingerprint(self) -> str:
        """Digest of the layers and the input's C x H x W (not the batch size)."""
        return sha256_text(self.with_batch(1).text())


def net_at_test(net: Message) -> Message:
    """A copy of ``net`` holding only the layers Caffe builds in the TEST phase."""
    copy = type(net)()
    copy.CopyFrom(net)
    del copy.layer[:]
    copy.layer.extend(filter_layers(net, "TEST", net.state.level, list(net.state.stage)))
    return copy


def _chain_end(layers: Sequence[Message], index: int, blob: str) -> int:
    """The last of the in-place layers (ReLU, BatchNorm, Dropout...) rewriting
    ``blob`` right after layer ``index``: its value is what readers see."""
    end = index
    for later in range(index + 1, len(layers)):
        if blob in layers[later].top:
            if blob not in layers[later].bottom:
                break
            end = later
    return end


def feature_source(net: Message, layer: Optional[str] = None) -> int:
    """Index (in ``net.layer``) of the layer whose output is the feature.

    ``layer`` names a layer (its first top, after the in-place layers that
    follow it, as Caffe's extract_features sees the blob) or a blob (its final
    value); by default, the blob the classifier head reads.
    """
    layers = list(net.layer)
    if layer is None:
        heads = graph.find_heads(net).heads
        if not heads:
            raise CaffeFtError("no classifier head found to take the features before; pass --layer")
        head = graph.layer_index(net, heads[-1])
        source = graph.producers(layers)[head][0]
        if source is None or layers[source].type in graph.DATA_TYPES:
            raise CaffeFtError(f"the head '{heads[-1]}' reads the input directly: there is no trunk; pass --layer")
        return source
    names = [each.name for each in layers]
    if layer in names:
        index = len(names) - 1 - names[::-1].index(layer)
        if not len(layers[index].top):
            raise CaffeFtError(f"layer '{layer}' has no output")
        return _chain_end(layers, index, layers[index].top[0])
    writers = [i for i, each in enumerate(layers) if layer in each.top]
    if writers:
        return writers[-1]
    graph.layer_index(net, layer)  # raises, with close names
    raise AssertionError("unreachable")


def cut_net(net: Message, schema: Schema, input_shape: Sequence[int], layer: Optional[str] = None,
            batch: int = 1) -> Trunk:
    """The TEST-phase layers of ``net`` that compute the feature (see
    :func:`feature_source`), behind an ``Input`` of shape batch x ``input_shape``
    in place of the data layer."""
    net = net_at_test(net)
    layers = list(net.layer)
    source = feature_source(net, layer)
    needed = sorted(graph.upstream(layers, [source]))
    feeds = [i for i in needed if layers[i].type in graph.DATA_TYPES]
    used = {bottom for i in needed for bottom in layers[i].bottom}
    if len(feeds) != 1 or layers[feeds[0]].type == "Python":
        raise CaffeFtError("the features must come from one image input (an Input, Data or ImageData layer)")
    data = layers[feeds[0]]
    if set(data.top[1:]) & used:
        raise CaffeFtError(f"the layers before the features read the labels of '{data.name}'")
    out = schema.new("NetParameter")
    out.name = net.name
    head = out.layer.add()
    head.name, head.type = data.name, "Input"
    head.top.append(data.top[0])
    head.input_param.shape.add().dim.extend([batch, *input_shape])
    for index in needed:
        if index == feeds[0]:
            continue
        copy = out.layer.add()
        copy.CopyFrom(layers[index])
        for name in ("include", "exclude", "phase"):
            copy.ClearField(name)
    return Trunk(out, data.top[0], layers[source].top[0], layers[source].name)


# --------------------------------------------------------------------------
# Running the trunk


def progress(total: int, what: str) -> Callable[[int], None]:
    """A callback advancing a progress display by n items: a tqdm bar on a
    terminal when tqdm is installed, otherwise a line about every tenth."""
    stream = sys.stderr
    if stream.isatty():
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            bar = tqdm(total=total, desc=what, unit="img", file=stream, leave=False)

            def advance_bar(count: int) -> None:
                bar.update(count)
                if bar.n >= total:
                    bar.close()

            return advance_bar
    done = [0, 0]  # items, tenths reported

    def advance(count: int) -> None:
        done[0] += count
        tenth = done[0] * 10 // max(total, 1)
        if tenth > done[1] or done[0] >= total:
            done[1] = tenth
            stream.write(f"{what}: {done[0]}/{total} images\n")
            stream.flush()

    return advance


def quiet_caffe() -> Any:
    """pycaffe, imported with Caffe's INFO logging off, in CPU mode."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    try:
        import caffe
    except ImportError:
        raise CaffeFtError("computing features needs pycaffe (run inside the Caffe environment)") from None
    caffe.set_mode_cpu()
    return caffe


def load_caffe_net(text: str, weights: str) -> Any:
    """A pycaffe TEST net from prototxt text and a weights file."""
    caffe = quiet_caffe()
    with tempfile.NamedTemporaryFile("w", suffix=".prototxt", delete=False) as handle:
        handle.write(text)
    try:
        return caffe.Net(handle.name, weights, caffe.TEST)
    finally:
        os.unlink(handle.name)


def forward_batches(
    net: Any, trunk: Trunk, batches: Iterator[Tuple["np.ndarray", "np.ndarray", List[str]]],
    blobs: Sequence[str], advance: Callable[[int], None],
) -> Iterator[Tuple[Dict[str, "np.ndarray"], "np.ndarray", List[str]]]:
    """For each batch, copies of ``blobs`` after a forward pass, labels and names."""
    inputs = net.blobs[trunk.input_blob]
    for data, labels, names in batches:
        if inputs.data.shape != data.shape:
            inputs.reshape(*data.shape)
            net.reshape()
        inputs.data[...] = data
        net.forward()
        yield {name: net.blobs[name].data.copy() for name in blobs}, labels, names
        advance(len(names))


def input_shape(source: DataSource, schema: Schema, transform: Transform, mean: Optional["np.ndarray"]
                ) -> Tuple[int, ...]:
    """C x H x W of the first transformed image (the Input the trunk gets)."""
    for image, _, _ in source.items(schema, transform):
        return tuple(transform_image(image, transform, mean).shape)
    raise CaffeFtError("the data source holds no images", source.path)


# --------------------------------------------------------------------------
# The cache


@dataclass
class FeatureSet:
    """Features (N x feature shape, float32), labels, sources and what they came from."""

    features: "np.ndarray"
    labels: "np.ndarray"
    sources: "np.ndarray"
    meta: Dict[str, Any]

    @property
    def matrix(self) -> "np.ndarray":
        """One row per example, flattened in C order as InnerProduct flattens from axis 1."""
        return self.features.reshape(len(self.features), -1)


def save_features(path: str, features: FeatureSet) -> None:
    """Write a compressed archive atomically (temp file, rename)."""
    import numpy as np

    from ..formats.files import atomic_output

    with atomic_output(path) as handle:
        np.savez_compressed(
            handle, features=features.features, labels=features.labels,
            sources=np.asarray(features.sources, dtype=str), meta=np.asarray(json.dumps(features.meta)),
        )


def load_features(path: str) -> FeatureSet:
    """Read an archive written by :func:`save_features`."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as archive:
            meta = json.loads(str(archive["meta"]))
            loaded = FeatureSet(archive["features"], archive["labels"], archive["sources"], meta)
    except FileNotFoundError:
        raise CaffeFtError("no such file", path) from None
    except (OSError, ValueError, KeyError) as exc:
        raise CaffeFtError(f"not a caffe-ft features file ({exc})", path) from None
    if loaded.meta.get("format") != FORMAT:
        raise CaffeFtError(f"not a caffe-ft features file (format {loaded.meta.get('format')!r})", path)
    return loaded


@dataclass(frozen=True)
class Request:
    """Everything a feature file depends on."""

    net_path: str
    weights: str
    data: str
    layer: Optional[str] = None
    root_folder: Optional[str] = None  # None: the net's image_data_param.root_folder
    transform: Dict[str, Any] = field(default_factory=dict)  # overrides of the net's transform
    batch_size: int = 32
    phase: Optional[str] = None  # whose data layer gives the transform (default: TEST, else TRAIN)


@dataclass
class Prepared:
    """A request resolved: trunk, transform, data source and their fingerprints."""

    trunk: Trunk
    transform: Transform
    mean: Optional["np.ndarray"]
    source: DataSource
    fingerprints: Dict[str, str]
    net_path: str


def prepare(request: Request, schema: Schema) -> Prepared:
    """Resolve the trunk, the transform and the data, and fingerprint them."""
    net = load_net(request.net_path, schema)
    transform = override(default_transform(net, request.phase), **request.transform)
    mean = mean_array(transform, schema)
    root = request.root_folder if request.root_folder is not None else net_root_folder(net, request.phase)
    source = DataSource.open(request.data, root)
    shape = input_shape(source, schema, transform, mean)
    try:
        trunk = cut_net(net, schema, shape, request.layer, request.batch_size)
    except CaffeFtError as exc:
        raise exc.located(request.net_path) from None
    fingerprints = {
        "layer": f"{trunk.layer} -> {trunk.feature_blob}",
        "trunk": trunk.fingerprint(),
        "weights": sha256_file(request.weights),
        "data": source.fingerprint(),
        "transform": transform.fingerprint(),
    }
    return Prepared(trunk, transform, mean, source, fingerprints, request.net_path)


def extract(prepared: Prepared, weights: str, schema: Schema, batch_size: int) -> FeatureSet:
    """Run the trunk over the whole data source."""
    import numpy as np

    net = load_caffe_net(prepared.trunk.text(), weights)
    trunk, source = prepared.trunk, prepared.source
    advance = progress(len(source), f"features {trunk.feature_blob}")
    parts, labels, names = [], [], []
    batches = source.batches(schema, prepared.transform, prepared.mean, batch_size)
    for blobs, batch_labels, batch_names in forward_batches(net, trunk, batches, [trunk.feature_blob], advance):
        parts.append(blobs[trunk.feature_blob])
        labels.append(batch_labels)
        names.extend(batch_names)
    features = np.concatenate(parts).astype(np.float32, copy=False)
    meta = {
        "format": FORMAT,
        "net": os.path.abspath(prepared.net_path),
        "weights": os.path.abspath(weights),
        "data": os.path.abspath(source.path),
        "layer": trunk.layer,
        "blob": trunk.feature_blob,
        "input_blob": trunk.input_blob,
        "input_shape": list(trunk.net.layer[0].input_param.shape[0].dim[1:]),
        "transform": prepared.transform.describe(),
        "fingerprints": prepared.fingerprints,
    }
    return FeatureSet(features, np.concatenate(labels), np.asarray(names, dtype=str), meta)


@dataclass(frozen=True)
class Outcome:
    """What :func:`compute_or_reuse` did: ``reused``, or recomputed with the reason."""

    features: FeatureSet
    reused: bool
    reason: str


def compute_or_reuse(request: Request, output: str, schema: Schema, force: bool = False) -> Outcome:
    """The features of ``request``, from ``output`` when it is up to date,
    otherwise computed and written there."""
    prepared = prepare(request, schema)
    reason = "forced" if force else "no features file yet"
    if not force and os.path.exists(output):
        try:
            cached = load_features(output)
        except CaffeFtError as exc:
            reason = f"unreadable ({exc.message})"
        else:
            stale = stale_parts(cached.meta.get("fingerprints", {}), prepared.fingerprints)
            if not stale:
                return Outcome(cached, True, "up to date")
            reason = "stale: " + ", ".join(f"{part} changed" for part in stale)
    result = extract(prepared, request.weights, schema, request.batch_size)
    save_features(output, result)
    return Outcome(result, False, reason)
