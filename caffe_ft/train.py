"""``caffe-ft train``: run a Caffe solver through pycaffe, safely and resumably.

What Caffe's own ``caffe train`` does, plus what long fine-tuning runs need:

* **Checked start.** ``--weights`` are checked against the nets first
  (:func:`caffe_ft.weights.check`); a shape mismatch, which would abort Caffe,
  stops the run before it starts, with the report (when a data layer does
  not tell its image size, the check runs once Caffe has built the nets, on
  their actual shapes, still before the copy).  Asking for a GPU from a
  CPU-only Caffe is explained instead of aborting (:mod:`caffe_ft.devices`).
* **The loop in Python.** The solver runs one iteration per ``solver.step(1)``.
  Test phases are run here, at Caffe's iterations (every ``test_interval``, at
  0 unless ``test_initialization: false``, and after the last iteration),
  with each output averaged over ``test_iter`` batches as Caffe averages it;
  Caffe is handed a copy of the solver whose own testing, display and
  snapshots are turned off.  Snapshots go through :mod:`caffe_ft.snapshot`,
  so they are never half-written.
* **Interrupts.** SIGINT/SIGTERM finish the current iteration, snapshot, and
  exit with 128+signal, printing the command that resumes.  A second signal
  aborts at once.
* **Resume.** ``solver.restore`` brings back the weights, the solver history
  and the iteration, but not where the data layers were: those are advanced
  by as many batches as the interrupted run had read (``iter * iter_size``
  for the train net, ``test passes * test_iter`` for each test net).  With a
  deterministic input pipeline (no shuffle, no random crop or mirror) and no
  Dropout (its random masks come from Caffe's generator, whose state no
  snapshot keeps), an interrupted and resumed CPU run ends with the very
  same caffemodel, byte for byte, as an uninterrupted one.
* **Divergence.** The loss is checked before every update, from a solver
  callback that runs once the gradients are ready; a nan/inf loss raises
  there, so that update is never applied.  But the weights that gave the
  nan are already bad (the previous update made them so), so the run falls
  back on the newest state known good: a rolling checkpoint that Caffe
  writes to the snapshot staging directory at the start and then at most
  every 10 seconds, spaced so that writing them takes at most 0.2 % of the
  run's time (a net whose snapshot takes 1 s gets one every 500 s), or a
  regular snapshot, whichever is newer.  That state is committed as a normal snapshot and the
  message says to lower ``base_lr`` and resume from it.
* **Several GPUs** run as Caffe's ``python/train.py`` does: one process per
  GPU, ``caffe.NCCL`` to broadcast the weights and all-reduce the gradients.
  The ranks agree on stopping (signal, divergence) at a barrier in the same
  callback, before the all-reduce, so they all stop at the same iteration.
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from google.protobuf.message import Message

from . import snapshot as snap
from .errors import CaffeFtError
from .io import load_net
from .progress import MetricsWriter, Output, Reporter, make_reporter, summarize_outputs
from .schema import Schema

#: What Caffe is told instead of the real test_interval: testing is done here.
_NO_CAFFE_TESTS = 2 ** 31 - 1
#: Layer types that read no data although they have no bottoms.
_NOT_SOURCES = frozenset({"Input", "Parameter"})
#: Learning-rate policies of Caffe's SGD family (SGDSolver::GetLearningRate).
LR_POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")

EXIT_SIGNAL_BASE = 128


class NonFiniteLoss(Exception):
    """Raised from the gradients-ready callback to keep a nan/inf update from happening."""

    def __init__(self, iteration: int, loss: float, elsewhere: bool = False) -> None:
        super().__init__(f"loss {loss} at iteration {iteration}")
        self.iteration = iteration
        self.loss = loss
        self.elsewhere = elsewhere  # another GPU's loss, not this process's


# ----------------------------------------------------------------- options --


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


# ------------------------------------------------------- solver arithmetic --


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
    def of(cls, solver: Message) -> "Settings":
        values = {}
        for name in cls.__dataclass_fields__:
            value = getattr(solver, name)
            values[name] = tuple(value) if name in ("stepvalue", "test_iter") else value
        return cls(**values)


def learning_rate(solver: Message, iteration: int) -> float:
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


def check_solver(solver: Message) -> None:
    """Refuse settings Caffe would abort on in the middle of a run."""
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


def test_due(solver: Message, iteration: int) -> bool:
    """Whether Caffe tests before the update at ``iteration`` (Solver::Step)."""
    interval = solver.test_interval
    return bool(len(solver.test_iter)) and interval > 0 and iteration % interval == 0 and (
        iteration > 0 or solver.test_initialization)


def final_test_due(solver: Message, iteration: int) -> bool:
    """Whether Caffe tests once more after the last update (Solver::Solve)."""
    return bool(len(solver.test_iter)) and solver.test_interval > 0 and iteration % solver.test_interval == 0


def test_passes_before(solver: Message, iteration: int) -> int:
    """Test passes an uninterrupted run has done before the update at ``iteration``."""
    interval = solver.test_interval
    if not len(solver.test_iter) or interval <= 0 or iteration <= 0:
        return 0
    return (iteration - 1) // interval + (1 if solver.test_initialization else 0)


def snapshot_due(solver: Message, iteration: int) -> bool:
    """Whether Caffe snapshots once ``iteration`` updates are done."""
    return solver.snapshot > 0 and iteration % solver.snapshot == 0


def resume_skips(solver: Message, iteration: int) -> Tuple[int, List[int]]:
    """Batches each data layer read before ``iteration``: ``(train net, [each test net])``."""
    passes = test_passes_before(solver, iteration)
    return iteration * solver.iter_size, [passes * count for count in solver.test_iter]


# ------------------------------------------------------------ nets of a solver --


@dataclass(frozen=True)
class NetSpec:
    """A net the solver builds: its (current-format) parameters and net state."""

    net: Message
    phase: str
    stages: Tuple[str, ...]
    level: int
    source: str


def _state(net: Message, rule: Optional[Message], phase: str) -> Tuple[str, Tuple[str, ...], int]:
    stages = list(net.state.stage) + (list(rule.stage) if rule is not None else [])
    level = rule.level if rule is not None and rule.HasField("level") else net.state.level
    return phase, tuple(stages), level


def solver_nets(solver: Message, schema: Schema) -> Tuple[NetSpec, List[NetSpec]]:
    """The train net and the test nets, as Solver::InitTrainNet/InitTestNets pick them."""
    generic = None
    if solver.HasField("net"):
        generic, where = load_net(solver.net, schema), solver.net
    elif solver.HasField("net_param"):
        generic, where = solver.net_param, "net_param"
    if solver.HasField("train_net"):
        train_net, train_where = load_net(solver.train_net, schema), solver.train_net
    elif solver.HasField("train_net_param"):
        train_net, train_where = solver.train_net_param, "train_net_param"
    elif generic is not None:
        train_net, train_where = generic, where
    else:
        raise CaffeFtError("the solver names no net (net, net_param, train_net or train_net_param)")
    train_rule = solver.train_state if solver.HasField("train_state") else None
    train = NetSpec(train_net, *_state(train_net, train_rule, "TRAIN"), train_where)
    tests = [(net, "test_net_param") for net in solver.test_net_param]
    tests += [(load_net(path, schema), path) for path in solver.test_net]
    if generic is not None:
        tests += [(generic, where)] * max(0, len(solver.test_iter) - len(tests))
    if len(solver.test_iter) < len(tests) or (generic is None and len(solver.test_iter) != len(tests)):
        raise CaffeFtError(f"test_iter must be given once per test net ({len(tests)} test nets, "
                           f"{len(solver.test_iter)} test_iter)")
    if len(solver.test_state) and len(solver.test_state) != len(tests):
        raise CaffeFtError("test_state must be given once per test net, or not at all")
    specs = []
    for index, (net, where) in enumerate(tests):
        rule = solver.test_state[index] if len(solver.test_state) else None
        specs.append(NetSpec(net, *_state(net, rule, "TEST"), where))
    return train, specs


def nondeterminism(train: NetSpec) -> List[str]:
    """Why a resumed run may differ from an uninterrupted one (random input, Dropout)."""
    from .shapes import filter_layers

    reasons = []
    for layer in filter_layers(train.net, train.phase, train.level, train.stages):
        where = f"layer '{layer.name}'"
        if layer.type == "Dropout":
            reasons.append(f"{where} is Dropout: its random masks are not in the snapshot")
        elif layer.type == "WindowData":
            reasons.append(f"{where} samples windows at random")
        elif layer.type == "ImageData" and layer.image_data_param.shuffle:
            reasons.append(f"{where} shuffles its list (shuffle: true)")
        elif layer.type == "HDF5Data" and layer.hdf5_data_param.shuffle:
            reasons.append(f"{where} shuffles its files (shuffle: true)")
        elif layer.type == "Python" and not len(layer.bottom):
            reasons.append(f"{where} is a Python data layer whose state is unknown")
        if layer.HasField("transform_param"):
            transform = layer.transform_param
            if transform.mirror:
                reasons.append(f"{where} mirrors at random (mirror: true)")
            if transform.crop_size:
                reasons.append(f"{where} crops at random (crop_size in TRAIN)")
    return reasons


# ------------------------------------------------------------------- the plan --


@dataclass
class Plan:
    """Everything decided before pycaffe is imported."""

    options: TrainOptions
    schema: Schema
    solver: Message  # the user's solver, upgraded
    caffe_solver_path: str  # the copy Caffe reads
    prefix: str  # final snapshot prefix
    staging: Optional[snap.Staging]
    gpus: Tuple[int, ...]  # empty: CPU
    resume: Optional[snap.ResumePoint]
    workdir: str
    notes: List[str] = field(default_factory=list)
    nets: List[NetSpec] = field(default_factory=list)  # the train net, then the test nets
    weights_unchecked: Optional[str] = None  # why --weights could not be checked before Caffe built the nets

    @property
    def metrics_path(self) -> str:
        """The metrics file: --metrics, or one in the work directory when only --plot needs it."""
        return self.options.metrics or os.path.join(self.workdir, "metrics.jsonl")

    def cleanup(self) -> None:
        if self.staging is not None:
            self.staging.remove()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _choose_gpus(options: TrainOptions, solver: Message) -> Tuple[int, ...]:
    from .devices import require_gpu_build, resolve_gpus

    if options.device == "cpu":
        return ()
    if options.device == "solver":
        # As `caffe train`: a GPU only when the file says solver_mode: GPU (the
        # field's default, GPU, does not count).
        if not solver.HasField("solver_mode") or solver.solver_mode != solver.GPU:
            return ()
        gpus: Tuple[int, ...] = (solver.device_id,)
    else:
        gpus = resolve_gpus(options.device)
    require_gpu_build()
    return gpus


InputShapes = Optional[Dict[str, Tuple[int, ...]]]


def check_weights(weights: str, schema: Schema, specs: Sequence[NetSpec], err: IO[str],
                  input_shapes: Sequence[InputShapes] = ()) -> Optional[str]:
    """Refuse (print the report, raise) weights that Caffe would abort on when
    copying them into the nets; None when they fit, or why they could not be
    checked (e.g. an input shape that only the data itself tells)."""
    from .caffemodel import load_model
    from .weights import check, format_check

    model = load_model(weights, schema)
    for index, spec in enumerate(specs):
        shapes = input_shapes[index] if index < len(input_shapes) else None
        try:
            report = check(spec.net, model, spec.phase, input_shapes=shapes, stages=spec.stages, level=spec.level)
        except CaffeFtError as exc:
            return str(exc)
        if not report.ok:
            err.write(format_check(report))
            raise CaffeFtError(f"the weights do not fit the {spec.phase} net ({report.abort}); "
                               "nothing was trained", weights)
    return None


def net_input_shapes(net: Any) -> Dict[str, Tuple[int, ...]]:
    """The shapes pycaffe gave the tops of a built net's bottomless layers."""
    shapes = {}
    for index, name in enumerate(net._layer_names):
        if not len(net._bottom_ids(index)):
            for top in net.top_names[name]:
                shapes[top] = tuple(int(d) for d in net.blobs[top].data.shape)
    return shapes


