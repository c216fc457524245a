"""Torch engine data workers: images/s of an ImageData pipeline at 224x224 with 0, 1, 2... workers.

An ImageData layer as a fine-tuning net reads photos: JPEGs of 320x240 (made
here, photo-like), resized to 256x256, randomly cropped to 224x224, mirrored,
mean subtracted, batch 32, shuffled.  Contestants, in the same run:

- ``0 workers``: the batches read in the caller, one after the other (the baseline);
- ``0 + thread``: the same with the read-ahead thread (``--data-workers 0`` as the engine runs it);
- ``N workers``: :class:`~caffe_ft.training.torch.feed.WorkerPool` with N processes;
- ``N pickled``: the same, with the batches handed over pickled through the pipe
  instead of through the shared-memory slots (what the slots save).

Each contestant reads ``--batches`` batches after warming up (the workers'
start and their first, pickled batches are not timed), twice: with a consumer
that does nothing (the pipeline's ceiling, what a GPU would wait on) and with
a stand-in training step (``--step-ms`` of one thread's numpy work per batch),
where reading in the caller adds its time to the step's and workers overlap
it.  ``caller CPU`` is the caller's CPU time per batch beyond the step's: what
the data cost the training process itself.  ``hand-over`` is
the time the caller spends per batch taking a ready batch (views of a shared
memory slot, or unpickling a copy), measured with the workers far ahead.  Ratios are
against ``0 workers`` of the same run; the load average is printed with them.

    .venv/bin/python benchmarks/bench_data_workers.py [--batches 20] [--workers 1,2] [--rounds 2] [--step-ms 60]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

LAYER = """
name: "data" type: "ImageData" top: "data" top: "label"
transform_param { mirror: true crop_size: 224 mean_value: 104 mean_value: 117 mean_value: 123 }
image_data_param { source: "%s" batch_size: 32 shuffle: true new_height: 256 new_width: 256 }
"""


def write_images(folder: str, count: int) -> str:
    """``count`` photo-like 320x240 JPEGs and their list."""
    import cv2
    import numpy as np

    from synth_images import photo_image

    rng = np.random.default_rng(0)
    lines = []
    for index in range(count):
        image = photo_image(rng, index % 3, 320)[:240]
        path = os.path.join(folder, f"{index}.jpg")
        cv2.imwrite(path, image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        lines.append(f"{path} {index % 3}")
    listing = os.path.join(folder, "list.txt")
    with open(listing, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    return listing


def contestants(layer: Any, schema: Any, workers: List[int]) -> Dict[str, Callable[[], Any]]:
    """name -> a function making a fresh reader (an object with next() and close())."""
    from caffe_ft.training.torch import feed

    class Pickled(feed.WorkerPool):
        def _size(self, index: int, size: int, back: int) -> None:
            pass  # no slot ever: every batch comes pickled

    def pool(count: int, cls: Any) -> Callable[[], Any]:
        return lambda: cls([layer], schema, "TRAIN", 0, 0, 1, count)

    made: Dict[str, Callable[[], Any]] = {
        "0 workers": lambda: feed.NetFeeder([layer], schema, "TRAIN"),
        "0 + thread": lambda: feed.NetFeeder([layer], schema, "TRAIN", prefetch=True),
    }
    for count in workers:
        made[f"{count} worker{'s' if count > 1 else ''}"] = pool(count, feed.WorkerPool)
    for count in workers[-1:]:
        made[f"{count} pickled"] = pool(count, Pickled)
    return made


class Step:
    """A stand-in for a training step: ``ms`` milliseconds of one thread's numpy work on the batch."""

    def __init__(self, ms: float) -> None:
        import numpy as np

        self.scratch = np.empty((32, 3, 224, 224), np.float32)
        self.passes = 1
        if ms > 0:
            tick = time.perf_counter()
            for _ in range(5):
                np.multiply(self.scratch, 1.0001, out=self.scratch)
            self.passes = max(1, round(ms / ((time.perf_counter() - tick) / 5 * 1e3)))
        self.ms = ms

    def __call__(self, batch: Dict[str, Any]) -> None:
        import numpy as np

        if self.ms > 0:
            for _ in range(self.passes):
                np.multiply(batch["data"], 1.0001, out=self.scratch)


def rate(make: Callable[[], Any], batches: int, step: Step) -> Dict[str, float]:
    """Images/s over ``batches`` batches after warming up (each consumed by ``step``), the
    caller's CPU time per batch beyond the step's, and the hand-over time per batch."""
    from caffe_ft.training.torch.feed import DEPTH

    reader = make()
    try:
        first = reader.next()
        size = len(next(iter(first.values())))
        for _ in range(len(getattr(reader, "processes", ())) * DEPTH):
            reader.next()  # past each worker's first batches (pickled while its slots are sized)
        start, cpu, stepping = time.perf_counter(), time.process_time(), 0.0
        for _ in range(batches):
            batch = reader.next()
            tick = time.thread_time()
            step(batch)
            stepping += time.thread_time() - tick
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu - stepping
        handover = float("nan")
        if hasattr(reader, "processes"):
            time.sleep(max(2.0, 1.5 * seconds / batches * 2))  # every worker has its batches ready
            times = []
            for _ in range(len(reader.processes) * (DEPTH - 1)):  # all made ahead
                tick = time.perf_counter()
                reader.next()
                times.append(time.perf_counter() - tick)
            handover = statistics.median(times)
        return {"images_per_s": size * batches / seconds, "handover_ms": handover * 1e3,
                "caller_cpu_ms": cpu / batches * 1e3}
    finally:
        reader.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--step-ms", type=float, default=60.0,
                        help="the stand-in training step's time per batch (0: none)")
    args = parser.parse_args()
    from caffe_ft.formats import prototext
    from caffe_ft.formats.schema import load_schema

    schema = load_schema()
    workers = [int(word) for word in args.workers.split(",")]
    steps = [Step(0), *([Step(args.step_ms)] if args.step_ms > 0 else [])]
    with tempfile.TemporaryDirectory(prefix="bench-data-workers-") as folder:
        listing = write_images(folder, args.images)
        layer = prototext.to_message(prototext.parse((LAYER % listing).encode()), schema.new("LayerParameter"))
        made = contestants(layer, schema, workers)
        results: Dict[str, List[List[Dict[str, float]]]] = {name: [[] for _ in steps] for name in made}
        names = list(made)
        for round_ in range(args.rounds):  # each round starts one seat further
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                for index, step in enumerate(steps):
                    results[name][index].append(rate(made[name], args.batches, step))
    print(f"cores usable {len(os.sched_getaffinity(0))}, load average {os.getloadavg()[0]:.1f}, "
          f"{args.batches} batches of 32 x 3 x 224 x 224, medians of {args.rounds}")
    for index, step in enumerate(steps):
        base = statistics.median(r["images_per_s"] for r in results["0 workers"][index])
        print(f"\nconsumer: {'none' if not step.ms else f'a {step.ms:g} ms step per batch (one thread)'}")
        print(f"{'reader':<12} {'images/s':>9} {'ratio':>7} {'caller CPU/batch':>17} {'hand-over':>10}")
        for name in names:
            runs = results[name][index]
            images = statistics.median(r["images_per_s"] for r in runs)
            cpu = statistics.median(r["caller_cpu_ms"] for r in runs)
            handover = statistics.median(r["handover_ms"] for r in runs)
            shown = "" if handover != handover else f"{handover:.1f} ms"
            print(f"{name:<12} {images:>9.1f} {images / base:>6.2f}x {cpu:>14.1f} ms {shown:>10}")


if __name__ == "__main__":
    main()
