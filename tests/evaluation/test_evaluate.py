"""``caffe-ft evaluate`` and the run reports, against real Caffe.

The oracle for evaluate's numbers is Caffe itself: a TEST pass of a
train_val net (its ImageData layer reading the same list, its Accuracy
layers scoring) through pycaffe; the per-class numbers are checked against
scikit-learn on the saved predictions.  The digits net is trained here for
real (interrupted and resumed, with --report); the nsfw ResNet-50 runs on
generated images.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest

from caffe_ft.cli import main
from caffe_ft.formats import prototext
from caffe_ft.formats.files import load_net

from conftest import NSFW_DIR, REPO, cli_runner

pytestmark = pytest.mark.caffe
DIGITS = os.path.join(REPO, "examples", "digits")


def caffe_ft(cwd, *args):
    return subprocess.run([sys.executable, "-m", "caffe_ft.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=300)


def invoke(*args):
    return cli_runner().invoke(main, list(args), catch_exceptions=False)


def caffe_test_pass(net_text, weights, batches, blobs):
    """Run a TEST net ``batches`` times through pycaffe: per-batch copies of ``blobs``."""
    os.environ.setdefault("GLOG_minloglevel", "2")
    import caffe
    import tempfile

    caffe.set_mode_cpu()
    with tempfile.NamedTemporaryFile("w", suffix=".prototxt", delete=False) as handle:
        handle.write(net_text)
    try:
        net = caffe.Net(handle.name, weights, caffe.TEST)
    finally:
        os.unlink(handle.name)
    seen = {name: [] for name in blobs}
    for _ in range(batches):
        net.forward()
        for name in blobs:
            seen[name].append(net.blobs[name].data.copy())
    return seen


def with_accuracy_layers(net, scores, label, top_ks):
    """``net`` with an Accuracy layer per k in ``top_ks`` reading ``scores``."""
    for k in top_ks:
        layer = net.layer.add()
        layer.name, layer.type = f"check_top{k}", "Accuracy"
        layer.bottom.extend([scores, label])
        layer.top.append(f"check_top{k}")
        layer.accuracy_param.top_k = k
        layer.include.add().phase = 1  # TEST
    return net


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """DigitsNet trained on the digits 0-4 with --report, interrupted at 30 and resumed to 60."""
    folder = str(tmp_path_factory.mktemp("digits"))
    spec = importlib.util.spec_from_file_location("digits_demo", os.path.join(DIGITS, "demo.py"))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    lists = demo.write_images(folder, per_class=20)
    with open(lists["pretrain_val"]) as handle:
        val = handle.read().splitlines()[:100]
    val_list = os.path.join(folder, "val100.txt")
    with open(val_list, "w") as handle:
        handle.write("\n".join(val) + "\n")
    run = os.path.join(folder, "run")
    done = caffe_ft(folder, "rewrite", os.path.join(DIGITS, "train_val.prototxt"), "--solver",
                    os.path.join(DIGITS, "solver.prototxt"), "--strategy", "full", "--num-classes", "5",
                    "--new-name", "fc2", "--head-lr-mult", "1", "--lr-scale", "1", "--step-scale", "1",
                    "--max-iter", "60", "--val-batch-size", "25", "--train-data", lists["pretrain_train"],
                    "--val-data", val_list, "-o", run, "--force")
    assert done.returncode == 0, done.stderr
    report = os.path.join(run, "report")
    stopped = caffe_ft(run, "train", "solver.prototxt", "--cpu", "--metrics", "metrics.jsonl", "--report", report,
                       "--stop-after", "30")
    assert stopped.returncode == 130, stopped.stderr
    interrupted = json.load(open(os.path.join(report, "report.json")))
    resume = [line for line in stopped.stderr.splitlines() if line.startswith("resume with: ")]
    command = shlex.split(resume[0][len("resume with: "):])
    assert "--report" in command
    resumed = subprocess.run([sys.executable, "-m", "caffe_ft.cli", *command[1:]], cwd=run, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, universal_newlines=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    weights = [name for name in os.listdir(run) if name.endswith("_iter_60.caffemodel")]
    assert weights, os.listdir(run)
    return {"folder": folder, "run": run, "val": val_list, "weights": os.path.join(run, weights[0]),
            "report": report, "interrupted": interrupted}


def test_digits_accuracy_equals_caffe_accuracy_layer(digits, schema, tmp_path):
    saved = str(tmp_path / "predictions.npz")
    result = invoke("evaluate", os.path.join(digits["run"], "train_val.prototxt"), "--weights", digits["weights"],
                    "--data", digits["val"], "--json", "--top-k", "2", "--top-k", "3", "--predictions", saved,
                    "--batch-size", "16")
    assert result.exit_code == 0, result.stderr
    numbers = json.loads(result.stdout)
    # Caffe's TEST pass over the same list: 4 batches of 25, Accuracy with top_k 1, 2, 3.
    net = load_net(os.path.join(digits["run"], "train_val.prototxt"), schema)
    scores = next(layer for layer in net.layer if layer.type == "Accuracy").bottom[0]
    for layer in net.layer:
        if layer.type == "ImageData" and layer.include[0].phase == 1:
            layer.image_data_param.source = digits["val"]
            layer.image_data_param.batch_size = 25
    with_accuracy_layers(net, scores, "label", (1, 2, 3))
    seen = caffe_test_pass(prototext.print_message(net), digits["weights"], 4,
                           [scores, "label", "check_top1", "check_top2", "check_top3"])
    caffe_top = {k: float(np.mean(seen[f"check_top{k}"])) for k in (1, 2, 3)}
    assert 0.3 < caffe_top[1] < 1.0  # a trained net, with some mistakes to look at
    assert numbers["count"] == 100
    assert numbers["accuracy"] == pytest.approx(caffe_top[1], abs=1e-6)
    assert numbers["top_k"]["2"] == pytest.approx(caffe_top[2], abs=1e-6)
    assert numbers["top_k"]["3"] == pytest.approx(caffe_top[3], abs=1e-6)
    assert sum(map(sum, numbers["confusion"])) == 100
    assert numbers["meta"]["probabilities"] == "softmax of the scores"
    # The saved probabilities are the softmax of Caffe's own scores, image by image.
    from caffe_ft.evaluation.metrics import Predictions, softmax

    predictions = Predictions.load(saved)
    caffe_scores = np.concatenate(seen[scores]).reshape(100, -1)
    np.testing.assert_allclose(predictions.probs, softmax(caffe_scores), atol=1e-5)
    np.testing.assert_array_equal(predictions.labels, np.concatenate(seen["label"]).astype(int))
    check_against_sklearn(numbers, predictions)


def check_against_sklearn(numbers, predictions):
    """Per-class numbers, confusion matrix and averages as scikit-learn computes them on the saved predictions."""
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix

    labels, predicted = predictions.labels, predictions.probs.argmax(axis=1)
    classes = list(range(predictions.probs.shape[1]))
    expected = classification_report(labels, predicted, labels=classes, output_dict=True, zero_division=0)
    for index, row in enumerate(numbers["per_class"]):
        for name in ("precision", "recall", "f1"):
            assert row[name] == pytest.approx(expected[str(index)][name if name != "f1" else "f1-score"])
        assert row["support"] == expected[str(index)]["support"]
    assert numbers["macro"]["f1"] == pytest.approx(expected["macro avg"]["f1-score"])
    assert numbers["weighted"]["precision"] == pytest.approx(expected["weighted avg"]["precision"])
    assert numbers["confusion"] == confusion_matrix(labels, predicted, labels=classes).tolist()
    assert numbers["accuracy"] == pytest.approx(accuracy_score(labels, predicted))
    confident = predictions.probs.max(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    assert [m["index"] for m in numbers["mistakes"]] == sorted(wrong, key=lambda i: -confident[i])[:10]


def test_digits_deploy_net_gives_the_same_numbers(digits):
    """The deploy net (a Softmax output) and the train_val net agree."""
    args = ["--weights", digits["weights"], "--data", digits["val"], "--json"]
    from_train_val = json.loads(invoke("evaluate", os.path.join(digits["run"], "train_val.prototxt"), *args).stdout)
    deploy = invoke("evaluate", os.path.join(digits["run"], "deploy.prototxt"), *args, "--scale", "0.00390625")
    assert deploy.exit_code == 0, deploy.stderr
    numbers = json.loads(deploy.stdout)
    assert numbers["meta"]["probabilities"] == "the net's Softmax"
    assert numbers["confusion"] == from_train_val["confusion"]
    assert numbers["ece"] == pytest.approx(from_train_val["ece"], abs=1e-5)


def test_report_of_an_interrupted_and_resumed_run_covers_it_all(digits):
    report = json.load(open(os.path.join(digits["report"], "report.json")))
    interrupted = digits["interrupted"]
    assert interrupted["status"] == "interrupted" and interrupted["curves"]["last_iteration"] == 29
    assert report["status"] == "done"
    train = report["curves"]["train"]
    assert [x for x, _ in train] == list(range(60))  # every iteration, once, across both sessions
    tests = report["curves"]["tests"]["accuracy"]
    assert tests[0][0] == 0 and tests[-1][0] == 60
    assert report["settings"]["resumed from"].endswith("_iter_30.solverstate")
    evaluation = report["evaluation"]
    assert evaluation["count"] == 100 and evaluation["meta"]["weights"].endswith("_iter_60.caffemodel")
    # The last test pass recorded (Caffe's Accuracy on the same 100 images) is evaluate's accuracy.
    assert evaluation["accuracy"] == pytest.approx(tests[-1][1], abs=1e-6)
    assert len(report["worst"]) == 24 and all(item["image"].startswith("data:image/png;base64,")
                                             for item in report["worst"])
    page = open(os.path.join(digits["report"], "report.html"), encoding="utf-8").read()
    for section in ("settings", "curves", "evaluation", "confusion", "per-class", "worst", "timings", "files"):
        assert f'<section id="{section}">' in page
    compared = invoke("report", digits["report"], os.path.join(digits["report"], "report.json"))
    assert compared.exit_code == 0 and "accuracy" in compared.stdout


def nsfw_train_val(schema, source, batch):
    """The nsfw deploy net with an ImageData TEST input (its mean, 224x224) and Accuracy layers."""
    net = load_net(os.path.join(NSFW_DIR, "deploy.prototxt"), schema)
    data = net.layer[0]
    assert data.type == "Input"
    data.ClearField("input_param")
    data.type = "ImageData"
    data.top.append("label")
    data.transform_param.mean_value.extend([104, 117, 123])
    data.image_data_param.source = source
    data.image_data_param.batch_size = batch
    data.image_data_param.new_height = data.image_data_param.new_width = 224
    return with_accuracy_layers(net, "fc_nsfw", "label", (1,))


def test_nsfw_resnet50_accuracy_equals_caffe_accuracy_layer(schema, tmp_path):
    from synth_images import write_dataset

    images = write_dataset(str(tmp_path / "images"), "photo", per_class=3, classes=2, size=240)
    net = nsfw_train_val(schema, images, 3)
    train_val = tmp_path / "train_val.prototxt"
    train_val.write_text(prototext.print_message(net))
    weights = os.path.join(NSFW_DIR, "resnet_50_1by2_nsfw.caffemodel")
    saved = str(tmp_path / "p.npz")
    result = invoke("evaluate", str(train_val), "--weights", weights, "--data", images, "--json",
                    "--predictions", saved, "--batch-size", "4")
    assert result.exit_code == 0, result.stderr
    numbers = json.loads(result.stdout)
    seen = caffe_test_pass(prototext.print_message(net), weights, 2, ["check_top1", "prob"])
    assert numbers["count"] == 6 and sum(map(sum, numbers["confusion"])) == 6
    assert numbers["accuracy"] == pytest.approx(float(np.mean(seen["check_top1"])), abs=1e-6)
    assert numbers["top_k"] == {"1": numbers["accuracy"]}  # top-5 of 2 classes is dropped
    from caffe_ft.evaluation.metrics import Predictions

    predictions = Predictions.load(saved)
    np.testing.assert_allclose(predictions.probs, np.concatenate(seen["prob"]).reshape(6, 2), atol=1e-5)
    check_against_sklearn(numbers, predictions)
    # The deploy net as it ships, told the transform: the same probabilities.
    deploy = invoke("evaluate", os.path.join(NSFW_DIR, "deploy.prototxt"), "--weights", weights, "--data", images,
                    "--json", "--mean-value", "104", "--mean-value", "117", "--mean-value", "123")
    assert deploy.exit_code == 0, deploy.stderr
    assert json.loads(deploy.stdout)["confusion"] == numbers["confusion"]


def test_evaluate_errors_are_one_line(digits, tmp_path):
    bad = tmp_path / "bad.txt"
    image = sorted(os.listdir(os.path.join(digits["folder"], "images")))[0]
    bad.write_text(f"{os.path.join(digits['folder'], 'images', image)} 7\n")
    saved = tmp_path / "p.npz"
    result = invoke("evaluate", os.path.join(digits["run"], "deploy.prototxt"), "--weights", digits["weights"],
                    "--data", str(bad), "--predictions", str(saved))
    assert result.exit_code == 2 and not saved.exists()
    assert result.stderr == f"caffe-ft: error: {bad}:1: label 7 of '{os.path.join(digits['folder'], 'images', image)}' " \
                            "is outside the net's 5 classes (0-4)\n"  # before the net runs
    # Weights of another net would leave every layer with its fillers' values: refused before Caffe runs.
    result = invoke("evaluate", os.path.join(digits["run"], "deploy.prototxt"), "--weights",
                    os.path.join(NSFW_DIR, "resnet_50_1by2_nsfw.caffemodel"), "--data", digits["val"])
    assert result.exit_code == 2
    assert result.stderr.startswith("caffe-ft: error: ") and "no weights for layers conv1" in result.stderr


def test_finetune_writes_a_report_of_the_job(digits, tmp_path):
    folder = digits["folder"]
    outdir = str(tmp_path / "ft")
    done = caffe_ft(folder, "finetune", os.path.join(digits["run"], "train_val.prototxt"), "--weights",
                    digits["weights"], "--strategy", "last-fc", "--num-classes", "5", "--cpu", "--force",
                    "--train-data", os.path.join(folder, "finetune_train.txt"),
                    "--val-data", os.path.join(folder, "finetune_val.txt"), "--solver",
                    os.path.join(DIGITS, "solver.prototxt"), "--max-iter", "20", "--batch-size", "16",
                    "--val-batch-size", "50", "-o", outdir)
    assert done.returncode == 0, done.stderr
    report = json.load(open(os.path.join(outdir, "report.json")))
    with open(os.path.join(folder, "finetune_val.txt")) as handle:
        images = sum(1 for line in handle if line.strip())
    assert report["kind"] == "finetune" and report["strategy"] == "last-fc" and report["status"] == "done"
    assert report["settings"]["max_iter"] == 20 and report["settings"]["pretrained weights"] == digits["weights"]
    evaluation = report["evaluation"]
    assert evaluation["count"] == images and sum(map(sum, evaluation["confusion"])) == images
    assert evaluation["meta"]["weights"] == os.path.join(outdir, "final.caffemodel")
    assert report["curves"]["last_iteration"] == 20
    written = {os.path.basename(item["path"]) for item in report["files"]}
    assert {"final.caffemodel", "metrics.jsonl", "summary.md", "report.html", "report.json"} <= written
    page = open(os.path.join(outdir, "report.html"), encoding="utf-8").read()
    assert page.count('src="data:image/png;base64,') == 2 + len(report["worst"])  # curves, calibration, images
