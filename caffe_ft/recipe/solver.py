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

import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union, cast

from google.protobuf.message import Message

from ..errors import CaffeFtError
from ..formats.numbers import format_float

#: The settings that are scaled (and whose original values are recorded).
SCALED_FIELDS = ("base_lr", "stepsize", "stepvalue", "max_iter")
#: Ways a solver names its nets; all are replaced by ``net``.
NET_FIELDS = ("net", "net_param", "train_net", "train_net_param", "test_net", "test_net_param")

Original = Union[float, int, List[int]]


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

    if "base_lr" in source:
        # scale the value as printed (0.01, not float32's 0.00999999977) so
        # that 0.01 x 0.1 gives the float32 nearest 0.001
        printed = format_float(float(cast(float, source["base_lr"])))
        out.base_lr = float(printed) * lr_scale
        if float(printed) and not 0 < abs(out.base_lr) < math.inf:  # float32 underflow or overflow
            raise CaffeFtError(f"base_lr {printed} x {lr_scale:g} is {format_float(out.base_lr)} in Caffe's "
                               "float; choose a --lr-scale that keeps it a usable learning rate")
        notes.append(f"base_lr: {printed} -> {format_float(out.base_lr)} "
                     f"(x{lr_scale:g}: the pretrained weights need small steps)")
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
        out.max_iter = max_iter
        notes.append(f"max_iter: {max_iter} (given)")
    elif "max_iter" in source:
        out.max_iter = _scaled_steps(source["max_iter"], step_scale)  # type: ignore[arg-type]
        notes.append(f"max_iter: {source['max_iter']} -> {out.max_iter} (x{step_scale:g})")
    if out.test_interval > out.max_iter > 0 and len(out.test_iter):
        # Caffe tests only at multiples of test_interval: a shorter run would never be tested.
        notes.append(f"test_interval: {out.test_interval} -> {out.max_iter} (the run is shorter than one interval)")
        out.test_interval = out.max_iter
    notes.extend(_retarget(out, net_path))
    out.snapshot_prefix = snapshot_prefix
    notes.append(f"snapshot_prefix: \"{snapshot_prefix}\"")
    return out, notes
