"""Keep the best weights and stop early: the decisions, whatever the engine.

``--keep-best OUTPUT`` watches one output of the first test net (an accuracy
is maximised; an output whose name says ``loss`` is minimised) and has the
engine write ``best.caffemodel`` each time a test pass beats every earlier
one; ``--patience N`` stops the run once N test passes in a row have not.
Ties are not improvements, so the best model is the earliest with the best
value.  The engines (:mod:`caffe_ft.training.pycaffe`, the torch engine)
each hold a :class:`KeepBest`, report each test pass to it (:func:`record_tests`)
and stop when it says so.  A resumed run carries the best over the stop
(:meth:`KeepBest.carry_over`): the test passes before it are in the --metrics
file and their best weights in ``best.caffemodel`` (without --metrics it says
that it cannot).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Protocol, Sequence

from ..errors import CaffeFtError
from .progress import MetricsWriter, Output, Reporter, read_metrics
from .stop import StopRequest

if TYPE_CHECKING:
    from .run import TrainResult

#: The file the best weights go to, beside the run's snapshots unless given.
BEST = "best.caffemodel"


def minimises(output: str) -> bool:
    """Whether a smaller ``output`` is better: loss outputs are minimised, everything else maximised."""
    return "loss" in output.lower()


def best_path(prefix: str) -> str:
    """Where ``best.caffemodel`` goes for a run whose snapshots are ``prefix``_iter_N."""
    return os.path.join(os.path.dirname(prefix), BEST)


@dataclass(frozen=True)
class Verdict:
    """What a test pass means: write the best weights now? stop the run now?"""

    new_best: bool
    stop: bool


@dataclass
class Tracker:
    """The best value of ``output`` so far, and how many tests since it improved."""

    output: str
    patience: Optional[int] = None
    best: Optional[float] = None
    best_iteration: Optional[int] = None
    last: Optional[float] = None
    last_iteration: Optional[int] = None
    since_best: int = 0
    stopped_at: Optional[int] = None

    @property
    def minimise(self) -> bool:
        return minimises(self.output)

    def update(self, iteration: int, outputs: Dict[str, Output]) -> Verdict:
        """Take the first test net's outputs at ``iteration``."""
        if self.output not in outputs:
            names = ", ".join(sorted(outputs)) or "none"
            raise CaffeFtError(f"--keep-best {self.output}: the first test net has no such output "
                               f"(its outputs: {names})")
        value = outputs[self.output]
        if not isinstance(value, float):
            raise CaffeFtError(f"--keep-best {self.output}: that output is not a single number")
        self.last, self.last_iteration = value, iteration
        better = self.best is None or (value < self.best if self.minimise else value > self.best)
        if better:
            self.best, self.best_iteration, self.since_best = value, iteration, 0
        else:
            self.since_best += 1
        stop = self.patience is not None and self.since_best >= self.patience
        if stop:
            self.stopped_at = iteration
        return Verdict(better, stop)

    def notes(self, best_model: Optional[str]) -> List[str]:
        """The best and the last result with their iterations, and why the run stopped (for summaries)."""
        if self.best is None:
            return [f"{self.output}: never tested"]
        where = f" ({best_model})" if best_model else ""
        lines = [f"best {self.output}: {self.best:.4f} at iteration {self.best_iteration}{where}",
                 f"last {self.output}: {self.last:.4f} at iteration {self.last_iteration}"]
        if self.stopped_at is not None:
            lines.append(f"stopped early at iteration {self.stopped_at}: {self.patience} test(s) without a better "
                         f"{self.output}")
        return lines


def tracker(keep_best: Optional[str], patience: Optional[int]) -> Optional[Tracker]:
    """The tracker ``--keep-best``/``--patience`` ask for (None for neither)."""
    if patience is not None and patience < 1:
        raise CaffeFtError(f"--patience must be at least 1, not {patience}")
    if keep_best is None:
        if patience is not None:
            raise CaffeFtError("--patience needs --keep-best OUTPUT (the test output that must improve)")
        return None
    return Tracker(keep_best, patience)


