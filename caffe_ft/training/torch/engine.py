"""The torch engine's training loop: a Caffe solver file run on PyTorch.

The same run as :mod:`caffe_ft.training.pycaffe` gives, without Caffe:
test passes at Caffe's iterations (averaged over ``test_iter`` batches),
progress and metrics through :mod:`caffe_ft.training.progress`, snapshots in
Caffe's own ``.caffemodel`` + ``.solverstate`` format committed through
:mod:`caffe_ft.training.snapshots` (never half-written; a torch snapshot
resumes in ``caffe train`` and a Caffe one here), Ctrl-C finishing the
iteration and snapshotting, a nan/inf loss caught before its update.

:class:`Trainer` is the library core (nets, solver, one iteration, tests,
snapshots); :func:`train` is what ``caffe-ft train --engine torch`` calls.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import sys
import tempfile
import time
from contextlib import nullcontext
from typing import IO, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from google.protobuf.message import Message

from ...errors import CaffeFtError
from ...formats.caffemodel import Blob, Model, SolverState, load_model, load_solverstate, save_model, save_solverstate
from ...formats.schema import Schema
from .. import best as keep
from .. import snapshots as snap
from ..nets import NetSpec, check_data, check_weights, solver_nets
from ..progress import MetricsWriter, Output, Reporter, make_reporter, summarize_outputs
from ..run import EXIT_SIGNAL_BASE, TrainOptions, TrainResult, ended_run, resume_command
from ..schedule import Settings, check_solver, final_test_due, learning_rate, resume_skips, snapshot_due, test_due
from ..stop import StopRequest, diverged_message
from .data import input_shapes
from .feed import Feed, NetFeeder, default_workers
from .net import CaffeNet
from .solver import CaffeSolver, current_step

PRECISIONS = ("fp32", "tf32", "bf16")


def _device(options: TrainOptions, solver: Message) -> torch.device:
    """CPU, or the CUDA device asked for (``--gpu N``, or the solver's GPU mode)."""
    if options.device == "cpu":
        return torch.device("cpu")
    if options.device == "solver":
        if not solver.HasField("solver_mode") or solver.solver_mode != solver.GPU:
            return torch.device("cpu")
        index = solver.device_id
    else:
        first = options.device.split(",")[0]
        index = 0 if first == "all" else int(first)
        if "," in options.device or first == "all":
            raise CaffeFtError("the torch engine trains on one GPU per process; run several under torchrun "
                               "(not yet supported) or pick one with --gpu N")
    if not torch.cuda.is_available():
        raise CaffeFtError(f"GPU {index} asked for, but this PyTorch sees no CUDA device; use --cpu")
    return torch.device("cuda", index)


class Trainer:
    """A solver's train and test nets on torch, one iteration at a time.

    ``channels_last``: the memory format of 4-D inputs (and so of what the
    convolutions make); ``None`` picks channels-last on the CPU, contiguous on
    a GPU.

    ``feeds`` gives the Input tops of each net (train first, then the test
    nets) for callers that hold the data themselves (tests, the library);
    data layers (ImageData) read their own: in ``data_workers`` worker
    processes per net, or with 0 in this one (a thread reading one batch
    ahead).  :meth:`close` stops the workers.
    """

    def __init__(self, solver: Message, schema: Schema, train: NetSpec, tests: Sequence[NetSpec],
                 device: Optional[torch.device] = None, feeds: Sequence[Optional[Feed]] = (),
                 precision: str = "fp32", channels_last: Optional[bool] = None, rank: int = 0,
                 world: int = 1, data_workers: int = 0) -> None:
        if precision not in PRECISIONS:
            raise CaffeFtError(f"unknown precision '{precision}' ({', '.join(PRECISIONS)})")
        self.param = solver
        self.settings = Settings.of(solver)
        self.schema = schema
        self.device = device or torch.device("cpu")
        self.precision = precision
        # Channels-last unless told: faster on the CPU (oneDNN's native layout; ResNet-50 1.05-1.2x, CaffeNet
        # even), opt-in on GPUs, where it pays with bf16 or TF32 only.
        self.channels_last = self.device.type == "cpu" if channels_last is None else channels_last
        self.rank, self.world = rank, world
        self.data_workers = data_workers
        feeds = list(feeds) + [None] * (1 + len(tests) - len(feeds))
        self.net, self.feeder = self._build(train, None, feeds[0])
        built = [self._build(spec, self.net, feed) for spec, feed in zip(tests, feeds[1:])]
        self.test_nets = [net for net, _ in built]
        self.test_feeders = [feeder for _, feeder in built]
        self.solver = CaffeSolver(solver, self.net.learnable)
        self.specs = [train, *tests]
        self.loss = math.nan
        if self.device.type == "cuda":
            allow = precision == "tf32"
            torch.backends.cuda.matmul.allow_tf32 = allow
            torch.backends.cudnn.allow_tf32 = allow

    def _build(self, spec: NetSpec, share: Optional[CaffeNet], feed: Optional[Feed]) -> Tuple[CaffeNet, NetFeeder]:
        from ...net.shapes import filter_layers
        from .net import check_supported

        layers = filter_layers(spec.net, spec.phase, spec.level, spec.stages)
        check_supported(layers)
        sources = [layer for layer in layers if not len(layer.bottom) and layer.type != "Parameter"]
        # Only the train net's data is split between processes; the first one alone tests.
        shard = (self.rank, self.world) if share is None else (0, 1)
        # The data layers read ahead (in worker processes, or a thread) while the net computes.
        feeder = NetFeeder(sources, self.schema, spec.phase, feed, 0, *shard, prefetch=True,
                           workers=self.data_workers)
        shapes = input_shapes(sources, self.schema, spec.phase)
        net = CaffeNet(spec.net, spec.phase, spec.stages, spec.level, input_shapes=shapes or None, share_from=share)
        net.to(self.device)
        return net, feeder

    @property
    def iter(self) -> int:
        return self.solver.iter

    def close(self) -> None:
        """Stop the nets' data workers (and read-ahead threads)."""
        for feeder in [self.feeder, *self.test_feeders]:
            feeder.close()

    def _inputs(self, feeder: NetFeeder) -> Dict[str, torch.Tensor]:
        arrays = feeder.next()
        tensors = {}
        for name, array in arrays.items():
            tensor = torch.as_tensor(np.asarray(array, np.float32), device=self.device)
            if self.channels_last and tensor.dim() == 4:
                tensor = tensor.contiguous(memory_format=torch.channels_last)
            tensors[name] = tensor
        return tensors

    def _autocast(self) -> Any:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def forward_backward(self) -> float:
        """Clear the gradients, run ``iter_size`` passes and accumulate; the mean loss."""
        for spec in self.net.learnable:
            spec.param.grad = None
        total = 0.0
        for _ in range(self.settings.iter_size):
            with self._autocast():
                self.net(self._inputs(self.feeder))
            loss = self.net.loss
            if loss is None:
                continue
            if loss.requires_grad:
                loss.float().backward()
            total += float(loss.detach())
        self.loss = total / self.settings.iter_size
        if self.world > 1:
            self._all_reduce()
        return self.loss

    def _all_reduce(self) -> None:
        """Average the gradients and the loss over the processes, as Caffe's NCCL
        solvers do (sum, then scale by 1 / solver_count)."""
        import torch.distributed as dist

        for spec in self.net.learnable:
            grad = spec.param.grad
            if grad is not None:
                dist.all_reduce(grad)
                grad.div_(self.world)
        loss = torch.tensor([self.loss], dtype=torch.float64, device=self.device)
        dist.all_reduce(loss)
        self.loss = float(loss[0]) / self.world

    def agree(self, flag: bool) -> bool:
        """Whether any process says ``flag`` (all of them learn it, so they stop together)."""
        if self.world == 1:
            return flag
        import torch.distributed as dist

        value = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value[0])

    def broadcast(self) -> None:
        """Every process starts from the first one's blobs."""
        if self.world == 1:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for params in self.net.blobs_of.values():
                for param in params:
                    dist.broadcast(param.data, 0)

    def apply_update(self) -> float:
        return self.solver.apply_update()

    def step(self) -> float:
        """One whole iteration: forward/backward, update; returns the loss."""
        loss = self.forward_backward()
        self.apply_update()
        return loss

    def test(self, index: int, count: int, abort: Any = lambda: False) -> Optional[Dict[str, Output]]:
        """One test pass: each output summed over ``count`` batches and averaged, as Solver::Test."""
        net = self.test_nets[index]
        sums: Optional[List[np.ndarray]] = None
        names = list(net.output_names)
        with torch.inference_mode():
            for _ in range(count):
                if abort():
                    return None
                with self._autocast():
                    blobs = net(self._inputs(self.test_feeders[index]))
                values = [blobs[name].float().cpu().numpy().astype(np.float32) for name in names]
                sums = values if sums is None else [s + v for s, v in zip(sums, values)]
        return summarize_outputs(names, sums or [], max(count, 1))

    # -- weights and snapshots
    def copy_from(self, path: str) -> None:
        """Weights from a caffemodel, by layer name (shared with the test nets)."""
        model = load_model(path, self.schema)
        self.net.load_blobs({name: blobs for name, blobs in model.layer_blobs().items()})

    def model(self) -> Model:
        """The train net with its blobs, as Caffe's snapshot writes it."""
        net = self.schema.new("NetParameter")
        source = self.specs[0].net
        if source.name:
            net.name = source.name
        arrays = self.net.blob_arrays()
        blobs = []
        for layer in self.net.layer_params:
            copy = net.layer.add()
            copy.CopyFrom(layer)
            del copy.blobs[:]
            if not copy.HasField("phase"):
                copy.phase = 0 if self.specs[0].phase == "TRAIN" else 1  # caffe.Phase
            blobs.append([Blob.of(array) for array in arrays.get(layer.name, [])])
        return Model(net, blobs)

    def save(self, model_path: str, state_path: str, learned_net: Optional[str] = None) -> None:
        """Write the caffemodel and the solverstate (history blobs in Caffe's order)."""
        save_model(self.model(), model_path)
        state = self.schema.new("SolverState")
        state.iter = self.iter
        state.learned_net = learned_net or model_path
        state.current_step = current_step(self.param, max(0, self.iter - 1))
        save_solverstate(SolverState(state, [Blob.of(h) for h in self.solver.history_arrays()]), state_path)

    def restore(self, state_path: str, model_path: Optional[str] = None) -> None:
        """Resume from a solverstate (Caffe's or ours) and its caffemodel."""
        state = load_solverstate(state_path, self.schema)
        self.copy_from(model_path or state.state.learned_net)
        self.solver.restore(int(state.state.iter), [blob.data for blob in state.history])


