"""Text format: parsing with comments, schema errors, C++-identical printing."""

from __future__ import annotations

import pytest

from caffe_ft.formats import prototext
from caffe_ft.errors import CaffeFtError
from caffe_ft.formats.numbers import format_double, format_float


def roundtrip(schema, text: str) -> str:
    tree = prototext.parse(text.encode(), "t.prototxt")
    message = prototext.to_message(tree, schema.new("NetParameter"), "t.prototxt")
    return prototext.render(prototext.reconcile(tree, message))


@pytest.mark.parametrize(
    "value, expected",
    [(1.0, "1"), (0.1, "0.1"), (1e-8, "1e-08"), (0.00390625, "0.00390625"), (123456789.0, "123456792"),
     (-0.0, "-0"), (float("inf"), "inf"), (float("-inf"), "-inf"), (float("nan"), "nan"), (1e-4, "0.0001"),
     (0.999, "0.999"), (1.1, "1.1"), (1 / 3, "0.333333343")],
)
def test_float_formatting_matches_simple_ftoa(value, expected):
    assert format_float(value) == expected


def test_double_formatting_widens_only_when_needed():
    assert format_double(0.1) == "0.1"
    assert format_double(1 / 3) == "0.33333333333333331"
    assert format_double(2.0) == "2"


def test_canonical_layout_orders_fields_by_number_and_formats_values(schema):
    text = (
        "layer { type: 'InnerProduct' name: \"fc\" top: \"fc\" bottom: \"x\"\n"
        "  inner_product_param { num_output: 0x0A bias_term: False weight_filler { std: 1.0 type: 'gaussian' } }\n"
        "  param { lr_mult: 1.0; decay_mult: 1e0 }, }\n"
        "name: 'n'\n"
    )
    assert roundtrip(schema, text) == (
        'name: "n"\n'
        "layer {\n"
        '  name: "fc"\n'
        '  type: "InnerProduct"\n'
        '  bottom: "x"\n'
        '  top: "fc"\n'
        "  param {\n    lr_mult: 1\n    decay_mult: 1\n  }\n"
        "  inner_product_param {\n"
        "    num_output: 10\n"
        "    bias_term: false\n"
        '    weight_filler {\n      type: "gaussian"\n      std: 1\n    }\n'
        "  }\n"
        "}\n"
    )


def test_comments_stay_with_their_fields(schema):
    text = (
        "# header\n"
        "name: \"n\"  # the name\n"
        "layer {  # first\n"
        "  top: \"t\"\n"
        "  # about the name\n"
        "  name: \"a\"\n"
        "  # dangling\n"
        "}  # after\n"
        "# footer\n"
    )
    out = roundtrip(schema, text)
    assert out == (
        "# header\n"
        'name: "n"  # the name\n'
        "layer {  # first\n"
        "  # about the name\n"
        '  name: "a"\n'
        '  top: "t"\n'
        "  # dangling\n"
        "}  # after\n"
        "# footer\n"
    )
    assert roundtrip(schema, out) == out


def test_list_syntax_strings_and_escapes(schema):
    text = 'input_shape { dim: [1, 3, 224, 224] } name: "a" "b\\n\\"q\\"\\001"'
    out = roundtrip(schema, text)
    assert 'name: "ab\\n\\"q\\"\\001"\n' in out
    assert out.count("  dim: ") == 4


@pytest.mark.parametrize(
    "text, where, words",
    [
        ("layer { nam: 'x' }", "1:9", 'Message type "caffe.LayerParameter" has no field named "nam"'),
        ("name: 'a'\nname: 'b'", "2:1", 'Non-repeated field "name" is specified multiple times.'),
        ("layer { convolution_param { num_output: 1.5 } }", "1:41", "Expected integer, got: 1.5"),
        ("layer { convolution_param { num_output: -1 } }", "1:41", "Expected integer, got: -"),
        ("layer { convolution_param { num_output: 4294967296 } }", "1:41", "Integer out of range (4294967296)"),
        ("layer { convolution_param { bias_term: yes } }", "1:40", 'Invalid value for boolean field "bias_term"'),
        ("layer { pooling_param { pool: MEDIAN } }", "1:31", 'Unknown enumeration value of "MEDIAN" for field "pool"'),
        ("layer { name: x }", "1:15", "Expected string, got: x"),
        ("layer { name: 'x'", "1:18", 'Expected "}", found end of file.'),
        ("layer  name: 'x' }", "1:8", 'Expected ":", found "name".'),
        ("name: 'x' }", "1:11", "Expected identifier, got: }"),
        ("name 'x'", "1:6", 'Expected ":", found "\'x\'".'),
        ("name: \"x", "1:9", "Unexpected end of string."),
        ("layer: 3", "1:1", 'Expected "{", found "3"'),
        ("name { }", "1:1", 'Expected ":", found "{".'),
        ("name:\t\t'x' 1", "1:21", "Expected identifier, got: 1"),  # tabs count to the next multiple of 8
    ],
)
def test_errors_name_line_and_column(schema, text, where, words):
    with pytest.raises(CaffeFtError) as info:
        roundtrip(schema, text)
    message = str(info.value)
    assert message.startswith(f"t.prototxt:{where}: "), message
    assert words in message
    # fmt's check against the field table, without a message, says the same.
    with pytest.raises(CaffeFtError) as checked:
        prototext.check_tree(prototext.parse(text.encode(), "t.prototxt"), schema.table("NetParameter"), "t.prototxt")
    assert str(checked.value) == message


