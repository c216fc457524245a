"""Fine-tuning recipes on a deliberately unbalanced digits task: accuracy and time per recipe.

The demo's DigitsNet is pretrained on the digits 0-4 (examples/digits/demo.py),
then fine-tuned on 5-9 from a training list where digit 5 has ``--major``
images and each other digit ``--minor`` (the validation images are the
remaining ones, about balanced).  Each recipe is one ``caffe-ft finetune``:
the anchors (last-fc, top, full), full with ``--layer-decay``, with
``--class-weights auto``, with both, and ``--strategy lp-ft``.  The table
gives the final weights' validation accuracy, the mean per-class recall
(what class weights aim at) and the seconds each run took (same machine,
same run: compare the columns, not across machines).

    scripts/caffe-env run -- python3 benchmarks/bench_recipes.py [--outdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
DIGITS = os.path.join(os.path.dirname(HERE), "examples", "digits")
sys.path.insert(0, DIGITS)
import demo  # noqa: E402  (the demo's data and helpers)


def unbalanced(lists: Dict[str, str], outdir: str, major: int, minor: int) -> Tuple[str, Dict[int, int]]:
    """A training list from the fine-tuning images: ``major`` of label 0, ``minor`` of every other."""
    wanted: Dict[int, int] = {}
    lines: List[str] = []
    pool = open(os.path.join(outdir, lists["finetune_train"])).read().splitlines()
    pool += open(os.path.join(outdir, lists["finetune_val"])).read().splitlines()
    pool = [line for line in pool if line.strip()]
    used = set()
    for line in pool:
        label = int(line.rsplit(" ", 1)[1])
        if wanted.get(label, 0) < (major if label == 0 else minor):
            wanted[label] = wanted.get(label, 0) + 1
            lines.append(line)
            used.add(line)
    rest = [line for line in pool if line not in used]
    with open(os.path.join(outdir, "unbalanced_train.txt"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    with open(os.path.join(outdir, "unbalanced_val.txt"), "w") as handle:
        handle.write("\n".join(rest) + "\n")
    return "unbalanced_train.txt", wanted


def per_class_recall(folder: str) -> float:
    """Mean recall over classes of the final weights on the validation images (report.json's table)."""
    with open(os.path.join(folder, "report.json")) as handle:
        report = json.load(handle)
    evaluation = report.get("evaluation") or {}
    classes = evaluation.get("per_class") or evaluation.get("classes") or []
    recalls = [row.get("recall") for row in classes if isinstance(row, dict) and row.get("recall") is not None]
    return sum(recalls) / len(recalls) if recalls else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outdir", default="bench-recipes")
    parser.add_argument("--major", type=int, default=60, help="training images of digit 5 (default: %(default)s)")
    parser.add_argument("--minor", type=int, default=8, help="of each other digit (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=150, help="fine-tuning iterations (default: %(default)s)")
    args = parser.parse_args()
    outdir = os.path.abspath(args.outdir)
    logs = os.path.join(outdir, "logs")
    os.makedirs(logs, exist_ok=True)
    written = demo.write_images(outdir, 200, relative=True)
    lists = {name: os.path.relpath(path, outdir) for name, path in written.items()}
    train, counts = unbalanced(lists, outdir, args.major, args.minor)
    print(f"unbalanced training list: {dict(sorted(counts.items()))} (label: images)")

    demo.run(["caffe-ft", "rewrite", os.path.join(DIGITS, "train_val.prototxt"), "--solver",
              os.path.join(DIGITS, "solver.prototxt"), "--strategy", "full", "--num-classes", "5", "--new-name", "fc2",
              "--head-lr-mult", "1", "--lr-scale", "1", "--max-iter", "400", "--train-data", lists["pretrain_train"],
              "--val-data", lists["pretrain_val"], "-o", "pretrain", "--force"],
             os.path.join(logs, "pretrain-rewrite.log"), outdir)
    demo.run(["caffe-ft", "train", "pretrain/solver.prototxt", "--cpu", "--metrics", "pretrain/metrics.jsonl"],
             os.path.join(logs, "pretrain.log"), outdir)
    weights = "pretrain/digitsnet_iter_400.caffemodel"

    common = ["--num-classes", "5", "--batch-size", "16", "--val-batch-size", "50", "--cpu", "--force",
              "--train-data", train, "--val-data", "unbalanced_val.txt", "--solver",
              os.path.join(DIGITS, "solver.prototxt"), "--max-iter", str(args.iters), "--lr-scale", "1"]
    recipes = [
        ("last-fc", ["--strategy", "last-fc"]),
        ("top (train last 2)", ["--strategy", "top", "--train-last", "2"]),
        ("full", ["--strategy", "full"]),
        ("full + layer decay 0.5", ["--strategy", "full", "--layer-decay", "0.5"]),
        ("full + class weights", ["--strategy", "full", "--class-weights", "auto"]),
        ("full + decay + weights", ["--strategy", "full", "--layer-decay", "0.5", "--class-weights", "auto"]),
        ("lp-ft (then full)", ["--strategy", "lp-ft"]),
        ("lp-ft + class weights", ["--strategy", "lp-ft", "--class-weights", "auto"]),
    ]
    rows = []
    for name, extra in recipes:
        target = "ft-" + "".join(c if c.isalnum() else "-" for c in name)
        seconds = demo.run(["caffe-ft", "finetune", "pretrain/train_val.prototxt", "--weights", weights, *extra,
                            *common, "-o", target], os.path.join(logs, f"{target}.log"), outdir)
        folder = os.path.join(outdir, target)
        rows.append((name, demo.accuracy(folder), per_class_recall(folder), seconds))

    print()
    print(f"digits 5-9, unbalanced training list ({args.major} of digit 5, {args.minor} of each other), "
          f"{args.iters} iterations from DigitsNet pretrained on 0-4")
    print(f"{'recipe':<26} {'accuracy':>8} {'mean recall':>11} {'time':>7}")
    for name, accuracy, recall, seconds in rows:
        print(f"{name:<26} {accuracy:>8.3f} {recall:>11.3f} {seconds:>6.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
