"""``--class-weights auto|FILE``: an InfogainLoss with a diagonal H (:mod:`caffe_ft.recipe.class_weights`).

The weights and the file checks on their own; then, on a deliberately
unbalanced list (10 images of class 0, 2 of class 1), the rewrite writes H
and the InfogainLoss, and real Caffe fine-tunes with it: its loss on a batch
is the class-weighted softmax loss computed here from the same scores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from test_rewrite_caffe import DIGITS, _image_list, digits_weights  # noqa: E402

from caffe_ft.errors import CaffeFtError  # noqa: E402
from caffe_ft.formats.caffemodel import load_blob  # noqa: E402
from caffe_ft.recipe import class_weights as cw  # noqa: E402


def test_balanced_weights_make_every_class_weigh_the_same() -> None:
    counts = cw.label_counts([0] * 10 + [1] * 2 + [2] * 4, 4)
    assert counts == [10, 2, 4, 0]
    weights = cw.balanced(counts)
    assert weights == pytest.approx([16 / 40, 16 / 8, 16 / 16, 0.0])
    assert [c * w for c, w in zip(counts, weights)][:3] == pytest.approx([4.0, 4.0, 4.0])


def test_a_weights_file_is_checked_line_by_line(tmp_path) -> None:  # type: ignore[no-untyped-def]
    good = tmp_path / "w.txt"
    good.write_text("# weights\n1.0\n\n2.5  # rare\n")
    assert cw.read_weights(str(good), 2) == [1.0, 2.5]
    with pytest.raises(CaffeFtError, match="2 class weight"):
        cw.read_weights(str(good), 3)
    bad = tmp_path / "bad.txt"
    bad.write_text("1\n-2\n")
    with pytest.raises(CaffeFtError, match=r"bad.txt:2: a class weight must be finite and not negative"):
        cw.read_weights(str(bad), 2)
    bad.write_text("1\nx\n")
    with pytest.raises(CaffeFtError, match=r"bad.txt:2: 'x' is not a number"):
        cw.read_weights(str(bad), 2)


def _unbalanced(directory: str, name: str, seed: int) -> str:
    listing = _image_list(directory, name, 16, True, 12, seed=seed)
    paths = [line.split()[0] for line in open(listing, encoding="utf-8")]
    with open(listing, "w", encoding="utf-8") as handle:
        handle.writelines(f"{path} {1 if index in (3, 8) else 0}\n" for index, path in enumerate(paths))
    return listing


@pytest.mark.caffe
def test_caffe_trains_the_class_weighted_loss(tmp_path, schema) -> None:  # type: ignore[no-untyped-def]
    train = _unbalanced(str(tmp_path / "data"), "train", 3)
    val = _unbalanced(str(tmp_path / "data"), "val", 4)
    env = {**os.environ, "GLOG_minloglevel": "2"}
    weights = digits_weights(str(tmp_path / "pretrained.caffemodel"), env)
    common = [os.path.join(DIGITS, "train_val.prototxt"), "--weights", weights, "--strategy", "full",
              "--train-data", train, "--val-data", val, "--batch-size", "4", "--max-iter", "6", "--cpu"]
    for outdir, extra in (("plain", []), ("ft", ["--class-weights", "auto"])):
        done = subprocess.run([sys.executable, "-m", "caffe_ft.cli", "finetune", *common, *extra, "-o", outdir],
                              cwd=str(tmp_path), env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    ft = tmp_path / "ft"
    h = load_blob(str(ft / "class_weights.binaryproto"), schema)
    assert h.shape == (1, 1, 2, 2)
    assert np.allclose(h.data.reshape(2, 2), np.diag([12 / 20, 12 / 4]))
    summary = (ft / "summary.md").read_text()
    assert "class weights (auto: N / (K n_k); class: training examples -> weight): 0: 10 -> 0.6, 1: 2 -> 3" in summary
    net_text = (ft / "train_val.prototxt").read_text()
    assert 'type: "InfogainLoss"' in net_text and "SoftmaxWithLoss" not in net_text
    assert (ft / "deploy.prototxt").read_text() == (tmp_path / "plain" / "deploy.prototxt").read_text()
    # Caffe's loss on a training batch is the weighted softmax loss of the scores it computed.
    script = """
