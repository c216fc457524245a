"""``caffe-ft finetune --engine torch`` on the demo's digits task, without Caffe.

The digits net is pretrained on 0-4 by ``caffe-ft train --engine torch``, then
fine-tuned on 5-9 (``--strategy top --class-weights auto``: the solver runs on
the torch engine, its loss an InfogainLoss; the report evaluates through the engine).  pycaffe, in the reference environment, loads the
final caffemodel into the deploy net and computes what the torch engine
computes from it, within 1e-4 relative.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import cli_runner  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "training"))
from torch_parity import REPO, relative_error  # noqa: E402

pytestmark = pytest.mark.host

DIGITS = os.path.join(REPO, "examples", "digits")
PYCAFFE = """
import sys, numpy as np, caffe
from caffe_ft import api
caffe.set_mode_cpu()
net = caffe.Net(sys.argv[1], caffe.TEST, weights=sys.argv[2])
data = np.load(sys.argv[3])["data"]
net.blobs["data"].reshape(*data.shape)
net.blobs["data"].data[...] = data
out = net.forward()
np.savez(sys.argv[4], **{name: value.copy() for name, value in out.items()})
api.evaluate(sys.argv[5], sys.argv[2], sys.argv[6], top_k=(1,), root_folder=sys.argv[7], save_predictions=sys.argv[8],
             engine="pycaffe")
"""


def test_finetune_with_the_torch_engine_ends_with_a_caffemodel_pycaffe_runs(tmp_path, monkeypatch,  # type: ignore[no-untyped-def]
                                                                           schema) -> None:
    import torch

    sys.path.insert(0, DIGITS)
    import demo

    from caffe_ft.cli import main
    from caffe_ft.formats.caffemodel import load_model
    from caffe_ft.formats.files import load_net
    from caffe_ft.training.torch.net import CaffeNet

    monkeypatch.chdir(tmp_path)
    lists = demo.write_images(str(tmp_path), 8, relative=True)
    for name, count in (("finetune_val", 60), ("pretrain_val", 40), ("pretrain_train", 160)):  # a short run
        with open(lists[name]) as handle:
            kept = handle.readlines()[:count]
        with open(lists[name], "w") as handle:
            handle.writelines(kept)
    runner = cli_runner()
    common = ["--num-classes", "5", "--batch-size", "16", "--val-batch-size", "20", "--force",
              "--solver", os.path.join(DIGITS, "solver.prototxt"), "--lr-scale", "1"]
    done = runner.invoke(main, ["rewrite", os.path.join(DIGITS, "train_val.prototxt"), "--strategy", "full",
                                "--new-name", "fc2", "--head-lr-mult", "1", "--max-iter", "20", *common,
                                "--train-data", lists["pretrain_train"], "--val-data", lists["pretrain_val"],
                                "-o", "pretrain"])
    assert done.exit_code == 0, done.output
    done = runner.invoke(main, ["train", "pretrain/solver.prototxt", "--cpu", "--engine", "torch"])
    assert done.exit_code == 0, done.output
    weights = "pretrain/digitsnet_iter_20.caffemodel"
    from caffe_ft.data import preflight

    checked = []  # the lists pre-flighted: by finetune before it writes OUTDIR, not again by the engine
    real_check = preflight.check_list
    monkeypatch.setattr(preflight, "check_list", lambda check: checked.append(check.source) or real_check(check))
    done = runner.invoke(main, ["finetune", "pretrain/train_val.prototxt", "--weights", weights, "--strategy", "top",
                                "--train-last", "2", "--max-iter", "6", "--cpu", *common, "--train-data",
                                lists["finetune_train"], "--val-data", lists["finetune_val"], "-o", "ft",
                                "--class-weights", "auto", "--engine", "torch"])
    assert done.exit_code == 0, done.output
    assert sorted(map(os.path.abspath, checked)) == sorted(os.path.abspath(lists[name])
                                                          for name in ("finetune_train", "finetune_val"))
    # --class-weights made the loss an InfogainLoss reading its H from OUTDIR, which the engine trains.
    assert 'type: "InfogainLoss"' in (tmp_path / "ft" / "train_val.prototxt").read_text()
    final = tmp_path / "ft" / "final.caffemodel"
    assert final.exists()
    report = json.loads((tmp_path / "ft" / "report.json").read_text())
    assert report["settings"]["engine"] == "torch"
    assert report["evaluation"]["count"] == 60  # evaluated through the torch engine, no pycaffe here
    # Fine-tuning moved the weights the pretraining gave the kept layers.
    tuned, start = load_model(str(final), schema).layer_blobs(), load_model(weights, schema).layer_blobs()
    assert not np.array_equal(np.asarray(tuned["fc1"][0].data), np.asarray(start["fc1"][0].data))

    data = np.random.default_rng(0).normal(0, 1, (4, 1, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "input.npz", data=data)
    deploy = str(tmp_path / "ft" / "deploy.prototxt")
    # `caffe-ft evaluate --engine torch` here, pycaffe's evaluate there, over the same images.
    train_val, root = str(tmp_path / "ft" / "train_val.prototxt"), str(tmp_path) + "/"
    val = str(tmp_path / lists["finetune_val"])
    evaluated = runner.invoke(main, ["evaluate", train_val, "--weights", str(final), "--data", val, "--root-folder",
                                     root, "--top-k", "1", "--predictions", "torch_pred.npz", "--engine", "torch",
                                     "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    ran = subprocess.run([os.path.join(REPO, "scripts", "caffe-env"), "run", "--", "python3", "-c", PYCAFFE, deploy,
                          str(final), str(tmp_path / "input.npz"), str(tmp_path / "pycaffe.npz"), train_val,
                          val, root, str(tmp_path / "pycaffe_pred.npz")],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    assert ran.returncode == 0, ran.stdout[-3000:]
    net = CaffeNet(load_net(deploy, schema), "TEST", input_shapes={"data": data.shape})
    net.load_blobs(load_model(str(final), schema).layer_blobs(), strict=True)
    with torch.no_grad():
        ours = net({"data": torch.from_numpy(data)})
    with np.load(tmp_path / "pycaffe.npz") as theirs:
        assert set(theirs.files) == set(net.output_names)
        for name in theirs.files:
            assert relative_error(ours[name].numpy(), theirs[name]) < 1e-4, name
            assert np.std(theirs[name]) > 0
    with np.load(tmp_path / "torch_pred.npz") as ours_pred, np.load(tmp_path / "pycaffe_pred.npz") as theirs_pred:
        assert set(ours_pred.files) == set(theirs_pred.files)
        for name in ("probs", "labels", "sources"):
            if theirs_pred[name].dtype.kind == "f":
                assert relative_error(ours_pred[name], theirs_pred[name]) < 1e-4, name
            else:
                assert np.array_equal(ours_pred[name], theirs_pred[name]), name
    assert json.loads(evaluated.stdout)["count"] == 60
