"""Which devices ``caffe-ft train`` may use, found out without Caffe aborting.

A CPU-only Caffe build (Debian's, for one) dies with ``LOG(FATAL)`` -- the
whole process, no exception -- as soon as anything touches a GPU
(``caffe.set_device``, or a net created in GPU mode).  So before asking
pycaffe for a GPU, this module reads the ELF ``DT_NEEDED`` entries of
pycaffe's ``_caffe`` extension and of the ``libcaffe`` it links: a GPU build
links the CUDA libraries (cuBLAS and cuRAND always, even when the CUDA
runtime itself is linked statically).  When the libraries cannot be read,
:func:`gpu_support` probes in a child process instead, where an abort only
kills the child.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import struct
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

from ..errors import CaffeFtError

#: Libraries only a GPU build of Caffe links.
CUDA_LIBRARY = re.compile(r"^lib(cudart|cublas|curand|cudnn|nccl|cuda)\b")

_PT_LOAD, _PT_DYNAMIC = 1, 2
_DT_NULL, _DT_NEEDED, _DT_STRTAB, _DT_RPATH, _DT_RUNPATH = 0, 1, 5, 15, 29
_DEFAULT_DIRS = ("/lib", "/usr/lib", "/lib64", "/usr/lib64", "/usr/local/lib")


class NotElf(ValueError):
    """The file is not a readable ELF shared object."""


@dataclass(frozen=True)
class ElfDeps:
    """The dynamic-linking entries of one ELF file."""

    needed: Tuple[str, ...]
    search_path: Tuple[str, ...]  # DT_RUNPATH, else DT_RPATH, split on ':'


def read_elf_deps(path: str) -> ElfDeps:
    """The ``DT_NEEDED`` names and run path of the ELF file at ``path``."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise NotElf(f"{path}: {exc.strerror}") from None
    if data[:4] != b"\x7fELF" or len(data) < 64 or data[4] not in (1, 2) or data[5] not in (1, 2):
        raise NotElf(f"{path}: not an ELF file")
    wide = data[4] == 2
    end = "<" if data[5] == 1 else ">"
    word = "Q" if wide else "I"
    try:
        if wide:
            phoff, = struct.unpack_from(end + "Q", data, 32)
            phentsize, phnum = struct.unpack_from(end + "HH", data, 54)
        else:
            phoff, = struct.unpack_from(end + "I", data, 28)
            phentsize, phnum = struct.unpack_from(end + "HH", data, 42)
        loads, dynamic = [], None
        for index in range(phnum):
            at = phoff + index * phentsize
            if wide:
                kind, _, offset, vaddr, _, filesz = struct.unpack_from(end + "IIQQQQ", data, at)
            else:
                kind, offset, vaddr, _, filesz = struct.unpack_from(end + "IIIII", data, at)
            if kind == _PT_LOAD:
                loads.append((vaddr, offset, filesz))
            elif kind == _PT_DYNAMIC:
                dynamic = (offset, filesz)
        if dynamic is None:
            return ElfDeps((), ())
        entries = _dynamic_entries(data, dynamic, end + word + word)
    except struct.error:
        raise NotElf(f"{path}: truncated ELF file") from None
    strtab = next((value for tag, value in entries if tag == _DT_STRTAB), None)
    if strtab is None:
        raise NotElf(f"{path}: dynamic section without a string table")
    base = _file_offset(strtab, loads)

    def string(offset: int) -> str:
        start = base + offset
        stop = data.find(b"\0", start)
        if start >= len(data) or stop < 0:
            raise NotElf(f"{path}: string outside the file")
        return data[start:stop].decode("utf-8", "replace")

    needed = tuple(string(value) for tag, value in entries if tag == _DT_NEEDED)
    runpath = [string(value) for tag, value in entries if tag == _DT_RUNPATH]
    rpath = [string(value) for tag, value in entries if tag == _DT_RPATH]
    search = tuple(d for entry in (runpath or rpath) for d in entry.split(":") if d)
    return ElfDeps(needed, search)


def _dynamic_entries(data: bytes, dynamic: Tuple[int, int], fmt: str) -> List[Tuple[int, int]]:
    offset, size = dynamic
    step = struct.calcsize(fmt)
    entries = []
    for at in range(offset, offset + size - step + 1, step):
        tag, value = struct.unpack_from(fmt, data, at)
        if tag == _DT_NULL:
            break
        entries.append((tag, value))
    return entries


def _file_offset(address: int, loads: Sequence[Tuple[int, int, int]]) -> int:
    """Where virtual ``address`` lies in the file (the segment holding it says)."""
    for vaddr, offset, filesz in loads:
        if vaddr <= address < vaddr + filesz:
            return address - vaddr + offset
    return address  # no program headers to map through: addresses are offsets


