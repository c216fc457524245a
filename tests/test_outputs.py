"""The output policy: inputs are never overwritten, multi-file outputs are all
or nothing, concurrent runs and killed runs are handled, symlinks are
followed, and every failure to write is one line naming the path.

Failures are real ones: a file-size limit (``RLIMIT_FSIZE``) in a child
process makes the kernel refuse a write half way, a real ``flock`` held by
the test stands for a concurrent run, and a child killed with SIGKILL while
it writes leaves the leftovers the next run must clean up.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from caffe_ft.cli import main
from caffe_ft.formats import files
from caffe_ft.formats.caffemodel import Blob, Model, save_model
from caffe_ft.formats.schema import load_schema
from conftest import cli_runner

GOLDEN = os.path.join(os.path.dirname(__file__), "recipe", "golden", "rewrite", "digits-full")
REWRITE_ARGS = ["--strategy", "full", "--num-classes", "3", "--new-name", "scores"]
OUTPUTS = ("deploy.prototxt", "solver.prototxt", "summary.md", "train_val.prototxt")

NET = """name: "small"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc"
        inner_product_param { num_output: 4 weight_filler { type: "xavier" } } }
"""


def run(*args: str):  # type: ignore[no-untyped-def]
    return cli_runner().invoke(main, list(args))


def one_line_error(result) -> str:  # type: ignore[no-untyped-def]
    """The error of a failed command, checked to be one ``caffe-ft: error:`` line and exit 2."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.stderr)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("caffe-ft: error: "), result.stderr
    return lines[0]


@pytest.fixture
def work(tmp_path):  # type: ignore[no-untyped-def]
    """A folder with a digits net and solver (the golden case's inputs)."""
    for name in ("train_val.prototxt", "solver.prototxt"):
        shutil.copy(os.path.join(GOLDEN, name), tmp_path / name)
    return tmp_path


@pytest.fixture
def small(tmp_path):  # type: ignore[no-untyped-def]
    """A tiny net and a caffemodel for it."""
    net = tmp_path / "net.prototxt"
    net.write_text(NET)
    schema = load_schema()
    model_net = schema.new("NetParameter")
    layer = model_net.layer.add()
    layer.name, layer.type = "fc", "InnerProduct"
    weights = tmp_path / "w.caffemodel"
    data = np.arange(4 * 3 * 8 * 8, dtype=np.float32).reshape(4, 192) / 1000
    save_model(Model(model_net, [[Blob.of(data), Blob.of(np.zeros(4, np.float32))]]), str(weights))
    return str(net), str(weights)


def snapshot(folder) -> dict:  # type: ignore[no-untyped-def]
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def rewrite(work, outdir: str, *extra: str, cwd=None):  # type: ignore[no-untyped-def]
    return run("rewrite", str(work / "train_val.prototxt"), "--solver", str(work / "solver.prototxt"),
               *REWRITE_ARGS, "-o", outdir, *extra)


# ----------------------------------------------------------- class 1: inputs --


def test_init_never_overwrites_its_net_and_needs_force_for_an_existing_output(small, tmp_path):
    net, weights = small
    before = open(net, "rb").read()
    assert "names an input" in one_line_error(run("init", net, "--weights", weights, "-o", net))
    assert open(net, "rb").read() == before
    assert "names an input" in one_line_error(run("init", net, "--weights", weights, "-o", weights, "--force"))
    assert "use --in-place to overwrite it" in one_line_error(run("upgrade", weights, "-o", weights, "--force"))
    # A hard link to the net is the same file by inode.
    link = str(tmp_path / "hard.prototxt")
    os.link(net, link)
    assert "names an input" in one_line_error(run("init", net, "--weights", weights, "-o", link, "--force"))
    out = str(tmp_path / "out.caffemodel")
    assert run("init", net, "--weights", weights, "-o", out).exit_code == 0
    assert "--force" in one_line_error(run("init", net, "--weights", weights, "-o", out))
    assert run("init", net, "--weights", weights, "-o", out, "--force").exit_code == 0


