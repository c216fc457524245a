"""Caffe's SGD on a lone InnerProduct + SoftmaxWithLoss head, in numpy.

When only the classifier head trains (strategy ``last-fc``) and the input
pipeline is deterministic, every iteration of Caffe's solver runs the frozen
trunk over the same images again and gets the same features; only the head
changes.  This module replays what Caffe's ``SGDSolver`` does to the head on
features computed once, step for step and in float32 as Caffe computes:

* **forward**: ``scores = X W^T + b``; SoftmaxWithLoss takes the max-shifted
  softmax ``p`` and outputs ``-sum log max(p[label], FLT_MIN) / normalizer``
  over the examples whose label is not ``ignore_label``; the normalizer
  (``loss_param``) is the count of those (VALID), the batch (FULL,
  BATCH_SIZE) or 1 (NONE), at least 1.  The net's loss is that output times
  the layer's ``loss_weight``;
* **backward**: ``dscores = (p - onehot) * loss_weight / normalizer`` (rows of
  ignored examples 0), ``dW = dscores^T X``, ``db`` = its column sums;
* **update** (``SGDSolver::ApplyUpdate``): when ``clip_gradients`` is set and
  the L2 norm of all gradients exceeds it, they are scaled down to it; then
  per blob ``diff += weight_decay * decay_mult * w`` (L2),
  ``history = momentum * history + rate * lr_mult * diff``, ``w -= history``,
  with ``rate`` the ``lr_policy``'s at the iteration (:func:`train.learning_rate`).

Batches are what an ImageData or Data layer reads: consecutive entries,
wrapping around at the end (:func:`batch_indices`).  With ``shuffle: true``
each pass is a fresh permutation, which cannot be the one Caffe draws (its
generator's state is not reachable from here): the same kind of run, not the
same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..training.schedule import learning_rate

FLT_MIN = np.float32(np.finfo(np.float32).tiny)


@dataclass(frozen=True)
class Loss:
    """The SoftmaxWithLoss layer on the head: ``loss_weight`` and ``loss_param``."""

    weight: float = 1.0
    normalization: str = "VALID"
    ignore_label: Optional[int] = None


@dataclass(frozen=True)
class SGD:
    """The solver settings SGD reads (names as in SolverParameter, so that
    :func:`train.learning_rate` takes this too) and the head's multipliers,
    one per parameter blob (weights, then the bias if there is one)."""

    base_lr: float
    max_iter: int
    lr_policy: str = "fixed"
    gamma: float = 0.0
    power: float = 0.0
    stepsize: int = 0
    stepvalue: Tuple[int, ...] = ()
    momentum: float = 0.0
    weight_decay: float = 0.0
    clip_gradients: float = -1.0
    lr_mults: Tuple[float, ...] = (1.0, 1.0)
    decay_mults: Tuple[float, ...] = (1.0, 1.0)


@dataclass
class Head:
    """The head's parameter blobs (``W`` as N x D, then ``b``) and SGD's history of each."""

    params: List[np.ndarray]
    history: List[np.ndarray]
    iteration: int = 0

    @classmethod
    def start(cls, params: Sequence[np.ndarray]) -> "Head":
        blobs = [np.array(blob, dtype=np.float32) for blob in params]
        return cls(blobs, [np.zeros_like(blob) for blob in blobs])

    def scores(self, features: np.ndarray) -> np.ndarray:
        scores = features @ self.params[0].T
        if len(self.params) > 1:
            scores += self.params[1]
        return scores


# --------------------------------------------------------------------------
# The layers


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax, shifted by the row maximum as Caffe's SoftmaxLayer does."""
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _valid(labels: np.ndarray, ignore_label: Optional[int]) -> np.ndarray:
    return np.ones(len(labels), bool) if ignore_label is None else labels != ignore_label


def normalizer(loss: Loss, batch: int, valid: int) -> np.float32:
    """What SoftmaxWithLoss divides by (``get_normalizer``)."""
    value = {"FULL": batch, "VALID": valid, "BATCH_SIZE": batch, "NONE": 1}[loss.normalization]
    return np.float32(max(1, value))


def softmax_loss(scores: np.ndarray, labels: np.ndarray, loss: Loss) -> Tuple[np.float32, np.ndarray]:
    """The layer's output (before ``loss_weight``) and the gradient of the
    weighted loss with respect to the scores."""
    prob = softmax(scores)
    valid = _valid(labels, loss.ignore_label)
    rows, picked = np.flatnonzero(valid), labels[valid]
    norm = normalizer(loss, len(labels), len(rows))
    value = np.float32(-np.log(np.maximum(prob[rows, picked], FLT_MIN)).sum(dtype=np.float32) / norm)
    grad = prob
    grad[rows, picked] -= np.float32(1)
    grad[~valid] = 0
    grad *= np.float32(np.float32(loss.weight) / norm)
    return value, grad


