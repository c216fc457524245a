"""``caffe-ft diff``: layer matching, field paths, defaults, order, exit codes."""

from __future__ import annotations

import json

import pytest
from caffe_ft.net import diff
from caffe_ft.cli import main
from conftest import cli_runner

BASE = """
name: "Tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer {
  name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 1 } param { lr_mult: 2 }
  convolution_param { num_output: 4 kernel_size: 3 }
}
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "fc7" type: "InnerProduct" bottom: "conv1" top: "fc7" inner_product_param { num_output: 16 } }
layer { name: "fc8" type: "InnerProduct" bottom: "fc7" top: "fc8" inner_product_param { num_output: 1000 } }
layer { name: "prob" type: "Softmax" bottom: "fc8" top: "prob" }
"""


def edit(text: str, *replacements: tuple) -> str:
    for old, new in replacements:
        assert old in text, old
        text = text.replace(old, new)
    return text


def run_diff(tmp_path, a: str, b: str, *options: str):
    path_a, path_b = tmp_path / "a.prototxt", tmp_path / "b.prototxt"
    path_a.write_text(a)
    path_b.write_text(b)
    result = cli_runner().invoke(main, ["diff", *options, str(path_a), str(path_b)], catch_exceptions=False)
    assert result.stderr == ""
    return result


def test_rename_and_num_output(tmp_path):
    b = edit(
        BASE,
        ('name: "fc8" type', 'name: "fc8_ft" type'),
        ('top: "fc8" inner_product_param { num_output: 1000 }', 'top: "fc8_ft" inner_product_param { num_output: 3 }'),
        ('bottom: "fc8" top: "prob"', 'bottom: "fc8_ft" top: "prob"'),
    )
    result = run_diff(tmp_path, BASE, b)
    assert result.exit_code == 1
    assert result.stdout == (
        "~ fc8 -> fc8_ft (renamed)\n"
        '    top[0]: "fc8" -> "fc8_ft"\n'
        "    inner_product_param.num_output: 1000 -> 3\n"
        "~ prob\n"
        '    bottom[0]: "fc8" -> "fc8_ft"\n'
    )


def test_rename_needs_same_type_and_place(parse_net):
    a = parse_net(BASE)
    # fc8 becomes a Softmax-typed "head": different type, so removed + added.
    b = parse_net(edit(BASE, ('name: "fc8" type: "InnerProduct"', 'name: "head" type: "Sigmoid"')))
    kinds = [(c.kind, c.layer) for c in diff.diff_nets(a, b)]
    assert kinds == [(diff.REMOVED, "fc8"), (diff.ADDED, "head")]


def test_frozen_and_unfrozen(tmp_path):
    frozen = edit(BASE, ("param { lr_mult: 1 } param { lr_mult: 2 }", "param { lr_mult: 0 } param { lr_mult: 0 }"))
    result = run_diff(tmp_path, BASE, frozen)
    assert result.exit_code == 1
    assert result.stdout == "~ conv1 (frozen)\n    param[0].lr_mult: 1 -> 0\n    param[1].lr_mult: 2 -> 0\n"
    result = run_diff(tmp_path, frozen, BASE)
    assert result.stdout.splitlines()[0] == "~ conv1 (unfrozen)"


def test_freezing_a_layer_without_param_entries(tmp_path):
    b = edit(BASE, ('top: "fc7" inner_product_param', 'top: "fc7" param { lr_mult: 0 } param { lr_mult: 0 decay_mult: 0 } inner_product_param'))
    result = run_diff(tmp_path, BASE, b)
    assert result.stdout == (
        "~ fc7 (frozen)\n"
        "    param[0].lr_mult: (unset) -> 0\n"
        "    param[1].lr_mult: (unset) -> 0\n"
        "    param[1].decay_mult: (unset) -> 0\n"
    )


def test_partly_frozen_layer_is_not_marked(tmp_path):
    b = edit(BASE, ("param { lr_mult: 1 } param { lr_mult: 2 }", "param { lr_mult: 0 } param { lr_mult: 2 }"))
    assert run_diff(tmp_path, BASE, b).stdout == "~ conv1\n    param[0].lr_mult: 1 -> 0\n"


def test_added_and_removed_in_place(tmp_path):
    # relu1 goes, a Dropout appears after fc7, prob goes: removed layers sit
    # where they stood in A, added ones where they stand in B.
    b = edit(
        BASE,
        ('layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }\n', ""),
        ('layer { name: "fc8"', 'layer { name: "drop7" type: "Dropout" bottom: "fc7" top: "fc7" }\nlayer { name: "fc8"'),
        ('layer { name: "prob" type: "Softmax" bottom: "fc8" top: "prob" }\n', ""),
    )
    result = run_diff(tmp_path, BASE, b)
    assert result.exit_code == 1
    assert result.stdout == (
        "- relu1 (removed, ReLU)\n"
        "+ drop7 (added, Dropout)\n"
        "- prob (removed, Softmax)\n"
    )
    back = run_diff(tmp_path, b, BASE)
    assert back.stdout == "+ relu1 (added, ReLU)\n- drop7 (removed, Dropout)\n+ prob (added, Softmax)\n"