def test_features_train_and_plot_refuse_to_write_over_inputs(small, tmp_path):
    net, weights = small
    listing = tmp_path / "list.txt"
    listing.write_text("a.png 0\n")
    before = {path: open(path, "rb").read() for path in (net, weights, str(listing))}
    for target in (net, weights, str(listing)):
        result = run("features", net, "--weights", weights, "--data", str(listing), "-o", target)
        assert "names an input" in one_line_error(result)
    solver = tmp_path / "solver.prototxt"
    solver.write_text(f'net: "{net}"\nbase_lr: 0.1\nmax_iter: 1\nlr_policy: "fixed"\n')
    before[str(solver)] = solver.read_bytes()
    for option, target in (("--metrics", str(solver)), ("--plot", net), ("--plot", weights)):
        result = run("train", str(solver), "--weights", weights, option, target)
        assert "names an input" in one_line_error(result), option
    metrics = tmp_path / "m.jsonl"
    metrics.write_text('{"iter": 0, "loss": 1.0, "lr": 0.1}\n')
    assert "names an input" in one_line_error(run("plot", str(metrics), "-o", str(metrics)))
    assert "names an input" in one_line_error(run("train", str(solver), "--metrics", str(metrics),
                                                  "--plot", str(metrics)))
    for path, data in before.items():
        assert open(path, "rb").read() == data, path


def test_rewrite_refuses_an_outdir_holding_its_inputs_even_with_force(work):
    before = snapshot(work)
    result = rewrite(work, str(work), "--force")
    assert "names an input" in one_line_error(result)
    assert snapshot(work) == before


# ------------------------------------------------- class 2: all or nothing --


def _rewrite_in_child(work, outdir: str, fsize_limit: int) -> subprocess.CompletedProcess:  # type: ignore[no-untyped-def]
    """``caffe-ft rewrite`` in a child process whose files may not grow past ``fsize_limit`` bytes."""
    code = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, ({fsize_limit}, {fsize_limit}))
        from caffe_ft.cli import main
        sys.argv = ["caffe-ft"] + sys.argv[1:]
        main()
    """)
    args = ["rewrite", str(work / "train_val.prototxt"), "--solver", str(work / "solver.prototxt"),
            *REWRITE_ARGS, "-o", outdir, "--force"]
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


def test_rewrite_that_fails_half_way_leaves_the_previous_state(work):
    out = work / "out"
    assert rewrite(work, str(out)).exit_code == 0
    before = snapshot(out)
    # Between the deploy/solver size and the train_val size: the kernel refuses
    # train_val half way, after deploy and solver were written (they come first).
    sizes = sorted(len(data) for data in before.values())
    limit = (len(before["deploy.prototxt"]) + len(before["train_val.prototxt"])) // 2
    assert len(before["deploy.prototxt"]) < limit < len(before["train_val.prototxt"]), sizes
    (work / "train_val.prototxt").write_text(
        (work / "train_val.prototxt").read_text().replace("# ", "# edited ", 1))
    child = _rewrite_in_child(work, str(out), limit)
    assert child.returncode == 2, child.stderr
    lines = child.stderr.strip().splitlines()
    assert len(lines) == 1 and "File too large" in lines[0] and "train_val.prototxt" in lines[0], child.stderr
    assert snapshot(out) == before  # no file of the failed run, no leftovers
    # The rerun, with room, is not refused as "exists" by a half-written state.
    assert rewrite(work, str(out), "--force").exit_code == 0


def test_a_concurrent_rewrite_fails_clearly(work):
    out = work / "out"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what a live rewrite into ``out`` holds
        assert "another caffe-ft run" in one_line_error(rewrite(work, str(out)))
        assert os.listdir(out) == []
    finally:
        os.close(fd)
    assert rewrite(work, str(out)).exit_code == 0
    assert sorted(os.listdir(out)) == list(OUTPUTS)


def test_leftovers_of_a_killed_run_are_removed_and_a_live_ones_kept(work, tmp_path):
    out = work / "out"
    out.mkdir()
    # A writer killed with SIGKILL while it holds a staging folder and a temp file.
    code = textwrap.dedent(f"""
        import os, sys, time
        from caffe_ft.formats import files
        with files.staged_outputs({str(out)!r}, ["a.txt"]) as staging:
            staging.write("a.txt", "half")
            with files.atomic_output({str(out / "deploy.prototxt")!r}) as handle:
                handle.write(b"half")
                print("ready", flush=True)
                time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    leftovers = sorted(os.listdir(out))
    assert any(name.startswith(files.STAGE_PREFIX) for name in leftovers)
    assert any(name.startswith(".deploy.prototxt.") and name.endswith(".tmp") for name in leftovers)
    # While it lives, its folder is locked: a rewrite there fails, the single file waits.
    assert "another caffe-ft run" in one_line_error(rewrite(work, str(out)))
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert sorted(os.listdir(out)) == leftovers
    assert rewrite(work, str(out)).exit_code == 0
    assert sorted(os.listdir(out)) == list(OUTPUTS)