def accuracy(scores: np.ndarray, labels: np.ndarray, top_k: int = 1, ignore_label: Optional[int] = None
             ) -> np.float32:
    """Caffe's Accuracy: an example counts when at most ``top_k`` scores
    (its own included) are >= its label's score; ignored labels are left out."""
    valid = _valid(labels, ignore_label)
    if not valid.any():
        return np.float32(0)
    rows, picked = np.flatnonzero(valid), labels[valid]
    own = scores[rows, picked]
    hits = (scores[rows] >= own[:, None]).sum(axis=1) <= top_k
    return np.float32(np.float32(hits.sum()) / np.float32(len(rows)))


# --------------------------------------------------------------------------
# One iteration


def gradients(head: Head, features: np.ndarray, labels: np.ndarray, loss: Loss
              ) -> Tuple[np.float32, List[np.ndarray]]:
    """The layer's loss output and the gradient of each parameter blob."""
    value, dscores = softmax_loss(head.scores(features), labels, loss)
    grads = [dscores.T @ features]
    if len(head.params) > 1:
        grads.append(dscores.sum(axis=0))
    return value, grads


def apply_update(head: Head, grads: List[np.ndarray], rate: np.float32, sgd: SGD) -> None:
    """SGDSolver::ApplyUpdate on the head's blobs (in place): clip, decay, momentum, step."""
    if sgd.clip_gradients >= 0:
        norm = np.sqrt(np.float32(sum(np.float32((grad * grad).sum(dtype=np.float32)) for grad in grads)))
        if norm > sgd.clip_gradients:
            scale = np.float32(np.float32(sgd.clip_gradients) / norm)
            grads = [grad * scale for grad in grads]
    momentum = np.float32(sgd.momentum)
    for index, (param, grad, history) in enumerate(zip(head.params, grads, head.history)):
        decay = np.float32(np.float32(sgd.weight_decay) * np.float32(sgd.decay_mults[index]))
        if decay:
            grad = grad + decay * param
        local_rate = np.float32(rate * np.float32(sgd.lr_mults[index]))
        history *= momentum
        history += local_rate * grad
        param -= history
    head.iteration += 1


def rate_at(sgd: SGD, iteration: int) -> np.float32:
    """The learning rate (before lr_mult) Caffe uses for the update at ``iteration``."""
    return np.float32(learning_rate(sgd, iteration))


def step(head: Head, features: np.ndarray, labels: np.ndarray, sgd: SGD, loss: Loss) -> float:
    """One solver iteration on one batch; returns the net's loss (weighted).
    A non-finite loss leaves the head as it was (the caller stops there,
    as ``caffe-ft train`` stops before such an update)."""
    with np.errstate(invalid="ignore", over="ignore"):  # a nan/inf loss is looked at right below
        value, grads = gradients(head, features, labels, loss)
    weighted = float(value) * loss.weight
    if np.isfinite(weighted):
        apply_update(head, grads, rate_at(sgd, head.iteration), sgd)
    return weighted


# --------------------------------------------------------------------------
# Data order and test passes


def batch_indices(count: int, batch: int, rng: Optional[np.random.Generator] = None) -> Iterator[np.ndarray]:
    """The entries each batch of a data layer holds, for ever: consecutive,
    wrapping around; with ``rng`` (shuffle), every pass permuted afresh."""
    order = rng.permutation(count) if rng is not None else np.arange(count)
    position = 0
    while True:
        parts = []
        needed = batch
        while needed:
            take = min(needed, count - position)
            parts.append(order[position:position + take])
            position += take
            needed -= take
            if position == count:
                position = 0
                if rng is not None:
                    order = rng.permutation(count)
        yield np.concatenate(parts)


@dataclass(frozen=True)
class Output:
    """A test net output computed from the head's scores: an Accuracy or a
    SoftmaxWithLoss layer's top (a loss output is reported unweighted, as
    Caffe's test net blobs hold it)."""

    name: str
    kind: str  # "accuracy" or "loss"
    top_k: int = 1
    ignore_label: Optional[int] = None
    loss: Loss = Loss()


def batch_outputs(head: Head, features: np.ndarray, labels: np.ndarray, outputs: Sequence[Output]
                 ) -> Dict[str, np.float32]:
    """Each output's value on one test batch."""
    scores = head.scores(features)
    values = {}
    for output in outputs:
        if output.kind == "accuracy":
            values[output.name] = accuracy(scores, labels, output.top_k, output.ignore_label)
        else:
            values[output.name] = softmax_loss(scores, labels, output.loss)[0]
    return values
