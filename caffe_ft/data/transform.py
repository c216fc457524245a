"""Caffe's TEST-phase data transform, in numpy: how an image becomes the net's input.

:class:`Transform` holds what a data layer's ``transform_param`` (and
``ImageData``'s resize and colour settings) say; :func:`default_transform`
reads it from a net; :func:`read_image`, :func:`decode_datum` and
:func:`transform_image` do what Caffe's ``ImageData``/``Data`` layers and
``DataTransformer`` do, in the same order (decode, resize, crop, mean, scale).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

from google.protobuf.message import Message

from ..errors import CaffeFtError
from ..formats.files import sha256_file, sha256_text
from ..formats.schema import Schema
from ..net.shapes import filter_layers

if TYPE_CHECKING:  # heavy imports stay out of `caffe-ft --help`
    import numpy as np

#: Data layer types whose transform_param and sources this package understands.
IMAGE_LAYERS = ("ImageData", "Data")


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
            if layer.type in IMAGE_LAYERS:
                return layer
    return None


def _input_chw(net: Message) -> Optional[Tuple[int, int, int]]:
    """Channels, height and width of a deploy net's 4-D Input, if it has one."""
    for layer in net.layer:
        if layer.type == "Input" and len(layer.input_param.shape):
            dims = list(layer.input_param.shape[0].dim)
            if len(dims) == 4:
                return int(dims[1]), int(dims[2]), int(dims[3])
    return None


def default_transform(net: Message, phase: Optional[str] = None) -> Transform:
    """What the net's data layer (of ``phase``, see :func:`net_data_layer`)
    does; for a deploy net (Input only), a plain resize to the input's height
    and width, in grey for a one-channel input, which is all it tells."""
    layer = net_data_layer(net, phase)
    if layer is not None:
        return _transform_of(layer)
    shape = _input_chw(net)
    if shape is None:
        return Transform()
    return Transform(new_height=shape[1], new_width=shape[2], is_color=shape[0] != 1)


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
