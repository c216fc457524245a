"""A linear classifier on cached features, written back as a plain Caffe head.

:func:`fit` standardizes the features, trains scikit-learn's multinomial
``LogisticRegression`` or ``LinearSVC``, picks ``C`` by stratified k-fold
cross-validation on the training part and reports the accuracy on held-out
data (a stratified split, or a second features file).  The head that is
written is the one whose accuracy is reported: it is not refitted on the
held-out part.

:func:`write_head` turns it into Caffe files: the original net cut at the
feature layer (the same trunk the features came from, checked by
fingerprint), a new ``InnerProduct`` layer and, for logistic regression, a
``Softmax``, plus a caffemodel with the trunk's weights and the head's.  The
scaler is folded into the head (``w' = w / sigma``, ``b' = b - w' . mu``), so the
net computes exactly ``decision_function`` of the scikit-learn pipeline on
features flattened in C order, as InnerProduct flattens from axis 1.  A
two-class scikit-learn model has a single row ``w``; the head gets the rows
``-w/2`` and ``w/2``, whose difference is ``w``: softmax of the two outputs is
the logistic sigmoid, and the argmax agrees with the SVM's sign.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from ..errors import CaffeFtError, listing
from ..formats.files import load_net, sha256_file
from .cache import FeatureSet, stale_parts
from .trunk import cut_net
from ..formats.schema import Schema

if TYPE_CHECKING:
    import numpy as np

CLASSIFIERS = ("logreg", "svm")
#: C values tried by cross-validation (on standardized features).
DEFAULT_CS: Dict[str, Tuple[float, ...]] = {
    "logreg": (0.001, 0.01, 0.1, 1.0, 10.0),
    "svm": (0.0001, 0.001, 0.01, 0.1, 1.0),
}
HEAD_NAME = "fc_linear"
PROB_NAME = "prob"


# --------------------------------------------------------------------------
# Weights arithmetic (pure numpy)


def fold_scaler(coef: "np.ndarray", intercept: "np.ndarray", mean: "np.ndarray", scale: "np.ndarray"
                ) -> Tuple["np.ndarray", "np.ndarray"]:
    """Weights and bias acting on raw features ``x`` that give what ``coef``
    and ``intercept`` give on ``(x - mean) / scale``."""
    import numpy as np

    weights = np.asarray(coef, np.float64) / np.asarray(scale, np.float64)
    return weights, np.asarray(intercept, np.float64) - weights @ np.asarray(mean, np.float64)


def expand_binary(coef: "np.ndarray", intercept: "np.ndarray") -> Tuple["np.ndarray", "np.ndarray"]:
    """Two output rows for a one-row binary model: ``-w/2`` and ``w/2`` (the
    softmax of the pair is the sigmoid of ``w . x + b``; the argmax is its sign,
    ties going to class 0 as in scikit-learn); other models unchanged."""
    import numpy as np

    if coef.shape[0] != 1:
        return coef, intercept
    return np.concatenate([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])


def head_weights(coef: "np.ndarray", intercept: "np.ndarray", mean: "np.ndarray", scale: "np.ndarray"
                 ) -> Tuple["np.ndarray", "np.ndarray"]:
    """The (N, D) weights and (N,) bias of the Caffe InnerProduct head."""
    return expand_binary(*fold_scaler(coef, intercept, mean, scale))


def parse_cs(text: str) -> Tuple[float, ...]:
    """``"0.1,1,10"`` -> (0.1, 1.0, 10.0); every value must be positive."""
    try:
        values = tuple(float(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise CaffeFtError(f"--C takes comma-separated numbers, not '{text}'") from None
    if not values or any(value <= 0 for value in values):
        raise CaffeFtError(f"--C values must be positive numbers, not '{text}'")
    return values


# --------------------------------------------------------------------------
# Training


@dataclass
class Fit:
    """A trained classifier, how it was chosen and how it scores."""

    classifier: str
    C: float
    cv_scores: Dict[float, float]  # mean cross-validation accuracy per C tried (empty: one C given)
    folds: int
    train_accuracy: float
    val_accuracy: float
    val_from: str
    n_train: int
    n_val: int
    model: Any  # the scikit-learn pipeline (StandardScaler, classifier)
    weights: "np.ndarray"  # (N, D) for the Caffe head, scaler folded in
    bias: "np.ndarray"
    notes: List[str] = field(default_factory=list)

    def report(self) -> str:
        lines = [f"classifier: {self.classifier}, C = {self.C:g}"]
        if self.cv_scores:
            scores = ", ".join(f"C={c:g}: {acc:.3f}" for c, acc in self.cv_scores.items())
            lines.append(f"{self.folds}-fold cross-validation accuracy: {scores}")
        lines.append(f"training accuracy: {self.train_accuracy:.3f} ({self.n_train} examples)")
        lines.append(f"validation accuracy: {self.val_accuracy:.3f} ({self.n_val} examples, {self.val_from})")
        return "\n".join(lines + self.notes) + "\n"


def make_model(classifier: str, C: float, n_samples: int, n_features: int, seed: int = 0) -> Any:
    """A scikit-learn pipeline: StandardScaler, then the linear classifier."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    if classifier == "logreg":
        # lbfgs is multinomial for more than two classes (and a sigmoid for two).
        estimator = LogisticRegression(C=C, max_iter=5000)
    elif classifier == "svm":
        estimator = LinearSVC(C=C, dual=n_samples < n_features, max_iter=20000, random_state=seed)
    else:
        raise CaffeFtError(f"unknown classifier '{classifier}' (use {' or '.join(CLASSIFIERS)})")
    return make_pipeline(StandardScaler(), estimator)


