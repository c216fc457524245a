"""`caffe-ft finetune --strategy last-fc`: the head's SGD on cached features
against pycaffe running the frozen trunk every iteration.  Run inside the
reference environment::

    scripts/caffe-env run -- python3 benchmarks/bench_cached_last_fc.py [--iters 150]

Photo-like images of three classes (tests/synth_images.py) at 256x256, fed to
the nsfw ResNet-50 as a deploy net made into a train_val by ``finetune``
itself (resized to 224, no random crop, no mirroring: a deterministic input, so
the cached path applies).  The same command runs twice, from the same
weights, with ``--cached-features`` and with ``--no-cached-features``; both
whole processes are timed, and both runs' final validation accuracies are
printed beside the ratio (target: >= 10x faster at equal accuracy).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from synth_images import write_dataset  # noqa: E402

NSFW = "/opt/models/nsfw"


def finetune(root: str, lists: dict, iters: int, cached: bool) -> dict:
    outdir = os.path.join(root, "cached" if cached else "pycaffe")
    command = [
        "caffe-ft", "finetune", os.path.join(NSFW, "deploy.prototxt"),
        "--weights", os.path.join(NSFW, "resnet_50_1by2_nsfw.caffemodel"),
        "--strategy", "last-fc", "--num-classes", "3", "--train-data", lists["train"], "--val-data", lists["val"],
        "--resize", "224", "--crop-size", "224", "--no-mirror",
        "--mean-value", "104", "--mean-value", "117", "--mean-value", "123",
        "--batch-size", "16", "--val-batch-size", "16", "--max-iter", str(iters), "--cpu", "-o", outdir,
        "--cached-features" if cached else "--no-cached-features",
    ]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, "GLOG_minloglevel": "2"})
    seconds = time.perf_counter() - start
    accuracy = None
    with open(os.path.join(outdir, "metrics.jsonl")) as handle:
        for line in handle:
            record = json.loads(line)
            if record.get("phase") == "test":
                accuracy = record["outputs"].get("accuracy", accuracy)
    return {"seconds": seconds, "accuracy": accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, default=150, help="SGD iterations (default: %(default)s)")
    parser.add_argument("--per-class", type=int, default=12, help="training images per class (default: %(default)s)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-cached-") as root:
        lists = {
            "train": write_dataset(os.path.join(root, "train"), "photo", args.per_class, classes=3, size=256,
                                   seed=1, separation=0.3),
            "val": write_dataset(os.path.join(root, "val"), "photo", max(2, args.per_class // 2), classes=3,
                                 size=256, seed=2, separation=0.3),
        }
        cached = finetune(root, lists, args.iters, cached=True)
        pycaffe = finetune(root, lists, args.iters, cached=False)
    print(f"nsfw ResNet-50, last-fc, {args.iters} iterations of batch 16 on {3 * args.per_class} images")
    for name, result in (("cached features", cached), ("pycaffe", pycaffe)):
        print(f"{name:16s} {result['seconds']:7.1f} s   validation accuracy {result['accuracy']}")
    print(f"speed-up: {pycaffe['seconds'] / cached['seconds']:.1f}x (target >= 10x at equal accuracy)")


if __name__ == "__main__":
    main()
