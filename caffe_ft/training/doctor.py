"""What this machine can train with: ``caffe-ft doctor``.

Each check is one line -- OK or MISSING, what was found, and the fix -- over
the engines (pycaffe: CPU or CUDA build, cuDNN, NCCL; torch: CPU or CUDA), the
GPUs and whether the installed Caffe/torch was compiled for their compute
capability, and the free disk of the working directory.  Nothing here imports
``caffe`` or ``torch``: pycaffe's build is read from its ELF files
(:mod:`.devices`), and whatever needs the library itself (versions, a forward
pass on the GPU, torch's CUDA) runs in a child process, where a Caffe
``LOG(FATAL)`` only kills the child.  On a GPU host the child runs a small
Convolution forward pass in GPU mode, which is the test a GPU image's build
cannot run (no GPU there): the GPU image runs ``caffe-ft doctor`` when it starts.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .devices import needed_libraries, pycaffe_extensions

ENGINES = ("pycaffe", "torch")

#: Below this much free space in the working directory, snapshots and caches may not fit.
MIN_FREE_BYTES = 2 * 1024 ** 3

#: Which GPUs a CUDA build of Caffe was compiled for: scripts/build-caffe-cuda.sh's
#: CUDA_ARCH_BIN and CUDA_ARCH_PTX as "60 61 70 ... 120;120"; the gpu image sets it.
CAFFE_ARCHS_ENV = "CAFFE_FT_CAFFE_CUDA_ARCHS"

_CHILD_TIMEOUT = 300.0

_PYCAFFE_PROBE = r"""
import json, sys
out = {}
try:
    import caffe
except Exception as exc:
    print(json.dumps({"error": "%s: %s" % (type(exc).__name__, exc)})); sys.exit(0)
out["version"] = getattr(caffe, "__version__", "")
out["file"] = caffe.__file__
out["nccl"] = bool(caffe.has_nccl()) if hasattr(caffe, "has_nccl") else None
print(json.dumps(out)); sys.stdout.flush()
if sys.argv[1:] == ["gpu"]:
    import os, tempfile
    import numpy as np
    text = ('layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }\n'
            'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" convolution_param {'
            ' num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }\n')
    with tempfile.NamedTemporaryFile("w", suffix=".prototxt", delete=False) as handle:
        handle.write(text)
    try:
        caffe.set_device(0)
        caffe.set_mode_gpu()
        net = caffe.Net(handle.name, caffe.TEST)
        net.blobs["data"].data[...] = 1.0
        result = net.forward()["conv"]
        ok = result.shape == (2, 4, 6, 6) and bool(np.isfinite(result).all())
    finally:
        os.unlink(handle.name)
    print(json.dumps({"gpu_forward": ok}))
"""

_TORCH_PROBE = r"""
import json, sys
try:
    import torch
except Exception as exc:
    print(json.dumps({"error": "%s: %s" % (type(exc).__name__, exc)})); sys.exit(0)
out = {"version": torch.__version__, "cuda": torch.version.cuda, "cuda_available": False}
if torch.version.cuda:
    out["arch_list"] = torch.cuda.get_arch_list()
    out["cuda_available"] = torch.cuda.is_available()
    if out["cuda_available"]:
        out["devices"] = [list(torch.cuda.get_device_capability(i)) for i in range(torch.cuda.device_count())]
        try:
            out["nccl"] = ".".join(str(p) for p in torch.cuda.nccl.version())
        except Exception:
            out["nccl"] = None
        x = torch.ones(2, 3, 8, 8, device="cuda")
        conv = torch.nn.Conv2d(3, 4, 3).cuda()
        out["gpu_forward"] = bool(torch.isfinite(conv(x)).all().item())
