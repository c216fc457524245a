"""``--keep-best`` and ``--patience`` (:mod:`caffe_ft.training.best`), on both engines.

The decisions are checked on their own; then the digits net trains for real
(pycaffe in the reference environment, torch on the host) with and without
the options: best.caffemodel must be the snapshot of the best test the
metrics file records, everything else as without the option, and a run with
patience must stop at the test the metrics of the full run say.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Dict, List, Optional

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_train import (  # noqa: E402,F401
    caffe_ft, dataset, passes_recorded, resume_line, run_resume, setup_run, train_records)

from caffe_ft.errors import CaffeFtError  # noqa: E402
from caffe_ft.training import best  # noqa: E402


# ------------------------------------------------------------- the decisions --


def test_accuracy_is_maximised_and_ties_do_not_count() -> None:
    tracker = best.Tracker("accuracy", patience=2)
    verdicts = [tracker.update(i, {"accuracy": a, "loss": 1.0}) for i, a in [(0, 0.5), (10, 0.7), (20, 0.7),
                                                                              (30, 0.9), (40, 0.8), (50, 0.9)]]
    assert [v.new_best for v in verdicts] == [True, True, False, True, False, False]
    assert [v.stop for v in verdicts] == [False, False, False, False, False, True]
    assert (tracker.best, tracker.best_iteration, tracker.stopped_at) == (0.9, 30, 50)
    assert tracker.notes("best.caffemodel") == [
        "best accuracy: 0.9000 at iteration 30 (best.caffemodel)", "last accuracy: 0.9000 at iteration 50",
        "stopped early at iteration 50: 2 test(s) without a better accuracy"]


def test_a_loss_is_minimised() -> None:
    tracker = best.Tracker("val_loss")
    assert [tracker.update(i, {"val_loss": v}).new_best for i, v in [(0, 2.0), (1, 1.0), (2, 1.5), (3, 0.5)]] == [
        True, True, False, True]
    assert tracker.best == 0.5 and not tracker.update(4, {"val_loss": 0.6}).stop  # no patience: never stops


def test_bad_requests_are_refused() -> None:
    with pytest.raises(CaffeFtError, match="--patience needs --keep-best"):
        best.tracker(None, 3)
    with pytest.raises(CaffeFtError, match="at least 1"):
        best.tracker("accuracy", 0)
    with pytest.raises(CaffeFtError, match=r"no such output \(its outputs: accuracy, loss\)"):
        best.check_output("acc", ["loss", "accuracy"])
    with pytest.raises(CaffeFtError, match="no test net"):
        best.check_output("accuracy", [])


def test_carry_over_needs_the_metrics_and_the_best_model(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model, metrics = tmp_path / "best.caffemodel", tmp_path / "m.jsonl"
    metrics.write_text("".join(f'{{"phase": "test", "iteration": {i}, "net": 0, "outputs": {{"accuracy": {a}}}}}\n'
                               for i, a in [(0, 0.5), (10, 0.8), (20, 0.6), (30, 0.9)]))
    assert best.carry_over(best.Tracker("accuracy"), None, 30, str(model)) is None  # nothing written before
    model.write_bytes(b"weights")
    note = best.carry_over(best.Tracker("accuracy"), None, 30, str(model))
    assert note is not None and "not known without the run's --metrics file" in note
    tracker = best.Tracker("accuracy", patience=3)
    note = best.carry_over(tracker, str(metrics), 30, str(model))  # the test at 30 is the resumed run's
    assert (tracker.best, tracker.best_iteration, tracker.since_best) == (0.8, 10, 1)
    assert note == f"keep-best: before iteration 30, best accuracy 0.8000 at iteration 10 ({model}), 1 test(s) since"


def test_keep_best_writes_only_improvements_and_tells_the_result(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The object both engines hold: a better test writes the weights (atomically, where asked),
    the patience raises ``stop``, the result learns the model and the notes; without --keep-best
    (or in a process that does not test) it does nothing."""
    from caffe_ft.training.run import TrainResult

    written: List[int] = []

    def save(iteration: int):  # type: ignore[no-untyped-def]
        def write(path: str) -> None:
            with open(path, "w") as handle:
                handle.write(str(iteration))
            written.append(iteration)
        return write

    keep = best.KeepBest.of("accuracy", 1, None, str(tmp_path / "snaps" / "digits"))
    assert keep.path == str(tmp_path / "snaps" / "best.caffemodel")
    for iteration, accuracy in [(0, 0.5), (10, 0.7), (20, 0.6)]:
        keep.weigh(iteration, {"accuracy": accuracy}, save(iteration))
        assert keep.stop == (iteration == 20)
    assert written == [0, 10] and (tmp_path / "snaps" / "best.caffemodel").read_text() == "10"
    assert os.listdir(tmp_path / "snaps") == ["best.caffemodel"]  # no temporary left behind
    result = TrainResult("done", 20, 0)
    keep.report(result)
    assert result.best_model == keep.path and result.best_notes[0].startswith("best accuracy: 0.7000 at iteration 10")
    with pytest.raises(CaffeFtError, match="no such output"):
        keep.check(["loss"])
    for idle in (best.KeepBest.of(None, None, "b.caffemodel", "x"), best.KeepBest.of("accuracy", 2, None, "x", False)):
        idle.weigh(0, {"accuracy": 1.0}, save(99))
        idle.check([])
        unchanged = TrainResult("done", 0, 0)
        idle.report(unchanged)
        assert 99 not in written and not idle.written and not idle.stop and unchanged.best_model is None
    assert best.KeepBest.of(None, None, "b.caffemodel", "x").path == "b.caffemodel"


