"""``caffe-ft finetune``: rewrite, check, init and train in one job.

OUTDIR ends up holding the rewritten prototxts, ``init.caffemodel`` (the
pretrained trunk plus a freshly filled head), Caffe's snapshots,
``final.caffemodel``, ``metrics.jsonl``, ``plot.png``, ``summary.md`` and
the run's report (``report.html``, ``report.json``: :mod:`caffe_ft.evaluation.report`),
with the final model evaluated on the validation images.

Two strategies train the head on cached features instead (:mod:`caffe_ft.heads.fit`):
``features`` always (scikit-learn; no solver run, no metrics), and
``last-fc`` when Caffe's SGD can be replayed on them exactly (same metrics
and plot; no snapshots but ``final.caffemodel``); otherwise, or with
``cached=False``, the engine (pycaffe, or the torch engine with Caffe's
semantics) trains and the summary says why.  With
``export_onnx``, ``final.onnx`` (the deploy net with the final weights) is
written beside ``final.caffemodel`` and compared with pycaffe.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Dict, Optional, Tuple

from ..formats import files, prototext
from ..errors import CaffeFtError
from ..training.run import working_directory
from .rewrite import RewritePlan, check_outputs, summary_text, write_plan
from ..formats.schema import Schema

if TYPE_CHECKING:
    from google.protobuf.message import Message

    from ..formats.caffemodel import Model
    from ..heads.fit import Trained
    from ..net.weights import CheckReport

METRICS = "metrics.jsonl"
PLOT = "plot.png"
INIT = "init.caffemodel"
FINAL = "final.caffemodel"
ONNX = "final.onnx"
BEST = "best.caffemodel"
PROBE = "probe.caffemodel"


@dataclass(frozen=True)
class FinetuneResult:
    """How a fine-tuning job ended."""

    outdir: str
    exit_code: int
    final_model: Optional[str]
    test_outputs: Dict[str, float]
    seconds: float
    message: str
    notes: Tuple[str, ...] = ()  # how it was trained (summary.md)
    resume_state: Optional[str] = None  # stopped: the snapshot ``resume`` continues from


def last_test_outputs(metrics_path: str) -> Dict[str, float]:
    """The outputs of the last test pass recorded in a metrics file (empty if none)."""
    outputs: Dict[str, float] = {}
    if not os.path.exists(metrics_path):
        return outputs
    with open(metrics_path, encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if record.get("phase") == "test":
                outputs = {name: value for name, value in record.get("outputs", {}).items()
                           if isinstance(value, (int, float))}
    return outputs


def _planned_net(schema: Schema, plan: RewritePlan, name: str) -> "Message":
    """The net the plan writes as ``name``, parsed from its text."""
    data = plan.files[name][0].encode("utf-8", "surrogateescape")
    return prototext.to_message(prototext.parse(data, name), schema.new(files.NET), name)


def check_plan(schema: Schema, plan: RewritePlan, weights: str, input_shapes: Optional[Dict[str, Any]],
               out: IO[str]) -> Tuple["Message", "Model", "CheckReport"]:
    """Print what Caffe will copy from ``weights`` into the rewritten net (its
    train_val, else its deploy; the renamed heads shown as new on purpose);
    raise if Caffe would abort.  The net, the weights and the report."""
    from ..formats.caffemodel import load_model
    from ..net.weights import check, format_check, with_new_heads

    net = _planned_net(schema, plan, "train_val.prototxt" if "train_val.prototxt" in plan.files else "deploy.prototxt")
    model = load_model(weights, schema)
    report = with_new_heads(check(net, model, input_shapes=input_shapes or None),
                            {new: old for old, new in plan.heads.items()})
    out.write(format_check(report) + "\n")
    out.flush()
    if not report.ok:
        raise CaffeFtError(f"Caffe would not start training from these weights: {report.abort}", weights)
    return net, model, report


def _write_init(plan: RewritePlan, checked: Tuple["Message", "Model", "CheckReport"], seed: int,
                input_shapes: Optional[Dict[str, Any]]) -> str:
    """Write the new net's starting caffemodel from the weights :func:`check_plan` checked."""
    from ..formats.caffemodel import save_model
    from ..net.weights import init

    net, model, report = checked
    path = os.path.join(plan.outdir, INIT)
    save_model(init(net, model, seed=seed, input_shapes=input_shapes, report=report), path)
    return path


