"""A 500 MB caffemodel through ``inspect``, ``upgrade -o`` and ``init -o``, whole processes.

Runs anywhere (no Caffe needed: caffe-ft writes the model)::

    python3 benchmarks/bench_weights_io.py

Targets, each a ratio of two figures measured in this run:

* ``inspect MODEL``: peak resident memory <= 0.1x the file (the file is
  sniffed from its first bytes and mapped, never read whole);
* ``upgrade MODEL -o OUT`` and ``init NET --weights MODEL -o OUT``: time <=
  1.5x ``cp MODEL OUT; sync`` (caffe-ft also syncs what it writes), peak
  resident memory <= 1.1x the file (blobs go from the map to the output with
  at most one copy).

caffe-ft runs as users get it: an editable checkout is installed into a
temporary folder first (``measure.caffe_ft_command``; ``--as-installed-here``
measures the install as it is).

Best time and largest peak of ``--runs`` runs, interleaved so that every
command sees the same page cache.  Exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Tuple

from measure import caffe_ft_command, measure_process

MIB = 1 << 20
INPUTS, FC1, FC2 = 8192, 8192, 7800  # (8192*8192 + 7800*8192) floats: 500 MiB


def net_prototxt() -> str:
    return (
        'name: "big"\n'
        f'layer {{ name: "data" type: "Input" top: "data" input_param {{ shape {{ dim: 1 dim: {INPUTS} }} }} }}\n'
        f'layer {{ name: "fc1" type: "InnerProduct" bottom: "data" top: "fc1" '
        f'inner_product_param {{ num_output: {FC1} }} }}\n'
        f'layer {{ name: "fc2" type: "InnerProduct" bottom: "fc1" top: "fc2" '
        f'inner_product_param {{ num_output: {FC2} }} }}\n'
    )


def make_model(directory: str) -> Tuple[str, str]:
    """The net and a caffemodel of it with seeded random weights (written by caffe-ft)."""
    import numpy as np

    from caffe_ft.formats import prototext
    from caffe_ft.formats.caffemodel import Blob, Model, save_model
    from caffe_ft.formats.schema import load_schema

    proto = os.path.join(directory, "big.prototxt")
    with open(proto, "w") as handle:
        handle.write(net_prototxt())
    schema = load_schema()
    net = prototext.to_message(prototext.parse(net_prototxt().encode()), schema.new("NetParameter"))
    rng = np.random.default_rng(0)
    blobs = [[], [Blob.of(rng.standard_normal((FC1, INPUTS), dtype=np.float32)), Blob.of(np.zeros(FC1))],
             [Blob.of(rng.standard_normal((FC2, FC1), dtype=np.float32)), Blob.of(np.zeros(FC2))]]
    weights = os.path.join(directory, "big.caffemodel")
    save_model(Model(net, blobs), weights)
    return proto, weights


def run(command: List[str]) -> Tuple[float, float]:
    """Wall seconds and peak resident MiB of ``command`` as a whole process."""
    seconds, peak, status = measure_process(command)
    if status != 0:
        raise SystemExit(f"failed ({status}): {' '.join(command)}")
    return seconds, peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--make", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--as-installed-here", dest="as_is", action="store_true",
                        help="run caffe-ft as installed here even when editable (see measure.caffe_ft_command)")
    args = parser.parse_args()
    if args.make:  # in a child, so that the weights' memory is not this process's
        make_model(args.make)
        return 0
    misses: List[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-weights-io-") as directory:
        caffe_ft = caffe_ft_command(directory, args.as_is)
        print(f"caffe-ft: {' '.join(caffe_ft)}")
        subprocess.run([sys.executable, __file__, "--make", directory], check=True)
        proto, weights = os.path.join(directory, "big.prototxt"), os.path.join(directory, "big.caffemodel")
        size = os.path.getsize(weights) / MIB
        out = os.path.join(directory, "out.caffemodel")
        print(f"caffemodel: {size:.1f} MiB")
        commands: Dict[str, List[str]] = {
            "cp + sync": ["sh", "-c", f"cp '{weights}' '{out}' && sync"],
            "inspect": [*caffe_ft, "inspect", weights],
            "upgrade -o": [*caffe_ft, "upgrade", weights, "-o", out, "--force"],
            "init -o": [*caffe_ft, "init", proto, "--weights", weights, "-o", out, "--force"],
        }
        best: Dict[str, Tuple[float, float]] = {name: (float("inf"), 0.0) for name in commands}
        for _ in range(args.runs):
            for name, command in commands.items():
                if os.path.exists(out):
                    os.remove(out)
                seconds, peak = run(command)
                best[name] = (min(best[name][0], seconds), max(best[name][1], peak))
        copy = best["cp + sync"][0]
        for name, (seconds, peak) in best.items():
            line = f"{name:11s} {seconds:6.2f} s  peak {peak:7.1f} MiB = {peak / size:.3f}x file"
            if name == "inspect":
                ok = peak / size <= 0.1
                line += f"  (target peak <= 0.1x{'' if ok else ', MISSED'})"
                if not ok:
                    misses.append(f"inspect peak {peak / size:.3f}x")
            elif name != "cp + sync":
                ratio = seconds / copy
                ok_time, ok_peak = ratio <= 1.5, peak / size <= 1.1
                line += (f"  time {ratio:.2f}x cp+sync (target <= 1.5x{'' if ok_time else ', MISSED'}),"
                         f" peak target <= 1.1x{'' if ok_peak else ', MISSED'}")
                if not ok_time:
                    misses.append(f"{name} time {ratio:.2f}x")
                if not ok_peak:
                    misses.append(f"{name} peak {peak / size:.3f}x")
            print(line)
    print("targets missed: " + ("; ".join(misses) if misses else "none"))
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