def _ld_conf_dirs(conf: str = "/etc/ld.so.conf", seen: Optional[set] = None) -> List[str]:
    """Directories listed in ld.so.conf, following its ``include`` lines."""
    seen = set() if seen is None else seen
    if conf in seen:
        return []
    seen.add(conf)
    try:
        with open(conf, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return []
    dirs: List[str] = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line.startswith("include"):
            pattern = line.split(None, 1)[1] if len(line.split(None, 1)) > 1 else ""
            pattern = pattern if os.path.isabs(pattern) else os.path.join(os.path.dirname(conf), pattern)
            for included in sorted(glob.glob(pattern)):
                dirs.extend(_ld_conf_dirs(included, seen))
        elif line:
            dirs.append(line)
    return dirs


def resolve_library(name: str, origin: str, search_path: Sequence[str]) -> Optional[str]:
    """Where the dynamic loader would find library ``name`` (roughly: run path,
    ``LD_LIBRARY_PATH``, ld.so.conf, the default directories)."""
    if "/" in name:
        return name if os.path.exists(name) else None
    dirs = [d.replace("$ORIGIN", origin).replace("${ORIGIN}", origin) for d in search_path]
    dirs += [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
    dirs += _ld_conf_dirs()
    dirs += list(_DEFAULT_DIRS)
    for directory in dirs:
        candidate = os.path.join(directory, name)
        if os.path.exists(candidate):
            return candidate
    return None


class _Unresolved(Exception):
    """A Caffe library that a file needs cannot be found."""


def _needed(paths: Iterable[str]) -> Iterator[str]:
    """The ``DT_NEEDED`` names of the files in ``paths`` and of the Caffe
    libraries they link, in the order met, read lazily: a caller that stops
    early reads no further library.  Raises :class:`NotElf` or :class:`_Unresolved`."""
    todo, seen = list(paths), set()
    while todo:
        path = os.path.realpath(todo.pop())
        if path in seen:
            continue
        seen.add(path)
        deps = read_elf_deps(path)
        for name in deps.needed:
            yield name
            if "caffe" in name:
                found = resolve_library(name, os.path.dirname(path), deps.search_path)
                if found is None:
                    raise _Unresolved(name)
                todo.append(found)


def needed_libraries(paths: Iterable[str]) -> Optional[List[str]]:
    """Every library the files in ``paths`` and the Caffe libraries they link
    need, in the order met (None when a Caffe library cannot be found or read)."""
    try:
        return list(dict.fromkeys(_needed(paths)))
    except (NotElf, _Unresolved):
        return None


def linked_cuda(paths: Iterable[str]) -> Optional[str]:
    """The first CUDA library that the files in ``paths`` (and the Caffe
    libraries they link) need, ``""`` when none does, None when a Caffe
    library they need, before any CUDA one, cannot be found or read."""
    try:
        return next((name for name in _needed(paths) if CUDA_LIBRARY.match(name)), "")
    except (NotElf, _Unresolved):
        return None


def pycaffe_extensions() -> List[str]:
    """The compiled ``_caffe`` module(s) of the importable pycaffe, found without importing it."""
    try:
        spec = importlib.util.find_spec("caffe")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise CaffeFtError("pycaffe is not installed: 'import caffe' fails (Debian: apt install python3-caffe)")
    found: List[str] = []
    for directory in spec.submodule_search_locations:
        found.extend(sorted(glob.glob(os.path.join(directory, "_caffe*.so"))))
    return found


_PROBE = "import caffe; caffe.set_device(0); caffe.set_mode_gpu()"


def probe_gpu_in_child(python: str = sys.executable, timeout: float = 120.0) -> bool:
    """Whether pycaffe survives selecting GPU 0, asked in a child process
    (a CPU-only build aborts there, which only kills the child)."""
    env = dict(os.environ, GLOG_minloglevel="3")
    try:
        done = subprocess.run([python, "-c", _PROBE], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def gpu_support() -> bool:
    """Whether the installed pycaffe was built with CUDA (False for a CPU-only build)."""
    extensions = pycaffe_extensions()
    found = linked_cuda(extensions) if extensions else None
    if found is None:
        return probe_gpu_in_child()
    return bool(found)


CPU_ONLY_MESSAGE = (
    "this Caffe is a CPU-only build (pycaffe links no CUDA library), so it cannot use a GPU; "
    "train with --cpu, or install a CUDA build of Caffe"
)


def require_gpu_build() -> None:
    """Raise the one-line explanation when pycaffe cannot use GPUs."""
    if not gpu_support():
        raise CaffeFtError(CPU_ONLY_MESSAGE)


# ------------------------------------------------------------------ GPU ids --


def parse_gpus(text: str) -> Optional[Tuple[int, ...]]:
    """``--gpu`` as device ids: ``"0"``, ``"0,1"``; ``"all"`` gives None (count them later)."""
    text = text.strip()
    if text.lower() == "all":
        return None
    ids = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit():
            raise CaffeFtError(f"--gpu: '{text}' is not 'all' or a list of device numbers such as 0 or 0,1")
        ids.append(int(part))
    if len(set(ids)) != len(ids):
        raise CaffeFtError(f"--gpu: '{text}' names a device twice")
    return tuple(ids)


def count_gpus() -> int:
    """How many GPUs this process can see (CUDA_VISIBLE_DEVICES, else the NVIDIA driver's list)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([entry for entry in visible.split(",") if entry.strip() and not entry.strip().startswith("-")])
    listed = glob.glob("/proc/driver/nvidia/gpus/*")
    if listed:
        return len(listed)
    try:
        done = subprocess.run(["nvidia-smi", "-L"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              universal_newlines=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in done.stdout.splitlines() if line.startswith("GPU "))


def resolve_gpus(text: str) -> Tuple[int, ...]:
    """The device ids ``--gpu TEXT`` means; ``all`` needs at least one visible GPU."""
    ids = parse_gpus(text)
    if ids is not None:
        return ids
    count = count_gpus()
    if count == 0:
        raise CaffeFtError("--gpu all: no GPU is visible (no NVIDIA driver, or CUDA_VISIBLE_DEVICES is empty)")
    return tuple(range(count))
