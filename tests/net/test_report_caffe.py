"""`caffe-ft inspect` on real caffemodels reports what pycaffe loads."""

from __future__ import annotations

import json
import math
import os

import pytest

from caffe_ft.cli import main
from conftest import NSFW_DIR, REPO, cli_runner

pytestmark = pytest.mark.caffe


def _inspect(path: str) -> dict:
    result = cli_runner().invoke(main, ["inspect", "--json", path], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.output)


def _pycaffe_params(deploy: str, weights: str) -> dict:
    import caffe

    net = caffe.Net(deploy, weights, caffe.TEST)
    return {name: [list(blob.data.shape) for blob in blobs] for name, blobs in net.params.items()}


def test_inspect_nsfw_caffemodel_matches_pycaffe():
    weights = os.path.join(NSFW_DIR, "resnet_50_1by2_nsfw.caffemodel")
    info = _inspect(weights)
    ours = {layer["name"]: layer["blobs"] for layer in info["layers"] if layer["blobs"]}
    theirs = _pycaffe_params(os.path.join(NSFW_DIR, "deploy.prototxt"), weights)
    assert ours == theirs
    assert info["params"] == sum(math.prod(shape) for shapes in theirs.values() for shape in shapes)


def test_inspect_of_a_caffemodel_pycaffe_saved(tmp_path):
    import caffe

    deploy = os.path.join(REPO, "examples", "digits",
                          "deploy.prototxt")
    net = caffe.Net(deploy, caffe.TEST)
    net.save(str(tmp_path / "digits.caffemodel"))
    info = _inspect(str(tmp_path / "digits.caffemodel"))
    ours = {layer["name"]: layer["blobs"] for layer in info["layers"] if layer["blobs"]}
    assert ours == {name: [list(blob.data.shape) for blob in blobs] for name, blobs in net.params.items()}
    net_info = _inspect(deploy)  # the net's inferred parameter shapes agree too
    assert {layer["name"]: layer["param_shapes"] for layer in net_info["layers"] if layer.get("param_shapes")} == ours