def preflight_plan(schema: Schema, plan: RewritePlan) -> None:
    """The engines' pre-flight of the data (:func:`~caffe_ft.training.nets.check_data`)
    on the nets the planned solver builds, before OUTDIR is written: its files
    name each other and their data from OUTDIR, which need not exist yet."""
    from ..training.nets import check_data, solver_nets

    def planned(path: str) -> "Message":
        name = os.path.normpath(path)
        if name not in plan.files:
            raise CaffeFtError(f"the planned solver names '{path}', which the plan does not write")
        return _planned_net(schema, plan, name)

    solver = prototext.to_message(prototext.parse(plan.files["solver.prototxt"][0].encode("utf-8", "surrogateescape"),
                                                  "solver.prototxt"), schema.new(files.SOLVER), "solver.prototxt")
    train, tests = solver_nets(solver, schema, planned)
    check_data([train, *tests], plan.outdir)


def run(schema: Schema, plan: RewritePlan, weights: str, *, device: str = "solver", seed: int = 0,
        force: bool = False, input_shapes: Optional[Dict[str, Any]] = None, cached: bool = True,
        resume: Optional[str] = None, keep_best: Optional[str] = None, patience: Optional[int] = None,
        export_onnx: bool = False, engine: str = "pycaffe", data_workers: Optional[int] = None,
        out: IO[str]) -> FinetuneResult:
    """Write ``plan``, start from ``weights`` and train; returns the outcome.

    ``cached``: let ``last-fc`` train the head on cached features where that
    gives what pycaffe would (``features`` always does).  ``resume``: continue
    a stopped job from its snapshot (the same plan is written again; pycaffe
    trains on from the snapshot, its metrics appended).  ``keep_best``/``patience``:
    OUTDIR/best.caffemodel keeps the weights of the best test of that output,
    and the run stops after ``patience`` tests without a better one
    (:mod:`caffe_ft.training.best`); training then goes through pycaffe.
    ``export_onnx``: also write ``final.onnx`` and say in the summary how it was checked.
    ``engine``: who trains and computes cached features, ``pycaffe`` or ``torch``
    (the caller resolves ``auto`` and says which it picked); ``data_workers``: the
    torch engine's data reading processes per net (None: its choice)."""
    from ..heads import fit
    from ..training.best import tracker

    tracker(keep_best, patience)  # the options make sense, before anything is written
    if keep_best and plan.strategy == "features":
        raise CaffeFtError("--keep-best: --strategy features fits the head in one go; there are no tests to keep")
    best = Best(keep_best, patience)
    if "solver.prototxt" not in plan.files or "train_val.prototxt" not in plan.files:
        raise CaffeFtError("finetune needs training data (--train-data and --val-data) or a train_val net with a --solver")
    started = time.time()
    if resume is not None:
        if plan.strategy == "features":
            raise CaffeFtError("--strategy features trains no solver: there is nothing to resume")
        if not os.path.exists(resume):
            raise CaffeFtError("no such snapshot", resume)
        resume = os.path.abspath(resume)
    # Everything that can refuse the job, before anything is written: a refused
    # job leaves no folder that its retry would need --force to write over.
    # The outputs first: the weights check and the data pre-flight take long.
    check_outputs(plan, force=force or resume is not None, inputs=[weights])
    checked = check_plan(schema, plan, weights, input_shapes, out) if resume is None else None
    preflight_plan(schema, plan)
    write_plan(plan, force=force or resume is not None, inputs=[weights])
    metrics = os.path.join(plan.outdir, METRICS)
    if checked is None:
        assert resume is not None
        start = resume
    else:
        start = _write_init(plan, checked, seed, input_shapes)
        if os.path.exists(metrics):
            os.unlink(metrics)  # a fresh run: no stale records from an earlier one
    # Training runs in OUTDIR: its files name each other and their data from there.
    here = dataclasses.replace(plan, outdir=os.path.abspath(plan.outdir))
    start, final = os.path.abspath(start), os.path.join(here.outdir, FINAL)
    with working_directory(here.outdir):
        if plan.strategy == "features":
            trained = fit.fit_features(os.path.join(here.outdir, "train_val.prototxt"), schema, _single_head(plan),
                                       start, here.outdir, final, seed, out, engine)
        elif plan.strategy == "lp-ft" and resume is None:
            trained = _linear_probe_then_finetune(schema, here, start, final, device, seed, out, best, engine,
                                                  data_workers)
        elif resume is not None:
            solver = os.path.join(here.outdir, "solver.prototxt")
            trained = _train_solver(schema, solver, start, device, os.path.join(here.outdir, METRICS),
                                    os.path.join(here.outdir, PLOT), final, out, resume=True, best=best,
                                    engine=engine, data_workers=data_workers)
        else:
            trained = _train(schema, here, start, final, device, seed, cached, out, best, engine, data_workers)
    if export_onnx and trained.final_model:
        trained.notes.append(_export_onnx(schema, here, trained.final_model, out))
    # Snapshot paths are the solver's, relative to OUTDIR where it ran; the user's are relative to here.
    state = os.path.relpath(os.path.join(here.outdir, trained.resume_state)) if trained.resume_state else None
    outcome = FinetuneResult(plan.outdir, trained.exit_code, trained.final_model, trained.test_outputs,
                             time.time() - started, trained.message, tuple(trained.notes), state)
    _append_summary(plan, outcome)
    try:
        # In OUTDIR, as training: the test net names its data from there (and the report its files).
        with working_directory(here.outdir):
            html = _write_report(schema, dataclasses.replace(plan, outdir="."), outcome, weights, engine,
                                 {"device": device, "seed": seed, "cached features": cached}, out)
    except CaffeFtError as exc:  # the model is trained and saved: a report problem does not fail the job
        out.write(f"note: no report: {exc}\n")
    else:
        out.write(f"report: {os.path.join(plan.outdir, os.path.basename(html))}\n")
    return outcome


