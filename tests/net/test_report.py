"""`inspect`'s net report: parameters, multipliers and rules per layer, and the table layout."""

from __future__ import annotations

from caffe_ft.net import report

NET = """
name: "n"
layer { name: "data" type: "Input" top: "x" input_param { shape { dim: 1 dim: 3 dim: 4 dim: 4 } } }
layer { name: "conv" type: "Convolution" bottom: "x" top: "c" param { lr_mult: 0 decay_mult: 2 }
        convolution_param { num_output: 2 kernel_size: 3 } }
layer { name: "bn" type: "BatchNorm" bottom: "c" top: "c" }
layer { name: "relu" type: "ReLU" bottom: "c" top: "c" exclude { stage: "deploy" } }
layer { name: "fc" type: "InnerProduct" bottom: "c" top: "fc" param { lr_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
        inner_product_param { num_output: 5 } }
layer { name: "drop" type: "Dropout" bottom: "fc" top: "fc" include { phase: TRAIN } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


def test_describe_net_reports_multipliers_rules_and_heads(parse_net):
    info = report.describe_net(parse_net(NET)).to_json()
    layers = {layer["name"]: layer for layer in info["layers"]}
    assert layers["conv"]["params"] == [{"lr_mult": 0.0, "decay_mult": 2.0}, {"lr_mult": 1.0, "decay_mult": 1.0}]
    assert layers["conv"]["learnable"] is True
    assert layers["bn"]["params"] == [{"lr_mult": 0.0, "decay_mult": 1.0}] * 3 and layers["bn"]["learnable"] is False
    assert layers["fc"]["params"] == [{"lr_mult": 1.0, "decay_mult": 1.0}, {"lr_mult": 2.0, "decay_mult": 0.0}]
    assert layers["relu"]["params"] == [] and layers["relu"]["learnable"] is False
    assert layers["relu"]["phase"] == "not stage=deploy" and layers["drop"]["phase"] == "TRAIN"
    assert layers["prob"]["phase"] == "" and layers["prob"]["bottom"] == ["fc"]
    assert "output_shapes" not in layers["drop"]  # TRAIN only: no TEST shape
    assert layers["fc"]["output_shapes"] == [[1, 5]]
    assert info["heads"] == ["fc"]


def test_format_net_lines_up_columns(parse_net):
    text = report.format_net(report.describe_net(parse_net(NET)))
    lines = text.splitlines()
    assert lines[0] == "net 'n': 7 layers"
    header, rows = lines[1], lines[2:9]
    assert header.startswith("layer  type          bottom -> top  phase")
    for row in rows:
        assert row == row.rstrip()
    fc = next(row for row in rows if row.startswith("fc "))
    assert fc.split() [:6] == ["fc", "InnerProduct", "c", "->", "fc", "1:1/2:0"]
    assert header.index("type") == fc.index("InnerProduct")
    assert lines[-1] == "classifier head(s): fc"


def test_table_pads_every_column_to_its_widest_cell():
    assert report._table(["a", "", "ccc"], [["xy", "", 3], ["z", None, 1.5]]) == (
        "a         ccc\n"
        "xy        3\n"
        "z   None  1.5"
    )
