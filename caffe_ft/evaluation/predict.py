"""Running a trained net over an image list: the class probabilities evaluation starts from.

The net may be a deploy net or a train_val net: only its TEST-phase layers
that compute the class scores are kept, behind an ``Input`` where the data
layer was (:func:`caffe_ft.heads.trunk.cut_net`), so the loss and Accuracy
layers and the labels play no part.  Images are read and transformed as the
net's TEST data layer does (:mod:`caffe_ft.data`), in numpy, and the pycaffe
engine runs the forward passes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from google.protobuf.message import Message

from ..data.sources import DataSource, input_shape
from ..data.transform import default_transform, mean_array, net_data_layer, net_root_folder, override
from ..errors import CaffeFtError, listing
from ..formats.files import load_net
from ..formats.schema import Schema
from ..heads.trunk import cut_net, net_at_test
from .metrics import Predictions, softmax

#: Layers whose first bottom is the class scores.
_SCORE_READERS = ("Accuracy", "SoftmaxWithLoss")


@dataclass(frozen=True)
class PredictRequest:
    """What to run: the net, its weights, the data, and how to read it."""

    net_path: str
    weights: str
    data: str
    blob: Optional[str] = None  # None: see score_blob
    batch_size: int = 32
    root_folder: Optional[str] = None  # None: the net's image_data_param.root_folder
    transform: Dict[str, Any] = field(default_factory=dict)  # overrides of the net's TEST transform
    engine: str = "pycaffe"  # who runs the net: pycaffe or torch (caffe_ft.training.forward)


def score_blob(net: Message) -> str:
    """The blob holding the class scores of a TEST-phase net: what its
    Accuracy (else SoftmaxWithLoss) layer reads; for a deploy net, its one
    output (a Softmax's output when there are several)."""
    layers = list(net.layer)
    for kind in _SCORE_READERS:
        for layer in layers:
            if layer.type == kind and len(layer.bottom):
                return str(layer.bottom[0])
    consumed = {bottom for layer in layers for bottom in layer.bottom if bottom not in layer.top}
    outputs: List[str] = []
    for layer in layers:
        for top in layer.top:
            if top not in consumed and top not in outputs:
                outputs.append(top)
    if len(outputs) > 1:
        softmaxed = [blob for blob in outputs if writer_type(net, blob) == "Softmax"]
        outputs = softmaxed if len(softmaxed) == 1 else outputs
    if len(outputs) != 1:
        raise CaffeFtError("cannot tell which blob holds the class scores "
                           f"({', '.join(outputs) or 'no outputs'}); pass --blob")
    return outputs[0]


def writer_type(net: Message, blob: str) -> Optional[str]:
    """The type of the last layer writing ``blob`` (None when none does)."""
    found = None
    for layer in net.layer:
        if blob in layer.top:
            found = layer.type
    return found


def predict(request: PredictRequest, schema: Schema) -> Predictions:
    """Class probabilities for every image of ``request.data``: the score
    blob's values when a Softmax writes it, their softmax otherwise."""
    import numpy as np

    from ..training.progress import count_progress
    from ..training.forward import forward_batches

    net = load_net(request.net_path, schema)
    transform = override(default_transform(net), **request.transform)
    mean = mean_array(transform, schema)
    root = request.root_folder if request.root_folder is not None else net_root_folder(net)
    source = DataSource.open(request.data, root)
    test = net_at_test(net)
    try:
        blob = request.blob or score_blob(test)
        trunk = cut_net(net, schema, input_shape(source, schema, transform, mean), blob, request.batch_size)
    except CaffeFtError as exc:
        raise exc.located(request.net_path) from None
    check_weights(trunk.net, request.weights, schema)
    check_labels(source, trunk.net, trunk.feature_blob)
    started = time.monotonic()
    advance = count_progress(len(source), f"evaluate {blob}")
    parts, labels, names = [], [], []
    batches = source.batches(schema, transform, mean, request.batch_size)
    for blobs, batch_labels, batch_names in forward_batches(request.engine, trunk.net, request.weights, trunk.input_blob,
                                                            batches, [trunk.feature_blob], advance, schema):
        parts.append(blobs[trunk.feature_blob].reshape(len(batch_names), -1))
        labels.append(batch_labels)
        names.extend(batch_names)
    scores = np.concatenate(parts)
    is_prob = writer_type(trunk.net, trunk.feature_blob) == "Softmax"
    probs = scores.astype(np.float64) if is_prob else softmax(scores)
    seconds = time.monotonic() - started
    meta = {
        "net": os.path.abspath(request.net_path), "weights": os.path.abspath(request.weights),
        "data": os.path.abspath(source.path), "root_folder": root, "blob": trunk.feature_blob,
        "probabilities": "the net's Softmax" if is_prob else "softmax of the scores",
        "transform": transform.describe(),
        "transform_from": "the net's data layer" if net_data_layer(net) is not None else
                          "the Input's size only (a deploy net tells no mean or scale)",
        "seconds": round(seconds, 3),
        "images_per_second": round(len(names) / seconds, 2) if seconds > 0 else None,
    }
    return Predictions(probs, np.concatenate(labels), names, meta)


def check_labels(source: DataSource, net: Message, blob: str) -> None:
    """Refuse an image list with a label the scores cannot hold, before any forward pass."""
    from ..net.shapes import count, infer

    try:
        classes = count(infer(net).blobs[blob][1:])
    except (CaffeFtError, KeyError):
        return  # a net whose shapes are not inferred here: the labels are checked on the scores
    for number, (name, label) in enumerate(source.entries, 1):
        if not 0 <= label < classes:
            raise CaffeFtError(f"label {label} of '{name}' is outside the net's {classes} classes "
                               f"(0-{classes - 1})", source.path, number)


def check_weights(net: Message, weights: str, schema: Schema) -> None:
    """Refuse weights Caffe would abort on, or that leave a layer with its
    fillers' random values: evaluating that would measure noise."""
    from ..formats.caffemodel import load_model
    from ..net.weights import FRESH, check

    report = check(net, load_model(weights, schema), "TEST")
    if not report.ok:
        raise CaffeFtError(f"Caffe cannot load these weights into the net: {report.abort}", weights)
    fresh = [layer.name for layer in report.by_status(FRESH)]
    if fresh:
        raise CaffeFtError(f"no weights for layer{'s' if len(fresh) > 1 else ''} {listing(fresh)} "
                           "(they would keep random values)", weights)


def image_file(predictions: Predictions, source: str) -> Optional[str]:
    """Where the image of a prediction's ``source`` lies (None for an LMDB record)."""
    from ..data.sources import image_path

    data = predictions.meta.get("data", "")
    if os.path.isdir(data):
        return None
    return image_path(predictions.meta.get("root_folder", ""), source)


def data_of_test_net(net: Message) -> Tuple[Optional[str], str]:
    """The source and root folder of a net's TEST image data layer (None: it has none)."""
    layer = net_data_layer(net, "TEST")
    if layer is None:
        return None, ""
    if layer.type == "ImageData":
        return layer.image_data_param.source, layer.image_data_param.root_folder
    return layer.data_param.source, ""