def test_unknown_field_error_points_to_proto_option(schema):
    with pytest.raises(CaffeFtError, match="--proto PATH"):
        roundtrip(schema, "layer { name: 'x' annotated_data_param { } }")


def test_enum_by_number_bool_forms_and_special_floats(schema):
    out = roundtrip(
        schema,
        "layer { pooling_param { pool: 1 } include { phase: TEST } "
        "dropout_param { dropout_ratio: -inf } convolution_param { bias_term: 0 } }",
    )
    assert "pool: AVE" in out and "phase: TEST" in out
    assert "dropout_ratio: -inf" in out and "bias_term: false" in out


def test_reconcile_keeps_comments_of_removed_fields(schema):
    tree = prototext.parse(b"name: 'a'\nlayer {\n  # keep me\n  name: 'x'\n}\n# tail\n")
    message = prototext.to_message(tree, schema.new("NetParameter"))
    message.ClearField("layer")
    out = prototext.render(prototext.reconcile(tree, message))
    assert "# keep me" in out and "# tail" in out


EXAMPLE_NET = b"""# A net written by hand.
name: "n"
layer {
  name: "data"  # the input
  type: "Input"
  top: "data"
  input_param { shape { dim: 1 dim: 3 dim: 8 dim: 8 } }
}
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  param { lr_mult: 1 }  # weights
  convolution_param { num_output: 4 kernel_size: 3 }
}
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
# The classifier.
layer {
  name: "fc"
  type: "InnerProduct"
  bottom: "conv"
  top: "fc"
  inner_product_param {
    num_output: 10
  }
}
"""


SOLVER_TEXT = b"""net: "train_val.prototxt"  # the net
test_iter: 10 test_iter: 5
base_lr: 1e-2 lr_policy: "step" gamma: 0.1 stepsize: 1000
solver_mode: GPU snapshot_format: HDF5 momentum: 9e-1 debug_info: t
"""


@pytest.mark.parametrize("kind, text", [
    ("NetParameter", EXAMPLE_NET),
    ("NetParameter", b"layer { name: 'a\\001' type: 'x' bottom: ['p', \"q\"] loss_weight: [1, 2.5e0] }\n"
                     b"state { phase: 1 } layer { param { } phase: TEST include { phase: TRAIN } }"),
    ("SolverParameter", SOLVER_TEXT),
])
def test_table_check_gives_the_message_conversions_canonical_tree(schema, kind, text):
    """check_tree (fmt, no protobuf) and to_message leave the same tree behind."""
    by_message = prototext.parse(text, "t.prototxt")
    prototext.to_message(by_message, schema.new(kind), "t.prototxt")
    by_table = prototext.check_tree(prototext.parse(text, "t.prototxt"), schema.table(kind), "t.prototxt")
    assert prototext.render(prototext.canonicalize(by_table)) == prototext.render(prototext.canonicalize(by_message))


def _edit(schema, change):
    tree = prototext.parse(EXAMPLE_NET)
    net = prototext.to_message(tree, schema.new("NetParameter"))
    change(net)
    out = prototext.render_minimal(tree, EXAMPLE_NET, net)
    reread = prototext.to_message(prototext.parse(out.encode()), schema.new("NetParameter"))
    assert reread == net  # the text means the new message
    again = prototext.render_minimal(prototext.parse(out.encode()), out.encode(), net)
    assert again == out  # nothing left to change
    import difflib

    changed = [line for line in difflib.ndiff(EXAMPLE_NET.decode().splitlines(), out.splitlines())
               if line[:2] in ("- ", "+ ")]
    return out, changed


