"""How much of a pretrained net to retrain, measured on the user's data.

Published transferability scores rank models, not strategies, and none wins
everywhere (Agostinelli et al., ECCV 2022), so the advisor measures what each
strategy would build on, cheaply, on a sample of the training images:

* **One pass.**  The frozen trunk (:func:`caffe_ft.heads.cache.prepare`, cut at
  the blob the classifier head reads) runs once over at most :data:`SAMPLE`
  images; the features at every candidate cut are read from that same pass
  (several output blobs of one net).
* **Candidate cuts** (:func:`choose_cuts`), from the net's graph: the
  penultimate blob (what the head reads), and among the stage outputs before
  it (Pooling, Eltwise and Concat tops: where resolutions change and residual
  or inception blocks end) the first one (``early``) and the one closest to
  half the penultimate's depth (``middle``).  A spatial map is summarised per
  channel by its mean and standard deviation over space (the penultimate too,
  when flattening it would give more than :data:`MAX_FLAT` values).
* **At each cut**: a linear probe (standardized multinomial logistic
  regression, :func:`caffe_ft.heads.linear.make_model`, scored on its
  out-of-fold predictions in stratified :data:`FOLDS`-fold cross-validation,
  the best over :data:`PROBE_CS`), the leave-one-out score of a cosine
  k-nearest-neighbour vote (:func:`knn_accuracy`) and LogME (:func:`logme`,
  You et al., ICML 2021).  Probe and kNN scores are balanced accuracies (mean
  recall over classes): on an unbalanced training list plain accuracy
  flatters whatever favours the largest class.
  Also counted: the training set's size and its images per class.

The rule (:func:`recommend`), in order; the margin is the larger of
:data:`PROBE_MARGIN` and two standard errors of a difference of two
accuracies on the sample (:func:`probe_noise`):

1. **an earlier cut**: an earlier cut's probe beats the penultimate one by more
   than the margin, and its LogME agrees -> the top of the net specialised in
   something these classes do not need: ``top`` frozen up to that cut (the
   best such cut), or ``full`` when the data set is large
   (> :data:`caffe_ft.recipe.strategies.LARGE_DATASET` images);
2. **features suffice**: the penultimate probe reaches :data:`PROBE_HIGH` ->
   ``features``: the head the probe measured, fitted on the cached features
   (``last-fc`` trains the same head with Caffe's solver);
3. **features fall short everywhere** -> ``full``, with ``--layer-decay``
   :data:`SMALL_DATA_DECAY` when the data set is small
   (< :data:`caffe_ft.recipe.strategies.SMALL_DATASET` images): the early layers,
   which little data cannot retrain well, move least.

``--class-weights auto`` is added to a strategy Caffe's solver trains when the
largest class has more than :data:`IMBALANCE` times the images of the smallest.

The BatchNorm-statistics and early-versus-penultimate signals of the previous
advisor are gone: the probes at several depths measure directly what they
hinted at.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from google.protobuf.message import Message

from ..data.sources import DataSource
from ..formats.schema import Schema, load_schema
from ..heads.cache import Request, prepare
from .strategies import LARGE_DATASET, SMALL_DATASET

if TYPE_CHECKING:
    import numpy as np

#: Images measured at most (drawn at random from an image list).
SAMPLE = 2000
#: C values the probes cross-validate (on standardized features).
PROBE_CS = (0.01, 0.1, 1.0)
#: Cross-validation folds of the probes (fewer when a class has fewer images).
FOLDS = 5
#: Neighbours voting in the kNN accuracy (fewer when a class has fewer images).
KNN_K = 10
#: A penultimate probe at least this accurate says the features suffice.
PROBE_HIGH = 0.9
#: The least accuracy gap that counts as "clearly better".
PROBE_MARGIN = 0.05
#: The --layer-decay advised with ``full`` on a small data set.
SMALL_DATA_DECAY = 0.5
#: Largest / smallest class count above which class weights are advised.
IMBALANCE = 3.0
#: Layer types whose outputs are candidate cuts.
STAGE_TYPES = ("Pooling", "Eltwise", "Concat")
#: LogME's noise precision stops growing once beta times the smallest squared
#: singular value is this many times alpha (the evidence is at its limit).
BETA_LIMIT = 1e10
#: A penultimate blob with more values than this is summarised per channel.
MAX_FLAT = 8192


# --------------------------------------------------------------------------
# Measurements (pure numpy / scikit-learn)


def logme(features: "np.ndarray", labels: "np.ndarray", tol: float = 1e-6, max_iter: int = 100) -> float:
    """LogME (You et al., "LogME: Practical Assessment of Pre-trained Models
    for Transfer Learning", ICML 2021): the log evidence per example of a
    Bayesian linear model ``y = F w + noise`` (prior ``w ~ N(0, I/alpha)``, noise
    ``N(0, 1/beta)``), maximised over alpha and beta, averaged over the one-hot
    targets of the classes.

    With ``F = U diag(s) V^T`` (thin SVD, ``z = U^T y``) the paper's fixed point
    is ``gamma = sum(beta s^2 / (alpha + beta s^2))``, ``alpha = gamma / |m|^2``,
    ``beta = (n - gamma) / |F m - y|^2`` with ``m = beta (alpha I + beta F^T F)^-1 F^T y``,
    all through ``s`` and ``z``; the evidence is then
    ``n/2 log beta + D/2 log alpha - n/2 log 2 pi - beta/2 |F m - y|^2 - alpha/2 |m|^2
    - 1/2 log det(alpha I + beta F^T F)``.
    """
    import numpy as np

    F = np.asarray(features, np.float64).reshape(len(features), -1)
    n, dims = F.shape
    u, s, _ = np.linalg.svd(F, full_matrices=False)
    keep = s > s.max(initial=0.0) * 1e-10
    u, sigma = u[:, keep], np.square(s[keep])
    evidences = []
    for label in np.unique(labels):
        y = (labels == label).astype(np.float64)
        z = u.T @ y
        z2 = np.square(z)
        outside = max(float(y @ y - z2.sum()), 0.0)  # |y|^2 off the span of F
        if not len(sigma):  # F = 0: y is all noise, beta = n / |y|^2 and alpha does not matter
            evidences.append((math.log(n / outside) - math.log(2 * math.pi) - 1) / 2)
            continue
        alpha, beta = 1.0, 1.0
        for _ in range(max_iter):
            t = alpha + beta * sigma
            gamma = float((beta * sigma / t).sum())
            rest = (n - len(sigma)) + float((alpha / t).sum())  # n - gamma, without the cancellation
            m2 = float((beta ** 2 * sigma * z2 / t ** 2).sum())
            res2 = float((alpha ** 2 * z2 / t ** 2).sum()) + outside
            new_alpha, new_beta = gamma / max(m2, 1e-300), rest / max(res2, 1e-300)
            # Labels inside the span of F (as many features as examples) fit
            # without noise: beta grows without end while the evidence nears a
            # finite limit, reached once the prior no longer bends the fit.
            new_beta = min(new_beta, BETA_LIMIT * new_alpha / float(sigma.min()))
            done = abs(new_alpha - alpha) <= tol * alpha and abs(new_beta - beta) <= tol * beta
            alpha, beta = new_alpha, new_beta
            if done:
                break
        t = alpha + beta * sigma
        m2 = float((beta ** 2 * sigma * z2 / t ** 2).sum())
        res2 = float((alpha ** 2 * z2 / t ** 2).sum()) + outside
        logdet = float(np.log(t).sum()) + (dims - len(sigma)) * math.log(alpha)
        evidence = (n * math.log(beta) + dims * math.log(alpha) - n * math.log(2 * math.pi)
                    - beta * res2 - alpha * m2 - logdet) / 2
        evidences.append(evidence / n)
    return float(np.mean(evidences))


def knn_k(labels: "np.ndarray") -> int:
    """:data:`KNN_K`, or fewer: leave-one-out leaves the smallest class one image short."""
    import numpy as np

    return int(max(1, min(KNN_K, np.bincount(labels).min() - 1)))


def knn_accuracy(features: "np.ndarray", labels: "np.ndarray", k: int) -> float:
    """Leave-one-out balanced accuracy of a majority vote of the ``k`` nearest
    examples by cosine similarity (ties go to the lowest label, as in scikit-learn)."""
    import numpy as np

    X = np.asarray(features, np.float64).reshape(len(features), -1)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    X = X / np.where(norms > 0, norms, 1.0)
    similarity = X @ X.T
    np.fill_diagonal(similarity, -np.inf)
    nearest = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    classes = int(labels.max()) + 1
    votes = np.zeros((len(X), classes))
    np.add.at(votes, (np.repeat(np.arange(len(X)), k), labels[nearest].ravel()), 1.0)
    return balanced_accuracy(labels, votes.argmax(axis=1))


def balanced_accuracy(labels: "np.ndarray", predicted: "np.ndarray") -> float:
    """The mean over the classes present of each one's recall: the accuracy on
    a balanced set, which an unbalanced training list does not flatter."""
    import numpy as np

    return float(np.mean([np.mean(predicted[labels == label] == label) for label in np.unique(labels)]))


def probe_accuracy(features: "np.ndarray", labels: "np.ndarray", seed: int = 0) -> Tuple[float, float, int]:
    """(best balanced accuracy over :data:`PROBE_CS` of the out-of-fold
    predictions of stratified k-fold cross-validation, its C, k).  Every
    example is predicted once, by the probe that did not see it."""
    import warnings

    import numpy as np
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import StratifiedKFold

    from ..heads.linear import make_model

    X = np.asarray(features, np.float64).reshape(len(features), -1)
    folds = int(min(FOLDS, np.bincount(labels).min()))
    splits = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(X, labels))
    best: Optional[Tuple[float, float]] = None
    for c in sorted(PROBE_CS):
        predicted = np.empty_like(labels)
        for train, test in splits:
            model = make_model("logreg", c, len(train), X.shape[1], seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(X[train], labels[train])
            predicted[test] = model.predict(X[test])
        score = balanced_accuracy(labels, predicted)
        if best is None or score > best[0] + 1e-12:  # ties: the smaller C, the stronger regularisation
            best = (score, c)
    assert best is not None
    return best[0], best[1], folds


def probe_noise(accuracy: float, count: int) -> float:
    """Two standard errors of the difference of two accuracies near ``accuracy`` on ``count`` examples."""
    return 2.0 * math.sqrt(2.0 * accuracy * (1.0 - accuracy) / max(count, 1))


def summarise(blob: "np.ndarray", flat: bool) -> "np.ndarray":
    """One row per example: the blob flattened (``flat``, or no spatial extent),
    else each channel's mean and standard deviation over space."""
    import numpy as np

    values = blob.reshape(len(blob), -1)
    if blob.ndim < 4 or blob.shape[2] * blob.shape[3] == 1 or (flat and values.shape[1] <= MAX_FLAT):
        return values.astype(np.float32)
    maps = blob.reshape(blob.shape[0], blob.shape[1], -1)
    return np.concatenate([maps.mean(axis=2), maps.std(axis=2)], axis=1).astype(np.float32)


# --------------------------------------------------------------------------
# Where to cut


@dataclass(frozen=True)
class Cut:
    """A candidate cut: the blob read there and the layer writing it."""

    role: str  # penultimate | middle | early
    blob: str
    layer: str
    depth: float  # position of the layer in the trunk, the penultimate's being 1


def choose_cuts(trunk_net: Message, feature_blob: str) -> List[Cut]:
    """The penultimate cut (``feature_blob``, the last layer of the trunk) and
    up to two earlier ones: the first stage output (``early``) and the one
    closest to half the penultimate's depth (``middle``)."""
    layers = list(trunk_net.layer)
    writer = max(i for i, layer in enumerate(layers) if feature_blob in layer.top)
    producer = max((i for i in range(writer + 1) if feature_blob in layers[i].top
                    and feature_blob not in layers[i].bottom), default=writer)
    cuts = [Cut("penultimate", feature_blob, layers[producer].name, 1.0)]
    stages = [i for i, layer in enumerate(layers[:writer]) if layer.type in STAGE_TYPES and layer.top
              and layer.top[0] != feature_blob and layer.top[0] not in layers[i].bottom]
    if not stages:
        return cuts
    early = stages[0]
    rest = stages[1:]
    if rest:
        middle = min(rest, key=lambda i: (abs(i / writer - 0.5), i))
        cuts.append(Cut("middle", layers[middle].top[0], layers[middle].name, middle / max(writer, 1)))
    cuts.append(Cut("early", layers[early].top[0], layers[early].name, early / max(writer, 1)))
    return cuts


# --------------------------------------------------------------------------
# The measurements and the rule


@dataclass
class CutNumbers:
    """What was measured at one cut."""

    cut: Cut
    values: int  # features per example
    probe: Optional[float] = None
    probe_c: Optional[float] = None
    probe_folds: int = 0
    knn: Optional[float] = None
    knn_k: int = 0
    logme: Optional[float] = None

    def as_dict(self) -> Dict[str, Any]:
        return {"role": self.cut.role, "blob": self.cut.blob, "layer": self.cut.layer,
                "depth": round(self.cut.depth, 3), "values": self.values, "probe": self.probe,
                "probe_C": self.probe_c, "probe_folds": self.probe_folds, "knn": self.knn, "knn_k": self.knn_k,
                "logme": self.logme}


@dataclass
class Measurements:
    """Everything the rule reads."""

    dataset_size: int
    class_counts: Dict[int, int]
    images: int  # measured (the sample)
    sample_cap: int
    cuts: List[CutNumbers]
    notes: List[str] = field(default_factory=list)

    @property
    def imbalance(self) -> float:
        counts = [count for count in self.class_counts.values() if count > 0]
        return max(counts) / min(counts) if counts else 1.0


@dataclass(frozen=True)
class Advice:
    """The recommendation, the rule that gave it and the numbers behind it."""

    measurements: Measurements
    strategy: str
    freeze_until: Optional[str]
    layer_decay: Optional[float]
    class_weights: bool
    rule: str
    reason: str

    @property
    def dataset_size(self) -> int:
        return self.measurements.dataset_size

    def flags(self) -> List[str]:
        """The ``caffe-ft finetune``/``rewrite`` flags that apply the advice."""
        flags = ["--strategy", self.strategy]
        if self.freeze_until:
            flags += ["--freeze-until", self.freeze_until]
        if self.layer_decay is not None:
            flags += ["--layer-decay", f"{self.layer_decay:g}"]
        if self.class_weights:
            flags += ["--class-weights", "auto"]
        return flags

    def as_dict(self) -> Dict[str, Any]:
        measured = self.measurements
        return {"dataset_size": measured.dataset_size,
                "class_counts": {str(label): count for label, count in sorted(measured.class_counts.items())},
                "images_measured": measured.images, "sample_cap": measured.sample_cap,
                "cuts": [cut.as_dict() for cut in measured.cuts], "notes": measured.notes,
                "strategy": self.strategy, "freeze_until": self.freeze_until, "layer_decay": self.layer_decay,
                "class_weights": self.class_weights, "rule": self.rule, "reason": self.reason,
                "flags": self.flags()}

    def report(self) -> str:
        measured = self.measurements
        counts = " ".join(str(count) for _, count in sorted(measured.class_counts.items()))
        width = max([4] + [len(numbers.cut.blob) for numbers in measured.cuts])
        lines = [f"training examples: {measured.dataset_size} ({len(measured.class_counts)} classes: {counts})",
                 f"measured on {measured.images} images (at most {measured.sample_cap}), one forward pass",
                 f"{'cut':<12} {'blob':<{width}} {'depth':>5} {'values':>7} {'probe':>6} {'kNN':>6} {'LogME':>8}"]

        def show(value: Optional[float], digits: int) -> str:
            return "-" if value is None else f"{value:.{digits}f}"

        for numbers in measured.cuts:
            cut = numbers.cut
            lines.append(f"{cut.role:<12} {cut.blob:<{width}} {cut.depth:>5.2f} {numbers.values:>7} "
                         f"{show(numbers.probe, 3):>6} {show(numbers.knn, 3):>6} {show(numbers.logme, 3):>8}")
        first = measured.cuts[0]
        if first.probe_folds:
            lines.append(f"probe: logistic regression, {first.probe_folds}-fold cross-validation; "
                         f"kNN: cosine, k = {first.knn_k}, leave-one-out; LogME: You et al. 2021")
        lines.extend(f"note: {note}" for note in measured.notes)
        lines.append(f"rule: {self.rule}")
        lines.append(f"advice: {self.reason}")
        lines.append(f"  caffe-ft finetune NET --weights MODEL {' '.join(self.flags())} ...")
        return "\n".join(lines) + "\n"


def recommend(measured: Measurements) -> Advice:
    """The strategy from the measurements, by the rule in the module's docstring."""
    size = measured.dataset_size
    penultimate = measured.cuts[0]
    scored = [numbers for numbers in measured.cuts if numbers.probe is not None]
    weights = measured.imbalance > IMBALANCE
    weighted = (f"; classes unbalanced ({measured.imbalance:.1f} x between the largest and the smallest): "
                f"class weights" if weights else "")
    if penultimate.probe is None:
        strategy = "full" if size > LARGE_DATASET else "last-fc"
        return Advice(measured, strategy, None, None, weights, "no probe (see the notes)",
                      f"no measurement to go on; {size} images: {strategy}{weighted}")
    margin = max(PROBE_MARGIN, probe_noise(penultimate.probe, measured.images))
    better = [numbers for numbers in scored[1:]
              if numbers.probe - penultimate.probe > margin  # type: ignore[operator]
              and (numbers.logme is None or penultimate.logme is None or numbers.logme > penultimate.logme)]
    if better:
        best = max(better, key=lambda numbers: numbers.probe or 0.0)
        rule = (f"1 (an earlier cut): the {best.cut.role} cut '{best.cut.blob}' probes {best.probe:.3f}, the "
                f"penultimate {penultimate.probe:.3f}: better by more than {margin:.3f}, and its LogME agrees")
        if size > LARGE_DATASET:
            return Advice(measured, "full", None, None, weights, rule,
                          f"large data set ({size} > {LARGE_DATASET} images): fine-tune the whole net "
                          f"(strategy full){weighted}")
        return Advice(measured, "top", best.cut.layer, None, weights, rule,
                      f"keep the layers up to '{best.cut.layer}' and retrain the rest "
                      f"(strategy top, frozen up to that cut){weighted}")
    if penultimate.probe >= PROBE_HIGH:
        rule = (f"2 (features suffice): the penultimate probe {penultimate.probe:.3f} reaches {PROBE_HIGH} "
                f"and no earlier cut beats it by more than {margin:.3f}")
        unweighted = (f"; classes unbalanced ({measured.imbalance:.1f} x), but a head fitted on features takes "
                      f"no class weights" if weights else "")
        return Advice(measured, "features", None, None, False, rule,
                      f"fit only the classifier, on the cached features: the head the probe measured "
                      f"(strategy features; last-fc trains the same head with Caffe's solver){unweighted}")
    rule = (f"3 (features fall short): the penultimate probe {penultimate.probe:.3f} is below {PROBE_HIGH} "
            f"and no earlier cut beats it by more than {margin:.3f}")
    if size < SMALL_DATASET:
        return Advice(measured, "full", None, SMALL_DATA_DECAY, weights, rule,
                      f"fine-tune the whole net, the early layers least (small data set, {size} < {SMALL_DATASET} "
                      f"images: strategy full, layer decay {SMALL_DATA_DECAY:g}){weighted}")
    return Advice(measured, "full", None, None, weights, rule,
                  f"fine-tune the whole net ({size} images: strategy full){weighted}")


def _sample(source: DataSource, limit: int, seed: int) -> DataSource:
    """At most ``limit`` entries: drawn at random from an image list (which is
    often sorted by class), the first records of an LMDB."""
    if source.is_lmdb:
        return replace(source, limit=limit)
    if len(source.entries) <= limit:
        return source
    return replace(source, entries=random.Random(seed).sample(source.entries, limit))


def collect(net_path: str, weights: str, train_data: str, *, schema: Schema, root_folder: Optional[str] = None,
            transform: Optional[Dict[str, Any]] = None, sample: int = SAMPLE, batch_size: int = 16,
            seed: int = 0, engine: str = "pycaffe"
            ) -> Tuple[List[Cut], Dict[str, "np.ndarray"], "np.ndarray", Dict[int, int]]:
    """One forward pass of the trunk (through ``engine``) over a sample of
    ``train_data``: the cuts, each cut's features (one row per image), the
    sample's labels and the whole data set's examples per label."""
    import numpy as np

    from ..training.forward import forward_batches
    from ..training.progress import count_progress

    request = Request(net_path, weights, train_data, root_folder=root_folder, transform=dict(transform or {}),
                      batch_size=batch_size)
    prepared = prepare(request, schema)
    source = _sample(prepared.source, sample, seed)
    cuts = choose_cuts(prepared.trunk.net, prepared.trunk.feature_blob)
    advance = count_progress(len(source), "measuring")
    parts: Dict[str, List["np.ndarray"]] = {cut.blob: [] for cut in cuts}
    labels = []
    batches = source.batches(schema, prepared.transform, prepared.mean, batch_size)
    passes = forward_batches(engine, prepared.trunk.net, weights, prepared.trunk.input_blob, batches, list(parts),
                             advance, schema)
    for blobs, batch_labels, _ in passes:
        for cut in cuts:
            parts[cut.blob].append(summarise(blobs[cut.blob], cut.role == "penultimate"))
        labels.append(batch_labels)
    counts = Counter(prepared.source.labels(schema))
    return cuts, {blob: np.concatenate(rows) for blob, rows in parts.items()}, np.concatenate(labels), dict(counts)


def measure(cuts: Sequence[Cut], features: Dict[str, "np.ndarray"], labels: "np.ndarray", dataset_size: int,
            class_counts: Optional[Dict[int, int]] = None, sample_cap: int = SAMPLE, seed: int = 0) -> Measurements:
    """Probe, kNN and LogME at every cut (see the module's docstring)."""
    import numpy as np

    labels = np.asarray(labels, np.int64)
    counts = class_counts or {int(label): int(count) for label, count in enumerate(np.bincount(labels)) if count}
    measured = Measurements(dataset_size, counts, int(len(labels)), sample_cap,
                            [CutNumbers(cut, int(features[cut.blob].shape[1])) for cut in cuts])
    present = np.unique(labels)
    if len(present) < 2:
        measured.notes.append("the sample holds a single class: nothing to probe")
        return measured
    # labels as 0..K-1 over the classes present (kNN votes and folds need them dense)
    dense = np.searchsorted(present, labels)
    smallest = int(np.bincount(dense).min())
    for numbers in measured.cuts:
        X = features[numbers.cut.blob]
        numbers.logme = logme(X, dense)
        if smallest >= 2:
            numbers.knn_k = knn_k(dense)
            numbers.knn = knn_accuracy(X, dense, numbers.knn_k)
            numbers.probe, numbers.probe_c, numbers.probe_folds = probe_accuracy(X, dense, seed)
    if smallest < 2:
        measured.notes.append("a class has a single image in the sample: no probe or kNN")
    return measured


def advise(net_path: str, weights: str, train_data: str, *, schema: Optional[Schema] = None,
           root_folder: Optional[str] = None, transform: Optional[Dict[str, Any]] = None, sample: int = SAMPLE,
           batch_size: int = 16, seed: int = 0, engine: str = "pycaffe") -> Advice:
    """Measure ``train_data`` with the net's frozen trunk (run by ``engine``,
    pycaffe or torch) and recommend a strategy."""
    schema = schema or load_schema()
    cuts, features, labels, counts = collect(net_path, weights, train_data, schema=schema, root_folder=root_folder,
                                             transform=transform, sample=sample, batch_size=batch_size, seed=seed,
                                             engine=engine)
    measured = measure(cuts, features, labels, sum(counts.values()), counts, sample, seed)
    return recommend(measured)
