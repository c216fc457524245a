"""caffe_ft.recipe.advise: measurements at candidate cuts (linear probe, kNN,
LogME), the rule, and ``caffe-ft advise`` on the benchmark's digits task (the nsfw
ResNet-50 is advised in tests/test_examples.py's run of examples/nsfw_resnet50)."""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest

from caffe_ft.recipe import advise as adv

from conftest import cli_runner  # noqa: E402
from ft_nets import CAFFENET  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIGITS_NET = os.path.join(REPO, "examples", "digits", "train_val.prototxt")

# --------------------------------------------------------------------------
# LogME


def _log_evidence(F, y, alpha, beta):
    """log p(y | F, alpha, beta) evaluated directly: y ~ N(0, I / beta + F F^T / alpha)."""
    n = len(y)
    cov = np.eye(n) / beta + F @ F.T / alpha
    _, logdet = np.linalg.slogdet(cov)
    return -0.5 * (n * math.log(2 * math.pi) + logdet + y @ np.linalg.solve(cov, y))


def _fixed_point(F, y):
    """The paper's iteration written naively (matrix inverse, no SVD)."""
    alpha, beta = 1.0, 1.0
    A = F.T @ F
    eig = np.linalg.eigvalsh(A)
    for _ in range(200):
        gamma = float((beta * eig / (alpha + beta * eig)).sum())
        m = beta * np.linalg.solve(alpha * np.eye(len(A)) + beta * A, F.T @ y)
        alpha, beta = gamma / (m @ m), (len(y) - gamma) / np.sum((F @ m - y) ** 2)
    return alpha, beta


@pytest.mark.parametrize("n, dims", [(40, 5), (20, 30)])  # more examples than features, and fewer
def test_logme_is_the_maximised_evidence_of_a_bayesian_linear_model(n, dims):
    rng = np.random.default_rng(n)
    F = rng.normal(size=(n, dims))
    labels = (F[:, :3].sum(axis=1) + 0.3 * rng.normal(size=n) > 0).astype(int)
    direct = []
    for label in (0, 1):
        y = (labels == label).astype(float)
        alpha, beta = _fixed_point(F, y)
        best = _log_evidence(F, y, alpha, beta)
        # the fixed point is a maximum of the evidence over alpha and beta
        for da, db in ((1.2, 1), (1 / 1.2, 1), (1, 1.2), (1, 1 / 1.2)):
            assert _log_evidence(F, y, alpha * da, beta * db) < best
        direct.append(best / n)
    assert adv.logme(F, labels) == pytest.approx(np.mean(direct), rel=1e-6)


def test_logme_where_the_labels_fit_without_noise():
    """As many independent features as examples, one of them the label: the
    evidence rises towards a finite limit as beta grows without end (the fixed
    point never settles); LogME is that limit, not a crash or an overflow."""
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 6)
    F = np.hstack([np.eye(2)[labels] * 10, 0.01 * rng.normal(size=(12, 10))])
    found = adv.logme(F, labels)
    grid = [np.mean([_log_evidence(F, (labels == label).astype(float), a, b) for label in (0, 1)]) / 12
            for a in np.logspace(-3, 3, 13) for b in np.logspace(0, 9, 10)]
    assert math.isfinite(found) and found >= max(grid) - 1e-6


def test_logme_of_zero_features_is_the_evidence_of_noise():
    labels = np.repeat([0, 1, 2], [4, 4, 2])
    expected = [(math.log(10 / count) - math.log(2 * math.pi) - 1) / 2 for count in (4, 4, 2)]
    assert adv.logme(np.zeros((10, 5)), labels) == pytest.approx(np.mean(expected), rel=1e-12)


def test_logme_prefers_features_that_carry_the_labels():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 30)
    informative = np.eye(3)[labels] * 3 + rng.normal(size=(90, 3))
    noise = rng.normal(size=(90, 3))
    assert adv.logme(informative, labels) > adv.logme(noise, labels)


# --------------------------------------------------------------------------
# kNN, probes, summaries


