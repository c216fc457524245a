"""``caffe-ft export`` and ``caffe-ft inspect model.onnx`` without Caffe.

pycaffe is the oracle in ``test_export_caffe.py``; here the exported models
go through ``onnx.checker`` and ONNX Runtime (on the host and, with onnx 1.12
and protobuf 3.12, in the reference environment), and OpenCV 5's ONNX
importer, in its own virtual environment beside the OpenCV 4 that reads
Caffe files, must compute what ONNX Runtime computes.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from typing import Dict, List

import numpy as np
import pytest

from caffe_ft import __version__
from caffe_ft.cli import main

from conftest import REPO, cli_runner
from export_nets import LAYERS_NET, POOLING_CASES, pooling_net, random_weights

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

DIGITS = os.path.join(REPO, "examples", "digits")


def _run(*args: str):
    return cli_runner().invoke(main, list(args))


def _export(tmp_path, net: str, weights, *args: str, name: str = "model.onnx") -> str:
    out = str(tmp_path / name)
    result = _run("export", net, "-o", out, *args, *(["--weights", weights] if weights else []))
    assert result.exit_code == 0, result.output + result.stderr
    assert result.output.startswith(f"wrote {out}: opset")
    return out


def _write(tmp_path, name: str, text: str) -> str:
    path = str(tmp_path / name)
    with open(path, "w") as handle:
        handle.write(text)
    return path


def _ort(path: str, feed: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [value.name for value in session.get_outputs()]
    return dict(zip(names, session.run(None, feed)))


@pytest.fixture
def digits(tmp_path):
    """The demo's DigitsNet deploy net and random weights for it."""
    net = os.path.join(DIGITS, "deploy.prototxt")
    return net, random_weights(net, str(tmp_path / "digits.caffemodel"))