def prepare(options: TrainOptions, schema: Schema, err: IO[str] = sys.stderr) -> Plan:
    """Read and check everything, write the solver copy Caffe reads; no Caffe needed."""
    from . import io, textformat
    from .upgrade import upgrade_solver

    if options.weights and options.resume:
        raise CaffeFtError("give --weights or --resume, not both (a snapshot has its own weights)")
    parsed = io.load_text(options.solver, schema, io.SOLVER)
    solver = parsed.message
    try:
        upgrade_solver(solver)
        check_solver(solver)
    except CaffeFtError as exc:
        raise exc.located(options.solver) from None
    train, tests = solver_nets(solver, schema)
    gpus = _choose_gpus(options, solver)
    unchecked = check_weights(options.weights, schema, [train, *tests], err) if options.weights else None
    workdir = tempfile.mkdtemp(prefix="caffe-ft-train-")
    try:
        resume = snap.check_resume(options.resume, schema, workdir) if options.resume else None
        notes = []
        if resume is not None:
            notes += [f"resume may differ from an uninterrupted run: {why}" for why in nondeterminism(train)]
            if resume.fixed:
                notes.append(f"{options.resume}: its caffemodel has moved; using {resume.model}")
        prefix = snap.effective_prefix(options.solver, solver.snapshot_prefix)
        binary = solver.snapshot_format == solver.BINARYPROTO
        staging = snap.Staging(prefix) if binary else None
        caffe_solver = type(solver)()
        caffe_solver.CopyFrom(solver)
        caffe_solver.snapshot_prefix = staging.prefix if staging else prefix
        caffe_solver.snapshot = 0
        caffe_solver.display = 0
        if len(solver.test_iter):
            caffe_solver.test_interval = _NO_CAFFE_TESTS
            caffe_solver.test_initialization = False
        path = os.path.join(workdir, "solver.prototxt")
        io.write_atomic(path, textformat.print_message(caffe_solver))
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return Plan(options, schema, solver, path, prefix, staging, gpus, resume, workdir, notes, [train, *tests], unchecked)


