"""caffe_ft.heads.linear: a scikit-learn head on cached features, written back as a
Caffe InnerProduct (+ Softmax) on the cut trunk (``caffe-ft linear``)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from caffe_ft.heads import linear as lin

from caffe_ft.data.sources import read_image_list

from caffe_ft.data.transform import Transform, default_transform, mean_array, override, read_image, transform_image

from caffe_ft.formats.files import load_net

from caffe_ft.heads.cache import Request, compute_or_reuse, load_features

from caffe_ft.training.pycaffe import quiet_caffe
from caffe_ft.errors import CaffeFtError

import feature_nets  # noqa: E402
from conftest import NSFW_DIR, cli_runner  # noqa: E402
from ft_nets import CAFFENET_DEPLOY  # noqa: E402

# --------------------------------------------------------------------------
# Weights arithmetic (numpy only)


def _softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def test_folded_scaler_gives_the_same_scores_on_raw_features():
    rng = np.random.default_rng(0)
    coef, intercept = rng.normal(size=(4, 6)), rng.normal(size=4)
    mean, scale = rng.normal(size=6) * 10, rng.uniform(0.01, 5, 6)
    x = rng.normal(size=(9, 6)) * 5 + mean
    weights, bias = lin.fold_scaler(coef, intercept, mean, scale)
    np.testing.assert_allclose(x @ weights.T + bias, ((x - mean) / scale) @ coef.T + intercept, rtol=1e-10, atol=1e-9)


def test_binary_expansion_keeps_the_sigmoid_and_the_sign():
    rng = np.random.default_rng(1)
    coef, intercept = rng.normal(size=(1, 5)), rng.normal(size=1)
    x = rng.normal(size=(50, 5))
    weights, bias = lin.expand_binary(coef, intercept)
    assert weights.shape == (2, 5) and bias.shape == (2,)
    scores = x @ weights.T + bias
    decision = x @ coef[0] + intercept[0]
    np.testing.assert_allclose(_softmax(scores)[:, 1], 1 / (1 + np.exp(-decision)), rtol=1e-12)
    np.testing.assert_array_equal(scores.argmax(axis=1), (decision > 0).astype(int))
    np.testing.assert_allclose(scores[:, 1] - scores[:, 0], decision, rtol=1e-12)


def test_a_tie_goes_to_class_zero_like_scikit_learn():
    weights, bias = lin.expand_binary(np.zeros((1, 3)), np.zeros(1))
    assert (np.ones((1, 3)) @ weights.T + bias).argmax() == 0


def test_multiclass_rows_are_left_alone():
    coef, intercept = np.arange(6.0).reshape(3, 2), np.arange(3.0)
    weights, bias = lin.expand_binary(coef, intercept)
    np.testing.assert_array_equal(weights, coef)
    np.testing.assert_array_equal(bias, intercept)


def test_head_weights_fold_then_expand():
    rng = np.random.default_rng(2)
    coef, intercept, mean, scale = rng.normal(size=(1, 4)), rng.normal(size=1), rng.normal(size=4), rng.uniform(1, 2, 4)
    weights, bias = lin.head_weights(coef, intercept, mean, scale)
    x = rng.normal(size=(7, 4))
    np.testing.assert_allclose((x @ weights.T + bias) @ [-1, 1], ((x - mean) / scale) @ coef[0] + intercept[0])


@pytest.mark.parametrize("text, values", [("0.1,1,10", (0.1, 1.0, 10.0)), (" 2 ", (2.0,)), ("1e-3,", (0.001,))])
def test_parse_cs(text, values):
    assert lin.parse_cs(text) == values


@pytest.mark.parametrize("text", ["", "a,b", "0", "-1,2"])
def test_parse_cs_refuses_bad_values(text):
    with pytest.raises(CaffeFtError, match="--C"):
        lin.parse_cs(text)


def test_labels_outside_the_classes_or_too_rare_are_refused():
    with pytest.raises(CaffeFtError, match="label 3 is outside 0..2"):
        lin.check_labels(np.array([0, 1, 3]), 3, "training features")
    with pytest.raises(CaffeFtError, match="class\\(es\\) 2 have fewer than 2"):
        lin.check_labels(np.array([0, 0, 1, 1, 2]), 3, "training features")
    lin.check_labels(np.array([0, 2]), 3, "validation features")  # validation may lack classes


def test_head_net_appends_a_fresh_named_head(parse_net):
    trunk = parse_net(CAFFENET_DEPLOY.replace('name: "prob"', 'name: "fc_linear"'))
    net, head, output = lin.head_net(trunk, "fc7", 4, softmax=True)
    assert head == "fc_linear_2" and output == "prob_2"  # "prob" is a blob of the trunk
    added = net.layer[-2]
    assert (added.type, list(added.bottom), added.inner_product_param.num_output) == ("InnerProduct", ["fc7"], 4)
    assert net.layer[-1].type == "Softmax" and len(trunk.layer) == len(net.layer) - 2
    svm, _, scores = lin.head_net(trunk, "fc7", 4, softmax=False)
    assert svm.layer[-1].type == "InnerProduct" and scores == "fc_linear_2"


# --------------------------------------------------------------------------
# With scikit-learn and Caffe (the reference environment)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The small net, random weights and features of a 3-class photo-like set."""
    from caffe_ft.formats.schema import load_schema
    from synth_images import write_dataset

    schema = load_schema()
    root = tmp_path_factory.mktemp("linear")
    train = write_dataset(str(root / "train"), "photo", 20, classes=3, size=40, seed=11)
    val = write_dataset(str(root / "val"), "photo", 8, classes=3, size=40, seed=12)
    net = str(root / "train_val.prototxt")
    with open(net, "w") as handle:
        handle.write(feature_nets.train_val(train, val))
    weights = feature_nets.make_weights(str(root), 3)
    paths = {}
    for name, listing in (("train", train), ("val", val)):
        paths[name] = str(root / f"{name}.npz")
        compute_or_reuse(Request(net, weights, listing, layer="pool2"), paths[name], schema)
    return {"root": root, "net": net, "weights": weights, "train_list": train, "val_list": val, **paths}


