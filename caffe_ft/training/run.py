"""What a training run is asked to do and how it ended, whatever the engine.

:class:`TrainOptions` comes from ``caffe-ft train`` (or the library API),
:class:`TrainResult` goes back; :func:`resume_command` is the command line
that continues a stopped run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

from ..errors import CaffeFtError
from .progress import Output
from .snapshots import Snapshotter

#: A run stopped by signal N exits with 128 + N, as a shell would report it.
EXIT_SIGNAL_BASE = 128


@dataclass(frozen=True)
class TrainOptions:
    """What ``caffe-ft train`` was asked to do.

    ``device`` is ``"cpu"``, ``"solver"`` (the solver file's ``solver_mode``
    and ``device_id``, as ``caffe train`` does) or a ``--gpu`` value
    (``"0"``, ``"0,1"``, ``"all"``).  ``stop_after`` requests a stop once
    that many iterations are done, through the very path a SIGINT takes.
    """

    solver: str
    weights: Optional[str] = None
    device: str = "solver"
    resume: Optional[str] = None
    metrics: Optional[str] = None
    plot: Optional[str] = None
    snapshot_on_exit: bool = True
    stop_after: Optional[int] = None
    caffe_log: bool = False
    bar: Optional[bool] = None
    proto: Optional[str] = None
    report: Optional[str] = None  # a directory for report.html/report.json (written by the API, not the engine)
    tensorboard: Optional[str] = None  # a directory for TensorBoard event files (idem)
    engine: str = "pycaffe"
    precision: str = "fp32"
    channels_last: Optional[bool] = None  # torch: None = the engine's choice (channels-last on the CPU)
    keep_best: Optional[str] = None  # the test output whose best value keeps best.caffemodel (training.best)
    patience: Optional[int] = None  # stop after this many tests without a better keep_best value
    best_model: Optional[str] = None  # where best.caffemodel goes (default: beside the snapshots)
    data_workers: Optional[int] = None  # torch: processes reading each net's data; None = the engine's choice
    data_checked: bool = False  # the caller ran the data pre-flight (nets.check_data) on these nets already


@dataclass
class TrainResult:
    """How a run ended.  ``status``: ``done``, ``interrupted`` or ``diverged``."""

    status: str
    iteration: int
    exit_code: int
    snapshot: Optional[Tuple[str, str]] = None
    resume_command: Optional[str] = None
    message: str = ""
    tests: List[Dict[str, Output]] = field(default_factory=list)
    best_model: Optional[str] = None  # best.caffemodel, when --keep-best wrote one
    best_notes: List[str] = field(default_factory=list)  # the best and last results, an early stop


def resume_command(options: TrainOptions, state: str) -> str:
    """The shell command that continues this run from ``state``."""
    words = ["caffe-ft"]
    if options.proto:
        words += ["--proto", options.proto]
    words += ["train", options.solver, "--resume", state]
    if options.engine != "pycaffe":
        words += ["--engine", options.engine]
    if options.precision != "fp32":
        words += ["--precision", options.precision]
    if options.channels_last is not None:
        words.append("--channels-last" if options.channels_last else "--no-channels-last")
    if options.data_workers is not None:
        words += ["--data-workers", str(options.data_workers)]
    if options.device == "cpu":
        words.append("--cpu")
    elif options.device != "solver":
        words += ["--gpu", options.device]
    if options.metrics:
        words += ["--metrics", options.metrics]
    if options.plot:
        words += ["--plot", options.plot]
    if options.report:
        words += ["--report", options.report]
    if options.tensorboard:
        words += ["--tensorboard", options.tensorboard]
    if options.keep_best:
        words += ["--keep-best", options.keep_best]
    if options.patience is not None:
        words += ["--patience", str(options.patience)]
    if not options.snapshot_on_exit:
        words.append("--no-snapshot-on-exit")
    if options.caffe_log:
        words.append("--caffe-log")
    return " ".join(shlex.quote(word) for word in words)


ENGINES = ("pycaffe", "torch", "auto")


def choose_engine(engine: str, device: str) -> Tuple[str, str]:
    """The engine that runs a ``--engine`` request on ``device``, and why.

    ``auto`` takes pycaffe when it imports and, for ``--gpu``, was built with
    CUDA; otherwise torch.  Neither import happens for an explicit choice.
    """
    if engine != "auto":
        return engine, f"--engine {engine}"
    import importlib.util

    if importlib.util.find_spec("caffe") is None:
        return "torch", "auto: pycaffe is not installed"
    if device not in ("cpu", "solver"):
        from .devices import gpu_support

        if not gpu_support():
            return "torch", "auto: this pycaffe was built without GPU support"
    return "pycaffe", "auto: pycaffe runs on this device"


def run_folder(solver_path: str, schema: Any) -> Optional[str]:
    """The folder a run must work in: the solver's own when the nets it names by
    relative paths are found from there (a caffe-ft output folder: its files name
    each other and their data relative to themselves), else None (Caffe's own
    convention: relative to the working directory)."""
    from ..formats import files

    try:
        solver = files.load_text(solver_path, schema, files.SOLVER).message
    except Exception:  # noqa: BLE001 - the engine reports a bad solver itself
        return None
    names = [solver.net, solver.train_net, *solver.test_net]
    relative = [name for name in names if name and not os.path.isabs(name)]
    folder = os.path.dirname(os.path.abspath(solver_path))
    if not relative or folder == os.path.abspath(os.getcwd()):
        return None
    if all(os.path.exists(os.path.join(folder, name)) for name in relative):
        return folder
    return None


def absolute_options(options: TrainOptions) -> TrainOptions:
    """``options`` with every path absolute, to be used from another folder."""
    names = ("solver", "weights", "resume", "metrics", "plot", "proto", "report", "tensorboard", "best_model")
    absolute: Dict[str, Any] = {name: os.path.abspath(value) for name in names
                                if isinstance((value := getattr(options, name, None)), str) and value}
    return dataclasses.replace(options, **absolute)


@contextlib.contextmanager
def working_directory(folder: str) -> Iterator[None]:
    """Run the body in ``folder`` (Caffe opens every relative path from the working directory).

    An error raised inside that names a file by a relative path (an image list
    the net names from ``folder``) names it from the caller's directory
    instead: the user stands there.  Caffe's data layers read ahead in threads
    for as long as their net lives, so the nets the body made are collected
    (their threads joined) before leaving."""
    import gc

    before = os.getcwd()
    os.chdir(folder)
    inside = os.getcwd()
    try:
        yield
    except CaffeFtError as exc:
        if exc.path and not os.path.isabs(exc.path):
            exc.path = os.path.relpath(os.path.join(inside, exc.path), before)
        raise
    finally:
        gc.collect()
        os.chdir(before)


def ended_run(options: TrainOptions, snapshots: Snapshotter, status: str, iteration: int, *, signum: int,
              snapshot_after_train: bool, done: int, seconds: float, tests: List[Dict[str, Output]]) -> TrainResult:
    """How a run that was stopped (``interrupted``) or reached max_iter (``done``)
    ended, whatever the engine: its last snapshot, what to say and, after a
    stop, the command that resumes."""
    if status == "interrupted":
        paths = snapshots.save(iteration) if options.snapshot_on_exit else snapshots.latest
        command = resume_command(options, paths[1]) if paths else None
        message = f"stopped at iteration {iteration}" + (f"; snapshot {paths[0]}" if paths else
                                                         "; no snapshot written (--no-snapshot-on-exit)")
        return TrainResult(status, iteration, EXIT_SIGNAL_BASE + signum, paths, command, message, tests)
    paths = snapshots.save(iteration) if snapshot_after_train else snapshots.latest
    rate = f" ({done / seconds:.3g} it/s)" if seconds > 0 and done else ""
    message = f"trained to iteration {iteration}{rate}" + (f"; model {paths[0]}" if paths else "")
    return TrainResult(status, iteration, 0, paths, None, message, tests)