def check_labels(labels: "np.ndarray", num_classes: int, what: str) -> None:
    """Labels must lie in [0, N), and (for training) every class needs examples."""
    import numpy as np

    outside = labels[(labels < 0) | (labels >= num_classes)]
    if outside.size:
        raise CaffeFtError(f"{what}: label {int(outside[0])} is outside 0..{num_classes - 1} (--num-classes {num_classes})")
    counts = np.bincount(labels, minlength=num_classes)
    if what == "training features" and (counts < 2).any():
        missing = [str(c) for c in np.flatnonzero(counts < 2)]
        raise CaffeFtError(f"{what}: class(es) {listing(missing)} have fewer than 2 examples; "
                           "a head cannot learn them")


def _fit_quietly(model: Any, X: "np.ndarray", y: "np.ndarray") -> bool:
    """Fit; return False when the solver stopped before converging."""
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(X, y)
    return not any(issubclass(w.category, ConvergenceWarning) for w in caught)


def choose_c(X: "np.ndarray", y: "np.ndarray", classifier: str, cs: Sequence[float], folds: int, seed: int
             ) -> Tuple[float, Dict[float, float], int]:
    """The C with the best mean stratified k-fold accuracy (the smallest C,
    i.e. the strongest regularization, among ties), the scores, and k."""
    import numpy as np
    from sklearn.model_selection import StratifiedKFold

    if len(cs) == 1:
        return cs[0], {}, 0
    k = int(min(folds, np.bincount(y).min()))
    if k < 2:
        raise CaffeFtError("cross-validation needs 2 examples of every class in the training part; give one --C")
    splits = list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(X, y))
    scores = {}
    for c in sorted(cs):
        accuracies = []
        for train, test in splits:
            model = make_model(classifier, c, len(train), X.shape[1], seed)
            _fit_quietly(model, X[train], y[train])
            accuracies.append(float((model.predict(X[test]) == y[test]).mean()))
        scores[c] = float(np.mean(accuracies))
    best = max(scores.values())
    return min(c for c, score in scores.items() if score >= best - 1e-12), scores, k


def fit(train: FeatureSet, num_classes: int, classifier: str = "logreg", cs: Optional[Sequence[float]] = None,
        val: Optional[FeatureSet] = None, val_fraction: float = 0.2, folds: int = 5, seed: int = 0) -> Fit:
    """Train the head on ``train`` (minus a held-out split when ``val`` is None)."""
    import numpy as np
    from sklearn.model_selection import train_test_split

    X, y = train.matrix.astype(np.float64), train.labels.astype(np.int64)
    check_labels(y, num_classes, "training features")
    if val is not None:
        if val.matrix.shape[1] != X.shape[1]:
            raise CaffeFtError(f"the validation features have {val.matrix.shape[1]} values per example, "
                               f"the training ones {X.shape[1]}")
        X_val, y_val = val.matrix.astype(np.float64), val.labels.astype(np.int64)
        check_labels(y_val, num_classes, "validation features")
        val_from = "validation features file"
    else:
        try:
            X, X_val, y, y_val = train_test_split(X, y, test_size=val_fraction, stratify=y, random_state=seed)
        except ValueError as exc:
            raise CaffeFtError(f"cannot hold out {val_fraction:.0%} for validation: {exc}") from None
        val_from = f"held-out {val_fraction:.0%}, stratified"
        check_labels(y, num_classes, "training features")
    c, scores, k = choose_c(X, y, classifier, tuple(cs or DEFAULT_CS[classifier]), folds, seed)
    model = make_model(classifier, c, len(X), X.shape[1], seed)
    notes = [] if _fit_quietly(model, X, y) else [f"note: the {classifier} solver stopped before converging"]
    scaler, estimator = model[0], model[-1]
    weights, bias = head_weights(estimator.coef_, np.atleast_1d(estimator.intercept_), scaler.mean_, scaler.scale_)
    return Fit(
        classifier, c, scores, k, float((model.predict(X) == y).mean()), float((model.predict(X_val) == y_val).mean()),
        val_from, len(X), len(X_val), model, weights, bias, notes,
    )


# --------------------------------------------------------------------------
# The Caffe head


