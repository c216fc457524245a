"""caffe-ft as a library: the commands' jobs as functions, no click needed.

Each function takes file paths and typed options (:mod:`caffe_ft.recipe.options`,
:class:`caffe_ft.training.run.TrainOptions`) and returns plain results; problems
with the input raise :class:`~caffe_ft.errors.CaffeFtError`.  Progress and notes
go to ``out`` (stderr by default), as on the command line::

    import caffe_ft
    from caffe_ft.recipe.options import FinetuneOptions, RewriteOptions
    from caffe_ft.recipe.strategies import StrategyOptions

    result = caffe_ft.finetune("deploy.prototxt", "pretrained.caffemodel", FinetuneOptions(
        RewriteOptions(StrategyOptions(num_classes=5), strategy="last-fc", ...)))
"""

from __future__ import annotations

import sys
from typing import IO, TYPE_CHECKING, Any, Dict, Optional, Sequence, Tuple

from .errors import CaffeFtError
from .formats.schema import Schema, load_schema

if TYPE_CHECKING:  # annotations only: init, check and upgrade need none of recipe's modules
    import onnx

    from .export.to_onnx import ExportOptions
    from .evaluation.metrics import Evaluation
    from .recipe.job import FinetuneResult
    from .recipe.options import FinetuneOptions, InputShapes, RewriteOptions
    from .recipe.rewrite import RewritePlan
    from .net.weights import CheckReport
    from .training.run import TrainOptions, TrainResult


def _printer(out: IO[str]) -> Any:
    def say(text: str) -> None:
        out.write(text + "\n")
        out.flush()

    return say


def load_net_and_model(net_path: str, weights: str, schema: Schema) -> Tuple[Any, Any]:
    """The current-format net of ``net_path`` and the caffemodel ``weights``."""
    from .formats import files
    from .formats.caffemodel import load_model
    from .formats.upgrade import current_net

    net = files.load_text(net_path, schema, files.NET).message
    return current_net(net, net_path), load_model(weights, schema)


def check(net_path: str, weights: str, *, phase: str = "TRAIN", input_shapes: Optional[InputShapes] = None,
          schema: Optional[Schema] = None) -> "CheckReport":
    """What Caffe will do when it loads ``weights`` into the net: each layer COPIED, FRESH or MISMATCH."""
    from .net import weights as wt

    schema = schema or load_schema()
    net, model = load_net_and_model(net_path, weights, schema)
    try:
        return wt.check(net, model, phase, input_shapes or None)
    except CaffeFtError as exc:
        raise exc.located(net_path) from None


def init(net_path: str, weights: str, output: str, *, seed: int = 0, phase: str = "TRAIN",
         input_shapes: Optional[InputShapes] = None, schema: Optional[Schema] = None,
         force: bool = False) -> "CheckReport":
    """Write the caffemodel the net starts from (``weights``' blobs where they fit,
    Caffe's fillers elsewhere) to ``output``; returns the check it rests on.
    ``output`` is never one of the inputs; an existing one is replaced only with ``force``."""
    from .formats.files import check_output
    from .net import weights as wt

    check_output(output, [net_path, weights], force)  # never an input; an existing file only with force
    schema = schema or load_schema()
    net, model = load_net_and_model(net_path, weights, schema)
    try:  # the copied blobs' NaN/inf check runs inside the copy: one pass over the weights
        return wt.init_and_save(net, model, output, seed, phase, input_shapes or None)
    except CaffeFtError as exc:
        raise exc.located(net_path) from None


def rewrite(net_path: str, options: RewriteOptions, *, weights: Optional[str] = None, write: bool = True,
            force: bool = False, schema: Optional[Schema] = None, out: IO[str] = sys.stderr) -> "RewritePlan":
    """Turn a pretrained net into a fine-tuning setup (train_val, deploy, solver,
    summary.md in ``options.outdir``); with ``weights``, check first that Caffe
    would start from them.  ``write=False`` plans without writing."""
    from .recipe.planning import plan_rewrite
    from .recipe.rewrite import write_plan

    schema = schema or load_schema()
    plan = plan_rewrite(schema, net_path, options, weights, _printer(out))
    if weights:
        from .recipe.job import check_plan

        shapes = options.input_shapes or plan.input_shapes
        check_plan(schema, plan, weights, dict(shapes) if shapes else None, out)
    if write:
        write_plan(plan, force=force, inputs=[weights, options.data.train, options.data.val, options.data.mean_file])
    return plan


def finetune(net_path: str, weights: str, options: FinetuneOptions, *, schema: Optional[Schema] = None,
             out: IO[str] = sys.stderr) -> "FinetuneResult":
    """Rewrite, check, init and train in one job; OUTDIR gets the nets, init and
    final caffemodels, metrics, plot and summary.md."""
    from .recipe import job
    from .recipe.planning import plan_rewrite

    schema = schema or load_schema()
    plan = plan_rewrite(schema, net_path, options.rewrite, weights, _printer(out), options.engine)
    return job.run(schema, plan, weights, device=options.device, seed=options.seed, force=options.force,
                   input_shapes=options.rewrite.input_shapes or plan.input_shapes or None, cached=options.cached,
                   resume=options.resume, keep_best=options.keep_best, patience=options.patience,
                   export_onnx=options.export_onnx, engine=options.engine,
                   data_workers=options.data_workers, out=out)

