"""``--layer-decay F``: graded lr_mult from the heads down (:func:`caffe_ft.recipe.strategies.layer_decay`).

Pure checks on the digits net, a residual net (a block is one step) and
``top`` (frozen layers stay frozen); then real Caffe takes one SGD step with
and without the decay from the same weights: each layer's update shrinks by
exactly its factor.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from netcheck import check_net  # noqa: E402
from ft_nets import RESNET  # noqa: E402

from caffe_ft.errors import CaffeFtError  # noqa: E402
from caffe_ft.formats import prototext  # noqa: E402
from caffe_ft.net import graph  # noqa: E402
from caffe_ft.recipe.strategies import StrategyOptions, apply_strategy  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DIGITS = (REPO / "examples" / "digits" / "train_val.prototxt").read_text()


def lr_mults(net, name):  # type: ignore[no-untyped-def]
    return [round(p.lr_mult, 6) for p in net.layer[graph.layer_index(net, name)].param]


def test_each_layer_down_from_the_head_learns_f_times_slower(parse_net) -> None:  # type: ignore[no-untyped-def]
    plain = apply_strategy("full", parse_net(DIGITS), StrategyOptions(num_classes=3)).net
    decayed = apply_strategy("full", parse_net(DIGITS), StrategyOptions(num_classes=3, layer_decay=0.5))
    assert check_net(decayed.net) == []
    for name, step in (("fc2_ft", 0), ("fc1", 1), ("conv2", 2), ("conv1", 3)):
        assert lr_mults(decayed.net, name) == [m * 0.5 ** step for m in lr_mults(plain, name)], name
    assert "x 0.5 per layer down from the heads, 3 step(s), the lowest x 0.125 (conv1)" in decayed.notes[-1]
    # decay_mult is kept, and F = 1 changes no multiplier.
    assert [p.decay_mult for p in decayed.net.layer[graph.layer_index(decayed.net, "conv1")].param] == [1, 1]
    same = apply_strategy("full", parse_net(DIGITS), StrategyOptions(num_classes=3, layer_decay=1.0)).net
    for name in ("fc2_ft", "fc1", "conv2", "conv1"):
        assert lr_mults(same, name) == lr_mults(plain, name)


def test_composes_with_top_frozen_layers_stay_frozen(parse_net) -> None:  # type: ignore[no-untyped-def]
    result = apply_strategy("top", parse_net(DIGITS), StrategyOptions(num_classes=3, train_last=3, layer_decay=0.1))
    assert lr_mults(result.net, "conv1") == [0, 0]
    assert lr_mults(result.net, "conv2") == [0.01, 0.02]
    assert lr_mults(result.net, "fc1") == [0.1, 0.2]
    assert lr_mults(result.net, "fc2_ft") == [10, 20]


def test_a_residual_block_is_one_step(parse_net) -> None:  # type: ignore[no-untyped-def]
    result = apply_strategy("full", parse_net(RESNET), StrategyOptions(num_classes=3, layer_decay=0.5))
    assert check_net(result.net) == []
    # The block's conv and Scale learn at one rate; the stem, below the join, one step lower.
    assert lr_mults(result.net, "res2a_branch2a") == [0.5]
    assert lr_mults(result.net, "scale_res2a_branch2a") == [0.5, 0.5]
    assert lr_mults(result.net, "conv1") == [0.25]
    assert lr_mults(result.net, "scale_conv1") == [0.25, 0.25]
    assert lr_mults(result.net, "bn_conv1") == [0, 0, 0]  # BatchNorm statistics are not the solver's
    assert "per block" in result.notes[-1]


@pytest.mark.parametrize("factor", [0.0, -0.5, 1.5])
def test_a_factor_outside_0_1_is_refused(parse_net, factor) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(CaffeFtError, match=r"--layer-decay must be in \(0, 1\]"):
        apply_strategy("full", parse_net(DIGITS), StrategyOptions(num_classes=3, layer_decay=factor))


STEP = """
import sys
import numpy as np
import caffe
caffe.set_mode_cpu()
solver = caffe.SGDSolver(sys.argv[1])
solver.net.copy_from(sys.argv[2])
solver.step(1)
# After a step each parameter's diff holds the update Caffe subtracted (lr x lr_mult x (gradient + decay)).
np.savez(sys.argv[3], **{name: blobs[0].diff for name, blobs in solver.net.params.items()})
"""


@pytest.mark.caffe
def test_caffe_updates_each_layer_by_its_factor(tmp_path, parse_net) -> None:  # type: ignore[no-untyped-def]
    from test_rewrite_caffe import _image_list

    train = _image_list(str(tmp_path / "data"), "train", 16, True, 8, seed=3)
    env = {**os.environ, "GLOG_minloglevel": "2"}
    text = DIGITS.replace('source: "train.txt"', f'source: "{train}"').replace(
        'source: "val.txt"', f'source: "{train}"').replace("shuffle: true", "shuffle: false")
    steps = {}
    for name, factor in (("plain", None), ("decayed", 0.5)):
        net = apply_strategy("full", parse_net(text), StrategyOptions(num_classes=3, layer_decay=factor)).net
        (tmp_path / f"{name}.prototxt").write_text(prototext.print_message(net))
        (tmp_path / f"{name}_solver.prototxt").write_text(
            f'net: "{tmp_path / name}.prototxt"\nbase_lr: 0.01\nmomentum: 0.9\nweight_decay: 0.0005\n'
            'lr_policy: "fixed"\nmax_iter: 1\nsolver_mode: CPU\nrandom_seed: 1\n')
    init = str(tmp_path / "init.caffemodel")
    made = subprocess.run([sys.executable, "-c", "import caffe, sys; caffe.Net(sys.argv[1], caffe.TRAIN).save(sys.argv[2])",
                           str(tmp_path / "plain.prototxt"), init], capture_output=True, text=True, env=env)
    assert made.returncode == 0, made.stderr
    for name in ("plain", "decayed"):
        done = subprocess.run([sys.executable, "-c", STEP, str(tmp_path / f"{name}_solver.prototxt"), init,
                               str(tmp_path / f"{name}.npz")], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        steps[name] = np.load(str(tmp_path / f"{name}.npz"))
    for layer, step in (("fc2_ft", 0), ("fc1", 1), ("conv2", 2), ("conv1", 3)):
        plain, decayed = steps["plain"][layer], steps["decayed"][layer]
        assert np.abs(plain).max() > 0, layer
        np.testing.assert_allclose(decayed, plain * 0.5 ** step, rtol=1e-4, atol=1e-9, err_msg=layer)
