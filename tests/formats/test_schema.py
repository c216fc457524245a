"""Our caffe.proto against the schema Debian's pycaffe was built with."""

from __future__ import annotations

import pytest

from caffe_ft.formats import prototext
from caffe_ft.formats.schema import FD, is_repeated, load_schema


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


def test_field_table_answers_as_the_descriptors_do(schema):
    """The cached field table (fmt's schema, without protobuf) against protobuf's descriptors."""
    from google.protobuf.descriptor import FieldDescriptor

    for name in dir(FD):
        if name.startswith(("TYPE_", "LABEL_")):
            assert getattr(FD, name) == getattr(FieldDescriptor, name), name
    checked = 0
    pending = [(schema.descriptor("NetParameter"), schema.table("NetParameter")),
               (schema.descriptor("SolverParameter"), schema.table("SolverParameter"))]
    seen = set()
    while pending:
        descriptor, table = pending.pop()
        if descriptor.full_name in seen:
            continue
        seen.add(descriptor.full_name)
        assert table.full_name == descriptor.full_name
        assert sorted(table.fields_by_name) == sorted(descriptor.fields_by_name)
        for field in descriptor.fields:
            row = table.fields_by_name[field.name]
            assert (row.number, row.type, row.is_repeated) == (field.number, field.type, is_repeated(field))
            if field.enum_type is not None:
                assert [(v.name, v.number) for v in row.enum_type.values] == [
                    (v.name, v.number) for v in field.enum_type.values]
                assert {n: v.name for n, v in row.enum_type.values_by_number.items()} == {
                    n: v.name for n, v in field.enum_type.values_by_number.items()}
            if field.message_type is not None:
                pending.append((field.message_type, row.message_type))
            checked += 1
    assert "caffe.LayerParameter" in seen and "caffe.V1LayerParameter" in seen and checked > 400


def test_fmt_imports_no_protobuf_message_machinery(tmp_path):
    """With the field table cached (the first run writes it), fmt builds no
    descriptor pool: protobuf's import was a third of its start-up."""
    import os
    import subprocess
    import sys

    net = tmp_path / "n.prototxt"
    net.write_text("layer { name: 'x' type: 'ReLU' }\n")
    probe = ("import sys; from caffe_ft.cli import main; main(['fmt', sys.argv[1]], standalone_mode=False); "
             "print(sorted(m for m in sys.modules if m.startswith('google.protobuf.')), file=sys.stderr)")
    env = dict(os.environ, CAFFE_FT_CACHE=str(tmp_path / "cache"))
    runs = [subprocess.run([sys.executable, "-c", probe, str(net)], env=env, capture_output=True, text=True)
            for _ in range(2)]
    assert [run.returncode for run in runs] == [0, 0], runs[0].stderr
    assert runs[0].stdout == runs[1].stdout == 'layer {\n  name: "x"\n  type: "ReLU"\n}\n'
    assert "google.protobuf.descriptor_pool" in runs[0].stderr  # the cache was built from protobuf
    loaded = eval(runs[1].stderr.strip().splitlines()[-1])
    assert not [m for m in loaded if m not in ("google.protobuf.pyext",)], loaded


def test_schema_caches_are_rebuilt_when_damaged(tmp_path, monkeypatch):
    """The parsed schema and its field table are cached; a damaged cache file
    (truncated after a valid name, or not JSON) only costs parsing again."""
    import glob

    from caffe_ft.formats.schema import Schema, default_proto_path

    monkeypatch.setenv("CAFFE_FT_CACHE", str(tmp_path))
    text = open(default_proto_path(), encoding="utf-8").read()
    fresh = Schema("caffe.proto", text)
    assert fresh.new("NetParameter").DESCRIPTOR.full_name == "caffe.NetParameter"
    (parsed,) = glob.glob(str(tmp_path / "schema-*.pb"))
    (table,) = glob.glob(str(tmp_path / "fields-*.json"))
    good = open(parsed, "rb").read()
    open(parsed, "wb").write(good[:40])  # the name survives, the messages do not
    open(table, "w").write("{")
    again = Schema("caffe.proto", text)
    assert again.table("LayerParameter").fields_by_name["convolution_param"].number == 106
    assert again.new("LayerParameter").DESCRIPTOR.fields_by_name["convolution_param"].number == 106
    assert open(parsed, "rb").read() == good
