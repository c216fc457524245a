"""Per-iteration overhead of ``caffe-ft train`` over Caffe's own ``caffe train``.

Run inside the reference environment (it needs pycaffe and the caffe CLI)::

    scripts/caffe-env run -- python3 benchmarks/bench_train.py

It writes a small CaffeNet-like net (two conv/ReLU/pool stages, two
InnerProducts) over generated 32x32 colour images (an ImageData list, no
shuffle), starting weights made by pycaffe, and one solver, then trains with
each tool on the same solver and weights, alternating, several times:

* ``caffe train --solver S --weights W``: iterations per second from the
  timestamps of Caffe's ``display`` log lines;
* ``caffe-ft train S --weights W --metrics M``: from the metrics file's
  per-iteration timestamps (so the metrics writing, loss check and progress
  output are all inside the measure).

Both rates are taken over the same iteration window, after a warm-up, within
one run each.  It prints each run, the medians and caffe-ft's overhead
(target: at most 2 %), and checks that both tools wrote the same final
caffemodel, byte for byte (the same work was done).

A second round uses batches of one image, where an iteration is so short
that the difference of the two rates shows caffe-ft's own cost per
iteration in microseconds (the loop, the loss check, the metrics line).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from typing import List, Tuple

import numpy as np

SIZE = 32
_GLOG = re.compile(r"^I\d{4} (\d\d):(\d\d):(\d\d\.\d+) .*\] Iteration (\d+) \(")


def write_images(directory: str, count: int, seed: int) -> str:
    """``count`` PPM images of two classes (a bright square left or right), and their list."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    lines = []
    for index in range(count):
        label = index % 2
        image = rng.integers(0, 120, (SIZE, SIZE, 3), dtype=np.uint8)
        x = int(rng.integers(0, SIZE // 2 - 8)) + (SIZE // 2 if label else 0)
        y = int(rng.integers(0, SIZE - 8))
        image[y:y + 8, x:x + 8] += 120
        path = os.path.join(directory, f"{index}.ppm")
        with open(path, "wb") as handle:
            handle.write(b"P6\n%d %d\n255\n" % (SIZE, SIZE) + image.tobytes())
        lines.append(f"{path} {label}\n")
    listing = os.path.join(directory, "list.txt")
    with open(listing, "w") as handle:
        handle.writelines(lines)
    return listing


def net_prototxt(listing: str, batch: int) -> str:
    conv = ('layer {{ name: "{n}" type: "Convolution" bottom: "{b}" top: "{n}" '
            'convolution_param {{ num_output: {o} kernel_size: 5 pad: 2 weight_filler {{ type: "xavier" }} }} }}\n'
            'layer {{ name: "relu_{n}" type: "ReLU" bottom: "{n}" top: "{n}" }}\n'
            'layer {{ name: "pool_{n}" type: "Pooling" bottom: "{n}" top: "pool_{n}" '
            'pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}\n')
    return (
        'name: "BenchNet"\n'
        f'layer {{ name: "data" type: "ImageData" top: "data" top: "label" '
        f'transform_param {{ scale: 0.00390625 }} '
        f'image_data_param {{ source: "{listing}" batch_size: {batch} }} }}\n'
        + conv.format(n="conv1", b="data", o=32)
        + conv.format(n="conv2", b="pool_conv1", o=64)
        + 'layer { name: "fc1" type: "InnerProduct" bottom: "pool_conv2" top: "fc1" '
          'inner_product_param { num_output: 256 weight_filler { type: "xavier" } } }\n'
          'layer { name: "relu_fc1" type: "ReLU" bottom: "fc1" top: "fc1" }\n'
          'layer { name: "fc2" type: "InnerProduct" bottom: "fc1" top: "fc2" '
          'inner_product_param { num_output: 2 weight_filler { type: "xavier" } } }\n'
          'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc2" bottom: "label" top: "loss" }\n'
    )


def solver_prototxt(net: str, iterations: int, display: int) -> str:
    return (f'net: "{net}"\nbase_lr: 0.001\nmomentum: 0.9\nweight_decay: 0.0005\nlr_policy: "fixed"\n'
            f'display: {display}\nmax_iter: {iterations}\nsnapshot_prefix: "snap"\nsolver_mode: CPU\n'
            'random_seed: 1\n')


def make_weights(net: str, path: str) -> None:
    """The starting weights: pycaffe's fillers, saved."""
    code = ("import caffe; caffe.set_mode_cpu(); caffe.set_random_seed(3); "
            f"caffe.Net({net!r}, caffe.TRAIN).save({path!r})")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, GLOG_minloglevel="2"))


def rate(points: List[Tuple[int, float]], first: int, last: int) -> float:
    """Iterations per second between iterations ``first`` and ``last``."""
    times = dict(points)
    return (last - first) / (times[last] - times[first])


