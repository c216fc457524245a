"""How much of a pretrained net to retrain, from measurements of the data.

The fine-tuning rule of thumb (CS231n) crosses two questions: how big is the
new data set (counted here), and how similar is it to the data the net was
trained on.  The second is usually asked of the user; :func:`measure_similarity`
measures it instead, on a sample of the training images, with two signals:

* **BatchNorm statistics.**  Every BatchNorm layer holds the mean and
  variance its input had on the pretraining data.  The sample's own per-channel
  mean and variance at the same place are compared with them: the shift of
  the mean in stored standard deviations, ``|mu_data - mu_bn| / sqrt(var_bn + eps)``,
  and the log ratio of the variances, ``|log((var_data + eps) / (var_bn + eps))|``,
  each averaged over channels and then over layers.  Pretraining-like images
  keep both small; a different domain drives every layer off its statistics.
* **Linear probes.**  A logistic regression on the penultimate features
  (what the classifier head reads) against one on early features (the first
  pooling output summarised over space by each channel's mean and standard
  deviation: colours and edge energies), both scored by cross-validation.
  When the early probe clearly beats the penultimate one, the top of the net
  has specialised in something the new classes do not need.

Combined (thresholds in :data:`BN_MEAN_SHIFT_MAX`, :data:`BN_VAR_SHIFT_MAX`
and :data:`PROBE_MARGIN`): similarity is ``low`` when the BatchNorm statistics
are off (either average beyond its threshold) or the early probe wins by more
than the margin and more than twice the standard error of the difference;
``high`` otherwise.  A net without BatchNorm layers is judged
by the probes alone.  The size and the similarity then pick the strategy with
:func:`caffe_ft.recipe.strategies.choose_strategy`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from google.protobuf.message import Message

from ..errors import CaffeFtError
from ..data.sources import DataSource, input_shape
from ..data.transform import Transform, default_transform, mean_array, net_root_folder, override
from ..formats.files import load_net
from ..heads.trunk import cut_net, feature_source, net_at_test
from ..training.progress import count_progress
from ..formats.schema import Schema, load_schema

if TYPE_CHECKING:
    import numpy as np

#: Average BatchNorm input mean shift (in stored standard deviations) above
#: which data is "different".  Measured on the nsfw ResNet-50 (53 BatchNorm
#: layers, 60 images): crops of a real photograph 0.17, synthetic photo-like
#: pictures 0.27, upscaled digits 0.42, noise textures 0.64.
BN_MEAN_SHIFT_MAX = 0.35
#: Average |log variance ratio| of BatchNorm inputs above which data is
#: "different" (variances are a weaker sign: on the same sets 0.22, 0.75, 0.59
#: and 0.88, so only a gross mismatch counts).
BN_VAR_SHIFT_MAX = 1.5
#: The early-layer probe must beat the penultimate one by more than this
#: accuracy, and by more than twice the standard error of the difference, to
#: say "different".
PROBE_MARGIN = 0.10
#: C values the probes cross-validate.
PROBE_CS = (0.01, 0.1, 1.0)
#: Images sampled for the measurements.
SAMPLE = 300


@dataclass
class _Moments:
    """Running per-channel sums of one BatchNorm layer's input."""

    total: "np.ndarray"
    squares: "np.ndarray"
    count: int = 0

    def add(self, values: "np.ndarray") -> None:
        import numpy as np

        per_channel = np.moveaxis(values, 1, 0).reshape(values.shape[1], -1).astype(np.float64)
        self.total += per_channel.sum(axis=1)
        self.squares += np.square(per_channel).sum(axis=1)
        self.count += per_channel.shape[1]

    def mean_var(self) -> Tuple["np.ndarray", "np.ndarray"]:
        import numpy as np

        mean = self.total / self.count
        return mean, np.maximum(self.squares / self.count - np.square(mean), 0.0)


