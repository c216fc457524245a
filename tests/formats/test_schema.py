"""Our caffe.proto against the schema Debian's pycaffe was built with."""

from __future__ import annotations

import marshal

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
    (table,) = glob.glob(str(tmp_path / "fields-*.marshal"))
    good, good_table = open(parsed, "rb").read(), open(table, "rb").read()
    open(parsed, "wb").write(good[:40])  # the name survives, the messages do not
    open(table, "wb").write(good_table[:len(good_table) // 2])
    again = Schema("caffe.proto", text)
    assert again.table("LayerParameter").fields_by_name["convolution_param"].number == 106
    assert again.new("LayerParameter").DESCRIPTOR.fields_by_name["convolution_param"].number == 106
    assert open(parsed, "rb").read() == good
    assert open(table, "rb").read() == good_table
    for damaged in (b"{", marshal.dumps({"package": "caffe"}), marshal.dumps({"package": "caffe", "enums": {},
                    "messages": {"caffe.A": ["A", [["b", 1, 11, False, "caffe.Missing"]]]}})):
        open(table, "wb").write(damaged)  # not marshal's format; not a table; a table that does not link up
        assert Schema("caffe.proto", text).table("LayerParameter").fields_by_name["name"].number == 1
        assert open(table, "rb").read() == good_table


def test_schema_cache_follows_an_edited_schema(tmp_path, monkeypatch):
    """A schema edited in place (a fork's caffe.proto gaining a field) gets new
    cache files: the stale table of the old text is not used for the new one."""
    import glob

    from caffe_ft.formats.schema import Schema, default_proto_path

    monkeypatch.setenv("CAFFE_FT_CACHE", str(tmp_path))
    text = open(default_proto_path(), encoding="utf-8").read()
    assert "fork_field" not in Schema("fork.proto", text).table("LayerParameter").fields_by_name
    edited = text.replace("message LayerParameter {", "message LayerParameter {\n  optional int32 fork_field = 9999;", 1)
    assert edited != text
    table = Schema("fork.proto", edited).table("LayerParameter")
    assert table.fields_by_name["fork_field"].number == 9999
    assert Schema("fork.proto", edited).new("LayerParameter").DESCRIPTOR.fields_by_name["fork_field"].number == 9999
    assert len(glob.glob(str(tmp_path / "fields-*.marshal"))) == 2
    assert "fork_field" not in Schema("fork.proto", text).table("LayerParameter").fields_by_name


def test_schema_works_without_a_writable_cache(tmp_path, monkeypatch):
    """A read-only cache location (an installed system, a read-only home) only
    costs deriving the tables again each run: nothing is written, nothing fails."""
    import os

    from caffe_ft.formats.schema import Schema, default_proto_path

    if os.geteuid() == 0:
        monkeypatch.setenv("CAFFE_FT_CACHE", "/proc/caffe-ft-cache")  # not creatable, even by root
    else:
        cache = tmp_path / "cache"
        cache.mkdir(mode=0o500)
        monkeypatch.setenv("CAFFE_FT_CACHE", str(cache))
    text = open(default_proto_path(), encoding="utf-8").read()
    for _ in range(2):
        schema = Schema("caffe.proto", text)
        assert schema.table("LayerParameter").fields_by_name["convolution_param"].number == 106
        assert schema.new("NetParameter").DESCRIPTOR.full_name == "caffe.NetParameter"
    assert not os.path.exists("/proc/caffe-ft-cache") and not any(tmp_path.rglob("*.marshal"))


def test_schema_cache_concurrent_writers(tmp_path):
    """Several processes starting together on an empty cache each write the
    tables under a temporary name and rename it: every one of them gets a
    whole table, and the files left are whole."""
    import glob
    import os
    import subprocess
    import sys

    probe = ("from caffe_ft.formats.schema import load_schema; s = load_schema(); "
             "print(s.table('LayerParameter').fields_by_name['convolution_param'].number, "
             "s.new('NetParameter').DESCRIPTOR.full_name)")
    env = dict(os.environ, CAFFE_FT_CACHE=str(tmp_path))
    runs = [subprocess.Popen([sys.executable, "-c", probe], env=env, stdout=subprocess.PIPE, text=True)
            for _ in range(6)]
    outputs = [run.communicate()[0] for run in runs]
    assert [run.returncode for run in runs] == [0] * 6
    assert outputs == ["106 caffe.NetParameter\n"] * 6
    assert sorted(os.path.basename(name).split("-")[0] for name in os.listdir(tmp_path)) == ["fields", "schema"]
    (table,) = glob.glob(str(tmp_path / "fields-*.marshal"))
    assert marshal.loads(open(table, "rb").read())["package"] == "caffe"
