"""Host side of the torch engine's parity tests: run the reference helper in
the Caffe environment once per content hash and read back what it wrote.

The helper (``tests/training/torch_parity_ref.py``) runs under ``scripts/caffe-env``;
its results are cached under ``$CAFFE_FT_PARITY_CACHE`` (default
``/tmp/caffe-ft-parity``) in a directory named by the hash of the helper and
its inputs, so a rerun with nothing changed costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from typing import Dict, List, Mapping

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
HELPER = os.path.join(HERE, "torch_parity_ref.py")
CACHE = os.environ.get("CAFFE_FT_PARITY_CACHE", "/tmp/caffe-ft-parity")


def caffe_root() -> str:
    return os.environ.get("CAFFE_FT_ROOT", "/var/cache/caffe-ft/bullseye").rstrip("/")


def in_root(path: str) -> str:
    """Where a path inside the reference environment lies on the host."""
    return caffe_root() + path


def run_helper(*args: str, helper: str = HELPER) -> None:
    """``python3 tests/training/torch_parity_ref.py ARGS`` (or another ``helper``) in the reference environment."""
    command = [os.path.join(REPO, "scripts", "caffe-env"), "run", "--", "python3", helper, *args]
    done = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True)
    if done.returncode:
        raise AssertionError(f"the reference helper failed ({done.returncode}):\n{done.stdout[-4000:]}")


def cached_dir(mode: str, files: Mapping[str, bytes], helper: str = HELPER) -> str:
    """A directory holding ``files`` and the helper's ``mode`` results for them, made once per content."""
    digest = hashlib.sha256()
    with open(helper, "rb") as handle:
        digest.update(handle.read())
    digest.update(mode.encode())
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + files[name] + b"\0")
    where = os.path.join(CACHE, digest.hexdigest()[:24])
    if os.path.exists(os.path.join(where, mode + ".done")):
        return where
    shutil.rmtree(where, ignore_errors=True)
    os.makedirs(where)
    for name, content in files.items():
        os.makedirs(os.path.dirname(os.path.join(where, name)), exist_ok=True)
        with open(os.path.join(where, name), "wb") as handle:
            handle.write(content)
    run_helper(mode, where, helper=helper)
    return where


def load_blobs(path: str) -> Dict[str, np.ndarray]:
    with np.load(path) as data:
        names: List[str] = [str(n) for n in data["names"]]
        return {name: data[f"b{i}"] for i, name in enumerate(names)}


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    """max |ours - reference| / max |reference| (absolute when the reference is all zeros)."""
    ours = np.asarray(ours, np.float64).reshape(reference.shape)
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    error = float(np.max(np.abs(ours - reference))) if reference.size else 0.0
    return error / scale if scale > 0 else error


def dumps(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, indent=1).encode()
