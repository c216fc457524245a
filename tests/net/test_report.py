"""`inspect`'s net report: parameters, multipliers and rules per layer, and the table layout."""

from __future__ import annotations

import pytest

from caffe_ft.formats import prototext
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


# What `inspect` reads straight from a file's text, a layer at a time
# (report.describe_text), must be what the net's message says
# (report.describe_net), for every kind of layer.
TREE_NETS = {
    "rules and multipliers": NET,
    # The net's own stages filter layers: shapes follow the layers that run
    # (before, shapes were matched to the wrong layers and inspect crashed).
    "net stages": """
name: "s"
state { stage: "deploy" }
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 3 dim: 4 dim: 4 } } }
layer { name: "train" type: "ReLU" bottom: "x" top: "y" exclude { stage: "deploy" } }
layer { name: "deep" type: "ReLU" bottom: "x" top: "z" include { stage: "deploy" phase: TEST min_level: 1 } }
layer { name: "fc" type: "InnerProduct" bottom: "x" top: "fc" inner_product_param { num_output: 3 bias_term: false }
        param { lr_mult: 0.5 decay_mult: 1e-5 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
""",
    "strings, list forms and empty layers": r"""
layer { name: "in" type: "Input" top: ["x", "y"] input_param { shape { dim: 2 dim: 3 } } }
layer { name: "caf\303\251 \"q\" \377" type: "Concat" bottom: "x" bottom: ["y"] top: "c" include: [] param: [] }
layer: []
layer { name: "sc" type: "Scale" bottom: "c" top: "c" scale_param { bias_term: true } param { lr_mult: 0 } }
layer {}
""",
    # Two problems: Caffe filters the layers (refusing include with exclude)
    # before it sets any up, so that is the one reported.
    "include and exclude": """
layer { name: "in" type: "Input" top: "a" input_param { shape { dim: 2 } } }
layer { name: "again" type: "Input" top: "a" input_param { shape { dim: 2 } } }
layer { name: "both" type: "ReLU" bottom: "a" top: "c" include { phase: TEST } exclude { phase: TRAIN } }
""",
    "no shapes": """
layer { name: "d" type: "Data" top: "data" top: "label" }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 10 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
""",
}


def _describe_text(schema, source, input_shapes=None):
    data = source.encode()
    return report.describe_text(prototext.parse_fields(data, "net.prototxt"), data, "net.prototxt", schema,
                                input_shapes)


@pytest.mark.parametrize("name", sorted(TREE_NETS))
@pytest.mark.parametrize("input_shapes", [None, {"data": (2, 3, 8, 8)}])
def test_describe_text_is_describe_net(schema, parse_net, name, input_shapes):
    from_tree = _describe_text(schema, TREE_NETS[name], input_shapes)
    from_message = report.describe_net(parse_net(TREE_NETS[name]), input_shapes)
    assert from_tree is not None
    assert from_tree.to_json() == from_message.to_json()
    assert report.format_net(from_tree) == report.format_net(from_message)


def test_describe_text_shapes_follow_the_net_state(schema):
    layers = {layer["name"]: layer for layer in _describe_text(schema, TREE_NETS["net stages"]).to_json()["layers"]}
    assert "output_shapes" not in layers["train"] and "output_shapes" not in layers["deep"]
    assert layers["fc"]["output_shapes"] == [[1, 3]] and layers["prob"]["output_shapes"] == [[1, 3]]


def test_describe_text_reports_the_filter_problem_first(schema):
    info = _describe_text(schema, TREE_NETS["include and exclude"]).to_json()
    assert info["shapes_unknown"] == "layer 'both': specify either include rules or exclude rules, not both"
    assert all("output_shapes" not in layer for layer in info["layers"])


@pytest.mark.parametrize("legacy", [
    'input: "data" input_dim: 1 input_dim: 3 input_dim: 4 input_dim: 4',
    'layers { name: "c" type: CONVOLUTION }',
    'layer { name: "bn" type: "BatchNorm" param {} param {} param {} }',
])
def test_describe_text_leaves_legacy_nets_to_the_upgrade(schema, legacy):
    assert _describe_text(schema, legacy) is None
    assert _describe_text(schema, 'layer { name: "a" }\n' + legacy) is None


def test_inspect_describes_a_legacy_net_as_upgraded(tmp_path, schema):
    from caffe_ft.commands import describe_file

    path = tmp_path / "bn.prototxt"
    path.write_text('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 } } }\n'
                    'layer { name: "bn" type: "BatchNorm" bottom: "x" top: "x" '
                    'param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 1 decay_mult: 1 } param {} }\n')
    info, _ = describe_file(str(path), dict, schema)
    bn = info.to_json()["layers"][1]
    assert bn["params"] == [{"lr_mult": 0.0, "decay_mult": 0.0}] * 3  # Caffe's upgrade zeroes them


def test_describe_text_reads_net_fields_after_the_layers(schema, parse_net):
    # Net-level fields are usually first; after the layers they still count
    # (the file is then read whole), here the state that drops a layer.
    source = TREE_NETS["net stages"].replace('state { stage: "deploy" }\n', "") + 'state { stage: "deploy" }\n'
    from_text = _describe_text(schema, source)
    assert from_text.to_json() == report.describe_net(parse_net(source)).to_json()
    assert "output_shapes" not in {layer["name"]: layer for layer in from_text.to_json()["layers"]}["train"]


@pytest.mark.parametrize("source, where", [
    ('layer { name: "a" bogus: 1 }\nlayer { name: "b" $ }\n', ":2:19:"),  # syntax first, as every command
    ('layer { name: "a" bogus: 1 }\nname: "x"\nwhatever: 2\n', ":1:19:"),  # then the first schema error
    ('layer { name: "a" }\nname: "x"\nwhatever: 2\nlayer { bogus: 1 }\n', ":3:1:"),
    ("layer { name: 'a' }\nlayer: 5\n", ":2:1:"),
])
def test_describe_text_reports_the_first_error(schema, source, where):
    from caffe_ft.errors import CaffeFtError

    with pytest.raises(CaffeFtError) as raised:
        _describe_text(schema, source)
    assert where in str(raised.value)
    with pytest.raises(CaffeFtError) as whole:  # what reading the whole file says
        load_text_from(schema, source)
    assert str(whole.value) == str(raised.value)


def load_text_from(schema, source):
    from caffe_ft.formats.files import parse_text

    return parse_text(source.encode(), "net.prototxt", schema)
