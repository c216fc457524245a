"""The torch engine's data layers read by worker processes give what reading in one process gives.

One net with an ImageData (shuffled, randomly cropped and mirrored), an LMDB
Data (cropped and mirrored), an HDF5Data (two files, shuffled) and a
WindowData (windows drawn and mirrored at random) layer, each
smaller than a few batches so that they wrap around mid-batch, is read with 0
and with 2 workers: the same batches in the same order, after a resume's skip
and as one rank of two too.  An unreadable image or a record that is no Datum
fails the very batch it fails in one process, with the same one-line error,
and no worker outlives the error, the end of a run or a Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Dict, List

import numpy as np
import pytest

from caffe_ft.errors import CaffeFtError
from conftest import write_datum_lmdb

pytestmark = pytest.mark.host

NET = """
layer { name: "images" type: "ImageData" top: "data" top: "label"
  transform_param { mirror: true crop_size: 10 mean_value: 100 scale: 0.5 }
  image_data_param { source: "images.txt" batch_size: 3 shuffle: true new_height: 14 new_width: 14 } }
layer { name: "records" type: "Data" top: "rdata" top: "rlabel"
  transform_param { mirror: true crop_size: 8 mean_value: 120 mean_value: 110 mean_value: 100 }
  data_param { source: "records_lmdb" batch_size: 2 backend: LMDB } }
layer { name: "h5" type: "HDF5Data" top: "hdata" top: "hlabel"
  hdf5_data_param { source: "h5.txt" batch_size: 4 shuffle: true } }
layer { name: "windows" type: "WindowData" top: "wdata" top: "wlabel"
  transform_param { crop_size: 8 mirror: true mean_value: 90 }
  window_data_param { source: "windows.txt" batch_size: 4 fg_fraction: 0.5 fg_threshold: 0.5 bg_threshold: 0.3 } }
"""
WINDOWS = """# 0
0.png
3 16 18
3
1 0.9 2 3 12 14
2 0.8 0 0 17 15
0 0.1 4 1 15 10
# 1
1.png
3 16 18
2
1 0.7 1 1 9 9
0 0.05 3 2 16 13
"""


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def data(tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    """Seven images, nine LMDB records, two HDF5 files, a window file."""
    import cv2
    import h5py

    from caffe_ft.formats.schema import load_schema

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(3)
    lines = []
    for index in range(7):
        cv2.imwrite(f"{index}.png", rng.integers(0, 256, (16, 18, 3)).astype(np.uint8))
        lines.append(f"{index}.png {index % 3}")
    (tmp_path / "images.txt").write_text("\n".join(lines) + "\n")
    schema = load_schema()
    write_datum_lmdb("records_lmdb", schema, ((3, 12, 11, rng.integers(0, 256, 3 * 12 * 11).astype(np.uint8).tobytes(),
                                               index % 2) for index in range(9)))
    for name, rows in (("a.h5", range(0, 5)), ("b.h5", range(5, 11))):
        with h5py.File(name, "w") as handle:
            handle.create_dataset("hdata", data=np.asarray([[r, -r, 2 * r] for r in rows], np.float32))
            handle.create_dataset("hlabel", data=np.asarray(list(rows), np.float32))
    (tmp_path / "h5.txt").write_text("a.h5\nb.h5\n")
    (tmp_path / "windows.txt").write_text(WINDOWS)
    return tmp_path


def _layers(schema, text: str = NET):  # type: ignore[no-untyped-def]
    from caffe_ft.formats import prototext

    return list(prototext.to_message(prototext.parse(text.encode()), schema.new("NetParameter")).layer)


def _read(schema, workers: int, skip: int, count: int, rank: int = 0, world: int = 1,
          layers=None) -> List[Dict[str, np.ndarray]]:  # type: ignore[no-untyped-def]
    from caffe_ft.training.torch.feed import NetFeeder

    feeder = NetFeeder(layers or _layers(schema), schema, "TRAIN", seed=4, rank=rank, world=world, workers=workers)
    try:
        feeder.skip(skip)
        # A batch's arrays are ours until the next one (with workers, views of a slot then filled again).
        batches = [{top: array.copy() for top, array in feeder.next().items()} for _ in range(count)]
        if workers:
            # The later batches came through shared memory, the first ones pickled: both ways were taken.
            assert feeder.pool is not None and all(slot is not None for slot in feeder.pool.slots[0])
        return batches
    finally:
        feeder.close()


@pytest.mark.parametrize("skip, rank, world", [(0, 0, 1), (3, 1, 2)])
def test_two_workers_give_the_batches_of_one_process(data, schema, skip: int, rank: int, world: int) -> None:  # type: ignore[no-untyped-def]
    here = _read(schema, 0, skip, 7, rank, world)
    pooled = _read(schema, 2, skip, 7, rank, world)
    assert [sorted(batch) for batch in pooled] == [sorted(["data", "label", "rdata", "rlabel", "hdata",
                                                           "hlabel", "wdata", "wlabel"])] * 7
    for index, (ours, theirs) in enumerate(zip(pooled, here)):
        for top in theirs:
            assert ours[top].dtype == theirs[top].dtype and ours[top].shape == theirs[top].shape, (index, top)
            np.testing.assert_array_equal(ours[top], theirs[top], err_msg=f"batch {index}, {top}")
    # The comparison could fail: shuffles, crops and mirrors make every batch different.
    for top in ("data", "rdata", "hlabel", "wdata"):
        assert not any(np.array_equal(here[i][top], here[i + 1][top]) for i in range(6)), top
    # The HDF5 rows come whole.
    assert all(np.array_equal(batch["hdata"][:, 0], batch["hlabel"]) for batch in pooled)


def test_a_skipped_resume_reads_on_where_reading_in_turn_was(data, schema) -> None:  # type: ignore[no-untyped-def]
    """``skip`` before the workers start (they skip by themselves) and after (read and dropped) agree."""
    from caffe_ft.training.torch.feed import NetFeeder

    straight = _read(schema, 0, 0, 6)
    feeder = NetFeeder(_layers(schema), schema, "TRAIN", seed=4, workers=2)
    try:
        feeder.skip(2)
        first = {top: array.copy() for top, array in feeder.next().items()}
        feeder.skip(2)
        rest = [feeder.next()]
    finally:
        feeder.close()
    for ours, theirs in zip([first, *rest], [straight[2], straight[5]]):
        for top in theirs:
            np.testing.assert_array_equal(ours[top], theirs[top])


def _first_error(schema, layers, workers: int):  # type: ignore[no-untyped-def]
    """How many batches come before the error, the error, and the workers' process ids."""
    from caffe_ft.training.torch.feed import NetFeeder

    feeder = NetFeeder(layers, schema, "TRAIN", seed=4, workers=workers)
    good = 0
    try:
        with pytest.raises(CaffeFtError) as caught:
            for _ in range(20):
                feeder.next()
                good += 1
        pids = feeder.pool.pids if feeder.pool is not None else []
    finally:
        feeder.close()
    return good, str(caught.value), pids


