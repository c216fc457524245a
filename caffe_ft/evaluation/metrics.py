"""Classification metrics from saved predictions: what a run's model gets right and wrong.

:class:`Predictions` holds one row of class probabilities per image with its
label and source; :func:`evaluate` computes accuracy, top-k accuracy,
per-class precision/recall/F1/support and the confusion matrix with
scikit-learn, the expected calibration error and the most confident
mistakes.  Everything here is numpy and scikit-learn: no Caffe.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence

from ..errors import CaffeFtError

if TYPE_CHECKING:  # heavy imports stay out of `caffe-ft --help`
    import numpy as np

FORMAT = "caffe-ft-predictions/1"
#: Equal-width confidence bins of the expected calibration error (as Guo et al. 2017).
ECE_BINS = 15


@dataclass
class Predictions:
    """Class probabilities (N x K float), integer labels (N) and image sources (N)."""

    probs: "np.ndarray"
    labels: "np.ndarray"
    sources: List[str]
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def predicted(self) -> "np.ndarray":
        return self.probs.argmax(axis=1)

    def save(self, path: str) -> None:
        """Write a compressed ``.npz`` atomically."""
        import numpy as np

        from ..formats.files import atomic_output

        with atomic_output(path) as handle:
            np.savez_compressed(handle, probs=self.probs, labels=self.labels,
                                sources=np.asarray(self.sources, dtype=str),
                                meta=np.asarray(json.dumps({"format": FORMAT, **self.meta}, sort_keys=True)))

    @classmethod
    def load(cls, path: str) -> "Predictions":
        import numpy as np

        try:
            with np.load(path, allow_pickle=False) as archive:
                meta = json.loads(str(archive["meta"]))
                loaded = cls(archive["probs"], archive["labels"], [str(s) for s in archive["sources"]], meta)
        except FileNotFoundError:
            raise CaffeFtError("no such file", path) from None
        except (OSError, ValueError, KeyError) as exc:
            raise CaffeFtError(f"not a caffe-ft predictions file ({exc})", path) from None
        if meta.get("format") != FORMAT:
            raise CaffeFtError(f"not a caffe-ft predictions file (format {meta.get('format')!r})", path)
        return loaded


def softmax(scores: "np.ndarray") -> "np.ndarray":
    """Row-wise softmax in float64, shifted by the row maximum (as Caffe's Softmax)."""
    import numpy as np

    shifted = scores.astype(np.float64) - scores.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def top_k_hits(scores: "np.ndarray", labels: "np.ndarray", k: int) -> "np.ndarray":
    """Per image, whether its label is among the top ``k`` scores, by Caffe's
    Accuracy rule: fewer than ``k`` classes score strictly higher than the label."""
    import numpy as np

    true = scores[np.arange(len(labels)), labels]
    return (scores > true[:, None]).sum(axis=1) < k


def calibration(confidence: "np.ndarray", correct: "np.ndarray", bins: int = ECE_BINS) -> Dict[str, Any]:
    """Expected calibration error over equal-width confidence bins, with the bins themselves.

    ECE = sum over bins of (images in bin / N) * |accuracy in bin - mean confidence in bin|;
    a confidence of exactly 0 falls in the first bin."""
    import numpy as np

    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    rows = []
    ece = 0.0
    for b in range(bins):
        mask = index == b
        count = int(mask.sum())
        if not count:
            continue
        acc, conf = float(correct[mask].mean()), float(confidence[mask].mean())
        ece += count / len(confidence) * abs(acc - conf)
        rows.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": count,
                     "accuracy": acc, "confidence": conf})
    return {"ece": ece, "bins": rows}