print(json.dumps(out))
"""


@dataclass(frozen=True)
class Check:
    """One line of the report: ``name`` is OK or not, what was found, and how to fix it."""

    name: str
    ok: bool
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class Gpu:
    """A GPU as nvidia-smi lists it."""

    index: int
    name: str
    capability: Tuple[int, int]
    driver: str


@dataclass(frozen=True)
class EngineStatus:
    """Whether an engine can train here, and on what."""

    engine: str
    can_run: bool
    devices: str  # "CPU", "CPU, GPU", "GPU" or "" when it cannot run
    reason: str = ""


@dataclass(frozen=True)
class Report:
    """Everything ``caffe-ft doctor`` found; ``engine`` is the one asked about."""

    engine: str
    checks: Tuple[Check, ...]
    engines: Tuple[EngineStatus, ...]
    can_run: bool

    def as_dict(self) -> Dict[str, Any]:
        """A JSON-ready form (``caffe-ft doctor --json``)."""
        return {
            "engine": self.engine,
            "can_run": self.can_run,
            "engines": [asdict(status) for status in self.engines],
            "checks": [asdict(check) for check in self.checks],
        }

    def lines(self) -> List[str]:
        """The report as text: one line per check, its fix indented below."""
        out = []
        for check in self.checks:
            out.append(f"{'OK' if check.ok else 'MISSING':<8}{check.name:<9}{check.detail}")
            if not check.ok and check.fix:
                out.append(f"{'':<17}fix: {check.fix}")
        for status in self.engines:
            if status.can_run:
                out.append(f"engine {status.engine}: can train ({status.devices})")
            else:
                out.append(f"engine {status.engine}: cannot train: {status.reason}")
        return out


# ---------------------------------------------------------------- probing --

Runner = Callable[[Sequence[str], float], Tuple[int, str]]


def _run(command: Sequence[str], timeout: float) -> Tuple[int, str]:
    """Run ``command``; its exit status and stdout (-1 and "" when it cannot start or hangs)."""
    env = dict(os.environ, GLOG_minloglevel="3")
    try:
        done = subprocess.run(list(command), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                              universal_newlines=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return -1, ""
    return done.returncode, done.stdout


def _json_lines(text: str) -> Dict[str, Any]:
    """The JSON objects a probe printed, one per line, merged."""
    merged: Dict[str, Any] = {}
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                merged.update(json.loads(line))
            except ValueError:
                pass
    return merged


def list_gpus(run: Runner = _run) -> Optional[List[Gpu]]:
    """The GPUs nvidia-smi lists (None when nvidia-smi is missing or fails)."""
    if shutil.which("nvidia-smi") is None:
        return None
    code, out = run(["nvidia-smi", "--query-gpu=index,name,compute_cap,driver_version",
                     "--format=csv,noheader"], 60.0)
    if code != 0:
        return None
    gpus = []
    for line in out.splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) != 4 or not parts[0].isdigit():
            continue
        major, _, minor = parts[2].partition(".")
        capability = (int(major), int(minor or 0)) if major.isdigit() and (minor or "0").isdigit() else (0, 0)
        gpus.append(Gpu(int(parts[0]), parts[1], capability, parts[3]))
    return gpus


def parse_archs(text: str) -> Tuple[List[int], List[int]]:
    """``"60 61 90;90"`` (CUDA_ARCH_BIN;CUDA_ARCH_PTX, as the gpu image sets
    :data:`CAFFE_ARCHS_ENV`) as (machine-code architectures, PTX architectures)."""
    binary, _, ptx = text.partition(";")

    def numbers(part: str) -> List[int]:
        words = part.replace(",", " ").split()
        return [int("".join(ch for ch in word if ch.isdigit())) for word in words if any(ch.isdigit() for ch in word)]

    return numbers(binary), numbers(ptx)


def supports(capability: Tuple[int, int], binary: Sequence[int], ptx: Sequence[int]) -> bool:
    """Whether code built for these architectures runs on a GPU of ``capability``:
    machine code of the same major version and no newer minor one, or PTX of
    any older-or-equal architecture (the driver compiles it)."""
    cc = capability[0] * 10 + capability[1]
    if any(arch // 10 == capability[0] and arch <= cc for arch in binary):
        return True
    return any(arch <= cc for arch in ptx)


def _torch_archs(arch_list: Sequence[str]) -> Tuple[List[int], List[int]]:
    """torch.cuda.get_arch_list() (``sm_90``, ``compute_90``) as (machine code, PTX)."""
    binary = [int(a[3:]) for a in arch_list if a.startswith("sm_") and a[3:].isdigit()]
    ptx = [int(a[8:]) for a in arch_list if a.startswith("compute_") and a[8:].isdigit()]
    return binary, ptx


def _gpu_names(gpus: Sequence[Gpu]) -> str:
    return ", ".join(f"{gpu.index}: {gpu.name} (sm_{gpu.capability[0]}{gpu.capability[1]})" for gpu in gpus)


# --------------------------------------------------------------- checking --


def _check_pycaffe(gpus: Optional[List[Gpu]], python: str, run: Runner,
                   checks: List[Check]) -> EngineStatus:
    fix_install = ("install Caffe's Python module: Debian bullseye 'apt install python3-caffe', "
                   "the image of 'scripts/build-image cpu|gpu', or scripts/caffe-env")
    if importlib.util.find_spec("caffe") is None:
        checks.append(Check("pycaffe", False, "not installed ('import caffe' finds nothing)", fix_install))
        return EngineStatus("pycaffe", False, "", "pycaffe is not installed")
    extensions = pycaffe_extensions()
    libraries = needed_libraries(extensions) if extensions else None
    cuda = [name for name in (libraries or []) if name.startswith(("libcudart", "libcublas", "libcurand"))]
    cudnn = any(name.startswith("libcudnn") for name in libraries or [])
    gpu_build = bool(cuda) or cudnn
    use_gpu = gpu_build and bool(gpus)
    code, out = run([python, "-c", _PYCAFFE_PROBE] + (["gpu"] if use_gpu else []), _CHILD_TIMEOUT)
    probe = _json_lines(out)
    if "error" in probe or "file" not in probe:
        reason = probe.get("error") or f"the import crashed (exit {code})"
        checks.append(Check("pycaffe", False, f"'import caffe' fails: {reason}",
                            "install what it names (e.g. python3-six, python3-skimage, python3-protobuf)"))
        return EngineStatus("pycaffe", False, "", "'import caffe' fails")
    build = "unknown build (its libraries could not be read)" if libraries is None else (
        ("CUDA build" + (" with cuDNN" if cudnn else "")) if gpu_build else "CPU-only build")
    checks.append(Check("pycaffe", True, f"Caffe {probe.get('version') or '?'}, {build}, {probe['file']}"))
    nccl = probe.get("nccl")
    if gpu_build:
        checks.append(Check("nccl", bool(nccl), "pycaffe " + ("has NCCL (several GPUs)" if nccl else "lacks NCCL"),
                            "rebuild Caffe with USE_NCCL=ON to train on several GPUs"))
    if not gpu_build:
        return EngineStatus("pycaffe", True, "CPU")
    if not gpus:
        if cudnn:
            # BVLC Caffe creates cuDNN layers whatever the mode; without a GPU they abort.
            return EngineStatus("pycaffe", False, "",
                                "this Caffe uses cuDNN for its Convolution layers even in CPU mode, "
                                "and no GPU is visible")
        return EngineStatus("pycaffe", True, "CPU")
    archs = os.environ.get(CAFFE_ARCHS_ENV, "")
    if archs:
        binary, ptx = parse_archs(archs)
        unsupported = [gpu for gpu in gpus if not supports(gpu.capability, binary, ptx)]
        checks.append(Check("caffe-cc", not unsupported,
                            f"Caffe built for {archs}; " + (f"not for GPU {_gpu_names(unsupported)}" if unsupported
                                                            else "covers every GPU here"),
                            "rebuild with CUDA_ARCH_BIN naming these GPUs' compute capability "
                            "(scripts/build-image gpu with CAFFE_FT_BUILD_ARGS)"))
    forward = probe.get("gpu_forward")
    checks.append(Check("caffe-gpu", bool(forward),
                        "a Convolution forward pass on GPU 0 " + ("works" if forward else
                                                                   f"fails (exit {code})"),
                        "check the driver (nvidia-smi), that the GPU is passed in (docker run --gpus all) "
                        "and that Caffe was built for this GPU"))
    if not forward:
        return EngineStatus("pycaffe", not cudnn, "" if cudnn else "CPU", "pycaffe fails on the GPU")
    return EngineStatus("pycaffe", True, "CPU, GPU" if not cudnn else "GPU")


def _check_torch(gpus: Optional[List[Gpu]], python: str, run: Runner, checks: List[Check]) -> EngineStatus:
    if importlib.util.find_spec("torch") is None:
        checks.append(Check("torch", False, "not installed", "pip install 'caffe-ft[torch]'"))
        return EngineStatus("torch", False, "", "torch is not installed")
    code, out = run([python, "-c", _TORCH_PROBE], _CHILD_TIMEOUT)
    probe = _json_lines(out)
    if "version" not in probe:
        reason = probe.get("error") or f"the import crashed (exit {code})"
        checks.append(Check("torch", False, f"'import torch' fails: {reason}", "pip install 'caffe-ft[torch]'"))
        return EngineStatus("torch", False, "", "'import torch' fails")
    cuda = probe.get("cuda")
    checks.append(Check("torch", True, f"torch {probe['version']}, " + (f"CUDA {cuda}" if cuda else "CPU-only build")))
    if not gpus:
        return EngineStatus("torch", True, "CPU")
    if not cuda:
        checks.append(Check("torch-gpu", False, "this torch is a CPU-only build; the GPUs go unused",
                            "pip install torch from PyTorch's CUDA wheels (the default on PyPI for Linux x86-64)"))
        return EngineStatus("torch", True, "CPU")
    binary, ptx = _torch_archs(probe.get("arch_list") or [])
    unsupported = [gpu for gpu in gpus if not supports(gpu.capability, binary, ptx)]
    checks.append(Check("torch-cc", not unsupported,
                        f"torch built for {' '.join(probe.get('arch_list') or [])}; "
                        + (f"not for GPU {_gpu_names(unsupported)}" if unsupported else "covers every GPU here"),
                        "install a torch wheel built for these GPUs"))
    forward = bool(probe.get("gpu_forward"))
    checks.append(Check("torch-gpu", forward, "a convolution on cuda:0 " + ("works" if forward else "fails"),
                        "check the driver (nvidia-smi) and that the GPU is passed in (docker run --gpus all)"))
    if probe.get("cuda_available"):
        nccl = probe.get("nccl")
        checks.append(Check("nccl", bool(nccl), f"torch NCCL {nccl}" if nccl else "torch has no NCCL",
                            "install torch's CUDA wheel for Linux, which ships NCCL"))
    return EngineStatus("torch", True, "CPU, GPU" if forward else "CPU")


def diagnose(engine: str = "auto", directory: str = ".", python: str = sys.executable,
             run: Runner = _run) -> Report:
    """Check this machine for ``engine`` (``pycaffe``, ``torch`` or ``auto``: either)."""
    if engine not in ENGINES + ("auto",):
        raise ValueError(f"unknown engine {engine!r}")
    checks: List[Check] = []
    gpus = list_gpus(run)
    if gpus:
        drivers = sorted({gpu.driver for gpu in gpus})
        checks.append(Check("gpu", True, f"{len(gpus)} GPU(s), driver {', '.join(drivers)}: {_gpu_names(gpus)}"))
    else:
        checks.append(Check("gpu", False, "no NVIDIA GPU visible" + (" (no nvidia-smi)" if gpus is None else ""),
                            "CPU training only; for GPUs install the NVIDIA driver (in a container: "
                            "docker run --gpus all, with the NVIDIA Container Toolkit on the host)"))
    wanted = ENGINES if engine == "auto" else (engine,)
    statuses = []
    for name in wanted:
        check = _check_pycaffe if name == "pycaffe" else _check_torch
        statuses.append(check(gpus, python, run, checks))
    usage = shutil.disk_usage(directory)
    free_gib = usage.free / 1024 ** 3
    checks.append(Check("disk", usage.free >= MIN_FREE_BYTES,
                        f"{free_gib:.1f} GiB free in {os.path.abspath(directory)}",
                        f"free space: snapshots and feature caches need at least {MIN_FREE_BYTES // 1024 ** 3} GiB"))
    can_run = any(status.can_run for status in statuses)
    return Report(engine, tuple(checks), tuple(statuses), can_run)
