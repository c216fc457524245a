"""TensorBoard event files of a run (tensorboardX writes them; read back here record by record)."""

from __future__ import annotations

import glob
import os
import struct

import pytest

from caffe_ft.training.progress import MetricsWriter
from caffe_ft.training.tensorboard import write_events

pytestmark = pytest.mark.host  # tensorboardX needs a newer protobuf than the reference environment's


def read_scalars(logdir):
    """(tag, step, value, walltime) of every scalar in the event files of ``logdir``, in file order."""
    from tensorboardX.proto.event_pb2 import Event

    found = []
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        data = open(path, "rb").read()
        at = 0
        while at < len(data):  # TFRecord: length, its crc, the record, its crc
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                found.append((value.tag, event.step, value.simple_value, event.wall_time))
    return found


def test_a_resumed_run_appears_once_in_tensorboard(tmp_path):
    metrics, logdir = str(tmp_path / "m.jsonl"), str(tmp_path / "tb")
    clock = iter(range(1000, 2000)).__next__
    first = MetricsWriter(metrics, clock=clock)
    first.test(0, 0, {"accuracy": 0.1, "loss": 2.5})
    for iteration in range(7):
        first.train(iteration, 2.0 - iteration / 10, 0.01)
    first.close()
    assert write_events(metrics, logdir) == 7 + 7 + 2
    # Resumed from the snapshot of iteration 5: iterations 5 and 6 are redone.
    second = MetricsWriter(metrics, resume_at=5, clock=clock)
    for iteration in range(5, 10):
        second.train(iteration, 1.0 - iteration / 100, 0.001)
    second.test(10, 0, {"accuracy": 0.9, "loss": 0.3})
    second.close()
    assert write_events(metrics, logdir) == 10 + 10 + 4
    assert len(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))) == 1  # the earlier file replaced
    scalars = read_scalars(logdir)
    loss = [(step, value) for tag, step, value, _ in scalars if tag == "train/loss"]
    assert [step for step, _ in loss] == list(range(10))
    assert loss[6][1] == pytest.approx(1.0 - 6 / 100) and loss[4][1] == pytest.approx(2.0 - 4 / 10)
    rates = {step: value for tag, step, value, _ in scalars if tag == "train/lr"}
    assert rates[4] == pytest.approx(0.01) and rates[5] == pytest.approx(0.001)
    accuracy = [(step, value) for tag, step, value, _ in scalars if tag == "test/accuracy"]
    assert accuracy == [(0, pytest.approx(0.1)), (10, pytest.approx(0.9))]
    walltimes = [time for tag, _, _, time in scalars if tag == "train/loss"]
    assert walltimes == sorted(walltimes) and walltimes[0] >= 1000  # the records' own times