def test_export_digits_checker_names_metadata(tmp_path, digits) -> None:
    net, weights = digits
    path = _export(tmp_path, net, weights)
    model = onnx.load(path)
    onnx.checker.check_model(model)
    graph = model.graph
    assert [value.name for value in graph.input] == ["data"]
    assert [value.name for value in graph.output] == ["prob"]
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 1, 16, 16]
    # Layer names are node names; in-place ReLUs write the blob's final value under its name.
    nodes = {node.name: node for node in graph.node}
    assert {"conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "fc1", "relu3", "fc2", "prob"} <= set(nodes)
    assert list(nodes["relu1"].output) == ["conv1"] and list(nodes["conv1"].output) == ["conv1@conv1"]
    metadata = {prop.key: prop.value for prop in model.metadata_props}
    for key, source in (("source_net_sha256", net), ("source_weights_sha256", weights)):
        with open(source, "rb") as handle:
            assert metadata[key] == hashlib.sha256(handle.read()).hexdigest()
    assert metadata["caffe_ft_version"] == __version__
    assert model.opset_import[0].version == 13
    # Deterministic: a second export writes the same bytes.
    again = _export(tmp_path, net, weights, name="again.onnx")
    with open(path, "rb") as one, open(again, "rb") as two:
        assert one.read() == two.read()


def test_batch_axis_static_and_dynamic(tmp_path, digits) -> None:
    net, weights = digits
    dynamic = _export(tmp_path, net, weights, name="dynamic.onnx")
    static = _export(tmp_path, net, weights, "--static-batch", "--input-shape", "data=3,1,16,16", name="static.onnx")
    data = np.random.default_rng(0).standard_normal((3, 1, 16, 16)).astype(np.float32)
    one = _ort(dynamic, {"data": data})["prob"]
    assert one.shape == (3, 10)
    np.testing.assert_allclose(one.sum(axis=1), 1, rtol=1e-5)
    np.testing.assert_array_equal(_ort(static, {"data": data})["prob"], one)
    # Each item alone gives what it gives in the batch.
    for index in range(3):
        alone = _ort(dynamic, {"data": data[index:index + 1]})["prob"]
        np.testing.assert_allclose(alone[0], one[index], rtol=1e-5, atol=1e-7)
    with pytest.raises(Exception, match="(?i)dimension|shape|invalid"):
        _ort(static, {"data": data[:1]})


def test_softmax_and_logits(tmp_path, digits) -> None:
    net, weights = digits
    logits = _export(tmp_path, net, weights, "--logits", name="logits.onnx")
    assert [value.name for value in onnx.load(logits).graph.output] == ["fc2"]
    with open(net) as handle:
        no_softmax = _write(tmp_path, "scores.prototxt", handle.read().replace(
            'layer { name: "prob" type: "Softmax" bottom: "fc2" top: "prob" }', ""))
    added = _export(tmp_path, no_softmax, weights, "--softmax", name="added.onnx")
    assert [value.name for value in onnx.load(added).graph.output] == ["prob"]
    data = np.random.default_rng(1).standard_normal((2, 1, 16, 16)).astype(np.float32)
    scores = _ort(logits, {"data": data})["fc2"]
    probabilities = np.exp(scores - scores.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(_ort(added, {"data": data})["prob"], probabilities, rtol=1e-5, atol=1e-7)


def test_newer_opsets_compute_the_same(tmp_path) -> None:
    net = _write(tmp_path, "layers.prototxt", LAYERS_NET)
    weights = random_weights(net, str(tmp_path / "layers.caffemodel"))
    base = _export(tmp_path, net, weights, name="13.onnx")
    from caffe_ft.export.to_onnx import max_opset

    # ONNX Runtime 1.10 (the reference environment's) runs opsets up to 15, 1.20 up to 21.
    runtime = tuple(int(part) for part in onnxruntime.__version__.split(".")[:2])
    newest = min(max_opset(), 21 if runtime >= (1, 20) else 15)
    data = {"data": np.random.default_rng(2).standard_normal((2, 4, 9, 11)).astype(np.float32)}
    want = _ort(base, data)
    for opset in sorted({15, newest}):
        path = _export(tmp_path, net, weights, "--opset", str(opset), name=f"{opset}.onnx")
        assert onnx.load(path).opset_import[0].version == opset
        got = _ort(path, data)
        for name, value in want.items():
            np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6)


UNSUPPORTED = """
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "pool" type: "Pooling" bottom: "data" top: "pool" pooling_param { pool: %s kernel_size: 2 } }
"""


@pytest.mark.parametrize("text,message", [
    (UNSUPPORTED % "STOCHASTIC", "layer 'pool': Pooling STOCHASTIC pooling: no faithful ONNX equivalent"),
    (UNSUPPORTED % "MAX" + 'layer { name: "top2" type: "ArgMax" bottom: "pool" top: "top2" }',
     "layer 'top2': ArgMax has no ONNX equivalent in caffe-ft"),
    (UNSUPPORTED.replace('type: "Pooling"', 'type: "Convolution"').replace(
        "pooling_param { pool: %s kernel_size: 2 }", "convolution_param { num_output: 2 kernel_size: 2 }"),
     "the net has learnable layers (pool"),
])
def test_unsupported_is_one_line_and_writes_nothing(tmp_path, text: str, message: str) -> None:
    net = _write(tmp_path, "net.prototxt", text)
    out = tmp_path / "model.onnx"
    result = _run("export", net, "-o", str(out))
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"caffe-ft: error: {net}: ")
    assert message in result.stderr
    assert not out.exists() and os.listdir(tmp_path) == ["net.prototxt"]


def test_an_existing_output_needs_force(tmp_path, digits):
    net, weights = digits
    path = _export(tmp_path, net, weights)
    result = _run("export", net, "--weights", weights, "-o", path)
    assert result.exit_code == 2 and "pass --force to overwrite" in result.stderr
    result = _run("export", net, "--weights", weights, "-o", weights, "--force")
    assert result.exit_code == 2 and "names an input of this command" in result.stderr
    assert _run("export", net, "--weights", weights, "-o", path, "--force").exit_code == 0