def test_balanced_accuracy_is_the_mean_recall():
    labels = np.array([0, 0, 0, 0, 1, 1])
    assert adv.balanced_accuracy(labels, np.zeros(6, int)) == 0.5  # 4/6 accurate, but class 1 never found
    assert adv.balanced_accuracy(labels, np.array([0, 0, 0, 1, 1, 0])) == pytest.approx((3 / 4 + 1 / 2) / 2)


def test_knn_is_leave_one_out_cosine_majority():
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import LeaveOneOut, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(3)
    labels = np.repeat([0, 1, 2], [25, 15, 5])
    X = rng.normal(size=(45, 6)) + np.eye(3, 6)[labels] * 1.5
    by_hand = balanced_accuracy_score(labels, cross_val_predict(
        KNeighborsClassifier(5, metric="cosine", algorithm="brute"), X, labels, cv=LeaveOneOut()))
    assert adv.knn_accuracy(X, labels, 5) == pytest.approx(by_hand)
    assert 0.4 < by_hand < 1.0  # a test that could fail either way
    # scale does not matter to cosine; an example never votes for itself
    assert adv.knn_accuracy(X * 7.0, labels, 5) == pytest.approx(by_hand)
    duplicated = np.concatenate([X, X])
    assert adv.knn_accuracy(duplicated, np.concatenate([labels, labels]), 1) == 1.0


def test_knn_k_leaves_the_smallest_class_one_short():
    assert adv.knn_k(np.array([0] * 50 + [1] * 50)) == adv.KNN_K
    assert adv.knn_k(np.array([0] * 50 + [1] * 4)) == 3
    assert adv.knn_k(np.array([0] * 5 + [1])) == 1


def test_spatial_maps_are_summarised_per_channel():
    blob = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    rows = adv.summarise(blob, flat=False)
    assert rows.shape == (2, 6)
    np.testing.assert_allclose(rows[:, :3], blob.mean(axis=(2, 3)))
    np.testing.assert_allclose(rows[:, 3:], blob.std(axis=(2, 3)))
    assert adv.summarise(blob, flat=True).shape == (2, 12)  # the penultimate: what the head reads
    assert adv.summarise(blob[:, :, :1, :1], flat=False).shape == (2, 3)
    assert adv.summarise(np.zeros((2, adv.MAX_FLAT + 1, 1, 1)), flat=True).shape == (2, adv.MAX_FLAT + 1)


def test_cuts_come_from_the_stage_outputs(parse_net):
    with open(DIGITS_NET) as handle:
        cuts = adv.choose_cuts(parse_net(handle.read()), "fc1")
    assert [(cut.role, cut.blob, cut.layer) for cut in cuts] == [
        ("penultimate", "fc1", "fc1"), ("middle", "pool2", "pool2"), ("early", "pool1", "pool1")]
    assert cuts[0].depth == 1.0 and 0 < cuts[2].depth < cuts[1].depth < 1
    net = parse_net(CAFFENET)  # a single pooling layer: no middle cut
    assert [(cut.role, cut.blob) for cut in adv.choose_cuts(net, "fc7")] == [("penultimate", "fc7"),
                                                                           ("early", "pool1")]
    assert [cut.role for cut in adv.choose_cuts(net, "conv1")] == ["penultimate"]


# --------------------------------------------------------------------------
# The rule


