"""Inputs that used to crash or pass silently: one line each, or handled as Caffe does.

Class 3 of issue 13 (tracebacks): caffemodels with strings that are not
UTF-8 (Caffe and pycaffe load them), absurd blob shapes, deep nesting, blobs
past INT_MAX values or past memory.  Class 5's user-visible side: a stray
byte in a prototxt is reported at its line and column.  Class 6 (values that
should be refused): option values that are not finite or out of range, a
learning rate that underflows, weights holding NaN, JSON output with
non-finite numbers.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

from caffe_ft.cli import main
from caffe_ft.formats.wire import varint_bytes
from caffe_ft.formats.caffemodel import Blob, Model, load_model, save_model
from caffe_ft.formats.schema import load_schema
from conftest import cli_runner

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "recipe", "golden", "rewrite", "digits-full")
NET = """name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 4 } }
"""


def run(*args: str):  # type: ignore[no-untyped-def]
    return cli_runner().invoke(main, [str(arg) for arg in args])


def one_line_error(result) -> str:  # type: ignore[no-untyped-def]
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("caffe-ft: error: "), result.stderr
    return lines[0]


def model_file(path, name: str = "fc", data=None) -> str:  # type: ignore[no-untyped-def]
    """A caffemodel with one InnerProduct layer ``name`` fitting NET."""
    net = load_schema().new("NetParameter")
    net.name = "small"
    layer = net.layer.add()
    layer.name, layer.type = name, "InnerProduct"
    weights = np.ones((4, 192), np.float32) if data is None else data
    save_model(Model(net, [[Blob.of(weights), Blob.of(np.zeros(4, np.float32))]]), str(path))
    return str(path)


@pytest.fixture
def net(tmp_path):  # type: ignore[no-untyped-def]
    path = tmp_path / "net.prototxt"
    path.write_text(NET)
    return str(path)


# ------------------------------------------------------------------ class 3 --


def test_a_caffemodel_whose_strings_are_not_utf8_is_read_as_caffe_reads_it(net, tmp_path):
    good = model_file(tmp_path / "good.caffemodel", name="fcXX")
    bad = tmp_path / "bad.caffemodel"
    bad.write_bytes(open(good, "rb").read().replace(b"fcXX", b"fc\xff\xfe").replace(b"small", b"sm\xe9ll"))
    shown = run("inspect", bad)
    assert shown.exit_code == 0, shown.stderr
    assert "fc\\xff\\xfe" in shown.stdout
    info = json.loads(run("inspect", "--json", bad).stdout)
    assert info["layers"][0]["name"] == "fc\\xff\\xfe" and info["name"] == "sm\\xe9ll"
    checked = run("check", net, "--weights", bad)
    assert checked.exit_code == 0 and "fc\\xff\\xfe" in checked.stdout  # ignored: no layer of that name
    out = tmp_path / "init.caffemodel"
    assert run("init", net, "--weights", bad, "-o", out).exit_code == 0
    # upgrade writes the bytes back as they were.
    copy = tmp_path / "copy.caffemodel"
    assert run("upgrade", bad, "-o", copy).exit_code == 0
    assert load_model(str(copy), load_schema()).layers[0].name == b"fc\xff\xfe"


@pytest.mark.parametrize("dims, words", [
    ((0, 2**63 - 1), "more than INT_MAX values"),
    ((2**31, 1), "more than INT_MAX values"),
    ((65536, 65536), "more than INT_MAX values"),
    ((2**64 - 1,), "negative dimension"),  # int64 -1
    ((1,) * 33, "at most 32"),
])
def test_absurd_blob_shapes_are_refused_as_caffe_refuses_them(tmp_path, dims, words):
    packed = b"".join(varint_bytes(dim) for dim in dims)
    shape = b"\x0a" + varint_bytes(len(packed)) + packed
    blob = b"\x3a" + varint_bytes(len(shape)) + shape  # BlobProto.shape, no data
    path = tmp_path / "mean.binaryproto"
    path.write_bytes(blob)
    assert words in one_line_error(run("inspect", path))


def test_nesting_deeper_than_protobufs_limit_is_one_line(tmp_path):
    path = tmp_path / "deep.prototxt"
    path.write_bytes(b"layer { " * 330 + b"} " * 330)
    assert "too deep" in one_line_error(run("fmt", path))
    path.write_bytes(b"layer { " * 3 + b"} " * 3)
    assert 'has no field named "layer"' in one_line_error(run("fmt", path))  # what Caffe says too


def test_a_blob_past_int_max_values_or_past_memory_is_refused_before_allocating(net, tmp_path):
    weights = model_file(tmp_path / "w.caffemodel")
    huge = tmp_path / "huge.prototxt"
    huge.write_text(NET.replace("num_output: 4", "num_output: 2147483647"))
    assert "INT_MAX" in one_line_error(run("check", huge, "--weights", weights))
    assert "INT_MAX" in one_line_error(run("init", huge, "--weights", weights, "-o", tmp_path / "o.caffemodel"))
    # Twenty fresh layers of 2e9 values each: 149 GiB, past any test machine's memory.
    layers = ['layer { name: "data" type: "Input" top: "x0" input_param { shape { dim: 1 dim: 50000 } } }']
    for i in range(20):
        width = 40000 if i % 2 == 0 else 50000
        layers.append(f'layer {{ name: "ip{i}" type: "InnerProduct" bottom: "x{i}" top: "x{i + 1}" '
                      f"inner_product_param {{ num_output: {width} }} }}")
    big = tmp_path / "big.prototxt"
    big.write_text("\n".join(layers))
    assert run("check", big, "--weights", weights).exit_code == 0  # Caffe would start (and run out of memory)
    message = one_line_error(run("init", big, "--weights", weights, "-o", tmp_path / "o.caffemodel"))
    assert "GiB" in message and "available" in message
    assert not (tmp_path / "o.caffemodel").exists()


def test_a_stray_byte_in_a_prototxt_is_reported_at_its_line_and_column(tmp_path):
    path = tmp_path / "net.prototxt"
    path.write_bytes(NET.encode() + b'layer { name: "b" \xff type: "Input" }\n')
    for command in ("fmt", "upgrade", "inspect"):
        message = one_line_error(run(command, path))
        assert message.endswith(f"{path}:4:19: Interpreting non ascii codepoint 255."), message
    # Bytes that are not UTF-8 in comments and strings are Caffe's to keep: fmt keeps them.
    path.write_bytes(b'# caf\xe9\nname: "n\\351"\n')
    result = cli_runner().invoke(main, ["fmt", str(path)])
    assert result.exit_code == 0 and result.stdout_bytes == b'# caf\xe9\nname: "n\\351"\n'


# ------------------------------------------------------------------ class 6 --


@pytest.mark.parametrize("option, value, words", [
    ("--lr-scale", "inf", "not a finite number"),
    ("--lr-scale", "0", "greater than 0"),
    ("--step-scale", "nan", "not a finite number"),
    ("--frozen-lr-mult", "inf", "not a finite number"),
    ("--head-lr-mult", "-1", "at least 0"),
    ("--scale", "inf", "not a finite number"),
    ("--mean-value", "nan", "not a finite number"),
])
def test_option_values_that_are_not_finite_or_out_of_range_are_one_line(tmp_path, option, value, words):
    result = run("rewrite", f"{GOLDEN}/train_val.prototxt", "--strategy", "full", "--num-classes", "3",
                 option, value, "-o", tmp_path / "out")
    message = one_line_error(result)
    assert f"{option}: '{value}'" in message and words in message
    assert not (tmp_path / "out").exists()


def test_a_learning_rate_scaled_to_nothing_is_refused(tmp_path):
    result = run("rewrite", f"{GOLDEN}/train_val.prototxt", "--solver", f"{GOLDEN}/solver.prototxt",
                 "--strategy", "full", "--num-classes", "3", "--lr-scale", "1e-300", "-o", tmp_path / "out")
    assert "base_lr 0.01 x 1e-300 is 0" in one_line_error(result)


def test_check_reports_weights_that_are_not_finite_and_init_refuses_them(net, tmp_path):
    data = np.ones((4, 192), np.float32)
    data[0, :3] = [np.nan, np.inf, -np.inf]
    weights = model_file(tmp_path / "nan.caffemodel", data=data)
    result = run("check", net, "--weights", weights)
    assert result.exit_code == 1
    assert "layer 'fc' blob 0: 1 NaN and 2 inf of 768 values" in result.stdout and "NOT OK" in result.stdout
    report = json.loads(run("check", net, "--weights", weights, "--json").stdout)
    assert report["ok"] is False and report["nonfinite"]
    assert "NaN or inf" in one_line_error(run("init", net, "--weights", weights, "-o", tmp_path / "o.caffemodel"))


def test_inspect_json_is_valid_json_for_non_finite_values(tmp_path):
    values = np.array([np.nan, np.inf, 1.0], np.float32)
    path = tmp_path / "mean.binaryproto"
    shape = b"\x0a\x01\x03"
    data = struct.pack("<3f", *values)
    path.write_bytes(b"\x3a" + bytes([len(shape)]) + shape + b"\x2a" + bytes([len(data)]) + data)
    result = run("inspect", "--json", path)
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout, parse_constant=lambda name: pytest.fail(f"invalid JSON constant {name}"))
    assert info["max"] == "nan" or info["max"] == "inf"