def test_minimal_rendering_of_an_unchanged_net_is_the_input(schema):
    out, changed = _edit(schema, lambda net: None)
    assert out.encode() == EXAMPLE_NET and changed == []


def test_minimal_rendering_touches_only_changed_lines(schema):
    def change(net):
        fc = net.layer[3]
        fc.name, fc.top[0] = "fc_ft", "fc_ft"
        fc.inner_product_param.num_output = 3
        net.layer[1].param[0].lr_mult = 0
        net.layer[1].param[0].decay_mult = 0
        net.layer[1].param.add(lr_mult=0, decay_mult=0)

    out, changed = _edit(schema, change)
    assert changed == [
        "-   param { lr_mult: 1 }  # weights",
        "+   param { lr_mult: 0 decay_mult: 0 }  # weights",
        "+   param { lr_mult: 0 decay_mult: 0 }",
        '-   name: "fc"',
        '+   name: "fc_ft"',
        '-   top: "fc"',
        '+   top: "fc_ft"',
        "-     num_output: 10",
        "+     num_output: 3",
    ]
    assert "# The classifier." in out and '# the input' in out


def test_minimal_rendering_removes_and_inserts_layers(schema):
    def change(net):
        del net.layer[2]
        prob = net.layer.add(name="prob", type="Softmax")
        prob.bottom.append("fc")
        prob.top.append("prob")

    out, changed = _edit(schema, change)
    assert changed[0] == '- layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }'
    assert all(line.startswith("+ ") for line in changed[1:])
    assert out.endswith('layer {\n  name: "prob"\n  type: "Softmax"\n  bottom: "fc"\n  top: "prob"\n}\n')


def test_parsing_runs_no_cyclic_collection_and_leaves_the_collector_on():
    """Each collection during a parse walks the whole growing tree (40-50 % of a
    10 MB parse): parse, to_message and render run with the collector paused."""
    import gc

    from caffe_ft.formats.schema import load_schema

    text = b"".join(b'layer { name: "l%d" type: "ReLU" bottom: "x" top: "x" }\n' % i for i in range(3000))
    collections = []

    def count(phase, info):
        if phase == "start":
            collections.append(info["generation"])

    gc.collect()
    gc.callbacks.append(count)
    try:
        root = prototext.parse(text)
        net = prototext.to_message(root, load_schema().new("NetParameter"))
        prototext.render(root)
    finally:
        gc.callbacks.remove(count)
    assert len(net.layer) == 3000
    # At most one as each pause ends (the allocations it held back), not one per 700 allocations.
    assert len(collections) <= 3
    assert gc.isenabled()


# The tokenizer cuts the text in one re.split and works out byte offsets only when asked; the
# parser walks the common forms in one loop and the others through its general methods.
POSITIONS_TEXT = (
    "# head \xe9\n"
    "name: 'n\xe9t'  # after name\n"
    "layer {\t# after open\n"
    "\tname: \"a\" type: 'ReLU'; bottom: \"x\" top: \"x\"\n"
    "  # closing comment\n"
    "} # after close\n"
    "layer < name: \"b\" include: [{ phase: TEST }, <stage: 's'>] > ;\n"
    "input_dim: [1, 2] input_dim: -3 layer: { name: \"c\" \"d\" param { lr_mult: .5 decay_mult: 1e1f } }\n"
    "# tail\n"
).encode("utf-8")


