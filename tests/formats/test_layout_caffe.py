"""`caffe-ft fmt` against Caffe's own printer on Debian's caffe-doc prototxts.

``upgrade_net_proto_text`` / ``upgrade_solver_proto_text`` only re-lay a
current-format file out, so for those files ``fmt`` must print the same bytes;
with the comments kept, the output minus its comment lines must still be those
bytes, and every comment of the input must be there, in order.
"""

from __future__ import annotations

import gzip
import re
import subprocess

import pytest

from caffe_ft.formats import files
from caffe_ft.formats.layout import format_text, upgrade_text
from conftest import caffe_doc_files

pytestmark = pytest.mark.caffe


def _read(path: str) -> bytes:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        return handle.read()


def _strip_comments(data: bytes) -> bytes:
    """The file without its comments (outside strings: none of caffe-doc's strings hold '#')."""
    return re.sub(rb"#[^\n]*", b"", data)


def _caffe_print(tmp_path, data: bytes, kind: str) -> bytes:
    source, target = tmp_path / "in.prototxt", tmp_path / "out.prototxt"
    source.write_bytes(data)
    tool = "upgrade_net_proto_text" if kind == files.NET else "upgrade_solver_proto_text"
    subprocess.run([tool, str(source), str(target)], check=True, capture_output=True)
    return target.read_bytes()


DOC_FILES = caffe_doc_files("**/*.prototxt*")


def test_caffe_doc_is_there():
    assert len(DOC_FILES) >= 50


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: p.split("caffe-doc/")[-1])
def test_fmt_prints_what_caffe_prints(schema, tmp_path, path):
    data = _read(path)
    parsed = files.parse_text(data, path, schema)
    from caffe_ft.formats.upgrade import net_needs_upgrade, solver_needs_upgrade

    needs = net_needs_upgrade if parsed.kind == files.NET else solver_needs_upgrade
    expected = _caffe_print(tmp_path, data, parsed.kind)
    if needs(parsed.message):
        # The tool upgrades a legacy file rather than re-laying it out.
        text, notes = upgrade_text(files.parse_text(_strip_comments(data), path, schema))
        assert notes and text.encode() == expected
        return

    bare = format_text(files.parse_text(_strip_comments(data), path, schema))
    assert bare.encode() == expected

    with_comments = format_text(parsed)
    lines = with_comments.splitlines(True)
    code = "".join(line for line in lines if not line.lstrip().startswith("#"))
    code = re.sub(r"  #[^\n]*", "", code)
    assert code.encode() == expected
    comments = re.findall(rb"#[^\n]*", data)
    kept = re.findall(r"#[^\n]*", with_comments)
    assert [c.decode() for c in comments] == kept or sorted(c.decode() for c in comments) == sorted(kept)
    again = format_text(files.parse_text(with_comments.encode(), path, schema))
    assert again == with_comments


# Around the largest float: a text value up to halfway to 2**128 reads as the
# largest float, which Caffe prints as 3.40282347e+38 (and reads back as itself).
FLOAT_LIMITS = ["3.4028234663852886e38", "3.40282347e+38", "3.4028235e+38", "3.4028235677973366e+38",
                "340282356779733661637539395458142568448", "3.4028235677973370e+38", "1e39", "-3.4028235e+38",
                "-3.4028235677973366e+38", "-3.4028235677973370e+38", "1.1754943e-38", "1e-46"]


def test_float_limits_read_as_caffe_reads_them(schema, tmp_path):
    data = "".join(f'layer {{ name: "{v}" type: "ReLU" loss_weight: {v} }}\n' for v in FLOAT_LIMITS).encode()
    expected = _caffe_print(tmp_path, data, files.NET)
    printed = format_text(files.parse_text(data, "limits.prototxt", schema))
    assert printed.encode() == expected
    assert format_text(files.parse_text(printed.encode(), "again.prototxt", schema)) == printed
