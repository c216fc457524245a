"""Evaluating and reporting whole runs: the final model of ``train`` or ``finetune`` on its validation data.

:func:`evaluate_net` runs a net's final weights over the images of its TEST
data layer (or a given list) and computes the metrics;
:func:`solver_settings` lists what a solver file sets;
:func:`write_train_report` writes the report of a ``caffe-ft train --report`` run.
"""

from __future__ import annotations

import os
from typing import IO, Any, Dict, List, Optional, Sequence, Tuple

from google.protobuf.message import Message

from ..errors import CaffeFtError
from ..formats.files import load_net
from ..formats.schema import Schema, is_repeated
from . import report
from .metrics import Evaluation, Predictions, evaluate
from .predict import PredictRequest, data_of_test_net, predict


def evaluate_net(net_path: str, weights: str, schema: Schema, data: Optional[str] = None,
                 top_k: Sequence[int] = (1, 5), names: Optional[Sequence[str]] = None,
                 batch_size: int = 32, engine: str = "pycaffe") -> Tuple[Evaluation, Predictions]:
    """``weights`` in ``net_path`` over ``data`` (default: the list its TEST data layer reads), run by ``engine``."""
    root: Optional[str] = None
    if data is None:
        data, root = data_of_test_net(load_net(net_path, schema))
        if not data:
            raise CaffeFtError("the net has no TEST image data layer to take the validation images from", net_path)
    predictions = predict(PredictRequest(net_path, weights, data, batch_size=batch_size, root_folder=root,
                                         engine=engine), schema)
    return evaluate(predictions, top_k, names), predictions


def solver_settings(solver: Message) -> Dict[str, Any]:
    """The fields a solver sets, as plain values (enums by name, repeated fields as lists)."""
    settings: Dict[str, Any] = {}
    for descriptor, value in solver.ListFields():
        if descriptor.message_type is not None:
            continue
        if descriptor.enum_type is not None:
            names = descriptor.enum_type.values_by_number
            value = [names[v].name for v in value] if is_repeated(descriptor) else names[value].name
        elif is_repeated(descriptor):
            value = list(value)
        settings[descriptor.name] = value
    return settings


def try_evaluation(net_path: Optional[str], weights: Optional[str], schema: Schema, out: IO[str],
                   engine: str = "pycaffe") -> Tuple[Optional[Evaluation], Optional[Predictions], List[str]]:
    """:func:`evaluate_net`, where there is a net file and weights; a problem becomes a note, not a failure."""
    if not net_path or not weights:
        return None, None, ["no evaluation: " + ("no final weights" if net_path else "the test net is not a file")]
    try:
        evaluation, predictions = evaluate_net(net_path, weights, schema, engine=engine)
    except CaffeFtError as exc:
        out.write(f"note: no evaluation in the report: {exc}\n")
        return None, None, [f"no evaluation: {exc}"]
    return evaluation, predictions, []


def write_train_report(outdir: str, options: Any, result: Any, schema: Schema, seconds: float,
                       out: IO[str]) -> Tuple[str, str]:
    """The report of a ``caffe-ft train`` run (``options``: its TrainOptions,
    ``result``: its TrainResult): the final (or last) snapshot evaluated on
    the first test net's data."""
    from ..formats.files import load_text, SOLVER
    from ..formats.upgrade import upgrade_solver
    from ..training.nets import solver_nets

    solver = load_text(options.solver, schema, SOLVER).message
    upgrade_solver(solver)
    _, tests = solver_nets(solver, schema)
    test_net = tests[0].source if tests and os.path.isfile(tests[0].source) else None
    weights = result.snapshot[0] if result.snapshot else None
    evaluation, predictions, notes = try_evaluation(test_net, weights, schema, out, getattr(options, "engine", "pycaffe"))
    start = options.weights or ("(the snapshot's)" if options.resume else "(the fillers')")
    settings: Dict[str, Any] = {"solver": options.solver, "weights": start, "device": options.device}
    if options.resume:
        settings["resumed from"] = options.resume
    settings.update(solver_settings(solver))
    files = [path for path in (options.metrics, options.plot, *(result.snapshot or ())) if path]
    title = os.path.basename(os.path.dirname(os.path.abspath(options.solver))) or options.solver
    run = report.RunInfo(
        title=title, kind="train", status=result.status, settings=settings,
        notes=[result.message, *notes], metrics=options.metrics, files=files,
        timings={"training (this session)": seconds},
    )
    return report.write(outdir, report.build(run, evaluation, predictions))
