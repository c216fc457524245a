"""Time to a validation accuracy: a head trained on cached features against
pycaffe last-fc training.  Run inside the reference environment::

    scripts/caffe-env run -- python3 benchmarks/bench_features.py [--only nsfw|small]

For each net (the nsfw ResNet-50, and a small CNN pretrained here for a few
seconds on easy images of the same kind) it makes photo-like images of three
classes (tests/synth_images.py, ``--separation`` 0.3: close shapes, so that
no head is perfect at once), a training and a validation list, and trains a
new 3-class head twice, from the same pretrained weights:

* **cached features**: ``caffe-ft features`` on both lists (one forward pass
  per image through the frozen trunk, written to .npz), then ``linear``
  (standardized multinomial logistic regression, C by 5-fold CV);
* **pycaffe last-fc**: the net as a train_val (ImageData layers, the same
  transform, random crops and mirroring while training), rewritten by
  ``strategies.apply_strategy("last-fc")`` (new head, everything else frozen,
  BatchNorm on stored statistics), trained by Caffe's SGDSolver (the usual
  fine-tuning recipe: base_lr 0.001, the head at 10x, momentum 0.9) through
  the whole trunk every iteration.

The target is the cached head's validation accuracy ("equal accuracy").
SGD's clock runs until its validation accuracy reaches it, checked every
``--eval-every`` iterations; the validation passes are left off its clock
(in SGD's favour) and reported beside it.  The cached side's time counts the
feature extraction of both lists, image reading included; its "warm" time is
``linear`` alone, what every further experiment on the same cache costs.
Both sides run in this one process, one after the other; CPU times are shown
too, as other work on the machine slows both walls.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any, Dict, List

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import feature_nets  # noqa: E402
from synth_images import write_dataset  # noqa: E402

from caffe_ft.heads import linear as lin

from caffe_ft.formats.files import load_net

from caffe_ft.heads.cache import Request, compute_or_reuse, load_features

from caffe_ft.training.pycaffe import quiet_caffe
from caffe_ft.formats.schema import load_schema  # noqa: E402
from caffe_ft.recipe.strategies import StrategyOptions, apply_strategy  # noqa: E402
from caffe_ft.formats.prototext import parse, print_message, to_message  # noqa: E402

NSFW = "/opt/models/nsfw"
CLASSES = 3


def nsfw_case(train: str, val: str, batch: int, schema: Any) -> Dict[str, Any]:
    """The nsfw ResNet-50 deploy net as a train_val with open_nsfw's preprocessing
    (256 x 256, crop 224, BGR mean), its Input and Softmax replaced."""
    deploy = load_net(os.path.join(NSFW, "deploy.prototxt"), schema)
    transform = "crop_size: 224 mean_value: 104 mean_value: 117 mean_value: 123"
    data = "".join(
        f'layer {{ name: "data" type: "ImageData" top: "data" top: "label" include {{ phase: {phase} }}\n'
        f"  transform_param {{ {transform}{' mirror: true' if phase == 'TRAIN' else ''} }}\n"
        f'  image_data_param {{ source: "{source}" batch_size: {size} new_height: 256 new_width: 256'
        f"{' shuffle: true' if phase == 'TRAIN' else ''} }} }}\n"
        for phase, source, size in (("TRAIN", train, batch), ("TEST", val, 30)))
    loss = ('layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc_nsfw" bottom: "label" top: "loss" }\n'
            'layer { name: "accuracy" type: "Accuracy" bottom: "fc_nsfw" bottom: "label" top: "accuracy" '
            "include { phase: TEST } }\n")
    net = to_message(parse(f'name: "nsfw"\n{data}'.encode()), schema.new("NetParameter"))
    net.layer.extend(layer for layer in deploy.layer if layer.type not in ("Input", "Softmax"))
    net.layer.extend(to_message(parse(loss.encode()), schema.new("NetParameter")).layer)
    return {"name": "nsfw ResNet-50 1by2", "train_val": print_message(net),
            "weights": os.path.join(NSFW, "resnet_50_1by2_nsfw.caffemodel")}


def small_case(root: str, train: str, val: str, batch: int) -> Dict[str, Any]:
    """The small CNN of the tests, pretrained here on other photo-like images
    (easier ones, of the same three shapes) so that it has features to transfer."""
    return {"name": "small CNN (pretrained here)",
            "train_val": feature_nets.train_val(train, val, batch_size=batch, test_batch_size=30, shuffle=True),
            "weights": pretrain_small(root)}


def pretrain_small(root: str, iterations: int = 1500) -> str:
    """Train the whole small net from random weights on 600 easy images; return its caffemodel."""
    caffe = quiet_caffe()
    images = write_dataset(os.path.join(root, "pretrain"), "photo", 200, CLASSES, 40, seed=5)
    net_path = os.path.join(root, "pretrain.prototxt")
    with open(net_path, "w", encoding="utf-8") as handle:
        handle.write(feature_nets.train_val(images, images, batch_size=32, shuffle=True))
    solver_path = os.path.join(root, "pretrain_solver.prototxt")
    with open(solver_path, "w", encoding="utf-8") as handle:
        handle.write(SOLVER.format(net=net_path, lr=0.01, prefix=os.path.join(root, "pretrain")))
    solver = caffe.SGDSolver(solver_path)
    solver.net.copy_from(feature_nets.make_weights(root, 7))
    solver.step(iterations)
    weights = os.path.join(root, "pretrained.caffemodel")
    solver.net.save(weights)
    return weights


def last_fc_net(text: str, schema: Any) -> str:
    """The train_val rewritten for last-fc fine-tuning on CLASSES classes."""
    net = to_message(parse(text.encode()), schema.new("NetParameter"))
    return print_message(apply_strategy("last-fc", net, StrategyOptions(num_classes=CLASSES)).net)


def cached_head(case: Dict[str, Any], net_path: str, lists: Dict[str, str], root: str, schema: Any) -> Dict[str, Any]:
    """Features of both lists, then the linear head; seconds (wall and CPU) and accuracy."""
    start, start_cpu = time.perf_counter(), time.process_time()
    sets = {}
    for name, listing in lists.items():
        request = Request(net_path, case["weights"], listing, batch_size=25)
        sets[name] = compute_or_reuse(request, os.path.join(root, f"{name}.npz"), schema).features
    extracted = time.perf_counter()
    result = lin.fit(sets["train"], CLASSES, "logreg", val=sets["val"])
    done, done_cpu = time.perf_counter(), time.process_time()
    return {"extract_s": extracted - start, "fit_s": done - extracted, "total_s": done - start,
            "cpu_s": done_cpu - start_cpu, "accuracy": result.val_accuracy, "C": result.C}


SOLVER = """net: "{net}"
test_iter: 1
test_interval: 1000000
test_initialization: false
base_lr: {lr}
lr_policy: "fixed"
momentum: 0.9
weight_decay: 0.0005
display: 0
max_iter: 1000000
snapshot_prefix: "{prefix}"
solver_mode: CPU
random_seed: 0
"""


def sgd_to_target(net_path: str, weights: str, target: float, cap_s: float, eval_every: int, val_count: int,
                  lr: float) -> Dict[str, Any]:
    """Train with SGDSolver until the validation accuracy reaches ``target`` (or ``cap_s`` of training)."""
    caffe = quiet_caffe()
    directory = os.path.dirname(net_path)
    solver_path = os.path.join(directory, "solver.prototxt")
    with open(solver_path, "w", encoding="utf-8") as handle:
        handle.write(SOLVER.format(net=net_path, lr=lr, prefix=os.path.join(directory, "snap")))
    solver = caffe.SGDSolver(solver_path)
    solver.net.copy_from(weights)
    test = solver.test_nets[0]
    test.share_with(solver.net)
    batches = val_count // test.blobs["data"].num
    trained = cpu = evaluating = 0.0
    iteration, history, accuracy = 0, [], 0.0
    while trained < cap_s:
        start, start_cpu = time.perf_counter(), time.process_time()
        solver.step(eval_every)
        trained += time.perf_counter() - start
        cpu += time.process_time() - start_cpu
        iteration += eval_every
        start = time.perf_counter()
        accuracy = float(np.mean([test.forward()["accuracy"] for _ in range(batches)]))
        evaluating += time.perf_counter() - start
        history.append((iteration, round(trained, 1), round(accuracy, 3)))
        if accuracy >= target - 1e-6:  # Caffe's accuracy is a float32 mean
            break
    return {"reached": accuracy >= target - 1e-6, "train_s": trained, "cpu_s": cpu, "eval_s": evaluating,
            "iterations": iteration, "accuracy": accuracy, "history": history}


def run_case(kind: str, args: argparse.Namespace, schema: Any) -> Dict[str, Any]:
    root = tempfile.mkdtemp(prefix=f"bench-features-{kind}-")
    size = 256 if kind == "nsfw" else 40
    lists = {name: write_dataset(os.path.join(root, name), "photo", count, CLASSES, size, seed=seed,
                                 separation=args.separation)
             for name, count, seed in (("train", args.per_class, 1), ("val", args.val_per_class, 2))}
    case = (nsfw_case(lists["train"], lists["val"], args.batch, schema) if kind == "nsfw"
            else small_case(root, lists["train"], lists["val"], args.batch))
    train_val = os.path.join(root, "train_val.prototxt")
    with open(train_val, "w", encoding="utf-8") as handle:
        handle.write(case["train_val"])
    cached = cached_head(case, train_val, lists, root, schema)
    warm_start = time.perf_counter()
    lin.fit(load_features(os.path.join(root, "train.npz")), CLASSES, "logreg",
            val=load_features(os.path.join(root, "val.npz")))
    cached["warm_s"] = time.perf_counter() - warm_start
    last_fc = os.path.join(root, "last_fc.prototxt")
    with open(last_fc, "w", encoding="utf-8") as handle:
        handle.write(last_fc_net(case["train_val"], schema))
    cap = args.cap_nsfw if kind == "nsfw" else args.cap_small
    sgd = sgd_to_target(last_fc, case["weights"], cached["accuracy"], cap, args.eval_every,
                        args.val_per_class * CLASSES, args.lr)
    return {"case": case["name"], "images": (args.per_class * CLASSES, args.val_per_class * CLASSES),
            "batch": args.batch, "cached": cached, "sgd": sgd}


def report(result: Dict[str, Any]) -> List[str]:
    cached, sgd = result["cached"], result["sgd"]
    train, val = result["images"]
    lines = [f"== {result['case']}: {train} training / {val} validation images, {CLASSES} classes",
             f"cached features: extract {cached['extract_s']:.1f} s + linear {cached['fit_s']:.1f} s = "
             f"{cached['total_s']:.1f} s ({cached['cpu_s']:.1f} s CPU) -> val accuracy {cached['accuracy']:.3f} "
             f"(C={cached['C']:g}); warm (linear only): {cached['warm_s']:.2f} s"]
    history = ", ".join(f"it {it}: {acc:.3f} @ {sec:.0f}s" for it, sec, acc in sgd["history"])
    epochs = sgd["iterations"] * result["batch"] / train
    status = "reached" if sgd["reached"] else "did NOT reach"
    more = "" if sgd["reached"] else "more than "
    lines.append(f"pycaffe last-fc SGD: {status} {cached['accuracy']:.3f} after {sgd['iterations']} iterations "
                 f"({epochs:.1f} epochs), {sgd['train_s']:.1f} s of training ({sgd['cpu_s']:.1f} s CPU), "
                 f"+ {sgd['eval_s']:.1f} s in {len(sgd['history'])} validation passes")
    lines.append(f"speed-up: {more}{sgd['train_s'] / cached['total_s']:.1f}x cold "
                 f"({sgd['cpu_s'] / cached['cpu_s']:.1f}x in CPU time; "
                 f"{(sgd['train_s'] + sgd['eval_s']) / cached['total_s']:.1f}x counting SGD's validation passes), "
                 f"{more}{sgd['train_s'] / cached['warm_s']:.1f}x warm")
    lines.append(f"SGD validation accuracy: {history}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=60, help="training images per class")
    parser.add_argument("--val-per-class", type=int, default=30, help="validation images per class")
    parser.add_argument("--separation", type=float, default=0.3,
                        help="how far apart the classes' shapes are (1: easy; 0.3: a linear head gets about 0.8)")
    parser.add_argument("--batch", type=int, default=16, help="SGD batch size")
    parser.add_argument("--lr", type=float, default=0.001, help="SGD base_lr (the head learns at 10x)")
    parser.add_argument("--eval-every", type=int, default=10, help="SGD iterations between validation passes")
    parser.add_argument("--cap-nsfw", type=float, default=600.0, help="most seconds of SGD training (nsfw)")
    parser.add_argument("--cap-small", type=float, default=120.0, help="most seconds of SGD training (small net)")
    parser.add_argument("--only", choices=["nsfw", "small"], help="run one case")
    args = parser.parse_args()
    schema = load_schema()
    for kind in ([args.only] if args.only else ["small", "nsfw"]):
        for line in report(run_case(kind, args, schema)):
            print(line, flush=True)


if __name__ == "__main__":
    main()
