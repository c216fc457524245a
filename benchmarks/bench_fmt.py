"""Whole-process `caffe-ft fmt` against Caffe's own `upgrade_net_proto_text`.

Run inside the reference environment:

    scripts/caffe-env run -- python3 benchmarks/bench_fmt.py

Both tools read the largest net of Debian's caffe-doc and print it in
canonical layout; each is timed as a whole process (start-up included), best
of several runs.  Target: ratio <= 1 (caffe-ft no slower than the C++ tool).
"""

from __future__ import annotations

import glob
import gzip
import os
import shutil
import subprocess
import sys
import tempfile
import time

DOC = "/usr/share/doc/caffe-doc"
RUNS = 15


def largest_net(workdir: str) -> str:
    best, size = "", -1
    for path in glob.glob(f"{DOC}/**/*.prototxt*", recursive=True):
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as handle:
            data = handle.read()
        if b"layer" in data and len(data) > size:
            best, size = path, len(data)
            target = os.path.join(workdir, os.path.basename(path).replace(".gz", ""))
            with open(target, "wb") as out:
                out.write(data)
            chosen = target
    print(f"net: {best} ({size} bytes)")
    return chosen


def best_time(command: list) -> float:
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> int:
    workdir = tempfile.mkdtemp()
    try:
        net = largest_net(workdir)
        out = os.path.join(workdir, "out.prototxt")
        caffe = best_time(["upgrade_net_proto_text", net, out])
        ours = best_time([shutil.which("caffe-ft") or "caffe-ft", "fmt", net])
        with open(out, "rb") as handle:
            reference = handle.read()
        produced = subprocess.run(["caffe-ft", "fmt", net], check=True, capture_output=True).stdout
        print(f"upgrade_net_proto_text: {caffe * 1000:.0f} ms")
        print(f"caffe-ft fmt:           {ours * 1000:.0f} ms")
        print(f"ratio caffe-ft / caffe: {ours / caffe:.2f} (target <= 1)")
        print(f"outputs identical: {produced == reference}")
        return 0
    finally:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    sys.exit(main())