def _unique(name: str, taken: Sequence[str]) -> str:
    if name not in taken:
        return name
    number = 2
    while f"{name}_{number}" in taken:
        number += 1
    return f"{name}_{number}"


@dataclass(frozen=True)
class WrittenHead:
    """The written files and the names in them."""

    deploy: str
    weights: str
    summary: str
    layer: str
    output: str


def head_net(trunk_net: Any, feature_blob: str, num_outputs: int, softmax: bool) -> Tuple[Any, str, str]:
    """``trunk_net`` (a copy) + InnerProduct on the feature (+ Softmax): net, head name, output blob."""
    net = type(trunk_net)()
    net.CopyFrom(trunk_net)
    taken = [layer.name for layer in net.layer] + [top for layer in net.layer for top in layer.top]
    head = net.layer.add()
    head.name = _unique(HEAD_NAME, taken)
    head.type = "InnerProduct"
    head.bottom.append(feature_blob)
    head.top.append(head.name)
    head.inner_product_param.num_output = num_outputs
    output = head.name
    if softmax:
        prob = net.layer.add()
        prob.name = _unique(PROB_NAME, taken)
        prob.type = "Softmax"
        prob.bottom.append(head.name)
        prob.top.append(prob.name)
        output = prob.name
    return net, head.name, output


def _check_source(meta: Dict[str, Any], fingerprints: Dict[str, str], net_path: str, weights: str) -> None:
    stored = {key: meta["fingerprints"].get(key, "") for key in fingerprints}
    stale = stale_parts(stored, fingerprints)
    if stale:
        raise CaffeFtError(
            f"the features were not computed with this net and weights ({', '.join(stale)} differ: "
            f"{net_path}, {weights}); recompute them with `caffe-ft features`")


def write_head(schema: Schema, result: Fit, meta: Dict[str, Any], outdir: str, num_classes: int,
               net_path: Optional[str] = None, weights: Optional[str] = None, force: bool = False,
               inputs: Sequence[Optional[str]] = ()) -> WrittenHead:
    """Write ``deploy.prototxt``, ``linear.caffemodel`` and ``linear.json`` to ``outdir``,
    all or nothing; existing files only with ``force``, never over one of
    ``inputs`` (nor the net and weights read here)."""
    from ..formats.caffemodel import Blob, Model, load_model, save_model
    from ..formats.files import staged_outputs
    from ..formats.prototext import print_message

    net_path = net_path or meta["net"]
    weights = weights or meta["weights"]
    trunk = cut_net(load_net(net_path, schema), schema, meta["input_shape"], meta["layer"], batch=1)
    _check_source(meta, {"trunk": trunk.fingerprint(), "weights": sha256_file(weights)}, net_path, weights)
    if result.weights.shape[0] != num_classes:
        raise CaffeFtError(f"the classifier has {result.weights.shape[0]} outputs, not {num_classes}")
    net, head_name, output = head_net(trunk.net, trunk.feature_blob, num_classes, result.classifier == "logreg")
    source = load_model(weights, schema).layer_blobs()
    model_net = schema.new("NetParameter")
    model_net.CopyFrom(net)
    blobs = [list(source.get(layer.name, [])) for layer in net.layer]
    # float32 like every Caffe blob (a float64 array would be written as double_data, which OpenCV cannot read)
    head_blobs = [Blob.of(result.weights.astype("float32")), Blob.of(result.bias.astype("float32"))]
    blobs[[layer.name for layer in net.layer].index(head_name)] = head_blobs
    names = ("deploy.prototxt", "linear.caffemodel", "linear.json")
    head = WrittenHead(os.path.join(outdir, names[0]), os.path.join(outdir, names[1]),
                       os.path.join(outdir, names[2]), head_name, output)
    with staged_outputs(outdir, names, [net_path, weights, *inputs], force, option="--outdir") as staging:
        staging.write("deploy.prototxt", print_message(net))
        save_model(Model(model_net, blobs), staging.path("linear.caffemodel"))
        staging.write("linear.json", json.dumps(summary(result, meta, head, num_classes), indent=2) + "\n")
    return head


def summary(result: Fit, meta: Dict[str, Any], head: WrittenHead, num_classes: int) -> Dict[str, Any]:
    """What linear.json records: the choice, the scores, and the input transform
    the deploy net expects (a deploy net cannot say it)."""
    return {
        "classifier": result.classifier,
        "C": result.C,
        "cross_validation": {f"{c:g}": score for c, score in result.cv_scores.items()},
        "folds": result.folds,
        "train_accuracy": result.train_accuracy,
        "val_accuracy": result.val_accuracy,
        "validation": result.val_from,
        "n_train": result.n_train,
        "n_val": result.n_val,
        "num_classes": num_classes,
        "feature_layer": meta["layer"],
        "feature_blob": meta["blob"],
        "head_layer": head.layer,
        "output_blob": head.output,
        "input_blob": meta["input_blob"],
        "input_shape": meta["input_shape"],
        "transform": meta["transform"],
    }