def caffe_rate(workdir: str, solver: str, weights: str, first: int, last: int) -> float:
    done = subprocess.run(["caffe", "train", "--solver", solver, "--weights", weights], cwd=workdir,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                          env=dict(os.environ, GLOG_minloglevel="0", GLOG_logtostderr="1"), check=False)
    if done.returncode != 0:
        sys.exit(f"caffe train failed:\n{done.stdout[-3000:]}")
    points = []
    for line in done.stdout.splitlines():
        found = _GLOG.match(line)
        if found:
            hours, minutes, seconds, iteration = found.groups()
            points.append((int(iteration), int(hours) * 3600 + int(minutes) * 60 + float(seconds)))
    return rate(points, first, last)


def caffe_ft_rate(workdir: str, solver: str, weights: str, first: int, last: int) -> float:
    from caffe_ft.training.progress import read_metrics

    metrics = os.path.join(workdir, "metrics.jsonl")
    done = subprocess.run([sys.executable, "-m", "caffe_ft.cli", "train", solver, "--weights", weights,
                           "--metrics", metrics], cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, check=False)
    if done.returncode != 0:
        sys.exit(f"caffe-ft train failed:\n{done.stdout[-3000:]}")
    points = [(r["iteration"], r["time"]) for r in read_metrics(metrics) if r["phase"] == "train"]
    return rate(points, first, last)


def compare(root: str, listing: str, batch: int, iterations: int, warmup: int, display: int,
            repeats: int) -> Tuple[float, float, bool]:
    """Median it/s of ``caffe train`` and ``caffe-ft train`` on one setup, and
    whether their final caffemodels are the same bytes."""
    last = (iterations - 1) // display * display  # the last display line
    first = -(-warmup // display) * display
    os.makedirs(root)
    net = os.path.join(root, "net.prototxt")
    with open(net, "w") as handle:
        handle.write(net_prototxt(listing, batch))
    solver = os.path.join(root, "solver.prototxt")
    with open(solver, "w") as handle:
        handle.write(solver_prototxt(net, iterations, display))
    weights = os.path.join(root, "start.caffemodel")
    make_weights(net, weights)
    print(f"batch {batch}: {iterations} iterations, measured over {first}..{last}")
    caffe_rates: List[float] = []
    ft_rates: List[float] = []
    for repeat in range(repeats):
        for name, measure, rates in (("caffe train", caffe_rate, caffe_rates),
                                     ("caffe-ft train", caffe_ft_rate, ft_rates)):
            workdir = os.path.join(root, f"{name.split()[0]}-{repeat}")
            os.makedirs(workdir)
            rates.append(measure(workdir, solver, weights, first, last))
            print(f"  run {repeat + 1}  {name:15s} {rates[-1]:9.2f} it/s", flush=True)
    model = f"snap_iter_{iterations}.caffemodel"
    with open(os.path.join(root, "caffe-0", model), "rb") as a, open(os.path.join(root, "caffe-ft-0", model),
                                                                       "rb") as b:
        same = a.read() == b.read()
    return statistics.median(caffe_rates), statistics.median(ft_rates), same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=100, help="iterations left out at the start")
    parser.add_argument("--display", type=int, default=50)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny-iterations", type=int, default=4000, help="iterations of the batch-1 round (0: skip)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-train-") as root:
        listing = write_images(os.path.join(root, "images"), 256, 0)
        print(f"net: 2 conv + 2 fc on {SIZE}x{SIZE} colour images")
        caffe_median, ft_median, same = compare(os.path.join(root, "main"), listing, args.batch, args.iterations,
                                                args.warmup, args.display, args.repeats)
        overhead = 1 - ft_median / caffe_median
        print(f"median: caffe train {caffe_median:.2f} it/s, caffe-ft train {ft_median:.2f} it/s "
              f"(ratio {ft_median / caffe_median:.4f})")
        print(f"caffe-ft overhead: {100 * overhead:+.2f} % (target <= 2 %): {'OK' if overhead <= 0.02 else 'OVER'}")
        print(f"final caffemodels identical: {same}")
        if args.tiny_iterations:
            tiny_caffe, tiny_ft, tiny_same = compare(os.path.join(root, "tiny"), listing, 1, args.tiny_iterations,
                                                     args.tiny_iterations // 4, args.tiny_iterations // 8,
                                                     args.repeats)
            cost = 1e6 * (1 / tiny_ft - 1 / tiny_caffe)
            print(f"median: caffe train {tiny_caffe:.0f} it/s, caffe-ft train {tiny_ft:.0f} it/s: caffe-ft's own "
                  f"cost {cost:.0f} us per iteration ({100 * cost * 1e-6 * caffe_median:.2f} % of an iteration "
                  f"at batch {args.batch}); final caffemodels identical: {tiny_same}")


if __name__ == "__main__":
    main()
