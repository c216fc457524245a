"""Training snapshots that are never half-written, and checks before resuming.

Caffe writes ``PREFIX_iter_N.caffemodel`` and then ``PREFIX_iter_N.solverstate``
straight to their final names, so an interrupted write (a kill, a full disk)
leaves a truncated file under a good name, and the solverstate names the
caffemodel it goes with (its ``learned_net`` field), which a resume needs.

``caffe-ft train`` lets Caffe write each snapshot into a staging directory
beside the snapshot prefix (same file system, so a rename is atomic), then
commits it: the caffemodel is renamed into place first, then the solverstate,
with ``learned_net`` rewritten to the final caffemodel name (byte for byte what
Caffe itself would have written there).  A solverstate that exists therefore
always has its complete caffemodel.  (HDF5 snapshots keep ``learned_net``
inside HDF5, which is not rewritten here: Caffe writes those in place.)

The same staging directory holds the run's rolling checkpoint
(:class:`Snapshotter`), the state a diverging run falls back on.  Before
resuming, :func:`check_resume` makes sure the pair is complete, since Caffe
aborts the whole process on a missing or truncated file.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from ..errors import CaffeFtError
from ..formats import wire

MODEL_EXT = ".caffemodel"
STATE_EXT = ".solverstate"
_LEARNED_NET = 2  # SolverState.learned_net


def effective_prefix(solver_path: str, prefix: Optional[str]) -> str:
    """The snapshot prefix Caffe uses for a solver file (UpgradeSnapshotPrefixProperty):
    unset, it is the solver's path without its extension; a directory, the
    solver's file stem inside it."""
    if not prefix:
        root, _ = os.path.splitext(solver_path)
        return root
    if os.path.isdir(prefix):
        stem = os.path.splitext(os.path.basename(solver_path))[0]
        return os.path.join(prefix, stem)
    return prefix


def snapshot_paths(prefix: str, iteration: int) -> Tuple[str, str]:
    """``(caffemodel, solverstate)`` paths Caffe gives the snapshot at ``iteration``."""
    base = f"{prefix}_iter_{iteration}"
    return base + MODEL_EXT, base + STATE_EXT


# ------------------------------------------------------------- wire splicing --


def learned_net_span(data: bytes) -> Optional[Tuple[int, int, str]]:
    """``(start, end, value)`` of the ``learned_net`` record of a serialized
    SolverState, or None when it has none.  Caffe writes fields in number
    order, so the record comes right after ``iter``: only the head is read."""
    for record in wire.records(data, 0, len(data)):
        if record.field == _LEARNED_NET and record.wire == wire.BYTES:
            return record.start, record.end, data[record.value_start:record.end].decode("utf-8", "replace")
        if record.field > _LEARNED_NET:
            return None
    return None


def with_learned_net(data: bytes, learned_net: str) -> bytes:
    """A serialized SolverState with its ``learned_net`` set to ``learned_net``."""
    value = learned_net.encode("utf-8")
    record = wire.key_bytes(_LEARNED_NET, wire.BYTES) + wire.varint_bytes(len(value)) + value
    span = learned_net_span(data)
    if span is not None:
        start, end, _ = span
        return data[:start] + record + data[end:]
    pos = 0  # no learned_net yet: insert it after the fields numbered below it
    for each in wire.records(data, 0, len(data)):
        if each.field > _LEARNED_NET:
            break
        pos = each.end
    return data[:pos] + record + data[pos:]


# --------------------------------------------------------------- the commit --