def test_moved(tmp_path, parse_net):
    relu = 'layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }\n'
    b = edit(BASE, (relu, ""), ('layer { name: "prob"', relu + 'layer { name: "prob"'))
    result = run_diff(tmp_path, BASE, b)
    assert result.exit_code == 1
    assert result.stdout == "~ relu1 (moved)\n"
    changes = diff.diff_nets(parse_net(BASE), parse_net(b))
    assert [(c.old_index, c.index, c.moved) for c in changes] == [(2, 4, True)]


def test_defaults_are_not_changes(tmp_path):
    b = edit(
        BASE,
        ("num_output: 4 kernel_size: 3", "num_output: 4 kernel_size: 3 bias_term: true group: 1"),
        ('top: "prob" }', 'top: "prob" softmax_param { } }'),
        ('layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1"', 'layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" relu_param { negative_slope: 0 }'),
    )
    result = run_diff(tmp_path, BASE, b)
    assert (result.exit_code, result.stdout) == (0, "")


def test_added_repeated_entry_is_a_change_even_with_default_values(tmp_path):
    b = edit(BASE, ('top: "prob" }', 'top: "prob" include { phase: TRAIN } exclude { } }'))
    assert run_diff(tmp_path, BASE, b).stdout == (
        "~ prob\n    include[0].phase: (unset) -> TRAIN\n    exclude[0]: (unset) -> {}\n"
    )


def test_removed_field_and_repeated_scalars(tmp_path):
    b = edit(BASE, ("num_output: 4 kernel_size: 3", "kernel_size: 3 kernel_size: 5 pad: 1"))
    assert run_diff(tmp_path, BASE, b).stdout == (
        "~ conv1\n"
        "    convolution_param.num_output: 4 -> (unset)\n"
        "    convolution_param.pad[0]: (unset) -> 1\n"
        "    convolution_param.kernel_size[1]: (unset) -> 5\n"
    )


def test_net_level_fields_come_first_unindented(tmp_path):
    b = edit(BASE, ('name: "Tiny"', 'name: "TinyFT"\nforce_backward: true'), ("num_output: 1000", "num_output: 2"))
    assert run_diff(tmp_path, BASE, b).stdout == (
        'name: "Tiny" -> "TinyFT"\n'
        "force_backward: (unset) -> true\n"
        "~ fc8\n    inner_product_param.num_output: 1000 -> 2\n"
    )


def test_layers_sharing_a_name_match_by_occurrence(tmp_path):
    a = (
        'layer { name: "data" type: "Data" top: "data" include { phase: TRAIN } data_param { batch_size: 64 } }\n'
        'layer { name: "data" type: "Data" top: "data" include { phase: TEST } data_param { batch_size: 100 } }\n'
    )
    b = a.replace("batch_size: 100", "batch_size: 10")
    assert run_diff(tmp_path, a, b).stdout == "~ data#2\n    data_param.batch_size: 100 -> 10\n"


def test_long_repeated_values_compared_as_a_whole(parse_net):
    values = " ".join(f"data: {i}" for i in range(100))
    a = parse_net(f'layer {{ name: "w" type: "Parameter" blobs {{ {values} }} }}')
    b = parse_net(f'layer {{ name: "w" type: "Parameter" blobs {{ {values.replace("data: 7 ", "data: 8 ")} }} }}')
    [change] = diff.diff_nets(a, b)
    assert change.fields == (diff.FieldChange("blobs[0].data", "[100 values]", "[100 values]"),)
    assert diff.diff_nets(a, a) == []


def test_type_alignment_inside_a_replaced_block(parse_net):
    a = parse_net(
        'layer { name: "x" type: "Input" top: "x" }\n'
        'layer { name: "fc8" type: "InnerProduct" bottom: "x" top: "fc8" }\n'
        'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "fc8" top: "loss" }\n'
        'layer { name: "acc" type: "Accuracy" bottom: "fc8" top: "acc" }\n'
    )
    b = parse_net(
        'layer { name: "x" type: "Input" top: "x" }\n'
        'layer { name: "new_fc" type: "InnerProduct" bottom: "x" top: "fc8" }\n'
        'layer { name: "new_loss" type: "SoftmaxWithLoss" bottom: "fc8" top: "loss" }\n'
    )
    alignment = diff.align_layers(list(a.layer), list(b.layer))
    assert alignment.renamed == {(1, 1), (2, 2)}
    assert alignment.moved == ()
    text = diff.format_changes(diff.diff_nets(a, b))
    assert text == (
        "~ fc8 -> new_fc (renamed)\n~ loss -> new_loss (renamed)\n- acc (removed, Accuracy)\n"
    )