def _run_head(deploy: str, weights: str, output: str, inputs: np.ndarray, use_opencv: bool) -> np.ndarray:
    """The written net's output blob for a batch of transformed images."""
    if use_opencv:
        import cv2

        net = cv2.dnn.readNetFromCaffe(deploy, weights)
        net.setInput(inputs)
        return net.forward(output).reshape(len(inputs), -1)
    caffe = quiet_caffe()
    net = caffe.Net(deploy, weights, caffe.TEST)
    net.blobs["data"].reshape(*inputs.shape)
    net.blobs["data"].data[...] = inputs
    net.forward()
    return net.blobs[output].data.reshape(len(inputs), -1).copy()


def _inputs(listing: str, net_path: str, schema) -> np.ndarray:
    transform = default_transform(load_net(net_path, schema))
    mean = mean_array(transform, schema)
    return np.stack([transform_image(read_image(path, transform), transform, mean)
                     for path, _ in read_image_list(listing)])


@pytest.mark.caffe
@pytest.mark.parametrize("classifier", ["logreg", "svm"])
@pytest.mark.parametrize("use_opencv", [False, True], ids=["pycaffe", "opencv"])
def test_written_head_predicts_what_scikit_learn_predicts(small, schema, tmp_path, classifier, use_opencv):
    train, val = load_features(small["train"]), load_features(small["val"])
    result = lin.fit(train, 3, classifier, val=val)
    head = lin.write_head(schema, result, train.meta, str(tmp_path / classifier), 3)
    scores = _run_head(head.deploy, head.weights, head.output, _inputs(small["val_list"], small["net"], schema),
                       use_opencv)
    X = val.matrix.astype(np.float64)
    np.testing.assert_array_equal(scores.argmax(axis=1), result.model.predict(X))
    if classifier == "logreg":
        np.testing.assert_allclose(scores, result.model.predict_proba(X), atol=1e-4)
    else:
        np.testing.assert_allclose(scores, result.model.decision_function(X), rtol=1e-3, atol=1e-3)
    assert result.val_accuracy == pytest.approx(float(np.mean(result.model.predict(X) == val.labels)))


@pytest.mark.caffe
def test_cross_validation_picks_the_best_c_and_reports(small):
    train = load_features(small["train"])
    result = lin.fit(train, 3, "logreg", cs=(0.001, 0.1, 10.0), folds=3)
    assert set(result.cv_scores) == {0.001, 0.1, 10.0} and result.folds == 3
    assert result.cv_scores[result.C] == max(result.cv_scores.values())
    assert result.n_train == 48 and result.n_val == 12 and "held-out 20%" in result.val_from
    report = result.report()
    assert "3-fold cross-validation accuracy: C=0.001:" in report and "validation accuracy:" in report
    single = lin.fit(train, 3, "svm", cs=(0.5,))
    assert single.C == 0.5 and single.cv_scores == {}