def test_weights_that_miss_a_layer(tmp_path, digits) -> None:
    net, weights = digits
    with open(net) as handle:
        renamed = _write(tmp_path, "renamed.prototxt", handle.read().replace('"fc2"', '"fc2_new"'))
    result = _run("export", renamed, "--weights", weights, "-o", str(tmp_path / "x.onnx"))
    assert result.exit_code == 2
    assert "the weights have no blobs for fc2_new" in result.stderr
    assert not (tmp_path / "x.onnx").exists()


def test_inspect_onnx(tmp_path, digits) -> None:
    net, weights = digits
    path = _export(tmp_path, net, weights)
    text = _run("inspect", path).output
    assert "opset ai.onnx 13" in text
    assert "  data  float  (N, 1, 16, 16)" in text and "  prob  float  (N, 10)" in text
    info = json.loads(_run("inspect", "--json", path).output)
    assert info["inputs"] == [{"name": "data", "dtype": "float", "shape": ["N", 1, 16, 16]}]
    assert info["outputs"] == [{"name": "prob", "dtype": "float", "shape": ["N", 10]}]
    assert info["size"] == os.path.getsize(path)
    assert info["parameters"] == 16 * 9 + 16 + 32 * 16 * 9 + 32 + 64 * 512 + 64 + 10 * 64 + 10
    assert info["metadata"]["caffe_ft_version"] == __version__
    broken = _write(tmp_path, "broken.onnx", "not a model")
    result = _run("inspect", broken)
    assert result.exit_code == 2 and "not an ONNX model" in result.stderr


# --------------------------------------------------------------------------
# OpenCV 5 (ONNX only) in its own environment

_OPENCV_SCRIPT = r"""
import sys
import cv2
import numpy as np

model, inputs, outputs = sys.argv[1:4]
net = cv2.dnn.readNetFromONNX(model)
feed = np.load(inputs)
for name in feed.files:
    net.setInput(feed[name], name)
names = sys.argv[4:]
np.savez(outputs, version=cv2.__version__, **dict(zip(names, net.forward(names))))
"""


def _cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "caffe-ft")