def _line_column(data: bytes, pos: int):
    """1-based line and column of byte ``pos``, tabs to multiples of 8 (an independent count)."""
    line_start = data.rfind(b"\n", 0, pos) + 1
    column = 0
    for byte in data[line_start:pos]:
        column = (column // 8 + 1) * 8 if byte == 9 else column + 1
    return data.count(b"\n", 0, pos) + 1, column + 1


def _walk(node):
    yield node
    for child in node.children or ():
        yield from _walk(child)


def test_nodes_and_tokens_point_at_their_bytes():
    data = POSITIONS_TEXT
    root = prototext.parse(data, "t.prototxt")
    nodes = list(_walk(root))[1:]
    assert [n.name for n in nodes if n.name == "layer"] == ["layer"] * 3
    for node in nodes:
        assert data[node.start:node.start + len(node.name)] == node.name.encode()
        assert (node.line, node.column) == _line_column(data, node.start)
        if node.is_message:
            assert data[node.header_end - 1:node.header_end] in (b"{", b"<")
            assert data[node.end - 1:node.end] in (b"}", b">", b"]")
        else:
            for tokens in node.value_tokens:
                for token in tokens:
                    assert data[token.start:token.end].decode("utf-8") == token.text
                    assert (token.line, token.column) == _line_column(data, token.start)
            assert data[node.end - 1:node.end] in (b'"', b"'", b"]") or data[node.end - 1:node.end].isalnum()
    values = {n.name: n.values for n in nodes if not n.is_message}
    assert values["input_dim"] == ["-3"] and values["lr_mult"] == [".5"] and values["decay_mult"] == ["1e1f"]
    assert [n.values for n in nodes if n.name == "name"][-1] == ['"c""d"']


def test_comments_attach_by_line_with_fast_and_general_forms():
    root = prototext.parse(POSITIONS_TEXT, "t.prototxt")
    name, first, second, dims, dims2, third = root.children
    assert name.before == ["# head \xe9"] and name.after == "# after name"
    assert first.after == "# after open" and first.closing == ["# closing comment"]
    assert first.closing_after == "# after close"
    assert second.is_message and [c.name for c in second.children] == ["name", "include", "include"]
    assert root.closing == ["# tail"]
    assert third.children[0].values == ['"c""d"']


def test_non_ascii_text_keeps_its_bytes():
    data = b"name: '\xc3\xa9\\x41' # \xff latin-1\nlayer {}\n"
    root = prototext.parse(data, "t.prototxt")
    assert root.children[0].values == ["'\xe9\\x41'"]
    assert root.children[0].after == "# \udcff latin-1"
    assert root.children[1].start == data.index(b"layer")


@pytest.mark.parametrize(
    "text, message, where",
    [
        (b"name: 'x'\nlayer.5 {}", "Need space between identifier and decimal point.", (2, 6)),
        (b"name: 'x' \x01 a.5", "Invalid control characters encountered in text.", (1, 11)),
        (b"a.5 \x01", "Need space between identifier and decimal point.", (1, 2)),
        (b"name: 'x'\n\tlayer { name: \xc3\xa9 }", "Interpreting non ascii codepoint 195.", (2, 23)),
        (b"layer { name: 'x' ", 'Expected "}", found end of file.', (1, 19)),
        (b"layer { name: 'x' }\n}", "Expected identifier, got: }", (2, 1)),
    ],
)
def test_token_errors_name_the_first_problem(text, message, where):
    with pytest.raises(CaffeFtError) as info:
        prototext.parse(text, "t.prototxt")
    assert message in str(info.value)
    assert f"t.prototxt:{where[0]}:{where[1]}" in str(info.value)


def test_repeated_values_read_alike_and_strings_keep_their_escapes(schema):
    text = ("".join(f'layer {{ name: "l{i}" type: "ReLU" bottom: "x" top: "x" }}\n' for i in range(3))
            + "layer { name: 'q\\'s' type: \"a\\x41\\n\" }\n")
    root = prototext.parse(text.encode(), "t.prototxt")
    net = prototext.to_message(root, schema.new("NetParameter"), "t.prototxt")
    assert [layer.type for layer in net.layer] == ["ReLU"] * 3 + ["aA\n"]
    assert net.layer[3].name == "q's"
    out = prototext.render(prototext.canonicalize(root))
    assert 'name: "q\\\'s"' in out and 'type: "aA\\n"' in out and out.count('type: "ReLU"') == 3


@pytest.mark.parametrize("text, read, printed", [
    ("3.40282347e+38", 3.4028234663852886e38, "3.40282347e+38"),  # Caffe's print of the largest float reads back
    ("3.4028235677973366e+38", 3.4028234663852886e38, "3.40282347e+38"),  # halfway to 2**128: still it
    ("3.4028235677973370e+38", float("inf"), "inf"),
    ("-3.4028235e+38", -3.4028234663852886e38, "-3.40282347e+38"),
    ("-1e39", float("-inf"), "-inf"),
])
def test_a_float_field_reads_values_past_the_largest_float_as_protobuf_does(parse_net, text, read, printed):
    layer = parse_net(f"layer {{ loss_weight: {text} }}").layer[0]
    assert layer.loss_weight[0] == read
    assert prototext.print_message(layer).strip() == f"loss_weight: {printed}"