@pytest.mark.caffe
def test_written_files_keep_the_trunk_weights(small, schema, tmp_path):
    from caffe_ft.formats.caffemodel import load_model

    train = load_features(small["train"])
    head = lin.write_head(schema, lin.fit(train, 3, cs=(1.0,)), train.meta, str(tmp_path), 3)
    written = load_model(head.weights, schema).layer_blobs()
    source = load_model(small["weights"], schema).layer_blobs()
    for layer in ("conv1", "bn1", "scale1", "conv2"):
        for ours, theirs in zip(written[layer], source[layer]):
            np.testing.assert_array_equal(ours.data, theirs.data)
    assert "fc1" not in written and "fc2" not in written  # cut off: the features are pool2's
    assert written["fc_linear"][0].shape == (3, 16 * 4 * 4) and written["fc_linear"][1].shape == (3,)
    summary = json.load(open(head.summary))
    assert summary["feature_blob"] == "pool2" and summary["transform"]["crop_size"] == feature_nets.CROP
    assert summary["output_blob"] == "prob" and summary["classifier"] == "logreg"


@pytest.mark.caffe
def test_features_of_other_weights_are_refused(small, schema, tmp_path):
    train = load_features(small["train"])
    result = lin.fit(train, 3, cs=(1.0,))
    other = feature_nets.make_weights(str(tmp_path), 9)
    with pytest.raises(CaffeFtError, match="weights differ"):
        lin.write_head(schema, result, train.meta, str(tmp_path / "out"), 3, weights=other)


@pytest.mark.caffe
def test_linear_command(small, tmp_path):
    from caffe_ft.cli import main

    outdir = str(tmp_path / "head")
    runner = cli_runner()
    done = runner.invoke(main, ["linear", small["train"], "--num-classes", "3", "-o", outdir, "--C", "0.1,1",
                                "--folds", "3", "--val", small["val"]])
    assert done.exit_code == 0, done.output + done.stderr
    assert "validation accuracy:" in done.stdout and "validation features file" in done.stdout
    assert sorted(os.listdir(outdir)) == ["deploy.prototxt", "linear.caffemodel", "linear.json"]
    wrong = runner.invoke(main, ["linear", small["train"], "--num-classes", "2", "-o", outdir])
    assert wrong.exit_code == 2 and "label 2 is outside 0..1" in wrong.stderr


@pytest.mark.caffe
@pytest.mark.parametrize("use_opencv", [False, True], ids=["pycaffe", "opencv"])
def test_binary_head_on_nsfw_resnet(tmp_path, schema, use_opencv):
    """Two classes: scikit-learn's single row becomes a two-output Softmax head."""
    from synth_images import write_dataset

    net = os.path.join(NSFW_DIR, "deploy.prototxt")
    weights = os.path.join(NSFW_DIR, "resnet_50_1by2_nsfw.caffemodel")
    listing = write_dataset(str(tmp_path / "img"), "photo", 10, classes=2, size=256, seed=21)
    transform = {"new_height": 256, "new_width": 256, "crop_size": 224, "mean_values": (104.0, 117.0, 123.0)}
    features = compute_or_reuse(Request(net, weights, listing, transform=transform, batch_size=10),
                                   str(tmp_path / "f.npz"), schema).features
    result = lin.fit(features, 2, "logreg", cs=(0.1,), val_fraction=0.3)
    assert result.model[-1].coef_.shape[0] == 1
    head = lin.write_head(schema, result, features.meta, str(tmp_path / "head"), 2)
    prepared = override(Transform(), **transform)
    inputs = np.stack([transform_image(read_image(path, prepared), prepared, mean_array(prepared, schema))
                       for path, _ in read_image_list(listing)])
    probs = _run_head(head.deploy, head.weights, head.output, inputs, use_opencv)
    X = features.matrix.astype(np.float64)
    np.testing.assert_array_equal(probs.argmax(axis=1), result.model.predict(X))
    np.testing.assert_allclose(probs, result.model.predict_proba(X), atol=1e-4)