def test_an_error_in_a_worker_fails_its_own_batch_in_one_line_and_stops_the_workers(data, schema) -> None:  # type: ignore[no-untyped-def]
    import lmdb

    (data / "4.png").write_bytes(b"not an image")
    env = lmdb.open("records_lmdb", map_size=1 << 22)
    with env.begin(write=True) as txn:
        txn.put(b"00000006", b"\xff\xff not a Datum")
    env.close()
    net = _layers(schema)
    for layers, expected in (([net[0]], "4.png: cannot read this image"),
                             ([net[1]], "records_lmdb record '00000006': not a Datum record")):
        good, message, _ = _first_error(schema, layers, 0)
        assert good >= 1 and message.startswith(expected), message  # not the first batch: "early" would show
        pooled_good, pooled_message, pids = _first_error(schema, layers, 2)
        assert (pooled_good, pooled_message) == (good, message)
        assert "\n" not in message
        # The error closed the pool: no worker is left.
        assert not any(_alive(pid) for pid in pids), pids


def test_no_worker_outlives_a_run_or_its_end(data, schema) -> None:  # type: ignore[no-untyped-def]
    import multiprocessing

    from caffe_ft.training.torch.feed import DEPTH, NetFeeder

    feeder = NetFeeder(_layers(schema), schema, "TRAIN", workers=2)
    feeder.next()
    assert feeder.pool is not None
    pids = feeder.pool.pids
    assert len(pids) == 2 and all(_alive(pid) for pid in pids)
    for _ in range(2 * DEPTH):
        feeder.next()  # past the workers' first batches, which come pickled while their slots are sized
    held = feeder.next()
    assert not held["data"].flags.owndata  # a view of a slot
    kept = {top: array.copy() for top, array in held.items()}
    feeder.close()
    for top, array in kept.items():  # a batch kept past the end keeps its memory, not a dangling view
        np.testing.assert_array_equal(held[top], array)
    feeder.close()  # again: nothing
    assert not any(_alive(pid) for pid in pids)
    # A feeder nobody closes stops its workers when collected.
    forgotten = NetFeeder(_layers(schema), schema, "TRAIN", workers=1)
    forgotten.next()
    assert forgotten.pool is not None
    pids = forgotten.pool.pids
    del forgotten
    import gc

    gc.collect()
    assert not any(_alive(pid) for pid in pids)
    assert multiprocessing.active_children() == []