import json, sys
import numpy as np
import caffe
caffe.set_mode_cpu()
net = caffe.Net("train_val.prototxt", "final.caffemodel", caffe.TRAIN)
batches = []
for _ in range(3):  # one epoch of 12 images in batches of 4: some batch holds class 1
    out = net.forward()
    batches.append({"loss": float(out["loss"]), "scores": net.blobs["fc2_ft"].data.tolist(),
                    "labels": net.blobs["label"].data.ravel().tolist()})
print(json.dumps(batches))
"""
    ran = subprocess.run([sys.executable, "-c", script], cwd=str(ft), capture_output=True, text=True, env=env)
    assert ran.returncode == 0, ran.stderr
    batches = json.loads(ran.stdout)
    assert any(1 in batch["labels"] for batch in batches)  # a batch with both classes: the weights matter
    for batch in batches:
        scores, labels = np.array(batch["scores"], dtype=np.float64), np.array(batch["labels"], dtype=int)
        log_p = scores - scores.max(axis=1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
        weight = np.array([12 / 20, 12 / 4])[labels]
        expected = float(-(weight * log_p[np.arange(len(labels)), labels]).mean())
        assert batch["loss"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.caffe
def test_lp_ft_fits_the_probe_then_fine_tunes_from_it(tmp_path, schema) -> None:  # type: ignore[no-untyped-def]
    """`finetune --strategy lp-ft`: probe.caffemodel holds the head fitted on cached features; Caffe's
    first test (iteration 0) scores exactly the probe's reported accuracy, so training starts from it;
    the summary gives the probe's accuracy and the fine-tuned one."""
    from caffe_ft.formats.caffemodel import load_model

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "training"))
    from test_train import make_dataset

    train, val = str(tmp_path / "train.txt"), str(tmp_path / "val.txt")
    with open(train, "w") as handle:
        handle.writelines(make_dataset(str(tmp_path / "train"), 24, 0))
    with open(val, "w") as handle:
        handle.writelines(make_dataset(str(tmp_path / "val"), 12, 1))
    env = {**os.environ, "GLOG_minloglevel": "2"}
    weights = str(tmp_path / "pretrained.caffemodel")
    # Random (not zero: the deploy net has no fillers) trunk weights: random features a probe can read.
    fill = ("import caffe, sys, numpy as np; net = caffe.Net(sys.argv[1], caffe.TEST); rng = np.random.default_rng(0)\n"
            "for blobs in net.params.values():\n"
            "    for blob in blobs: blob.data[...] = rng.normal(0, (2.0 / max(1, blob.data[0].size)) ** 0.5, blob.data.shape)\n"
            "net.save(sys.argv[2])")
    made = subprocess.run([sys.executable, "-c", fill, os.path.join(DIGITS, "deploy.prototxt"), weights],
                          capture_output=True, text=True, env=env)
    assert made.returncode == 0, made.stderr
    done = subprocess.run([sys.executable, "-m", "caffe_ft.cli", "finetune", os.path.join(DIGITS, "train_val.prototxt"),
                           "--weights", weights, "--strategy", "lp-ft", "--train-data", train, "--val-data", val,
                           "--batch-size", "4", "--val-batch-size", "6", "--max-iter", "12", "--cpu", "-o", "ft"],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    ft = tmp_path / "ft"
    init = load_model(str(ft / "init.caffemodel"), schema).layer_blobs()
    probe = load_model(str(ft / "probe.caffemodel"), schema).layer_blobs()
    assert not np.array_equal(init["fc2_ft"][0].data, probe["fc2_ft"][0].data)  # the head was fitted
    assert np.array_equal(init["conv1"][0].data, probe["conv1"][0].data)  # the trunk was not
    summary = (ft / "summary.md").read_text()
    found = __import__("re").search(r"linear probe \(.*\): validation accuracy (\S+)", summary)
    assert found, summary
    records = [json.loads(line) for line in (ft / "metrics.jsonl").read_text().splitlines()]
    tests = [r for r in records if r["phase"] == "test"]
    assert tests[0]["iteration"] == 0
    assert tests[0]["outputs"]["accuracy"] == pytest.approx(float(found.group(1)), abs=1e-4)
    assert f"fine-tuned from the probe: accuracy {tests[-1]['outputs']['accuracy']:.4f}" in summary
    assert "base_lr x0.1 more" in summary
