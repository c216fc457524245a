"""Mutated prototxts and caffemodels for the fuzz tests and the differential
test against Caffe's own text parser.

Every generator is a plain function of a ``random.Random``, so a seed names a
mutant for good: the fuzz tests draw as many as their time budget allows, the
differential test a fixed list.  Text mutants come from seed nets that use
every kind of field Caffe's parser treats differently (strings, signed and
unsigned integers, floats, bools, enums, repeated and nested fields), with
three kinds of change: a value replaced by a literal from a list of the
cases that matter (number spellings per type, escapes, string bytes, lists),
a token deleted, repeated or swapped, and raw bytes flipped, inserted or
deleted.
"""

from __future__ import annotations

import glob
import os
import random
import re
from typing import List

HERE = os.path.dirname(os.path.abspath(__file__))
FUZZ_CASES = os.path.join(HERE, "fuzz_cases")

SEED_NET = b"""# a net that uses every kind of field
name: "Seed"
force_backward: true
input: "data"
input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }
state { phase: TEST level: -1 stage: "deploy" }
layer {
  name: "conv1"  # trailing comment
  type: "Convolution"
  bottom: "data"
  top: "conv1"
  param { lr_mult: 1 decay_mult: 1.0 name: "w" }
  param { lr_mult: 2e0 decay_mult: 0 }
  convolution_param {
    num_output: 4 kernel_size: 3 stride: [1] pad: 0 bias_term: true
    weight_filler { type: "gaussian" std: 0.01 mean: -0.5 }
    bias_filler { type: "constant" value: .2 }
  }
  include { phase: TRAIN }
}
layer {
  name: 'pool1' type: 'Pooling' bottom: 'conv1' top: 'pool1'
  pooling_param { pool: MAX kernel_size: 2 stride: 2 }
  loss_weight: 0.5f
}
layer { name: "ip" type: "InnerProduct" bottom: "pool1" top: "ip"
  inner_product_param { num_output: 10 axis: -1 transpose: false } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss"
  loss_param { ignore_label: 255 normalization: VALID }
  propagate_down: [true, false] }
"""

# Literals whose reading differs between careless parsers and protobuf's.
LITERALS = [
    b"0", b"00", b"010", b"08", b"0x10", b"0X1f", b"0x", b"-0", b"- 1", b"-", b"1f", b"1.f", b"1F", b"1e5",
    b"1E+5", b"1e-5f", b"1e", b".5", b"5.", b"01.5", b"0.5.1", b"1a", b"1_", b"0f", b"0x1p3", b"-inf",
    b"Infinity", b"-NaN", b"inff", b"1e999", b"3.5e38", b"-3.4028236e38", b"99999999999999999999",
    b"18446744073709551616", b"4294967295", b"4294967296", b"2147483647", b"2147483648", b"-2147483648",
    b"-2147483649", b"0x7fffffff", b"0x80000000", b"-0x80000000", b"0777", b"true", b"True", b"t", b"f",
    b"FALSE", b"yes", b"1", b"2", b"01", b"0x1", b"TEST", b"TRAIN", b"MAX", b"AVE", b"VALID", b"BOGUS",
    b'"x"', b"'x'", b'"a" "b"', b'"a" \'b\'', b'"\\u00e9"', b'"\\U0001F600"', b'"\\U00110000"',
    b'"\\U00200000"', b'"\\u12"', b'"\\uD800"', b'"\\ud83d\\ude00"', b'"\\xff"', b'"\\x"', b'"\\x1"',
    b'"\\x123"', b'"\\351"', b'"\\777"', b'"\\0"', b'"\\q"', b'"\\?"', b'"\\a\\b\\f\\v"', b'"\\\'"',
    b'"a\x01b"', b'"a\x7fb"', b'"a\x00b"', b'"\xe9"', b'"\xc3\xa9"', b'"\xff\xfe"', b'"a\rb"', b'"a\nb"',
    b'"a\\', b'"', b"[]", b"[1, 2]", b"[1,]", b"[ ]", b'["a", "b"]', b'["a"]', b"[true]", b"[{}]",
    b"{ }", b"< >", b"1;", b"1,", b"1;;", b"x.5", b"\xff", b"\x01", b"\x00",
]
SPLICES = [
    b"{", b"}", b"<", b">", b"[", b"]", b":", b",", b";", b"#", b'"', b"'", b"\\", b"-", b".", b"0", b"9",
    b"e", b"x", b"f", b"_", b" ", b"\n", b"\t", b"\x00", b"\x01", b"\x0b", b"\x7f", b"\x80", b"\xff", b"\xc3",
    b"layer", b"name", b"top: []", b"layer: []", b"layer [{ name: 'z' }]", b"layer { }", b"dim: 2",
]
_VALUE = re.compile(rb"(:\s*)(\"(?:[^\"\\\n]|\\.)*\"|'(?:[^'\\\n]|\\.)*'|-?[\w.+]+|\[[^\]\n]*\])")
_TOKEN = re.compile(rb"\"(?:[^\"\\\n]|\\.)*\"|'(?:[^'\\\n]|\\.)*'|#[^\n]*|[\w.+-]+|\S")