# ------------------------------------------------------------------ the run --


def _prepare(options: TrainOptions, schema: Schema, err: IO[str]) -> Tuple[Message, NetSpec, List[NetSpec]]:
    from ...formats import files
    from ...formats.upgrade import upgrade_solver

    if options.weights and options.resume:
        raise CaffeFtError("give --weights or --resume, not both (a snapshot has its own weights)")
    solver = files.load_text(options.solver, schema, files.SOLVER).message
    try:
        upgrade_solver(solver)
        check_solver(solver)
    except CaffeFtError as exc:
        raise exc.located(options.solver) from None
    if solver.snapshot_format != solver.BINARYPROTO:
        raise CaffeFtError("the torch engine writes binary snapshots only; set snapshot_format: BINARYPROTO",
                           options.solver)
    train, tests = solver_nets(solver, schema)
    if not options.data_checked:
        check_data([train, *tests])  # the lists, images and labels, before anything starts
    if options.weights:
        check_weights(options.weights, schema, [train, *tests], err)
    return solver, train, tests


class _Loop:
    def __init__(self, trainer: Trainer, options: TrainOptions, prefix: str, staging: Optional[snap.Staging],
                 stop: StopRequest, out: IO[str]) -> None:
        self.trainer, self.options, self.stop, self.out = trainer, options, stop, out
        self.settings = trainer.settings
        self.staging = staging
        self.root = trainer.rank == 0
        # Only the first process tests, reports and snapshots.
        self.snapshots = snap.Snapshotter(self._write, prefix, staging) if self.root else None
        self.tests: List[Dict[str, Output]] = []
        self.metrics: Optional[MetricsWriter] = None
        self.reporter: Optional[Reporter] = None
        self.best = keep.KeepBest.of(options.keep_best, options.patience, options.best_model, prefix, self.root)

    def _write(self) -> None:
        assert self.staging is not None
        model, state = self.staging.staged_paths(self.trainer.iter)
        self.trainer.save(model, state)

    def say(self, text: str) -> None:
        if self.reporter is not None:
            self.reporter.message(text)
        else:
            self.out.write(text + "\n")
            self.out.flush()

    def test_all(self, iteration: int, abortable: bool) -> bool:
        return keep.record_tests(self, iteration, self.settings.test_iter, self.trainer.test,
                                 lambda path: save_model(self.trainer.model(), path), abortable)

    def run(self, resumed: bool) -> Tuple[str, int, Optional[int]]:
        trainer, settings = self.trainer, self.settings
        while trainer.iter < settings.max_iter:
            iteration = trainer.iter
            if self.root and test_due(settings, iteration) and not self.test_all(iteration,
                                                                                 abortable=trainer.world == 1):
                return "interrupted", iteration, None
            # Every process learns the first one's verdict, so that they all stop at the same test.
            if self.options.patience is not None and test_due(settings, iteration) and trainer.agree(self.best.stop):
                return "done", iteration, None
            loss = trainer.forward_backward()
            if not math.isfinite(loss):
                return "diverged", iteration, None
            if self.options.stop_after is not None and iteration + 1 >= self.options.stop_after:
                self.stop.request(signal.SIGINT)
            lr = trainer.apply_update()
            if self.metrics is not None:
                self.metrics.train(iteration, loss, lr)
            if self.reporter is not None:
                self.reporter.train(iteration, loss, lr)
            if self.snapshots is not None:
                self.snapshots.confirm(iteration)
                if snapshot_due(settings, trainer.iter):
                    self.snapshots.save(trainer.iter)
                else:
                    self.snapshots.checkpoint(trainer.iter)
            if trainer.agree(self.stop.requested is not None) and trainer.iter < settings.max_iter:
                if self.stop.requested is None:
                    self.stop.request(signal.SIGINT)  # another process was stopped
                return "interrupted", trainer.iter, None
        if self.root and final_test_due(settings, trainer.iter):
            self.test_all(trainer.iter, abortable=False)
        return "done", trainer.iter, None


