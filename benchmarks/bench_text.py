"""Text commands at Caffe's speed: whole processes against ``upgrade_net_proto_text``.

Inside the reference environment::

    scripts/caffe-env run -- python3 benchmarks/bench_text.py

On the host (Caffe's C++ tool runs chrooted in the reference root, on copies
of the files placed there; give the root with ``--cxx-root``)::

    python3 benchmarks/bench_text.py --cxx-root "$CAFFE_FT_ROOT"

Part 1, GoogLeNet's train_val (caffe-doc), best of several whole-process runs:
``fmt`` <= 0.8x the C++ tool, ``inspect`` and ``diff`` <= 1x,
``rewrite --dry-run`` <= 1.5x.

Part 2, generated chains of 1k, 10k and 50k Convolution+ReLU layers (an
InnerProduct head on top) and a 10 MB file of empty ``layer {}``: every
command's growth from 10k to 50k layers <= 6x (what a quadratic pass would
break), judged on CPU time (user + system: on a machine shared with other
work, single wall-clock runs of several seconds moved by 2x; the wall-clock
growth is printed beside it); at 10 MB ``fmt`` and ``inspect`` <= 3x the C++
tool's time, peak memory <= the C++ tool's.

caffe-ft runs as users get it: an editable checkout is installed into a
temporary folder first (``measure.caffe_ft_command``; ``--as-installed-here``
measures the install as it is).

Each figure is a ratio of two measurements made in this run.  Exit status 1
when a target is missed (all are still printed); ``--quick`` skips the 50k
chain and the 10 MB file.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

from measure import caffe_ft_command, measure_process, measure_process_cpu

DOC = "/usr/share/doc/caffe-doc"
MIB = 1 << 20


def chain(layers: int) -> str:
    """A net of ``layers`` Convolution+ReLU pairs and an InnerProduct head."""
    out = ['name: "chain"\nlayer {\n  name: "data"\n  type: "Input"\n  top: "x0"\n'
           '  input_param {\n    shape {\n      dim: 1\n      dim: 3\n      dim: 8\n      dim: 8\n    }\n  }\n}\n']
    for i in range(layers):
        out.append(f'layer {{\n  name: "conv{i}"\n  type: "Convolution"\n  bottom: "x{i}"\n  top: "c{i}"\n'
                   f'  convolution_param {{\n    num_output: 3\n    pad: 1\n    kernel_size: 3\n  }}\n}}\n'
                   f'layer {{\n  name: "relu{i}"\n  type: "ReLU"\n  bottom: "c{i}"\n  top: "x{i + 1}"\n}}\n')
    out.append(f'layer {{\n  name: "fc"\n  type: "InnerProduct"\n  bottom: "x{layers}"\n  top: "fc"\n'
               f'  inner_product_param {{\n    num_output: 10\n  }}\n}}\n'
               f'layer {{\n  name: "prob"\n  type: "Softmax"\n  bottom: "fc"\n  top: "prob"\n}}\n')
    return "".join(out)


def empty_layers(size: int) -> str:
    """About ``size`` bytes of ``layer {}`` lines."""
    return "layer {}\n" * (size // 9)


def measure(command: List[str], runs: int) -> Tuple[float, float]:
    """Best wall time (s) and the largest peak resident set (MiB) of ``runs``
    runs of ``command`` as a whole process; it must succeed."""
    best, peak = float("inf"), 0.0
    for _ in range(runs):
        seconds, resident, status = measure_process(command)
        if status != 0:
            raise SystemExit(f"failed ({status}): {' '.join(command)}")
        best, peak = min(best, seconds), max(peak, resident)
    return best, peak


class Tools:
    """Runs caffe-ft and Caffe's C++ tool on the same file."""

    def __init__(self, workdir: str, cxx_root: Optional[str], as_is: bool = False) -> None:
        self.cxx_root = cxx_root
        self.caffe_ft = caffe_ft_command(workdir, as_is)
        self.workdir = workdir
        if cxx_root:
            self.cxx_dir = tempfile.mkdtemp(prefix="bench-text-", dir=os.path.join(cxx_root, "tmp"))
        else:
            self.cxx_dir = workdir

    def cxx(self, path: str) -> List[str]:
        """``upgrade_net_proto_text PATH OUT`` (chrooted, on a copy, with --cxx-root)."""
        if not self.cxx_root:
            return ["upgrade_net_proto_text", path, os.path.join(self.workdir, "cxx-out.prototxt")]
        inside = os.path.join(self.cxx_dir, os.path.basename(path))
        if not os.path.exists(inside):
            shutil.copyfile(path, inside)
        rel = "/" + os.path.relpath(inside, self.cxx_root)
        return ["chroot", self.cxx_root, "upgrade_net_proto_text", rel, rel + ".out"]

    def ours(self, *args: str) -> List[str]:
        return [*self.caffe_ft, *args]

    def close(self) -> None:
        if self.cxx_root:
            shutil.rmtree(self.cxx_dir, ignore_errors=True)


def check(label: str, value: float, target: float, misses: List[str]) -> str:
    ok = value <= target
    if not ok:
        misses.append(f"{label}: {value:.2f} > {target}")
    return f"{value:.2f}x (target <= {target}x{'' if ok else ', MISSED'})"


def googlenet(workdir: str) -> str:
    found = sorted(glob.glob(f"{DOC}/models/bvlc_googlenet/train_val.prototxt*"))
    if not found:
        raise SystemExit(f"no GoogLeNet train_val under {DOC} (run inside the reference environment, or mount it)")
    opener = gzip.open if found[0].endswith(".gz") else open
    target = os.path.join(workdir, "googlenet_train_val.prototxt")
    with opener(found[0], "rb") as handle, open(target, "wb") as out:
        out.write(handle.read())
    return target


