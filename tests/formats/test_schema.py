"""Our caffe.proto against the schema Debian's pycaffe was built with."""

from __future__ import annotations

import pytest

from caffe_ft.formats import prototext
from caffe_ft.formats.schema import is_repeated, load_schema


def describe(file_descriptor) -> dict:
    """Every message's fields and every enum's values, keyed by full name."""
    table = {}

    def enum(e):
        table[e.full_name] = sorted((v.name, v.number) for v in e.values)

    def message(m):
        fields = []
        for f in m.fields:
            fields.append((
                f.name, f.number, is_repeated(f), f.type,
                f.message_type.full_name if f.message_type else None,
                f.enum_type.full_name if f.enum_type else None,
                f.has_default_value, repr(f.default_value) if f.has_default_value else None,
                f.GetOptions().packed,
            ))
        table[m.full_name] = sorted(fields)
        for nested in m.nested_types:
            message(nested)
        for nested in m.enum_types:
            enum(nested)

    for m in file_descriptor.message_types_by_name.values():
        message(m)
    for e in file_descriptor.enum_types_by_name.values():
        enum(e)
    return table


@pytest.mark.caffe
def test_schema_is_wire_identical_to_pycaffes():
    from caffe.proto import caffe_pb2

    ours = describe(load_schema().file)
    theirs = describe(caffe_pb2.DESCRIPTOR)
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        assert ours[name] == theirs[name], name


@pytest.mark.caffe
def test_our_messages_live_beside_pycaffes():
    """Both schemas define package ``caffe``: they must not clash in one process."""
    from caffe.proto import caffe_pb2

    theirs = caffe_pb2.NetParameter()
    theirs.name = "n"
    theirs.layer.add(name="fc", type="InnerProduct").inner_product_param.num_output = 3
    ours = load_schema().new("NetParameter")
    ours.ParseFromString(theirs.SerializeToString())
    assert ours.layer[0].inner_product_param.num_output == 3
    assert ours.SerializeToString() == theirs.SerializeToString()
    assert type(ours) is not type(theirs)


def test_defaults_are_caffes(schema):
    """A few defaults that fine-tuning depends on."""
    param = schema.new("ParamSpec")
    assert (param.lr_mult, param.decay_mult) == (1.0, 1.0)
    assert schema.new("ConvolutionParameter").bias_term is True
    assert schema.new("SolverParameter").type == "SGD"
    assert schema.new("FillerParameter").type == "constant"
    net = prototext.to_message(prototext.parse(b"layer { name: 'x' }"), schema.new("NetParameter"))
    assert net.layer[0].name == "x"