TRAIN_NET = """
name: "small"
layer { name: "data" type: "ImageData" top: "data" top: "label"
  transform_param { mirror: true crop_size: 12 scale: 0.02 }
  image_data_param { source: "images.txt" batch_size: 4 shuffle: true new_height: 14 new_width: 14 } }
layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc" bottom: "label" top: "loss" }
"""


def _children(pid: int) -> List[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as handle:
            found += [int(word) for word in handle.read().split()]
    return found


def _is_worker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return b"spawn_main" in handle.read()
    except FileNotFoundError:
        return False


def test_ctrl_c_stops_the_run_and_its_workers(data) -> None:  # type: ignore[no-untyped-def]
    """Ctrl-C reaches the whole process group: the workers ignore it, the run snapshots and stops them."""
    (data / "net.prototxt").write_text(TRAIN_NET)
    (data / "solver.prototxt").write_text('net: "net.prototxt" base_lr: 0.01 lr_policy: "fixed" max_iter: 1000000 '
                                          'display: 0 snapshot_prefix: "small" solver_mode: CPU\n')
    script = "import sys; from caffe_ft.cli import main; sys.exit(main())"
    command = [sys.executable, "-c", script, "train", "solver.prototxt", "--engine", "torch", "--cpu",
               "--data-workers", "2", "--metrics", "metrics.jsonl"]
    with open("stderr.txt", "w") as err:
        run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        workers: List[int] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and run.poll() is None:
            workers = [pid for pid in _children(run.pid) if _is_worker(pid)]
            trained = os.path.exists("metrics.jsonl") and os.path.getsize("metrics.jsonl") > 0
            if len(workers) == 2 and trained:
                break
            time.sleep(0.2)
        assert len(workers) == 2, (data / "stderr.txt").read_text()[-2000:]
        os.killpg(run.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        code = run.wait(60)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    stderr = (data / "stderr.txt").read_text()
    assert code == 128 + signal.SIGINT, stderr[-2000:]
    assert "resume with:" in stderr and "--data-workers 2" in stderr and "Traceback" not in stderr, stderr[-2000:]
    assert not any(_alive(pid) for pid in workers)


def test_cli_data_workers_train_to_the_model_of_reading_in_one_process(data, schema) -> None:  # type: ignore[no-untyped-def]
    """``--data-workers 2`` and ``--data-workers 0`` train to the same weights; no worker is left after."""
    import multiprocessing

    from conftest import cli_runner

    from caffe_ft.cli import main
    from caffe_ft.formats.caffemodel import load_model

    (data / "net.prototxt").write_text(TRAIN_NET)
    (data / "solver.prototxt").write_text('net: "net.prototxt" base_lr: 0.05 momentum: 0.9 lr_policy: "fixed" '
                                          'max_iter: 6 display: 0 snapshot_prefix: "small" solver_mode: CPU\n')
    weights = []
    for workers in ("0", "2"):
        result = cli_runner().invoke(main, ["train", "solver.prototxt", "--engine", "torch", "--cpu",
                                            "--data-workers", workers])
        assert result.exit_code == 0, result.stderr
        assert ("data read in this process" if workers == "0" else "2 data worker processes per net") in result.stderr
        weights.append(load_model("small_iter_6.caffemodel", schema).layer_blobs()["fc"][0].data)
        assert multiprocessing.active_children() == []
    np.testing.assert_array_equal(weights[0], weights[1])
    refused = cli_runner().invoke(main, ["train", "solver.prototxt", "--engine", "pycaffe", "--data-workers", "2"])
    assert refused.exit_code == 2 and "--data-workers need --engine torch" in refused.stderr
    refused = cli_runner().invoke(main, ["finetune", "net.prototxt", "--weights", "small_iter_6.caffemodel",
                                         "--engine", "pycaffe", "--data-workers", "2"])
    assert refused.exit_code == 2 and "--data-workers needs --engine torch" in refused.stderr


def test_root_folder_is_joined_as_caffe_joins_it(data, schema) -> None:  # type: ignore[no-untyped-def]
    """Caffe prefixes root_folder as a string: 'im' + 'ages/0.png' is images/0.png,
    and the torch engine reads what Caffe reads (no '/' put in between)."""
    import cv2

    os.mkdir("images")
    for index in range(2):
        os.rename(f"{index}.png", f"images/{index}.png")
    (data / "split.txt").write_text("ages/0.png 0\nages/1.png 1\n")
    text = ('layer { name: "images" type: "ImageData" top: "data" top: "label" image_data_param { '
            'source: "split.txt" root_folder: "im" batch_size: 2 } }')
    batch = _read(schema, 0, 0, 1, layers=_layers(schema, text))[0]
    expected = np.stack([cv2.imread(f"images/{index}.png").transpose(2, 0, 1) for index in range(2)])
    np.testing.assert_array_equal(batch["data"], expected.astype(np.float32))
