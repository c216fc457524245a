"""The pycaffe engine: run a Caffe solver through pycaffe, safely and resumably.

What Caffe's own ``caffe train`` does, plus what long fine-tuning runs need:

* **Checked start.** ``--weights`` are checked against the nets first
  (:func:`caffe_ft.net.weights.check`); a shape mismatch, which would abort Caffe,
  stops the run before it starts, with the report (when a data layer does
  not tell its image size, the check runs once Caffe has built the nets, on
  their actual shapes, still before the copy).  Asking for a GPU from a
  CPU-only Caffe is explained instead of aborting (:mod:`caffe_ft.training.devices`).
* **The loop in Python.** The solver runs one iteration per ``solver.step(1)``.
  Test phases are run here, at Caffe's iterations (every ``test_interval``, at
  0 unless ``test_initialization: false``, and after the last iteration),
  with each output averaged over ``test_iter`` batches as Caffe averages it;
  Caffe is handed a copy of the solver whose own testing, display and
  snapshots are turned off.  Snapshots go through :mod:`caffe_ft.training.snapshots`,
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
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, cast

import numpy as np
from google.protobuf.message import Message

from ..errors import CaffeFtError
from ..formats.schema import Schema
from . import best as keep
from . import snapshots as snap
from .nets import NetSpec, check_data, check_weights, nondeterminism, solver_nets
from .plot import plot_quietly
from .progress import MetricsWriter, Output, Reporter, make_reporter, summarize_outputs
from .run import TrainOptions, TrainResult, ended_run, resume_command
from .schedule import (
    Settings,
    check_solver,
    final_test_due,
    learning_rate,
    resume_skips,
    snapshot_due,
    test_due,
)
from .stop import LocalVote, NonFiniteLoss, SharedVote, StopRequest, diverged_message

#: What Caffe is told instead of the real test_interval: testing is done here.
_NO_CAFFE_TESTS = 2 ** 31 - 1
#: Layer types that read no data although they have no bottoms.
_NOT_SOURCES = frozenset({"Input", "Parameter"})


# ------------------------------------------------------------------- the plan --


@dataclass
class RunPlan:
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


def net_input_shapes(net: Any) -> Dict[str, Tuple[int, ...]]:
    """The shapes pycaffe gave the tops of a built net's bottomless layers."""
    shapes = {}
    for index, name in enumerate(net._layer_names):
        if not len(net._bottom_ids(index)):
            for top in net.top_names[name]:
                shapes[top] = tuple(int(d) for d in net.blobs[top].data.shape)
    return shapes


def prepare(options: TrainOptions, schema: Schema, err: IO[str] = sys.stderr) -> RunPlan:
    """Read and check everything, write the solver copy Caffe reads; no Caffe needed."""
    from ..formats import files, prototext
    from ..formats.upgrade import upgrade_solver

    if options.weights and options.resume:
        raise CaffeFtError("give --weights or --resume, not both (a snapshot has its own weights)")
    parsed = files.load_text(options.solver, schema, files.SOLVER)
    solver = parsed.message
    try:
        upgrade_solver(solver)
        check_solver(solver)
    except CaffeFtError as exc:
        raise exc.located(options.solver) from None
    train, tests = solver_nets(solver, schema)
    if not options.data_checked:
        check_data([train, *tests])  # the data Caffe would abort on (or train on garbage from), before it starts
    gpus = _choose_gpus(options, solver)
    keep.tracker(options.keep_best, options.patience)  # the options make sense, before anything starts
    if options.patience is not None and len(gpus) > 1:
        raise CaffeFtError("--patience stops one process; with several GPUs use the torch engine or one GPU")
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
        files.write_atomic(path, prototext.print_message(caffe_solver))
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise
    return RunPlan(options, schema, solver, path, prefix, staging, gpus, resume, workdir, notes, [train, *tests], unchecked)


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


def source_layers(net: Any) -> List[int]:
    """Indices of the layers that read input: no bottoms, and not a mere Input/Parameter."""
    return [index for index, layer in enumerate(net.layers)
            if not len(net._bottom_ids(index)) and layer.type not in _NOT_SOURCES]