def export_onnx(net_path: str, weights: Optional[str], output: str, options: "ExportOptions", *,
                force: bool = False, schema: Optional[Schema] = None, out: IO[str] = sys.stderr) -> "onnx.ModelProto":
    """Write the net (a deploy net, or the deploy net derived from a train_val)
    and ``weights`` to ``output`` as an ONNX model; nothing is written when a
    layer has no faithful ONNX equivalent.  ``output`` is never one of the
    inputs; an existing one is replaced only with ``force``."""
    from .export import to_onnx
    from .recipe.rewrite import is_deploy, to_deploy
    from .formats import files
    from .formats.caffemodel import load_model
    from .formats.upgrade import current_net
    from .net.graph import find_heads

    files.check_output(output, [net_path, weights], force)
    schema = schema or load_schema()
    net = current_net(files.load_text(net_path, schema, files.NET).message, net_path)
    model = load_model(weights, schema) if weights else None
    try:
        if not is_deploy(net):
            shapes = {name: tuple(shape) for name, shape in options.input_shapes.items()}
            net = to_deploy(schema, net, find_heads(net).heads, input_shapes=shapes)
            out.write(f"{net_path}: not a deploy net: exporting the deploy net derived from it\n")
        return to_onnx.write(net, model, options, output, net_path, weights)
    except CaffeFtError as exc:
        raise exc.located(net_path) from None


def train(options: "TrainOptions", *, schema: Optional[Schema] = None, out: IO[str] = sys.stderr) -> "TrainResult":
    """Run a Caffe solver (pycaffe, or torch when ``options.engine`` says so):
    checked start, metrics, safe snapshots, resume.

    With ``options.report`` (which needs ``options.metrics``), the run's
    report.html and report.json go there at the end, however it ended; with
    ``options.tensorboard``, TensorBoard event files of the whole run."""
    import os
    import time

    from .training.run import absolute_options, resume_command, run_folder, working_directory

    if options.engine == "torch":
        from .training.torch import require_torch

        require_torch()
        from .training.torch.engine import train as run_training
    else:
        from .training.pycaffe import train as run_training

    if options.report and not options.metrics:
        raise CaffeFtError("a training report needs a metrics file (give --metrics)")
    if options.tensorboard:
        from .training.tensorboard import require_writer

        if not options.metrics:
            raise CaffeFtError("--tensorboard needs a metrics file (give --metrics)")
        require_writer()
    schema = schema or load_schema(options.proto)
    started = time.monotonic()
    # A caffe-ft output folder names its nets and data from itself: the run works there (see run_folder).
    folder = run_folder(options.solver, schema)
    if folder is None:
        return _train_and_report(run_training, options, schema, out, started)
    _printer(out)(f"working in {os.path.dirname(options.solver) or '.'} (the solver names its nets from there)")
    moved = absolute_options(options)  # before moving: the paths are the caller's
    with working_directory(folder):
        result = _train_and_report(run_training, moved, schema, out, started)
    if result.resume_command and result.snapshot:
        result.resume_command = resume_command(options, os.path.relpath(result.snapshot[1]))
    return result


def _train_and_report(run_training: Any, options: "TrainOptions", schema: Schema, out: IO[str],
                      started: float) -> "TrainResult":
    """The engine's run, then the TensorBoard events and the report ``options`` ask for."""
    import os
    import time

    result = run_training(options, schema, out)
    if options.tensorboard and options.metrics and os.path.exists(options.metrics):
        from .training.tensorboard import write_events

        count = write_events(options.metrics, options.tensorboard)
        out.write(f"tensorboard: {count} scalars in {options.tensorboard}\n")
    if options.report:
        from .evaluation.runs import write_train_report

        try:
            html, _ = write_train_report(options.report, options, result, schema, time.monotonic() - started, out)
        except CaffeFtError as exc:  # the run and its snapshots stand: a report problem does not fail it
            out.write(f"note: no report: {exc}\n")
        else:
            out.write(f"report: {html}\n")
    return result


def evaluate(net_path: str, weights: str, data: str, *, top_k: Sequence[int] = (1, 5), blob: Optional[str] = None,
             batch_size: int = 32, root_folder: Optional[str] = None, transform: Optional[Dict[str, Any]] = None,
             class_names: Optional[Sequence[str]] = None, mistakes: int = 10, save_predictions: Optional[str] = None,
             schema: Optional[Schema] = None, engine: str = "pycaffe") -> "Evaluation":
    """Run ``weights`` in ``net_path`` (deploy or train_val) over the image list
    (or LMDB) ``data`` with the net's TEST transform and compute accuracy,
    top-k, per-class precision/recall/F1, the confusion matrix, the expected
    calibration error and the most confident mistakes.  ``save_predictions``: also
    save the class probabilities, labels and sources there (``.npz``).
    ``engine``: who runs the net, pycaffe or torch."""
    from .evaluation.metrics import evaluate as compute
    from .evaluation.predict import PredictRequest, predict

    schema = schema or load_schema()
    request = PredictRequest(net_path, weights, data, blob, batch_size, root_folder, dict(transform or {}), engine)
    predicted = predict(request, schema)
    result = compute(predicted, top_k, class_names, mistakes)
    if save_predictions:
        predicted.save(save_predictions)
    return result


__all__ = ["check", "evaluate", "export_onnx", "finetune", "init", "rewrite", "train"]