def _measured(probes, size=300, counts=None, logmes=None):
    roles = ["penultimate", "middle", "early"][:len(probes)]
    cuts = []
    for index, (role, probe) in enumerate(zip(roles, probes)):
        numbers = adv.CutNumbers(adv.Cut(role, f"b{index}", f"l{index}", 1.0 - index / 3), 10, probe=probe)
        numbers.logme = (logmes or [0.0] * len(probes))[index]
        cuts.append(numbers)
    return adv.Measurements(size, counts or {0: size // 2, 1: size - size // 2}, min(size, 2000), 2000, cuts)


def test_rule_features_suffice():
    advice = adv.recommend(_measured([0.95, 0.93, 0.7]))
    assert advice.strategy == "features" and advice.rule.startswith("2 ")
    assert advice.flags() == ["--strategy", "features"]


def test_rule_an_earlier_cut_clearly_better_is_kept():
    advice = adv.recommend(_measured([0.7, 0.95, 0.8], logmes=[-1.0, -0.5, -0.8]))
    assert (advice.strategy, advice.freeze_until) == ("top", "l1") and advice.rule.startswith("1 ")
    assert advice.flags() == ["--strategy", "top", "--freeze-until", "l1"]
    large = adv.recommend(_measured([0.7, 0.95, 0.8], size=50000, logmes=[-1.0, -0.5, -0.8]))
    assert large.strategy == "full" and large.freeze_until is None
    # LogME disagreeing, or a gap within the noise, does not count
    assert adv.recommend(_measured([0.7, 0.95, 0.8], logmes=[-0.4, -0.5, -0.8])).rule.startswith("3 ")
    assert adv.recommend(_measured([0.7, 0.78, 0.6], size=60)).rule.startswith("3 ")


def test_rule_features_fall_short():
    small = adv.recommend(_measured([0.7, 0.72, 0.6]))
    assert (small.strategy, small.layer_decay) == ("full", adv.SMALL_DATA_DECAY)
    large = adv.recommend(_measured([0.7, 0.72, 0.6], size=20000))
    assert (large.strategy, large.layer_decay) == ("full", None)


def test_unbalanced_classes_add_class_weights():
    advice = adv.recommend(_measured([0.7], counts={0: 100, 1: 20}))
    assert advice.class_weights and advice.flags()[-2:] == ["--class-weights", "auto"]
    assert not adv.recommend(_measured([0.7], counts={0: 60, 1: 20})).class_weights
    # a head fitted by scikit-learn takes no class weights: said, not advised
    features = adv.recommend(_measured([0.95], counts={0: 100, 1: 20}))
    assert not features.class_weights and "no class weights" in features.reason


def test_report_and_json_show_the_same_numbers():
    advice = adv.recommend(_measured([0.95, 0.93, 0.7]))
    text = advice.report()
    assert "penultimate  b0   " in text and "rule: 2 (features suffice)" in text
    data = advice.as_dict()
    assert [cut["probe"] for cut in data["cuts"]] == [0.95, 0.93, 0.7]
    assert data["strategy"] == "features" and data["rule"] == advice.rule


# --------------------------------------------------------------------------
# With Caffe: the demo's digits, the nsfw ResNet-50


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The benchmark's digits task (DigitsNet pretrained on 0-4 briefly, an
    unbalanced list of 5-9: 60 of one digit, 8 of each other)."""
    import sys

    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import bench_recipes

    outdir = str(tmp_path_factory.mktemp("digits"))
    train, _, weights, counts = bench_recipes.digits_task(outdir, 60, 8, pretrain_iters=100)
    return outdir, train, weights, counts


@pytest.mark.caffe
def test_digits_numbers_match_a_direct_measurement(digits, monkeypatch):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import LeaveOneOut, StratifiedKFold, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from caffe_ft.cli import main
    from caffe_ft.formats.schema import load_schema
    from caffe_ft.heads.cache import Request, compute_or_reuse

    outdir, train, weights, counts = digits
    monkeypatch.chdir(outdir)
    done = cli_runner().invoke(main, ["advise", "pretrain/train_val.prototxt", "--weights", weights,
                                      "--train-data", train, "--root-folder", ".", "--json"])
    assert done.exit_code == 0, done.output + done.stderr
    advice = json.loads(done.stdout)
    assert advice["dataset_size"] == advice["images_measured"] == sum(counts.values()) == 92
    assert advice["class_counts"] == {"0": 60, "1": 8, "2": 8, "3": 8, "4": 8}
    assert advice["class_weights"] == (advice["strategy"] != "features")  # 60 / 8 > 3
    assert [(cut["role"], cut["blob"], cut["values"]) for cut in advice["cuts"]] == [
        ("penultimate", "fc1", 64), ("middle", "pool2", 64), ("early", "pool1", 32)]
    penultimate = advice["cuts"][0]

    # The same features by another route: the feature cache's extract at the head's input.
    features = compute_or_reuse(Request("pretrain/train_val.prototxt", weights, train, root_folder=".", batch_size=16),
                                "fc1.npz", load_schema()).features
    assert features.meta["blob"] == "fc1"
    X, y = features.matrix.astype(np.float64), features.labels
    folds = list(StratifiedKFold(penultimate["probe_folds"], shuffle=True, random_state=0).split(X, y))
    assert penultimate["probe_folds"] == 5
    by_hand = {c: balanced_accuracy_score(y, cross_val_predict(
        make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000)), X, y, cv=folds))
        for c in adv.PROBE_CS}
    assert penultimate["probe"] == pytest.approx(max(by_hand.values()), abs=1e-9)
    assert by_hand[penultimate["probe_C"]] == pytest.approx(penultimate["probe"], abs=1e-9)
    knn = balanced_accuracy_score(y, cross_val_predict(
        KNeighborsClassifier(penultimate["knn_k"], metric="cosine", algorithm="brute"), X, y, cv=LeaveOneOut()))
    assert penultimate["knn_k"] == 7  # the smallest class has 8 images
    assert penultimate["knn"] == pytest.approx(knn, abs=1e-9)
    assert penultimate["logme"] == pytest.approx(adv.logme(X, y), rel=1e-5)
    assert 0.4 < penultimate["probe"] < 1.0 and 0.2 < penultimate["knn"] <= 1.0  # it learned something


@pytest.mark.caffe
def test_digits_report_names_the_rule_and_the_flags(digits, monkeypatch):
    from caffe_ft.cli import main

    outdir, train, weights, _ = digits
    monkeypatch.chdir(outdir)
    done = cli_runner().invoke(main, ["advise", "pretrain/train_val.prototxt", "--weights", weights,
                                      "--train-data", train, "--root-folder", ".", "--sample", "70"])
    assert done.exit_code == 0, done.output + done.stderr
    text = done.stdout
    assert "training examples: 92 (5 classes: 60 8 8 8 8)" in text
    assert "measured on 70 images (at most 70), one forward pass" in text
    assert re.search(r"^penultimate +fc1 +1\.00 +64 +\d\.\d{3} +\d\.\d{3} +-?\d+\.\d{3}$", text, re.M), text
    assert re.search(r"^rule: [123] \(", text, re.M) and "advice: " in text
    assert re.search(r"^  caffe-ft finetune NET --weights MODEL --strategy \S+", text, re.M)
    missing = cli_runner().invoke(main, ["advise", "pretrain/train_val.prototxt", "--weights", weights,
                                         "--train-data", "nothing.txt"])
    assert missing.exit_code == 2 and missing.stderr.startswith("caffe-ft: error:") and "nothing.txt" in missing.stderr
    older = cli_runner().invoke(main, ["advise", "pretrain/train_val.prototxt", "--weights", weights,
                                       "--train-data", "nothing.txt", "--val-data", "val.txt"])
    assert older.exit_code == 2 and "advise no longer reads --val-data" in older.stderr  # older scripts still parse


@pytest.mark.caffe
def test_rewrite_auto_without_similarity_takes_the_advice(digits, monkeypatch):
    from caffe_ft.cli import main

    outdir, train, weights, _ = digits
    monkeypatch.chdir(outdir)
    common = ["--weights", weights, "--train-data", train, "--root-folder", "."]
    advised = json.loads(cli_runner().invoke(main, ["advise", "pretrain/train_val.prototxt", *common, "--json"]).stdout)
    done = cli_runner().invoke(main, ["rewrite", "pretrain/train_val.prototxt", "--strategy", "auto", *common,
                                      "--val-data", "unbalanced_val.txt", "--num-classes", "5", "-o", "auto"])
    assert done.exit_code == 0, done.output + done.stderr
    assert f"auto: rule {advised['rule']}" in done.stderr
    with open(os.path.join(outdir, "auto", "summary.md")) as handle:
        summary = handle.read()
    assert summary.startswith(f"# caffe-ft rewrite: {advised['strategy']}")
    assert ("layer decay 0.5" in summary) == (advised["layer_decay"] == 0.5)
