"""Load + save a large caffemodel: caffe-ft's reader/writer against pycaffe's.

Run inside the reference environment (it needs pycaffe)::

    scripts/caffe-env run -- python3 benchmarks/bench_caffemodel.py

It makes a caffemodel of about 110 MB with pycaffe (a net of big InnerProduct
layers, random weights, ``net.save``), then times each side in fresh child
processes, several times:

* caffe-ft: ``load_model`` + ``save_model``;
* pycaffe: ``caffe.Net(proto, weights, TEST)`` + ``net.save``.

Each child reports the seconds its load + save took (imports excluded) and
its peak resident memory (``VmHWM``, which counts the mapped file's pages
too), before and after the work.  The summary prints medians, the time ratio
(target: caffe-ft no slower) and caffe-ft's peak over the file size (target:
at most 2x).  caffe-ft's save also fsyncs; pycaffe's does not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Dict, List

from measure import peak_kib, run_child, save_random_model

# input width, then each InnerProduct's outputs: 4096*4096 + 4096*2048 + 2048*1000
# weights (+ biases), about 27 million floats.
WIDTHS = (4096, 4096, 2048, 1000)
MIB = 1 << 20


def net_prototxt() -> str:
    """A deploy net of InnerProduct layers with the widths above."""
    lines = [
        'name: "bench"',
        f'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 1 dim: {WIDTHS[0]} }} }} }}',
    ]
    bottom = "data"
    for index, outputs in enumerate(WIDTHS[1:], 1):
        lines.append(
            f'layer {{ name: "fc{index}" type: "InnerProduct" bottom: "{bottom}" top: "fc{index}" '
            f"inner_product_param {{ num_output: {outputs} }} }}"
        )
        bottom = f"fc{index}"
    return "\n".join(lines) + "\n"


def child(side: str, proto: str, weights: str, out: str) -> None:
    """Load and save once with ``side``; print seconds and peaks as JSON."""
    if side == "caffe-ft":
        from caffe_ft.formats.caffemodel import load_model, save_model
        from caffe_ft.formats.schema import load_schema

        schema = load_schema()
        before = peak_kib()
        start = time.perf_counter()
        save_model(load_model(weights, schema), out)
    else:
        import caffe

        caffe.set_mode_cpu()
        before = peak_kib()
        start = time.perf_counter()
        caffe.Net(proto, weights, caffe.TEST).save(out)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_before_kib": before, "peak_kib": peak_kib()}))


def make_model(directory: str) -> tuple:
    """Write the net and its pycaffe-saved weights; return their paths."""
    proto, weights = os.path.join(directory, "bench.prototxt"), os.path.join(directory, "bench.caffemodel")
    save_random_model(proto, net_prototxt(), weights)
    return proto, weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per side (default 3)")
    parser.add_argument("--child", nargs=4, metavar=("SIDE", "PROTO", "WEIGHTS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    os.environ.setdefault("GLOG_minloglevel", "2")
    with tempfile.TemporaryDirectory(prefix="bench-caffemodel-") as directory:
        proto, weights = make_model(directory)
        size = os.path.getsize(weights)
        print(f"caffemodel: {size / MIB:.1f} MiB ({weights})")
        runs: Dict[str, List[Dict[str, float]]] = {"caffe-ft": [], "pycaffe": []}
        for _ in range(args.repeat):  # interleaved, so both sides see the same cache state
            for side, results in runs.items():
                out = os.path.join(directory, f"out-{side}.caffemodel")
                results.append(run_child(__file__, [side, proto, weights, out]))
                os.remove(out)
        summary = {}
        for side, results in runs.items():
            seconds = statistics.median(r["seconds"] for r in results)
            peak = max(r["peak_kib"] for r in results) * 1024
            base = max(r["peak_before_kib"] for r in results) * 1024
            process = statistics.median(r["process_seconds"] for r in results)
            summary[side] = (seconds, peak)
            print(
                f"{side:8}  load+save {seconds:6.3f} s (process {process:5.2f} s)  "
                f"peak RSS {peak / MIB:6.1f} MiB = {peak / size:4.2f}x file "
                f"(after imports {base / MIB:5.1f} MiB; work adds {(peak - base) / MIB:6.1f} MiB)"
            )
        ratio = summary["caffe-ft"][0] / summary["pycaffe"][0]
        print(f"time caffe-ft / pycaffe: {ratio:.2f}x (target <= 1)")
        print(f"caffe-ft peak / file size: {summary['caffe-ft'][1] / size:.2f}x (target <= 2)")


if __name__ == "__main__":
    main()
