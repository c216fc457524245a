"""``caffe-ft doctor``: what this machine can train with, checked against what
is really installed -- on the host (no pycaffe; torch when the venv has it)
and in the reference environment (Debian's CPU-only Caffe 1.0)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import pytest

from caffe_ft.cli import main
from caffe_ft.training.devices import count_gpus
from caffe_ft.training.doctor import diagnose, parse_archs, supports
from conftest import cli_runner


def doctor(*args: str):
    result = cli_runner().invoke(main, ["doctor", *args])
    return result.exit_code, result.stdout


def test_architectures_cover_a_gpu():
    binary, ptx = parse_archs("60 61 70 75 80 86 89 90 100 120;120")
    assert (binary, ptx) == ([60, 61, 70, 75, 80, 86, 89, 90, 100, 120], [120])
    assert supports((8, 9), [80, 86], [])            # sm_86 code runs on 8.9
    assert not supports((9, 0), [80, 86], [])        # no code of major 9, no PTX
    assert not supports((8, 0), [86], [])            # 8.6 code does not run on 8.0
    assert supports((12, 1), [90], [120])            # the driver compiles PTX 12.0 for 12.1
    assert not supports((7, 5), [80], [80])


def test_gpu_and_disk_lines_say_what_is_here(tmp_path):
    report = diagnose("pycaffe", directory=str(tmp_path))
    checks = {check.name: check for check in report.checks}
    if shutil.which("nvidia-smi") is None:
        assert not checks["gpu"].ok and checks["gpu"].detail == "no NVIDIA GPU visible (no nvidia-smi)"
        assert "docker run --gpus all" in checks["gpu"].fix
    else:
        assert checks["gpu"].ok == (count_gpus() > 0)
    free = shutil.disk_usage(str(tmp_path)).free / 1024 ** 3
    shown = float(checks["disk"].detail.split()[0])
    assert abs(shown - free) < 0.5 and checks["disk"].detail.endswith(f"free in {tmp_path}")
    assert report.can_run == any(status.can_run for status in report.engines)


@pytest.mark.host
def test_doctor_on_the_host_without_pycaffe():
    assert importlib.util.find_spec("caffe") is None
    code, out = doctor("--engine", "pycaffe")
    assert code == 1
    assert "MISSING pycaffe  not installed ('import caffe' finds nothing)\n" in out
    assert "fix: install Caffe's Python module" in out
    assert out.endswith("engine pycaffe: cannot train: pycaffe is not installed\n")
    # torch: whatever this venv has, doctor says so
    code, out = doctor("--engine", "torch", "--json")
    report = json.loads(out)
    torch_check = next(check for check in report["checks"] if check["name"] == "torch")
    if importlib.util.find_spec("torch") is None:
        assert code == 1 and not torch_check["ok"] and torch_check["fix"] == "pip install 'caffe-ft[torch]'"
    else:
        from importlib.metadata import version

        assert code == 0 and torch_check["ok"] and torch_check["detail"].startswith(f"torch {version('torch')}, ")
    # auto: fails only when neither engine can train
    code, _ = doctor()
    assert code == (0 if importlib.util.find_spec("torch") else 1)


@pytest.mark.caffe
def test_doctor_in_the_reference_environment():
    code, out = doctor("--engine", "pycaffe")
    assert code == 0, out
    import caffe_ft.training.devices as devices

    (extension,) = devices.pycaffe_extensions()
    package = os.path.dirname(extension)
    assert f"OK      pycaffe  Caffe 1.0.0, CPU-only build, {package}/__init__.py\n" in out
    assert "engine pycaffe: can train (CPU)" in out
    assert "nccl" not in out  # a CPU build: NCCL does not apply
    code, out = doctor("--engine", "pycaffe", "--json")
    report = json.loads(out)
    assert code == 0 and report["can_run"] and report["engine"] == "pycaffe"
    assert report["engines"] == [{"engine": "pycaffe", "can_run": True, "devices": "CPU", "reason": ""}]
