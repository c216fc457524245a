"""``caffe-ft finetune``: rewrite, check, init and train in one job.

OUTDIR ends up holding the rewritten prototxts, ``init.caffemodel`` (the
pretrained trunk plus a freshly filled head), Caffe's snapshots,
``final.caffemodel``, ``metrics.jsonl``, ``plot.png`` and ``summary.md``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from typing import IO, Any, Dict, Optional

from . import io, textformat
from .errors import CaffeFtError
from .rewrite import Plan, summary_text, write_plan
from .schema import Schema

METRICS = "metrics.jsonl"
PLOT = "plot.png"
INIT = "init.caffemodel"
FINAL = "final.caffemodel"


@dataclass(frozen=True)
class Outcome:
    """How a fine-tuning job ended."""

    exit_code: int
    final_model: Optional[str]
    test_outputs: Dict[str, float]
    seconds: float
    message: str


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


def _write_init(schema: Schema, plan: Plan, weights: str, seed: int, out: IO[str],
                input_shapes: Optional[Dict[str, Any]]) -> str:
    """Check the pretrained weights against the new net and write its starting caffemodel."""
    from .caffemodel import load_model, save_model
    from .weights import check, format_check, init

    text = plan.files["train_val.prototxt"][0]
    net = textformat.to_message(textformat.parse(text.encode("utf-8"), "train_val.prototxt"),
                                schema.new(io.NET), "train_val.prototxt")
    model = load_model(weights, schema)
    report = check(net, model, input_shapes=input_shapes)
    out.write(format_check(report) + "\n")
    if not report.ok:
        raise CaffeFtError(f"Caffe would not start training from these weights: {report.abort}", weights)
    path = os.path.join(plan.outdir, INIT)
    save_model(init(net, model, seed=seed, input_shapes=input_shapes), path)
    return path


def run(schema: Schema, plan: Plan, weights: str, *, device: str = "solver", seed: int = 0,
        force: bool = False, input_shapes: Optional[Dict[str, Any]] = None, out: IO[str]) -> Outcome:
    """Write ``plan``, start from ``weights`` and train; returns the outcome."""
    from .train import TrainOptions, train

    if "solver.prototxt" not in plan.files or "train_val.prototxt" not in plan.files:
        raise CaffeFtError("finetune needs training data (--train-data and --val-data) or a train_val net with a --solver")
    started = time.time()
    write_plan(plan, force=force)
    start = _write_init(schema, plan, weights, seed, out, input_shapes)
    metrics = os.path.join(plan.outdir, METRICS)
    if os.path.exists(metrics):
        os.unlink(metrics)  # a fresh run: no stale records from an earlier one
    options = TrainOptions(solver=os.path.join(plan.outdir, "solver.prototxt"), weights=start, device=device,
                           metrics=metrics, plot=os.path.join(plan.outdir, PLOT))
    result = train(options, schema, out)
    final = None
    if result.status == "done" and result.snapshot:
        final = os.path.join(plan.outdir, FINAL)
        shutil.copyfile(result.snapshot[0], final + ".tmp")
        os.replace(final + ".tmp", final)
    outcome = Outcome(result.exit_code, final, last_test_outputs(metrics), time.time() - started, result.message)
    _append_summary(plan, outcome)
    return outcome


def _append_summary(plan: Plan, outcome: Outcome) -> None:
    lines = [summary_text(plan), "## Training", ""]
    lines.append(f"- time: {outcome.seconds:.1f} s")
    for name, value in sorted(outcome.test_outputs.items()):
        lines.append(f"- final {name}: {value:.4f}")
    lines.append(f"- final weights: {outcome.final_model or '(none: ' + outcome.message + ')'}")
    lines.append(f"- metrics: {METRICS}, plot: {PLOT}")
    io.write_atomic(os.path.join(plan.outdir, "summary.md"), "\n".join(lines) + "\n")
