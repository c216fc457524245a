"""Fine-tuning solver settings (caffe_ft.recipe.solver)."""

from __future__ import annotations

import pytest

from caffe_ft.formats import prototext
from caffe_ft.errors import CaffeFtError
from caffe_ft.formats.numbers import to_float32
from caffe_ft.recipe.solver import SCALED_FIELDS, rewrite_solver, solver_originals

CAFFENET_SOLVER = """
net: "models/bvlc_reference_caffenet/train_val.prototxt"
test_iter: 1000
test_interval: 1000
base_lr: 0.01
lr_policy: "step"
gamma: 0.1
stepsize: 100000
display: 20
max_iter: 450000
momentum: 0.9
weight_decay: 0.0005
snapshot: 10000
snapshot_prefix: "models/bvlc_reference_caffenet/caffenet_train"
solver_mode: GPU
"""

PATHS = {"net_path": "ft/train_val.prototxt", "snapshot_prefix": "ft/snapshots/ft"}


def solver(parse_net, text: str):
    return parse_net(text, "SolverParameter")


def test_defaults_scale_rate_and_schedule(parse_net):
    original = solver(parse_net, CAFFENET_SOLVER)
    before = original.SerializeToString()
    out, notes = rewrite_solver(original, **PATHS)
    assert original.SerializeToString() == before
    assert out.base_lr == to_float32(0.001)  # what Caffe reads for "base_lr: 0.001"
    assert out.stepsize == 20000
    assert out.max_iter == 90000
    assert out.net == "ft/train_val.prototxt"
    assert out.snapshot_prefix == "ft/snapshots/ft"
    assert any(note.startswith("base_lr: 0.01 -> 0.001") for note in notes)
    assert "stepsize: 100000 -> 20000 (x0.2)" in notes


def test_everything_else_is_kept(parse_net):
    original = solver(parse_net, CAFFENET_SOLVER)
    out, _ = rewrite_solver(original, **PATHS)
    for message in (original, out):
        for name in (*SCALED_FIELDS, "net", "snapshot_prefix"):
            message.ClearField(name)
    assert prototext.print_message(out) == prototext.print_message(original)


def test_multistep_rounding_and_minimum(parse_net):
    text = 'net: "n" base_lr: 0.1 lr_policy: "multistep" stepvalue: 3 stepvalue: 12 stepvalue: 100 max_iter: 2'
    out, notes = rewrite_solver(solver(parse_net, text), **PATHS, step_scale=0.25)
    assert list(out.stepvalue) == [1, 3, 25]  # 0.75 -> 1, 3, 25
    assert out.max_iter == 1  # 0.5 rounds to 0: at least 1
    assert "stepvalue: 3, 12, 100 -> 1, 3, 25 (x0.25)" in notes


def test_given_max_iter_and_scales(parse_net):
    out, _ = rewrite_solver(solver(parse_net, CAFFENET_SOLVER), **PATHS, max_iter=500, lr_scale=0.5, step_scale=1)
    assert out.max_iter == 500
    assert out.base_lr == pytest.approx(0.005)
    assert out.stepsize == 100000


def test_unset_settings_stay_unset(parse_net):
    out, _ = rewrite_solver(solver(parse_net, 'net: "n" lr_policy: "fixed"'), **PATHS)
    assert not out.HasField("base_lr") and not out.HasField("stepsize") and not out.HasField("max_iter")
    assert list(out.stepvalue) == []


def test_rerun_from_recorded_originals_changes_nothing(parse_net):
    original = solver(parse_net, CAFFENET_SOLVER)
    recorded = solver_originals(original)
    assert recorded == {"base_lr": pytest.approx(0.01), "stepsize": 100000, "max_iter": 450000}
    first, _ = rewrite_solver(original, **PATHS, originals=recorded)
    second, _ = rewrite_solver(first, **PATHS, originals=recorded)
    assert second == first
    # without the originals a second run would scale again
    third, _ = rewrite_solver(first, **PATHS)
    assert third.stepsize == 4000


def test_originals_may_be_text_from_comments(parse_net):
    originals = {"base_lr": "0.01", "stepvalue": ["1000", "2000"], "max_iter": "3000"}
    out, _ = rewrite_solver(solver(parse_net, 'net: "n" stepvalue: 5'), **PATHS, originals=originals)
    assert out.base_lr == pytest.approx(0.001)
    assert list(out.stepvalue) == [200, 400]
    assert out.max_iter == 600