def bn_statistics(params: Sequence["np.ndarray"]) -> Tuple["np.ndarray", "np.ndarray"]:
    """The mean and variance a Caffe BatchNorm layer uses at TEST time, from
    its three blobs (sums and the moving-average factor that divides them)."""
    import numpy as np

    factor = float(np.asarray(params[2]).ravel()[0])
    scale = 0.0 if factor == 0 else 1.0 / factor
    return np.asarray(params[0], np.float64).ravel() * scale, np.asarray(params[1], np.float64).ravel() * scale


def bn_shift(data_mean: "np.ndarray", data_var: "np.ndarray", bn_mean: "np.ndarray", bn_var: "np.ndarray",
             eps: float) -> Tuple[float, float]:
    """(mean shift in stored standard deviations, |log variance ratio|), averaged over channels."""
    import numpy as np

    mean_shift = np.abs(data_mean - bn_mean) / np.sqrt(bn_var + eps)
    var_shift = np.abs(np.log((data_var + eps) / (bn_var + eps)))
    return float(mean_shift.mean()), float(var_shift.mean())


def early_layer(net: Message, before: int) -> Optional[int]:
    """The first Pooling layer before layer ``before`` (its output is the early feature)."""
    for index, layer in enumerate(net.layer[:before]):
        if layer.type == "Pooling":
            return index
    return None


def similarity_label(numbers: Dict[str, Any]) -> Tuple[str, List[str]]:
    """``high`` or ``low`` from the measurements, with the reasons."""
    reasons = []
    low = False
    if numbers.get("bn_layers"):
        mean_off = numbers["bn_mean_shift"] > BN_MEAN_SHIFT_MAX
        var_off = numbers["bn_var_shift"] > BN_VAR_SHIFT_MAX
        low |= mean_off or var_off
        reasons.append(
            f"BatchNorm inputs: mean shift {numbers['bn_mean_shift']:.2f} sd "
            f"({'above' if mean_off else 'within'} {BN_MEAN_SHIFT_MAX}), |log variance ratio| "
            f"{numbers['bn_var_shift']:.2f} ({'above' if var_off else 'within'} {BN_VAR_SHIFT_MAX}) "
            f"over {numbers['bn_layers']} layers")
    if "probe_penultimate" in numbers and "probe_early" in numbers:
        gap = numbers["probe_early"] - numbers["probe_penultimate"]
        needed = max(PROBE_MARGIN, probe_noise(numbers["probe_penultimate"], numbers["probe_examples"]))
        early_wins = gap > needed
        low |= early_wins
        reasons.append(
            f"linear probes: penultimate '{numbers['penultimate']}' {numbers['probe_penultimate']:.3f}, "
            f"early '{numbers['early']}' {numbers['probe_early']:.3f} on {numbers['probe_examples']} examples "
            f"(early {'better' if early_wins else 'not better'} by more than {needed:.2f})")
    return ("low" if low else "high"), reasons


def probe_accuracy(X: "np.ndarray", y: "np.ndarray", val: Optional[Tuple["np.ndarray", "np.ndarray"]],
                   seed: int = 0) -> float:
    """Accuracy of a standardized logistic regression on ``X``: on ``val`` when
    given (C picked by cross-validation on ``X``), else its best mean
    stratified cross-validation accuracy (every example is tested once, which
    is steadier than a small held-out split)."""
    import numpy as np

    from ..heads.linear import choose_c, make_model

    c, scores, _ = choose_c(X, y, "logreg", PROBE_CS, 5, seed)
    if val is None:
        return max(scores.values())
    model = make_model("logreg", c, len(X), X.shape[1], seed)
    model.fit(X, y)
    return float(np.mean(model.predict(val[0]) == val[1]))


def probe_noise(accuracy: float, count: int) -> float:
    """Two standard errors of the difference of two accuracies near ``accuracy`` on ``count`` examples."""
    return 2.0 * math.sqrt(2.0 * accuracy * (1.0 - accuracy) / max(count, 1))


