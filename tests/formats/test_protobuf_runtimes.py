"""caffe-ft on the protobuf runtimes between the two the suite runs on.

The reference root runs protobuf 3.12 (C++), the host the newest (upb).  In
between lie runtimes whose internals differ: caffe-ft builds its message
classes from upb's own module where it can (formats.schema), and upb 4.21
frees a message class nothing holds, then crashes on the messages of its
type.  Each case installs one runtime into a folder of its own and runs the
format, CLI and net tests against it in a child process.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.host

#: (pip requirement, implementation): the first upb release, a 5.x one, and the
#: host's own protobuf through its pure-Python implementation.
RUNTIMES = [("protobuf==4.21.12", "upb"), ("protobuf==5.29.5", "upb"), (None, "python")]
TESTS = ["tests/formats/test_schema.py", "tests/formats/test_caffemodel.py", "tests/formats/test_prototext.py",
         "tests/test_console.py", "tests/test_cli.py"]


@pytest.mark.parametrize("requirement, implementation", RUNTIMES,
                         ids=[f"{req or 'installed'}-{impl}" for req, impl in RUNTIMES])
def test_caffe_ft_runs_on_the_runtime(tmp_path, requirement, implementation):
    env = dict(os.environ, PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=implementation,
               CAFFE_FT_CACHE=str(tmp_path / "cache"))
    if requirement is not None:
        target = tmp_path / "site"
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                        requirement], check=True, capture_output=True)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(target), env.get("PYTHONPATH")]))
    probe = subprocess.run(
        [sys.executable, "-c", "import google.protobuf as p; from google.protobuf.internal import "
         "api_implementation as a; print(p.__version__, a.Type())"],
        env=env, capture_output=True, text=True, check=True)
    version, runtime = probe.stdout.split()
    if requirement is not None:
        assert version == requirement.split("==")[1]
    assert runtime == implementation
    # The pure-Python runtime refuses a proto2 string that is not UTF-8, which
    # Caffe and the C runtimes read: test_console's Latin-1 caffemodel.  That
    # case is run below for the error it gets instead.
    latin1 = ["-k", "not args3 and not do_not_import_click"] if implementation == "python" else []
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not caffe",
                          *latin1, *TESTS], cwd=REPO, env=env, capture_output=True, text=True)
    assert run.returncode == 0, f"protobuf {version} ({runtime}):\n{run.stdout[-3000:]}{run.stderr[-2000:]}"
    if implementation == "python":
        model = tmp_path / "latin1.caffemodel"
        model.write_bytes(b"\n\x04caf\xe9" + b"\xa2\x06\x09\n\x01x\x12\x04ReLU")  # name b"caf\xe9", a ReLU layer
        done = subprocess.run([sys.executable, "-m", "caffe_ft.cli", "inspect", str(model)], env=env,
                              capture_output=True, text=True)
        assert done.returncode == 2
        assert "caffe.NetParameter.name is not UTF-8, which protobuf's pure-Python runtime refuses" in done.stderr
