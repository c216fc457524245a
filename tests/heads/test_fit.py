"""The fixed-feature-extractor strategy and last-fc on cached features.

On the host: ``rewrite --strategy features`` writes last-fc's files; the
numpy SGD against steps computed by hand here; the data order; which nets
and solvers the cached-feature path takes and why it refuses the others.
In the reference environment (``caffe``): ``finetune --strategy features``
end to end, and the cached-feature last-fc run against real pycaffe training
of the same solver from the same ``init.caffemodel``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from typing import Dict, List

import numpy as np
import pytest

from caffe_ft.heads import fit, replay
from caffe_ft.cli import main
from conftest import cli_runner

# --------------------------------------------------------------------------
# A small net whose input pipeline is deterministic (no mirror, no crop, no Dropout)

SIZE = 16
CLASSES = 3


def _trunk(trunk_extra: str = "", head_outputs: int = 5) -> str:
    """conv -> pool -> fc1 (the features) -> head 'fc2'."""
    return f"""layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: 4 kernel_size: 3 weight_filler {{ type: "xavier" }}
    bias_filler {{ type: "constant" value: 0.1 }} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "fc1" type: "InnerProduct" bottom: "pool1" top: "fc1"
  inner_product_param {{ num_output: 16 weight_filler {{ type: "xavier" }}
    bias_filler {{ type: "constant" value: 0.1 }} }} }}
layer {{ name: "relu2" type: "ReLU" bottom: "fc1" top: "fc1" }}
{trunk_extra}layer {{ name: "fc2" type: "InnerProduct" bottom: "fc1" top: "fc2"
  inner_product_param {{ num_output: {head_outputs} weight_filler {{ type: "xavier" }} }} }}
"""


def small_net(train_list: str, val_list: str, *, transform: str = "scale: 0.00390625",
              test_transform: str = "scale: 0.00390625", trunk_extra: str = "", loss: str = "",
              shuffle: bool = False) -> str:
    """A train_val net: ImageData 16x16 -> conv -> pool -> fc1 -> head 'fc2' (5 classes) ->
    SoftmaxWithLoss (and Accuracy in TEST); batches of 8 (TRAIN) and 5 (TEST)."""
    data = "".join(
        f"""layer {{ name: "data" type: "ImageData" top: "data" top: "label" include {{ phase: {phase} }}
  transform_param {{ {phase_transform} }}
  image_data_param {{ source: "{source}" batch_size: {batch} new_height: {SIZE} new_width: {SIZE}{extra} }} }}