def _sample(source: DataSource, limit: int, seed: int) -> DataSource:
    """At most ``limit`` entries: drawn at random from an image list (which is
    often sorted by class), the first records of an LMDB."""
    if source.is_lmdb:
        return replace(source, limit=limit)
    if len(source.entries) <= limit:
        return source
    return replace(source, entries=random.Random(seed).sample(source.entries, limit))


@dataclass
class _Pass:
    """What one pass over the sample collected."""

    penultimate: "np.ndarray"
    early: Optional["np.ndarray"]
    labels: "np.ndarray"
    moments: Dict[str, _Moments]


def _collect(net: Any, trunk: Any, source: DataSource, schema: Schema, transform: Transform,
             mean: Optional["np.ndarray"], early_blob: Optional[str], batch_size: int, what: str) -> _Pass:
    """Run the trunk layer segment by segment, reading each BatchNorm's input before it runs."""
    import numpy as np

    names = list(net._layer_names)
    bn = [(i, name) for i, name in enumerate(names) if net.layers[i].type == "BatchNorm"]
    bottoms = {name: net.bottom_names[name][0] for _, name in bn}
    moments = {name: _Moments(np.zeros(net.blobs[bottoms[name]].channels), np.zeros(net.blobs[bottoms[name]].channels))
               for _, name in bn}
    inputs = net.blobs[trunk.input_blob]
    pen, early, labels = [], [], []
    advance = count_progress(len(source), what)
    for data, batch_labels, batch_names in source.batches(schema, transform, mean, batch_size):
        if inputs.data.shape != data.shape:
            inputs.reshape(*data.shape)
            net.reshape()
        inputs.data[...] = data
        start = 1  # layer 0 is the Input
        for index, name in bn:
            if index > start:
                net.forward(start=names[start], end=names[index - 1])
            moments[name].add(net.blobs[bottoms[name]].data)
            start = index
        net.forward(start=names[start], end=names[-1])
        pen.append(net.blobs[trunk.feature_blob].data.reshape(len(data), -1).copy())
        if early_blob:
            blob = net.blobs[early_blob].data
            pooled = blob.reshape(blob.shape[0], blob.shape[1], -1)
            early.append(np.concatenate([pooled.mean(axis=2), pooled.std(axis=2)], axis=1))
        labels.append(batch_labels)
        advance(len(batch_names))
    return _Pass(np.concatenate(pen), np.concatenate(early) if early else None, np.concatenate(labels), moments)