def test_legacy_net_is_upgraded_before_comparing(tmp_path):
    legacy = """
name: "tiny"
input: "data"
input_dim: 1 input_dim: 3 input_dim: 8 input_dim: 8
layers { name: "ip" type: INNER_PRODUCT bottom: "data" top: "ip" blobs_lr: 1 blobs_lr: 2
         inner_product_param { num_output: 10 } }
"""
    current = """
name: "tiny"
layer { name: "input" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" param { lr_mult: 1 } param { lr_mult: 2 }
        inner_product_param { num_output: 10 } }
"""
    result = run_diff(tmp_path, legacy, current)
    assert (result.exit_code, result.stdout) == (0, "")
    result = run_diff(tmp_path, legacy, current.replace("lr_mult: 2", "lr_mult: 0"))
    assert result.stdout == "~ ip\n    param[1].lr_mult: 2 -> 0\n"


SOLVER = """
net: "train_val.prototxt"
base_lr: 0.01
lr_policy: "step"
stepsize: 1000
max_iter: 5000
momentum: 0.9
solver_mode: GPU
"""


def test_solver_fields(tmp_path):
    b = edit(SOLVER, ("base_lr: 0.01", "base_lr: 0.001"), ("stepsize: 1000\n", ""), ("momentum: 0.9", "momentum: 0.9\nweight_decay: 0.0005"))
    result = run_diff(tmp_path, SOLVER, b)
    assert result.exit_code == 1
    # Field-number order, as Caffe prints a solver: weight_decay (12) before stepsize (13).
    assert result.stdout == "base_lr: 0.01 -> 0.001\nweight_decay: (unset) -> 0.0005\nstepsize: 1000 -> (unset)\n"


def test_solver_defaults_and_legacy_type(tmp_path):
    # solver_mode GPU and type "SGD" are the defaults; solver_type is upgraded to type.
    explicit = SOLVER.replace("solver_mode: GPU", 'type: "SGD"\nsnapshot_prefix: ""\nsolver_mode: GPU')
    result = run_diff(tmp_path, SOLVER.replace("solver_mode: GPU\n", ""), explicit)
    assert (result.exit_code, result.stdout) == (0, "")
    legacy = SOLVER + "solver_type: ADAM\n"
    result = run_diff(tmp_path, legacy, SOLVER + 'type: "Adam"\n')
    assert (result.exit_code, result.stdout) == (0, "")
    assert run_diff(tmp_path, legacy, SOLVER).stdout == 'type: "Adam" -> (unset)\n'


def test_equal_files_ignore_comments_and_layout(tmp_path):
    reflowed = "# a comment\n" + BASE.replace(" } param {", " }\n  param {  # biases\n")
    result = run_diff(tmp_path, BASE, reflowed)
    assert (result.exit_code, result.stdout) == (0, "")
    result = run_diff(tmp_path, BASE, reflowed, "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == {"equal": True, "changes": []}


def test_json(tmp_path):
    b = edit(BASE, ('name: "fc8" type', 'name: "fc8_ft" type'), ("param { lr_mult: 1 } param { lr_mult: 2 }", ""))
    result = run_diff(tmp_path, BASE, b, "--json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["equal"] is False
    by_layer = {change["layer"]: change for change in data["changes"]}
    assert by_layer["fc8_ft"]["old_layer"] == "fc8" and by_layer["fc8_ft"]["renamed"] is True
    conv1 = by_layer["conv1"]
    assert conv1["fields"][0] == {"path": "param[0].lr_mult", "old": "1", "new": None}
    assert conv1["learning"] is None  # no param entries: lr_mult 1, still learnable


@pytest.mark.parametrize(
    "a, b, message",
    [
        (BASE, None, "no such file"),
        (BASE, "layer { name: 'x' ", "b.prototxt:1:"),
        (BASE, "layer { nam: 'x' }", "b.prototxt:1:"),
        (BASE, SOLVER, "a net cannot be compared with a solver"),
        (SOLVER, "\x08\x01\x12\x00", "binary"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, a, b, message):
    path_a, path_b = tmp_path / "a.prototxt", tmp_path / "b.prototxt"
    path_a.write_text(a)
    if b is not None:
        path_b.write_text(b)
    result = cli_runner().invoke(main, ["diff", str(path_a), str(path_b)])
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("caffe-ft: error: ") and message in lines[0]


def test_output_is_stable_and_in_b_order(tmp_path, parse_net):
    b = edit(
        BASE,
        ('name: "fc8" type', 'name: "fc8_ft" type'),
        ('layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }\n', ""),
        ("num_output: 16", "num_output: 32"),
        ("num_output: 4 ", "num_output: 8 "),
    )
    first = run_diff(tmp_path, BASE, b).stdout
    assert run_diff(tmp_path, BASE, b).stdout == first
    headers = [line for line in first.splitlines() if not line.startswith(" ")]
    assert headers == ["~ conv1", "- relu1 (removed, ReLU)", "~ fc7", "~ fc8 -> fc8_ft (renamed)"]
    net_a, net_b = parse_net(BASE), parse_net(b)
    assert diff.diff_nets(net_a, net_b) == diff.diff_nets(net_a, net_b)
