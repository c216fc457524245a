"""``caffe-ft train``: the training loop, snapshots, resume, divergence, devices.

Tests marked ``caffe`` train for real through pycaffe (CPU) in the reference
environment, each run in a subprocess as a user would run it.  The others
check the pure parts on the host: solver arithmetic, metrics and progress
output, snapshot commits, ELF-based CPU-only detection, and the GPU and
multi-GPU paths against a fake Caffe.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from collections import OrderedDict

import numpy as np
import pytest

from caffe_ft.training import devices, nets, progress, schedule, snapshots as snap
from caffe_ft.formats.caffemodel import load_model, load_solverstate
from caffe_ft.cli import main
from caffe_ft.errors import CaffeFtError
from conftest import REPO, cli_runner

EXAMPLE = os.path.join(REPO, "examples", "digits")


def solver_msg(parse_net, text: str):
    return parse_net(text, "SolverParameter")


# ------------------------------------------------------------ solver arithmetic --


@pytest.mark.parametrize("policy, extra, expected", [
    ("fixed", "", lambda i: 0.1),
    ("step", "gamma: 0.5 stepsize: 10", lambda i: 0.1 * 0.5 ** (i // 10)),
    ("exp", "gamma: 0.99", lambda i: 0.1 * 0.99 ** i),
    ("inv", "gamma: 0.001 power: 0.75", lambda i: 0.1 * (1 + 0.001 * i) ** -0.75),
    ("multistep", "gamma: 0.1 stepvalue: 5 stepvalue: 12", lambda i: 0.1 * 0.1 ** ((i >= 5) + (i >= 12))),
    ("poly", "power: 2", lambda i: 0.1 * (1 - i / 40) ** 2),
    ("sigmoid", "gamma: -0.1 stepsize: 20", lambda i: 0.1 / (1 + math.exp(0.1 * (i - 20)))),
])
def test_learning_rate_policies(parse_net, policy, extra, expected):
    solver = solver_msg(parse_net, f'base_lr: 0.1 max_iter: 40 lr_policy: "{policy}" {extra}')
    for iteration in (0, 1, 4, 5, 9, 10, 11, 12, 25, 39):
        assert schedule.learning_rate(solver, iteration) == pytest.approx(expected(iteration), rel=1e-6)


@pytest.mark.parametrize("text, complaint", [
    ('base_lr: 0.1', "lr_policy is unset"),
    ('base_lr: 0.1 lr_policy: "cosine"', "lr_policy is 'cosine'"),
    ('base_lr: 0.1 lr_policy: "step"', "positive stepsize"),
    ('base_lr: 0.1 lr_policy: "poly" power: 1', "positive max_iter"),
    ('base_lr: 0.1 lr_policy: "fixed" type: "Adamm"', "unknown solver type 'Adamm'; Caffe knows SGD, Nesterov"),
    ('base_lr: 0.1 lr_policy: "fixed" regularization_type: "L3"', "unknown regularization_type 'L3'"),
])
def test_solver_settings_caffe_would_abort_on(parse_net, text, complaint):
    with pytest.raises(CaffeFtError, match=re.escape(complaint)):
        schedule.check_solver(solver_msg(parse_net, text))


@pytest.mark.parametrize("settings", [
    "test_iter: 3 test_interval: 10",
    "test_iter: 3 test_interval: 10 test_initialization: false",
    "test_iter: 3 test_iter: 5 test_interval: 7",
    "test_interval: 10",  # no test nets
])
def test_test_schedule_counts_match_the_passes_done(parse_net, settings):
    solver = solver_msg(parse_net, settings + " max_iter: 50 iter_size: 3")
    done = 0
    for iteration in range(60):
        assert schedule.test_passes_before(solver, iteration) == done
        train, tests = schedule.resume_skips(solver, iteration)
        assert train == 3 * iteration
        assert tests == [done * count for count in solver.test_iter]
        done += schedule.test_due(solver, iteration)
    for last in (49, 50, 56, 70):
        assert schedule.final_test_due(solver, last) == (len(solver.test_iter) > 0 and last % solver.test_interval == 0)


def test_snapshot_prefix_as_caffe_resolves_it(tmp_path):
    solver = str(tmp_path / "sub" / "solver.prototxt")
    assert snap.effective_prefix(solver, "") == str(tmp_path / "sub" / "solver")
    assert snap.effective_prefix(solver, "snaps/run") == "snaps/run"
    assert snap.effective_prefix(solver, str(tmp_path)) == str(tmp_path / "solver")
    assert snap.snapshot_paths("a/b", 7) == ("a/b_iter_7.caffemodel", "a/b_iter_7.solverstate")


# ------------------------------------------------------------ solverstate splicing --


def make_state(schema, learned_net="old/x_iter_3.caffemodel", history=2):
    state = schema.new("SolverState")
    state.iter = 3
    if learned_net is not None:
        state.learned_net = learned_net
    for index in range(history):
        blob = state.history.add()
        blob.shape.dim.extend([2, 3])
        blob.data.extend(float(v) for v in np.arange(6) + index)
    state.current_step = 1
    return state


@pytest.mark.parametrize("before", ["old/x_iter_3.caffemodel", "", None])
def test_learned_net_is_rewritten_as_protobuf_would_write_it(schema, before):
    state = make_state(schema, before)
    spliced = snap.with_learned_net(state.SerializeToString(), "new/name_iter_3.caffemodel")
    state.learned_net = "new/name_iter_3.caffemodel"
    assert spliced == state.SerializeToString()
    assert snap.learned_net_span(spliced)[2] == "new/name_iter_3.caffemodel"


def test_commit_moves_a_staged_snapshot_into_place(schema, tmp_path):
    staging = snap.Staging(str(tmp_path / "run"))
    model, state = staging.staged_paths(3)
    with open(model, "wb") as handle:
        handle.write(b"model bytes")
    with open(state, "wb") as handle:
        handle.write(make_state(schema, model).SerializeToString())
    final = snap.commit(model, state, str(tmp_path / "run"), 3)
    assert final == snap.snapshot_paths(str(tmp_path / "run"), 3)
    assert not os.path.exists(model) and not os.path.exists(state)
    assert open(final[0], "rb").read() == b"model bytes"
    assert load_solverstate(final[1], schema).state.learned_net == final[0]
    staging.remove()
    assert sorted(os.listdir(tmp_path)) == ["run_iter_3.caffemodel", "run_iter_3.solverstate"]


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def fake_writer(schema, staging, solver_iter, clock, cost=0.0):
    """Writes what Caffe's Snapshot would, to the staging prefix, for the current iteration."""

    def write():
        model, state = staging.staged_paths(solver_iter[0])
        with open(model, "wb") as handle:
            handle.write(f"weights at {solver_iter[0]}".encode())
        with open(state, "wb") as handle:
            handle.write(make_state(schema, model).SerializeToString())
        clock.now += cost

    return write


