"""Class 4 of issue 13: training data Caffe would abort on is found before any engine starts.

Images are written by Pillow (matplotlib's dependency) in each format the
header reader knows, and their sizes are held against what Pillow reads.
The ``train`` command is run through the CLI: its pre-flight comes before
pycaffe is imported, so the host (without Caffe) sees the same one-line
errors as the reference environment.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from caffe_ft.cli import main
from caffe_ft.data import preflight
from caffe_ft.errors import CaffeFtError
from conftest import cli_runner

NET = """name: "tiny"
layer {{ name: "data" type: "ImageData" top: "data" top: "label" include {{ phase: TRAIN }}
  transform_param {{ {transform} }}
  image_data_param {{ source: "{train}" batch_size: 2 {resize} }} }}
layer {{ name: "data" type: "ImageData" top: "data" top: "label" include {{ phase: TEST }}
  image_data_param {{ source: "{val}" batch_size: 2 new_height: 8 new_width: 8 }} }}
layer {{ name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param {{ num_output: 3 }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" {loss} }}
"""


def image(path, height: int, width: int, mode: str = "RGB") -> str:  # type: ignore[no-untyped-def]
    values = np.random.default_rng(height * 1000 + width).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(values).convert(mode).save(str(path))
    return str(path)


@pytest.mark.parametrize("name, mode", [
    ("a.png", "RGB"), ("b.jpg", "RGB"), ("c.bmp", "RGB"), ("d.gif", "P"), ("e.ppm", "RGB"), ("f.pgm", "L"),
    ("g.jpg", "L"), ("h.png", "L"),
])
def test_image_sizes_come_from_the_headers_as_pillow_reads_them(tmp_path, name, mode):
    for height, width in ((7, 13), (300, 2)):
        path = image(tmp_path / name, height, width, mode)
        assert preflight.image_size(path) == ((height, width), None)
        with Image.open(path) as opened:
            assert opened.size == (width, height)


def test_unreadable_images_say_why(tmp_path):
    path = image(tmp_path / "cut.jpg", 20, 20)
    data = open(path, "rb").read()
    (tmp_path / "cut.jpg").write_bytes(data[:30])
    assert preflight.image_size(str(tmp_path / "cut.jpg"))[1] == "its header is damaged"
    (tmp_path / "empty.png").write_bytes(b"")
    assert preflight.image_size(str(tmp_path / "empty.png")) == (None, "the file is empty")
    assert preflight.image_size(str(tmp_path / "missing.png")) == (None, "No such file or directory")
    (tmp_path / "other.tif").write_bytes(b"II*\x00whatever")
    assert preflight.image_size(str(tmp_path / "other.tif")) == (None, None)  # not read here, but readable


@pytest.fixture
def setup(tmp_path):  # type: ignore[no-untyped-def]
    """``setup(train_lines, transform=, resize=, loss=)`` -> the solver path of a run over those lines."""
    val = tmp_path / "val.txt"
    val.write_text(f"{image(tmp_path / 'v.png', 8, 8)} 1\n")

    def make(lines: str, transform: str = "", resize: str = "", loss: str = "") -> str:
        train = tmp_path / "train.txt"
        train.write_text(lines)
        net = tmp_path / "net.prototxt"
        net.write_text(NET.format(transform=transform, train=train, val=val, resize=resize, loss=loss))
        solver = tmp_path / "solver.prototxt"
        solver.write_text(f'net: "{net}"\ntest_iter: 1\ntest_interval: 10\nbase_lr: 0.1\nlr_policy: "fixed"\n'
                          f'max_iter: 1\nsnapshot_prefix: "{tmp_path}/snap"\nsolver_mode: CPU\n')
        return str(solver)

    return make


def train_error(solver: str) -> str:
    result = cli_runner().invoke(main, ["train", solver, "--cpu"])
    assert result.exit_code == 2, (result.output, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("caffe-ft: error: "), result.stderr
    return lines[0]


def test_a_missing_image_names_the_list_line_and_file(setup, tmp_path):
    good = image(tmp_path / "a.png", 8, 8)
    solver = setup(f"{good} 0\n{good} 1\n{tmp_path}/gone.png 2\n")
    message = train_error(solver)
    assert f"{tmp_path}/train.txt:3: cannot load image '{tmp_path}/gone.png': No such file" in message


def test_an_image_of_another_size_is_refused_unless_the_layer_resizes(setup, tmp_path):
    lines = f"{image(tmp_path / 'a.png', 8, 8)} 0\n{image(tmp_path / 'b.jpg', 9, 8)} 1\n"
    assert "train.txt:2: image" in train_error(setup(lines)) and "is 9x8 but" in train_error(setup(lines))
    assert preflight.check_list(preflight.ListCheck("data", str(tmp_path / "train.txt"), resize=True)) == 2
    # Cropping: every image must be at least the crop size.
    message = train_error(setup(lines, transform="crop_size: 9"))
    assert "train.txt:1: image" in message and "smaller than crop_size 9" in message


def test_labels_must_lie_below_num_output_except_the_ignored_one(setup, tmp_path):
    good = image(tmp_path / "a.png", 8, 8)
    message = train_error(setup(f"{good} 0\n{good} 3\n"))
    assert "train.txt:2: label 3 is outside 0..2" in message
    checks = preflight.list_checks(_net(tmp_path, setup(f"{good} 0\n{good} 255\n", loss="loss_param { ignore_label: 255 }")),
                                   "TRAIN")
    assert [check.ignore_label for check in checks] == [255]
    assert preflight.check_nets([(_net(tmp_path, None), "TRAIN", 0, ())]) == 2


def _net(tmp_path, _solver):  # type: ignore[no-untyped-def]
    from caffe_ft.formats import files
    from caffe_ft.formats.schema import load_schema

    return files.load_text(str(tmp_path / "net.prototxt"), load_schema(), files.NET).message


@pytest.mark.parametrize("lines, words", [
    ("", "is empty (Caffe aborts on it)"),
    ("a.png\n", ":1: expected 'path label' with an integer label"),
    ("a.png zero\n", ":1: expected 'path label'"),
    ("a.png 0\n\na.png 1\n", ":2: empty line"),
])
def test_lists_caffe_misreads_are_refused(setup, tmp_path, lines, words):
    image(tmp_path / "a.png", 8, 8)
    assert words in train_error(setup(lines.replace("a.png", str(tmp_path / "a.png"))))


def test_a_long_list_is_checked_in_one_pass(tmp_path):
    """20 000 lines over 50 files: every line read, every image's header read."""
    paths = [image(tmp_path / f"{i}.png", 8, 8) for i in range(50)]
    listing = tmp_path / "big.txt"
    listing.write_text("".join(f"{paths[i % 50]} {i % 3}\n" for i in range(20000)))
    assert preflight.check_list(preflight.ListCheck("data", str(listing), num_classes=3)) == 20000
    with pytest.raises(CaffeFtError, match="outside 0..1"):
        preflight.check_list(preflight.ListCheck("data", str(listing), num_classes=2))