def distributed() -> Tuple[int, int, int]:
    """``(rank, world size, local rank)`` under torchrun (its environment variables), else ``(0, 1, 0)``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0"))


def _source_batch(trainer: Trainer) -> Optional[int]:
    for layer in trainer.net.sources:
        if len(layer.top):
            return trainer.net.shapes.blobs[layer.top[0]][0]
    return None


def train(options: TrainOptions, schema: Schema, out: IO[str] = sys.stderr) -> TrainResult:
    """Run the solver on torch as ``options`` say (the ``caffe-ft train --engine torch`` path).

    Under ``torchrun`` each process trains on its share of every batch (record
    ``r`` of every ``W``) and the gradients are averaged before each update, as
    Caffe's multi-GPU solvers do; the first process tests, reports and snapshots.
    """
    rank, world, local_rank = distributed()
    solver, train_spec, test_specs = _prepare(options, schema, out if rank == 0 else open(os.devnull, "w"))
    keep.tracker(options.keep_best, options.patience)  # the options make sense, before anything starts
    device = _device(options, solver)
    if world > 1:
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if rank != 0:
            out = open(os.devnull, "w")
    precision = options.precision
    workers = default_workers() if options.data_workers is None else options.data_workers
    trainer = Trainer(solver, schema, train_spec, test_specs, device, precision=precision,
                      channels_last=options.channels_last, rank=rank, world=world, data_workers=workers)
    if options.keep_best:
        keep.check_output(options.keep_best, list(trainer.test_nets[0].output_names) if trainer.test_nets else [])
    prefix = snap.effective_prefix(options.solver, solver.snapshot_prefix)
    workdir = tempfile.mkdtemp(prefix="caffe-ft-train-")
    staging = snap.Staging(prefix) if rank == 0 else None
    try:
        resume = snap.check_resume(options.resume, schema, workdir) if options.resume else None
        if resume is not None:
            trainer.restore(resume.state, resume.model)
            train_batches, test_batches = resume_skips(trainer.settings, trainer.iter)
            trainer.feeder.skip(train_batches)
            for feeder, batches in zip(trainer.test_feeders, test_batches):
                feeder.skip(batches)
        elif options.weights:
            trainer.copy_from(options.weights)
        trainer.broadcast()
        start = f"resuming at iteration {trainer.iter}" if resume else (
            f"from {options.weights}" if options.weights else "from the fillers")
        where = f"{world} processes, " if world > 1 else ""
        readers = f"{workers} data worker process{'es' if workers != 1 else ''} per net" if workers else "data read in this process"
        out.write(f"train {options.solver} on torch ({where}{device}, {precision}), {start}, to iteration "
                  f"{solver.max_iter}; snapshots {prefix}_iter_N; {readers}\n")
        batch = _source_batch(trainer)
        if batch is not None and (world > 1 or solver.iter_size > 1):
            out.write(f"global batch {batch * solver.iter_size * world} = batch {batch} x iter_size "
                      f"{solver.iter_size} x {world} processes\n")
        out.flush()
        stop = StopRequest()
        loop = _Loop(trainer, options, prefix, staging, stop, out)
        stop.say = loop.say
        first = trainer.iter
        if loop.snapshots is None:
            pass
        elif resume is not None:
            loop.snapshots.known(first, (resume.model, options.resume or resume.state))
        else:
            loop.snapshots.checkpoint(first)
        if rank == 0 and (options.metrics or options.plot):
            metrics_path = options.metrics or os.path.join(workdir, "metrics.jsonl")
            loop.metrics = MetricsWriter(metrics_path, resume_at=first if resume else None)
        if resume is not None:
            carried = loop.best.carry_over(options.metrics, first)
            if carried is not None:
                out.write(carried + "\n")
        loop.reporter = make_reporter(out, first, solver.max_iter, solver.display, solver.average_loss, options.bar)
        began = time.monotonic()
        stop.install()
        try:
            status, iteration, _ = loop.run(resume is not None)
        finally:
            stop.uninstall()
            loop.reporter.close()
            loop.reporter = None
            if loop.metrics is not None:
                loop.metrics.close()
        if rank != 0:
            return TrainResult(status, iteration, 0 if status == "done" else (
                2 if status == "diverged" else EXIT_SIGNAL_BASE + (stop.requested or signal.SIGINT)))
        result = _finish(loop, options, status, iteration, time.monotonic() - began, first)
        loop.best.report(result)
        if options.plot:
            from ..plot import plot_quietly

            if plot_quietly(options.metrics or os.path.join(workdir, "metrics.jsonl"), options.plot, out):
                out.write(f"plot: {options.plot}\n")
        return result
    finally:
        trainer.close()
        if staging is not None:
            staging.remove()
        shutil.rmtree(workdir, ignore_errors=True)


def _finish(loop: _Loop, options: TrainOptions, status: str, iteration: int, seconds: float,
            first: int) -> TrainResult:
    snapshots, settings = loop.snapshots, loop.settings
    assert snapshots is not None
    if status == "diverged":
        message = diverged_message(loop.trainer.loss, iteration, settings.base_lr,
                                   learning_rate(loop.trainer.param, iteration))
        good = snapshots.last_good(iteration)
        if good is None:
            return TrainResult("diverged", iteration, 2, None, None, message + "; no earlier state was saved",
                               loop.tests)
        at, good_paths = good
        return TrainResult("diverged", iteration, 2, good_paths, resume_command(options, good_paths[1]),
                           message + f" and resume from the last good state (iteration {at}): {good_paths[1]}",
                           loop.tests)
    return ended_run(options, snapshots, status, iteration, signum=loop.stop.requested or signal.SIGINT,
                     snapshot_after_train=settings.snapshot_after_train, done=iteration - first, seconds=seconds,
                     tests=loop.tests)
