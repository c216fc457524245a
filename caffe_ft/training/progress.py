"""What a training run shows and records: progress lines or bar, metrics file.

On a terminal the run draws a tqdm progress bar (iteration, loss, learning
rate, it/s, ETA) with test results printed above it; elsewhere (a log file,
CI) it prints one plain line every ``display`` iterations, so logs stay
readable.  The metrics file is JSON lines, one record per training iteration
and one per test pass, flushed about once a second so that
``caffe-ft plot`` can draw a run that is still going.

Everything here is plain Python, independent of Caffe, and cheap per
iteration: the training loop calls it once per iteration.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, IO, List, Mapping, Optional, Sequence, Union

from ..errors import CaffeFtError

Output = Union[float, List[float]]

_FLUSH_SECONDS = 1.0
_RATE_WINDOW = 50  # iterations the it/s (and so the ETA) is measured over
#: -ln(FLT_MIN): Caffe's SoftmaxWithLoss of a label whose probability underflowed to 0.
SATURATED_LOSS = -math.log(1.17549435e-38)


# ---------------------------------------------------------------- formatting --


def format_duration(seconds: float) -> str:
    """``MM:SS`` or ``H:MM:SS``; ``--:--`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "--:--"
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def format_number(value: Optional[float]) -> str:
    """A loss, rate or score in 4 significant digits (``nan``/``inf`` spelled out)."""
    if value is None:
        return "-"
    return f"{value:.4g}"


def format_output(value: Output) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(format_number(v) for v in value) + "]"
    return format_number(value)


def format_train_line(iteration: int, max_iter: int, loss: float, lr: float,
                      rate: Optional[float], eta: Optional[float]) -> str:
    """One progress line: ``iter 100/400  loss 0.5321  lr 0.01  95.2 it/s  ETA 00:03``."""
    speed = f"{rate:.3g} it/s" if rate else "- it/s"
    return (f"iter {iteration}/{max_iter}  loss {format_number(loss)}  lr {format_number(lr)}  "
            f"{speed}  ETA {format_duration(eta if eta is not None else float('nan'))}")


def format_test_line(iteration: int, net: int, outputs: Mapping[str, Output]) -> str:
    """``iter 100  test #0: accuracy = 0.91  loss = 0.3196``."""
    scores = "  ".join(f"{name} = {format_output(value)}" for name, value in outputs.items())
    return f"iter {iteration}  test #{net}: {scores}"


# --------------------------------------------------------------- statistics --


class SmoothedLoss:
    """The mean of the last ``window`` losses, as Caffe's ``average_loss`` displays it."""

    def __init__(self, window: int = 1) -> None:
        self._values: Deque[float] = deque(maxlen=max(1, window))
        self._sum = 0.0

    def add(self, loss: float) -> float:
        if len(self._values) == self._values.maxlen:
            self._sum -= self._values[0]
        self._values.append(loss)
        self._sum += loss
        if not math.isfinite(self._sum):  # a nan/inf left the window: start the sum afresh
            self._sum = sum(self._values)
        return self._sum / len(self._values)


class RateMeter:
    """Iterations per second over the last iterations, and the time left."""

    def __init__(self, window: int = _RATE_WINDOW, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._marks: Deque[tuple] = deque(maxlen=window + 1)

    def mark(self, iteration: int) -> None:
        self._marks.append((iteration, self._clock()))

    def rate(self) -> Optional[float]:
        if len(self._marks) < 2:
            return None
        (first, start), (last, stop) = self._marks[0], self._marks[-1]
        return (last - first) / (stop - start) if stop > start else None

    def eta(self, remaining: int) -> Optional[float]:
        rate = self.rate()
        return remaining / rate if rate else None


# ------------------------------------------------------------------ metrics --


def _json_float(value: float) -> str:
    return repr(float(value)) if math.isfinite(value) else "null"


def _json_output(value: Output) -> Any:
    if isinstance(value, list):
        return [v if math.isfinite(v) else None for v in value]
    return value if math.isfinite(value) else None


class MetricsWriter:
    """Appends JSON-lines records to a metrics file.

    ``{"phase": "train", "iteration": i, "loss": ..., "lr": ..., "time": ...}``
    for each training iteration (``iteration`` counts updates done before it,
    as Caffe's log does; a nan/inf loss is written as null) and
    ``{"phase": "test", "iteration": i, "net": k, "outputs": {...}, "time": ...}``
    for each test pass.  ``time`` is the wall clock (seconds since the epoch).

    A resumed run (``resume_at`` = the snapshot's iteration) first drops the
    records of iterations it is about to redo, so the file reads as one run.
    """

    def __init__(self, path: str, resume_at: Optional[int] = None, clock: Any = time.time) -> None:
        self.path = path
        self._clock = clock
        self._last_flush = 0.0
        if resume_at is not None and os.path.exists(path):
            self._truncate(resume_at)
        try:
            self._handle: IO[str] = open(path, "a" if resume_at is not None else "w", encoding="utf-8")
        except OSError as exc:
            raise CaffeFtError(f"cannot write the metrics file: {exc.strerror}", path) from None

    def _truncate(self, resume_at: int) -> None:
        from ..formats.files import write_atomic

        kept = [line for line in read_records_text(self.path) if _record_iteration(line) < resume_at]
        write_atomic(self.path, "".join(kept))

    def train(self, iteration: int, loss: float, lr: float) -> None:
        self._handle.write(
            f'{{"phase": "train", "iteration": {iteration}, "loss": {_json_float(loss)}, '
            f'"lr": {_json_float(lr)}, "time": {self._clock():.6f}}}\n'
        )
        self._maybe_flush()

    def test(self, iteration: int, net: int, outputs: Mapping[str, Output]) -> None:
        record = {"phase": "test", "iteration": iteration, "net": net,
                  "outputs": {name: _json_output(value) for name, value in outputs.items()},
                  "time": round(self._clock(), 6)}
        self._handle.write(json.dumps(record) + "\n")
        self.flush()

    def _maybe_flush(self) -> None:
        now = time.monotonic()
        if now - self._last_flush >= _FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        self._handle.flush()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        if not self._handle.closed:
            self._handle.close()


def read_records_text(path: str) -> List[str]:
    """The complete lines of a metrics file (a torn last line, from a crash, is dropped)."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.readlines()
    except OSError as exc:
        raise CaffeFtError(f"cannot read the metrics file: {exc.strerror}", path) from None
    return [line for line in lines if line.endswith("\n") and line.strip()]


def _record_iteration(line: str) -> int:
    try:
        return int(json.loads(line)["iteration"])
    except (ValueError, KeyError, TypeError):
        return -1  # not ours: keep it


def read_metrics(path: str) -> List[Dict[str, Any]]:
    """The records of a metrics file, in order."""
    records = []
    for number, line in enumerate(read_records_text(path), 1):
        try:
            record = json.loads(line)
        except ValueError:
            raise CaffeFtError("not a JSON line", path, number) from None
        if not isinstance(record, dict) or "iteration" not in record:
            raise CaffeFtError("not a caffe-ft metrics record", path, number)
        records.append(record)
    return records


# ----------------------------------------------------------------- reporters --


class Reporter:
    """Shows a run's progress; the training loop calls it once per iteration."""

    def __init__(self, start: int, max_iter: int, average_loss: int = 1) -> None:
        self.max_iter = max_iter
        self.smoothed = SmoothedLoss(average_loss)
        self.meter = RateMeter()
        self.meter.mark(start)
        self._warned = False

    def train(self, iteration: int, loss: float, lr: float) -> None:
        raise NotImplementedError

    def watch(self, iteration: int, loss: float) -> None:
        """Say once when the loss is Caffe's famous 87.3365: every label's
        probability is 0, the net has diverged while the loss stays finite."""
        if not self._warned and abs(loss - SATURATED_LOSS) < 1e-3:
            self._warned = True
            self.message(f"warning: iter {iteration}: loss {loss:.4f} = -ln(FLT_MIN): the probability of every "
                         "label has underflowed to 0, the net has diverged (lower base_lr; check the labels "
                         "and the input's scale)")

    def test(self, iteration: int, net: int, outputs: Mapping[str, Output]) -> None:
        self.message(format_test_line(iteration, net, outputs))

    def message(self, text: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """End the display (the bar stays on screen)."""


class LineReporter(Reporter):
    """Plain lines on a stream every ``every`` iterations: for logs and pipes."""

    def __init__(self, stream: IO[str], start: int, max_iter: int, every: int, average_loss: int = 1) -> None:
        super().__init__(start, max_iter, average_loss)
        self.stream = stream
        self.every = max(1, every)

    def train(self, iteration: int, loss: float, lr: float) -> None:
        smoothed = self.smoothed.add(loss)
        self.watch(iteration, loss)
        done = iteration + 1
        self.meter.mark(done)
        if iteration % self.every == 0 or done == self.max_iter:
            line = format_train_line(iteration, self.max_iter, smoothed, lr, self.meter.rate(),
                                     self.meter.eta(self.max_iter - done))
            self.message(line)

    def message(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()


class BarReporter(Reporter):
    """A tqdm bar: ``iteration/max_iter``, it/s and ETA by tqdm, loss and lr as its postfix."""

    def __init__(self, stream: IO[str], start: int, max_iter: int, average_loss: int = 1) -> None:
        super().__init__(start, max_iter, average_loss)
        from tqdm import tqdm

        self.bar = tqdm(total=max_iter, initial=start, unit="it", file=stream, dynamic_ncols=True,
                        smoothing=0.05, desc="train")

    def train(self, iteration: int, loss: float, lr: float) -> None:
        smoothed = self.smoothed.add(loss)
        self.watch(iteration, loss)
        self.bar.set_postfix_str(f"loss {format_number(smoothed)}  lr {format_number(lr)}", refresh=False)
        self.bar.update(1)

    def message(self, text: str) -> None:
        self.bar.write(text, file=self.bar.fp)

    def close(self) -> None:
        self.bar.close()


def has_tqdm() -> bool:
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


def make_reporter(stream: IO[str], start: int, max_iter: int, display: int, average_loss: int = 1,
                  bar: Optional[bool] = None) -> Reporter:
    """A bar on a terminal when tqdm is installed (or ``bar`` forces a choice), else lines.

    Lines come every ``display`` iterations (the solver's setting); with
    ``display: 0`` about twenty lines per run.
    """
    if bar is None:
        bar = _isatty(stream) and has_tqdm()
    if bar:
        return BarReporter(stream, start, max_iter, average_loss)
    every = display if display > 0 else max(1, (max_iter - start) // 20)
    return LineReporter(stream, start, max_iter, every, average_loss)


def _isatty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def summarize_outputs(names: Sequence[str], sums: Sequence[Any], count: int) -> Dict[str, Output]:
    """Test outputs averaged over ``count`` batches: a float per scalar blob, a list otherwise."""
    result: Dict[str, Output] = {}
    for name, total in zip(names, sums):
        mean = total / count
        values = [float(v) for v in getattr(mean, "ravel", lambda: [mean])()]
        result[name] = values[0] if len(values) == 1 else values
    return result


def count_progress(total: int, what: str) -> Callable[[int], None]:
    """A callback advancing a progress display by n items: a tqdm bar on a
    terminal when tqdm is installed, otherwise a line about every tenth."""
    stream = sys.stderr
    if stream.isatty():
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            bar = tqdm(total=total, desc=what, unit="img", file=stream, leave=False)

            def advance_bar(count: int) -> None:
                bar.update(count)
                if bar.n >= total:
                    bar.close()

            return advance_bar
    done = [0, 0]  # items, tenths reported

    def advance(count: int) -> None:
        done[0] += count
        tenth = done[0] * 10 // max(total, 1)
        if tenth > done[1] or done[0] >= total:
            done[1] = tenth
            stream.write(f"{what}: {done[0]}/{total} images\n")
            stream.flush()

    return advance
