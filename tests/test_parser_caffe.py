"""caffe-ft's text parser accepts exactly what Caffe's does.

Caffe reads prototxts with protobuf's C++ ``TextFormat`` (``ReadProtoFromTextFile``);
python's ``text_format`` is a different parser, so the oracle here is Caffe's
own ``ReadProtoFromTextFile`` called from libcaffe (and checked against the
``upgrade_net_proto_text`` tool).  Two sets of inputs go to both:

* a grid: every literal of ``mutants.LITERALS`` as the value of a field of
  each type (string, float, signed and unsigned integer, bool, enum, repeated
  string, message), so each number, escape and list rule is tried per type;
* random mutants of the seed nets (``mutants.text_mutant``), a fixed list
  (seeded), ``CAFFE_FT_DIFF_MUTANTS`` of them (default 3000).

Accept/reject must agree on every input; the test prints the counts.
"""

from __future__ import annotations

import os
import random
import tempfile
from typing import List, Optional, Tuple

import pytest

from caffe_ft.errors import CaffeFtError
from caffe_ft.formats import prototext
from caffe_ft.formats.schema import load_schema
from mutants import LITERALS, seeds, text_mutant

pytestmark = pytest.mark.caffe

# One field of each kind Caffe's parser reads differently; {} is the value.
SLOTS = [
    b'name: {}',  # string
    b'layer {{ name: "a" type: "Input" top: "a" loss_weight: {} }}',  # float
    b'layer {{ name: "a" type: "Input" top: "a" input_param {{ shape {{ dim: {} }} }} }}',  # int64
    b'layer {{ name: "c" type: "Convolution" convolution_param {{ kernel_size: {} }} }}',  # uint32
    b'state {{ level: {} }}',  # int32
    b'force_backward: {}',  # bool
    b'layer {{ name: "p" type: "Pooling" pooling_param {{ pool: {} }} }}',  # enum
    b'layer {{ name: "a" type: "Input" top: {} }}',  # repeated string
    b'layer: {}',  # repeated message
    b'state {{ phase: {} stage: "x" }}',  # enum then string
]


def grid() -> List[bytes]:
    return [slot.replace(b"{}", literal).replace(b"{{", b"{").replace(b"}}", b"}")
            for slot in SLOTS for literal in LITERALS]


def random_mutants(count: int) -> List[bytes]:
    rng = random.Random(20261129)
    pool = seeds()
    return [text_mutant(rng, pool) for _ in range(count)]


class CaffeParser:
    """Caffe's own ``caffe::ReadProtoFromTextFile`` into a ``caffe::NetParameter``,
    called in this process from ``libcaffe`` (thousands of files a second,
    where a tool run per file costs a fifth of a second).  Protobuf's error
    line is caught from file descriptor 2."""

    def __init__(self, folder: str) -> None:
        import ctypes
        import ctypes.util

        try:
            lib = ctypes.CDLL("libcaffe.so.1.0.0")
        except OSError:
            pytest.fail("libcaffe is not installed")
        self.read = lib._ZN5caffe21ReadProtoFromTextFileEPKcPN6google8protobuf7MessageE
        self.read.restype = ctypes.c_bool
        self.read.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
        self.construct = lib._ZN5caffe12NetParameterC1EPN6google8protobuf5ArenaE
        self.construct.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self.destroy = lib._ZN5caffe12NetParameterD1Ev
        self.destroy.argtypes = [ctypes.c_void_p]
        self.memory = ctypes.create_string_buffer(1 << 16)  # far more than sizeof(NetParameter)
        self.path = os.path.join(folder, "input.prototxt")
        self.log = tempfile.TemporaryFile()

    def accepts(self, text: bytes) -> Tuple[bool, str]:
        """Whether Caffe reads ``text`` as a NetParameter, and protobuf's first error."""
        with open(self.path, "wb") as handle:
            handle.write(text)
        saved = os.dup(2)
        self.log.seek(0)
        self.log.truncate()
        os.dup2(self.log.fileno(), 2)
        try:
            self.construct(self.memory, None)
            try:
                ok = bool(self.read(self.path.encode(), self.memory))
            finally:
                self.destroy(self.memory)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        self.log.seek(0)
        lines = self.log.read().decode("latin-1").splitlines()
        return ok, next((line.split("] ", 1)[-1] for line in lines if "Error parsing" in line), "")


def ours(text: bytes) -> Optional[str]:
    """None when caffe-ft's parser reads ``text`` as a NetParameter, else its error."""
    try:
        prototext.to_message(prototext.parse(text, "t"), load_schema().new("NetParameter"), "t")
    except CaffeFtError as exc:
        return str(exc)
    return None


def test_accepts_and_rejects_what_caffe_does(capsys, tmp_path):  # type: ignore[no-untyped-def]
    count = int(os.environ.get("CAFFE_FT_DIFF_MUTANTS", "3000"))
    inputs = grid() + random_mutants(count)
    caffe = CaffeParser(str(tmp_path))
    disagreements = []
    accepted = 0
    for text in inputs:
        caffe_ok, caffe_error = caffe.accepts(text)
        error = ours(text)
        accepted += caffe_ok
        if caffe_ok != (error is None):
            disagreements.append(f"{text!r}\n    Caffe: {caffe_error or 'accepts'}\n    caffe-ft: {error or 'accepts'}")
    with capsys.disabled():
        print(f"\ndifferential: {len(inputs)} inputs ({len(grid())} grid, {count} random mutants), "
              f"Caffe accepts {accepted}; caffe-ft agrees on {len(inputs) - len(disagreements)}")
    assert not disagreements, f"{len(disagreements)} disagreements:\n" + "\n".join(disagreements[:40])


def test_the_oracle_is_caffes_parser(tmp_path):  # type: ignore[no-untyped-def]
    """The in-process oracle says what the upgrade_net_proto_text tool says."""
    import shutil
    import subprocess

    caffe = CaffeParser(str(tmp_path))
    tool = shutil.which("upgrade_net_proto_text")
    assert tool, "Caffe's upgrade_net_proto_text is not installed"
    for text in (b'name: "x" layer { loss_weight: 010 }', b'name: "x" layer { loss_weight: 10 }', b"top: []"):
        (tmp_path / "t.prototxt").write_bytes(text)
        proc = subprocess.run([tool, str(tmp_path / "t.prototxt"), str(tmp_path / "o.prototxt")],
                              capture_output=True, timeout=60)
        tool_ok = b"Failed to parse input text file" not in proc.stderr
        assert caffe.accepts(text)[0] == tool_ok, text
    assert caffe.accepts(b'layer { loss_weight: 010 }') == (False, "Error parsing text-format caffe.NetParameter: "
                                                            "1:22: Expect a decimal number, got: 010")
