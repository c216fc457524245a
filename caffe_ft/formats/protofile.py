"""A parser for ``.proto`` schema files, so caffe-ft needs no ``protoc``.

Caffe and its forks (SSD, NVCaffe, OpenPose…) describe their formats in one
proto2 file.  :func:`parse_proto` turns such a file into a
``FileDescriptorProto``, which :mod:`caffe_ft.formats.schema` loads into a private
descriptor pool.  It covers what those schemas use: messages and enums (nested
too), scalar/message/enum fields with labels, ``default`` and ``packed``
options, ``oneof``, ``extensions`` and ``reserved`` ranges.  Anything else is a
clear error with a line and column.
"""

from __future__ import annotations

import re
from typing import Dict, Iterator, List, Optional, Tuple

from google.protobuf import descriptor_pb2

from ..errors import CaffeFtError
from .numbers import format_double, format_float

FDP = descriptor_pb2.FieldDescriptorProto

SCALAR_TYPES = {
    "double": FDP.TYPE_DOUBLE,
    "float": FDP.TYPE_FLOAT,
    "int64": FDP.TYPE_INT64,
    "uint64": FDP.TYPE_UINT64,
    "int32": FDP.TYPE_INT32,
    "fixed64": FDP.TYPE_FIXED64,
    "fixed32": FDP.TYPE_FIXED32,
    "bool": FDP.TYPE_BOOL,
    "string": FDP.TYPE_STRING,
    "bytes": FDP.TYPE_BYTES,
    "uint32": FDP.TYPE_UINT32,
    "sfixed32": FDP.TYPE_SFIXED32,
    "sfixed64": FDP.TYPE_SFIXED64,
    "sint32": FDP.TYPE_SINT32,
    "sint64": FDP.TYPE_SINT64,
}
LABELS = {
    "optional": FDP.LABEL_OPTIONAL,
    "required": FDP.LABEL_REQUIRED,
    "repeated": FDP.LABEL_REPEATED,
}
MAX_FIELD_NUMBER = 536870911

_TOKEN = re.compile(
    r"""
    (?P<space>[ \t\r\f\v]+|\n)
  | (?P<comment>//[^\n]*|/\*.*?\*/)
  | (?P<number>-?(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?))
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*|\.[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<symbol>[{}\[\]()<>=;,:-])
    """,
    re.VERBOSE | re.DOTALL,
)


class _Token:
    __slots__ = ("kind", "text", "line", "column")

    def __init__(self, kind: str, text: str, line: int, column: int) -> None:
        self.kind, self.text, self.line, self.column = kind, text, line, column


def _tokenize(text: str, path: str) -> List[_Token]:
    tokens: List[_Token] = []
    pos, line, line_start = 0, 1, 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise CaffeFtError(
                f"unexpected character {text[pos]!r}", path, line, pos - line_start + 1
            )
        kind = match.lastgroup or ""
        value = match.group()
        if kind not in ("space", "comment"):
            tokens.append(_Token(kind, value, line, pos - line_start + 1))
        newlines = value.count("\n")
        if newlines:
            line += newlines
            line_start = pos + value.rindex("\n") + 1
        pos = match.end()
    tokens.append(_Token("eof", "", line, pos - line_start + 1))
    return tokens


def _unquote(token: str) -> str:
    """Decode a quoted proto string literal (C escapes)."""
    body = token[1:-1]
    return (
        body.encode("latin-1", "backslashreplace")
        .decode("unicode_escape")
        .encode("latin-1")
        .decode("utf-8", "replace")
    )


