"""The .proto parser that lets users bring a Caffe fork's schema."""

from __future__ import annotations

import pytest

from caffe_ft.formats import prototext
from caffe_ft.errors import CaffeFtError
from caffe_ft.formats.schema import Schema

FORK = """
syntax = "proto2";
package caffe;
// A fork adds a layer parameter.
message NetParameter {
  optional string name = 1;
  repeated LayerParameter layer = 100;
}
message LayerParameter {
  optional string name = 1;
  optional string type = 2;
  optional FancyParameter fancy_param = 999;
  oneof choice { int32 a = 5; string b = 6; }
  extensions 1000 to max;
  reserved 50, 60 to 70;
  reserved "old";
}
message FancyParameter {
  enum Mode { FAST = 0; SLOW = 1; }
  optional Mode mode = 1 [default = SLOW];
  optional float alpha = 2 [default = .5];
  optional double beta = 3 [default = -1e-3];
  optional string label = 4 [default = "a\\"b"];
  repeated int64 dims = 5 [packed = true];
  message Inner { optional bool flag = 1 [default = true]; }
  optional Inner inner = 6;
  optional .caffe.FancyParameter.Inner qualified = 7;
}
"""


def test_fork_schema_reads_its_own_layers():
    schema = Schema("fork.proto", FORK)
    tree = prototext.parse(b"layer { name: 'x' fancy_param { mode: FAST dims: [2, 3] inner { flag: false } } }")
    net = prototext.to_message(tree, schema.new("NetParameter"))
    assert net.layer[0].fancy_param.mode == 0
    assert list(net.layer[0].fancy_param.dims) == [2, 3]
    fancy = schema.new("FancyParameter")
    assert fancy.mode == 1 and fancy.alpha == 0.5 and fancy.beta == -1e-3
    assert fancy.label == 'a"b' and fancy.inner.flag is True
    assert fancy.DESCRIPTOR.fields_by_name["dims"].GetOptions().packed


@pytest.mark.parametrize(
    "text, where, words",
    [
        ("message A { optional Missing m = 1; }", "1:22", "unknown type 'Missing'"),
        ("message A { optional int32 m = 1 }", "1:34", "expected ';'"),
        ("message A { optional int32 m = 0; }", "1:32", "out of range"),
        ("message A {\n optional int32 m = 1 [default = x];\n}", "2:34", "invalid default"),
        ("import \"other.proto\";", "1:1", "imports are not supported"),
        ("message A {", "1:12", "not closed"),
        ("message A { optional int32 m = 1; }\nmessage A { }", "2:9", "'A' is defined twice"),
        ("package p;\nmessage A { enum E { X = 0; } message E { } }", "2:39", "'p.A.E' is defined twice"),
        ("message A {\n optional int32 m = 1;\n optional float m = 2;\n}", "3:17", "field 'm' is defined twice in 'A'"),
        ("message A {\n optional int32 m = 1;\n optional float n = 1;\n}", "3:21", "field number 1 is used twice"),
    ],
)
def test_schema_errors_are_located(text, where, words):
    with pytest.raises(CaffeFtError) as info:
        Schema("s.proto", text)
    message = str(info.value)
    if where:
        assert message.startswith(f"s.proto:{where}: "), message
    assert words in message