def test_rolling_checkpoints_keep_the_last_good_state(schema, tmp_path):
    prefix = str(tmp_path / "run")
    staging = snap.Staging(prefix)
    clock, at = FakeClock(), [0]
    shots = snap.Snapshotter(fake_writer(schema, staging, at, clock, cost=0.5), prefix, staging, clock,
                             budget=0.1, min_gap=1.0)
    written = []
    for iteration in range(1, 27):
        shots.confirm(iteration - 1)  # the loss at iteration - 1 was finite
        at[0] = iteration
        before = set(shots.rolling)
        shots.checkpoint(iteration)
        if set(shots.rolling) - before:
            written.append(iteration)
        clock.now += 1.0  # one iteration: a second
    # A checkpoint costs 0.5 s, so with a 10 % budget they are 5 s apart.
    assert written == [1, 6, 11, 16, 21, 26]
    assert shots.rolling == [21, 26]  # 26 is not confirmed yet (its loss is unknown)
    assert len(os.listdir(staging.path)) == 4
    # The loss at 26 is nan: the weights at 26 are bad; 21 is the last good state.
    at_, paths = shots.last_good(26)
    assert at_ == 21 and paths == snap.snapshot_paths(prefix, 21)
    assert open(paths[0], "rb").read() == b"weights at 21"
    assert load_solverstate(paths[1], schema).state.learned_net == paths[0]


def test_saved_snapshots_count_as_good_states_and_are_not_written_twice(schema, tmp_path):
    prefix = str(tmp_path / "run")
    staging = snap.Staging(prefix)
    clock, at = FakeClock(), [10]
    calls = []
    write = fake_writer(schema, staging, at, clock)
    shots = snap.Snapshotter(lambda: (calls.append(at[0]), write()), prefix, staging, clock)
    assert shots.save(10) == shots.save(10) == snap.snapshot_paths(prefix, 10)
    assert calls == [10]
    shots.checkpoint(10)  # already saved: nothing to do
    assert calls == [10] and shots.latest == snap.snapshot_paths(prefix, 10)
    assert shots.last_good(11) == (10, snap.snapshot_paths(prefix, 10))
    assert shots.last_good(10) is None  # nothing from before 10


def test_resume_checks_the_snapshot_pair(schema, tmp_path, monkeypatch):
    from caffe_ft.formats.caffemodel import Model, save_model

    net = schema.new("NetParameter")
    net.layer.add(name="fc", type="InnerProduct")
    model_path = str(tmp_path / "run_iter_3.caffemodel")
    save_model(Model(net, [[]]), model_path)
    state_path = str(tmp_path / "run_iter_3.solverstate")
    with open(state_path, "wb") as handle:
        handle.write(make_state(schema, model_path).SerializeToString())
    point = snap.check_resume(state_path, schema, str(tmp_path))
    assert (point.model, point.iteration, point.fixed) == (model_path, 3, False)

    # Moved elsewhere: learned_net is gone, the caffemodel beside the state is used.
    moved = tmp_path / "moved"
    moved.mkdir()
    os.rename(model_path, moved / "run_iter_3.caffemodel")
    os.rename(state_path, moved / "run_iter_3.solverstate")
    work = tmp_path / "work"
    work.mkdir()
    point = snap.check_resume(str(moved / "run_iter_3.solverstate"), schema, str(work))
    assert point.fixed and point.model == str(moved / "run_iter_3.caffemodel")
    assert load_solverstate(point.state, schema).state.learned_net == os.path.abspath(point.model)

    # A truncated caffemodel is caught before Caffe would abort on it.
    data = (moved / "run_iter_3.caffemodel").read_bytes()
    (moved / "run_iter_3.caffemodel").write_bytes(data[:-1])
    with pytest.raises(CaffeFtError):
        snap.check_resume(str(moved / "run_iter_3.solverstate"), schema, str(work))
    os.unlink(moved / "run_iter_3.caffemodel")
    with pytest.raises(CaffeFtError, match="does not exist"):
        snap.check_resume(str(moved / "run_iter_3.solverstate"), schema, str(work))


# --------------------------------------------------------------- metrics, progress --


def test_metrics_file_records_and_resume_truncation(tmp_path):
    path = str(tmp_path / "m.jsonl")
    writer = progress.MetricsWriter(path, clock=lambda: 100.0)
    for iteration in range(6):
        writer.train(iteration, 1.0 / (iteration + 1), 0.01)
        if iteration % 2 == 0:
            writer.test(iteration, 0, {"accuracy": 0.5 + iteration / 10, "loss": float("nan")})
    writer.train(6, float("inf"), 0.01)
    writer.close()
    records = progress.read_metrics(path)
    assert [r["iteration"] for r in records if r["phase"] == "train"] == list(range(7))
    assert records[0] == {"phase": "train", "iteration": 0, "loss": 1.0, "lr": 0.01, "time": 100.0}
    assert records[1] == {"phase": "test", "iteration": 0, "net": 0, "time": 100.0,
                          "outputs": {"accuracy": 0.5, "loss": None}}
    assert records[-1]["loss"] is None  # inf is not JSON

    with open(path, "a") as handle:
        handle.write('{"phase": "train", "iter')  # torn by a crash
    writer = progress.MetricsWriter(path, resume_at=4, clock=lambda: 200.0)
    writer.train(4, 0.5, 0.001)
    writer.close()
    records = progress.read_metrics(path)
    iterations = [(r["phase"], r["iteration"]) for r in records]
    assert iterations == [("train", 0), ("test", 0), ("train", 1), ("train", 2), ("test", 2), ("train", 3),
                          ("train", 4)]
    assert records[-1]["time"] == 200.0


def test_metrics_file_that_is_not_ours(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"phase": "train", "iteration": 0, "loss": 1}\nnot json\n')
    with pytest.raises(CaffeFtError, match=r"m.jsonl:2: not a JSON line"):
        progress.read_metrics(str(path))


def test_formatting():
    assert progress.format_duration(5) == "00:05"
    assert progress.format_duration(3725) == "1:02:05"
    assert progress.format_duration(float("nan")) == "--:--"
    line = progress.format_train_line(100, 400, 0.53214, 0.01, 95.24, 3.2)
    assert line == "iter 100/400  loss 0.5321  lr 0.01  95.2 it/s  ETA 00:03"
    assert "- it/s  ETA --:--" in progress.format_train_line(0, 10, float("nan"), 0.1, None, None)
    assert progress.format_test_line(20, 1, {"accuracy": 0.91, "prob": [0.25, 0.75]}) == (
        "iter 20  test #1: accuracy = 0.91  prob = [0.25, 0.75]")


def test_smoothed_loss_is_the_mean_of_the_window():
    values = np.random.default_rng(0).random(50)
    smooth = progress.SmoothedLoss(7)
    for index, value in enumerate(values):
        assert smooth.add(float(value)) == pytest.approx(values[max(0, index - 6): index + 1].mean())
    smooth = progress.SmoothedLoss(2)
    smooth.add(float("nan"))
    assert math.isnan(smooth.add(1.0))
    assert smooth.add(3.0) == 2.0  # the nan has left the window


def test_rate_and_eta():
    clock = FakeClock()
    meter = progress.RateMeter(window=4, clock=clock)
    assert meter.rate() is None and meter.eta(10) is None
    for iteration in range(10):
        meter.mark(iteration)
        clock.now += 0.5 if iteration < 5 else 0.25  # speeds up: the window follows
    assert meter.rate() == pytest.approx(4.0)
    assert meter.eta(100) == pytest.approx(25.0)


class Stream:
    def __init__(self, tty):
        self.tty, self.parts = tty, []

    def isatty(self):
        return self.tty

    def write(self, text):
        self.parts.append(text)

    def flush(self):
        pass

    @property
    def text(self):
        return "".join(self.parts)


