"""Loss and test-output curves of a training run, drawn from its metrics file.

The top panel has the training loss per iteration (faint) with a moving
average over it, and the test outputs whose name says loss; the bottom panel,
when there is one, the other test outputs (accuracy and the like).  Uses
matplotlib's Agg canvas directly (no display, no pyplot state), and writes
the PNG atomically.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import IO, Any, Dict, List, Mapping, Sequence, Tuple

from ..errors import CaffeFtError
from .progress import read_metrics

Series = Tuple[List[int], List[float]]


@dataclass
class Curves:
    """What a metrics file holds, as x/y lists."""

    train: Series = field(default_factory=lambda: ([], []))
    tests: Dict[str, Series] = field(default_factory=OrderedDict)  # "name" or "name #net"


def curves(records: Sequence[Mapping[str, Any]]) -> Curves:
    """Group metrics records into the training loss and one series per test output.

    A record repeated for an iteration (a resumed run redoing it) replaces the
    earlier one; nan/inf values (null in the file) are left out.
    """
    train: Dict[int, float] = {}
    tests: Dict[str, Dict[int, float]] = OrderedDict()
    nets = {record.get("net", 0) for record in records if record.get("phase") == "test"}
    for record in records:
        iteration = int(record["iteration"])
        if record.get("phase") == "train":
            if record.get("loss") is not None:
                train[iteration] = float(record["loss"])
        elif record.get("phase") == "test":
            for name, value in (record.get("outputs") or {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    label = name if len(nets) == 1 else f"{name} #{record.get('net', 0)}"
                    tests.setdefault(label, {})[iteration] = float(value)
    result = Curves(_series(train))
    for label, points in tests.items():
        result.tests[label] = _series(points)
    return result


def _series(points: Mapping[int, float]) -> Series:
    xs = sorted(points)
    return xs, [points[x] for x in xs]


def moving_average(values: Sequence[float], window: int) -> List[float]:
    """The mean of each value and up to ``window - 1`` before it."""
    import numpy as np

    if not values:
        return []
    data = np.asarray(values, dtype=np.float64)
    sums = np.cumsum(np.concatenate(([0.0], data)))
    index = np.arange(1, len(data) + 1)
    start = np.maximum(index - window, 0)
    return list((sums[index] - sums[start]) / (index - start))


def is_loss(name: str) -> bool:
    return "loss" in name.lower()


def render(data: Curves, path: str, title: str = "") -> None:
    """Draw ``data`` to a PNG at ``path``."""
    _save(figure(data, title), path)


def png_bytes(data: Curves, title: str = "") -> bytes:
    """``data`` drawn as PNG bytes (for pages that inline their images)."""
    import io

    buffer = io.BytesIO()
    figure(data, title).savefig(buffer, format="png")
    return buffer.getvalue()


def figure(data: Curves, title: str = "") -> Any:
    """A matplotlib Figure (on an Agg canvas) of ``data``."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise CaffeFtError("plotting needs matplotlib (pip install 'caffe-ft[train]'; "
                           "Debian: apt install python3-matplotlib)") from None
    if not data.train[0] and not data.tests:
        raise CaffeFtError("the metrics hold no finite values to plot")
    others = [label for label in data.tests if not is_loss(label)]
    drawing = Figure(figsize=(9, 6.5 if others else 4.5), dpi=100)
    FigureCanvasAgg(drawing)
    top = drawing.add_subplot(2 if others else 1, 1, 1)
    xs, ys = data.train
    if xs:
        top.plot(xs, ys, color="tab:blue", alpha=0.25, linewidth=0.8, label="train loss")
        window = max(1, len(xs) // 50)
        if window > 1:
            top.plot(xs, moving_average(ys, window), color="tab:blue", linewidth=1.5,
                     label=f"train loss (mean of {window})")
    for label, (txs, tys) in data.tests.items():
        if is_loss(label):
            top.plot(txs, tys, marker="o", markersize=3, linewidth=1.2, label=f"test {label}")
    top.set_ylabel("loss")
    top.grid(True, alpha=0.3)
    top.legend(loc="upper right", fontsize="small")
    if title:
        top.set_title(title)
    if others:
        bottom = drawing.add_subplot(2, 1, 2, sharex=top)
        for label in others:
            txs, tys = data.tests[label]
            bottom.plot(txs, tys, marker="o", markersize=3, linewidth=1.2, label=f"test {label}")
        bottom.set_ylabel("test output")
        bottom.grid(True, alpha=0.3)
        bottom.legend(loc="lower right", fontsize="small")
        bottom.set_xlabel("iteration")
    else:
        top.set_xlabel("iteration")
    drawing.tight_layout()
    return drawing


def _save(drawing: Any, path: str) -> None:
    from ..formats.files import atomic_output

    with atomic_output(path) as handle:
        drawing.savefig(handle, format="png")


def plot_file(metrics: str, png: str, title: str = "") -> Curves:
    """Read a metrics file and draw it to ``png``; returns what was drawn."""
    data = curves(read_metrics(metrics))
    render(data, png, title or os.path.basename(metrics))
    return data


def plot_quietly(metrics: str, png: str, out: IO[str]) -> bool:
    """Draw a run's loss and test outputs at its end; a plotting problem never
    fails the run, it becomes a note on ``out``.  True when the PNG was written."""
    try:
        plot_file(metrics, png)
    except CaffeFtError as exc:
        out.write(f"note: no plot: {exc}\n")
        return False
    return True