@dataclass
class Evaluation:
    """The numbers of one evaluation (see :func:`evaluate`); ``as_json`` is what ``--json`` prints."""

    count: int
    classes: List[str]
    accuracy: float
    top_k: Dict[int, float]
    per_class: List[Dict[str, Any]]  # class, precision, recall, f1, support
    macro: Dict[str, float]
    weighted: Dict[str, float]
    confusion: List[List[int]]  # rows: true class, columns: predicted class
    ece: float
    calibration_bins: List[Dict[str, Any]]
    mistakes: List[Dict[str, Any]]  # the most confident wrong predictions, most confident first
    meta: Dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> Dict[str, Any]:
        return {
            "count": self.count, "classes": self.classes, "accuracy": self.accuracy,
            "top_k": {str(k): value for k, value in sorted(self.top_k.items())},
            "per_class": self.per_class, "macro": self.macro, "weighted": self.weighted,
            "confusion": self.confusion, "ece": self.ece, "calibration_bins": self.calibration_bins,
            "mistakes": self.mistakes, "meta": self.meta,
        }

    def report(self) -> str:
        """The numbers as text: summary lines, the per-class table, the confusion matrix, mistakes."""
        lines = [f"images: {self.count}", f"accuracy: {self.accuracy:.4f}"]
        if "transform" in self.meta:
            changed = {key: value for key, value in self.meta["transform"].items()
                       if key in ("crop_size", "mean_values", "mean_file", "scale", "new_height", "new_width")
                       and value not in (0, 1.0, [], None)}
            lines.insert(0, f"transform (from {self.meta.get('transform_from', '?')}, with the options): "
                            + (", ".join(f"{key} {value}" for key, value in changed.items()) or "none"))
        lines += [f"top-{k} accuracy: {value:.4f}" for k, value in sorted(self.top_k.items()) if k != 1]
        lines.append(f"expected calibration error: {self.ece:.4f} ({ECE_BINS} bins)")
        lines.append(f"macro F1: {self.macro['f1']:.4f}, weighted F1: {self.weighted['f1']:.4f}")
        width = max([5, *(len(name) for name in self.classes)])
        lines += ["", f"{'class':<{width}}  precision  recall     f1  support"]
        for row in self.per_class:
            lines.append(f"{row['class']:<{width}}  {row['precision']:>9.4f}  {row['recall']:>6.4f}  "
                         f"{row['f1']:>5.4f}  {row['support']:>7d}")
        cell = max(5, len(str(max((max(counts) for counts in self.confusion), default=0))) + 1)
        lines += ["", "confusion matrix (rows: true, columns: predicted)",
                  " " * width + "".join(f"{index:>{cell}d}" for index in range(len(self.classes)))]
        for name, counts in zip(self.classes, self.confusion):
            lines.append(f"{name:<{width}}" + "".join(f"{value:>{cell}d}" for value in counts))
        if self.mistakes:
            lines += ["", "most confident mistakes"]
            for wrong in self.mistakes:
                lines.append(f"  {wrong['confidence']:.4f}  {wrong['source']}: "
                             f"true {wrong['true_name']}, predicted {wrong['predicted_name']}")
        return "\n".join(lines) + "\n"


def class_names(count: int, names: Optional[Sequence[str]] = None) -> List[str]:
    """``names`` when given (one per class), else "0", "1", ..."""
    if names is None:
        return [str(index) for index in range(count)]
    if len(names) != count:
        raise CaffeFtError(f"{len(names)} class names for a net with {count} outputs")
    return list(names)


def evaluate(predictions: Predictions, top_k: Sequence[int] = (1, 5), names: Optional[Sequence[str]] = None,
             mistakes: int = 10) -> Evaluation:
    """The metrics of ``predictions`` (its probabilities' argmax is the prediction).

    ``top_k`` values not below the number of classes are dropped (every
    label is in the top K of K); ``mistakes`` is how many of the most
    confident wrong predictions to keep."""
    import numpy as np

    try:
        from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
    except ImportError:
        raise CaffeFtError("evaluating needs scikit-learn (pip install 'caffe-ft[evaluate]'; "
                           "Debian: apt install python3-sklearn)") from None
    probs, labels = predictions.probs, np.asarray(predictions.labels, dtype=np.int64)
    if probs.ndim != 2 or len(probs) != len(labels) or not len(labels):
        raise CaffeFtError(f"predictions of shape {probs.shape} for {len(labels)} labels")
    count, classes = probs.shape
    bad = labels[(labels < 0) | (labels >= classes)]
    if len(bad):
        raise CaffeFtError(f"label {int(bad[0])} is outside the net's {classes} classes (0-{classes - 1})")
    names = class_names(classes, names)
    predicted = predictions.predicted
    every: List[int] = list(range(classes))
    matrix = confusion_matrix(labels, predicted, labels=every)
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=every,
                                                                     zero_division=0)
    averages: Dict[str, Dict[str, float]] = {}
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(labels, predicted, labels=every, average=average,
                                                     zero_division=0)
        averages[average] = {"precision": float(p), "recall": float(r), "f1": float(f)}
    correct = predicted == labels
    confidence = probs.max(axis=1)
    calibrated = calibration(confidence, correct)
    ks = sorted({k for k in top_k if 1 <= k < classes} | {1})
    top = {k: float(top_k_hits(probs, labels, k).mean()) for k in ks if k > 1}
    top[1] = float(correct.mean())
    wrong = np.flatnonzero(~correct)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")][:mistakes]
    return Evaluation(
        count=count, classes=names, accuracy=float(correct.mean()), top_k=top,
        per_class=[{"class": names[i], "precision": float(precision[i]), "recall": float(recall[i]),
                    "f1": float(f1[i]), "support": int(support[i])} for i in every],
        macro=averages["macro"], weighted=averages["weighted"],
        confusion=[[int(value) for value in row] for row in matrix],
        ece=calibrated["ece"], calibration_bins=calibrated["bins"],
        mistakes=[{"index": int(i), "source": predictions.sources[i], "label": int(labels[i]),
                   "predicted": int(predicted[i]), "true_name": names[labels[i]],
                   "predicted_name": names[predicted[i]], "confidence": float(confidence[i]),
                   "true_probability": float(probs[i, labels[i]])} for i in wrong],
        meta=dict(predictions.meta),
    )
