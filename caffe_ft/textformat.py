"""Protobuf text format (``.prototxt``) that keeps comments.

Three steps, each a function:

* :func:`parse` reads text into a tree of :class:`Node` (a concrete syntax
  tree: field names, value tokens, comments, source positions);
* :func:`to_message` checks that tree against the schema and fills a message,
  with ``path:line:col`` errors (unknown field, bad value, field set twice);
* :func:`render` prints a tree exactly as protobuf's C++ ``TextFormat`` prints
  the same message (field-number order, two-space indent, ``SimpleFtoa``
  floats), plus the comments it carries.

:func:`reconcile` builds the tree of a *new* message that reuses the comments
of an old tree, so ``fmt`` and ``upgrade`` keep every comment in place.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Iterable, List, Optional, Tuple

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from .errors import CaffeFtError
from .numfmt import format_double, format_float
from .schema import is_repeated

FD = FieldDescriptor

_TOKEN = re.compile(
    rb"""
    (?P<newline>\n)
  | (?P<space>[ \t\r\f\v]+)
  | (?P<comment>\#[^\n]*)
  | (?P<number>(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?[fF]?)(?![A-Za-z_]))
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<symbol>[{}\[\]<>:;,\-/.])
    """,
    re.VERBOSE,
)


class Token:
    __slots__ = ("kind", "text", "line", "column", "start", "end")

    def __init__(self, kind: str, text: str, line: int, column: int, start: int, end: int) -> None:
        self.kind, self.text, self.line, self.column = kind, text, line, column
        self.start, self.end = start, end

    def __repr__(self) -> str:
        return f"Token({self.kind}, {self.text!r}, {self.line}:{self.column})"


class Node:
    """One field occurrence in a text-format file, or the file itself (root).

    A scalar node has ``values`` (one token text per value; several for the
    ``name: [a, b]`` list form) and ``children is None``; a message node has
    ``children``.  Comments are kept as written, ``#`` included: ``before`` are
    whole-line comments above the field, ``after`` the comment ending its first
    line, ``closing`` the whole-line comments before a message's ``}`` (for the
    root: the end of the file) and ``closing_after`` the one after ``}``.
    """

    __slots__ = (
        "name", "values", "value_tokens", "children", "before", "after", "closing",
        "closing_after", "line", "column", "start", "end", "header_end",
    )

    def __init__(self, name: str, children: Optional[List["Node"]] = None) -> None:
        self.name = name
        self.values: List[str] = []
        self.value_tokens: List[List[Token]] = []
        self.children = children
        self.before: List[str] = []
        self.after: Optional[str] = None
        self.closing: List[str] = []
        self.closing_after: Optional[str] = None
        self.line = 0
        self.column = 0
        self.start = 0  # byte offset of the field name
        self.end = 0  # byte offset just past the value or the closing brace
        self.header_end = 0  # for a message: just past its opening brace

    @property
    def is_message(self) -> bool:
        return self.children is not None

    def comments(self) -> List[str]:
        """Every comment this node and its subtree carry, in reading order."""
        found = list(self.before)
        if self.after:
            found.append(self.after)
        for child in self.children or ():
            found.extend(child.comments())
        found.extend(self.closing)
        if self.closing_after:
            found.append(self.closing_after)
        return found

    def __repr__(self) -> str:
        inner = f"{len(self.children)} children" if self.children is not None else self.values
        return f"Node({self.name!r}, {inner})"


# ---------------------------------------------------------------------------
# Parsing text into a tree
# ---------------------------------------------------------------------------


def _tokenize(data: bytes, path: str) -> List[Token]:
    tokens: List[Token] = []
    pos, line, line_start = 0, 1, 0
    size = len(data)
    match_token = _TOKEN.match
    while pos < size:
        match = match_token(data, pos)
        if match is None:
            char = data[pos : pos + 1].decode("latin-1")
            raise CaffeFtError(f"unexpected character {char!r}", path, line, pos - line_start + 1)
        kind = match.lastgroup or ""
        end = match.end()
        if kind == "newline":
            line += 1
            line_start = end
        elif kind != "space":
            text = data[pos:end].decode("utf-8", "surrogateescape")
            tokens.append(Token(kind, text, line, pos - line_start + 1, pos, end))
        pos = end
    tokens.append(Token("eof", "", line, pos - line_start + 1, pos, pos))
    return tokens


class _Parser:
    def __init__(self, data: bytes, path: str) -> None:
        self.path = path
        self.tokens = _tokenize(data, path)
        self.pos = 0
        self.last_line = 0  # line of the last significant token consumed
        self.last_owner: Optional[Tuple[Node, str]] = None  # who takes a trailing comment

    def error(self, message: str, token: Token) -> CaffeFtError:
        return CaffeFtError(message, self.path, token.line, token.column)

    def peek(self) -> Token:
        return self.tokens[self.pos]

    def take(self) -> Token:
        token = self.tokens[self.pos]
        self.pos += 1
        if token.kind != "comment":
            self.last_line = token.line
        return token

    def comments(self) -> List[str]:
        """Consume comments; attach trailing ones, return whole-line ones."""
        own_lines: List[str] = []
        while self.peek().kind == "comment":
            token = self.tokens[self.pos]
            self.pos += 1
            if token.line == self.last_line and self.last_owner is not None and not own_lines:
                node, slot = self.last_owner
                setattr(node, slot, token.text)
                self.last_owner = None
            else:
                own_lines.append(token.text)
        return own_lines

    def parse(self) -> Node:
        root = Node("", [])
        pending = self.fields(root, closer="")
        root.closing = pending
        return root

    def fields(self, parent: Node, closer: str) -> List[str]:
        """Parse fields into ``parent`` until ``closer``; return dangling comments."""
        assert parent.children is not None
        while True:
            pending = self.comments()
            token = self.peek()
            if token.kind == "eof" or (closer and token.text == closer):
                if token.kind == "eof" and closer:
                    raise self.error(f"missing '{closer}' at end of file", token)
                return pending
            node = self.field()
            node.before = pending
            parent.children.append(node)

    def field(self) -> Node:
        name_token = self.take()
        if name_token.kind != "ident":
            if name_token.text == "[":
                raise self.error("extension fields are not supported", name_token)
            raise self.error(f"expected a field name, found '{name_token.text}'", name_token)
        node = Node(name_token.text)
        node.line, node.column, node.start = name_token.line, name_token.column, name_token.start
        colon = self.peek().text == ":"
        if colon:
            self.take()
        opener = self.peek()
        if opener.text in ("{", "<"):
            self.message_body(node)
        elif opener.text == "[" and colon:
            self.take()
            if self.peek().text in ("{", "<"):
                raise self.error("lists of messages are not supported; repeat the field", opener)
            while True:
                self.scalar(node)
                if self.peek().text == "]":
                    break
                if self.peek().text != ",":
                    raise self.error(f"expected ',' or ']', found '{self.peek().text}'", self.peek())
                self.take()
            node.end = self.take().end
            self.last_owner = (node, "after")
        elif colon:
            self.scalar(node)
            node.end = node.value_tokens[-1][-1].end
            self.last_owner = (node, "after")
        else:
            raise self.error(f"expected ':' or '{{' after '{node.name}'", opener)
        if self.peek().text in (";", ","):
            self.take()
        return node

    def message_body(self, node: Node) -> None:
        opener = self.take()
        node.header_end = opener.end
        node.children = []
        self.last_owner = (node, "after")
        closer = "}" if opener.text == "{" else ">"
        node.closing = self.fields(node, closer)
        close = self.take()
        node.end = close.end
        self.last_owner = (node, "closing_after")

    def scalar(self, node: Node) -> None:
        token = self.take()
        parts = [token]
        if token.text == "-":
            sign = token
            token = self.take()
            if token.kind not in ("number", "ident"):
                raise self.error(f"expected a number after '-', found '{token.text}'", sign)
            parts.append(token)
        elif token.kind == "string":
            while self.peek().kind == "string":
                parts.append(self.take())
        elif token.kind not in ("number", "ident"):
            found = token.text or "end of file"
            raise self.error(f"expected a value for '{node.name}', found '{found}'", token)
        node.value_tokens.append(parts)
        node.values.append("".join(p.text for p in parts))


def parse(data: bytes, path: str = "<text>") -> Node:
    """Parse text-format bytes into a :class:`Node` tree (no schema needed)."""
    return _Parser(data, path).parse()


# ---------------------------------------------------------------------------
# Tree -> message
# ---------------------------------------------------------------------------

_INT_RANGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1),
}
_BOOLS = {"true": True, "True": True, "t": True, "1": True, "false": False, "False": False, "f": False, "0": False}
_SPECIAL_FLOATS = {"inf": float("inf"), "infinity": float("inf"), "nan": float("nan")}
_ESCAPE = re.compile(rb"\\(?:([0-7]{1,3})|x([0-9a-fA-F]{1,2})|(.))", re.DOTALL)
_SIMPLE_ESCAPES = {
    b"n": b"\n", b"t": b"\t", b"r": b"\r", b"a": b"\a", b"b": b"\b", b"f": b"\f", b"v": b"\v",
    b"\\": b"\\", b"'": b"'", b'"': b'"', b"?": b"?",
}

# Hint appended to errors that a fork's schema would fix.
FORK_HINT = "if this file comes from a Caffe fork, give its caffe.proto with --proto PATH (or CAFFE_FT_PROTO)"


def _unescape(body: bytes) -> bytes:
    def replace(match: "re.Match[bytes]") -> bytes:
        octal, hexa, char = match.groups()
        if octal:
            return bytes([int(octal, 8) & 0xFF])
        if hexa:
            return bytes([int(hexa, 16)])
        if char in _SIMPLE_ESCAPES:
            return _SIMPLE_ESCAPES[char]
        raise ValueError(f"invalid escape '\\{char.decode('latin-1')}'")

    return _ESCAPE.sub(replace, body)


def _parse_int(text: str) -> int:
    negative = text.startswith("-")
    digits = text[1:] if negative else text
    if digits[:2] in ("0x", "0X"):
        value = int(digits[2:], 16)
    elif len(digits) > 1 and digits[0] == "0":
        value = int(digits[1:], 8)
    else:
        value = int(digits, 10)
    return -value if negative else value


class _Converter:
    def __init__(self, path: str) -> None:
        self.path = path

    def error(self, message: str, token: Any) -> CaffeFtError:
        return CaffeFtError(message, self.path, token.line, token.column)

    def fill(self, node: Node, message: Message) -> None:
        descriptor = message.DESCRIPTOR
        seen: Dict[str, Node] = {}
        for child in node.children or ():
            field = descriptor.fields_by_name.get(child.name)
            if field is None:
                raise self.error(
                    f"unknown field '{child.name}' in {descriptor.name}; {FORK_HINT}", child
                )
            repeated = is_repeated(field)
            if not repeated and child.name in seen:
                raise self.error(f"field '{child.name}' is set more than once", child)
            seen[child.name] = child
            if field.type in (FD.TYPE_MESSAGE, FD.TYPE_GROUP):
                if not child.is_message:
                    raise self.error(f"'{child.name}' is a message: write {child.name} {{ … }}", child)
                sub = getattr(message, child.name).add() if repeated else getattr(message, child.name)
                sub.SetInParent()
                self.fill(child, sub)
                continue
            if child.is_message:
                raise self.error(f"'{child.name}' takes a value, not a {{ … }} block", child)
            if not repeated and len(child.values) > 1:
                raise self.error(f"field '{child.name}' takes one value, not a list", child)
            values = [self.scalar(field, tokens) for tokens in child.value_tokens]
            if repeated:
                getattr(message, child.name).extend(values)
            else:
                setattr(message, child.name, values[0])

    def scalar(self, field: FieldDescriptor, tokens: List[Token]) -> Any:
        first = tokens[0]
        text = "".join(t.text for t in tokens)
        ftype = field.type
        try:
            if ftype in (FD.TYPE_STRING, FD.TYPE_BYTES):
                if first.kind != "string":
                    raise ValueError(f"expected a quoted string, found '{text}'")
                raw = b"".join(_unescape(t.text[1:-1].encode("utf-8", "surrogateescape")) for t in tokens)
                if ftype == FD.TYPE_BYTES:
                    return raw
                try:
                    return raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise ValueError("string is not valid UTF-8") from None
            if ftype == FD.TYPE_BOOL:
                if text not in _BOOLS:
                    raise ValueError(f"expected true or false, found '{text}'")
                return _BOOLS[text]
            if ftype == FD.TYPE_ENUM:
                enum = field.enum_type
                if tokens[-1].kind == "ident" and len(tokens) == 1:
                    value = enum.values_by_name.get(text)
                    if value is None:
                        names = ", ".join(v.name for v in enum.values)
                        raise ValueError(f"unknown value '{text}' for {field.name} (one of: {names})")
                    return value.number
                number = _parse_int(text)
                if number not in enum.values_by_number:
                    raise ValueError(f"unknown value {number} for {field.name}")
                return number
            if ftype in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
                last = tokens[-1]
                if last.kind == "ident":
                    word = last.text.lower()
                    if word not in _SPECIAL_FLOATS:
                        raise ValueError(f"expected a number, found '{text}'")
                    value = _SPECIAL_FLOATS[word]
                    return -value if len(tokens) == 2 else value
                body = last.text.rstrip("fF")
                value = float(_parse_int(body)) if body[:2] in ("0x", "0X") else float(body)
                return -value if len(tokens) == 2 else value
            # Integer types.
            if tokens[-1].kind != "number" or any(c in text for c in ".eEfF") and not text.lower().startswith(("0x", "-0x")):
                raise ValueError(f"expected an integer, found '{text}'")
            number = _parse_int(text)
            low, high = _INT_RANGES[ftype]
            if not low <= number <= high:
                raise ValueError(f"integer {number} out of range for {field.name}")
            return number
        except ValueError as exc:
            raise self.error(str(exc), first) from None


def to_message(root: Node, message: Message, path: str = "<text>") -> Message:
    """Fill ``message`` from the tree ``root``; raises :class:`CaffeFtError`."""
    _Converter(path).fill(root, message)
    return message


# ---------------------------------------------------------------------------
# Message -> canonical text
# ---------------------------------------------------------------------------


def _escape(raw: bytes) -> str:
    out = []
    for byte in raw:
        char = chr(byte)
        if char == "\n":
            out.append("\\n")
        elif char == "\r":
            out.append("\\r")
        elif char == "\t":
            out.append("\\t")
        elif char in "\"'\\":
            out.append("\\" + char)
        elif 0x20 <= byte < 0x7F:
            out.append(char)
        else:
            out.append("\\%03o" % byte)
    return "".join(out)


def format_value(field: FieldDescriptor, value: Any) -> str:
    """One scalar value as C++ ``TextFormat`` prints it."""
    ftype = field.type
    if ftype == FD.TYPE_STRING:
        return '"' + _escape(value.encode("utf-8")) + '"'
    if ftype == FD.TYPE_BYTES:
        return '"' + _escape(value) + '"'
    if ftype == FD.TYPE_BOOL:
        return "true" if value else "false"
    if ftype == FD.TYPE_ENUM:
        enum_value = field.enum_type.values_by_number.get(value)
        return enum_value.name if enum_value is not None else str(value)
    if ftype == FD.TYPE_FLOAT:
        return format_float(value)
    if ftype == FD.TYPE_DOUBLE:
        return format_double(value)
    return str(value)


def message_fields(message: Message) -> Iterable[Tuple[FieldDescriptor, List[Any]]]:
    """The set fields of ``message`` in field-number order, each with its values."""
    for field, value in sorted(message.ListFields(), key=lambda item: item[0].number):
        yield field, list(value) if is_repeated(field) else [value]


def to_tree(message: Message, name: str = "") -> Node:
    """A comment-free tree for ``message`` with canonical value text."""
    node = Node(name, [])
    assert node.children is not None
    for field, values in message_fields(message):
        for value in values:
            if field.type in (FD.TYPE_MESSAGE, FD.TYPE_GROUP):
                node.children.append(to_tree(value, field.name))
            else:
                child = Node(field.name)
                child.values = [format_value(field, value)]
                node.children.append(child)
    return node


def render(root: Node) -> str:
    """Print a tree in canonical layout, comments included."""
    out: List[str] = []

    def comment_lines(comments: List[str], indent: str) -> None:
        out.extend(f"{indent}{text}\n" for text in comments)

    def trailing(comment: Optional[str]) -> str:
        return f"  {comment}" if comment else ""

    def emit(node: Node, indent: str) -> None:
        comment_lines(node.before, indent)
        if node.children is None:
            for i, value in enumerate(node.values):
                comment = node.after if i == 0 else None
                out.append(f"{indent}{node.name}: {value}{trailing(comment)}\n")
            return
        out.append(f"{indent}{node.name} {{{trailing(node.after)}\n")
        inner = indent + "  "
        for child in node.children:
            emit(child, inner)
        comment_lines(node.closing, inner)
        out.append(f"{indent}}}{trailing(node.closing_after)}\n")

    for child in root.children or ():
        emit(child, "")
    comment_lines(root.closing, "")
    return "".join(out)


def print_message(message: Message) -> str:
    """``message`` as protobuf's C++ ``TextFormat::Print`` writes it."""
    return render(to_tree(message))


