"""caffe_ft.data.sources: the one image-list parser and image-header reader
(pre-flight, data sources and planning alike), and the data summary that a
``rewrite``/``finetune`` reads once."""

from __future__ import annotations

import builtins
import collections
import io
import os

import numpy as np
import pytest
from PIL import Image

from caffe_ft.cli import main
from caffe_ft.data import preflight
from caffe_ft.data.sources import DataSource, read_header, read_image_list, summarize
from caffe_ft.errors import CaffeFtError
from conftest import cli_runner, write_datum_lmdb

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "digits")


def _listing(tmp_path, text: str) -> str:  # type: ignore[no-untyped-def]
    path = tmp_path / "list.txt"
    path.write_bytes(text.encode())
    return str(path)


@pytest.mark.parametrize("text, line", [
    ("a.png 0\n\nb.png 1\n", 2),  # a blank line between entries
    ("a.png 0\nb.png 1\n\n", 3),  # a blank line at the end: Caffe's getline reads it too
    ("a.png 0\n   \n", 2),  # spaces only
])
def test_blank_lines_are_refused_by_every_reader_at_their_line(tmp_path, schema, text, line):
    """Caffe's ImageData would load an image named '' (and abort): data sources, planning
    and pre-flight all refuse the list, naming the line."""
    listing = _listing(tmp_path, text)
    for read in (lambda: read_image_list(listing), lambda: DataSource.open(listing),
                 lambda: summarize(listing, schema),
                 lambda: preflight.check_list(preflight.ListCheck("data", listing))):
        with pytest.raises(CaffeFtError, match="empty line") as info:
            read()
        assert (info.value.path, info.value.line) == (listing, line)


def test_lists_have_no_comments_and_split_at_the_last_space(tmp_path):
    """A '#' starts no comment in Caffe's lists: it is part of the image name; names keep
    their spaces; a final newline starts no line, a Windows line end is dropped."""
    listing = _listing(tmp_path, "# old.png 1\na b.png 3\r\nc.png -0\nd.png +2")
    assert read_image_list(listing) == [("# old.png", 1), ("a b.png", 3), ("c.png", 0), ("d.png", 2)]
    for bad in ("  c.png 0  \n", "c.png\n", "c.png 1x\n", "c.png 1_0\n", " 3\n"):
        with pytest.raises(CaffeFtError, match="expected 'path label'") as info:
            read_image_list(_listing(tmp_path, "ok.png 1\n" + bad))
        assert info.value.line == 2, bad


def test_an_empty_or_missing_list_names_who_reads_it(tmp_path):
    with pytest.raises(CaffeFtError, match="the image list of layer 'data' is empty"):
        read_image_list(_listing(tmp_path, ""), "the image list of layer 'data'")
    with pytest.raises(CaffeFtError, match="cannot read the image list: No such file"):
        read_image_list(str(tmp_path / "missing.txt"))


def _jpeg_after_large_segments(path, height: int, width: int) -> bytes:  # type: ignore[no-untyped-def]
    """A JPEG whose frame header follows 200 KB of ICC profile (APP2 segments) and an EXIF block (APP1)."""
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x010E] = "x" * 30000  # ImageDescription
    Image.fromarray(pixels).save(str(path), "JPEG", icc_profile=b"\0" * 200_000, exif=exif.tobytes())
    data = path.read_bytes()
    assert data.index(b"\xff\xc0") > 200_000  # the SOF0 marker comes after them
    return data


def test_a_jpeg_frame_header_is_found_after_large_app_segments(tmp_path, schema):
    path = tmp_path / "big-exif.jpg"
    data = _jpeg_after_large_segments(path, 37, 53)
    with Image.open(str(path)) as opened:
        assert opened.size == (53, 37)
    assert read_header(io.BytesIO(data)) == (3, 37, 53)
    assert preflight.image_size(str(path)) == ((37, 53), None)
    listing = _listing(tmp_path, f"{path} 0\n{path} 1\n")
    summary = summarize(listing, schema)
    assert (summary.count, summary.labels, summary.first_name, summary.first_shape) == (2, (0, 1), str(path),
                                                                                        (3, 37, 53))
    (tmp_path / "cut.jpg").write_bytes(data[:150_000])  # breaks off inside the ICC profile
    assert preflight.image_size(str(tmp_path / "cut.jpg")) == (None, "its header is damaged")


