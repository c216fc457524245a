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

Every step is a caffe-ft command; each is printed before it runs, and its
full output goes to DIR/logs/.
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


def write_images(outdir: str, per_class: int) -> dict:
    """The digits as PNGs and image lists; returns the list paths."""
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
        path = os.path.join(folder, f"{index:04d}_{digit}.png")
        cv2.imwrite(path, cv2.resize(images[index], (SIZE, SIZE), interpolation=cv2.INTER_LINEAR))
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


def run(command: list, log: str) -> float:
    """Run a caffe-ft command, its output to ``log``; returns seconds taken."""
    print("$ " + " ".join(shlex.quote(word) for word in command), flush=True)
    started = time.time()
    with open(log, "w") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        with open(log) as handle:
            sys.stderr.write(handle.read()[-3000:])
        raise SystemExit(f"failed (exit {done.returncode}); see {log}")
    return time.time() - started


def accuracy(metrics: str) -> float:
    """The last test accuracy recorded in a `caffe-ft train` metrics file."""
    from caffe_ft.recipe.job import last_test_outputs

    return last_test_outputs(metrics).get("accuracy", float("nan"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outdir", default="demo-digits", help="where everything goes (default: %(default)s)")
    parser.add_argument("--per-class", type=int, default=30, help="fine-tuning images per class (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=150, help="fine-tuning iterations (default: %(default)s)")
    args = parser.parse_args()
    outdir = os.path.abspath(args.outdir)
    logs = os.path.join(outdir, "logs")
    os.makedirs(logs, exist_ok=True)
    lists = write_images(outdir, args.per_class)
    counts = {name: sum(1 for _ in open(path)) for name, path in lists.items()}
    print(f"digits 0-4: {counts['pretrain_train']} training / {counts['pretrain_val']} validation images; "
          f"digits 5-9: {counts['finetune_train']} training ({args.per_class} per class) / "
          f"{counts['finetune_val']} validation images")
    common = ["--num-classes", "5", "--batch-size", "16", "--val-batch-size", "50", "--cpu", "--force"]

    # 1. Pretraining: the example net and solver, pointed at the 0-4 data.
    pretrain = os.path.join(outdir, "pretrain")
    seconds = run(["caffe-ft", "rewrite", os.path.join(HERE, "train_val.prototxt"), "--solver",
                   os.path.join(HERE, "solver.prototxt"), "--strategy", "full", "--num-classes", "5",
                   "--new-name", "fc2", "--head-lr-mult", "1", "--lr-scale", "1", "--step-scale", "1",
                   "--train-data", lists["pretrain_train"], "--val-data", lists["pretrain_val"],
                   "-o", pretrain, "--force"], os.path.join(logs, "pretrain-rewrite.log"))
    seconds += run(["caffe-ft", "train", os.path.join(pretrain, "solver.prototxt"), "--cpu",
                    "--metrics", os.path.join(pretrain, "metrics.jsonl")], os.path.join(logs, "pretrain.log"))
    weights = os.path.join(pretrain, "digitsnet_iter_400.caffemodel")
    rows = [("pretraining on 0-4", "all", accuracy(os.path.join(pretrain, "metrics.jsonl")), seconds)]

    # 2. Fine-tuning on 5-9 from those weights, each strategy; and from scratch.
    # The pretraining was short and its base_lr (0.01) already modest, so the
    # fine-tuning solvers keep it (--lr-scale 1); the new head still learns 10x faster.
    finetune_data = ["--train-data", lists["finetune_train"], "--val-data", lists["finetune_val"],
                     "--solver", os.path.join(HERE, "solver.prototxt"), "--max-iter", str(args.iters),
                     "--lr-scale", "1"]
    for strategy, extra, trains in (("last-fc", [], "fc2 only"), ("top", ["--train-last", "2"], "fc1, fc2"),
                                    ("full", [], "all")):
        target = os.path.join(outdir, f"finetune-{strategy}")
        seconds = run(["caffe-ft", "finetune", os.path.join(pretrain, "train_val.prototxt"), "--weights", weights,
                       "--strategy", strategy, *extra, *common, *finetune_data, "-o", target],
                      os.path.join(logs, f"finetune-{strategy}.log"))
        rows.append((f"fine-tune: {strategy}", trains, accuracy(os.path.join(target, "metrics.jsonl")), seconds))

    scratch = os.path.join(outdir, "scratch")
    seconds = run(["caffe-ft", "rewrite", os.path.join(HERE, "train_val.prototxt"), "--strategy", "full",
                   "--new-name", "fc2",
                   "--head-lr-mult", "1", *common[:6], *finetune_data, "-o", scratch, "--force"],
                  os.path.join(logs, "scratch-rewrite.log"))
    seconds += run(["caffe-ft", "train", os.path.join(scratch, "solver.prototxt"), "--cpu",
                    "--metrics", os.path.join(scratch, "metrics.jsonl")], os.path.join(logs, "scratch.log"))
    rows.append(("from scratch", "all (random init)", accuracy(os.path.join(scratch, "metrics.jsonl")), seconds))

    print()
    print(f"validation accuracy on digits 5-9 after {args.iters} iterations on {counts['finetune_train']} images")
    print(f"{'run':<22} {'layers trained':<20} {'accuracy':>8} {'time':>7}")
    for name, trains, value, took in rows:
        print(f"{name:<22} {trains:<20} {value:>8.3f} {took:>6.1f}s")
    print(f"\nfiles: {outdir} (each run's summary.md, metrics.jsonl, plot.png; logs/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