# ------------------------------------------------------------------ stopping --


class StopRequest:
    """A stop asked for by a signal (or ``--stop-after``, which goes the same way).

    The first SIGINT/SIGTERM is recorded and the default handler put back, so
    a second one ends the process at once.  ``shared`` is a value set by the
    parent process of a multi-GPU run, whose workers ignore signals.
    """

    def __init__(self, shared: Any = None, say: Callable[[str], None] = lambda text: None) -> None:
        self.signum: Optional[int] = None
        self.shared = shared
        self.say = say
        self._previous: Dict[int, Any] = {}

    def request(self, signum: int, _frame: Any = None) -> None:
        if self.signum is None:
            self.signum = signum
            self.say(f"{signal.Signals(signum).name}: stopping after this iteration "
                     "(again to abort without a snapshot)")
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    @property
    def requested(self) -> Optional[int]:
        if self.signum is None and self.shared is not None and self.shared.value:
            self.signum = int(self.shared.value)
        return self.signum

    def install(self) -> None:
        for number in (signal.SIGINT, signal.SIGTERM):
            self._previous[number] = signal.signal(number, self.request)

    def uninstall(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()


class LocalVote:
    """One process decides alone."""

    def agree(self, iteration: int, diverged: bool, stop: bool) -> Tuple[bool, bool]:
        return diverged, stop


class SharedVote:
    """The ranks of a multi-GPU run agree on stopping at each iteration.

    Each rank writes its two flags into the half of ``slots`` for the
    iteration's parity, waits for every rank at ``barrier``, and reads them
    all; the next iteration writes the other half, so a fast rank never
    overwrites flags a slow one is still reading.
    """

    def __init__(self, rank: int, count: int, barrier: Any, slots: Any) -> None:
        self.rank, self.count, self.barrier, self.slots = rank, count, barrier, slots

    def agree(self, iteration: int, diverged: bool, stop: bool) -> Tuple[bool, bool]:
        base = (iteration % 2) * self.count * 2
        self.slots[base + 2 * self.rank] = int(diverged)
        self.slots[base + 2 * self.rank + 1] = int(stop)
        self.barrier.wait()
        flags = self.slots[base: base + 2 * self.count]
        return any(flags[0::2]), any(flags[1::2])


class Guard:
    """The solver callback: measures each iteration's loss and stops bad updates.

    ``on_gradients_ready`` runs after the forward/backward passes and before
    the update.  The loss is Caffe's: the loss-weighted sum of the net's loss
    blobs, averaged over ``iter_size`` passes (with iter_size > 1 the blobs
    are read after each pass through an ``after_forward`` hook on the last
    layer).
    """

    def __init__(self, solver: Any, iter_size: int, stop: StopRequest, vote: Any,
                 stop_after: Optional[int]) -> None:
        self.solver = solver
        net = solver.net
        weights = net.blob_loss_weights
        self.loss_blobs = [(net.blobs[name], float(weight), net.blobs[name].data.size == 1)
                           for name, weight in weights.items() if weight]
        self.iter_size = iter_size
        self.stop = stop
        self.vote = vote
        self.stop_after = stop_after
        self.loss = 0.0
        self.stop_agreed = False
        self._sum = 0.0
        if iter_size > 1:
            self._last_layer = len(net.layers) - 1
            net.after_forward(self._after_forward)

    def current_loss(self) -> float:
        loss = 0.0
        for blob, weight, scalar in self.loss_blobs:
            loss += weight * (blob.data.item() if scalar else float(blob.data.sum()))
        return loss

    def _after_forward(self, layer: int) -> None:
        if layer == self._last_layer:
            self._sum += self.current_loss()

    def on_start(self) -> None:
        self._sum = 0.0

    def on_gradients_ready(self) -> None:
        iteration = self.solver.iter
        self.loss = self._sum / self.iter_size if self.iter_size > 1 else self.current_loss()
        if self.stop_after is not None and iteration + 1 >= self.stop_after and self.stop.requested is None:
            self.stop.request(signal.SIGINT)
        diverged, self.stop_agreed = self.vote.agree(iteration, not math.isfinite(self.loss),
                                                     self.stop.requested is not None)
        if diverged:
            local = not math.isfinite(self.loss)
            raise NonFiniteLoss(iteration, self.loss if local else math.nan, elsewhere=not local)


# ---------------------------------------------------------------- the worker --


def import_caffe(show_log: bool) -> Any:
    """pycaffe, imported with Caffe's INFO logging off unless asked for."""
    if not show_log:
        os.environ.setdefault("GLOG_minloglevel", "1")
    try:
        import caffe
    except ImportError as exc:
        raise CaffeFtError(f"cannot import pycaffe ({exc}); Debian: apt install python3-caffe") from None
    return caffe


def data_layers(net: Any) -> List[int]:
    """Indices of the layers that read input: no bottoms, and not a mere Input/Parameter."""
    return [index for index, layer in enumerate(net.layers)
            if not len(net._bottom_ids(index)) and layer.type not in _NOT_SOURCES]


def advance_data(net: Any, batches: int) -> None:
    """Make each data layer of ``net`` read and drop ``batches`` batches."""
    for index in data_layers(net):
        for _ in range(batches):
            net._forward(index, index)


def run_test(solver: Any, index: int, count: int, abort: Callable[[], bool]) -> Optional[Dict[str, Output]]:
    """One test pass of test net ``index``: outputs summed over ``count`` batches
    in float32 and divided by ``count``, as Solver::Test does; None when aborted."""
    net = solver.test_nets[index]
    net.share_with(solver.net)
    names = list(net.outputs)
    blobs = [net.blobs[name] for name in names]
    last = len(net.layers) - 1
    sums: Optional[List[Any]] = None
    for _ in range(count):
        if abort():
            return None
        net._forward(0, last)
        if sums is None:
            sums = [np.array(blob.data, dtype=np.float32, copy=True) for blob in blobs]
        else:
            for total, blob in zip(sums, blobs):
                total += blob.data
    return summarize_outputs(names, sums or [], max(count, 1))


@dataclass
class WorkerContext:
    """Where one training process runs and how it talks to the others."""

    rank: int = 0
    gpus: Tuple[int, ...] = ()
    vote: Any = field(default_factory=LocalVote)
    stop: Optional[StopRequest] = None
    nccl_uid: Any = None
    out: IO[str] = field(default_factory=lambda: sys.stderr)

    @property
    def root(self) -> bool:
        return self.rank == 0

    @property
    def multi(self) -> bool:
        return len(self.gpus) > 1


def _select_device(caffe: Any, ctx: WorkerContext) -> None:
    if not ctx.gpus:
        caffe.set_mode_cpu()
        return
    caffe.set_device(ctx.gpus[ctx.rank])
    caffe.set_mode_gpu()
    if ctx.multi:
        caffe.set_solver_count(len(ctx.gpus))
        caffe.set_solver_rank(ctx.rank)
        caffe.set_multiprocess(True)


class _Run:
    """One process's training loop (the only one, or one rank of several)."""

    def __init__(self, plan: Plan, ctx: WorkerContext, caffe: Any) -> None:
        self.plan, self.ctx, self.caffe = plan, ctx, caffe
        self.param = Settings.of(plan.solver)
        self.stop = ctx.stop or StopRequest()
        self.metrics: Optional[MetricsWriter] = None
        self.reporter: Optional[Reporter] = None
        self.tests: List[Dict[str, Output]] = []
        self.snapshots: Optional[snap.Snapshotter] = None

    def say(self, text: str) -> None:
        if self.reporter is not None:
            self.reporter.message(text)
        else:
            self.ctx.out.write(text + "\n")
            self.ctx.out.flush()

    # -- setup --

    def build(self) -> Any:
        caffe, plan = self.caffe, self.plan
        _select_device(caffe, self.ctx)
        solver = caffe.get_solver(plan.caffe_solver_path)
        if plan.resume is not None:
            solver.restore(plan.resume.state)
            self._advance(solver, solver.iter)
        elif plan.options.weights:
            if plan.weights_unchecked is not None:
                self._check_built(solver)
            solver.net.copy_from(plan.options.weights)
            for net in solver.test_nets:
                net.copy_from(plan.options.weights)
        if self.ctx.multi:
            nccl = caffe.NCCL(solver, self.ctx.nccl_uid)
            nccl.bcast()
        self.guard = Guard(solver, self.param.iter_size, self.stop, self.ctx.vote, plan.options.stop_after)
        solver.add_callback(self.guard.on_start, self.guard.on_gradients_ready)
        if self.ctx.multi:
            solver.add_callback(nccl)
            if self.param.layer_wise_reduce:
                solver.net.after_backward(nccl)
        return solver

    def _check_built(self, solver: Any) -> None:
        """The weights check, again, with the input shapes the built nets have."""
        nets = [solver.net, *solver.test_nets]
        why = check_weights(self.plan.options.weights, self.plan.schema, self.plan.nets[:len(nets)],  # type: ignore
                            self.ctx.out, [net_input_shapes(net) for net in nets])
        if why is not None and self.ctx.root:
            self.say(f"note: the weights could not be checked ({why}); Caffe checks them as it copies")

    def _advance(self, solver: Any, iteration: int) -> None:
        train_batches, test_batches = resume_skips(self.param, iteration)
        if train_batches or any(test_batches):
            self.say(f"resume at iteration {iteration}: skipping the {train_batches} batches the train net "
                     "had read" + (f" and {sum(test_batches)} test batches" if any(test_batches) else ""))
        advance_data(solver.net, train_batches)
        if self.ctx.root:  # only the root solver tests
            for net, batches in zip(solver.test_nets, test_batches):
                advance_data(net, batches)

    # -- the loop --

    def test_all(self, solver: Any, iteration: int, abortable: bool) -> bool:
        """Every test net once; False when a stop request cut a pass short."""
        abort = (lambda: self.stop.requested is not None) if abortable else (lambda: False)
        for index, count in enumerate(self.param.test_iter):
            outputs = run_test(solver, index, count, abort)
            if outputs is None:
                self.say(f"iter {iteration}  test #{index}: interrupted")
                return False
            self.tests.append(outputs)
            if self.reporter is not None:
                self.reporter.test(iteration, index, outputs)
            if self.metrics is not None:
                self.metrics.test(iteration, index, outputs)
        return True

    def loop(self, solver: Any) -> Tuple[str, int, Optional[NonFiniteLoss]]:
        """Train until max_iter, a stop, or divergence: ``(status, iteration, divergence)``."""
        param, root, snapshots = self.param, self.ctx.root, self.snapshots
        max_iter = param.max_iter
        while solver.iter < max_iter:
            iteration = solver.iter
            if root and test_due(param, iteration):
                if not self.test_all(solver, iteration, abortable=not self.ctx.multi):
                    return "interrupted", iteration, None
            try:
                solver.step(1)
            except NonFiniteLoss as exc:
                return "diverged", iteration, exc
            if root:
                lr = learning_rate(param, iteration)
                loss = self.guard.loss
                if self.metrics is not None:
                    self.metrics.train(iteration, loss, lr)
                if self.reporter is not None:
                    self.reporter.train(iteration, loss, lr)
                assert snapshots is not None
                snapshots.confirm(iteration)
                if snapshot_due(param, solver.iter):
                    snapshots.save(solver.iter)
                else:
                    snapshots.checkpoint(solver.iter)
            stop = self.guard.stop_agreed if self.ctx.multi else self.stop.requested is not None
            if stop and solver.iter < max_iter:
                return "interrupted", solver.iter, None
        if root and final_test_due(param, solver.iter):
            self.test_all(solver, solver.iter, abortable=False)
        return "done", solver.iter, None

    def run(self) -> TrainResult:
        plan, root = self.plan, self.ctx.root
        solver = self.build()
        start = solver.iter
        if root:
            self.snapshots = snap.Snapshotter(solver.snapshot, plan.prefix, plan.staging)
            if plan.resume is not None:
                self.snapshots.known(start, (plan.resume.model, plan.options.resume or plan.resume.state))
            else:
                self.snapshots.checkpoint(start)
            if plan.options.metrics or plan.options.plot:
                self.metrics = MetricsWriter(plan.metrics_path, resume_at=start if plan.resume else None)
            self.reporter = make_reporter(self.ctx.out, start, self.param.max_iter, self.param.display,
                                          self.param.average_loss, plan.options.bar)
        began = time.monotonic()
        try:
            status, iteration, divergence = self.loop(solver)
        finally:
            if self.reporter is not None:
                self.reporter.close()
                self.reporter = None
            if self.metrics is not None:
                self.metrics.close()
        if not root:
            return TrainResult(status, iteration, 0)
        return self._finish(solver, status, iteration, divergence, time.monotonic() - began, start)

    def _finish(self, solver: Any, status: str, iteration: int, divergence: Optional[NonFiniteLoss],
                seconds: float, start: int) -> TrainResult:
        options, param, snapshots = self.plan.options, self.param, self.snapshots
        assert snapshots is not None
        if status == "diverged":
            assert divergence is not None
            return self._diverged(divergence, snapshots)
        if status == "interrupted":
            paths = snapshots.save(iteration) if options.snapshot_on_exit else snapshots.latest
            signum = self.stop.requested or signal.SIGINT
            command = resume_command(options, paths[1]) if paths else None
            message = f"stopped at iteration {iteration}" + (f"; snapshot {paths[0]}" if paths else
                                                             "; no snapshot written (--no-snapshot-on-exit)")
            return TrainResult(status, iteration, EXIT_SIGNAL_BASE + signum, paths, command, message, self.tests)
        paths = snapshots.save(iteration) if param.snapshot_after_train else snapshots.latest
        done = iteration - start
        rate = f" ({done / seconds:.3g} it/s)" if seconds > 0 and done else ""
        message = f"trained to iteration {iteration}{rate}" + (f"; model {paths[0]}" if paths else "")
        return TrainResult(status, iteration, 0, paths, None, message, self.tests)


    def _diverged(self, divergence: NonFiniteLoss, snapshots: snap.Snapshotter) -> TrainResult:
        options, param, iteration = self.plan.options, self.param, divergence.iteration
        lr = learning_rate(param, iteration)
        where = " on another GPU" if divergence.elsewhere else ""
        message = (f"the loss became {divergence.loss}{where} at iteration {iteration} (learning rate {lr:g}): "
                   f"training diverged; lower base_lr (now {param.base_lr:g}; try {param.base_lr / 10:g})")
        good = snapshots.last_good(iteration)
        if good is None:
            return TrainResult("diverged", iteration, 2, None, None, message + "; no earlier state was saved",
                               self.tests)
        at, paths = good
        message += f" and resume from the last good state (iteration {at}): {paths[1]}"
        return TrainResult("diverged", iteration, 2, paths, resume_command(options, paths[1]), message, self.tests)


def resume_command(options: TrainOptions, state: str) -> str:
    """The shell command that continues this run from ``state``."""
    words = ["caffe-ft"]
    if options.proto:
        words += ["--proto", options.proto]
    words += ["train", options.solver, "--resume", state]
    if options.device == "cpu":
        words.append("--cpu")
    elif options.device != "solver":
        words += ["--gpu", options.device]
    if options.metrics:
        words += ["--metrics", options.metrics]
    if options.plot:
        words += ["--plot", options.plot]
    if not options.snapshot_on_exit:
        words.append("--no-snapshot-on-exit")
    if options.caffe_log:
        words.append("--caffe-log")
    return " ".join(shlex.quote(word) for word in words)


# ------------------------------------------------------------ multi-GPU runs --


def _worker_main(plan: Plan, gpus: Tuple[int, ...], rank: int, uid: Any, barrier: Any, slots: Any,
                 shared_stop: Any, results: Any) -> None:
    """One GPU's process: ignores signals (the parent forwards them), trains, reports."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        caffe = import_caffe(plan.options.caffe_log)
        ctx = WorkerContext(rank, gpus, SharedVote(rank, len(gpus), barrier, slots), StopRequest(shared_stop),
                            uid)
        result = _Run(plan, ctx, caffe).run()
    except CaffeFtError as exc:
        result = TrainResult("failed", -1, 2, message=str(exc))
    if rank == 0:
        results.send(result)


def _run_multi(plan: Plan, caffe: Any, out: IO[str]) -> TrainResult:
    """One process per GPU, as Caffe's python/train.py runs them; the parent
    only forwards signals, watches for a rank that dies, and collects rank 0's result."""
    import multiprocessing
    from multiprocessing.connection import wait

    has_nccl = getattr(caffe, "has_nccl", None)
    if not hasattr(caffe, "NCCL") or (has_nccl is not None and not has_nccl()):
        raise CaffeFtError("this Caffe was built without NCCL (USE_NCCL), which training on several GPUs needs; "
                           "pick one GPU with --gpu N")
    gpus = plan.gpus
    uid = caffe.NCCL.new_uid()
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(len(gpus))
    slots = context.Array("b", 4 * len(gpus), lock=False)
    shared_stop = context.Value("i", 0, lock=False)
    reader, writer = context.Pipe(duplex=False)
    stop = StopRequest(say=lambda text: (out.write(text + "\n"), out.flush()))

    def forward(signum: int, frame: Any) -> None:
        stop.request(signum, frame)
        shared_stop.value = signum

    previous = {number: signal.signal(number, forward) for number in (signal.SIGINT, signal.SIGTERM)}
    procs = [context.Process(target=_worker_main, daemon=True,
                             args=(plan, gpus, rank, uid, barrier, slots, shared_stop, writer))
             for rank in range(len(gpus))]
    result: Optional[TrainResult] = None
    try:
        for proc in procs:
            proc.start()
        writer.close()
        pending = {proc.sentinel: proc for proc in procs}
        while pending:
            for ready in wait([*pending, reader] if result is None else list(pending)):
                if ready is reader:
                    result = reader.recv()
                    continue
                proc = pending.pop(ready)  # type: ignore[call-overload]
                proc.join()
                if proc.exitcode != 0:
                    barrier.abort()
                    for other in pending.values():
                        other.terminate()
                    raise CaffeFtError(f"the training process of GPU {gpus[procs.index(proc)]} "
                                       f"died (exit status {proc.exitcode})")
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if result is None:
        raise CaffeFtError("the training process of the first GPU ended without a result")
    if result.status == "failed":
        raise CaffeFtError(result.message)
    return result


# ------------------------------------------------------------------ the entry --


def describe(plan: Plan) -> str:
    """The run in one line: solver, device, start, snapshots."""
    device = "CPU" if not plan.gpus else ("GPU " if len(plan.gpus) == 1 else "GPUs ") + ",".join(map(str, plan.gpus))
    start = f"resuming at iteration {plan.resume.iteration}" if plan.resume and plan.resume.iteration >= 0 else (
        f"from {plan.options.weights}" if plan.options.weights else "from the fillers")
    return (f"train {plan.options.solver} on {device}, {start}, to iteration {plan.solver.max_iter}; "
            f"snapshots {plan.prefix}_iter_N")


def train(options: TrainOptions, schema: Schema, out: IO[str] = sys.stderr) -> TrainResult:
    """Run the solver as ``options`` say; returns how it ended (the CLI exits with ``exit_code``)."""
    plan = prepare(options, schema, out)
    try:
        out.write(describe(plan) + "\n")
        for note in plan.notes:
            out.write(f"note: {note}\n")
        out.flush()
        caffe = import_caffe(options.caffe_log)
        if len(plan.gpus) > 1:
            result = _run_multi(plan, caffe, out)
        else:
            stop = StopRequest()
            run = _Run(plan, WorkerContext(0, plan.gpus, LocalVote(), stop, out=out), caffe)
            stop.say = run.say
            stop.install()
            try:
                result = run.run()
            finally:
                stop.uninstall()
        if options.plot:
            _plot(plan.metrics_path, options.plot, out)
    finally:
        plan.cleanup()
    return result


def _plot(metrics: str, png: str, out: IO[str]) -> None:
    """Draw the run's loss and test outputs; a plotting problem never fails the run."""
    from .plot import plot_file

    try:
        plot_file(metrics, png)
    except CaffeFtError as exc:
        out.write(f"note: no plot: {exc}\n")
        return
    out.write(f"plot: {png}\n")