def _export_onnx(schema: Schema, plan: RewritePlan, final: str, out: IO[str]) -> str:
    """Write ``final.onnx`` from ``deploy.prototxt`` and the final weights, compare
    it with pycaffe where pycaffe and ONNX Runtime run (the trained model stays,
    whatever the export); the summary line saying what was written and checked."""
    from ..export import to_onnx, verify
    from ..formats.caffemodel import load_model

    deploy = os.path.join(plan.outdir, "deploy.prototxt")
    path = os.path.join(plan.outdir, ONNX)
    options = to_onnx.ExportOptions()
    try:
        to_onnx.write(files.load_net(deploy, schema), load_model(final, schema), options, path, deploy, final)
    except CaffeFtError as exc:
        out.write(f"warning: {ONNX} not written: {exc.located(deploy)}\n")
        return f"{ONNX} not written: {exc}"
    try:
        agreement = str(verify.compare_with_pycaffe(deploy, final, path))
    except ImportError as exc:  # the onnx extra brings no ONNX Runtime
        agreement = f"not compared with pycaffe ({exc.name or exc} is not installed)"
    except CaffeFtError as exc:  # trained by the torch engine, where no pycaffe runs
        agreement = f"not compared with pycaffe ({exc})"
    out.write(f"wrote {path}: {agreement}\n")
    return f"ONNX model: {ONNX} (opset {options.opset}, batch axis N); onnx.checker passed; {agreement}"