# ------------------------------------------- class 3: one line per failure --


def test_an_output_folder_that_cannot_be_created_is_one_line(work, small, tmp_path):
    afile = work / "afile"
    afile.write_text("x")
    message = one_line_error(rewrite(work, str(afile / "sub")))
    assert str(afile) in message
    net, weights = small
    message = one_line_error(run("init", net, "--weights", weights, "-o", str(afile / "sub" / "m.caffemodel")))
    assert "afile" in message
    assert one_line_error(run("upgrade", net, "-o", str(tmp_path / "missing" / "x.prototxt")))


# ---------------------------------------------------- class 7: symlinks --


def test_fmt_in_place_on_a_symlink_formats_the_target(tmp_path):
    target = tmp_path / "real.prototxt"
    target.write_text('name:"x"   layer{name:"a" type:"Input" top:"a"}\n')
    link = tmp_path / "link.prototxt"
    link.symlink_to(target.name)
    assert run("fmt", "--in-place", str(link)).exit_code == 0
    assert link.is_symlink() and os.readlink(link) == target.name
    assert target.read_text().startswith('name: "x"\nlayer {\n')
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


def test_an_output_through_a_symlink_writes_the_links_target(work):
    real = work / "real-out"
    real.mkdir()
    (work / "out").symlink_to(real.name)
    assert rewrite(work, str(work / "out")).exit_code == 0
    assert (work / "out").is_symlink() and sorted(os.listdir(real)) == list(OUTPUTS)


# ------------------------------------------------------------- snapshots --


def test_snapshot_staging_of_a_killed_run_is_removed_and_a_live_ones_kept(tmp_path):
    from caffe_ft.training import snapshots as snap

    prefix = str(tmp_path / "run")
    code = textwrap.dedent(f"""
        import time
        from caffe_ft.training import snapshots as snap
        staging = snap.Staging({prefix!r})
        open(staging.prefix + "_iter_1.caffemodel", "wb").write(b"half")
        print("ready", flush=True)
        time.sleep(60)
    """)
    children = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    for child in children:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    children[0].send_signal(signal.SIGKILL)
    children[0].wait()
    assert len(os.listdir(tmp_path)) == 2
    staging = snap.Staging(prefix)  # the next run: the killed run's folder goes, the live one's stays
    try:
        names = sorted(os.listdir(tmp_path))
        assert len(names) == 2 and os.path.basename(staging.path) in names
    finally:
        children[1].send_signal(signal.SIGKILL)
        children[1].wait()
        staging.remove()


def test_a_snapshot_that_cannot_fit_is_a_clear_error_before_caffe_writes(tmp_path):
    from caffe_ft.errors import CaffeFtError
    from caffe_ft.training import snapshots as snap

    prefix = str(tmp_path / "run")
    staging = snap.Staging(prefix)
    calls = []
    free = shutil.disk_usage(str(tmp_path)).free
    shots = snap.Snapshotter(lambda: calls.append(1), prefix, staging, estimate=free + 2**40)
    shots.checkpoint(5)  # a checkpoint without room is skipped
    with pytest.raises(CaffeFtError, match="no room for the snapshot of iteration 5"):
        shots.save(5)
    assert calls == [] and shots.rolling == []
    staging.remove()