def test_originals_may_be_lists_of_floats(parse_net):
    originals = {"base_lr": [0.01], "stepsize": [100000.0], "max_iter": [450000.0]}
    out, _ = rewrite_solver(solver(parse_net, 'net: "n"'), **PATHS, originals=originals)
    assert (out.stepsize, out.max_iter) == (20000, 90000)
    with pytest.raises(CaffeFtError, match="stepsize must be one value, not 2"):
        rewrite_solver(solver(parse_net, 'net: "n"'), **PATHS, originals={"stepsize": [1, 2]})


def test_train_net_and_test_nets_become_one_net(parse_net):
    text = """
    train_net: "train.prototxt"
    test_net: "val.prototxt"
    test_net: "train_as_test.prototxt"
    test_iter: 100 test_iter: 50
    test_interval: 500
    base_lr: 0.01
    """
    out, notes = rewrite_solver(solver(parse_net, text), **PATHS)
    assert out.net == PATHS["net_path"]
    assert not out.HasField("train_net") and list(out.test_net) == []
    assert list(out.test_iter) == [100, 50]  # Caffe builds one TEST net from `net` per test_iter
    assert any("train_net, test_net replaced by net" in note for note in notes)
    assert any("the 2 test nets" in note for note in notes)


def test_inline_nets_are_replaced(parse_net):
    text = 'net_param { name: "inline" layer { name: "in" type: "Input" top: "x" } } test_iter: 1'
    out, _ = rewrite_solver(solver(parse_net, text), **PATHS)
    assert not out.HasField("net_param")
    assert out.net == PATHS["net_path"]


def test_legacy_solver_type_is_upgraded(parse_net):
    out, notes = rewrite_solver(solver(parse_net, 'net: "n" solver_type: NESTEROV'), **PATHS)
    assert out.type == "Nesterov" and not out.HasField("solver_type")
    assert any("solver_type" in note for note in notes)


@pytest.mark.parametrize(
    "text, kwargs, message",
    [
        ('base_lr: 0.1 test_iter: 1 test_net: "val.prototxt"', {}, "the solver names no net"),
        ('net: "n"', {"lr_scale": 0}, "learning-rate scale must be positive"),
        ('net: "n"', {"step_scale": -1}, "step scale must be positive"),
        ('net: "n"', {"max_iter": 0}, "max_iter must be at least 1"),
        ('net: "n"', {"originals": {"gamma": 0.1}}, "unknown original solver setting(s): gamma"),
    ],
)
def test_errors(parse_net, text, kwargs, message):
    with pytest.raises(CaffeFtError) as caught:
        rewrite_solver(solver(parse_net, text), **PATHS, **kwargs)
    assert message in str(caught.value)


def test_a_run_shorter_than_one_test_interval_is_still_tested(parse_net):
    from caffe_ft.recipe.solver import rewrite_solver

    solver = parse_net('net: "n.prototxt" test_iter: 10 test_interval: 1000 base_lr: 0.01 max_iter: 40000',
                       "SolverParameter")
    out, notes = rewrite_solver(solver, net_path="o/n.prototxt", snapshot_prefix="o/s", max_iter=150)
    assert out.test_interval == 150 and any("test_interval: 1000 -> 150" in note for note in notes)
    out, _ = rewrite_solver(solver, net_path="o/n.prototxt", snapshot_prefix="o/s")  # 8000 iterations: kept
    assert out.test_interval == 1000 and out.max_iter == 8000


def test_an_epoch_counts_iter_size_batches_an_iteration(parse_net):
    """Caffe reads iter_size batches per iteration: 100 examples in batches of 10 with iter_size 2
    are 5 iterations an epoch, for the fitted solver and for the schedule alike."""
    from caffe_ft.recipe.solver import Schedule
    from caffe_ft.training.schedule import epoch_iters

    assert [epoch_iters(100, 10), epoch_iters(100, 10, 2), epoch_iters(101, 10, 2), epoch_iters(0, 10)] == [10, 5, 6, 1]
    schedule = Schedule(100, 10, val_size=20, val_batch=10, strategy="full")
    assert (schedule.epoch_iters, Schedule(100, 10, iter_size=2).epoch_iters) == (10, 5)
    accumulating = solver(parse_net, CAFFENET_SOLVER + "iter_size: 2\n")
    out, notes = rewrite_solver(accumulating, schedule=schedule, **PATHS)
    assert (out.max_iter, out.test_interval, out.iter_size) == (30, 5, 2)  # 6 epochs (full, small data) of 5
    assert "max_iter: 450000 -> 30 (6 epochs (full on a small data set) of 100 examples in batches of 20: " \
           "5 iterations each)" in notes
    plain, _ = rewrite_solver(solver(parse_net, CAFFENET_SOLVER), schedule=schedule, **PATHS)
    assert (plain.max_iter, plain.test_interval) == (60, 10)