def measure_similarity(
    net_path: str, weights: str, train_data: str, val_data: Optional[str] = None, *,
    schema: Optional[Schema] = None, root_folder: Optional[str] = None,
    transform: Optional[Dict[str, Any]] = None, sample: int = SAMPLE, batch_size: int = 16, seed: int = 0,
) -> Tuple[str, Dict[str, Any]]:
    """How similar ``train_data`` is to the net's pretraining data: ``("high" |
    "low", numbers)``.  ``numbers`` holds the BatchNorm shifts (``bn_layers``,
    ``bn_mean_shift``, ``bn_var_shift``), the probe accuracies
    (``probe_penultimate``, ``probe_early``, with the blob names
    ``penultimate``/``early``), the images used and ``reasons``: one line per
    signal.  ``transform`` overrides the net's data transform as in
    :class:`caffe_ft.heads.cache.Request`.
    """
    import numpy as np

    schema = schema or load_schema()
    net = net_at_test(load_net(net_path, schema))
    chosen = override(default_transform(net), **(transform or {}))
    mean = mean_array(chosen, schema)
    root = root_folder if root_folder is not None else net_root_folder(net)
    source = _sample(DataSource.open(train_data, root), sample, seed)
    trunk = cut_net(net, schema, input_shape(source, schema, chosen, mean), None, batch_size)
    early_index = early_layer(net, feature_source(net))
    early_blob = net.layer[early_index].top[0] if early_index is not None else None
    if early_blob not in {top for layer in trunk.net.layer for top in layer.top}:
        early_blob = None  # on a branch the features do not go through
    from ..training.pycaffe import load_caffe_net

    caffe_net = load_caffe_net(trunk.text(), weights)
    seen = _collect(caffe_net, trunk, source, schema, chosen, mean, early_blob, batch_size, "measuring")
    numbers: Dict[str, Any] = {"images": int(len(seen.labels)), "penultimate": trunk.feature_blob}
    shifts = []
    for name, moments in seen.moments.items():
        layer = trunk.net.layer[[each.name for each in trunk.net.layer].index(name)]
        stored = bn_statistics([blob.data for blob in caffe_net.params[name]])
        shifts.append(bn_shift(*moments.mean_var(), *stored, layer.batch_norm_param.eps))
    numbers["bn_layers"] = len(shifts)
    if shifts:
        numbers["bn_mean_shift"] = float(np.mean([s[0] for s in shifts]))
        numbers["bn_var_shift"] = float(np.mean([s[1] for s in shifts]))
    val = None
    if val_data:
        val_source = _sample(DataSource.open(val_data, root), sample, seed)
        val = _collect(caffe_net, trunk, val_source, schema, chosen, mean, early_blob, batch_size, "measuring (val)")
    if len(np.unique(seen.labels)) >= 2:
        try:
            numbers["probe_penultimate"] = probe_accuracy(
                seen.penultimate, seen.labels, (val.penultimate, val.labels) if val else None, seed)
            numbers["probe_examples"] = int(len(val.labels) if val else len(seen.labels))
            if seen.early is not None:
                numbers["early"] = early_blob
                numbers["probe_early"] = probe_accuracy(
                    seen.early, seen.labels, (val.early, val.labels) if val is not None and val.early is not None
                    else None, seed)
        except CaffeFtError as exc:
            numbers["probe_skipped"] = exc.message
    label, reasons = similarity_label(numbers)
    numbers["reasons"] = reasons
    return label, numbers


@dataclass(frozen=True)
class Advice:
    """The recommendation and the numbers behind it."""

    dataset_size: int
    similarity: str
    numbers: Dict[str, Any]
    strategy: str
    freeze_fraction: Optional[float]
    reason: str

    def report(self) -> str:
        lines = [f"training examples: {self.dataset_size}", f"similarity: {self.similarity}"]
        lines.extend(f"  {reason}" for reason in self.numbers.get("reasons", []))
        if "probe_skipped" in self.numbers:
            lines.append(f"  linear probes skipped: {self.numbers['probe_skipped']}")
        lines.append(f"measured on {self.numbers['images']} images")
        lines.append(f"advice: {self.reason}")
        lines.append(f"  caffe-ft rewrite NET --strategy auto --dataset-size {self.dataset_size} "
                     f"--similarity {self.similarity} ...")
        return "\n".join(lines) + "\n"


def advise(net_path: str, weights: str, train_data: str, val_data: Optional[str] = None, *,
           schema: Optional[Schema] = None, root_folder: Optional[str] = None,
           transform: Optional[Dict[str, Any]] = None, sample: int = SAMPLE, batch_size: int = 16) -> Advice:
    """Count the training set, measure the similarity, pick the strategy."""
    from .strategies import StrategyOptions, choose_strategy

    source = DataSource.open(train_data, root_folder or "")
    size = len(source)
    classes = 1 + max((label for _, label in source.entries), default=0)
    similarity, numbers = measure_similarity(
        net_path, weights, train_data, val_data, schema=schema, root_folder=root_folder,
        transform=transform, sample=sample, batch_size=batch_size)
    strategy, options, reason = choose_strategy(size, similarity, StrategyOptions(num_classes=max(classes, 1)))
    return Advice(size, similarity, numbers, strategy, options.freeze_fraction, reason)