def part_googlenet(tools: Tools, workdir: str, runs: int, misses: List[str]) -> None:
    net = googlenet(workdir)
    print(f"== GoogLeNet train_val ({os.path.getsize(net)} bytes), best of {runs} interleaved whole-process runs")
    outdir = os.path.join(workdir, "ft")
    commands = {
        "cxx": (tools.cxx(net), 0.0),
        "fmt": (tools.ours("fmt", net), 0.8),
        "inspect": (tools.ours("inspect", net), 1.0),
        "diff": (tools.ours("diff", net, net), 1.0),
        "rewrite": (tools.ours("rewrite", net, "--strategy", "last-fc", "--num-classes", "5", "--dry-run",
                               "-o", outdir), 1.5),
    }
    best = {name: float("inf") for name in commands}
    for _ in range(runs):  # round by round, so that a burst of load on the machine hits every command alike
        for name, (command, _) in commands.items():
            best[name] = min(best[name], measure(command, 1)[0])
    cxx = best.pop("cxx")
    print(f"upgrade_net_proto_text:  {cxx * 1000:7.1f} ms")
    for name, ours in best.items():
        target = commands[name][1]
        print(f"caffe-ft {name:8s}        {ours * 1000:7.1f} ms  {check('googlenet ' + name, ours / cxx, target, misses)}")


def part_scale(tools: Tools, workdir: str, quick: bool, misses: List[str]) -> None:
    sizes = (1000, 10000) if quick else (1000, 10000, 50000)
    print(f"== chains of Convolution+ReLU layers (one run each): wall seconds, peak MiB")
    times: Dict[Tuple[str, int], float] = {}
    cpu_times: Dict[Tuple[str, int], float] = {}
    names = ("cxx", "fmt", "inspect", "diff", "rewrite")
    print(f"{'layers':>7s} {'MB':>6s} " + " ".join(f"{name:>16s}" for name in names))
    for size in sizes:
        net = os.path.join(workdir, f"chain{size}.prototxt")
        with open(net, "w") as handle:
            handle.write(chain(size))
        commands = {
            "cxx": tools.cxx(net),
            "fmt": tools.ours("fmt", net),
            "inspect": tools.ours("inspect", net),
            "diff": tools.ours("diff", net, net),
            "rewrite": tools.ours("rewrite", net, "--strategy", "last-fc", "--num-classes", "5", "--dry-run",
                                  "-o", os.path.join(workdir, "ft")),
        }
        row = []
        for name in names:
            seconds, cpu, peak, status = measure_process_cpu(commands[name])
            if status != 0:
                raise SystemExit(f"failed ({status}): {' '.join(commands[name])}")
            times[name, size], cpu_times[name, size] = seconds, cpu
            row.append(f"{seconds:8.2f} {peak:7.0f}")
        print(f"{size:7d} {os.path.getsize(net) / 1e6:6.1f} " + " ".join(row))
    if not quick:
        for name in names:
            growth = cpu_times[name, 50000] / cpu_times[name, 10000]
            wall = times[name, 50000] / times[name, 10000]
            print(f"growth 10k -> 50k, {name:8s}: CPU time {cpu_times[name, 10000]:6.2f} -> "
                  f"{cpu_times[name, 50000]:6.2f} s: {check('growth ' + name, growth, 6.0, misses)}"
                  f"  (wall clock {wall:.2f}x)")
        empty = os.path.join(workdir, "empty_layers.prototxt")
        with open(empty, "w") as handle:
            handle.write(empty_layers(10 * 1000 * 1000))
        print(f"== 10 MB of empty layers ({os.path.getsize(empty)} bytes)")
        cxx, cxx_peak = measure(tools.cxx(empty), 1)
        print(f"upgrade_net_proto_text:  {cxx:6.2f} s, peak {cxx_peak:6.0f} MiB")
        for name in ("fmt", "inspect"):
            ours, peak = measure(tools.ours(name, empty), 1)
            print(f"caffe-ft {name:8s}:       {ours:6.2f} s, peak {peak:6.0f} MiB; time "
                  f"{check('10MB ' + name + ' time', ours / cxx, 3.0, misses)}, peak "
                  f"{check('10MB ' + name + ' peak', peak / cxx_peak, 1.0, misses)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cxx-root", help="run upgrade_net_proto_text chrooted in this root (on the host)")
    parser.add_argument("--runs", type=int, default=10, help="runs per GoogLeNet command (default 10)")
    parser.add_argument("--quick", action="store_true", help="1k and 10k chains only")
    parser.add_argument("--part", choices=("all", "googlenet", "scale"), default="all")
    parser.add_argument("--as-installed-here", dest="as_is", action="store_true",
                        help="run caffe-ft as installed here even when editable (by default an editable "
                             "checkout is installed into a temporary folder first, as users get it)")
    args = parser.parse_args()
    global DOC
    if args.cxx_root:
        DOC = os.path.join(args.cxx_root, DOC.lstrip("/"))
    misses: List[str] = []
    workdir = tempfile.mkdtemp(prefix="bench-text-")
    tools = Tools(workdir, args.cxx_root, args.as_is)
    print(f"caffe-ft: {' '.join(tools.caffe_ft)}")
    try:
        if args.part in ("all", "googlenet"):
            part_googlenet(tools, workdir, args.runs, misses)
        if args.part in ("all", "scale"):
            part_scale(tools, workdir, args.quick, misses)
    finally:
        tools.close()
        shutil.rmtree(workdir, ignore_errors=True)
    print("targets missed: " + ("; ".join(misses) if misses else "none"))
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