def carry_over(tracker: Optional[Tracker], metrics: Optional[str], resume_at: int, best_model: str) -> Optional[str]:
    """Replay into ``tracker`` the first test net's passes before ``resume_at``
    that ``metrics`` records, so that a resumed run neither overwrites a better
    ``best_model`` written before the stop nor forgets how long it has waited.
    Without that model the record is not replayed: the best is kept afresh.
    ``metrics`` is the run's --metrics file (None without one, when the tests
    before the stop are not known).  A line for the user, or None when there
    was nothing to carry over."""
    if tracker is None:
        return None
    if metrics is None or not os.path.exists(metrics):
        if os.path.exists(best_model):
            return (f"keep-best: the tests before iteration {resume_at} are not known without the run's --metrics "
                    f"file, so a test worse than theirs may replace {best_model}")
        return None
    passes = [(int(record["iteration"]), record.get("outputs") or {}) for record in read_metrics(metrics)
              if record.get("phase") == "test" and record.get("net") == 0 and record["iteration"] < resume_at]
    if not passes:
        return None
    if not os.path.exists(best_model):
        return f"keep-best: {best_model} is missing, so the best is kept afresh from this run's tests"
    for iteration, outputs in passes:
        numbers = {name: float(value) if isinstance(value, int) else value for name, value in outputs.items()}
        tracker.update(iteration, numbers)
    tracker.stopped_at = None
    return (f"keep-best: before iteration {resume_at}, best {tracker.output} {tracker.best:.4f} at iteration "
            f"{tracker.best_iteration} ({best_model}), {tracker.since_best} test(s) since")


def save_atomically(path: str, write: Callable[[str], None]) -> None:
    """``write(temporary)`` then rename it to ``path``: a best model is never half-written."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def check_output(keep_best: str, outputs: List[str]) -> None:
    """Refuse, before training, a --keep-best output the first test net does not have."""
    if not outputs:
        raise CaffeFtError(f"--keep-best {keep_best}: the solver has no test net (give test_iter and a TEST phase)")
    if keep_best not in outputs:
        raise CaffeFtError(f"--keep-best {keep_best}: the first test net has no such output "
                           f"(its outputs: {', '.join(sorted(outputs))})")


@dataclass
class KeepBest:
    """One run's keep-best, as both engines hold it: the :class:`Tracker`
    (None without ``--keep-best``, and in a process that does not test), where
    the best weights go, whether they were written, and whether the patience
    ran out at the last test pass (the engine then stops)."""

    tracker: Optional[Tracker]
    path: str
    written: bool = False
    stop: bool = False

    @classmethod
    def of(cls, keep_best: Optional[str], patience: Optional[int], best_model: Optional[str], prefix: str,
           tests: bool = True) -> "KeepBest":
        """What ``--keep-best``/``--patience`` ask of a run whose snapshots are ``prefix``_iter_N
        (``best_model``: where best.caffemodel goes instead of beside them)."""
        return cls(tracker(keep_best, patience) if tests else None, best_model or best_path(prefix))

    def check(self, outputs: List[str]) -> None:
        """Refuse, before training, an output the first test net does not have (:func:`check_output`)."""
        if self.tracker is not None:
            check_output(self.tracker.output, outputs)

    def carry_over(self, metrics: Optional[str], resume_at: int) -> Optional[str]:
        """A resumed run's earlier test passes replayed (:func:`carry_over`); the line to show, if any."""
        return carry_over(self.tracker, metrics, resume_at, self.path)

    def weigh(self, iteration: int, outputs: Dict[str, Output], save: Callable[[str], None]) -> None:
        """The first test net's ``outputs`` at ``iteration``: ``save(path)`` writes the
        weights (atomically, to :attr:`path`) when they are the best yet."""
        if self.tracker is None:
            return
        verdict = self.tracker.update(iteration, outputs)
        if verdict.new_best:
            save_atomically(self.path, save)
            self.written = True
        self.stop = verdict.stop

    def report(self, result: "TrainResult") -> None:
        """Tell ``result`` the best model (when one was written) and the best and last results."""
        if self.tracker is not None:
            result.best_model = self.path if self.written else None
            result.best_notes = self.tracker.notes(result.best_model)


class TestingLoop(Protocol):
    """What :func:`record_tests` needs of an engine's training loop."""

    stop: StopRequest
    tests: List[Dict[str, Output]]
    reporter: Optional[Reporter]
    metrics: Optional[MetricsWriter]
    best: KeepBest

    def say(self, text: str) -> None: ...


def record_tests(loop: TestingLoop, iteration: int, counts: Sequence[int],
                 run_one: Callable[[int, int, Callable[[], bool]], Optional[Dict[str, Output]]],
                 save_best: Callable[[str], None], abortable: bool) -> bool:
    """One test pass of every test net, as both engines do it: each net's
    outputs reported, written to the metrics, and the first net's weighed by
    the loop's :class:`KeepBest` (``save_best`` writes the weights when they
    are the best yet).  False when a stop cut a pass short."""
    abort = (lambda: loop.stop.requested is not None) if abortable else (lambda: False)
    for index, count in enumerate(counts):
        outputs = run_one(index, count, abort)
        if outputs is None:
            loop.say(f"iter {iteration}  test #{index}: interrupted")
            return False
        loop.tests.append(outputs)
        if loop.reporter is not None:
            loop.reporter.test(iteration, index, outputs)
        if loop.metrics is not None:
            loop.metrics.test(iteration, index, outputs)
        if index == 0:
            loop.best.weigh(iteration, outputs, save_best)
    return True