def _write_report(schema: Schema, plan: RewritePlan, outcome: FinetuneResult, weights: str, engine: str,
                  shown: Dict[str, Any], out: IO[str]) -> str:
    """report.html/report.json in OUTDIR: the job's settings (``shown`` too), curves and the
    final model on the validation images, evaluated through ``engine`` as it was trained."""
    from ..evaluation import report
    from ..evaluation.runs import solver_settings, try_evaluation

    train_val = os.path.join(plan.outdir, "train_val.prototxt")
    evaluation, predictions, notes = try_evaluation(train_val, outcome.final_model, schema, out, engine)
    settings: Dict[str, Any] = {"pretrained weights": weights, "strategy": plan.strategy,
                                "heads": ", ".join(f"{old} -> {new}" for old, new in plan.heads.items()),
                                "engine": engine, **shown}
    solver = files.load_text(os.path.join(plan.outdir, "solver.prototxt"), schema, files.SOLVER).message
    settings.update(solver_settings(solver))
    metrics = os.path.join(plan.outdir, METRICS)
    status = "done" if outcome.exit_code == 0 else "interrupted" if outcome.exit_code > 128 else "failed"
    listed = [os.path.join(plan.outdir, name) for name in sorted(os.listdir(plan.outdir))]
    run = report.RunInfo(
        title=os.path.basename(os.path.abspath(plan.outdir)), kind="finetune", status=status, settings=settings,
        strategy=plan.strategy, notes=[*plan.summary, *outcome.notes, outcome.message, *notes],
        metrics=metrics if os.path.exists(metrics) else None, timings={"rewrite, init and training": outcome.seconds},
        files=[path for path in listed if os.path.isfile(path)],
    )
    return report.write(plan.outdir, report.build(run, evaluation, predictions))[0]


def _single_head(plan: RewritePlan) -> str:
    """The new name of the one head ``--strategy features`` fits."""
    if len(plan.heads) != 1:
        raise CaffeFtError(f"--strategy features fits one head; this net has {len(plan.heads)} "
                           f"({', '.join(plan.heads.values())}): use --strategy last-fc")
    return next(iter(plan.heads.values()))


def _linear_probe_then_finetune(schema: Schema, plan: RewritePlan, start: str, final: str, device: str, seed: int,
                                out: IO[str], best: "Best", engine: str = "pycaffe",
                                data_workers: Optional[int] = None) -> "Trained":
    """lp-ft: the head fitted on cached features (the ``features`` path) into PROBE, then
    Caffe fine-tunes from PROBE; the notes give the probe's accuracy and the fine-tuned one."""
    from ..heads import fit

    probe_path = os.path.join(plan.outdir, PROBE)
    probe = fit.fit_features(os.path.join(plan.outdir, "train_val.prototxt"), schema, _single_head(plan), start,
                             plan.outdir, probe_path, seed, out, engine)
    out.write(f"lp-ft: linear probe validation accuracy {probe.test_outputs['accuracy']:.4f}; fine-tuning from "
              f"{PROBE}\n")
    trained = _train(schema, plan, probe_path, final, device, seed, False, out, best, engine, data_workers)
    tuned = trained.test_outputs.get("accuracy")
    trained.notes[:0] = [f"linear probe (the head on cached features, {PROBE}): validation accuracy "
                         f"{probe.test_outputs['accuracy']:.4f}",
                         *probe.notes[:1],
                         "fine-tuned from the probe: " + (f"accuracy {tuned:.4f} at the last test" if tuned is not None
                                                          else "no accuracy tested")]
    return trained


@dataclass(frozen=True)
class Best:
    """``--keep-best`` and ``--patience`` of a job (both None: neither)."""

    output: Optional[str] = None
    patience: Optional[int] = None