def seeds() -> List[bytes]:
    """The seed nets: the one above and the golden rewrite inputs."""
    found = [SEED_NET]
    for path in sorted(glob.glob(os.path.join(HERE, "recipe", "golden", "rewrite", "*", "*.prototxt"))):
        if os.path.basename(path) != "solver.prototxt":
            with open(path, "rb") as handle:
                found.append(handle.read())
    return found


def replace_value(rng: random.Random, text: bytes) -> bytes:
    """One field value swapped for an interesting literal."""
    spots = list(_VALUE.finditer(text))
    if not spots:
        return text
    spot = rng.choice(spots)
    return text[: spot.start(2)] + rng.choice(LITERALS) + text[spot.end(2):]


def edit_tokens(rng: random.Random, text: bytes) -> bytes:
    """A token deleted, repeated, swapped with the next, or a splice inserted before it."""
    tokens = list(_TOKEN.finditer(text))
    if len(tokens) < 2:
        return text
    index = rng.randrange(len(tokens) - 1)
    one, two = tokens[index], tokens[index + 1]
    action = rng.randrange(4)
    if action == 0:
        return text[: one.start()] + text[one.end():]
    if action == 1:
        return text[: one.end()] + b" " + one.group() + text[one.end():]
    if action == 2:
        return text[: one.start()] + two.group() + text[one.end(): two.start()] + one.group() + text[two.end():]
    return text[: one.start()] + rng.choice(SPLICES) + b" " + text[one.start():]


def flip_bytes(rng: random.Random, data: bytes) -> bytes:
    """A few bytes changed, inserted or deleted."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        if not out:
            out.append(rng.randrange(256))
            continue
        pos = rng.randrange(len(out))
        action = rng.randrange(4)
        if action == 0:
            out[pos] = rng.randrange(256)
        elif action == 1:
            out[pos:pos] = rng.choice(SPLICES)
        elif action == 2:
            del out[pos]
        else:
            out[pos] ^= 1 << rng.randrange(8)
    return bytes(out)


def text_mutant(rng: random.Random, pool: List[bytes]) -> bytes:
    """One mutant prototxt: one to three changes of the kinds above to a seed."""
    text = rng.choice(pool)
    for _ in range(rng.randint(1, 3)):
        kind = rng.random()
        if kind < 0.55:
            text = replace_value(rng, text)
        elif kind < 0.85:
            text = edit_tokens(rng, text)
        else:
            text = flip_bytes(rng, text)
    return text


def binary_mutant(rng: random.Random, data: bytes) -> bytes:
    """A mutated binary file: bytes changed (varint bytes, lengths, keys), cut or spliced."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not out:
            break
        pos = rng.randrange(len(out))
        action = rng.randrange(6)
        if action == 0:
            out[pos] = rng.choice([0x00, 0x01, 0x7F, 0x80, 0xFF, 0x08, 0x0A, 0x12, 0x3A, 0x2A, 0xA2])
        elif action == 1:
            out[pos] ^= 1 << rng.randrange(8)
        elif action == 2:
            del out[pos:]
        elif action == 3:
            out[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif action == 4:
            out[pos:pos] = b"\xff" * rng.randint(1, 10)  # runaway varints
        else:
            other = rng.randrange(len(out))
            out[pos:pos] = out[other: other + rng.randint(1, 32)]
    return bytes(out)