@pytest.mark.parametrize("length", [20, 24, 25])
def test_a_png_cut_inside_its_header_is_damaged(tmp_path, length):
    path = tmp_path / "cut.png"
    Image.new("L", (5, 3)).save(str(path))
    path.write_bytes(path.read_bytes()[:length])  # breaks off before the colour type (byte 25)
    assert preflight.image_size(str(path)) == (None, "its header is damaged")


def test_a_missing_source_is_summarized_with_its_problem(tmp_path, schema):
    summary = summarize(str(tmp_path / "nowhere.txt"), schema)
    assert summary.count == 0 and "No such file" in (summary.problem or "")


def _count_reads(monkeypatch, names):  # type: ignore[no-untyped-def]
    """Count the opens of files (and LMDB environments) with these base names."""
    import sys

    counts: collections.Counter = collections.Counter()
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):  # type: ignore[no-untyped-def]
        if isinstance(file, str) and os.path.basename(file) in names:
            counts[os.path.basename(file)] += 1
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    lmdb = sys.modules.get("lmdb")
    if lmdb is not None:
        real_lmdb = lmdb.open

        def counting_lmdb(path, *args, **kwargs):  # type: ignore[no-untyped-def]
            counts[os.path.basename(path)] += 1
            return real_lmdb(path, *args, **kwargs)

        monkeypatch.setattr(lmdb, "open", counting_lmdb)
    return counts


def _rewrite(tmp_path, train: str, val: str) -> str:  # type: ignore[no-untyped-def]
    """A rewrite that needs the classes, the first example, the root, the counts and the class weights."""
    result = cli_runner().invoke(main, [
        "rewrite", os.path.join(EXAMPLE, "train_val.prototxt"), "--solver", os.path.join(EXAMPLE, "solver.prototxt"),
        "--strategy", "last-fc", "--class-weights", "auto", "--train-data", train, "--val-data", val,
        "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, (result.output, result.stderr)
    return result.output + result.stderr


def test_a_rewrite_reads_each_image_list_once(tmp_path, monkeypatch):
    for index in range(4):
        (tmp_path / f"img{index}.pgm").write_bytes(b"P5\n12 10\n255\n" + bytes(120))
    (tmp_path / "train.txt").write_text("".join(f"img{index % 4}.pgm {index % 3}\n" for index in range(30)))
    (tmp_path / "val.txt").write_text("img0.pgm 0\nimg1.pgm 2\n")
    counts = _count_reads(monkeypatch, {"train.txt", "val.txt"})
    said = _rewrite(tmp_path, str(tmp_path / "train.txt"), str(tmp_path / "val.txt"))
    assert counts == {"train.txt": 1, "val.txt": 1}
    assert "--num-classes 3" in said and "input example 1x10x12" in said and "30 examples" in said
    assert 'root_folder: "../"' in (tmp_path / "out" / "train_val.prototxt").read_text()


@pytest.mark.host  # the reference environment has no Python lmdb module
def test_a_rewrite_reads_each_lmdb_once(tmp_path, monkeypatch, schema):
    for name, size in (("train_lmdb", 30), ("val_lmdb", 2)):
        write_datum_lmdb(tmp_path / name, schema, ((1, 10, 12, bytes(120), index % 3) for index in range(size)))
    counts = _count_reads(monkeypatch, {"train_lmdb", "val_lmdb"})
    said = _rewrite(tmp_path, str(tmp_path / "train_lmdb"), str(tmp_path / "val_lmdb"))
    assert counts == {"train_lmdb": 1, "val_lmdb": 1}
    assert "--num-classes 3" in said and "input example 1x10x12" in said and "30 examples" in said