@pytest.fixture(scope="session")
def opencv5() -> str:
    """The python of a virtual environment (outside the checkout, made once)
    holding OpenCV 5, which reads ONNX and no longer reads Caffe files."""
    venv = os.path.join(_cache_dir(), "opencv5-venv")
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(os.path.join(venv, ".ready")):
        subprocess.run([sys.executable, "-m", "venv", "--clear", venv], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", "opencv-python-headless>=5,<6"], check=True)
        open(os.path.join(venv, ".ready"), "w").close()
    return python


def _opencv_agrees_with_ort(opencv5: str, tmp_path, model: str, feed, name: str) -> None:  # type: ignore[no-untyped-def]
    """OpenCV 5 computes every output of ``model`` that ONNX Runtime computes, within 1e-4 of its largest value."""
    want = _ort(model, feed)
    got = _opencv(opencv5, tmp_path, model, feed, list(want))
    for output, value in want.items():
        scale = max(float(np.abs(value).max()), 1e-30)
        difference = float(np.abs(got[output].reshape(value.shape) - value).max()) / scale
        assert difference <= 1e-4, f"{name}: {output} differs by {difference:.2e}"


def _opencv(python: str, tmp_path, model: str, feed: Dict[str, np.ndarray], names: List[str]):
    np.savez(tmp_path / "in.npz", **feed)
    done = subprocess.run([python, "-c", _OPENCV_SCRIPT, model, str(tmp_path / "in.npz"), str(tmp_path / "out.npz"),
                           *names], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    result = np.load(tmp_path / "out.npz")
    assert str(result["version"]).startswith("5."), str(result["version"])
    return {name: result[name] for name in names}


@pytest.mark.host
def test_opencv5_reads_the_exported_models(tmp_path, opencv5: str) -> None:
    rng = np.random.default_rng(3)
    cases = [(_write(tmp_path, "layers.prototxt", LAYERS_NET), (2, 4, 9, 11)),
             (os.path.join(DIGITS, "deploy.prototxt"), (3, 1, 16, 16))]
    for index, (size, kernel, stride, pad) in enumerate(POOLING_CASES):
        for pool in ("MAX", "AVE"):
            cases.append((_write(tmp_path, f"pool{index}{pool}.prototxt", pooling_net(size, pool, kernel, stride, pad)),
                          (1, 2, *size)))
    for net, shape in cases:
        name = os.path.basename(net).replace(".prototxt", "")
        weights = None
        if "pool" not in name:
            weights = random_weights(net, str(tmp_path / f"{name}.caffemodel"))
        model = _export(tmp_path, net, weights, name=f"{name}.onnx")
        feed = {"data": rng.standard_normal(shape).astype(np.float32)}
        _opencv_agrees_with_ort(opencv5, tmp_path, model, feed, name)


def _reference_root() -> str:
    """The reference environment's root (scripts/caffe-env), where caffe-doc's
    nets and the nsfw model are; the host reads them there."""
    return subprocess.run([os.path.join(REPO, "scripts", "caffe-env"), "path"], capture_output=True, text=True,
                          check=True).stdout.strip()


def _doc_net(root: str, path: str, shape, directory) -> str:
    """A caffe-doc deploy net as a plain file (Debian gzips the bigger ones), at ``shape`` when given."""
    import gzip

    from caffe_ft.formats.files import load_net
    from caffe_ft.formats.prototext import print_message
    from caffe_ft.formats.schema import load_schema

    source = os.path.join(root, "usr/share/doc/caffe-doc", path)
    opener = gzip.open if source.endswith(".gz") else open
    with opener(source, "rb") as handle:
        text = handle.read()
    stem = path.split("/")[-2] if path.split("/")[-1].startswith("deploy") else path.split("/")[-1].split(".")[0]
    target = directory / (stem + ".prototxt")
    target.write_bytes(text)
    if shape:
        net = load_net(str(target), load_schema())
        net.layer[0].input_param.shape[0].dim[:] = shape
        target.write_text(print_message(net))
    return str(target)


@pytest.mark.host
def test_opencv5_agrees_on_the_caffe_doc_nets_and_nsfw(tmp_path, opencv5: str) -> None:
    """OpenCV 5's ONNX importer computes what ONNX Runtime computes (which the
    reference environment's tests hold equal to pycaffe) for every caffe-doc
    deploy net (random weights) and the nsfw ResNet-50 (its real weights)."""
    root = _reference_root()
    nsfw = os.path.join(root, "opt/models/nsfw")
    if not os.path.isdir(os.path.join(root, "usr/share/doc/caffe-doc")) or not os.path.isdir(nsfw):
        pytest.skip(f"no reference environment at {root} (scripts/caffe-env create makes it)")
    from export_nets import DEPLOY_NETS

    rng = np.random.default_rng(5)
    cases = [(os.path.join(nsfw, "deploy.prototxt"), os.path.join(nsfw, "resnet_50_1by2_nsfw.caffemodel"), ())]
    for path, _, shape in DEPLOY_NETS:
        prototxt = _doc_net(root, path, shape, tmp_path)
        cases.append((prototxt, random_weights(prototxt, prototxt.replace(".prototxt", ".caffemodel")), shape))
    for prototxt, weights, shape in cases:
        name = os.path.basename(prototxt).replace(".prototxt", "")
        args = ["--input-shape", "data=" + ",".join(map(str, shape))] if shape else []
        model = _export(tmp_path, prototxt, weights, *args, name=f"{name}.onnx")
        import onnx

        dims = [d.dim_value or 1 for d in onnx.load(model).graph.input[0].type.tensor_type.shape.dim]
        feed = {"data": rng.standard_normal(dims).astype(np.float32) * 50}
        _opencv_agrees_with_ort(opencv5, tmp_path, model, feed, name)