def test_plain_lines_when_not_a_terminal():
    stream = Stream(tty=False)
    reporter = progress.make_reporter(stream, start=0, max_iter=10, display=4, average_loss=2)
    assert isinstance(reporter, progress.LineReporter)
    for iteration in range(10):
        reporter.train(iteration, float(iteration), 0.5)
    reporter.test(10, 0, {"accuracy": 0.75})
    lines = stream.text.splitlines()
    assert [line.split()[1] for line in lines[:-1]] == ["0/10", "4/10", "8/10", "9/10"]
    assert lines[1].startswith("iter 4/10  loss 3.5  lr 0.5")  # mean of the last two
    assert lines[-1] == "iter 10  test #0: accuracy = 0.75"
    # display: 0 still gives some lines
    reporter = progress.make_reporter(Stream(False), start=100, max_iter=300, display=0)
    assert reporter.every == 10


def test_a_saturated_loss_is_called_divergence_once():
    """87.3365 = -ln(FLT_MIN), Caffe's loss when every label's probability is
    0: finite, so nothing stops, but the run is lost; said once, in lines and bar."""
    for tty in (False, True):
        stream = Stream(tty=tty)
        reporter = progress.make_reporter(stream, start=0, max_iter=4, display=1, bar=tty)
        for iteration, loss in enumerate([2.3, 87.33654, 87.33654, 87.3]):
            reporter.train(iteration, loss, 0.1)
        reporter.close()
        warnings = [line for line in re.split(r"[\r\n]", stream.text) if line.startswith("warning:")]
        assert len(warnings) == 1 and warnings[0].startswith("warning: iter 1: loss 87.3365 = -ln(FLT_MIN)"), warnings


def test_a_bar_on_a_terminal():
    pytest.importorskip("tqdm")
    stream = Stream(tty=True)
    reporter = progress.make_reporter(stream, start=5, max_iter=20, display=1)
    assert isinstance(reporter, progress.BarReporter)
    for iteration in range(5, 20):
        reporter.train(iteration, 0.25, 0.001)
    reporter.message("iter 20  test #0: accuracy = 1")
    reporter.close()
    assert "20/20" in stream.text and "loss 0.25" in stream.text and "lr 0.001" in stream.text
    assert "iter 20  test #0: accuracy = 1" in stream.text


def test_test_outputs_average_in_float32():
    """Caffe divides its float sums by test_iter in float: so are the means here."""
    sums = [np.array([0.7], np.float32), np.arange(3, dtype=np.float32)]
    result = progress.summarize_outputs(["acc", "per_class"], sums, 3)
    assert result["acc"] == float(np.float32(0.7) / np.float32(3)) != 0.7 / 3
    assert result["per_class"] == [0.0, float(np.float32(1) / np.float32(3)), float(np.float32(2) / np.float32(3))]


