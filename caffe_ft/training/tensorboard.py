"""A training run in TensorBoard: its metrics file written as event files by tensorboardX.

TensorBoard reads event files (TFRecord files of ``Event`` protos); the
library that writes them, tensorboardX, is an optional extra
(``caffe-ft[tensorboard]``).  :func:`write_events` turns a whole metrics file
into one fresh event file: ``train/loss`` and ``train/lr`` per iteration,
``test/NAME`` (``test/NAME #K`` for test net K when there are several) per
test pass, each at its iteration and wall-clock time.  A resumed run's
metrics file already reads as one run (the redone iterations are dropped),
and the event file written at its end replaces the earlier one, so
TensorBoard shows the whole run once.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Dict, Tuple

from ..errors import CaffeFtError
from .plot import curves
from .progress import read_metrics

#: The end of the event files written here (the ones replaced on the next write).
SUFFIX = ".caffe-ft"


def require_writer() -> Any:
    """tensorboardX's SummaryWriter, or an error saying how to install it."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise CaffeFtError("--tensorboard needs tensorboardX (pip install 'caffe-ft[tensorboard]')") from None
    return SummaryWriter


def write_events(metrics: str, logdir: str) -> int:
    """Write the records of ``metrics`` as TensorBoard scalars in ``logdir``; returns how many."""
    writer_class = require_writer()
    records = read_metrics(metrics)
    drawn = curves(records)
    times: Dict[Tuple[str, int], float] = {}
    rates: Dict[int, float] = {}
    for record in records:
        iteration = int(record["iteration"])
        if isinstance(record.get("time"), (int, float)):
            times[(record.get("phase", ""), iteration)] = float(record["time"])
        if record.get("phase") == "train" and isinstance(record.get("lr"), (int, float)):
            rates[iteration] = float(record["lr"])
    os.makedirs(logdir, exist_ok=True)
    for old in glob.glob(os.path.join(glob.escape(logdir), f"events.out.tfevents.*{SUFFIX}")):
        os.unlink(old)
    writer = writer_class(logdir, filename_suffix=SUFFIX, flush_secs=3600)
    count = 0
    try:
        for iteration, loss in zip(*drawn.train):
            writer.add_scalar("train/loss", loss, iteration, walltime=times.get(("train", iteration)))
            count += 1
        for iteration, rate in sorted(rates.items()):
            writer.add_scalar("train/lr", rate, iteration, walltime=times.get(("train", iteration)))
            count += 1
        for name, (iterations, values) in drawn.tests.items():
            for iteration, value in zip(iterations, values):
                writer.add_scalar(f"test/{name}", value, iteration, walltime=times.get(("test", iteration)))
                count += 1
    finally:
        writer.close()
    return count
