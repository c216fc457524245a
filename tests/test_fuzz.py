"""Fuzzing the readers: only a CaffeFtError may come out, never another exception.

* the text parser: prototxts built from a grammar (hypothesis: fields, nested
  messages, lists, values from the literals that matter, comments) and
  mutants of seed nets (``mutants.text_mutant``); an accepted file must also
  format, and its formatted text must read back to the same message;
* the binary reader: mutants of a caffemodel (current and V1), a
  ``.binaryproto`` and a ``.solverstate``, read and then described as
  ``inspect`` does (and checked against a net, as ``check`` does).

The run lasts ``CAFFE_FT_FUZZ_SECONDS`` seconds in all (default 30, so a
minute for ``scripts/test``, which runs it on the host and in the Caffe
environment), shared between the three fuzzers.  An input that makes anything else escape is saved
to ``tests/fuzz_cases/`` and the test fails naming it; every file there is
replayed by ``test_fuzz_case`` for good, so a fixed bug stays fixed (a few
hand-written ones sit beside them: 330-deep nesting, a stray byte, names
that are not UTF-8, a blob of shape (0, 2**63 - 1)).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
import traceback
from typing import Callable, List

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from caffe_ft.errors import CaffeFtError
from caffe_ft.formats import files, prototext
from caffe_ft.formats.caffemodel import Blob, Model, load_blob, load_model, load_solverstate, save_blob, save_model
from caffe_ft.formats.layout import format_text
from caffe_ft.formats.schema import load_schema
from caffe_ft.formats.upgrade import current_net
from caffe_ft.net import report, weights
from mutants import FUZZ_CASES, LITERALS, binary_mutant, seeds, text_mutant

BUDGET = float(os.environ.get("CAFFE_FT_FUZZ_SECONDS", "30"))
SCHEMA = load_schema()
CHECK_NET = prototext.to_message(prototext.parse(b"""
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 4 dim: 4 } } }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 2 } }
"""), SCHEMA.new("NetParameter"))


# ------------------------------------------------------------ the properties --


def read_text(data: bytes) -> None:
    """Parse as any text command does; an accepted file formats and reads back the same,
    and ``inspect`` (which reads a net a layer at a time) says what its whole message says."""
    try:
        parsed = files.parse_text(data, "fuzz.prototxt", SCHEMA)
    except CaffeFtError as exc:
        assert inspection(data) == ("error", str(exc)), "inspect read the file otherwise"
        return
    if parsed.kind == files.NET:
        try:
            whole = ("report", _plain(report.describe_net(current_net(parsed.message, "fuzz.prototxt"))))
        except CaffeFtError as exc:
            whole = ("error", str(exc))
        assert inspection(data) == whole, "inspect, a layer at a time, says something else than the whole message"
    text = format_text(parsed)
    again = files.parse_text(text.encode("utf-8", "surrogateescape"), "formatted.prototxt", SCHEMA, parsed.kind)
    # Compared as Caffe prints them: every NaN prints "nan", as in Caffe.
    assert prototext.print_message(again.message) == prototext.print_message(parsed.message), \
        "the formatted text means something else"


def inspection(data: bytes) -> tuple:
    """What ``inspect`` makes of text ``data``: ("report", its data) or ("error", the message)."""
    try:
        files.require_text(data, "fuzz.prototxt")
        kind, fields = files.read_fields(data, "fuzz.prototxt", SCHEMA)
        if kind != files.NET:
            files.parse_text(data, "fuzz.prototxt", SCHEMA)
            return ("solver",)
        described = report.describe_text(fields, data, "fuzz.prototxt", SCHEMA)
        if described is None:  # a legacy net, described upgraded
            described = report.describe_net(current_net(files.parse_text(data, "fuzz.prototxt", SCHEMA).message,
                                                        "fuzz.prototxt"))
        return ("report", _plain(described))
    except CaffeFtError as exc:
        return ("error", str(exc))


def _plain(described: report.NetReport) -> str:
    """A net report as ``inspect --json`` prints it (a NaN multiplier then equals itself)."""
    return json.dumps(report.json_safe(described.to_json()), allow_nan=False)


def read_binary(data: bytes, suffix: str, folder: str) -> None:
    """Read a binary file as ``inspect`` does, and a caffemodel as ``check`` does."""
    path = os.path.join(folder, "fuzz" + suffix)
    with open(path, "wb") as handle:
        handle.write(data)
    try:
        if suffix == ".binaryproto":
            info = report.describe_blob(load_blob(path, SCHEMA))
        elif suffix == ".solverstate":
            info = report.describe_solverstate(load_solverstate(path, SCHEMA))
        else:
            model = load_model(path, SCHEMA)
            info = report.describe_model(model)
            report.format_model(info)
            try:
                weights.check(CHECK_NET, model, "TEST")
            except CaffeFtError:
                pass
        json.dumps(report.json_safe(info), allow_nan=False)  # as --json prints it
    except CaffeFtError:
        return


def keep(data: bytes, suffix: str, error: BaseException) -> str:
    """Save an input that broke a property as a regression case; the message naming it."""
    os.makedirs(FUZZ_CASES, exist_ok=True)
    name = f"found-{hashlib.sha1(data).hexdigest()[:12]}{suffix}"
    with open(os.path.join(FUZZ_CASES, name), "wb") as handle:
        handle.write(data)
    trace = "".join(traceback.format_exception(type(error), error, error.__traceback__)[-3:])
    return f"{name} (kept in tests/fuzz_cases/): {error!r}\n{trace}"


def check_input(data: bytes, suffix: str, folder: str) -> None:
    try:
        if suffix == ".prototxt":
            read_text(data)
        else:
            read_binary(data, suffix, folder)
    except Exception as exc:  # the property: nothing but CaffeFtError escapes
        pytest.fail(keep(data, suffix, exc))


# ---------------------------------------------------------------- the seeds --


def binary_seeds(folder: str) -> List[tuple]:
    """A caffemodel (current format and V1), a mean file and a solverstate."""
    rng = np.random.default_rng(0)
    net = SCHEMA.new("NetParameter")
    net.name = "fuzz"
    for name, kind in (("data", "Input"), ("fc", "InnerProduct")):
        layer = net.layer.add()
        layer.name, layer.type = name, kind
        layer.top.append(name)
    model = Model(net, [[], [Blob.of(rng.standard_normal((2, 48))), Blob.of(np.zeros(2, np.float32))]])
    v1 = SCHEMA.new("NetParameter")
    layer = v1.layers.add()
    layer.name, layer.type = "fc", 14  # INNER_PRODUCT
    legacy = Blob((1, 1, 2, 48), rng.standard_normal((1, 1, 2, 48)).astype(np.float32), None,
                  ("num", "channels", "height", "width"), False)
    found = []
    for name, value in (("model.caffemodel", model), ("v1.caffemodel", Model(v1, [[legacy]]))):
        save_model(value, os.path.join(folder, name))
    save_blob(Blob.of(rng.standard_normal((1, 3, 4, 4))), os.path.join(folder, "mean.binaryproto"))
    state = SCHEMA.new("SolverState")
    state.iter, state.learned_net, state.current_step = 100, "snap_iter_100.caffemodel", 1
    for blob in (Blob.of(rng.standard_normal((2, 48))), Blob.of(np.zeros(2, np.float32))):
        history = state.history.add()
        history.shape.dim.extend(blob.shape)
        history.data.extend(blob.data.reshape(-1).tolist())
    with open(os.path.join(folder, "state.solverstate"), "wb") as handle:
        handle.write(state.SerializeToString())
    for name in ("model.caffemodel", "v1.caffemodel", "mean.binaryproto", "state.solverstate"):
        with open(os.path.join(folder, name), "rb") as handle:
            found.append((handle.read(), os.path.splitext(name)[1]))
    return found


# ------------------------------------------------------------- the fuzzers --


def until(seconds: float, step: Callable[[int], None]) -> int:
    """Call ``step(i)`` for i = 0, 1, ... until ``seconds`` have passed; how many ran."""
    end = time.monotonic() + seconds
    count = 0
    while time.monotonic() < end:
        step(count)
        count += 1
    return count


def test_fuzz_text_mutants(tmp_path, capsys):  # type: ignore[no-untyped-def]
    rng = random.Random(int(os.environ.get("CAFFE_FT_FUZZ_SEED", "1")))
    pool = seeds()
    count = until(BUDGET * 0.3, lambda _: check_input(text_mutant(rng, pool), ".prototxt", str(tmp_path)))
    with capsys.disabled():
        print(f"\nfuzz: {count} text mutants")


IDENT = st.sampled_from(["name", "type", "layer", "top", "bottom", "param", "lr_mult", "convolution_param",
                         "num_output", "kernel_size", "bias_term", "pool", "pooling_param", "state", "phase",
                         "stage", "level", "input_shape", "dim", "loss_weight", "include", "weight_filler",
                         "std", "input", "force_backward", "base_lr", "max_iter", "x", "_y", "layers"])
SCALAR = st.one_of(st.sampled_from(LITERALS), st.integers(-(2**65), 2**65).map(lambda i: str(i).encode()),
                   st.floats(allow_nan=True).map(lambda f: repr(f).encode()),
                   st.binary(max_size=6).map(lambda b: b'"' + b.replace(b'"', b"").replace(b"\\", b"") + b'"'))
SPACE = st.sampled_from([b" ", b"\n", b"\t", b"  # note\n", b"\r\n", b""])


def _field(body: st.SearchStrategy) -> st.SearchStrategy:
    scalar = st.tuples(IDENT, st.sampled_from([b": ", b":", b" "]), SCALAR).map(lambda t: t[0].encode() + t[1] + t[2])
    listed = st.tuples(IDENT, st.lists(SCALAR, max_size=3)).map(lambda t: t[0].encode() + b": [" + b", ".join(t[1]) + b"]")
    nested = st.tuples(IDENT, st.sampled_from([b" {", b": {", b" <"]), body).map(
        lambda t: t[0].encode() + t[1] + b" " + t[2] + (b" >" if t[1] == b" <" else b" }"))
    return st.one_of(scalar, listed, nested)


TEXT = st.recursive(st.just(b""), lambda body: st.lists(st.tuples(_field(body), SPACE), max_size=5).map(
    lambda items: b"".join(field + space for field, space in items)), max_leaves=20)


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(TEXT)
def _fuzz_grammar(text: bytes) -> None:
    check_input(text, ".prototxt", "")


def test_fuzz_text_grammar(capsys):  # type: ignore[no-untyped-def]
    count = until(BUDGET * 0.25, lambda _: _fuzz_grammar())
    with capsys.disabled():
        print(f"\nfuzz: {count * 60} generated prototxts")


def test_fuzz_binary_mutants(tmp_path, capsys):  # type: ignore[no-untyped-def]
    rng = random.Random(int(os.environ.get("CAFFE_FT_FUZZ_SEED", "1")))
    pool = binary_seeds(str(tmp_path))

    def step(_: int) -> None:
        data, suffix = rng.choice(pool)
        check_input(binary_mutant(rng, data), suffix, str(tmp_path))

    count = until(BUDGET * 0.45, step)
    with capsys.disabled():
        print(f"\nfuzz: {count} binary mutants")


def _cases() -> List[str]:
    if not os.path.isdir(FUZZ_CASES):
        return []
    return sorted(name for name in os.listdir(FUZZ_CASES) if not name.startswith("."))


@pytest.mark.parametrize("name", _cases())
def test_fuzz_case(name, tmp_path):  # type: ignore[no-untyped-def]
    """Every input a fuzzer once broke on (or a hand-written one) stays handled."""
    with open(os.path.join(FUZZ_CASES, name), "rb") as handle:
        data = handle.read()
    suffix = os.path.splitext(name)[1]
    if suffix == ".prototxt":
        read_text(data)
    else:
        read_binary(data, suffix, str(tmp_path))