def advance_data(net: Any, batches: int) -> None:
    """Make each data layer of ``net`` read and drop ``batches`` batches."""
    for index in source_layers(net):
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

    def __init__(self, plan: RunPlan, ctx: WorkerContext, caffe: Any) -> None:
        self.plan, self.ctx, self.caffe = plan, ctx, caffe
        self.param = Settings.of(plan.solver)
        self.stop = ctx.stop or StopRequest()
        self.metrics: Optional[MetricsWriter] = None
        self.reporter: Optional[Reporter] = None
        self.tests: List[Dict[str, Output]] = []
        self.snapshots: Optional[snap.Snapshotter] = None
        options = plan.options
        self.best = keep.KeepBest.of(options.keep_best, options.patience, options.best_model, plan.prefix, ctx.root)

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
        return keep.record_tests(self, iteration, self.param.test_iter,
                                 lambda index, count, abort: run_test(solver, index, count, abort),
                                 lambda path: solver.net.save(path), abortable)

    def loop(self, solver: Any) -> Tuple[str, int, Optional[NonFiniteLoss]]:
        """Train until max_iter, a stop, or divergence: ``(status, iteration, divergence)``."""
        param, root, snapshots = self.param, self.ctx.root, self.snapshots
        max_iter = param.max_iter
        while solver.iter < max_iter:
            iteration = solver.iter
            if root and test_due(param, iteration):
                if not self.test_all(solver, iteration, abortable=not self.ctx.multi):
                    return "interrupted", iteration, None
                if self.best.stop:
                    return "done", iteration, None
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
        self.best.check(list(solver.test_nets[0].outputs) if solver.test_nets else [])
        if root:
            # weights plus up to two history blobs each (Adam), float32
            params = getattr(solver.net, "params", {})
            size = 12 * sum(blob.data.size for blobs in params.values() for blob in blobs)
            self.snapshots = snap.Snapshotter(solver.snapshot, plan.prefix, plan.staging, estimate=size)
            if plan.resume is not None:
                self.snapshots.known(start, (plan.resume.model, plan.options.resume or plan.resume.state))
            else:
                self.snapshots.checkpoint(start)
            if plan.options.metrics or plan.options.plot:
                self.metrics = MetricsWriter(plan.metrics_path, resume_at=start if plan.resume else None)
            if plan.resume is not None:
                carried = self.best.carry_over(plan.options.metrics, start)
                if carried is not None:
                    self.ctx.out.write(carried + "\n")
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
        result = self._finish(solver, status, iteration, divergence, time.monotonic() - began, start)
        self.best.report(result)
        return result

    def _finish(self, solver: Any, status: str, iteration: int, divergence: Optional[NonFiniteLoss],
                seconds: float, start: int) -> TrainResult:
        options, param, snapshots = self.plan.options, self.param, self.snapshots
        assert snapshots is not None
        if status == "diverged":
            assert divergence is not None
            return self._diverged(divergence, snapshots)
        return ended_run(options, snapshots, status, iteration, signum=self.stop.requested or signal.SIGINT,
                         snapshot_after_train=param.snapshot_after_train, done=iteration - start, seconds=seconds,
                         tests=self.tests)


    def _diverged(self, divergence: NonFiniteLoss, snapshots: snap.Snapshotter) -> TrainResult:
        options, param, iteration = self.plan.options, self.param, divergence.iteration
        lr = learning_rate(param, iteration)
        where = " on another GPU" if divergence.elsewhere else ""
        message = diverged_message(divergence.loss, iteration, param.base_lr, lr, where)
        good = snapshots.last_good(iteration)
        if good is None:
            return TrainResult("diverged", iteration, 2, None, None, message + "; no earlier state was saved",
                               self.tests)
        at, paths = good
        message += f" and resume from the last good state (iteration {at}): {paths[1]}"
        return TrainResult("diverged", iteration, 2, paths, resume_command(options, paths[1]), message, self.tests)


# ------------------------------------------------------------ multi-GPU runs --


def _worker_main(plan: RunPlan, gpus: Tuple[int, ...], rank: int, uid: Any, barrier: Any, slots: Any,
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


def _run_multi(plan: RunPlan, caffe: Any, out: IO[str]) -> TrainResult:
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
    def say(text: str) -> None:
        out.write(text + "\n")
        out.flush()

    stop = StopRequest(say=say)

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
                proc = pending.pop(cast(int, ready))
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


def describe(plan: RunPlan) -> str:
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
            if plot_quietly(plan.metrics_path, options.plot, out):
                out.write(f"plot: {options.plot}\n")
    finally:
        plan.cleanup()
    return result


def quiet_caffe() -> Any:
    """pycaffe, imported with Caffe's INFO logging off, in CPU mode."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    try:
        import caffe
    except ImportError:
        raise CaffeFtError("computing features needs pycaffe (run inside the Caffe environment)") from None
    caffe.set_mode_cpu()
    return caffe


def load_caffe_net(text: str, weights: str) -> Any:
    """A pycaffe TEST net from prototxt text and a weights file."""
    caffe = quiet_caffe()
    with tempfile.NamedTemporaryFile("w", suffix=".prototxt", delete=False) as handle:
        handle.write(text)
    try:
        return caffe.Net(handle.name, weights, caffe.TEST)
    finally:
        os.unlink(handle.name)


def forward_batches(
    net: Any, input_blob: str, batches: Iterator[Tuple["np.ndarray", "np.ndarray", List[str]]],
    blobs: Sequence[str], advance: Callable[[int], None],
) -> Iterator[Tuple[Dict[str, "np.ndarray"], "np.ndarray", List[str]]]:
    """For each batch fed to ``input_blob``: copies of ``blobs`` after a forward pass, labels and names."""
    inputs = net.blobs[input_blob]
    for data, labels, names in batches:
        if inputs.data.shape != data.shape:
            inputs.reshape(*data.shape)
            net.reshape()
        inputs.data[...] = data
        net.forward()
        yield {name: net.blobs[name].data.copy() for name in blobs}, labels, names
        advance(len(names))
