"""Fine-tuning recipes on deliberately unbalanced tasks: accuracy and time per recipe, and what advise says.

The demo's DigitsNet is pretrained on the digits 0-4 (examples/digits/demo.py),
then fine-tuned on 5-9 from a training list where digit 5 has ``--major``
images and each other digit ``--minor`` (the validation images are the
remaining ones, about balanced).  Each recipe is one ``caffe-ft finetune``:
the anchors (last-fc, top, full), full with ``--layer-decay``, with
``--class-weights auto``, with both, and ``--strategy lp-ft``.  The table
gives the final weights' validation accuracy, the mean per-class recall
(what class weights aim at) and the seconds each run took (same machine,
same run: compare the columns, not across machines).

The second task is the nsfw ResNet-50 (``$CAFFE_ENV_MODELS``) on three
generated picture classes (examples/styles.py: stripes, checks, dots), an
unbalanced training list (``--nsfw-major`` of the first class, ``--nsfw-minor``
of the others) and ``--nsfw-val`` validation images per class, at batch 4 for
``--nsfw-iters`` iterations (CPU pycaffe runs a ResNet-50 at a few seconds per
such iteration).  For each task ``caffe-ft advise`` is run first and its
recommendation printed; the advised recipe is trained as a row of its own when
no row already has its flags.

    scripts/caffe-env run -- python3 benchmarks/bench_recipes.py [--outdir DIR] [--skip-nsfw]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(os.path.dirname(HERE), "examples")
DIGITS = os.path.join(EXAMPLES, "digits")
sys.path.insert(0, DIGITS)
sys.path.insert(0, EXAMPLES)
import demo  # noqa: E402  (the demo's data and helpers)

NSFW_DIR = os.environ.get("CAFFE_ENV_MODELS", "/opt/models/nsfw")
# open_nsfw's preprocessing (its classify_nsfw.py): 256x256, centre 224x224 crop, BGR mean.
NSFW_PREPROCESS = ["--resize", "256", "--crop-size", "224", "--mean-value", "104", "--mean-value", "117",
                   "--mean-value", "123"]


def unbalanced(pool_lists: Sequence[str], outdir: str, major: int, minor: int, prefix: str = "unbalanced"
               ) -> Tuple[str, str, Dict[int, int]]:
    """A training list from the images of ``pool_lists``: ``major`` of label 0,
    ``minor`` of every other; the validation list holds the rest.  Returns both
    lists' names (in ``outdir``) and the training counts."""
    wanted: Dict[int, int] = {}
    lines: List[str] = []
    pool: List[str] = []
    for name in pool_lists:
        pool += open(os.path.join(outdir, name)).read().splitlines()
    pool = [line for line in pool if line.strip()]
    used = set()
    for line in pool:
        label = int(line.rsplit(" ", 1)[1])
        if wanted.get(label, 0) < (major if label == 0 else minor):
            wanted[label] = wanted.get(label, 0) + 1
            lines.append(line)
            used.add(line)
    rest = [line for line in pool if line not in used]
    train, val = f"{prefix}_train.txt", f"{prefix}_val.txt"
    with open(os.path.join(outdir, train), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    with open(os.path.join(outdir, val), "w") as handle:
        handle.write("\n".join(rest) + "\n")
    return train, val, wanted


def digits_task(outdir: str, major: int, minor: int, pretrain_iters: int = 400) -> Tuple[str, str, str, Dict[int, int]]:
    """The digits task in ``outdir``: DigitsNet pretrained on 0-4 and an
    unbalanced list of 5-9.  Returns (training list, validation list, weights,
    training counts), the paths relative to ``outdir``."""
    logs = os.path.join(outdir, "logs")
    os.makedirs(logs, exist_ok=True)
    written = demo.write_images(outdir, 200, relative=True)
    lists = {name: os.path.relpath(path, outdir) for name, path in written.items()}
    train, val, counts = unbalanced([lists["finetune_train"], lists["finetune_val"]], outdir, major, minor)
    demo.run(["caffe-ft", "rewrite", os.path.join(DIGITS, "train_val.prototxt"), "--solver",
              os.path.join(DIGITS, "solver.prototxt"), "--strategy", "full", "--num-classes", "5", "--new-name", "fc2",
              "--head-lr-mult", "1", "--lr-scale", "1", "--max-iter", str(pretrain_iters), "--train-data",
              lists["pretrain_train"], "--val-data", lists["pretrain_val"], "-o", "pretrain", "--force"],
             os.path.join(logs, "pretrain-rewrite.log"), outdir)
    demo.run(["caffe-ft", "train", "pretrain/solver.prototxt", "--cpu", "--metrics", "pretrain/metrics.jsonl"],
             os.path.join(logs, "pretrain.log"), outdir)
    return train, val, f"pretrain/digitsnet_iter_{pretrain_iters}.caffemodel", counts


def nsfw_task(outdir: str, major: int, minor: int, val: int) -> Tuple[str, str, Dict[int, int]]:
    """Generated pictures of three styles for the nsfw ResNet-50, an unbalanced
    training list and ``val`` validation images per class (names relative to ``outdir``)."""
    from styles import write_images

    train_all, val_all = write_images(os.path.join(outdir, "images"), train_per_class=major, val_per_class=val)
    train, _, counts = unbalanced([os.path.relpath(train_all, outdir)], outdir, major, minor, "nsfw")
    return train, os.path.relpath(val_all, outdir), counts


def advise(command: Sequence[str], log: str, cwd: str) -> Tuple[Dict[str, Any], float]:
    """``caffe-ft advise ... --json``: the advice and the seconds it took."""
    started = time.time()
    done = subprocess.run([*command, "--json"], capture_output=True, text=True, cwd=cwd)
    with open(log, "w") as handle:
        handle.write(done.stdout + done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"advise failed (exit {done.returncode}); see {log}")
    return json.loads(done.stdout), time.time() - started


def describe(advice: Dict[str, Any]) -> str:
    """The advice's table of numbers and rule, as printed by the benchmark."""
    width = max(len(cut["blob"]) for cut in advice["cuts"])
    lines = [f"  {'cut':<12} {'blob':<{width}} {'probe':>6} {'kNN':>6} {'LogME':>8}"]
    for cut in advice["cuts"]:
        shown = [("-" if cut[key] is None else f"{cut[key]:.3f}") for key in ("probe", "knn", "logme")]
        lines.append(f"  {cut['role']:<12} {cut['blob']:<{width}} {shown[0]:>6} {shown[1]:>6} {shown[2]:>8}")
    lines.append(f"  rule {advice['rule']}")
    lines.append(f"  advice: {' '.join(advice['flags'])}")
    return "\n".join(lines)


def run_recipes(recipes: List[Tuple[str, List[str]]], advice: Dict[str, Any], command: List[str],
                common: List[str], outdir: str, prefix: str) -> List[Tuple[str, float, float, float, bool]]:
    """Each recipe as one ``caffe-ft finetune``, plus the advised one when no
    recipe has its flags: (name, accuracy, mean recall, seconds, advised)."""
    advised = advice["flags"]
    if not any(sorted(extra) == sorted(advised) for _, extra in recipes):
        recipes = recipes + [("advised: " + " ".join(advised[1:]), list(advised))]
    rows = []
    for name, extra in recipes:
        target = prefix + "".join(c if c.isalnum() else "-" for c in name)
        seconds = demo.run([*command, *extra, *common, "-o", target],
                           os.path.join(outdir, "logs", f"{target}.log"), outdir)
        folder = os.path.join(outdir, target)
        rows.append((name, final_accuracy(folder), per_class_recall(folder), seconds,
                     sorted(extra) == sorted(advised)))
    return rows


def print_table(title: str, rows: List[Tuple[str, float, float, float, bool]]) -> None:
    print()
    print(title)
    print(f"{'recipe':<34} {'accuracy':>8} {'mean recall':>11} {'time':>7}")
    for name, accuracy, recall, seconds, advised in rows:
        print(f"{name:<34} {accuracy:>8.3f} {recall:>11.3f} {seconds:>6.1f}s{'  <- advised' if advised else ''}")


def _evaluation(folder: str) -> Dict[str, Any]:
    with open(os.path.join(folder, "report.json")) as handle:
        return json.load(handle).get("evaluation") or {}


def per_class_recall(folder: str) -> float:
    """Mean recall over classes of the final weights on the validation images (report.json)."""
    evaluation = _evaluation(folder)
    classes = evaluation.get("per_class") or evaluation.get("classes") or []
    recalls = [row.get("recall") for row in classes if isinstance(row, dict) and row.get("recall") is not None]
    if recalls:
        return sum(recalls) / len(recalls)
    return float((evaluation.get("macro") or {}).get("recall", float("nan")))


def final_accuracy(folder: str) -> float:
    """The final weights' validation accuracy: the metrics' last test, or for
    ``--strategy features`` (no solver run, no metrics) report.json's evaluation."""
    if os.path.exists(os.path.join(folder, "metrics.jsonl")):
        return demo.accuracy(folder)
    return float(_evaluation(folder).get("accuracy", float("nan")))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outdir", default="bench-recipes")
    parser.add_argument("--major", type=int, default=60, help="training images of digit 5 (default: %(default)s)")
    parser.add_argument("--minor", type=int, default=8, help="of each other digit (default: %(default)s)")
    parser.add_argument("--iters", type=int, default=150, help="fine-tuning iterations (default: %(default)s)")
    parser.add_argument("--nsfw-major", type=int, default=30, help="nsfw: training images of class 0 (%(default)s)")
    parser.add_argument("--nsfw-minor", type=int, default=10, help="nsfw: of each other class (%(default)s)")
    parser.add_argument("--nsfw-val", type=int, default=20, help="nsfw: validation images per class (%(default)s)")
    parser.add_argument("--nsfw-iters", type=int, default=20, help="nsfw: iterations at batch 4 (%(default)s)")
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--skip-nsfw", action="store_true")
    args = parser.parse_args()
    outdir = os.path.abspath(args.outdir)
    os.makedirs(os.path.join(outdir, "logs"), exist_ok=True)
    tables = []

    if not args.skip_digits:
        train, val, weights, counts = digits_task(outdir, args.major, args.minor)
        print(f"digits: unbalanced training list: {dict(sorted(counts.items()))} (label: images)")
        advice, seconds = advise(["caffe-ft", "advise", "pretrain/train_val.prototxt", "--weights", weights,
                                  "--train-data", train, "--root-folder", "."],
                                 os.path.join(outdir, "logs", "advise-digits.log"), outdir)
        print(f"digits: advise took {seconds:.1f}s on {advice['images_measured']} images\n{describe(advice)}")
        common = ["--num-classes", "5", "--batch-size", "16", "--val-batch-size", "50", "--cpu", "--force",
                  "--train-data", train, "--val-data", val, "--solver",
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
        rows = run_recipes(recipes, advice, ["caffe-ft", "finetune", "pretrain/train_val.prototxt", "--weights",
                                             weights], common, outdir, "ft-")
        tables.append((f"digits 5-9, unbalanced training list ({args.major} of digit 5, {args.minor} of each "
                       f"other), {args.iters} iterations from DigitsNet pretrained on 0-4; advise: "
                       f"{' '.join(advice['flags'])}", rows))

    if not args.skip_nsfw:
        net = os.path.join(NSFW_DIR, "deploy.prototxt")
        weights = os.path.join(NSFW_DIR, "resnet_50_1by2_nsfw.caffemodel")
        train, val, counts = nsfw_task(outdir, args.nsfw_major, args.nsfw_minor, args.nsfw_val)
        print(f"nsfw: unbalanced training list: {dict(sorted(counts.items()))} (label: images)")
        advice, seconds = advise(["caffe-ft", "advise", net, "--weights", weights, "--train-data", train,
                                  *NSFW_PREPROCESS], os.path.join(outdir, "logs", "advise-nsfw.log"), outdir)
        print(f"nsfw: advise took {seconds:.1f}s on {advice['images_measured']} images\n{describe(advice)}")
        common = ["--num-classes", "3", "--batch-size", "4", "--val-batch-size", "10", "--cpu", "--force",
                  "--train-data", train, "--val-data", val, "--max-iter", str(args.nsfw_iters), *NSFW_PREPROCESS]
        recipes = [
            ("last-fc", ["--strategy", "last-fc"]),
            ("top (train last 4)", ["--strategy", "top", "--train-last", "4"]),
            ("full", ["--strategy", "full"]),
            ("full + layer decay 0.5", ["--strategy", "full", "--layer-decay", "0.5"]),
            ("full + class weights", ["--strategy", "full", "--class-weights", "auto"]),
            ("lp-ft (then full)", ["--strategy", "lp-ft"]),
        ]
        rows = run_recipes(recipes, advice, ["caffe-ft", "finetune", net, "--weights", weights], common, outdir,
                           "nsfw-")
        tables.append((f"nsfw ResNet-50, 3 generated classes, unbalanced training list ({args.nsfw_major}/"
                       f"{args.nsfw_minor}/{args.nsfw_minor}), {args.nsfw_val} validation images per class, "
                       f"{args.nsfw_iters} iterations at batch 4; advise: {' '.join(advice['flags'])}", rows))

    for title, rows in tables:
        print_table(title, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
