"""The CPU image, built and run: scripts/build-image makes it (buildah here, no
Docker daemon needed; the debootstrapped Debian base and the Caffe stage are
cached under /var/cache/caffe-ft/images, so a change of caffe-ft's sources
rebuilds only the stage that installs caffe-ft), then scripts/run-image runs the bundled digits demo in it --
pretraining and three real fine-tuning jobs in Caffe -- on a mounted folder,
as a non-root user. The outputs are checked from the host: where they are, who
owns them, and that the paths in them are the host's paths.

Marker ``image`` (also ``host``): deselect with ``-m "not caffe and not image"``
for a quick host run. Needs root (the buildah image store is under /var/cache)
or a Docker daemon.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time

import pytest

pytestmark = [pytest.mark.host, pytest.mark.image]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The user the container runs as when the tests run as root (as in CI): not
# root, and not any user of the image, so ownership proves --user worked.
CALLER = (os.getuid(), os.getgid()) if os.getuid() != 0 else (4321, 4321)


@pytest.fixture(scope="module")
def cpu_image() -> str:
    started = time.time()
    done = subprocess.run([os.path.join(ROOT, "scripts", "build-image"), "cpu"], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, check=False)
    print(f"scripts/build-image cpu: {time.time() - started:.0f}s\n{done.stderr[-3000:]}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "caffe-ft:cpu"
    return "cpu"


def run_image(folder: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(ROOT, "scripts", "run-image"), *args], cwd=folder,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True, check=False,
                          env=dict(os.environ, CAFFE_FT_RUN_USER=f"{CALLER[0]}:{CALLER[1]}"))


def owned_folder(path: str) -> str:
    os.makedirs(path)
    if os.getuid() == 0:
        os.chown(path, *CALLER)
    return path


def test_doctor_in_the_cpu_image(cpu_image, tmp_path):
    folder = owned_folder(str(tmp_path / "work"))
    done = run_image(folder, cpu_image, "doctor", "--engine", "pycaffe", "--json")
    assert done.returncode == 0, done.stdout
    report = json.loads(done.stdout)
    checks = {check["name"]: check for check in report["checks"]}
    assert report["can_run"] and report["engines"] == [
        {"engine": "pycaffe", "can_run": True, "devices": "CPU", "reason": ""}]
    assert checks["pycaffe"]["ok"] and "CPU-only build" in checks["pycaffe"]["detail"]
    assert checks["pycaffe"]["detail"].startswith("Caffe 1.0.0,")
    assert checks["disk"]["detail"].endswith(f"free in {folder}")
    # torch is not in the Caffe image
    torch = run_image(folder, cpu_image, "doctor", "--engine", "torch")
    assert torch.returncode == 1 and "MISSING torch" in torch.stdout, torch.stdout


def test_finetune_in_the_cpu_image_on_a_mounted_folder(cpu_image, tmp_path):
    folder = owned_folder(str(tmp_path / "work"))
    shutil.copytree(os.path.join(ROOT, "examples", "digits"), os.path.join(folder, "digits"))
    if os.getuid() == 0:
        for path in (os.path.join(folder, "digits"), *(os.path.join(folder, "digits", f)
                                                       for f in os.listdir(os.path.join(folder, "digits")))):
            os.chown(path, *CALLER)
    started = time.time()
    done = run_image(folder, "--exec", cpu_image, "python3", "digits/demo.py", "--outdir", "out",
                     "--per-class", "10", "--iters", "40")
    print(f"digits demo in the image: {time.time() - started:.0f}s\n{done.stdout[-2000:]}")
    assert done.returncode == 0, done.stdout[-3000:]
    out = os.path.join(folder, "out")
    for strategy in ("last-fc", "top", "full"):
        job = os.path.join(out, f"finetune-{strategy}")
        names = set(os.listdir(job))
        assert {"train_val.prototxt", "solver.prototxt", "metrics.jsonl", "summary.md", "deploy.prototxt"} <= names, names
        assert "final.caffemodel" in names, names
        # The job's files name paths that hold on the host (absolute: the folder
        # is mounted at its own path; or relative to the job's folder).
        with open(os.path.join(job, "train_val.prototxt")) as handle:
            sources = re.findall(r'source: "([^"]+)"', handle.read())
        assert sources and os.path.normpath(os.path.join(job, sources[0])) == os.path.join(out, "finetune_train.txt")
        with open(os.path.join(out, "finetune_train.txt")) as handle:
            first_image = handle.readline().split()[0]
        first_image = os.path.normpath(os.path.join(out, first_image))  # as is when absolute
        assert first_image.startswith(out + "/images/") and os.path.isfile(first_image)
    # Everything the container wrote belongs to the caller, nothing to root.
    owners = {(os.lstat(os.path.join(top, name)).st_uid, os.lstat(os.path.join(top, name)).st_gid)
              for top, dirs, files in os.walk(out) for name in dirs + files}
    assert owners == {CALLER}
    assert "fine-tune: last-fc" in done.stdout and "validation accuracy on digits 5-9" in done.stdout
