"""The evaluation numbers on predictions made here (no Caffe): scikit-learn agrees, edge cases hold."""

from __future__ import annotations

import json

import numpy as np
import pytest

from caffe_ft.cli import main
from caffe_ft.errors import CaffeFtError
from caffe_ft.evaluation import report
from caffe_ft.evaluation.metrics import Predictions, calibration, evaluate, softmax, top_k_hits

from conftest import cli_runner


def random_predictions(count=200, classes=6, seed=0, skip_class=None):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, count)
    if skip_class is not None:
        labels[labels == skip_class] = (skip_class + 1) % classes
    scores = rng.normal(size=(count, classes))
    scores[np.arange(count), labels] += 1.0
    return Predictions(softmax(scores), labels, [f"img{i}.png" for i in range(count)])


def test_numbers_agree_with_scikit_learn():
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    predictions = random_predictions(skip_class=4)  # a class never seen: zero support, no division error
    result = evaluate(predictions, top_k=(1, 3, 6, 9))
    labels, predicted = predictions.labels, predictions.predicted
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=range(6),
                                                                     zero_division=0)
    assert [row["precision"] for row in result.per_class] == pytest.approx(precision)
    assert [row["recall"] for row in result.per_class] == pytest.approx(recall)
    assert [row["f1"] for row in result.per_class] == pytest.approx(f1)
    assert [row["support"] for row in result.per_class] == list(support) and support[4] == 0
    assert result.confusion == confusion_matrix(labels, predicted, labels=range(6)).tolist()
    assert sum(map(sum, result.confusion)) == result.count == 200
    assert sorted(result.top_k) == [1, 3]  # k >= the number of classes says nothing
    top3 = np.argsort(-predictions.probs, axis=1)[:, :3]
    assert result.top_k[3] == pytest.approx(np.mean([label in row for label, row in zip(labels, top3)]))
    json.dumps(result.as_json(), allow_nan=False)


def test_top_k_follows_caffe_on_ties():
    """Caffe's Accuracy counts a hit when fewer than k classes score strictly higher."""
    scores = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 1.0], [3.0, 2.0, 1.0]])
    labels = np.array([1, 2, 2])
    assert top_k_hits(scores, labels, 1).tolist() == [True, False, False]
    assert top_k_hits(scores, labels, 2).tolist() == [True, True, False]


def test_expected_calibration_error():
    confidence = np.full(10, 0.8)
    assert calibration(confidence, np.arange(10) < 8)["ece"] == pytest.approx(0.0)
    assert calibration(np.full(4, 0.6), np.ones(4, bool))["ece"] == pytest.approx(0.4)
    mixed = calibration(np.array([0.0, 0.95, 1.0]), np.array([False, True, False]))
    assert [b["count"] for b in mixed["bins"]] == [1, 2]  # 0 in the first bin, 1 in the last
    assert mixed["ece"] == pytest.approx(2 / 3 * abs(0.5 - 0.975))


def test_mistakes_and_bad_labels():
    predictions = random_predictions(count=50, classes=3)
    result = evaluate(predictions, mistakes=4)
    wrong = [m for m in result.mistakes]
    assert len(wrong) == 4 and all(m["label"] != m["predicted"] for m in wrong)
    assert [m["confidence"] for m in wrong] == sorted((m["confidence"] for m in wrong), reverse=True)
    predictions.labels[3] = 3
    with pytest.raises(CaffeFtError, match="label 3 is outside the net's 3 classes"):
        evaluate(predictions)
    with pytest.raises(CaffeFtError, match="2 class names for a net with 3 outputs"):
        evaluate(random_predictions(classes=3), names=["a", "b"])


def test_predictions_file_round_trip(tmp_path):
    predictions = random_predictions(count=5, classes=2)
    predictions.meta["weights"] = "w.caffemodel"
    path = str(tmp_path / "p.npz")
    predictions.save(path)
    loaded = Predictions.load(path)
    assert np.array_equal(loaded.probs, predictions.probs) and loaded.sources == predictions.sources
    assert loaded.meta["weights"] == "w.caffemodel"
    np.savez(str(tmp_path / "other.npz"), x=np.zeros(2))
    with pytest.raises(CaffeFtError, match="not a caffe-ft predictions file"):
        Predictions.load(str(tmp_path / "other.npz"))


def test_report_json_renders_the_same_page(tmp_path):
    """report.json holds what the page shows: rendering it again gives the same bytes."""
    predictions = random_predictions(count=30, classes=3)
    run = report.RunInfo("run", "train", "done", {"base_lr": 0.01})
    html, json_path = report.write(str(tmp_path / "out"), report.build(run, evaluate(predictions), predictions))
    again = tmp_path / "again.html"
    result = cli_runner().invoke(main, ["report", str(tmp_path / "out"), "-o", str(again)])
    assert result.exit_code == 0, result.stderr
    assert again.read_bytes() == open(html, "rb").read()
    assert "accuracy" in result.stdout and "base_lr" in result.stdout


def test_report_and_train_report_errors_are_one_line(tmp_path):
    other = tmp_path / "x.json"
    other.write_text('{"a": 1}')
    result = cli_runner().invoke(main, ["report", str(other)])
    assert result.exit_code == 2 and result.stderr == f"caffe-ft: error: {other}: not a caffe-ft report.json\n"
    result = cli_runner().invoke(main, ["train", "solver.prototxt", "--report", str(tmp_path / "r")])
    assert result.exit_code == 2
    assert result.stderr == "caffe-ft: error: a training report needs a metrics file (give --metrics)\n"
    assert not (tmp_path / "r").exists()