def _fsync_write(path: str, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def commit(staged_model: str, staged_state: str, prefix: str, iteration: int) -> Tuple[str, str]:
    """Move a snapshot Caffe wrote to the staging paths to its final names; returns them.

    The solverstate's ``learned_net`` becomes the final caffemodel name, spelt
    as Caffe spells it (relative when the prefix is)."""
    model, state = snapshot_paths(prefix, iteration)
    try:
        with open(staged_state, "rb") as handle:
            data = with_learned_net(handle.read(), model)
        _fsync_write(staged_state, data)
        with open(staged_model, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(staged_model, model)
        os.replace(staged_state, state)
    except OSError as exc:
        raise CaffeFtError(f"cannot write the snapshot: {exc.strerror}", exc.filename or model) from None
    except ValueError as exc:
        raise CaffeFtError(f"Caffe wrote a malformed solverstate: {exc}", staged_state) from None
    return model, state


STAGING_PREFIX = ".caffe-ft-snapshot-"


class Staging:
    """A hidden directory beside the snapshot prefix for Caffe to write snapshots into.

    It is locked (``flock``) while its run lives, so the next run removes the
    staging folders of killed runs and leaves those of live ones alone.
    """

    def __init__(self, prefix: str) -> None:
        directory = os.path.dirname(prefix) or "."
        if not os.path.isdir(directory):
            raise CaffeFtError(f"the snapshot directory '{directory}' does not exist (snapshot_prefix: {prefix})")
        from ..formats.files import locked_temp, remove_stale

        remove_stale(directory, STAGING_PREFIX)  # left by killed runs; live ones are locked
        try:
            self.path, self._lock = locked_temp(directory, STAGING_PREFIX, folder=True)
        except OSError as exc:
            raise CaffeFtError(f"cannot write snapshots to '{directory}': {exc.strerror}") from None
        self.prefix = os.path.join(self.path, os.path.basename(prefix) or "snapshot")

    def staged_paths(self, iteration: int) -> Tuple[str, str]:
        return snapshot_paths(self.prefix, iteration)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1


# ----------------------------------------------------------------- resuming --


@dataclass(frozen=True)
class ResumePoint:
    """A checked snapshot to resume from."""

    state: str  # the solverstate to hand to Caffe (a fixed copy when learned_net moved)
    model: str  # the caffemodel it restores
    iteration: int
    fixed: bool = False  # ``state`` is a temporary copy with learned_net pointing at ``model``


def check_resume(state_path: str, schema: object, workdir: str) -> ResumePoint:
    """Make sure a binary solverstate and its caffemodel are complete before Caffe
    reads them (Caffe aborts the process on a bad file).

    ``learned_net`` is resolved as Caffe resolves it (from the working
    directory); when that file is gone but ``STATE.caffemodel`` lies beside
    the solverstate (a snapshot moved elsewhere), a copy of the solverstate in
    ``workdir`` pointing at it is used.
    """
    from ..formats.caffemodel import load_model, load_solverstate

    if state_path.endswith(".h5"):
        if not os.path.isfile(state_path):
            raise CaffeFtError("no such file", state_path)
        return ResumePoint(state_path, "", -1)
    snapshot = load_solverstate(state_path, schema)  # type: ignore[arg-type]
    iteration = int(snapshot.state.iter)
    learned = str(snapshot.state.learned_net)
    beside = os.path.splitext(state_path)[0] + MODEL_EXT
    if learned and os.path.isfile(learned):
        model, fixed = learned, False
    elif os.path.isfile(beside):
        model, fixed = beside, True
    else:
        named = f"'{learned}'" if learned else "no caffemodel"
        raise CaffeFtError(f"the solverstate names {named}, which does not exist, and there is no {beside}",
                           state_path)
    load_model(model, schema)  # type: ignore[arg-type]  # a truncated file fails here, not in Caffe
    if not fixed:
        return ResumePoint(state_path, model, iteration)
    with open(state_path, "rb") as handle:
        data = with_learned_net(handle.read(), os.path.abspath(model))
    copy = os.path.join(workdir, os.path.basename(state_path))
    _fsync_write(copy, data)
    return ResumePoint(copy, model, iteration, fixed=True)


# --------------------------------------------------------------- one run's --


class Snapshotter:
    """A run's snapshots, and the rolling checkpoint that a divergence falls back on.

    ``write()`` makes Caffe snapshot its current iteration, to the staging
    prefix (or, for HDF5, straight to the final one).  :meth:`save` commits a
    snapshot under its final name.  :meth:`checkpoint` keeps a recent known
    state in the staging directory without committing it, at most every
    ``min_gap`` seconds and so that writing them takes at most ``budget`` of
    the run's time.  When the loss at iteration ``k`` turns out nan/inf, the
    weights at ``k`` are already bad (the update before made them so), so
    :meth:`last_good` commits the newest state from before ``k``, whose loss
    was finite.  (With HDF5 snapshots there is no staging: only committed
    snapshots can be fallen back on.)
    """

    def __init__(self, write: Callable[[], None], prefix: str, staging: Optional[Staging],
                 clock: Callable[[], float] = time.monotonic, budget: float = 0.002, min_gap: float = 10.0,
                 estimate: int = 0) -> None:
        self.write, self.prefix, self.staging = write, prefix, staging
        self.clock, self.budget, self.min_gap = clock, budget, min_gap
        self.estimate = estimate  # bytes a snapshot takes, until one has been written
        self.saved: Dict[int, Tuple[str, str]] = {}
        self.rolling: List[int] = []  # staged checkpoints, oldest first
        self._next = -math.inf

    @property
    def latest(self) -> Optional[Tuple[str, str]]:
        return self.saved[max(self.saved)] if self.saved else None

    def known(self, iteration: int, paths: Tuple[str, str]) -> None:
        """Record a snapshot that already exists (the one a run resumes from)."""
        self.saved[iteration] = paths

    def room(self) -> Tuple[bool, int, int]:
        """Whether the snapshot folder has room for one more snapshot: (fits, needed, free) in bytes."""
        directory = self.staging.path if self.staging else (os.path.dirname(self.prefix) or ".")
        try:
            free = shutil.disk_usage(directory).free
        except OSError:
            return True, self.estimate, 0
        return free >= self.estimate, self.estimate, free

    def _written(self, iteration: int) -> None:
        """Learn a snapshot's size from the one just staged."""
        if self.staging is not None:
            size = 0
            for path in self.staging.staged_paths(iteration):
                try:
                    size += os.stat(path).st_size
                except OSError:
                    return
            self.estimate = size

    def save(self, iteration: int) -> Tuple[str, str]:
        """Snapshot ``iteration`` (the solver's current one) under its final name.

        Free space is checked first: a snapshot that cannot fit is a clear
        error here rather than an abort inside Caffe."""
        if iteration in self.saved:
            return self.saved[iteration]
        fits, needed, free = self.room()
        if not fits:
            raise CaffeFtError(f"no room for the snapshot of iteration {iteration}: it takes about "
                               f"{needed / 2**20:.1f} MiB and {free / 2**20:.1f} MiB are free", self.prefix)
        self.write()
        self._written(iteration)
        if self.staging is None:
            model, state = snapshot_paths(self.prefix, iteration)
            paths = (model + ".h5", state + ".h5")
        else:
            paths = commit(*self.staging.staged_paths(iteration), self.prefix, iteration)
            if iteration in self.rolling:
                self.rolling.remove(iteration)
        self.saved[iteration] = paths
        return paths

    def checkpoint(self, iteration: int) -> None:
        """Keep the current state in staging if it is time to."""
        if self.staging is None or self.clock() < self._next or iteration in self.saved:
            return
        if not self.room()[0]:
            return  # no room for a checkpoint: the committed snapshots stay the fallback
        began = self.clock()
        self.write()
        self._written(iteration)
        spent = self.clock() - began
        self._next = began + max(self.min_gap, spent / self.budget)
        if iteration not in self.rolling:
            self.rolling.append(iteration)

    def confirm(self, iteration: int) -> None:
        """The loss at ``iteration`` was finite: older checkpoints than the newest
        one at or before it are not needed any more."""
        good = [j for j in self.rolling if j <= iteration]
        for j in good[:-1]:
            self._drop(j)

    def _drop(self, iteration: int) -> None:
        self.rolling.remove(iteration)
        if self.staging is not None:
            for path in self.staging.staged_paths(iteration):
                try:
                    os.unlink(path)
                except OSError:
                    pass

    def last_good(self, before: int) -> Optional[Tuple[int, Tuple[str, str]]]:
        """The newest state from before iteration ``before``, committed; None if there is none."""
        candidates = [j for j in [*self.saved, *self.rolling] if j < before]
        if not candidates:
            return None
        best = max(candidates)
        if best in self.saved:
            return best, self.saved[best]
        assert self.staging is not None
        paths = commit(*self.staging.staged_paths(best), self.prefix, best)
        self.rolling.remove(best)
        self.saved[best] = paths
        return best, paths
