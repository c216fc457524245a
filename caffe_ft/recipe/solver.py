"""Solver settings for fine-tuning: a pure function ``SolverParameter -> SolverParameter``.

Fine-tuning starts from trained weights, so it needs a smaller learning rate
and a shorter schedule than training from scratch: by default ``base_lr`` is
divided by 10 (the new head's ``lr_mult`` of 10 gives it the original rate)
and the step schedule and ``max_iter`` are cut to a fifth.

Scaling is a function of the original values: the orchestrator records them
(:func:`solver_originals`) in comments of the written solver and passes them
back as ``originals`` when it rewrites its own output, so a second run gives
the same solver instead of shrinking it again.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union, cast

from google.protobuf.message import Message

from ..errors import CaffeFtError
from ..formats.numbers import format_float
from ..training.schedule import epoch_iters

#: The settings that are scaled (and whose original values are recorded).
SCALED_FIELDS = ("base_lr", "stepsize", "stepvalue", "max_iter")
#: Ways a solver names its nets; all are replaced by ``net``.
NET_FIELDS = ("net", "net_param", "train_net", "train_net_param", "test_net", "test_net_param")

Original = Union[float, int, List[int]]

#: Epochs a run covers by default: (strategy, data set size band) -> epochs.  Fewer
#: layers to train and less data need more passes; a large data set needs few.
DEFAULT_EPOCHS = {"small": {"last-fc": 10, "features": 10, "top": 8, "full": 6},
                  "medium": {"last-fc": 6, "features": 6, "top": 5, "full": 4},
                  "large": {"last-fc": 4, "features": 4, "top": 3, "full": 2}}
#: At most this many test passes in a run (besides the first): tests cost a validation pass each.
MAX_TESTS = 10


@dataclass(frozen=True)
class Schedule:
    """What the data says about the run's length: a run of ``epochs`` passes
    over ``train_size`` examples in batches of ``batch``, ``iter_size`` of them
    an iteration (the solver's gradient accumulation), tested on ``val_size``
    examples in batches of ``val_batch``.  ``epochs`` None: :data:`DEFAULT_EPOCHS`
    for ``strategy``."""

    train_size: int
    batch: int
    val_size: int = 0
    val_batch: int = 50
    epochs: Optional[int] = None
    strategy: str = "last-fc"
    iter_size: int = 1

    @property
    def epoch_iters(self) -> int:
        """Iterations an epoch takes (:func:`caffe_ft.training.schedule.epoch_iters`)."""
        return epoch_iters(self.train_size, self.batch, self.iter_size)

    def default_epochs(self) -> Tuple[int, str]:
        from .strategies import LARGE_DATASET, SMALL_DATASET

        if self.epochs is not None:
            return self.epochs, "--epochs"
        band = ("small" if self.train_size < SMALL_DATASET else
                "large" if self.train_size > LARGE_DATASET else "medium")
        epochs = DEFAULT_EPOCHS[band].get(self.strategy, DEFAULT_EPOCHS[band]["full"])
        return epochs, f"{self.strategy} on a {band} data set"


def test_interval_for(max_iter: int, epoch_iters: int) -> int:
    """The test interval: at least an epoch, at most :data:`MAX_TESTS` tests, and
    a divisor of ``max_iter`` so that the last test scores the final weights."""
    target = max(epoch_iters, -(-max_iter // MAX_TESTS))
    for interval in range(min(target, max_iter), max_iter + 1):
        if max_iter % interval == 0:
            return interval
    return max_iter


def looks_like_finetuning(solver: Message, net: Optional[Message]) -> Optional[str]:
    """Why ``solver`` (with its net) looks like a fine-tuning solver already, or None:
    its net has a head with lr_mult 10 or frozen layers, and base_lr is at most 0.001."""
    if net is None or not solver.HasField("base_lr") or solver.base_lr > 0.001 + 1e-9:
        return None
    from ..net import graph

    mults = [mult for layer in net.layer for mult in graph.lr_mults(layer) if layer.type != "BatchNorm"]
    if not mults:
        return None
    if max(mults) >= 10 or min(mults) == 0:
        what = "a head with lr_mult >= 10" if max(mults) >= 10 else "frozen layers"
        return f"base_lr {format_float(solver.base_lr)} with {what} in its net"
    return None


def solver_originals(solver: Message) -> Dict[str, Original]:
    """The values of :data:`SCALED_FIELDS` that ``solver`` sets (unset ones are left out)."""
    found: Dict[str, Original] = {}
    for name in SCALED_FIELDS:
        if name == "stepvalue":
            if len(solver.stepvalue):
                found[name] = list(solver.stepvalue)
        elif solver.HasField(name):
            found[name] = getattr(solver, name)
    return found


def _normalized(originals: Mapping[str, object]) -> Dict[str, Original]:
    """``originals`` with each scalar setting as one number: values may be
    text (read back from comments) and scalars may come as one-item lists."""
    unknown = set(originals) - set(SCALED_FIELDS)
    if unknown:
        raise CaffeFtError(f"unknown original solver setting(s): {', '.join(sorted(unknown))}")
    result: Dict[str, Original] = {}
    for name, value in originals.items():
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if name == "stepvalue":
            result[name] = [int(float(v)) for v in values]  # type: ignore[arg-type]
            continue
        if len(values) != 1:
            raise CaffeFtError(f"original solver setting {name} must be one value, not {len(values)}")
        result[name] = float(values[0]) if name == "base_lr" else int(float(values[0]))  # type: ignore[arg-type]
    return result


def _scaled_steps(value: int, scale: float) -> int:
    """An iteration count times ``scale``, rounded, and at least 1."""
    return max(1, int(round(value * scale)))


def _has_net(solver: Message) -> bool:
    return any(solver.HasField(name) for name in ("net", "net_param", "train_net", "train_net_param"))


def _retarget(solver: Message, net_path: str) -> List[str]:
    """Point the solver at ``net_path`` alone.

    A solver with separate ``train_net``/``test_net`` files (or inline nets)
    gets ``net: net_path`` for both: Caffe then builds one test net from it,
    in the TEST phase, per ``test_iter`` entry (with ``test_state`` when set),
    so keeping ``test_iter`` as it was keeps the number of test nets.
    """
    tests = len(solver.test_net) + len(solver.test_net_param)
    was = [name for name in NET_FIELDS if name != "net" and (
        len(getattr(solver, name)) if name.startswith("test_") else solver.HasField(name))]
    for name in NET_FIELDS:
        solver.ClearField(name)
    solver.net = net_path
    notes = [f"net: \"{net_path}\""]
    if was:
        notes.append(f"{', '.join(was)} replaced by net (train and test phases of one file)")
    if tests > 1:
        notes.append(
            f"the {tests} test nets all become {net_path}'s TEST phase; "
            f"test_iter kept ({', '.join(str(i) for i in solver.test_iter)})"
        )
    return notes


def _scale_schedule(out: Message, source: Mapping[str, Original], step_scale: float,
                    max_iter: Optional[int]) -> List[str]:
    """Without the data set's size: the original schedule times ``step_scale``."""
    notes = []
    if "stepsize" in source:
        out.stepsize = _scaled_steps(source["stepsize"], step_scale)  # type: ignore[arg-type]
        notes.append(f"stepsize: {source['stepsize']} -> {out.stepsize} (x{step_scale:g})")
    if "stepvalue" in source:
        values: Sequence[int] = source["stepvalue"]  # type: ignore[assignment]
        out.ClearField("stepvalue")
        out.stepvalue.extend(_scaled_steps(v, step_scale) for v in values)
        notes.append(f"stepvalue: {', '.join(map(str, values))} -> "
                     f"{', '.join(map(str, out.stepvalue))} (x{step_scale:g})")
    if max_iter is not None:
        notes.append(f"max_iter: {out.max_iter} -> {max_iter} (given)")
        out.max_iter = max_iter
    elif "max_iter" in source:
        out.max_iter = _scaled_steps(source["max_iter"], step_scale)  # type: ignore[arg-type]
        notes.append(f"max_iter: {source['max_iter']} -> {out.max_iter} (x{step_scale:g})")
    if len(out.test_iter) and out.test_interval > 0 and out.max_iter > 0 and out.max_iter % out.test_interval:
        # Caffe tests only at multiples of test_interval: make the last one score the final weights.
        interval = test_interval_for(out.max_iter, min(out.test_interval, out.max_iter))
        notes.append(f"test_interval: {out.test_interval} -> {interval} (a divisor of max_iter "
                     f"{out.max_iter}: the final weights are tested)")
        out.test_interval = interval
    return notes


def _fit_schedule(out: Message, source: Mapping[str, Original], schedule: Schedule,
                  max_iter: Optional[int]) -> List[str]:
    """The run measured in epochs of the new data (see :func:`rewrite_solver`)."""
    notes = []
    schedule = dataclasses.replace(schedule, iter_size=max(1, out.iter_size))
    batch, per_epoch = schedule.batch * schedule.iter_size, schedule.epoch_iters
    if max_iter is not None:
        new_max, why = max_iter, "given"
    else:
        epochs, reason = schedule.default_epochs()
        new_max = epochs * per_epoch
        why = (f"{epochs} epochs ({reason}) of {schedule.train_size} examples in batches of {batch}: "
               f"{per_epoch} iterations each")
    old_max = int(source.get("max_iter", out.max_iter) or 0)  # type: ignore[arg-type]
    if new_max != out.max_iter or "max_iter" in source:
        notes.append(f"max_iter: {old_max} -> {new_max} ({why})")
    out.max_iter = new_max
    if "stepsize" in source:
        old = int(source["stepsize"])  # type: ignore[arg-type]
        fraction = old / old_max if old_max > 0 else 1 / 3
        out.stepsize = max(1, int(round(fraction * new_max)))
        notes.append(f"stepsize: {old} -> {out.stepsize} ({fraction:.3g} of the run, as before)")
    if "stepvalue" in source:
        values: Sequence[int] = source["stepvalue"]  # type: ignore[assignment]
        scaled: List[int] = []
        for value in values:
            step = max(1, int(round(value / old_max * new_max))) if old_max > 0 else value
            scaled.append(max(step, scaled[-1] + 1) if scaled else step)
        out.ClearField("stepvalue")
        out.stepvalue.extend(scaled)
        notes.append(f"stepvalue: {', '.join(map(str, values))} -> {', '.join(map(str, scaled))} "
                     "(the same fractions of the run)")
    if len(out.test_iter) or schedule.val_size:
        interval = test_interval_for(new_max, per_epoch)
        if interval != out.test_interval:
            epochs_apart = interval / per_epoch
            notes.append(f"test_interval: {out.test_interval} -> {interval} ({epochs_apart:.3g} epoch(s); "
                         f"the last test at max_iter scores the final weights)")
            out.test_interval = interval
    if schedule.val_size and len(out.test_iter):
        wanted = -(-schedule.val_size // schedule.val_batch)
        if any(value != wanted for value in out.test_iter):
            old_iters = ", ".join(map(str, out.test_iter))
            out.test_iter[:] = [wanted] * len(out.test_iter)
            notes.append(f"test_iter: {old_iters} -> {wanted} ({schedule.val_size} validation examples, "
                         f"batches of {schedule.val_batch}: each test covers them once)")
    if out.display > out.test_interval > 0:
        notes.append(f"display: {out.display} -> {out.test_interval}")
        out.display = out.test_interval
    if out.snapshot > new_max:
        notes.append(f"snapshot: {out.snapshot} -> 0 (the run ends before; Caffe snapshots at the end)")
        out.snapshot = 0
    return notes


def _upgrade(solver: Message) -> List[str]:
    from ..formats.upgrade import upgrade_solver  # the legacy-format module is only needed here

    return upgrade_solver(solver)


def rewrite_solver(
    solver: Message,
    *,
    net_path: str,
    snapshot_prefix: str,
    lr_scale: float = 0.1,
    step_scale: float = 0.2,
    max_iter: Optional[int] = None,
    originals: Optional[Mapping[str, object]] = None,
    schedule: Optional[Schedule] = None,
    finetuning: Optional[str] = None,
) -> Tuple[Message, List[str]]:
    """A fine-tuning copy of ``solver`` and notes on what changed.

    Legacy fields are upgraded first.  ``base_lr`` becomes
    ``original * lr_scale``; ``stepsize``, each ``stepvalue`` and
    ``max_iter`` become ``round(original * step_scale)``, at least 1
    (``max_iter`` is set to the given value instead when there is one).
    ``originals`` gives the values to scale from (as
    :func:`solver_originals` returns them; numbers may also be text, and
    scalars one-item lists); settings it lacks are taken from ``solver``.
    ``test_interval`` is cut to ``max_iter`` when a run would otherwise
    never be tested.  ``net`` becomes ``net_path`` (see :func:`_retarget`),
    ``snapshot_prefix`` is set, every other setting is kept.

    With a ``schedule`` (the data set's size is known) the run is measured in
    epochs instead: ``max_iter`` covers the schedule's epochs, ``stepsize`` and
    ``stepvalue`` fall at the same fractions of the run as in the original, and
    ``test_interval``/``test_iter`` test the validation set once, at least an
    epoch apart, the last time at ``max_iter``.  ``finetuning`` (why the solver
    already looks like a fine-tuning one, see :func:`looks_like_finetuning`)
    keeps ``base_lr`` as it is.
    """
    if not 0 < lr_scale < math.inf:
        raise CaffeFtError(f"the learning-rate scale must be positive and finite, not {lr_scale:g}")
    if not 0 < step_scale < math.inf:
        raise CaffeFtError(f"the step scale must be positive and finite, not {step_scale:g}")
    if max_iter is not None and max_iter < 1:
        raise CaffeFtError(f"max_iter must be at least 1, not {max_iter}")
    if not _has_net(solver):
        raise CaffeFtError("the solver names no net (set net, train_net or net_param)")
    given = _normalized(originals or {})
    out = type(solver)()
    out.CopyFrom(solver)
    notes = _upgrade(out)
    source = {**solver_originals(out), **given}

    if finetuning and "base_lr" in source:
        kept = format_float(float(source["base_lr"]))  # type: ignore[arg-type]
        notes.append(f"base_lr {kept} kept: this already looks like a "
                     f"fine-tuning solver ({finetuning})")
    elif "base_lr" in source:
        # scale the value as printed (0.01, not float32's 0.00999999977) so
        # that 0.01 x 0.1 gives the float32 nearest 0.001
        printed = format_float(float(cast(float, source["base_lr"])))
        out.base_lr = float(printed) * lr_scale
        if float(printed) and not 0 < abs(out.base_lr) < math.inf:  # float32 underflow or overflow
            raise CaffeFtError(f"base_lr {printed} x {lr_scale:g} is {format_float(out.base_lr)} in Caffe's "
                               "float; choose a --lr-scale that keeps it a usable learning rate")
        notes.append(f"base_lr: {printed} -> {format_float(out.base_lr)} "
                     f"(x{lr_scale:g}: the pretrained weights need small steps)")
    if schedule is not None and schedule.train_size > 0:
        notes.extend(_fit_schedule(out, source, schedule, max_iter))
    else:
        notes.extend(_scale_schedule(out, source, step_scale, max_iter))
    notes.extend(_retarget(out, net_path))
    out.snapshot_prefix = snapshot_prefix
    notes.append(f"snapshot_prefix: \"{snapshot_prefix}\"")
    return out, notes
