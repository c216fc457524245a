"""caffe-ft's bundled demo: pretrain a small CNN, then fine-tune it three ways.

Data: scikit-learn's digits (1797 real 8x8 handwritten digits, shipped inside
the package), upscaled to 16x16 PNGs.

1. Pretrain DigitsNet (examples/digits/train_val.prototxt) on the digits 0-4.
2. Fine-tune it on the digits 5-9 with only a few dozen images per class,
   with each strategy (`caffe-ft finetune --strategy last-fc|top|full`), and
   train the same net from scratch on the same images for comparison.
3. Print a table of validation accuracies.

Run inside the reference environment (it needs pycaffe):

    scripts/caffe-env run -- python3 examples/digits/demo.py [--outdir DIR]

Every step is a caffe-ft command, run in DIR with paths relative to it (so
the files it writes name no temporary folder and DIR can move); each is
printed before it runs, and its full output goes to DIR/logs/.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
FINETUNE_CLASSES = (5, 6, 7, 8, 9)
SIZE = 16


def write_images(outdir: str, per_class: int, relative: bool = False) -> dict:
    """The digits as PNGs and image lists in ``outdir``; returns the lists' paths.  The
    lists name the images by absolute path, or with ``relative`` by their path from
    ``outdir`` (for commands run there: no file then names the folder)."""
    import cv2
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.clip(digits.images * 16, 0, 255).astype(np.uint8)
    rng = np.random.default_rng(0)
    lists = {name: [] for name in ("pretrain_train", "pretrain_val", "finetune_train", "finetune_val")}
    folder = os.path.join(outdir, "images")
    os.makedirs(folder, exist_ok=True)
    order = rng.permutation(len(images))
    seen = {digit: 0 for digit in range(10)}
    for index in order:
        digit = int(digits.target[index])
        name = os.path.join("images", f"{index:04d}_{digit}.png")
        path = name if relative else os.path.join(os.path.abspath(outdir), name)
        cv2.imwrite(os.path.join(outdir, name), cv2.resize(images[index], (SIZE, SIZE), interpolation=cv2.INTER_LINEAR))
        if digit in PRETRAIN_CLASSES:
            split = "pretrain_train" if rng.random() < 0.8 else "pretrain_val"
            lists[split].append(f"{path} {PRETRAIN_CLASSES.index(digit)}")
        else:
            split = "finetune_train" if seen[digit] < per_class else "finetune_val"
            seen[digit] += 1
            lists[split].append(f"{path} {FINETUNE_CLASSES.index(digit)}")
    paths = {}
    for name, lines in lists.items():
        paths[name] = os.path.join(outdir, f"{name}.txt")
        with open(paths[name], "w") as handle:
            handle.write("\n".join(lines) + "\n")
    return paths


def run(command: list, log: str, cwd: str) -> float:
    """Run a caffe-ft command in ``cwd``, its output to ``log``; returns seconds taken."""
    print("$ " + " ".join(shlex.quote(word) for word in command), flush=True)
    started = time.time()
    with open(log, "w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=cwd)
    if done.returncode != 0:
        with open(log) as handle:
            sys.stderr.write(handle.read()[-3000:])
        raise SystemExit(f"failed (exit {done.returncode}); see {log}")
    return time.time() - started


def accuracy(folder: str) -> float:
    """The test accuracy of the weights a run ended with: its metrics' last test,
    which must have been at the solver's max_iter (the solvers caffe-ft writes test there)."""
    import json

    from caffe_ft.formats import files
    from caffe_ft.formats.schema import load_schema

    max_iter = files.load_text(os.path.join(folder, "solver.prototxt"), load_schema()).message.max_iter
    tests = []
    with open(os.path.join(folder, "metrics.jsonl")) as handle:
        for line in handle:
            record = json.loads(line)
            if record.get("phase") == "test":
                tests.append(record)
    if not tests or tests[-1]["iteration"] != max_iter:
        raise SystemExit(f"{folder}: no test of the final weights (iteration {max_iter}) in metrics.jsonl")
    return float(tests[-1]["outputs"].get("accuracy", float("nan")))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outdir", default="demo-digits", help="where everything goes (default: %(default)s)")
    parser.add_argument("--per-class", type=int, default=30, help="fine-tuning images per class (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=150, help="fine-tuning iterations (default: %(default)s)")
    args = parser.parse_args()
    outdir = os.path.abspath(args.outdir)
    logs = os.path.join(outdir, "logs")
    os.makedirs(logs, exist_ok=True)
    written = write_images(outdir, args.per_class, relative=True)
    counts = {name: sum(1 for _ in open(path)) for name, path in written.items()}
    lists = {name: os.path.relpath(path, outdir) for name, path in written.items()}  # the commands run in outdir
    print(f"digits 0-4: {counts['pretrain_train']} training / {counts['pretrain_val']} validation images; "
          f"digits 5-9: {counts['finetune_train']} training ({args.per_class} per class) / "
          f"{counts['finetune_val']} validation images")
    common = ["--num-classes", "5", "--batch-size", "16", "--val-batch-size", "50", "--cpu", "--force"]

    # 1. Pretraining: the example net and solver (its 400 iterations, its rate), pointed at the 0-4 data.
    seconds = run(["caffe-ft", "rewrite", os.path.join(HERE, "train_val.prototxt"), "--solver",
                   os.path.join(HERE, "solver.prototxt"), "--strategy", "full", "--num-classes", "5",
                   "--new-name", "fc2", "--head-lr-mult", "1", "--lr-scale", "1", "--max-iter", "400",
                   "--train-data", lists["pretrain_train"], "--val-data", lists["pretrain_val"],
                   "-o", "pretrain", "--force"], os.path.join(logs, "pretrain-rewrite.log"), outdir)
    seconds += run(["caffe-ft", "train", "pretrain/solver.prototxt", "--cpu",
                    "--metrics", "pretrain/metrics.jsonl"], os.path.join(logs, "pretrain.log"), outdir)
    weights = "pretrain/digitsnet_iter_400.caffemodel"
    rows = [("pretraining on 0-4", "all", accuracy(os.path.join(outdir, "pretrain")), seconds)]

    # 2. Fine-tuning on 5-9 from those weights, each strategy; and from scratch.
    # The pretraining was short and its base_lr (0.01) already modest, so the
    # fine-tuning solvers halve it (--lr-scale 0.5, not the default 0.1: 150
    # iterations are few); the new head still learns 10x faster.  At the full
    # 0.01, top's fc1 and head (0.1 with momentum 0.9) swing and it ends at 0.5.
    finetune_data = ["--train-data", lists["finetune_train"], "--val-data", lists["finetune_val"],
                     "--solver", os.path.join(HERE, "solver.prototxt"), "--max-iter", str(args.iters),
                     "--lr-scale", "0.5"]
    for strategy, extra, trains in (("last-fc", [], "fc2 only"), ("top", ["--train-last", "2"], "fc1, fc2"),
                                    ("full", [], "all")):
        target = f"finetune-{strategy}"
        seconds = run(["caffe-ft", "finetune", "pretrain/train_val.prototxt", "--weights", weights,
                       "--strategy", strategy, *extra, *common, *finetune_data, "-o", target],
                      os.path.join(logs, f"finetune-{strategy}.log"), outdir)
        rows.append((f"fine-tune: {strategy}", trains, accuracy(os.path.join(outdir, target)), seconds))

    seconds = run(["caffe-ft", "rewrite", os.path.join(HERE, "train_val.prototxt"), "--strategy", "full",
                   "--new-name", "fc2",
                   "--head-lr-mult", "1", *common[:6], *finetune_data, "-o", "scratch", "--force"],
                  os.path.join(logs, "scratch-rewrite.log"), outdir)
    seconds += run(["caffe-ft", "train", "scratch/solver.prototxt", "--cpu",
                    "--metrics", "scratch/metrics.jsonl"], os.path.join(logs, "scratch.log"), outdir)
    rows.append(("from scratch", "all (random init)", accuracy(os.path.join(outdir, "scratch")), seconds))

    print()
    print(f"validation accuracy on digits 5-9 of the final weights, after {args.iters} iterations on "
          f"{counts['finetune_train']} images")
    print(f"{'run':<22} {'layers trained':<20} {'accuracy':>8} {'time':>7}")
    for name, trains, value, took in rows:
        print(f"{name:<22} {trains:<20} {value:>8.3f} {took:>6.1f}s")
    print(f"\nfiles: {outdir} (each run's summary.md, metrics.jsonl, plot.png; logs/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