def _train(schema: Schema, plan: RewritePlan, start: str, final: str, device: str, seed: int, cached: bool,
           out: IO[str], best: Best = Best(), engine: str = "pycaffe", data_workers: Optional[int] = None) -> "Trained":
    """last-fc on cached features where that gives what pycaffe gives, else the solver run by ``engine`` (saying why)."""
    from ..heads import fit

    solver = os.path.join(plan.outdir, "solver.prototxt")
    metrics, plot = os.path.join(plan.outdir, METRICS), os.path.join(plan.outdir, PLOT)
    job, reasons = fit.analyse(solver, schema, device) if plan.strategy == "last-fc" and cached else (None, [])
    if job is not None and best.output is not None:
        job, reasons = None, ["--keep-best writes the weights at each best test, which pycaffe's loop does"]
    if job is not None:
        out.write("last-fc: the trunk gives the same features at every iteration; training the head on cached "
                  "features with Caffe's SGD\n")
        return fit.train_cached(job, schema, start, plan.outdir, final, metrics, plot, seed, out, engine)
    notes = [f"trained with {engine}, not on cached features: {'; '.join(reasons)}"] if reasons else []
    for note in notes:
        out.write(f"note: {note}\n")
    trained = _train_solver(schema, solver, start, device, metrics, plot, final, out, best=best, engine=engine,
                            data_workers=data_workers)
    trained.notes[:0] = notes
    return trained


def _train_solver(schema: Schema, solver: str, start: str, device: str, metrics: str, plot: str, final: str,
                  out: IO[str], resume: bool = False, best: Best = Best(), engine: str = "pycaffe",
                  data_workers: Optional[int] = None) -> "Trained":
    """The solver run by ``engine``: Caffe's own training through pycaffe
    (:mod:`caffe_ft.training.pycaffe`) or the torch engine with Caffe's semantics
    (:mod:`caffe_ft.training.torch.engine`), from the weights ``start`` (with
    ``resume``: from the snapshot ``start``); copies the last snapshot to ``final``."""
    from ..heads.fit import Trained
    from ..training.run import TrainOptions

    if engine == "torch":
        from ..training.torch import require_torch

        require_torch()
        from ..training.torch.engine import train
    else:
        from ..training.pycaffe import train
    options = TrainOptions(solver=solver, weights=None if resume else start, resume=start if resume else None,
                           device=device, metrics=metrics, plot=plot, keep_best=best.output,
                           patience=best.patience, engine=engine, data_workers=data_workers, data_checked=True,
                           best_model=os.path.join(os.path.dirname(final), BEST) if best.output else None)
    result = train(options, schema, out)
    copied = None
    if result.status == "done" and result.snapshot:
        shutil.copyfile(result.snapshot[0], final + ".tmp")
        os.replace(final + ".tmp", final)
        copied = final
    state = result.snapshot[1] if result.status != "done" and result.snapshot else None
    return Trained(result.exit_code, copied, last_test_outputs(metrics), result.message, list(result.best_notes),
                   resume_state=state)


def _append_summary(plan: RewritePlan, outcome: FinetuneResult) -> None:
    lines = [summary_text(plan), "## Training", ""]
    lines.append(f"- time: {outcome.seconds:.1f} s")
    for name, value in sorted(outcome.test_outputs.items()):
        lines.append(f"- final {name}: {value:.4f}")
    lines.extend(f"- {note}" for note in outcome.notes)
    final = os.path.relpath(outcome.final_model, os.path.abspath(plan.outdir)) if outcome.final_model else None
    lines.append(f"- final weights: {final or '(none: ' + outcome.message + ')'}")
    if os.path.exists(os.path.join(plan.outdir, METRICS)):
        lines.append(f"- metrics: {METRICS}, plot: {PLOT}")
    lines.append("- report: report.html (report.json)")
    files.write_atomic(os.path.join(plan.outdir, "summary.md"), "\n".join(lines) + "\n")