""" for phase, phase_transform, source, batch, extra in (
            ("TRAIN", transform, train_list, 8, " shuffle: true" if shuffle else ""),
            ("TEST", test_transform, val_list, 5, "")))
    return f"""name: "Small"
{data}{_trunk(trunk_extra)}layer {{ name: "accuracy" type: "Accuracy" bottom: "fc2" bottom: "label" top: "accuracy"
  include {{ phase: TEST }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "fc2" bottom: "label" top: "loss" {loss}}}
"""


SOLVER = """net: "train_val.prototxt"
test_iter: 3
test_interval: 10
base_lr: 0.05
momentum: 0.9
weight_decay: 0.0005
lr_policy: "step"
gamma: 0.5
stepsize: 10
display: 0
max_iter: 40
snapshot_prefix: "small"
solver_mode: CPU
random_seed: 1
"""


def write(path, text: str) -> str:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return str(path)


def analyse_text(tmp_path, net: str, solver: str = SOLVER, device: str = "cpu"):
    """fit.analyse on a solver and train_val written to ``tmp_path``."""
    from caffe_ft.formats.schema import load_schema

    write(tmp_path / "train_val.prototxt", net)
    solver_path = write(tmp_path / "solver.prototxt", solver.replace('"train_val.prototxt"',
                                                                      f'"{tmp_path / "train_val.prototxt"}"'))
    return fit.analyse(solver_path, load_schema(), device)


def frozen(net: str) -> str:
    """``net`` as last-fc leaves it: the trunk frozen, the head renamed and trained."""
    net = net.replace('convolution_param {', 'param { lr_mult: 0 decay_mult: 0 } param { lr_mult: 0 decay_mult: 0 }'
                      ' convolution_param {')
    net = net.replace('top: "fc1"\n  inner_product_param', 'top: "fc1"\n  param { lr_mult: 0 decay_mult: 0 } '
                      'param { lr_mult: 0 decay_mult: 0 } inner_product_param')
    return net.replace('top: "fc2"\n  inner_product_param', 'top: "fc2"\n  param { lr_mult: 10 decay_mult: 1 } '
                       'param { lr_mult: 20 decay_mult: 0 } inner_product_param')


# --------------------------------------------------------------------------
# rewrite --strategy features


def test_rewrite_features_writes_exactly_last_fcs_files(tmp_path):
    net = write(tmp_path / "train_val.prototxt", small_net("train.txt", "val.txt"))
    solver = write(tmp_path / "solver.prototxt", SOLVER)
    texts = {}
    for strategy in ("last-fc", "features"):
        outdir = tmp_path / strategy
        result = cli_runner().invoke(main, ["rewrite", net, "--strategy", strategy, "--num-classes", "4",
                                            "--solver", solver, "-o", str(outdir)])
        assert result.exit_code == 0, result.output
        texts[strategy] = {name: (outdir / name).read_text() for name in sorted(os.listdir(outdir))}
    assert set(texts["features"]) == {"train_val.prototxt", "deploy.prototxt", "solver.prototxt", "summary.md"}
    for name in ("train_val.prototxt", "deploy.prototxt"):
        assert texts["features"][name] == texts["last-fc"][name], name
    # The solver differs only in the paths of the output directory.
    assert texts["features"]["solver.prototxt"] == texts["last-fc"]["solver.prototxt"].replace(
        str(tmp_path / "last-fc"), str(tmp_path / "features"))
    assert "scikit-learn" in texts["features"]["summary.md"]
    assert 'name: "fc2_ft"' in texts["features"]["deploy.prototxt"]


# --------------------------------------------------------------------------
# The numpy SGD, against steps computed by hand


def _hand_step(w, b, hw, hb, x, y, rate, lr_w, lr_b, momentum, decay, loss_weight=1.0):
    """One SGD iteration written out with Python floats: softmax loss averaged
    over the batch, L2 decay on the weights only, momentum."""
    n, k = len(x), len(w)
    gw = [[0.0] * len(x[0]) for _ in range(k)]
    gb = [0.0] * k
    loss = 0.0
    for xi, yi in zip(x, y):
        z = [sum(w[c][j] * xi[j] for j in range(len(xi))) + b[c] for c in range(k)]
        top = max(z)
        e = [math.exp(v - top) for v in z]
        p = [v / sum(e) for v in e]
        loss -= math.log(p[yi]) / n
        for c in range(k):
            d = (p[c] - (1.0 if c == yi else 0.0)) * loss_weight / n
            gb[c] += d
            for j in range(len(xi)):
                gw[c][j] += d * xi[j]
    for c in range(k):
        for j in range(len(x[0])):
            hw[c][j] = momentum * hw[c][j] + rate * lr_w * (gw[c][j] + decay * w[c][j])
            w[c][j] -= hw[c][j]
        hb[c] = momentum * hb[c] + rate * lr_b * gb[c]
        b[c] -= hb[c]
    return loss * loss_weight


def test_sgd_steps_match_hand_computed_ones():
    x = [[0.5, -1.0, 2.0], [1.5, 0.25, -0.5], [-0.75, 1.0, 0.0], [0.0, 2.0, 1.0]]
    y = [0, 2, 1, 2]
    w = [[0.1, -0.2, 0.05], [0.0, 0.3, -0.1], [-0.2, 0.1, 0.2]]
    b = [0.01, -0.02, 0.0]
    sgd = replay.SGD(base_lr=0.05, max_iter=3, lr_policy="step", gamma=0.5, stepsize=1, momentum=0.9,
                      weight_decay=0.01, lr_mults=(10.0, 20.0), decay_mults=(1.0, 0.0))
    loss = replay.Loss(weight=2.0)
    head = replay.Head.start([np.array(w), np.array(b)])
    hw = [[0.0] * 3 for _ in range(3)]
    hb = [0.0] * 3
    for iteration in range(3):
        rows = [iteration % 4, (iteration + 1) % 4]
        got = replay.step(head, np.array(x, np.float32)[rows], np.array(y)[rows], sgd, loss)
        rate = 0.05 * 0.5 ** iteration
        expected = _hand_step(w, b, hw, hb, [x[r] for r in rows], [y[r] for r in rows], rate, 10.0, 20.0, 0.9,
                              0.01, loss_weight=2.0)
        assert got == pytest.approx(expected, rel=1e-5)
        np.testing.assert_allclose(head.params[0], w, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(head.params[1], b, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(head.history[0], hw, rtol=1e-5, atol=1e-8)
    assert head.iteration == 3
    assert head.params[0].dtype == np.float32


@pytest.mark.parametrize("normalization, divisor", [("VALID", 2), ("FULL", 3), ("BATCH_SIZE", 3), ("NONE", 1)])
def test_ignored_labels_and_normalization(normalization, divisor):
    scores = np.array([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0], [0.0, 2.0, 1.0]], np.float32)
    labels = np.array([0, 7, 1])  # 7 is ignored
    value, grad = replay.softmax_loss(scores.copy(), labels, replay.Loss(3.0, normalization, ignore_label=7))
    p = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)
    assert value == pytest.approx(-(math.log(p[0, 0]) + math.log(p[2, 1])) / divisor, rel=1e-6)
    assert not grad[1].any()
    expected = p[[0, 2]] - np.eye(3)[[0, 1]]
    np.testing.assert_allclose(grad[[0, 2]], expected * 3.0 / divisor, rtol=1e-5)


def test_gradients_are_clipped_to_the_global_norm():
    head = replay.Head.start([np.zeros((2, 2)), np.zeros(2)])
    x = np.array([[30.0, -40.0]], np.float32)
    sgd = replay.SGD(base_lr=1.0, max_iter=1, clip_gradients=0.5)
    replay.step(head, x, np.array([1]), sgd, replay.Loss())
    step = np.concatenate([head.params[0].ravel(), head.params[1]])
    assert np.linalg.norm(step) == pytest.approx(0.5, rel=1e-5)
    # The bias learns as the weights do: p = (0.5, 0.5), so the class-1 row moves up.
    assert head.params[1][1] > 0 > head.params[1][0]


def test_a_non_finite_loss_changes_nothing():
    head = replay.Head.start([np.full((2, 1), np.inf), np.zeros(2)])
    before = [param.copy() for param in head.params]
    loss = replay.step(head, np.ones((1, 1), np.float32), np.array([0]), replay.SGD(base_lr=1, max_iter=1),
                        replay.Loss())
    assert not math.isfinite(loss)
    assert head.iteration == 0
    for param, old in zip(head.params, before):
        np.testing.assert_array_equal(param, old)


def test_accuracy_counts_ties_against_and_skips_ignored_labels():
    scores = np.array([[0.1, 0.7, 0.2], [0.5, 0.5, 0.0], [0.3, 0.2, 0.1], [0.0, 0.0, 1.0]], np.float32)
    labels = np.array([1, 0, 2, 2])
    assert replay.accuracy(scores, labels) == pytest.approx(2 / 4)  # the tie in row 1 counts against
    assert replay.accuracy(scores, labels, top_k=2) == pytest.approx(3 / 4)
    assert replay.accuracy(scores, labels, top_k=3) == pytest.approx(1.0)
    assert replay.accuracy(scores, labels, ignore_label=2) == pytest.approx(1 / 2)
    assert replay.accuracy(scores[:1], labels[:1], ignore_label=1) == 0


def test_batches_read_on_and_wrap_like_a_data_layer():
    batches = replay.batch_indices(5, 3)
    assert [list(next(batches)) for _ in range(4)] == [[0, 1, 2], [3, 4, 0], [1, 2, 3], [4, 0, 1]]
    shuffled = replay.batch_indices(5, 3, np.random.default_rng(0))
    stream = np.concatenate([next(shuffled) for _ in range(10)])
    passes = stream.reshape(6, 5)
    assert all(sorted(row) == [0, 1, 2, 3, 4] for row in passes)
    assert len({tuple(row) for row in passes}) > 1  # a new order every pass


# --------------------------------------------------------------------------
# When the cached-feature path applies


def test_a_deterministic_last_fc_net_is_replayed(tmp_path):
    job, reasons = analyse_text(tmp_path, frozen(small_net("train.txt", "val.txt")))
    assert reasons == []
    assert job.head == "fc2" and job.feature_layer == "relu2"
    assert job.sgd.lr_mults == (10.0, 20.0) and job.sgd.decay_mults == (1.0, 0.0)
    assert (job.sgd.base_lr, job.sgd.momentum, job.sgd.stepsize) == (pytest.approx(0.05), pytest.approx(0.9), 10)
    assert (job.train.source, job.train.batch_size, job.train.shuffle) == ("train.txt", 8, False)
    assert (job.test.source, job.test.batch_size) == ("val.txt", 5)
    assert [(o.name, o.kind) for o in job.outputs] == [("accuracy", "accuracy"), ("loss", "loss")]
    assert job.loss == replay.Loss(1.0, "VALID", None)


def test_a_shuffled_list_is_replayed_in_an_order_of_its_own(tmp_path):
    job, reasons = analyse_text(tmp_path, frozen(small_net("t.txt", "v.txt", shuffle=True)))
    assert reasons == [] and job.train.shuffle and not job.test.shuffle


def test_loss_settings_are_read_from_the_layer(tmp_path):
    net = frozen(small_net("t.txt", "v.txt", loss="loss_weight: 2 loss_param { ignore_label: 2 normalize: false } "))
    job, reasons = analyse_text(tmp_path, net)
    assert reasons == []
    assert job.loss == replay.Loss(2.0, "BATCH_SIZE", 2)


DROPOUT = 'layer { name: "drop" type: "Dropout" bottom: "fc1" top: "fc1" }\n'
BATCHNORM = 'layer { name: "bn" type: "BatchNorm" bottom: "fc1" top: "fc1" }\n'


@pytest.mark.parametrize("change, solver_change, device, why", [
    (dict(transform="mirror: true"), None, "cpu", "TRAIN data layer 'data' mirrors at random"),
    (dict(test_transform="mirror: true"), None, "cpu", "TEST data layer 'data' mirrors at random"),
    (dict(transform="crop_size: 12"), None, "cpu", "crops at random"),
    (dict(trunk_extra=DROPOUT), None, "cpu", "'drop' is Dropout"),
    (dict(trunk_extra=BATCHNORM), None, "cpu", "'bn' normalizes with batch statistics"),
    ({}, ("momentum: 0.9", "momentum: 0.9\niter_size: 2"), "cpu", "iter_size is 2"),
    ({}, ('lr_policy: "step"', 'lr_policy: "step"\ntype: "Adam"'), "cpu", "the solver is Adam"),
    ({}, ('lr_policy: "step"', 'lr_policy: "step"\nregularization_type: "L1"'), "cpu", "regularization_type is L1"),
    ({}, None, "0", "runs on a GPU"),
    ({}, ("solver_mode: CPU", "solver_mode: GPU"), "solver", "runs on a GPU"),
])
def test_the_fast_path_says_why_it_does_not_apply(tmp_path, change, solver_change, device, why):
    solver = SOLVER.replace(*solver_change) if solver_change else SOLVER
    job, reasons = analyse_text(tmp_path, frozen(small_net("t.txt", "v.txt", **change)), solver, device)
    assert job is None
    assert any(why in reason for reason in reasons), reasons


def test_a_crop_of_the_resized_size_is_no_random_crop(tmp_path):
    job, reasons = analyse_text(tmp_path, frozen(small_net("t.txt", "v.txt", transform=f"crop_size: {SIZE}")))
    assert reasons == [] and job is not None


def test_a_trunk_that_learns_or_an_unfrozen_net_is_not_replayed(tmp_path):
    job, reasons = analyse_text(tmp_path, small_net("t.txt", "v.txt"))
    assert job is None and any("3 layers learn" in reason for reason in reasons), reasons


def test_an_extra_test_output_or_loss_is_not_replayed(tmp_path):
    extra = ('layer { name: "prob" type: "Softmax" bottom: "fc2" top: "prob" include { phase: TEST } }\n'
             'layer { name: "aux" type: "EuclideanLoss" bottom: "fc1" bottom: "fc1" top: "aux" }\n')
    job, reasons = analyse_text(tmp_path, frozen(small_net("t.txt", "v.txt")) + extra)
    assert job is None
    assert any("test output 'prob'" in reason for reason in reasons), reasons
    assert any("other losses: aux" in reason for reason in reasons), reasons


def test_a_train_only_trunk_layer_is_not_replayed(tmp_path):
    extra = ('layer { name: "scale" type: "Power" bottom: "fc1" top: "fc1" power_param { scale: 2 } '
             'include { phase: TRAIN } }\n')
    job, reasons = analyse_text(tmp_path, frozen(small_net("t.txt", "v.txt", trunk_extra=extra)))
    assert job is None and any("differ between TRAIN and TEST" in reason for reason in reasons), reasons


# --------------------------------------------------------------------------
# In the reference environment: real features, real pycaffe

caffe = pytest.mark.caffe


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "caffe_ft.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "GLOG_minloglevel": "2"})
    if check:
        assert done.returncode == 0, done.stdout + done.stderr[-4000:]
    return done


def pretrained(directory) -> str:
    """Random weights for the small net (its old 5-class head included), as a pretrained model."""
    from caffe_ft.training.pycaffe import quiet_caffe

    caffe_module = quiet_caffe()
    caffe_module.set_random_seed(3)
    deploy = write(directory / "pretrained_deploy.prototxt",
                   f'name: "Small"\nlayer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 1 '
                   f'dim: 3 dim: {SIZE} dim: {SIZE} }} }} }}\n{_trunk()}')
    weights = str(directory / "pretrained.caffemodel")
    caffe_module.Net(deploy, caffe_module.TEST).save(weights)
    return weights


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from synth_images import write_dataset

    root = tmp_path_factory.mktemp("data")
    train = write_dataset(str(root / "train"), "photo", 7, classes=CLASSES, size=20, seed=5)  # 21 images
    val = write_dataset(str(root / "val"), "photo", 4, classes=CLASSES, size=20, seed=6)  # 12 images
    return {"root": root, "train": train, "val": val}


def metrics(path) -> List[Dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def head_blobs(path: str, head: str) -> List[np.ndarray]:
    from caffe_ft.formats.caffemodel import load_model
    from caffe_ft.formats.schema import load_schema

    return [np.array(blob.data) for blob in load_model(path, load_schema()).layer_blobs()[head]]


def finetune(tmp_path, net_text: str, solver: str, strategy: str = "last-fc", *extra: str
             ) -> subprocess.CompletedProcess:
    """``caffe-ft finetune`` of the small net from random pretrained weights, into ``tmp_path/out``."""
    net = write(tmp_path / "train_val.prototxt", net_text)
    solver_path = write(tmp_path / "solver.prototxt", solver)
    weights = pretrained(tmp_path)
    return run_cli("finetune", net, "--weights", weights, "--strategy", strategy, "--num-classes", str(CLASSES),
                   "--solver", solver_path, "--lr-scale", "1", "--step-scale", "1", "--cpu", "--force",
                   "-o", str(tmp_path / "out"), *extra)


VARIANTS = {
    "step-momentum-decay": ({}, SOLVER),
    # A shuffled list cannot be replayed exactly: only the sequential case is.
    "inv-clip-ignore-weighted": (
        dict(loss="loss_weight: 2 loss_param { ignore_label: 2 } "),
        SOLVER.replace('lr_policy: "step"', 'lr_policy: "inv"\npower: 0.75\nclip_gradients: 0.2')
        .replace("gamma: 0.5", "gamma: 0.1").replace("momentum: 0.9", "momentum: 0.5")
        .replace("weight_decay: 0.0005", "weight_decay: 0.01")),
}


@caffe
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_last_fc_trains_the_head_pycaffe_trains(tmp_path, data, variant):
    change, solver = VARIANTS[variant]
    done = finetune(tmp_path, small_net(data["train"], data["val"], **change), solver)
    out = tmp_path / "out"
    assert "trained the head on cached features" in done.stdout
    summary = (out / "summary.md").read_text()
    assert "fewer forward passes" in summary and "pycaffe would have run it over" in summary
    fast = metrics(out / "metrics.jsonl")
    # The same solver through pycaffe, from the same init.caffemodel.
    reference = tmp_path / "pycaffe.jsonl"
    run_cli("train", str(out / "solver.prototxt"), "--weights", str(out / "init.caffemodel"), "--cpu",
            "--metrics", str(reference))
    slow = metrics(reference)
    for ours, theirs, start in zip(*(head_blobs(str(out / name), "fc2_ft") for name in
                                     ("final.caffemodel", "small_iter_40.caffemodel", "init.caffemodel"))):
        assert np.abs(theirs - start).max() > 0.1  # it learned
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * np.abs(theirs).max())
    assert [(r["phase"], r["iteration"]) for r in fast] == [(r["phase"], r["iteration"]) for r in slow]
    for ours, theirs in zip(fast, slow):
        if ours["phase"] == "train":
            assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-4)
            assert ours["lr"] == pytest.approx(theirs["lr"], rel=1e-6)
        else:
            assert ours["outputs"]["accuracy"] == pytest.approx(theirs["outputs"]["accuracy"], abs=1e-6)
            assert ours["outputs"]["loss"] == pytest.approx(theirs["outputs"]["loss"], rel=1e-4)
    # The trunk is the pretrained one, untouched.
    trunks = (head_blobs(str(out / name), "fc1") for name in ("final.caffemodel", "init.caffemodel"))
    for ours, theirs in zip(*trunks):
        np.testing.assert_array_equal(ours, theirs)


@caffe
def test_random_augmentation_falls_back_to_pycaffe_and_says_why(tmp_path, data):
    done = finetune(tmp_path, small_net(data["train"], data["val"], transform="mirror: true"),
                    SOLVER.replace("max_iter: 40", "max_iter: 10"))
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "trained with pycaffe, not on cached features" in summary and "mirrors at random" in summary
    assert "trained to iteration 10" in done.stdout
    assert (tmp_path / "out" / "final.caffemodel").exists()


@caffe
def test_no_cached_features_forces_pycaffe(tmp_path, data):
    done = finetune(tmp_path, small_net(data["train"], data["val"]),
                    SOLVER.replace("max_iter: 40", "max_iter: 10"), "last-fc", "--no-cached-features")
    assert "cached features" not in done.stdout
    assert not (tmp_path / "out" / "features-train.npz").exists()


@caffe
def test_finetune_features_fits_the_head_and_writes_a_loadable_model(tmp_path, data):
    from caffe_ft.training.pycaffe import quiet_caffe

    # Dropout and mirroring do not matter: the features are those of the TEST-phase trunk.
    net_text = small_net(data["train"], data["val"], trunk_extra=DROPOUT, transform="mirror: true scale: 0.00390625")
    done = finetune(tmp_path, net_text, SOLVER, "features")
    out = tmp_path / "out"
    assert "fitted the head on cached features" in done.stdout
    summary = (out / "summary.md").read_text()
    reported = float(summary.split("final accuracy: ")[1].split()[0])
    assert "scikit-learn" in summary and f"validation accuracy {reported:.4f}" in summary
    assert (out / "features-train.npz").exists() and (out / "features-val.npz").exists()
    # The rewritten nets load final.caffemodel as they are; Caffe's test net scores what was reported.
    caffe_module = quiet_caffe()
    deploy = caffe_module.Net(str(out / "deploy.prototxt"), str(out / "final.caffemodel"), caffe_module.TEST)
    assert deploy.params["fc2_ft"][0].data.shape == (CLASSES, 16)
    # Caffe's test net reads the 12 validation images once, then 3 again (3 batches of 5).
    test_net = caffe_module.Net(str(out / "train_val.prototxt"), str(out / "final.caffemodel"), caffe_module.TEST)
    correct = 0
    for batch in range(3):
        test_net.forward()
        scores, labels = test_net.blobs["fc2_ft"].data, test_net.blobs["label"].data.astype(int)
        take = 5 if batch < 2 else 2
        correct += int((scores[:take].argmax(axis=1) == labels[:take]).sum())
    assert correct / 12 == pytest.approx(reported, abs=1e-6)
    # A second run reuses the cached features.
    again = finetune(tmp_path, net_text, SOLVER, "features")
    assert again.stderr.count("reused") >= 2
