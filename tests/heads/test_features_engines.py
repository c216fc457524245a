"""``caffe-ft features --engine torch`` computes the features pycaffe computes.

The torch engine runs on the host (no Caffe there), ``caffe-ft features
--engine pycaffe`` in the reference environment (scripts/caffe-env), over the
same images through the nsfw ResNet-50: the two archives agree within 1e-4
relative, image by image (a short last batch included).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import NSFW_DIR, cli_runner  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "training"))
from torch_parity import REPO, in_root, relative_error  # noqa: E402

pytestmark = pytest.mark.host

TRANSFORM = ["--resize", "256", "--crop-size", "224", "--mean-value", "104", "--mean-value", "117",
             "--mean-value", "123", "--batch-size", "4"]


def test_torch_features_equal_pycaffes_on_the_nsfw_resnet50(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from synth_images import write_dataset

    from caffe_ft.cli import main
    from caffe_ft.heads.cache import load_features

    listing = write_dataset(str(tmp_path / "img"), "photo", 3, classes=2, size=256, seed=3)
    net, weights = (os.path.join(NSFW_DIR, name) for name in ("deploy.prototxt", "resnet_50_1by2_nsfw.caffemodel"))
    ours = str(tmp_path / "torch.npz")
    result = cli_runner().invoke(main, ["features", in_root(net), "--weights", in_root(weights), "--data", listing,
                                        "-o", ours, "--engine", "auto", *TRANSFORM])
    assert result.exit_code == 0, result.output
    # pycaffe is not installed on the host: auto picks torch, and says so.
    assert "engine: torch (auto: pycaffe is not installed)" in result.stderr
    theirs = str(tmp_path / "pycaffe.npz")
    done = subprocess.run([os.path.join(REPO, "scripts", "caffe-env"), "run", "--", "caffe-ft", "features", net,
                           "--weights", weights, "--data", listing, "-o", theirs, "--engine", "pycaffe", *TRANSFORM],
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    assert done.returncode == 0, done.stdout[-3000:]
    a, b = load_features(ours), load_features(theirs)
    assert (a.meta["engine"], b.meta["engine"]) == ("torch", "pycaffe")
    assert a.features.shape == b.features.shape == (6, 1024, 1, 1)
    assert list(a.sources) == list(b.sources) and np.array_equal(a.labels, b.labels)
    assert a.meta["fingerprints"]["trunk"] == b.meta["fingerprints"]["trunk"]
    for index in range(len(a.features)):
        assert relative_error(a.features[index], b.features[index]) < 1e-4, f"image {index}"
    assert b.features.std() > 0


def test_advise_measures_the_same_through_either_engine(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``advise --engine torch`` (host) and ``--engine pycaffe`` (reference root)
    take the same sample through the nsfw ResNet-50: the same cuts, probe and
    kNN scores (computed from features equal within 1e-4), LogME within 1e-3,
    and so the same advice."""
    import json

    from synth_images import write_dataset

    from caffe_ft.cli import main

    listing = write_dataset(str(tmp_path / "img"), "photo", 6, classes=2, size=256, seed=5)
    net, weights = (os.path.join(NSFW_DIR, name) for name in ("deploy.prototxt", "resnet_50_1by2_nsfw.caffemodel"))
    args = ["--train-data", listing, "--sample", "12", "--json", *TRANSFORM]
    ours = cli_runner().invoke(main, ["advise", in_root(net), "--weights", in_root(weights), "--engine", "torch",
                                      *args])
    assert ours.exit_code == 0, ours.output
    done = subprocess.run([os.path.join(REPO, "scripts", "caffe-env"), "run", "--", "caffe-ft", "advise", net,
                           "--weights", weights, "--engine", "pycaffe", *args],
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = json.loads(ours.stdout), json.loads(done.stdout)
    assert [cut["blob"] for cut in a["cuts"]] == [cut["blob"] for cut in b["cuts"]] and len(a["cuts"]) >= 2
    for x, y in zip(a["cuts"], b["cuts"]):
        assert (x["probe"], x["knn"], x["values"]) == (y["probe"], y["knn"], y["values"]), x["blob"]
        assert abs(x["logme"] - y["logme"]) <= 1e-3 * max(1.0, abs(y["logme"])), x["blob"]
    assert (a["strategy"], a["flags"]) == (b["strategy"], b["flags"])


def test_strategy_auto_measures_without_caffe(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``rewrite --strategy auto`` on a host without pycaffe measures the data through the torch engine."""
    from synth_images import write_dataset

    from caffe_ft.cli import main

    listing = write_dataset(str(tmp_path / "img"), "photo", 6, classes=2, size=256, seed=5)
    net, weights = (os.path.join(NSFW_DIR, name) for name in ("deploy.prototxt", "resnet_50_1by2_nsfw.caffemodel"))
    done = cli_runner().invoke(main, ["rewrite", in_root(net), "--weights", in_root(weights), "--strategy", "auto",
                                      "--train-data", listing, "--val-data", listing, "--resize", "256",
                                      "--crop-size", "224", "-o", str(tmp_path / "out")])
    assert done.exit_code == 0, done.output
    assert "auto: rule " in done.stderr and (tmp_path / "out" / "train_val.prototxt").exists()
