"""Caffe's solvers on torch tensors: the update rules of ``sgd_solvers.cpp``, not ``torch.optim``'s.

One iteration (Caffe 1.0's ``SGDSolver::ApplyUpdate``): the learning rate of
the iteration (:func:`~caffe_ft.training.schedule.learning_rate`); gradient
clipping by the global L2 norm (``clip_gradients``); then for each learnable
blob, in Caffe's order: scaling by ``1 / iter_size``, L2 or L1 regularization
(``weight_decay * decay_mult``), the type's update value with
``rate * lr_mult``, and ``W -= update``.  SGD keeps
``V = momentum * V + rate * lr_mult * (g + decay * W)`` and subtracts ``V``,
which differs from ``torch.optim.SGD`` whenever the rate changes.

The history blobs are Caffe's ``history_`` (AdaDelta and Adam append their
second set after the first), so a ``.solverstate`` carries them either way.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from google.protobuf.message import Message
from torch import Tensor

from ...errors import CaffeFtError
from ..schedule import check_solver, learning_rate
from .net import LearnableSpec

#: Solver types (schedule.SOLVER_TYPES) and how many history blobs each keeps per learnable blob.
TYPES = {"SGD": 1, "Nesterov": 1, "AdaGrad": 1, "RMSProp": 1, "AdaDelta": 2, "Adam": 2}


class CaffeSolver:
    """The update of one solver type over a net's learnable blobs."""

    def __init__(self, param: Message, learnable: Sequence[LearnableSpec]) -> None:
        check_solver(param)  # a library caller's Trainer too: one line for a type Caffe does not know
        kind = param.type
        self.param = param
        self.kind = kind
        self.learnable = list(learnable)
        self.iter = 0
        self.history: List[Tensor] = [
            torch.zeros_like(spec.param, memory_format=torch.contiguous_format).detach()
            for _ in range(TYPES[kind]) for spec in self.learnable
        ]
        # The blobs plain SGD updates together: those sharing a decay and an lr_mult.
        groups: Dict[Tuple[float, float], List[int]] = {}
        for i, spec in enumerate(self.learnable):
            groups.setdefault((param.weight_decay * spec.decay_mult, spec.lr_mult), []).append(i)
        self._groups: List[Tuple[float, float, List[int], List[Tensor], List[Tensor]]] = [
            (decay, lr_mult, members, [self.learnable[i].param for i in members], [self.history[i] for i in members])
            for (decay, lr_mult), members in groups.items()]

    # -- Caffe's steps
    def rate(self, iteration: Optional[int] = None) -> float:
        return learning_rate(self.param, self.iter if iteration is None else iteration)

    def _diffs(self) -> List[Tensor]:
        diffs = []
        for spec in self.learnable:
            grad = spec.param.grad
            # The gradients are ours (cleared before every forward pass): updated in place, not copied.
            diffs.append(torch.zeros_like(spec.param).detach() if grad is None else grad.detach())
        return diffs

    def _clip(self, diffs: List[Tensor]) -> None:
        threshold = self.param.clip_gradients
        if threshold < 0:
            return
        norm = math.sqrt(sum(float(torch.sum(d * d)) for d in diffs))
        if norm > threshold:
            factor = threshold / norm
            for d in diffs:
                d.mul_(factor)

    def apply_update(self) -> float:
        """Update every learnable blob from its ``.grad`` (zero where None); advance ``iter``.

        Returns the learning rate used."""
        param = self.param
        rate = self.rate()
        diffs = self._diffs()
        self._clip(diffs)
        n = len(self.learnable)
        iter_size = param.iter_size
        if self.kind == "SGD" and param.regularization_type == "L2":
            self._sgd(diffs, rate)
            self.iter += 1
            return rate
        with torch.no_grad():
            for i, (spec, diff) in enumerate(zip(self.learnable, diffs)):
                data = spec.param
                if iter_size != 1:
                    diff.mul_(float(np.float32(1.0) / np.float32(iter_size)))
                decay = param.weight_decay * spec.decay_mult
                if decay:
                    if param.regularization_type == "L2":
                        diff.add_(data, alpha=decay)
                    else:
                        diff.add_(torch.sign(data), alpha=decay)
                local_rate = rate * spec.lr_mult
                update = self._update(i, n, diff, local_rate)
                data.sub_(update)
        self.iter += 1
        return rate

    def _sgd(self, diffs: List[Tensor], rate: float) -> None:
        """Plain SGD with L2 decay, the common case, with one ``torch._foreach_*`` call per step over
        the blobs sharing a decay and an lr_mult (grouped once, in ``__init__``): the same operations
        as :meth:`_update`, in the same order, without a Python loop over (ResNet-50: 300) blobs."""
        param = self.param
        scale = float(np.float32(1.0) / np.float32(param.iter_size))
        with torch.no_grad():
            for decay, lr_mult, members, data, history in self._groups:
                grads = [diffs[i] for i in members]
                if param.iter_size != 1:
                    torch._foreach_mul_(grads, scale)
                if decay:
                    torch._foreach_add_(grads, data, alpha=decay)
                torch._foreach_mul_(history, param.momentum)
                torch._foreach_add_(history, grads, alpha=rate * lr_mult)
                torch._foreach_sub_(data, history)

    def _update(self, i: int, n: int, diff: Tensor, local_rate: float) -> Tensor:
        param, kind, h = self.param, self.kind, self.history[i]
        momentum, delta = param.momentum, param.delta
        if kind == "SGD":
            h.mul_(momentum).add_(diff, alpha=local_rate)
            return h
        if kind == "Nesterov":
            previous = h.clone()
            h.mul_(momentum).add_(diff, alpha=local_rate)
            return h * (1 + momentum) - previous * momentum
        if kind == "AdaGrad":
            h.add_(diff * diff)
            return diff / (torch.sqrt(h) + delta) * local_rate
        if kind == "RMSProp":
            decay = param.rms_decay
            h.mul_(decay).add_(diff * diff, alpha=1 - decay)
            return diff / (torch.sqrt(h) + delta) * local_rate
        second = self.history[i + n]
        if kind == "AdaDelta":
            h.mul_(momentum).add_(diff * diff, alpha=1 - momentum)
            update = diff * torch.sqrt((second + delta) / (h + delta))
            second.mul_(momentum).add_(update * update, alpha=1 - momentum)
            return update * local_rate
        # Adam: m in the first set, v in the second, Caffe's bias correction.
        beta1, beta2 = momentum, param.momentum2
        t = self.iter + 1
        correction = math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
        h.mul_(beta1).add_(diff, alpha=1 - beta1)
        second.mul_(beta2).add_(diff * diff, alpha=1 - beta2)
        return h / (torch.sqrt(second) + delta) * (local_rate * correction)

    # -- snapshots
    def history_arrays(self) -> List[np.ndarray]:
        return [h.detach().cpu().numpy().astype(np.float32, copy=True) for h in self.history]

    def restore(self, iteration: int, history: Sequence[np.ndarray]) -> None:
        """Take back a snapshot's iteration and history blobs (checked one for one)."""
        if len(history) != len(self.history):
            raise CaffeFtError(f"the solverstate has {len(history)} history blobs; this {self.kind} solver "
                               f"over this net keeps {len(self.history)}")
        for index, (mine, theirs) in enumerate(zip(self.history, history)):
            array = np.array(theirs, np.float32)
            if array.size != mine.numel():
                raise CaffeFtError(f"history blob {index} holds {array.size} values; its parameter has {mine.numel()}")
            mine.copy_(torch.from_numpy(array.reshape(tuple(mine.shape))))
        self.iter = iteration


def current_step(param: Message, iteration: int) -> int:
    """Caffe's ``current_step_`` after ``iteration``: steps passed (step and multistep policies)."""
    if param.lr_policy == "multistep":
        return sum(1 for value in param.stepvalue if iteration >= value)
    if param.lr_policy == "step" and param.stepsize > 0:
        return iteration // param.stepsize
    return 0
