"""What the benchmarks share: peak memory, timed child processes, and a
pycaffe-saved caffemodel with random weights."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from typing import Dict, List, Tuple


def peak_kib() -> int:
    """This process's peak resident set (VmHWM) in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_child(script: str, args: List[str]) -> Dict[str, float]:
    """Run ``script --child ARGS`` in a fresh process; its last stdout line is a
    JSON dict of measurements, to which the whole process's time is added."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, script, "--child", *args],
        check=True,
        stdout=subprocess.PIPE,
        env={**os.environ, "GLOG_minloglevel": "2"},
    )
    result = json.loads(done.stdout.decode().strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - start
    return result


def save_random_model(proto: str, prototxt: str, weights: str) -> None:
    """Write ``prototxt`` to ``proto`` and a caffemodel of it, filled with
    seeded Gaussian noise, that pycaffe saves to ``weights``."""
    import numpy as np
    import caffe

    with open(proto, "w") as handle:
        handle.write(prototxt)
    net = caffe.Net(proto, caffe.TEST)
    rng = np.random.default_rng(0)
    for params in net.params.values():
        for param in params:
            param.data[...] = rng.standard_normal(param.data.shape, dtype=np.float32)
    net.save(weights)


# Run by ``measure_process`` in a fresh, small interpreter: Linux charges a
# child's peak resident set with that of the process that forked it (the
# forker's pages count until ``exec``), so the benchmark's own memory must not
# be the forker's.
_LAUNCHER = """
import os, sys, time
start = time.perf_counter()
pid = os.posix_spawnp(sys.argv[1], sys.argv[1:], os.environ,
                      file_actions=[(os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0)])
_, status, usage = os.wait4(pid, 0)
print(time.perf_counter() - start, usage.ru_utime + usage.ru_stime, usage.ru_maxrss,
      os.waitstatus_to_exitcode(status) if hasattr(os, "waitstatus_to_exitcode") else status >> 8)
"""


def measure_process(command: List[str]) -> Tuple[float, float, int]:
    """Wall seconds, peak resident MiB and exit status of ``command`` run as a
    whole process (its output discarded), started from a small launcher so that
    this process's memory does not count."""
    seconds, _, peak, status = measure_process_cpu(command)
    return seconds, peak, status


def measure_process_cpu(command: List[str]) -> Tuple[float, float, float, int]:
    """Wall seconds, CPU seconds (user + system), peak resident MiB and exit
    status of ``command``, as :func:`measure_process`.  On a machine shared
    with other work the CPU time moves far less than the wall time."""
    # Python may keep its bytecode, as an installed package has it (a shell that sets
    # PYTHONDONTWRITEBYTECODE would otherwise make every run compile caffe-ft anew).
    env = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}
    done = subprocess.run([sys.executable, "-c", _LAUNCHER, *command], check=True, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env)
    seconds, cpu, peak, status = done.stdout.decode().split()[-4:]
    return float(seconds), float(cpu), int(peak) / 1024, int(status)


def caffe_ft_command(workdir: str, as_is: bool = False) -> List[str]:
    """How to run caffe-ft the way users get it: installed, not editable.

    An editable install (a development checkout) adds an import hook that every
    Python start loads (~10 ms of pathlib, importlib.util...), which an
    installed caffe-ft does not pay; the reference root installs caffe-ft with
    ``pip install`` (scripts/caffe-env).  So when this checkout is installed
    editable, it is installed into ``workdir`` with ``pip install --target``
    (with its bytecode, as pip installs), and run by an interpreter whose site
    has that folder first, then this interpreter's site-packages (its ``.pth``
    files too, except the editable install's hook).  ``as_is``: the command
    found on PATH (or ``python -m caffe_ft.cli``), whatever its install.
    """
    installed = shutil.which("caffe-ft")
    fallback = [installed] if installed else [sys.executable, "-m", "caffe_ft.cli"]
    import caffe_ft

    site_dirs = [path for path in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
                 if os.path.isdir(path)]
    editable = bool(glob.glob(os.path.join(site_dirs[0], "__editable__*caffe_ft*"))) if site_dirs else False
    if as_is or not editable:
        return fallback
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(caffe_ft.__file__)))
    target, venv = os.path.join(workdir, "installed"), os.path.join(workdir, "venv")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", target, checkout], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = os.path.join(venv, "bin", "python")
    venv_site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, stdout=subprocess.PIPE, text=True).stdout.strip()
    # Read first (.pth files are read in name order): the install, then this one's dependencies.
    with open(os.path.join(venv_site, "00-caffe-ft-bench.pth"), "w") as handle:
        handle.write("\n".join([target, *site_dirs]) + "\n")
    for site_dir in site_dirs:
        for pth in glob.glob(os.path.join(site_dir, "*.pth")):
            if not os.path.basename(pth).startswith("__editable__"):
                shutil.copy(pth, venv_site)
    return [python, os.path.join(target, "bin", "caffe-ft")]