# --------------------------------------------------------- real training runs --


def expected_stop(tests: List[Dict[str, Any]], output: str, patience: int) -> Optional[int]:
    """Where a run with ``patience`` must stop, worked out from a full run's test records."""
    top, since = None, 0
    for record in tests:
        value = record["outputs"][output]
        if top is None or value > top:
            top, since = value, 0
        else:
            since += 1
            if since >= patience:
                return record["iteration"]
    return None


def check_keep_best(tmp_path: Any, dataset: Any, engine: List[str]) -> None:  # noqa: F811
    runs = {name: setup_run(tmp_path / name, dataset, max_iter=60, snapshot=10, test_interval=10, base_lr=0.02)
            for name in ("full", "best", "patience", "resumed")}
    full = caffe_ft(runs["full"], "train", "solver.prototxt", "--metrics", "m.jsonl", *engine)
    assert full.returncode == 0, full.stderr
    kept = caffe_ft(runs["best"], "train", "solver.prototxt", "--metrics", "m.jsonl", "--keep-best", "accuracy",
                    *engine)
    assert kept.returncode == 0, kept.stderr

    tests = passes_recorded(os.path.join(runs["full"], "m.jsonl"))
    accuracies = [t["outputs"]["accuracy"] for t in tests]
    at = tests[accuracies.index(max(accuracies))]["iteration"]  # the first of the best
    assert at > 0
    snap_full, snap_best = os.path.join(runs["full"], "snap"), os.path.join(runs["best"], "snap")
    with open(os.path.join(snap_best, "best.caffemodel"), "rb") as handle, \
            open(os.path.join(snap_best, f"run_iter_{at}.caffemodel"), "rb") as snapshot:
        assert handle.read() == snapshot.read()
    # Nothing else changes: the same snapshots, byte for byte, and the same metrics.
    assert sorted(os.listdir(snap_best)) == sorted(os.listdir(snap_full) + ["best.caffemodel"])
    for name in os.listdir(snap_full):
        with open(os.path.join(snap_full, name), "rb") as a, open(os.path.join(snap_best, name), "rb") as b:
            assert a.read() == b.read(), name
    assert [(t["iteration"], t["outputs"]) for t in passes_recorded(os.path.join(runs["best"], "m.jsonl"))] == [
        (t["iteration"], t["outputs"]) for t in tests]
    assert f"best accuracy: {max(accuracies):.4f} at iteration {at}" in kept.stderr
    assert f"last accuracy: {accuracies[-1]:.4f} at iteration 60" in kept.stderr

    stop = expected_stop(tests, "accuracy", 1)
    assert stop is not None and stop < 60, accuracies  # the data must give the test something to stop at
    early = caffe_ft(runs["patience"], "train", "solver.prototxt", "--metrics", "m.jsonl", "--keep-best",
                     "accuracy", "--patience", "1", *engine)
    assert early.returncode == 0, early.stderr
    assert f"stopped early at iteration {stop}" in early.stderr
    metrics = os.path.join(runs["patience"], "m.jsonl")
    assert [(t["iteration"], t["outputs"]) for t in passes_recorded(metrics)] == [
        (t["iteration"], t["outputs"]) for t in tests if t["iteration"] <= stop]
    assert [r["iteration"] for r in train_records(metrics)] == list(range(stop))
    with open(os.path.join(runs["patience"], "snap", f"run_iter_{stop}.caffemodel"), "rb") as a, \
            open(os.path.join(snap_full, f"run_iter_{stop}.caffemodel"), "rb") as b:
        assert a.read() == b.read()

    # Stopped where a test was no better than an earlier one and resumed: the
    # resumed run carries the best over and ends with the same best.caffemodel.
    parts = runs["resumed"]
    stopped = caffe_ft(parts, "train", "solver.prototxt", "--metrics", "m.jsonl", "--keep-best", "accuracy",
                       "--stop-after", str(stop), *engine)
    assert stopped.returncode == 130, stopped.stderr
    resumed = run_resume(parts, resume_line(stopped.stderr))
    assert resumed.returncode == 0, resumed.stderr
    top = max(a for t, a in zip(tests, accuracies) if t["iteration"] < stop)
    assert f"keep-best: before iteration {stop}, best accuracy {top:.4f}" in resumed.stderr
    with open(os.path.join(parts, "snap", "best.caffemodel"), "rb") as a, \
            open(os.path.join(snap_best, "best.caffemodel"), "rb") as b:
        assert a.read() == b.read()
    assert f"best accuracy: {max(accuracies):.4f} at iteration {at}" in resumed.stderr


@pytest.mark.caffe
def test_pycaffe_keeps_the_best_and_stops_early(tmp_path, dataset) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    check_keep_best(tmp_path, dataset, [])


@pytest.mark.host
def test_torch_keeps_the_best_and_stops_early(tmp_path, dataset) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    check_keep_best(tmp_path, dataset, ["--engine", "torch", "--cpu"])
