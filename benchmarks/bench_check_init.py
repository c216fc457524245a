"""``check`` and ``init`` on a large caffemodel, against pycaffe loading the same net and weights.

Run inside the reference environment (it needs pycaffe)::

    scripts/caffe-env run -- python3 benchmarks/bench_check_init.py

It makes a caffemodel of about 110 MB with pycaffe (a net of big
InnerProduct layers, random weights, ``net.save``) and a fine-tuning net whose
head is renamed and resized, then times each task in fresh child processes,
several times, interleaved:

* ``check``: ``load_model`` + ``weights.check`` (what ``caffe-ft check`` does);
* ``init``: ``load_model`` + ``weights.init`` + ``save_model``;
* ``pycaffe load``: ``caffe.Net(proto, weights, TEST)``, what training does
  first and what ``check`` predicts the outcome of;
* ``pycaffe load+save``: the same followed by ``net.save``, the pycaffe way
  to get what ``init`` writes.

Each child reports the seconds of the work (imports excluded) and its peak
resident memory (``VmHWM``; it counts the mapped weights file's pages too),
before and after the work.  The summary prints medians and the ratios
against pycaffe.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Dict, List, Tuple

from measure import peak_kib, run_child, save_random_model

# input width, then each InnerProduct's outputs: about 27 million weights.
WIDTHS = (4096, 4096, 2048, 1000)
NEW_CLASSES = 10
MIB = 1 << 20
TASKS = ("check", "init", "pycaffe load", "pycaffe load+save")


def net_prototxt(head: str = "fc3", classes: int = WIDTHS[-1]) -> str:
    """A deploy net of InnerProduct layers; the last one is ``head`` with ``classes`` outputs."""
    lines = [
        'name: "bench"',
        f'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 1 dim: {WIDTHS[0]} }} }} }}',
    ]
    bottom = "data"
    last = len(WIDTHS) - 1
    for index, outputs in enumerate(WIDTHS[1:], 1):
        name = head if index == last else f"fc{index}"
        outputs = classes if index == last else outputs
        lines.append(
            f'layer {{ name: "{name}" type: "InnerProduct" bottom: "{bottom}" top: "{name}" '
            f'inner_product_param {{ num_output: {outputs} weight_filler {{ type: "xavier" }} }} }}'
        )
        bottom = name
    return "\n".join(lines) + "\n"


def child(task: str, proto: str, weights: str, out: str) -> None:
    """Do ``task`` once; print seconds and peaks as JSON."""
    if task in ("check", "init"):
        from caffe_ft.formats import files
        from caffe_ft.net import weights as wt
        from caffe_ft.formats.caffemodel import load_model, save_model
        from caffe_ft.formats.schema import load_schema

        schema = load_schema()
        before = peak_kib()
        start = time.perf_counter()
        net = files.load_text(proto, schema, files.NET).message
        model = load_model(weights, schema)
        if task == "check":
            assert wt.check(net, model).ok
        else:
            save_model(wt.init(net, model, seed=0), out)
    else:
        import caffe

        caffe.set_mode_cpu()
        before = peak_kib()
        start = time.perf_counter()
        net = caffe.Net(proto, weights, caffe.TEST)
        if task == "pycaffe load+save":
            net.save(out)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_before_kib": before, "peak_kib": peak_kib()}))


def make_files(directory: str) -> Tuple[str, str]:
    """Write the pretrained net's weights (via pycaffe) and the fine-tuning net; return their paths."""
    weights = os.path.join(directory, "pretrained.caffemodel")
    save_random_model(os.path.join(directory, "pretrained.prototxt"), net_prototxt(), weights)
    finetune = os.path.join(directory, "finetune.prototxt")
    with open(finetune, "w") as handle:
        handle.write(net_prototxt("fc3_new", NEW_CLASSES))
    return finetune, weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs per task (default 3)")
    parser.add_argument("--child", nargs=4, metavar=("TASK", "PROTO", "WEIGHTS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    os.environ.setdefault("GLOG_minloglevel", "2")
    with tempfile.TemporaryDirectory(prefix="bench-check-init-") as directory:
        proto, weights = make_files(directory)
        size = os.path.getsize(weights)
        print(f"caffemodel: {size / MIB:.1f} MiB; fine-tuning net: head fc3 (1000) -> fc3_new ({NEW_CLASSES})")
        runs: Dict[str, List[Dict[str, float]]] = {task: [] for task in TASKS}
        for _ in range(args.repeat):  # interleaved, so every task sees the same cache state
            for task, results in runs.items():
                out = os.path.join(directory, "out.caffemodel")
                results.append(run_child(__file__, [task, proto, weights, out]))
                if os.path.exists(out):
                    os.remove(out)
        summary = {}
        for task, results in runs.items():
            seconds = statistics.median(r["seconds"] for r in results)
            peak = max(r["peak_kib"] for r in results) * 1024
            base = max(r["peak_before_kib"] for r in results) * 1024
            process = statistics.median(r["process_seconds"] for r in results)
            summary[task] = (seconds, peak, peak - base)
            print(
                f"{task:17}  {seconds:7.3f} s (process {process:5.2f} s)  "
                f"peak RSS {peak / MIB:6.1f} MiB = {peak / size:4.2f}x file "
                f"(after imports {base / MIB:5.1f} MiB; work adds {(peak - base) / MIB:6.1f} MiB)"
            )
        for ours, theirs in (("check", "pycaffe load"), ("init", "pycaffe load+save")):
            time_ratio = summary[ours][0] / summary[theirs][0]
            memory_ratio = summary[ours][1] / summary[theirs][1]
            print(f"{ours} / {theirs}: time {time_ratio:.3f}x, peak RSS {memory_ratio:.2f}x")


if __name__ == "__main__":
    main()