# ---------------------------------------------------------------------------
# Keeping comments across a change
# ---------------------------------------------------------------------------


def reconcile(old: Node, new: Message, renames: Optional[Dict[str, str]] = None) -> Node:
    """The canonical tree of ``new`` carrying the comments of ``old``.

    Fields are matched by name (``renames`` maps an old field name to its new
    one, e.g. ``{"layers": "layer"}`` after an upgrade) and repeated fields by
    position.  Comments of old fields that no longer exist move to the next
    field that does, or to the end of the enclosing block, so none is lost.
    """
    renames = renames or {}
    tree = to_tree(new, old.name)
    _transplant(old, tree, renames)
    return tree


def _transplant(old: Node, new: Node, renames: Dict[str, str]) -> None:
    new.before, new.after = list(old.before), old.after
    new.closing_after = old.closing_after
    if old.children is None or new.children is None:
        if old.children is not None:  # message became scalar: keep inner comments
            new.before.extend(c for child in old.children for c in child.comments())
            new.before.extend(old.closing)
        return
    # Pair old and new children by (name, occurrence).  A list-form scalar
    # ``dim: [1, 2]`` stands for as many occurrences as it has values.
    slots: Dict[str, List[Node]] = {}
    for child in new.children:
        slots.setdefault(child.name, []).append(child)
    used: Dict[str, int] = {}
    orphans: List[str] = []
    for child in old.children:
        name = renames.get(child.name, child.name)
        index = used.get(name, 0)
        used[name] = index + max(1, len(child.values))
        targets = slots.get(name, [])
        if index < len(targets):
            _transplant(child, targets[index], renames)
            targets[index].before[:0] = orphans
            orphans = []
        else:
            orphans.extend(child.comments())
    new.closing = orphans + list(old.closing)