def test_plot_of_a_metrics_file(tmp_path):
    pytest.importorskip("matplotlib")
    from caffe_ft.training import plot

    path = str(tmp_path / "m.jsonl")
    writer = progress.MetricsWriter(path)
    for iteration in range(120):
        writer.train(iteration, 2.0 / (1 + iteration), 0.01)
        if iteration % 40 == 0:
            writer.test(iteration, 0, {"accuracy": iteration / 120, "loss": 1.0 / (1 + iteration)})
    writer.train(120, float("nan"), 0.01)
    writer.close()
    data = plot.curves(progress.read_metrics(path))
    assert data.train[0] == list(range(120))  # the nan is left out
    assert list(data.tests) == ["accuracy", "loss"] and data.tests["accuracy"][0] == [0, 40, 80]
    png = tmp_path / "m.png"
    result = cli_runner().invoke(main, ["plot", path, "-o", str(png)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot.moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


# ------------------------------------------------------------------ CPU-only detection --


def elf_bytes(needed, runpath=None, wide=True, little=True):
    """A minimal ELF shared object: a PT_LOAD mapping the file at 0x1000, a PT_DYNAMIC."""
    end = "<" if little else ">"
    strings = b"\0"
    offsets = []
    for name in [*needed, *( [runpath] if runpath else [])]:
        offsets.append(len(strings))
        strings += name.encode() + b"\0"
    header_size, ph_size = (64, 56) if wide else (52, 32)
    strtab_at = header_size + 2 * ph_size
    dynamic_at = strtab_at + len(strings) + (-len(strings)) % 8
    entries = [(1, offsets[i]) for i in range(len(needed))]
    if runpath:
        entries.append((29, offsets[-1]))
    entries += [(5, 0x1000 + strtab_at), (0, 0)]
    dyn_fmt = end + ("qQ" if wide else "iI")
    dynamic = b"".join(struct.pack(dyn_fmt, tag, value) for tag, value in entries)
    total = dynamic_at + len(dynamic)
    ident = b"\x7fELF" + bytes([2 if wide else 1, 1 if little else 2, 1]) + bytes(9)
    if wide:
        header = struct.pack(end + "16sHHIQQQIHHHHHH", ident, 3, 62, 1, 0, header_size, 0, 0, header_size,
                             ph_size, 2, 0, 0, 0)
        load = struct.pack(end + "IIQQQQQQ", 1, 5, 0, 0x1000, 0x1000, total, total, 0x1000)
        dyn = struct.pack(end + "IIQQQQQQ", 2, 6, dynamic_at, 0x1000 + dynamic_at, 0, len(dynamic), len(dynamic), 8)
    else:
        header = struct.pack(end + "16sHHIIIIIHHHHHH", ident, 3, 3, 1, 0, header_size, 0, 0, header_size,
                             ph_size, 2, 0, 0, 0)
        load = struct.pack(end + "IIIIIIII", 1, 0, 0x1000, 0x1000, total, total, 5, 0x1000)
        dyn = struct.pack(end + "IIIIIIII", 2, dynamic_at, 0x1000 + dynamic_at, 0, len(dynamic), len(dynamic), 6, 4)
    body = header + load + dyn + strings
    return body + bytes(dynamic_at - len(body)) + dynamic


@pytest.mark.parametrize("wide, little", [(True, True), (False, False), (False, True)])
def test_elf_needed_entries(tmp_path, wide, little):
    path = tmp_path / "lib.so"
    path.write_bytes(elf_bytes(["libcaffe.so.1.0.0", "libc.so.6"], "$ORIGIN/../lib", wide, little))
    deps = devices.read_elf_deps(str(path))
    assert deps.needed == ("libcaffe.so.1.0.0", "libc.so.6")
    assert deps.search_path == ("$ORIGIN/../lib",)
    (tmp_path / "text.so").write_text("not elf")
    with pytest.raises(devices.NotElf):
        devices.read_elf_deps(str(tmp_path / "text.so"))


def fake_pycaffe(tmp_path, caffe_needs):
    """``pkg/_caffe.so`` linking ``libcaffe.so.1`` found through its run path, which needs ``caffe_needs``."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "lib").mkdir()
    ext = tmp_path / "pkg" / "_caffe.cpython-39-x86_64-linux-gnu.so"
    ext.write_bytes(elf_bytes(["libcaffe.so.1", "libpython3.9.so.1.0"], "$ORIGIN/../lib"))
    (tmp_path / "lib" / "libcaffe.so.1").write_bytes(elf_bytes(caffe_needs))
    return str(ext)


def test_cpu_only_build_is_detected_from_the_libraries(tmp_path, monkeypatch):
    ext = fake_pycaffe(tmp_path, ["libglog.so.0", "libopenblas.so.0", "libc.so.6"])
    assert devices.linked_cuda([ext]) == ""
    monkeypatch.setattr(devices, "pycaffe_extensions", lambda: [ext])
    monkeypatch.setattr(devices, "probe_gpu_in_child", lambda: pytest.fail("no probe needed"))
    assert devices.gpu_support() is False
    with pytest.raises(CaffeFtError, match="CPU-only build"):
        devices.require_gpu_build()


def test_gpu_build_is_detected_from_the_libraries(tmp_path, monkeypatch):
    ext = fake_pycaffe(tmp_path, ["libglog.so.0", "libcublas.so.10", "libcurand.so.10", "libc.so.6"])
    assert devices.linked_cuda([ext]) == "libcublas.so.10"
    monkeypatch.setattr(devices, "pycaffe_extensions", lambda: [ext])
    assert devices.gpu_support() is True


def test_the_walk_stops_at_the_first_cuda_library(tmp_path, monkeypatch):
    """A CUDA library the extension itself needs answers before its Caffe library is looked for;
    the full list needs that library."""
    ext = tmp_path / "_caffe.so"
    ext.write_bytes(elf_bytes(["libcudart.so.10.1", "libcaffe.so.1", "libcudnn.so.7"], "$ORIGIN/nowhere"))
    monkeypatch.setattr(devices, "_DEFAULT_DIRS", ())
    monkeypatch.setattr(devices, "_ld_conf_dirs", lambda: [])
    monkeypatch.delenv("LD_LIBRARY_PATH", raising=False)
    assert devices.linked_cuda([str(ext)]) == "libcudart.so.10.1"
    assert devices.needed_libraries([str(ext)]) is None
    (tmp_path / "nowhere").mkdir()
    (tmp_path / "nowhere" / "libcaffe.so.1").write_bytes(elf_bytes(["libglog.so.0", "libcudnn.so.7"]))
    assert devices.needed_libraries([str(ext)]) == ["libcudart.so.10.1", "libcaffe.so.1", "libcudnn.so.7",
                                                    "libglog.so.0"]


def test_unreadable_libraries_fall_back_to_a_probe(tmp_path, monkeypatch):
    ext = fake_pycaffe(tmp_path, [])
    os.unlink(tmp_path / "lib" / "libcaffe.so.1")
    monkeypatch.setattr(devices, "_DEFAULT_DIRS", ())
    monkeypatch.setattr(devices, "_ld_conf_dirs", lambda: [])
    monkeypatch.delenv("LD_LIBRARY_PATH", raising=False)
    assert devices.linked_cuda([ext]) is None
    monkeypatch.setattr(devices, "pycaffe_extensions", lambda: [ext])
    asked = []
    monkeypatch.setattr(devices, "probe_gpu_in_child", lambda: asked.append(1) or False)
    assert devices.gpu_support() is False and asked == [1]


def test_probe_survives_an_abort(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nkill -ABRT $$\n")
    fake.chmod(0o755)
    assert devices.probe_gpu_in_child(str(fake)) is False


def test_gpu_lists(monkeypatch):
    assert devices.parse_gpus("0") == (0,)
    assert devices.parse_gpus(" 1, 0 ") == (1, 0)
    assert devices.parse_gpus("ALL") is None
    for bad in ("", "a", "0,,1", "-1", "0,0"):
        with pytest.raises(CaffeFtError):
            devices.parse_gpus(bad)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,5")
    assert devices.resolve_gpus("all") == (0, 1, 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(CaffeFtError, match="no GPU is visible"):
        devices.resolve_gpus("all")


# ------------------------------------------------------------------------ the fake Caffe --


class FakeCaffe:
    """A stand-in ``caffe`` module that records the pycaffe calls made (to a
    file, so that forked per-GPU processes record too) and trains nothing."""

    def __init__(self, log_path, schema, nan_at=None):
        self.log_path = log_path
        self.schema = schema
        self.nan_at = nan_at or {}  # rank -> iteration whose loss is nan
        self.rank = 0
        fake = self

        class NCCL:
            @staticmethod
            def new_uid():
                fake.record("new_uid")
                return b"uid"

            def __init__(self, solver, uid):
                fake.record("NCCL", uid=uid.decode())
                self.solver = solver

            def bcast(self):
                fake.record("bcast")

            def on_start(self):
                pass

            def on_gradients_ready(self):
                fake.record("allreduce", iteration=self.solver.iter)

        self.NCCL = NCCL

    def record(self, event, **info):
        with open(self.log_path, "a") as handle:
            handle.write(json.dumps({"pid": os.getpid(), "event": event, **info}) + "\n")

    def events(self):
        with open(self.log_path) as handle:
            return [json.loads(line) for line in handle]

    def has_nccl(self):
        return True

    def set_mode_cpu(self):
        self.record("set_mode_cpu")

    def set_mode_gpu(self):
        self.record("set_mode_gpu")

    def set_device(self, device):
        self.record("set_device", device=device)

    def set_solver_count(self, count):
        self.record("set_solver_count", count=count)

    def set_solver_rank(self, rank):
        self.rank = rank
        self.record("set_solver_rank", rank=rank)

    def set_multiprocess(self, value):
        self.record("set_multiprocess", value=value)

    def get_solver(self, path):
        from caffe_ft.formats import files

        param = files.load_text(path, self.schema, files.SOLVER).message
        self.record("get_solver", rank=self.rank)
        return FakeSolver(self, param)


class FakeBlob:
    def __init__(self, value=0.0):
        self.data = np.full((1,), value, np.float32)


class FakeLayer:
    def __init__(self, type_):
        self.type = type_


class FakeNet:
    def __init__(self, fake, test):
        self.fake = fake
        self.layers = [FakeLayer("ImageData"), FakeLayer("InnerProduct"), FakeLayer("SoftmaxWithLoss")]
        self.blobs = OrderedDict((name, FakeBlob()) for name in ("data", "label", "fc", "loss"))
        self.blob_loss_weights = OrderedDict((name, 1.0 if name == "loss" else 0.0) for name in self.blobs)
        self.outputs = ["loss"]
        if test:
            self.blobs["accuracy"] = FakeBlob(0.5)
            self.outputs = ["accuracy", "loss"]
        self.forwards = 0
        self.loss = 1.0

    def _bottom_ids(self, index):
        return [] if index == 0 else [0]

    def _forward(self, start, end):
        if start == 0:
            self.forwards += 1
        self.blobs["loss"].data[...] = self.loss
        return self.loss

    def share_with(self, other):
        pass

    def copy_from(self, path):
        self.fake.record("copy_from", path=path)

    def after_forward(self, callback):
        pass

    def after_backward(self, callback):
        self.fake.record("after_backward")


class FakeSolver:
    def __init__(self, fake, param):
        self.fake, self.param = fake, param
        self.iter = 0
        self.net = FakeNet(fake, test=False)
        self.test_nets = [FakeNet(fake, test=True) for _ in param.test_iter] if fake.rank == 0 else []
        self.callbacks = []

    def add_callback(self, on_start, on_gradients_ready=None):
        if on_gradients_ready is None:  # an NCCL object
            self.callbacks.append((on_start.on_start, on_start.on_gradients_ready))
            self.fake.record("add_callback_nccl")
        else:
            self.callbacks.append((on_start, on_gradients_ready))

    def step(self, count):
        for _ in range(count):
            for start, _ in self.callbacks:
                start()
            nan = self.fake.nan_at.get(self.fake.rank)
            self.net.loss = float("nan") if nan is not None and self.iter >= nan else 1.0 / (1 + self.iter)
            self.net._forward(0, 2)
            for _, ready in self.callbacks:
                ready()
            self.iter += 1

    def snapshot(self):
        model, state = snap.snapshot_paths(self.param.snapshot_prefix, self.iter)
        net = self.fake.schema.new("NetParameter")
        net.layer.add(name="fc", type="InnerProduct")
        with open(model, "wb") as handle:
            handle.write(net.SerializeToString())
        message = self.fake.schema.new("SolverState")
        message.iter = self.iter
        message.learned_net = model
        with open(state, "wb") as handle:
            handle.write(message.SerializeToString())
        self.fake.record("snapshot", iteration=self.iter, rank=self.fake.rank)

    def restore(self, path):
        self.iter = int(load_solverstate(path, self.fake.schema).state.iter)
        self.fake.record("restore", path=path)


FAKE_SOLVER = """net: "{net}"
test_iter: 2
test_interval: 4
base_lr: 0.01
lr_policy: "fixed"
max_iter: 10
snapshot: 5
snapshot_prefix: "{prefix}"
solver_mode: GPU
device_id: 3
"""


@pytest.fixture
def fake_gpu_setup(tmp_path, schema, monkeypatch, dataset):
    """A solver (its data real: the pre-flight reads it), a fake Caffe in
    sys.modules, and pycaffe taken for a GPU build."""
    net = tmp_path / "net.prototxt"
    net.write_text(net_text(dataset))
    solver = tmp_path / "solver.prototxt"
    solver.write_text(FAKE_SOLVER.format(net=net, prefix=tmp_path / "snap"))
    fake = FakeCaffe(str(tmp_path / "calls.jsonl"), schema)
    monkeypatch.setitem(sys.modules, "caffe", fake)
    monkeypatch.setattr(devices, "gpu_support", lambda: True)
    return fake, str(solver), tmp_path


def invoke(*args):
    return cli_runner().invoke(main, list(args), catch_exceptions=False)


def test_one_gpu_through_a_fake_caffe(fake_gpu_setup):
    """A fake Caffe, because no real Caffe here can run the GPU path: the
    solver's ``solver_mode: GPU`` and ``device_id`` pick the device, selected
    before the solver is made, as ``caffe train`` does."""
    fake, solver, tmp_path = fake_gpu_setup
    result = invoke("train", solver, "--metrics", str(tmp_path / "m.jsonl"))
    assert result.exit_code == 0, result.stderr
    events = [e["event"] for e in fake.events()]
    assert events[:3] == ["set_device", "set_mode_gpu", "get_solver"]
    assert fake.events()[0]["device"] == 3
    assert "NCCL" not in events and "set_solver_count" not in events
    assert [e["iteration"] for e in fake.events() if e["event"] == "snapshot"][-2:] == [5, 10]
    assert "on GPU 3" in result.stderr
    tests = [r for r in progress.read_metrics(str(tmp_path / "m.jsonl")) if r["phase"] == "test"]
    assert [r["iteration"] for r in tests] == [0, 4, 8]  # no final test: 10 % 4 != 0
    assert tests[0]["outputs"] == {"accuracy": 0.5, "loss": 1.0}

    fake_calls = fake.events()
    result = invoke("train", solver, "--gpu", "1")
    assert result.exit_code == 0
    assert fake.events()[len(fake_calls)] == {"pid": os.getpid(), "event": "set_device", "device": 1}


def test_several_gpus_through_a_fake_caffe(fake_gpu_setup):
    """A fake Caffe, because no real Caffe here can run the GPU path: one
    process per GPU, each selecting its device, solver count and rank and
    multiprocess mode before making its solver; NCCL broadcasts from each
    and all-reduces every iteration; only the first process tests and snapshots."""
    fake, solver, tmp_path = fake_gpu_setup
    result = invoke("train", solver, "--gpu", "2,5", "--metrics", str(tmp_path / "m.jsonl"))
    assert result.exit_code == 0, result.stderr
    events = fake.events()
    parent = os.getpid()
    assert [e["event"] for e in events if e["pid"] == parent] == ["new_uid"]
    workers = sorted({e["pid"] for e in events} - {parent})
    assert len(workers) == 2
    by_rank = {}
    for pid in workers:
        mine = [e for e in events if e["pid"] == pid]
        rank = next(e["rank"] for e in mine if e["event"] == "set_solver_rank")
        by_rank[rank] = mine
        names = [e["event"] for e in mine]
        assert names[:7] == ["set_device", "set_mode_gpu", "set_solver_count", "set_solver_rank",
                             "set_multiprocess", "get_solver", "NCCL"]
        assert names[7:9] == ["bcast", "add_callback_nccl"]
        assert mine[2]["count"] == 2 and mine[4]["value"] is True and mine[6]["uid"] == "uid"
        assert [e["iteration"] for e in mine if e["event"] == "allreduce"] == list(range(10))
    assert by_rank[0][0]["device"] == 2 and by_rank[1][0]["device"] == 5
    assert not [e for e in by_rank[1] if e["event"] == "snapshot"]
    assert [e["iteration"] for e in by_rank[0] if e["event"] == "snapshot"][-2:] == [5, 10]
    tests = [r["iteration"] for r in progress.read_metrics(str(tmp_path / "m.jsonl")) if r["phase"] == "test"]
    assert tests == [0, 4, 8]


def test_gpus_agree_to_stop_when_one_diverges(fake_gpu_setup):
    """A fake Caffe, because no real Caffe here can run the GPU path: when
    only the second GPU's loss turns nan, both processes stop before the
    all-reduce of that iteration (no process is left waiting in NCCL) and
    the first commits the last good state."""
    fake, solver, tmp_path = fake_gpu_setup
    fake.nan_at = {1: 7}
    result = invoke("train", solver, "--gpu", "0,1")
    assert result.exit_code == 2
    assert "the loss became nan on another GPU at iteration 7" in result.stderr
    assert "last good state (iteration 5)" in result.stderr  # the snapshot at 5
    events = fake.events()
    for pid in {e["pid"] for e in events} - {os.getpid()}:
        assert [e["iteration"] for e in events if e["pid"] == pid and e["event"] == "allreduce"] == list(range(7))


def test_gpus_stop_together(fake_gpu_setup):
    """A fake Caffe, because no real Caffe here can run the GPU path: a stop
    request (here --stop-after, which takes the path of a signal) ends every
    process after the same iteration; the first snapshots it."""
    fake, solver, tmp_path = fake_gpu_setup
    result = invoke("train", solver, "--gpu", "0,1", "--stop-after", "3")
    assert result.exit_code == 130
    assert "stopped at iteration 3" in result.stderr
    assert "--resume " + str(tmp_path / "snap_iter_3.solverstate") + " --gpu 0,1" in result.stderr
    events = fake.events()
    for pid in {e["pid"] for e in events} - {os.getpid()}:
        assert [e["iteration"] for e in events if e["pid"] == pid and e["event"] == "allreduce"] == [0, 1, 2]


def test_multi_gpu_needs_nccl(fake_gpu_setup, monkeypatch):
    fake, solver, _ = fake_gpu_setup
    monkeypatch.setattr(fake, "has_nccl", lambda: False, raising=False)
    result = invoke("train", solver, "--gpu", "0,1")
    assert result.exit_code == 2 and "without NCCL" in result.stderr


def test_gpu_on_a_cpu_only_build_is_explained(fake_gpu_setup, monkeypatch):
    fake, solver, _ = fake_gpu_setup
    monkeypatch.setattr(devices, "gpu_support", lambda: False)
    for args in (["--gpu", "0"], []):  # explicit, or the solver's solver_mode: GPU
        result = invoke("train", solver, *args)
        assert result.exit_code == 2
        assert result.stderr.count("\n") == 1 and "CPU-only build" in result.stderr and "--cpu" in result.stderr
    assert not os.path.exists(fake.log_path)  # pycaffe was never asked for anything
    result = invoke("train", solver, "--cpu", "--stop-after", "3")
    assert result.exit_code == 130
    assert [e["event"] for e in fake.events()][:2] == ["set_mode_cpu", "get_solver"]


def test_option_conflicts(fake_gpu_setup):
    _, solver, tmp_path = fake_gpu_setup
    result = invoke("train", solver, "--gpu", "0", "--cpu")
    assert result.exit_code == 2 and "exclude each other" in result.stderr
    result = invoke("train", solver, "--cpu", "--weights", "w.caffemodel", "--resume", "s.solverstate")
    assert result.exit_code == 2 and "not both" in result.stderr


def test_fake_interrupt_and_resume_command(fake_gpu_setup):
    fake, solver, tmp_path = fake_gpu_setup
    result = invoke("train", solver, "--cpu", "--stop-after", "6", "--metrics", str(tmp_path / "m.jsonl"))
    assert result.exit_code == 130
    state = str(tmp_path / "snap_iter_6.solverstate")
    expected = f"caffe-ft train {shlex.quote(solver)} --resume {state} --cpu --metrics {tmp_path / 'm.jsonl'}"
    assert f"resume with: {expected}" in result.stderr
    mark = len(fake.events())
    result = invoke(*shlex.split(expected)[1:])
    assert result.exit_code == 0, result.stderr
    resumed = fake.events()[mark:]
    assert {"event": "restore", "path": state} in [{k: v for k, v in e.items() if k != "pid"} for e in resumed]
    records = progress.read_metrics(str(tmp_path / "m.jsonl"))
    assert [r["iteration"] for r in records if r["phase"] == "train"] == list(range(10))


def test_solver_nets_and_nondeterminism(parse_net, schema, tmp_path):
    net_text = Path(EXAMPLE, "train_val.prototxt").read_text()
    net = tmp_path / "net.prototxt"
    net.write_text(net_text)
    solver = solver_msg(parse_net, f'net: "{net}" test_iter: 2 test_iter: 3 test_interval: 5')
    train, tests = nets.solver_nets(solver, schema)
    assert train.phase == "TRAIN" and [t.phase for t in tests] == ["TEST", "TEST"]
    reasons = nets.nondeterminism(train)
    assert reasons == ["layer 'data' shuffles its list (shuffle: true)"]
    net.write_text(net_text.replace("shuffle: true", "shuffle: false").replace(
        'layer { name: "relu3"',
        'layer { name: "drop" type: "Dropout" bottom: "fc1" top: "fc1" }\nlayer { name: "relu3"'))
    assert nets.nondeterminism(nets.solver_nets(solver, schema)[0]) == [
        "layer 'drop' is Dropout: its random masks are not in the snapshot"]
    bad = solver_msg(parse_net, f'train_net: "{net}" test_net: "{net}" test_iter: 2 test_iter: 3 test_interval: 5')
    with pytest.raises(CaffeFtError, match="test_iter must be given once per test net"):
        nets.solver_nets(bad, schema)


# =============================================================== real Caffe (CPU) ==

SIZE = 16


def write_pgm(path, image):
    with open(path, "wb") as handle:
        handle.write(b"P5\n%d %d\n255\n" % (image.shape[1], image.shape[0]) + image.tobytes())


def make_dataset(directory, count, seed, noise=110):
    """Two classes told apart by where a soft bright blob sits (left or right half), in noise."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    lines = []
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    for index in range(count):
        label = index % 2
        cx = rng.uniform(2, 6) + (8 if label else 0)
        cy = rng.uniform(3, 13)
        blob = 140 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 8.0)
        image = np.clip(rng.uniform(0, noise, (SIZE, SIZE)) + blob, 0, 255).astype(np.uint8)
        path = os.path.join(directory, f"{index}.pgm")
        write_pgm(path, image)
        lines.append(f"{path} {label}\n")
    return lines


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    train_list, val_list = root / "train.txt", root / "val.txt"
    train_list.write_text("".join(make_dataset(str(root / "train"), 96, 0)))
    val_list.write_text("".join(make_dataset(str(root / "val"), 50, 1)))
    return str(train_list), str(val_list)


def net_text(dataset, frozen=False, batch=16, val_batch=25):
    text = Path(EXAMPLE, "train_val.prototxt").read_text()
    text = text.replace('source: "train.txt"', f'source: "{dataset[0]}"').replace(
        'source: "val.txt"', f'source: "{dataset[1]}"').replace("shuffle: true", "shuffle: false")
    text = text.replace("batch_size: 32", f"batch_size: {batch}").replace("batch_size: 50", f"batch_size: {val_batch}")
    if frozen:  # conv1 and conv2 do not learn
        for old in ('  top: "conv1"\n  param { lr_mult: 1 }  # weights\n  param { lr_mult: 2 }  # biases learn twice as fast\n',
                    '  top: "conv2"\n  param { lr_mult: 1 }\n  param { lr_mult: 2 }\n'):
            assert text.count(old) == 1
            text = text.replace(old, old.split("\n")[0] + "\n  param { lr_mult: 0 }\n  param { lr_mult: 0 }\n")
    return text


SOLVER = """net: "{net}"
test_iter: 2
test_interval: {test_interval}
base_lr: {base_lr}
momentum: 0.9
weight_decay: 0.0005
lr_policy: "step"
gamma: 0.5
stepsize: 15
display: {display}
max_iter: {max_iter}
snapshot: {snapshot}
snapshot_prefix: "snap/run"
{extra}solver_mode: CPU
random_seed: 7
"""


def setup_run(directory, dataset, max_iter=40, base_lr=0.01, snapshot=0, test_interval=10, frozen=False,
              extra="", display=0, solver_type=None):
    """A directory with net.prototxt, solver.prototxt and snap/, for one run."""
    os.makedirs(os.path.join(directory, "snap"), exist_ok=True)
    net = os.path.join(directory, "net.prototxt")
    with open(net, "w") as handle:
        handle.write(net_text(dataset, frozen))
    if solver_type:
        extra += solver_type
    with open(os.path.join(directory, "solver.prototxt"), "w") as handle:
        handle.write(SOLVER.format(net=net, max_iter=max_iter, base_lr=base_lr, snapshot=snapshot,
                                   test_interval=test_interval, extra=extra, display=display))
    return str(directory)


def caffe_ft(cwd, *args, timeout=300):
    """Run the caffe-ft CLI in a subprocess, as a user does."""
    return subprocess.run([sys.executable, "-m", "caffe_ft.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=timeout)


def resume_line(stderr):
    found = re.search(r"^resume with: (.*)$", stderr, re.M)
    assert found, stderr
    return shlex.split(found.group(1))


def run_resume(cwd, command):
    assert command[:2] == ["caffe-ft", "train"]
    return caffe_ft(cwd, *command[1:])


def train_records(path):
    return [r for r in progress.read_metrics(path) if r["phase"] == "train"]


def passes_recorded(path):
    return [r for r in progress.read_metrics(path) if r["phase"] == "test"]


@pytest.mark.caffe
def test_loss_falls_and_snapshots_load_in_pycaffe(dataset, tmp_path, schema):
    run = setup_run(tmp_path / "a", dataset, max_iter=60, snapshot=30)
    done = caffe_ft(run, "train", "solver.prototxt", "--metrics", "m.jsonl", "--plot", "m.png")
    assert done.returncode == 0, done.stderr
    losses = [r["loss"] for r in train_records(os.path.join(run, "m.jsonl"))]
    assert len(losses) == 60
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    tests = passes_recorded(os.path.join(run, "m.jsonl"))
    assert [t["iteration"] for t in tests] == [0, 10, 20, 30, 40, 50, 60]
    assert tests[-1]["outputs"]["accuracy"] >= 0.9 > tests[0]["outputs"]["accuracy"]
    assert open(os.path.join(run, "m.png"), "rb").read(4) == b"\x89PNG"
    assert sorted(os.listdir(os.path.join(run, "snap"))) == [
        "run_iter_30.caffemodel", "run_iter_30.solverstate", "run_iter_60.caffemodel", "run_iter_60.solverstate"]

    import caffe

    model = os.path.join(run, "snap", "run_iter_60.caffemodel")
    state = load_solverstate(os.path.join(run, "snap", "run_iter_60.solverstate"), schema)
    assert state.state.iter == 60 and state.state.learned_net == "snap/run_iter_60.caffemodel"
    caffe.set_mode_cpu()
    net = caffe.Net(os.path.join(EXAMPLE, "deploy.prototxt"), model, caffe.TEST)
    ours = load_model(model, schema).layer_blobs()
    assert np.array_equal(net.params["fc2"][0].data, ours["fc2"][0].data.reshape(10, 64))


@pytest.mark.caffe
def test_same_model_as_caffe_train(dataset, tmp_path):
    """The loop here updates exactly as ``caffe train`` does: same caffemodel and
    solverstate bytes; the loss recorded per iteration is the one Caffe displays."""
    ours = setup_run(tmp_path / "ours", dataset, max_iter=30, extra="iter_size: 2\n", display=1)
    theirs = setup_run(tmp_path / "theirs", dataset, max_iter=30, extra="iter_size: 2\n", display=1)
    done = caffe_ft(ours, "train", "solver.prototxt", "--metrics", "m.jsonl")
    assert done.returncode == 0, done.stderr
    log = subprocess.run(["caffe", "train", "--solver", "solver.prototxt"], cwd=theirs, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, universal_newlines=True, env=dict(os.environ, GLOG_minloglevel="0"))
    assert log.returncode == 0, log.stdout[-2000:]
    for name in ("run_iter_30.caffemodel", "run_iter_30.solverstate"):
        assert open(os.path.join(ours, "snap", name), "rb").read() == open(
            os.path.join(theirs, "snap", name), "rb").read(), name
    shown = {int(m.group(1)): float(m.group(2))
             for m in re.finditer(r"Iteration (\d+) \([^)]*\), loss = (\S+)", log.stdout)}
    recorded = {r["iteration"]: r["loss"] for r in train_records(os.path.join(ours, "m.jsonl"))}
    assert sorted(shown) == list(range(30))
    for iteration, loss in shown.items():
        assert recorded[iteration] == pytest.approx(loss, rel=1e-4)
    tested, at = {}, None
    for line in log.stdout.splitlines():
        found = re.search(r"Iteration (\d+), Testing net", line)
        if found:
            at = int(found.group(1))
        found = re.search(r"Test net output #\d+: (\w+) = (\S+)", line)
        if found:
            tested.setdefault(at, {})[found.group(1)] = float(found.group(2))
    ours_tests = {r["iteration"]: r["outputs"] for r in passes_recorded(os.path.join(ours, "m.jsonl"))}
    assert sorted(ours_tests) == sorted(tested) == [0, 10, 20, 30]
    for iteration, outputs in tested.items():
        for name, value in outputs.items():  # Caffe prints 6 digits
            assert ours_tests[iteration][name] == pytest.approx(value, rel=1e-5, abs=1e-6)


@pytest.mark.caffe
def test_interrupt_and_resume_equals_uninterrupted(dataset, tmp_path, schema):
    whole = setup_run(tmp_path / "whole", dataset, max_iter=40, snapshot=20)
    parts = setup_run(tmp_path / "parts", dataset, max_iter=40, snapshot=20)
    done = caffe_ft(whole, "train", "solver.prototxt", "--metrics", "m.jsonl")
    assert done.returncode == 0, done.stderr
    # Stop at 13 (not a multiple of the 6 batches of the list, nor of test_interval).
    stopped = caffe_ft(parts, "train", "solver.prototxt", "--stop-after", "13", "--metrics", "m.jsonl")
    assert stopped.returncode == 130, stopped.stderr
    assert "stopped at iteration 13" in stopped.stderr
    command = resume_line(stopped.stderr)
    assert command == ["caffe-ft", "train", "solver.prototxt", "--resume", "snap/run_iter_13.solverstate",
                       "--metrics", "m.jsonl"]
    assert load_solverstate(os.path.join(parts, "snap/run_iter_13.solverstate"), schema).state.iter == 13
    resumed = run_resume(parts, command)
    assert resumed.returncode == 0, resumed.stderr
    assert "skipping the 13 batches" in resumed.stderr
    for name in ("run_iter_20.caffemodel", "run_iter_40.caffemodel", "run_iter_40.solverstate"):
        assert open(os.path.join(whole, "snap", name), "rb").read() == open(
            os.path.join(parts, "snap", name), "rb").read(), name
    # The test passes after the resume saw the same batches too.
    assert [(t["iteration"], t["outputs"]) for t in passes_recorded(os.path.join(whole, "m.jsonl"))] == [
        (t["iteration"], t["outputs"]) for t in passes_recorded(os.path.join(parts, "m.jsonl"))]
    assert [r["loss"] for r in train_records(os.path.join(whole, "m.jsonl"))] == [
        r["loss"] for r in train_records(os.path.join(parts, "m.jsonl"))]


@pytest.mark.caffe
def test_hdf5_snapshots_resume(dataset, tmp_path):
    """HDF5 snapshots are written by Caffe in place; stopping and resuming still works."""
    whole = setup_run(tmp_path / "whole", dataset, max_iter=20, extra="snapshot_format: HDF5\n")
    parts = setup_run(tmp_path / "parts", dataset, max_iter=20, extra="snapshot_format: HDF5\n")
    assert caffe_ft(whole, "train", "solver.prototxt").returncode == 0
    stopped = caffe_ft(parts, "train", "solver.prototxt", "--stop-after", "7")
    assert stopped.returncode == 130, stopped.stderr
    command = resume_line(stopped.stderr)
    assert command[command.index("--resume") + 1] == "snap/run_iter_7.solverstate.h5"
    resumed = run_resume(parts, command)
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(os.listdir(os.path.join(parts, "snap"))) == [
        "run_iter_20.caffemodel.h5", "run_iter_20.solverstate.h5", "run_iter_7.caffemodel.h5",
        "run_iter_7.solverstate.h5"]
    import caffe

    caffe.set_mode_cpu()
    nets = [caffe.Net(os.path.join(EXAMPLE, "deploy.prototxt"), os.path.join(run, "snap", "run_iter_20.caffemodel.h5"),
                      caffe.TEST) for run in (whole, parts)]
    for name in nets[0].params:
        for a, b in zip(nets[0].params[name], nets[1].params[name]):
            assert a.data.tobytes() == b.data.tobytes()


@pytest.mark.caffe
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_snapshots_and_resumes(dataset, tmp_path, signum):
    max_iter = 1200
    parts = setup_run(tmp_path / "parts", dataset, max_iter=max_iter, test_interval=100)
    metrics = os.path.join(parts, "m.jsonl")
    proc = subprocess.Popen([sys.executable, "-m", "caffe_ft.cli", "train", "solver.prototxt", "--metrics", "m.jsonl"],
                            cwd=parts, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if os.path.exists(metrics) and any(r["iteration"] >= 50 for r in train_records(metrics)):
            break
        time.sleep(0.02)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr
    stopped_at = int(re.search(r"stopped at iteration (\d+)", stderr).group(1))
    assert 50 < stopped_at < max_iter
    assert os.path.exists(os.path.join(parts, "snap", f"run_iter_{stopped_at}.caffemodel"))
    assert not [name for name in os.listdir(os.path.join(parts, "snap")) if name.startswith(".")]
    if signum != signal.SIGINT:
        return
    resumed = run_resume(parts, resume_line(stderr))
    assert resumed.returncode == 0, resumed.stderr
    whole = setup_run(tmp_path / "whole", dataset, max_iter=max_iter, test_interval=100)
    done = caffe_ft(whole, "train", "solver.prototxt")
    assert done.returncode == 0
    name = f"run_iter_{max_iter}.caffemodel"
    assert open(os.path.join(whole, "snap", name), "rb").read() == open(os.path.join(parts, "snap", name), "rb").read()


@pytest.mark.caffe
def test_frozen_layers_stay_bit_identical(dataset, tmp_path, schema):
    base = setup_run(tmp_path / "base", dataset, max_iter=10)
    assert caffe_ft(base, "train", "solver.prototxt").returncode == 0
    weights = os.path.join(base, "snap", "run_iter_10.caffemodel")
    frozen = setup_run(tmp_path / "frozen", dataset, max_iter=20, frozen=True)
    done = caffe_ft(frozen, "train", "solver.prototxt", "--weights", weights, "--metrics", "m.jsonl")
    assert done.returncode == 0, done.stderr
    before = load_model(weights, schema).layer_blobs()
    after = load_model(os.path.join(frozen, "snap", "run_iter_20.caffemodel"), schema).layer_blobs()
    for name in ("conv1", "conv2"):
        for old, new in zip(before[name], after[name]):
            assert old.data.tobytes() == new.data.tobytes()
    for name in ("fc1", "fc2"):
        assert before[name][0].data.tobytes() != after[name][0].data.tobytes()


def edit_net(run, old, new):
    path = os.path.join(run, "net.prototxt")
    with open(path) as handle:
        text = handle.read()
    assert old in text
    with open(path, "w") as handle:
        handle.write(text.replace(old, new))


@pytest.mark.caffe
@pytest.mark.parametrize("sized", [True, False])
def test_mismatched_weights_are_refused(dataset, tmp_path, sized):
    """Refused before Caffe copies them; when the data layers do not say their
    image size, the check runs on the shapes of the nets Caffe built."""
    base = setup_run(tmp_path / "base", dataset, max_iter=2)
    assert caffe_ft(base, "train", "solver.prototxt").returncode == 0
    weights = os.path.join(base, "snap", "run_iter_2.caffemodel")
    other = setup_run(tmp_path / "other", dataset, max_iter=3)
    if not sized:
        edit_net(other, " new_height: 16 new_width: 16", "")
        edit_net(other, "    new_height: 16\n    new_width: 16\n", "")
    fits = caffe_ft(other, "train", "solver.prototxt", "--weights", weights)
    assert fits.returncode == 0, fits.stderr
    assert "could not be checked" not in fits.stderr
    for name in os.listdir(os.path.join(other, "snap")):
        os.unlink(os.path.join(other, "snap", name))
    edit_net(other, "num_output: 64", "num_output: 48")
    done = caffe_ft(other, "train", "solver.prototxt", "--weights", weights)
    assert done.returncode == 2
    assert "MISMATCH" in done.stderr and "nothing was trained" in done.stderr
    assert os.listdir(os.path.join(other, "snap")) == []


@pytest.mark.caffe
def test_divergence_stops_with_the_last_good_state(dataset, tmp_path, schema):
    run = setup_run(tmp_path / "nan", dataset, max_iter=40, base_lr=1e5)
    done = caffe_ft(run, "train", "solver.prototxt", "--metrics", "m.jsonl")
    assert done.returncode == 2
    found = re.search(r"the loss became (nan|inf) at iteration (\d+).*lower base_lr.*"
                      r"last good state \(iteration (\d+)\): (\S+)", done.stderr)
    assert found, done.stderr
    diverged, good, state = int(found.group(2)), int(found.group(3)), found.group(4)
    assert good < diverged
    assert state == f"snap/run_iter_{good}.solverstate"
    losses = [r["loss"] for r in train_records(os.path.join(run, "m.jsonl"))]
    assert len(losses) == diverged and all(math.isfinite(loss) for loss in losses)
    snapshot = load_solverstate(os.path.join(run, state), schema)
    assert snapshot.state.iter == good
    model = load_model(os.path.join(run, snapshot.state.learned_net), schema)
    assert all(np.isfinite(blob.data).all() for blobs in model.blobs for blob in blobs)
    assert sorted(os.listdir(os.path.join(run, "snap"))) == [f"run_iter_{good}.caffemodel",
                                                             f"run_iter_{good}.solverstate"]


@pytest.mark.caffe
def test_gpu_on_the_cpu_only_caffe(dataset, tmp_path):
    run = setup_run(tmp_path / "gpu", dataset, max_iter=5)
    done = caffe_ft(run, "train", "solver.prototxt", "--gpu", "0")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "CPU-only build" in done.stderr, done.stderr


@pytest.mark.caffe
@pytest.mark.parametrize("kind", ["SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam", "legacy"])
def test_every_solver_type(dataset, tmp_path, kind):
    extra = {"legacy": "solver_type: NESTEROV\n", "AdaDelta": 'type: "AdaDelta"\ndelta: 1e-6\n',
             "RMSProp": 'type: "RMSProp"\nrms_decay: 0.98\n', "Adam": 'type: "Adam"\nmomentum2: 0.999\n',
             "AdaGrad": 'type: "AdaGrad"\n'}.get(kind, f'type: "{kind}"\n')
    momentum = kind not in ("AdaGrad", "RMSProp")
    run = setup_run(tmp_path / kind, dataset, max_iter=6, base_lr=0.001 if momentum else 0.01, extra=extra)
    if not momentum:
        path = os.path.join(run, "solver.prototxt")
        with open(path) as handle:
            text = handle.read()
        with open(path, "w") as handle:
            handle.write(text.replace("momentum: 0.9\n", ""))
    done = caffe_ft(run, "train", "solver.prototxt", "--metrics", "m.jsonl")
    assert done.returncode == 0, done.stderr
    assert len(train_records(os.path.join(run, "m.jsonl"))) == 6
    assert os.path.exists(os.path.join(run, "snap", "run_iter_6.solverstate"))


def test_divergence_advice_follows_the_rate():
    from caffe_ft.training.stop import diverged_message

    assert diverged_message(math.nan, 12, 0.01, 0.001).endswith(
        "at iteration 12 (learning rate 0.001): training diverged; lower base_lr (now 0.01; try 0.001)")
    assert diverged_message(math.inf, 3, -1).endswith(
        "training diverged; base_lr is -1, negative: every update climbs the loss; make it positive")
