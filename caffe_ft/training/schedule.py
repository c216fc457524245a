"""When a Caffe solver does what: learning rates, test passes, snapshots.

Engine-independent arithmetic of Caffe 1.0's ``Solver`` and ``SGDSolver``
(``GetLearningRate``, ``Step``, ``Solve``): every training engine and the
cached-feature head SGD read it, so that they all schedule alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Tuple


from ..errors import CaffeFtError

#: Learning-rate policies of Caffe's SGD family (SGDSolver::GetLearningRate).
LR_POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")
SOLVER_TYPES = ("SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam")

#: A ``SolverParameter``, or anything with the same fields (:class:`Settings`,
#: the cached-feature SGD's settings).
SolverLike = Any


@dataclass(frozen=True)
class Settings:
    """The solver fields the training loop reads, as plain Python values.

    The loop consults them every iteration; protobuf attribute access is
    several times slower than a dataclass's.  The functions below take
    either this or the SolverParameter itself.
    """

    max_iter: int
    base_lr: float
    lr_policy: str
    gamma: float
    power: float
    stepsize: int
    stepvalue: Tuple[int, ...]
    test_iter: Tuple[int, ...]
    test_interval: int
    test_initialization: bool
    snapshot: int
    snapshot_after_train: bool
    iter_size: int
    average_loss: int
    display: int
    layer_wise_reduce: bool

    @classmethod
    def of(cls, solver: SolverLike) -> "Settings":
        values: Dict[str, Any] = {}
        for name in cls.__dataclass_fields__:
            value = getattr(solver, name)
            values[name] = tuple(value) if name in ("stepvalue", "test_iter") else value
        return cls(**values)


def epoch_iters(train_size: int, batch: int, iter_size: int = 1) -> int:
    """Iterations one pass over ``train_size`` examples takes, as Caffe reads
    them: each iteration (one update) reads ``iter_size`` batches of ``batch``,
    so ``ceil(train_size / (batch * iter_size))``, and at least 1."""
    return max(1, -(-train_size // (batch * max(1, iter_size))))


def learning_rate(solver: SolverLike, iteration: int) -> float:
    """The rate Caffe's SGD-family solvers use for the update at ``iteration``."""
    policy, base = solver.lr_policy, solver.base_lr
    gamma, power = solver.gamma, solver.power
    if policy == "fixed":
        return base
    if policy == "step":
        return base * gamma ** (iteration // solver.stepsize)
    if policy == "exp":
        return base * gamma ** iteration
    if policy == "inv":
        return base * (1 + gamma * iteration) ** -power
    if policy == "multistep":
        step = 0
        while step < len(solver.stepvalue) and iteration >= solver.stepvalue[step]:
            step += 1
        return base * gamma ** step
    if policy == "poly":
        return base * (1 - iteration / solver.max_iter) ** power
    if policy == "sigmoid":
        return base / (1 + math.exp(-gamma * (iteration - solver.stepsize)))
    raise CaffeFtError(f"unknown lr_policy '{policy}'")


def check_solver(solver: SolverLike) -> None:
    """Refuse settings Caffe would abort on, at the start or in the middle of a run."""
    if solver.type not in SOLVER_TYPES:
        raise CaffeFtError(f"unknown solver type '{solver.type}'; Caffe knows {', '.join(SOLVER_TYPES)}")
    if solver.regularization_type not in ("L1", "L2"):
        raise CaffeFtError(f"unknown regularization_type '{solver.regularization_type}' (L1 or L2)")
    if solver.lr_policy not in LR_POLICIES:
        shown = f"'{solver.lr_policy}'" if solver.lr_policy else "unset"
        raise CaffeFtError(f"lr_policy is {shown}; Caffe knows {', '.join(LR_POLICIES)}")
    if solver.lr_policy in ("step", "sigmoid") and solver.stepsize <= 0:
        raise CaffeFtError(f"lr_policy '{solver.lr_policy}' needs a positive stepsize")
    if solver.lr_policy == "poly" and solver.max_iter <= 0:
        raise CaffeFtError("lr_policy 'poly' needs a positive max_iter")
    if solver.iter_size < 1:
        raise CaffeFtError("iter_size must be at least 1")
    if solver.type in ("AdaGrad", "RMSProp") and solver.momentum:
        raise CaffeFtError(f"the {solver.type} solver does not take a momentum (Caffe aborts on one); remove it")


def test_due(solver: SolverLike, iteration: int) -> bool:
    """Whether Caffe tests before the update at ``iteration`` (Solver::Step)."""
    interval = solver.test_interval
    return bool(len(solver.test_iter)) and interval > 0 and iteration % interval == 0 and (
        iteration > 0 or solver.test_initialization)


def final_test_due(solver: SolverLike, iteration: int) -> bool:
    """Whether Caffe tests once more after the last update (Solver::Solve)."""
    return bool(len(solver.test_iter)) and solver.test_interval > 0 and iteration % solver.test_interval == 0


def test_passes_before(solver: SolverLike, iteration: int) -> int:
    """Test passes an uninterrupted run has done before the update at ``iteration``."""
    interval = solver.test_interval
    if not len(solver.test_iter) or interval <= 0 or iteration <= 0:
        return 0
    return (iteration - 1) // interval + (1 if solver.test_initialization else 0)


def snapshot_due(solver: SolverLike, iteration: int) -> bool:
    """Whether Caffe snapshots once ``iteration`` updates are done."""
    return solver.snapshot > 0 and iteration % solver.snapshot == 0


def resume_skips(solver: SolverLike, iteration: int) -> Tuple[int, List[int]]:
    """Batches each data layer read before ``iteration``: ``(train net, [each test net])``."""
    passes = test_passes_before(solver, iteration)
    return iteration * solver.iter_size, [passes * count for count in solver.test_iter]