class _Parser:
    def __init__(self, text: str, path: str) -> None:
        self.path = path
        self.tokens = _tokenize(text, path)
        self.pos = 0
        # (scope, field proto, type name as written, token) resolved after parsing.
        self.unresolved: List[Tuple[str, descriptor_pb2.FieldDescriptorProto, str, _Token]] = []
        self.types: Dict[str, int] = {}  # full name (with leading dot) -> TYPE_MESSAGE/TYPE_ENUM
        self.enum_values: Dict[str, List[str]] = {}

    # -- token helpers -------------------------------------------------
    def peek(self) -> _Token:
        return self.tokens[self.pos]

    def next(self) -> _Token:
        token = self.tokens[self.pos]
        self.pos += 1
        return token

    def error(self, message: str, token: Optional[_Token] = None) -> CaffeFtError:
        token = token or self.peek()
        return CaffeFtError(message, self.path, token.line, token.column)

    def expect(self, text: str) -> _Token:
        token = self.next()
        if token.text != text:
            found = token.text or "end of file"
            raise self.error(f"expected '{text}', found '{found}'", token)
        return token

    def accept(self, text: str) -> bool:
        if self.peek().text == text:
            self.pos += 1
            return True
        return False

    def ident(self, what: str) -> _Token:
        token = self.next()
        if token.kind != "ident":
            raise self.error(f"expected {what}, found '{token.text or 'end of file'}'", token)
        return token

    def integer(self) -> int:
        token = self.next()
        if token.kind != "number":
            raise self.error(f"expected a number, found '{token.text}'", token)
        try:
            return int(token.text, 0)
        except ValueError:
            raise self.error(f"expected an integer, found '{token.text}'", token) from None

    # -- grammar ---------------------------------------------------------
    def parse(self) -> descriptor_pb2.FileDescriptorProto:
        fdp = descriptor_pb2.FileDescriptorProto()
        fdp.name = self.path
        fdp.syntax = "proto2"
        while self.peek().kind != "eof":
            token = self.peek()
            if self.accept(";"):
                continue
            if token.text == "syntax":
                self.next()
                self.expect("=")
                syntax = self.next()
                if syntax.kind != "string" or _unquote(syntax.text) not in ("proto2", "proto3"):
                    raise self.error("syntax must be \"proto2\" or \"proto3\"", syntax)
                fdp.syntax = _unquote(syntax.text)
                self.expect(";")
            elif token.text == "package":
                self.next()
                fdp.package = self.ident("a package name").text
                self.expect(";")
            elif token.text == "import":
                raise self.error("imports are not supported: give caffe-ft a single self-contained .proto")
            elif token.text == "option":
                self.skip_option()
            elif token.text == "message":
                self.next()
                self.message(fdp.message_type.add(), fdp.package)
            elif token.text == "enum":
                self.next()
                self.enum(fdp.enum_type.add(), fdp.package)
            else:
                raise self.error(f"unexpected '{token.text}' at top level")
        if fdp.syntax == "proto2":
            fdp.ClearField("syntax")
        self.resolve(fdp)
        return fdp

    def skip_option(self) -> None:
        self.expect("option")
        while self.next().text != ";":
            if self.peek().kind == "eof":
                raise self.error("unterminated option")

    def define(self, scope: str, token: _Token, kind: int) -> str:
        """Register type ``token`` in ``scope``; its full name.  protobuf's C++ and upb
        pools refuse a name defined twice, its pure-Python pool does not: refused here."""
        full = f"{scope}.{token.text}" if scope else token.text
        if "." + full in self.types:
            raise self.error(f"'{full}' is defined twice", token)
        self.types["." + full] = kind
        return full

    def message(self, msg: descriptor_pb2.DescriptorProto, scope: str) -> None:
        name = self.ident("a message name")
        msg.name = name.text
        full = self.define(scope, name, FDP.TYPE_MESSAGE)
        self.expect("{")
        while not self.accept("}"):
            token = self.peek()
            if token.kind == "eof":
                raise self.error(f"message '{msg.name}' is not closed")
            if self.accept(";"):
                continue
            if token.text == "message":
                self.next()
                self.message(msg.nested_type.add(), full)
            elif token.text == "enum":
                self.next()
                self.enum(msg.enum_type.add(), full)
            elif token.text == "option":
                self.skip_option()
            elif token.text == "oneof":
                self.next()
                index = len(msg.oneof_decl)
                msg.oneof_decl.add().name = self.ident("a oneof name").text
                self.expect("{")
                while not self.accept("}"):
                    field = self.field(msg, full, label=FDP.LABEL_OPTIONAL)
                    field.oneof_index = index
            elif token.text == "extensions":
                self.next()
                for start, end in self.ranges():
                    rng = msg.extension_range.add()
                    rng.start, rng.end = start, end
            elif token.text == "reserved":
                self.next()
                if self.peek().kind == "string":
                    while True:
                        msg.reserved_name.append(_unquote(self.next().text))
                        if not self.accept(","):
                            break
                    self.expect(";")
                else:
                    for start, end in self.ranges():
                        rng = msg.reserved_range.add()
                        rng.start, rng.end = start, end
            elif token.text in ("extend", "map", "group"):
                raise self.error(f"'{token.text}' is not supported in a Caffe schema")
            else:
                self.field(msg, full)

    def ranges(self) -> Iterator[Tuple[int, int]]:
        while True:
            start = self.integer()
            end = start
            if self.accept("to"):
                end = MAX_FIELD_NUMBER if self.accept("max") else self.integer()
            yield start, end + 1
            if not self.accept(","):
                break
        self.expect(";")

    def field(
        self, msg: descriptor_pb2.DescriptorProto, scope: str, label: Optional[int] = None
    ) -> descriptor_pb2.FieldDescriptorProto:
        field = msg.field.add()
        first = self.ident("a field")
        if label is None and first.text in LABELS:
            label = LABELS[first.text]
            type_token = self.ident("a field type")
        else:
            type_token = first
        field.label = label if label is not None else FDP.LABEL_OPTIONAL
        name_token = self.ident("a field name")
        field.name = name_token.text
        self.expect("=")
        number_token = self.peek()
        field.number = self.integer()
        if not 0 < field.number <= MAX_FIELD_NUMBER:
            raise self.error(f"field number {field.number} out of range", number_token)
        earlier = msg.field[:-1]
        if any(other.name == field.name for other in earlier):
            raise self.error(f"field '{field.name}' is defined twice in '{msg.name}'", name_token)
        if any(other.number == field.number for other in earlier):
            raise self.error(f"field number {field.number} is used twice in '{msg.name}'", number_token)
        if type_token.text in SCALAR_TYPES:
            field.type = SCALAR_TYPES[type_token.text]
        else:
            self.unresolved.append((scope, field, type_token.text, type_token))
        default: Optional[_Token] = None
        if self.accept("["):
            while True:
                name = self.ident("an option name")
                self.expect("=")
                if name.text == "default":
                    default = self.peek()
                    if default.text == "-":
                        self.next()
                        default = self.next()
                        default = _Token(default.kind, "-" + default.text, default.line, default.column)
                    else:
                        self.next()
                elif name.text == "packed":
                    field.options.packed = self.next().text == "true"
                elif name.text == "deprecated":
                    field.options.deprecated = self.next().text == "true"
                else:
                    self.next()
                if not self.accept(","):
                    break
            self.expect("]")
        self.expect(";")
        if default is not None:
            self.pending_default(field, default)
        return field

    def pending_default(self, field: descriptor_pb2.FieldDescriptorProto, token: _Token) -> None:
        # Enum defaults are checked once types are resolved; scalars now.
        field.default_value = token.text
        if field.HasField("type"):
            field.default_value = self.scalar_default(field.type, token)

    def scalar_default(self, ftype: int, token: _Token) -> str:
        text = token.text
        try:
            if ftype in (FDP.TYPE_STRING, FDP.TYPE_BYTES):
                if token.kind != "string":
                    raise ValueError
                value = _unquote(text)
                return value if ftype == FDP.TYPE_STRING else text[1:-1]
            if ftype == FDP.TYPE_BOOL:
                if text not in ("true", "false"):
                    raise ValueError
                return text
            if ftype in (FDP.TYPE_FLOAT, FDP.TYPE_DOUBLE):
                number = float(text) if text.lstrip("-") not in ("inf", "nan") else float(text)
                return format_float(number) if ftype == FDP.TYPE_FLOAT else format_double(number)
            return str(int(text, 0))
        except ValueError:
            raise self.error(f"invalid default value '{text}'", token) from None

    def enum(self, enum: descriptor_pb2.EnumDescriptorProto, scope: str) -> None:
        name = self.ident("an enum name")
        enum.name = name.text
        full = self.define(scope, name, FDP.TYPE_ENUM)
        names: List[str] = []
        self.expect("{")
        while not self.accept("}"):
            token = self.peek()
            if token.kind == "eof":
                raise self.error(f"enum '{enum.name}' is not closed")
            if self.accept(";"):
                continue
            if token.text == "option":
                self.skip_option()
                continue
            if token.text == "reserved":
                while self.next().text != ";":
                    pass
                continue
            value = enum.value.add()
            value.name = self.ident("an enum value").text
            self.expect("=")
            negative = self.accept("-")
            value.number = -self.integer() if negative else self.integer()
            if self.accept("["):
                while self.next().text != "]":
                    pass
            self.expect(";")
            names.append(value.name)
        self.enum_values["." + full] = names

    def resolve(self, fdp: descriptor_pb2.FileDescriptorProto) -> None:
        for scope, field, written, token in self.unresolved:
            full = self.lookup(scope, written)
            if full is None:
                raise self.error(f"unknown type '{written}'", token)
            field.type_name = full
            field.type = self.types[full]
            if field.HasField("default_value") and field.type == FDP.TYPE_ENUM:
                if field.default_value not in self.enum_values[full]:
                    raise self.error(
                        f"default '{field.default_value}' is not a value of {written}", token
                    )
            elif field.HasField("default_value"):
                raise self.error("a message field cannot have a default", token)

    def lookup(self, scope: str, written: str) -> Optional[str]:
        if written.startswith("."):
            return written if written in self.types else None
        parts = scope.split(".") if scope else []
        while True:
            candidate = "." + ".".join(parts + [written])
            if candidate in self.types:
                return candidate
            if not parts:
                return None
            parts.pop()


def parse_proto(text: str, path: str) -> descriptor_pb2.FileDescriptorProto:
    """Parse the text of a ``.proto`` file into a ``FileDescriptorProto``."""
    return _Parser(text, path).parse()
