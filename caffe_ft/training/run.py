"""What a training run is asked to do and how it ended, whatever the engine.

:class:`TrainOptions` comes from ``caffe-ft train`` (or the library API),
:class:`TrainResult` goes back; :func:`resume_command` is the command line
that continues a stopped run.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from .progress import Output

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
    channels_last: bool = False


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
    if options.channels_last:
        words.append("--channels-last")
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
