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

import bisect
import functools
import math
import re
from array import array
from itertools import accumulate, chain, repeat
from operator import attrgetter, contains, itemgetter
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

from typing import TYPE_CHECKING

from ..errors import CaffeFtError
from . import wire
from .numbers import format_double, format_float
from .gcpause import paused, pausing
from .schema import FD, TableMessage, is_repeated

if TYPE_CHECKING:
    from google.protobuf.descriptor import FieldDescriptor
    from google.protobuf.message import Message

# Protobuf 3.12's C++ ``io::Tokenizer`` as ``TextFormat`` (and so Caffe's
# ReadProtoFromTextFile) sets it up: ``#`` comments, floats may end in ``f``.
# One group: ``re.split`` cuts the text into gaps and tokens in one C loop
# (the text decoded as Latin-1, one character per byte, so that offsets are
# byte offsets); a gap that is not white space is looked at by ``_bad_token``
# to say what Caffe would say.  The kinds of token start with different
# characters but for ".": a number when one follows (".5"), else the symbol;
# so the most frequent kinds go first, the lone "." last.
_SPLIT = re.compile(
    r"""(
      [!$-&(-\-/:-@\[-^`{-\x7f]
    | [A-Za-z_][A-Za-z0-9_]*
    | (?:0[xX][0-9a-fA-F]+|0[0-7]*(?![0-9.xX])|(?:(?:[1-9][0-9]*|0)(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?[fF]?)(?![A-Za-z0-9_.])
    | "(?:[^"\\\n\x00]|\\(?:[abfnrtv\\?'"0-7]|x[0-9a-fA-F]|u[0-9a-fA-F]{4}|U00[01][0-9a-fA-F]{5}))*"
    | '(?:[^'\\\n\x00]|\\(?:[abfnrtv\\?'"0-7]|x[0-9a-fA-F]|u[0-9a-fA-F]{4}|U00[01][0-9a-fA-F]{5}))*'
    | \#[^\n\x00]*
    | \.
    )""",
    re.VERBOSE,
)
_KINDS = ("", "comment", "number", "ident", "string", "symbol")
_TOKEN_KINDS = (*_KINDS, "eof")  # by a token's kind index (see _Tokens)
_COMMENT, _NUMBER, _IDENT, _STRING, _SYMBOL, _EOF = range(1, 7)
_DOT = 7  # a token starting with ".": a number (".5") or the symbol "."
# A token's kind from its first byte (the regular expression has already told a token from what is not one).
_FIRST_KIND = bytes(
    _COMMENT if byte == 0x23 else _NUMBER if 0x30 <= byte <= 0x39 else _DOT if byte == 0x2E
    else _IDENT if byte == 0x5F or 0x41 <= byte <= 0x5A or 0x61 <= byte <= 0x7A
    else _STRING if byte in (0x22, 0x27) else _SYMBOL
    for byte in range(256)
)
_SPACE = b" \t\r\n\f\v"
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = frozenset(b"abfnrtv\\?'\"01234567")
# Nesting deeper than this is refused ("Message is too deep").  Caffe's schema nests only a few
# levels, so Caffe refuses such text anyway, at the first field the schema lacks; the limit
# keeps a hostile file from exhausting the stack (100 is protobuf's limit for binary input).
MAX_DEPTH = 100


def _bad_string(data: bytes, start: int) -> Tuple[int, str]:
    """Where and why the string literal at ``start`` is not one Caffe reads."""
    quote = data[start]
    pos = start + 1
    while pos < len(data):
        byte = data[pos]
        if byte == 0:
            return pos, "Unexpected end of string."
        if byte == 0x0A:
            return pos, "String literals cannot cross line boundaries."
        if byte == quote:
            break
        if byte == 0x5C:  # backslash
            pos += 1
            escape = data[pos:pos + 1]
            if escape and escape[0] in _ESCAPES:
                pass
            elif escape == b"x":
                if not (pos + 1 < len(data) and data[pos + 1] in _HEX):
                    return pos + 1, "Expected hex digits for escape sequence."
            elif escape == b"u":
                if not all(pos + k < len(data) and data[pos + k] in _HEX for k in range(1, 5)):
                    return pos + 1, "Expected four hex digits for \\u escape sequence."
            elif escape == b"U":
                digits = data[pos + 1:pos + 9]
                if not re.fullmatch(rb"00[01][0-9a-fA-F]{5}", digits):
                    return pos + 1, "Expected eight hex digits up to 10ffff for \\U escape sequence"
            else:
                return pos, "Invalid escape sequence in string literal."
        pos += 1
    return len(data), "Unexpected end of string."


def _bad_number(data: bytes, start: int) -> Tuple[int, str]:
    """Where and why the number at ``start`` is not one Caffe reads."""
    match = re.compile(rb"0[xX][0-9a-fA-F]*|0[0-9]+|(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]*)?[fF]?")
    found = match.match(data, start)
    assert found is not None
    text, end = found.group(), found.end()
    if text[:2] in (b"0x", b"0X"):
        if len(text) == 2:
            return end, '"0x" must be followed by hex digits.'
        floating = False
    elif text[:1] == b"0" and text[1:2].isdigit():
        bad = re.search(rb"[89]", text)
        if bad:
            return start + bad.start(), "Numbers starting with leading zero must be in octal."
        floating = False
    else:
        exponent = re.search(rb"[eE][+-]?(?=[fF]?$)", text)
        if exponent and not text[exponent.end() - 1:exponent.end()].isdigit():
            return start + exponent.end(), '"e" must be followed by exponent.'
        floating = True
    following = data[end:end + 1]
    if following.isalpha() or following == b"_":
        return end, "Need space between number and identifier."
    if following == b"." and floating:
        return end, "Already saw decimal point or exponent; can't have another one."
    return end, "Hex and octal numbers must be integers."


def _bad_token(data: bytes, pos: int) -> Tuple[int, str]:
    """Where and why Caffe's tokenizer refuses the text at ``pos``."""
    while pos < len(data) and data[pos] in _SPACE:
        pos += 1
    byte = data[pos]
    if byte in (0x22, 0x27):
        return _bad_string(data, pos)
    if 0x30 <= byte <= 0x39 or (byte == 0x2E and data[pos + 1:pos + 2].isdigit()):
        return _bad_number(data, pos)
    if byte >= 0x80:
        return pos, f"Interpreting non ascii codepoint {byte}."
    return pos, "Invalid control characters encountered in text."


class _Lines:
    """Turns byte offsets into 1-based line and column numbers (tabs to
    multiples of 8, as protobuf's tokenizer counts them)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self._starts: Optional[List[int]] = None  # where each line starts: made on the first question

    @property
    def starts(self) -> List[int]:
        if self._starts is None:
            self._starts = [0]
            self._starts.extend(match.end() for match in re.finditer(b"\n", self.data))
        return self._starts

    def locate(self, pos: int) -> Tuple[int, int]:
        starts = self.starts
        index = bisect.bisect_right(starts, pos) - 1
        column = 0
        for byte in self.data[starts[index]:pos]:
            column = column + 8 - column % 8 if byte == 0x09 else column + 1
        return index + 1, column + 1


class Token:
    """Token ``at`` of a file's tokens: its kind and text; its byte offsets,
    line and column are worked out when asked for (see :class:`_Tokens`)."""

    __slots__ = ("kind", "text", "at", "source")

    def __init__(self, kind: str, text: str, at: int, source: "_Tokens") -> None:
        self.kind, self.text, self.at, self.source = kind, text, at, source

    @property
    def start(self) -> int:
        return self.source.starts[self.at]

    @property
    def end(self) -> int:
        return self.source.ends[self.at]

    @property
    def line(self) -> int:
        return self.source.lines.locate(self.start)[0]

    @property
    def column(self) -> int:
        return self.source.lines.locate(self.start)[1]

    def __repr__(self) -> str:
        return f"Token({self.kind}, {self.text!r}, {self.line}:{self.column})"


_NONE: Any = ()  # Node's empty lists (see Node.__init__)


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
        "closing_after", "source", "at", "end_at", "header_at", "number", "canonical", "colon", "listed",
    )

    def __init__(self, name: str, children: Optional[List["Node"]] = None, source: Optional["_Tokens"] = None,
                 at: int = 0, colon: bool = True, before: List[str] = _NONE, header_at: int = -1) -> None:
        # The parser gives a message node its place in the file here: a big net has
        # millions of nodes, and every attribute set twice costs.
        self.name = name
        # The four lists start as one shared empty tuple (a big net has millions of
        # nodes, most with no comments and half of them messages without values):
        # give a node its own list to add to; appending to the tuple fails loudly.
        self.values: List[str] = _NONE
        self.value_tokens: List[List[Token]] = _NONE
        self.children = children
        self.before = before
        self.after: Optional[str] = None
        self.closing: List[str] = _NONE
        self.closing_after: Optional[str] = None
        # A parsed node's field name is token ``at`` of ``source`` (made a Token
        # only when asked for); its last token is ``end_at``, a message's ``{`` is ``header_at``.
        self.source = source
        self.at = at
        self.end_at = -1
        self.header_at = header_at
        # Filled by to_message: the field's number and its values as Caffe prints them.
        self.number = 0
        self.canonical: Optional[List[str]] = None
        self.colon = colon  # written with ':' after the name
        self.listed = False  # a scalar written in the ``name: [a, b]`` list form

    @property
    def token(self) -> Optional[Token]:
        """The field name's token, for parsed nodes."""
        return self.source.token(self.at) if self.source is not None else None

    @property
    def start(self) -> int:
        """Byte offset of the field name."""
        return self.source.starts[self.at] if self.source is not None else 0

    @property
    def end(self) -> int:
        """Byte offset just past the value or the closing brace."""
        return self.source.ends[self.end_at] if self.source is not None and self.end_at >= 0 else 0

    @property
    def header_end(self) -> int:
        """For a message: byte offset just past its opening brace."""
        return self.source.ends[self.header_at] if self.source is not None and self.header_at >= 0 else 0

    @property
    def line(self) -> int:
        token = self.token
        return token.line if token is not None else 0

    @property
    def column(self) -> int:
        token = self.token
        return token.column if token is not None else 0

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


class _Tokens:
    """A file's tokens in columns: a kind index (into ``_TOKEN_KINDS``) and a
    text (one str per distinct text) per token.  The parser makes a
    :class:`Token` of one only where it keeps it (a value) or is asked for it
    (a node's position), so the names and punctuation it only steps over never
    live as objects.  Byte offsets (``starts``, ``ends``) are worked out on
    the first question (an error, a rewrite that edits the text): printing or
    inspecting a file never needs them.  ``breaks[i]`` says whether a newline
    comes before token ``i`` since the previous one, where comments need it."""

    __slots__ = ("kinds", "texts", "data", "lines", "breaks", "_starts", "_ends")

    def __init__(self, kinds: bytearray, texts: List[str], data: bytes, lines: _Lines, breaks: bytes) -> None:
        self.kinds, self.texts, self.data, self.lines, self.breaks = kinds, texts, data, lines, breaks
        self._starts: Optional["array[int]"] = None
        self._ends: Optional["array[int]"] = None

    @property
    def starts(self) -> "array[int]":
        if self._starts is None:
            self._starts, self._ends = _positions(self.data)
        return self._starts

    @property
    def ends(self) -> "array[int]":
        if self._ends is None:
            self._starts, self._ends = _positions(self.data)
        return self._ends

    def token(self, index: int) -> Token:
        return Token(_TOKEN_KINDS[self.kinds[index]], self.texts[index], index, self)


def _offsets(parts: List[str]) -> "array[int]":
    """Where each of ``re.split``'s parts starts, and the end of the last."""
    return array("q", accumulate(map(len, parts), initial=0))


def _positions(data: bytes) -> Tuple["array[int]", "array[int]"]:
    """Start and end of every token of ``data`` (valid text), end of file included."""
    offsets = _offsets(_SPLIT.split(data.decode("latin-1")))
    starts, ends = offsets[1:-1:2], offsets[2::2]
    starts.append(len(data))
    ends.append(len(data))
    return starts, ends


def _tokenize(data: bytes, path: str) -> _Tokens:
    """Cut ``data`` into tokens, or say where and why Caffe's tokenizer refuses it.

    All per-token work runs in C (``re.split``, ``map``, ``bytes.translate``);
    Python looks only at the rare tokens that start with a dot."""
    lines = _Lines(data)
    parts = _SPLIT.split(data.decode("latin-1"))  # gap, token, gap, token, ..., gap
    # One str per distinct token text: a net repeats its few field names, braces
    # and small numbers over and over (1.5 M ``layer {}`` are three texts, not 4.5 M).
    known: Dict[str, str] = {}
    found = parts[1::2]
    texts = list(map(known.setdefault, found, found))
    del found
    gaps = parts[0::2]  # gaps[i] comes before token i
    bad = -1
    if "".join(gaps).strip(" \t\r\n\f\v"):
        index = next(i for i, gap in enumerate(gaps) if gap.strip(" \t\r\n\f\v"))
        bad = _offsets(parts)[2 * index]
    del parts
    kinds = bytearray("".join(map(itemgetter(0), texts)).encode("latin-1").translate(_FIRST_KIND))
    index = kinds.find(_DOT)
    while index >= 0:
        if len(texts[index]) == 1:
            kinds[index] = _SYMBOL
        elif index > 0 and kinds[index - 1] == _IDENT and not gaps[index]:
            where = sum(map(len, gaps[:index + 1])) + sum(map(len, texts[:index]))  # Latin-1: one char a byte
            if bad < 0 or where < bad:
                line, column = lines.locate(where)
                raise CaffeFtError("Need space between identifier and decimal point.", path, line, column)
        else:
            kinds[index] = _NUMBER
        index = kinds.find(_DOT, index + 1)
    if bad >= 0:
        where, message = _bad_token(data, bad)
        line, column = lines.locate(where)
        raise CaffeFtError(message, path, line, column)
    breaks = bytes(map(contains, gaps, repeat("\n"))) if kinds.find(_COMMENT) >= 0 else b""
    del gaps
    if not data.isascii():  # Latin-1 back to what the bytes say (strings and comments only)
        fixed = {text: text.encode("latin-1").decode("utf-8", "surrogateescape")
                 for text in known if not text.isascii()}
        if fixed:
            texts = [fixed.get(text, text) for text in texts]
    kinds.append(_EOF)
    texts.append("")
    return _Tokens(kinds, texts, data, lines, breaks)


class _Parser:
    """Text to tree.  :meth:`fields` walks the common forms (``name {``,
    ``name: value``, ``}``, comments) in one loop over the token columns with
    its own stack; every other form, and every error, goes through
    :meth:`field` and the methods below it, which read :class:`Token`s."""

    def __init__(self, data: bytes, path: str) -> None:
        self.path = path
        self.tokens = tokens = _tokenize(data, path)
        self.kinds, self.texts = tokens.kinds, tokens.texts
        self.data = data
        self.pos = 0
        self.last_owner: Optional[Tuple[Node, str]] = None  # who takes a trailing comment

    def error(self, message: str, token: Token) -> CaffeFtError:
        return CaffeFtError(message, self.path, token.line, token.column)

    def peek(self) -> Token:
        return self.tokens.token(self.pos)

    def take(self) -> Token:
        token = self.tokens.token(self.pos)
        self.pos += 1
        return token

    def comments(self) -> List[str]:
        """Consume comments; attach trailing ones, return whole-line ones."""
        own_lines: List[str] = _NONE
        kinds, pos, breaks = self.kinds, self.pos, self.tokens.breaks
        # Comments are consumed only here, so a comment right after a significant
        # token (no newline between) is the first of its run, and has a token before it.
        first = pos
        while kinds[pos] == _COMMENT:
            text = self.texts[pos]
            same_line = pos == first and pos > 0 and not breaks[pos]
            pos += 1
            if same_line and self.last_owner is not None and not own_lines:
                node, slot = self.last_owner
                setattr(node, slot, text)
                self.last_owner = None
            else:
                if not own_lines:
                    own_lines = []
                own_lines.append(text)
        self.pos = pos
        return own_lines

    def parse(self) -> Node:
        root = Node("", [])
        pending = self.fields(root, closer="")
        assert pending is not None
        root.closing = pending
        return root

    def batches(self, batch: int) -> Iterator[List[Node]]:
        """The file's top-level fields, as :meth:`parse` makes them, in lists
        of about ``batch`` (the file's closing comments are dropped)."""
        root = Node("", [])
        with paused():
            while True:
                pending = self.fields(root, closer="", batch=batch)
                yield root.children or []
                if pending is not None:
                    return
                root.children = []

    def fields(self, parent: Node, closer: str, depth: int = 0, batch: int = 0) -> Optional[List[str]]:
        """Parse fields into ``parent`` until ``closer``; return dangling comments.

        Messages opened with ``{`` are parsed here too, on ``stack`` (their
        parents' state), not by recursion: the loop and its locals are most
        of what a big file costs.  With ``batch``, return None instead once
        ``parent`` has that many fields (a top-level message just closed):
        call again for the next ones."""
        kinds, texts, tokens = self.kinds, self.texts, self.tokens
        assert parent.children is not None
        children: List[Node] = parent.children
        stack: List[Tuple[Node, str, List[Node]]] = []
        pos = self.pos
        while True:
            pending: List[str] = _NONE
            kind = kinds[pos]
            if kind == _COMMENT:
                self.pos = pos
                pending = self.comments()
                pos = self.pos
                kind = kinds[pos]
            text = texts[pos]
            if kind == _EOF or (closer and text == closer):
                if kind == _EOF and closer:
                    raise self.error(f'Expected "{closer}", found end of file.', tokens.token(pos))
                if not stack:
                    self.pos = pos
                    return pending
                parent.closing = pending
                parent.end_at = pos
                self.last_owner = (parent, "closing_after")
                pos += 1
                parent, closer, children = stack.pop()
                depth -= 1
                if texts[pos] in (";", ","):
                    pos += 1
                if batch and not stack and len(children) >= batch:
                    self.pos = pos
                    return None
                continue
            if kind == _IDENT:
                after = pos + 1
                value = texts[after]
                colon = value == ":"
                if colon:
                    after += 1
                    value = texts[after]
                if value == "{":
                    if depth >= MAX_DEPTH:
                        raise self.error(f"Message is too deep: nested more than {MAX_DEPTH} levels",
                                         tokens.token(after))
                    inner: List[Node] = []
                    node = Node(text, inner, tokens, pos, colon, pending, after)
                    children.append(node)
                    self.last_owner = (node, "after")
                    stack.append((parent, closer, children))
                    parent, closer, children = node, "}", inner
                    depth += 1
                    pos = after + 1
                    continue
                if colon and _NUMBER <= kinds[after] <= _STRING and kinds[after + 1] != _STRING:
                    node = Node(text)
                    node.source, node.at, node.before = tokens, pos, pending
                    node.values, node.value_tokens = [value], [[tokens.token(after)]]
                    node.end_at = after
                    children.append(node)
                    self.last_owner = (node, "after")
                    pos = after + 1
                    if texts[pos] in (";", ","):
                        pos += 1
                    continue
            self.pos = pos  # any other form, or an error
            nodes = self.field(depth)
            nodes[0].before = pending
            children.extend(nodes)
            pos = self.pos

    def field(self, depth: int) -> List[Node]:
        """One field: a node, or one per message of a ``name: [{...}, {...}]`` list."""
        name_token = self.take()
        if name_token.kind != "ident":
            if name_token.text == "[":
                raise self.error("extension fields are not supported", name_token)
            found = name_token.text or "end of file"
            raise self.error(f"Expected identifier, got: {found}", name_token)
        node = Node(name_token.text)
        node.source, node.at = self.tokens, self.pos - 1
        node.colon = self.peek().text == ":"
        if node.colon:
            self.take()
        opener = self.peek()
        nodes = [node]
        if opener.text in ("{", "<"):
            self.message_body(node, depth)
        elif opener.text == "[":
            self.take()
            node.listed = True
            if self.peek().text in ("{", "<"):
                nodes = self.message_list(node, depth)
            elif self.peek().text != "]":
                while True:
                    self.scalar(node)
                    if self.peek().text == "]":
                        break
                    if self.peek().text != ",":
                        raise self.error(f'Expected ",", found "{self.peek().text}".', self.peek())
                    self.take()
            close = self.take()
            nodes[-1].end_at = close.at
            self.last_owner = (nodes[-1], "closing_after" if nodes[-1].is_message else "after")
        elif node.colon:
            self.scalar(node)
            node.end_at = node.value_tokens[-1][-1].at
            self.last_owner = (node, "after")
        else:
            raise self.error(f'Expected ":", found "{opener.text}".', opener)
        if self.peek().text in (";", ","):
            self.take()
        return nodes

    def message_list(self, first: Node, depth: int) -> List[Node]:
        """``name: [{...}, <...>]``: one message node per element."""
        nodes: List[Node] = []
        while True:
            node = first if not nodes else Node(first.name)
            node.source, node.at, node.colon = first.source, first.at, first.colon
            if self.peek().text not in ("{", "<"):
                raise self.error(f'Expected "{{", found "{self.peek().text}".', self.peek())
            self.message_body(node, depth)
            nodes.append(node)
            if self.peek().text == "]":
                return nodes
            if self.peek().text != ",":
                raise self.error(f'Expected ",", found "{self.peek().text}".', self.peek())
            self.take()

    def message_body(self, node: Node, depth: int) -> None:
        opener = self.take()
        if depth >= MAX_DEPTH:
            raise self.error(f"Message is too deep: nested more than {MAX_DEPTH} levels", opener)
        node.header_at = opener.at
        node.children = []
        self.last_owner = (node, "after")
        closer = "}" if opener.text == "{" else ">"
        closing = self.fields(node, closer, depth + 1)
        assert closing is not None  # no batch: read to the closer
        node.closing = closing
        close = self.take()
        node.end_at = close.at
        self.last_owner = (node, "closing_after")

    def scalar(self, node: Node) -> None:
        token = self.take()
        parts = [token]
        if token.text == "-":
            if self.peek().kind not in ("number", "ident"):
                found = self.peek().text or "end of file"
                raise self.error(f'Expected a number after "-", got: {found}', self.peek())
            parts.append(self.take())
        elif token.kind == "string":
            while self.peek().kind == "string":
                parts.append(self.take())
        elif token.kind not in ("number", "ident"):
            found = token.text or "end of file"
            raise self.error(f"Expected a value, got: {found}", token)
        text = parts[0].text if len(parts) == 1 else "".join(p.text for p in parts)
        if node.value_tokens:
            node.value_tokens.append(parts)
            node.values.append(text)
        else:
            node.value_tokens, node.values = [parts], [text]


@pausing
def parse(data: bytes, path: str = "<text>") -> Node:
    """Parse text-format bytes into a :class:`Node` tree (no schema needed)."""
    return _Parser(data, path).parse()


def parse_fields(data: bytes, path: str = "<text>", batch: int = 64) -> Iterator[Node]:
    """:func:`parse`'s top-level nodes one at a time, ``batch`` parsed ahead:
    a reader that drops each once read never holds the whole tree, and reads
    each node while it is still in the processor's cache (on 50k layers, 64
    ahead is 5% faster than the whole tree first, 4096 ahead 5% slower).  An
    error in the tokens is raised here, one in the syntax when the parser
    reaches it."""
    parser = _Parser(data, path)  # the tokens: a syntax error anywhere in the file is raised here
    return chain.from_iterable(parser.batches(batch))  # one generator step a batch, not a node


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
_TRUE, _FALSE = ("true", "True", "t"), ("false", "False", "f")
_SPECIAL_FLOATS = {"inf": float("inf"), "infinity": float("inf"), "nan": float("nan")}
_FLOAT_MAX = 3.4028234663852886e38
# Halfway from the largest float to 2**128: a text value up to it reads as the largest float (protobuf's
# SafeDoubleToFloat; Caffe prints that float as 3.40282347e+38, which must read back as itself).
_FLOAT_MAX_ROUNDED = 3.4028235677973366e38
_ESCAPE = re.compile(rb"\\(?:([0-7]{1,3})|x([0-9a-fA-F]{1,2})|u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8})|(.))", re.DOTALL)
_TRAIL = re.compile(rb"\\u([dD][c-fC-F][0-9a-fA-F]{2})")
_SIMPLE_ESCAPES = {
    b"n": b"\n", b"t": b"\t", b"r": b"\r", b"a": b"\a", b"b": b"\b", b"f": b"\f", b"v": b"\v",
    b"\\": b"\\", b"'": b"'", b'"': b'"', b"?": b"?",
}
_EXPECTED = {  # what protobuf's parser says it wanted, by field type
    FD.TYPE_STRING: "string", FD.TYPE_BYTES: "string", FD.TYPE_BOOL: "identifier",
    FD.TYPE_ENUM: "integer or identifier", FD.TYPE_FLOAT: "double", FD.TYPE_DOUBLE: "double",
}

# Hint appended to errors that a fork's schema would fix.
FORK_HINT = "if this file comes from a Caffe fork, give its caffe.proto with --proto PATH (or CAFFE_FT_PROTO)"


def _utf8(code: int) -> bytes:
    """``code`` in UTF-8 as protobuf's ``AppendUTF8`` writes it (surrogates too)."""
    if code <= 0x7F:
        return bytes([code])
    if code <= 0x7FF:
        return bytes([0xC0 | code >> 6, 0x80 | code & 0x3F])
    if code <= 0xFFFF:
        return bytes([0xE0 | code >> 12, 0x80 | code >> 6 & 0x3F, 0x80 | code & 0x3F])
    if code <= 0x1FFFFF:
        return bytes([0xF0 | code >> 18, 0x80 | code >> 12 & 0x3F, 0x80 | code >> 6 & 0x3F, 0x80 | code & 0x3F])
    return b"\\U%08x" % code


def _unescape(body: bytes) -> bytes:
    """The bytes of a string literal's body, as protobuf's ``ParseStringAppend``
    reads them (the tokenizer has already refused malformed escapes)."""
    out = []
    pos = 0
    for match in _ESCAPE.finditer(body):
        out.append(body[pos:match.start()])
        pos = match.end()
        octal, hexa, short, long, char = match.groups()
        if octal:
            out.append(bytes([int(octal, 8) & 0xFF]))
        elif hexa:
            out.append(bytes([int(hexa, 16)]))
        elif short or long:
            code = int(short or long, 16)
            if 0xD800 <= code <= 0xDBFF:  # a head surrogate takes a following \u trail surrogate
                trail = _TRAIL.match(body, pos)
                if trail:
                    code = 0x10000 + ((code - 0xD800) << 10) + (int(trail.group(1), 16) - 0xDC00)
                    pos = trail.end()
            out.append(_utf8(code))
        elif char in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[char])
        else:
            raise ValueError("Invalid escape sequence in string literal.")
    out.append(body[pos:])
    return b"".join(out)


def _parse_int(text: str, limit: int) -> Optional[int]:
    """An unsigned integer token's value as ``Tokenizer::ParseInteger`` reads it
    (``0x`` hex, leading-zero octal), or None past ``limit``."""
    if text[:2] in ("0x", "0X"):
        value = int(text[2:], 16)
    elif len(text) > 1 and text[0] == "0":
        value = int(text[1:], 8)
    else:
        value = int(text, 10)
    return value if value <= limit else None


def _is_float(token: Token) -> bool:
    text = token.text
    return token.kind == "number" and text[:2] not in ("0x", "0X") and any(c in text for c in ".eEfF")


def _string_record(field: FieldDescriptor, raw: bytes) -> bytes:
    """The wire record of a string field holding ``raw`` (for bytes that are not UTF-8)."""
    return wire.key_bytes(field.number, wire.BYTES) + wire.varint_bytes(len(raw)) + raw


class _Converter:
    def __init__(self, path: str) -> None:
        self.path = path
        # A one-token value of a field always reads the same: its value and
        # canonical text, by (field, token text).  A net repeats its values
        # (``kernel_size: 3``, ``type: "ReLU"``) thousands of times.
        self.known: Dict[Tuple[Any, str], Tuple[Any, str]] = {}
        # By message type, by field name: the field, whether repeated, whether a message.
        self.fields: Dict[Any, Dict[str, Tuple[Any, bool, bool]]] = {}

    def error(self, message: str, token: Any) -> CaffeFtError:
        return CaffeFtError(message, self.path, token.line, token.column)

    def fill(self, node: Node, descriptor: Any, message: Optional[Message]) -> None:
        """Check ``node``'s fields against ``descriptor`` (a protobuf ``Descriptor``
        or a :class:`TableMessage`), setting canonical values; fill ``message`` unless None."""
        seen: Dict[str, Node] = {}
        fields = self.fields.get(descriptor)
        if fields is None:
            fields = self.fields[descriptor] = {}
        for child in node.children or ():
            about = fields.get(child.name)
            if about is None:
                field = descriptor.fields_by_name.get(child.name)
                if field is None:
                    raise self.error(
                        f'Message type "{descriptor.full_name}" has no field named "{child.name}"; {FORK_HINT}', child
                    )
                about = fields[child.name] = (field, is_repeated(field), field.type in (FD.TYPE_MESSAGE, FD.TYPE_GROUP))
            field, repeated, is_message = about
            if not repeated:
                if child.name in seen:
                    raise self.error(f'Non-repeated field "{child.name}" is specified multiple times.', child)
                seen[child.name] = child
            child.number = field.number
            if is_message:
                if not child.is_message:
                    if child.listed and not child.values and repeated:
                        child.canonical = []
                        continue  # ``name: []``
                    found = "[" if child.listed else child.values[0]
                    raise self.error(f'Expected "{{", found "{found}" ({child.name} is a message).', child)
                if message is None:
                    if child.children:  # an empty message (``layer {}``) has nothing to check
                        self.fill(child, field.message_type, None)
                    continue
                if repeated:
                    sub = getattr(message, child.name).add()  # present once added
                else:
                    sub = getattr(message, child.name)
                    sub.SetInParent()
                if child.children:
                    self.fill(child, field.message_type, sub)
                continue
            if not child.colon:
                found = "[" if child.listed else "{"
                raise self.error(f'Expected ":", found "{found}".', child)
            expected = _EXPECTED.get(field.type, "integer")
            if child.is_message:
                raise self.error(f"Expected {expected}, got: {{ ({child.name} takes a value)", child)
            if child.listed and not repeated:
                raise self.error(f"Expected {expected}, got: [ ({child.name} is not repeated)", child)
            values = []
            canonical = []
            for tokens in child.value_tokens:
                key = (field, tokens[0].text) if len(tokens) == 1 else None
                known = self.known.get(key) if key is not None else None
                if known is None:
                    text = tokens[0].text
                    if (key is not None and field.type == FD.TYPE_STRING and text[0] == '"'
                            and _PLAIN_TEXT.fullmatch(text, 1, len(text) - 1)):
                        known = (text[1:-1], text)  # printable ASCII, no escapes: prints as written
                    else:
                        value = self.scalar(field, tokens)
                        known = (value, format_value(field, value))
                    if key is not None:
                        self.known[key] = known
                values.append(known[0])
                canonical.append(known[1])
            child.canonical = canonical
            if message is None:
                continue
            if repeated:
                target = getattr(message, child.name)
                for value in values:
                    if isinstance(value, bytes) and field.type == FD.TYPE_STRING:
                        self.merge_bytes(message, field, value, child)
                    else:
                        target.append(value)
            elif isinstance(values[0], bytes) and field.type == FD.TYPE_STRING:
                self.merge_bytes(message, field, values[0], child)
            else:
                setattr(message, child.name, values[0])

    def merge_bytes(self, message: Message, field: FieldDescriptor, value: bytes, child: Node) -> None:
        """Set string ``field`` to bytes that are not UTF-8, as Caffe keeps them
        (through the wire format: only there does protobuf take such a string)."""
        try:
            message.MergeFromString(_string_record(field, value))
        except ValueError:  # UnicodeDecodeError: only protobuf's pure-Python runtime checks proto2 strings
            raise self.error(f"{field.full_name} is not UTF-8, which protobuf's pure-Python runtime refuses "
                             "(Caffe and protobuf's C runtimes read it): unset "
                             "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", child) from None

    def scalar(self, field: FieldDescriptor, tokens: List[Token]) -> Any:
        """One value, read as protobuf's ``TextFormat`` parser reads a field of its type."""
        first, last = tokens[0], tokens[-1]
        negative = first.text == "-"
        ftype = field.type
        if ftype in (FD.TYPE_STRING, FD.TYPE_BYTES):
            if first.kind != "string":
                raise self.error(f"Expected string, got: {first.text}", first)
            if negative:
                raise self.error("Expected string, got: -", first)
            raw = b"".join(_unescape(t.text[1:-1].encode("utf-8", "surrogateescape")) for t in tokens)
            if ftype == FD.TYPE_BYTES:
                return raw
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                return raw  # Caffe keeps the bytes; so does the message (see fill)
        if ftype == FD.TYPE_BOOL:
            if first.kind == "number" and not _is_float(first):
                value = _parse_int(first.text, 1)
                if value is None:
                    raise self.error(f"Integer out of range ({first.text})", first)
                return bool(value)
            if first.kind != "ident":
                raise self.error(f"Expected identifier, got: {first.text}", first)
            if first.text in _TRUE or first.text in _FALSE:
                return first.text in _TRUE
            raise self.error(f'Invalid value for boolean field "{field.name}". Value: "{first.text}".', first)
        if ftype == FD.TYPE_ENUM:
            enum = field.enum_type
            if first.kind == "ident":
                value = enum.values_by_name.get(first.text)
                if value is None:
                    names = ", ".join(v.name for v in enum.values)
                    raise self.error(f'Unknown enumeration value of "{first.text}" for field "{field.name}" '
                                     f"(one of: {names}).", first)
                return value.number
            if not negative and (first.kind != "number" or _is_float(first)):
                raise self.error(f"Expected integer or identifier, got: {first.text}", first)
            number = self.integer(last, 2**31 - 1, negative)
            if number not in enum.values_by_number:
                raise self.error(f'Unknown enumeration value of "{number}" for field "{field.name}".', first)
            return number
        if ftype in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
            if last.kind == "ident":
                word = last.text.lower()
                if word not in _SPECIAL_FLOATS:
                    raise self.error(f"Expected double, got: {last.text}", last)
                real = _SPECIAL_FLOATS[word]
            elif last.kind != "number":
                raise self.error(f"Expected double, got: {last.text}", last)
            elif _is_float(last):
                real = float(last.text.rstrip("fF"))
            else:
                text = last.text
                if len(text) > 1 and text[0] == "0" and (text[1] in "xX" or text[1] in "01234567"):
                    raise self.error(f"Expect a decimal number, got: {text}", last)
                real = float(int(text))
            real = -real if negative else real
            if ftype == FD.TYPE_FLOAT and abs(real) > _FLOAT_MAX:  # protobuf's SafeDoubleToFloat
                real = math.copysign(_FLOAT_MAX if abs(real) <= _FLOAT_MAX_ROUNDED else math.inf, real)
            return real
        # Integer types.
        low, high = _INT_RANGES[ftype]
        if negative and low == 0:
            raise self.error("Expected integer, got: -", first)
        return self.integer(last, high, negative)

    def integer(self, token: Token, high: int, negative: bool) -> int:
        """A (possibly negated) integer token within ``-(high + 1)..high``."""
        if token.kind != "number" or _is_float(token):
            raise self.error(f"Expected integer, got: {token.text}", token)
        value = _parse_int(token.text, high + 1 if negative else high)
        if value is None:
            raise self.error(f"Integer out of range ({token.text})", token)
        return -value if negative else value


@pausing
def to_message(root: Node, message: Message, path: str = "<text>") -> Message:
    """Fill ``message`` from the tree ``root``; raises :class:`CaffeFtError`."""
    _Converter(path).fill(root, message.DESCRIPTOR, message)
    return message


class MessageBuilder:
    """:func:`to_message` and :func:`check_tree` for nodes of one file, one at a time (a net's
    layers, each built only when needed and dropped after), sharing what it
    learns of their values."""

    def __init__(self, path: str = "<text>") -> None:
        self._converter = _Converter(path)

    def build(self, node: Node, message: Message) -> Message:
        """Fill ``message`` from ``node``'s fields (checking them: see :meth:`check`)."""
        self._converter.fill(node, message.DESCRIPTOR, message)
        return message

    def check(self, node: Node, table: TableMessage) -> None:
        """What :func:`check_tree` does to ``node``, a message of the type ``table`` describes."""
        self._converter.fill(node, table, None)


def string_value(canonical: str) -> Union[str, bytes]:
    """The value of a checked string field from its canonical text (one of a
    node's ``canonical``): what its message holds, bytes where not UTF-8."""
    body = canonical[1:-1]
    if "\\" not in body:
        return body  # printable ASCII but quotes and backslashes: printed as is
    raw = _unescape(body.encode("utf-8", "surrogateescape"))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


@pausing
def check_tree(root: Node, table: TableMessage, path: str = "<text>") -> Node:
    """What :func:`to_message` does to ``root`` (errors, canonical values, field
    numbers) against a schema's field table, building no message: all that
    ``fmt`` needs, without protobuf."""
    _Converter(path).fill(root, table, None)
    return root


# ---------------------------------------------------------------------------
# Message -> canonical text
# ---------------------------------------------------------------------------


# Bytes that print as themselves: printable ASCII but for the quotes and the backslash.
_PLAIN = re.compile(rb"[ !#-&(-\[\]-~]*")
_PLAIN_TEXT = re.compile(_PLAIN.pattern.decode("ascii"))


def _escape(raw: bytes) -> str:
    """``raw`` escaped as C++ ``CEscape`` does (octal for other bytes)."""
    if _PLAIN.fullmatch(raw):
        return raw.decode("ascii")  # nearly every name and path: no per-byte work
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


def format_string(value: Union[str, bytes]) -> str:
    """A quoted prototxt string literal for ``value`` (bytes: a string that is not UTF-8)."""
    return '"' + _escape(value if isinstance(value, bytes) else value.encode("utf-8")) + '"'


def format_value(field: FieldDescriptor, value: Any) -> str:
    """One scalar value as C++ ``TextFormat`` prints it."""
    ftype = field.type
    if ftype == FD.TYPE_STRING:
        return format_string(value)
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


@pausing
def render(root: Node) -> str:
    """Print a tree in canonical layout, comments included."""
    out: List[str] = []

    def comment_lines(comments: List[str], indent: str) -> None:
        out.extend(f"{indent}{text}\n" for text in comments)

    def trailing(comment: Optional[str]) -> str:
        return f"  {comment}" if comment else ""

    # A message's opening and closing lines repeat (``layer {`` thousands of
    # times): one str each, shared, keeps the list of lines small.  By indent:
    # the opening line of each field name, and the closing line.
    levels: Dict[str, Tuple[Dict[str, str], str]] = {}

    def emit(children: List[Node], indent: str) -> None:
        level = levels.get(indent)
        if level is None:
            level = levels[indent] = ({}, f"{indent}}}\n")
        openings, closing = level
        for node in children:
            if node.before:
                comment_lines(node.before, indent)
            name = node.name
            inner = node.children
            if inner is None:
                values = node.values
                if len(values) == 1 and not node.after:
                    out.append(f"{indent}{name}: {values[0]}\n")
                    continue
                for i, value in enumerate(values):  # (``name: []`` prints nothing, not even its comment)
                    out.append(f"{indent}{name}: {value}{trailing(node.after) if i == 0 else ''}\n")
                continue
            if node.after:
                out.append(f"{indent}{name} {{{trailing(node.after)}\n")
            else:
                opening = openings.get(name)
                if opening is None:
                    opening = openings[name] = f"{indent}{name} {{\n"
                out.append(opening)
            if inner:
                emit(inner, indent + "  ")
            if node.closing:
                comment_lines(node.closing, indent + "  ")
            out.append(f"{indent}}}{trailing(node.closing_after)}\n" if node.closing_after else closing)

    emit(root.children or [], "")
    comment_lines(root.closing, "")
    return "".join(out)


def canonicalize(root: Node) -> Node:
    """Put a tree that went through :func:`to_message` in canonical form, in place.

    Children are ordered by field number (repeated fields keep their order)
    and values take Caffe's spelling, so ``render(canonicalize(tree))`` is
    the C++ printout of the message plus the tree's comments.
    """
    children = root.children
    if not children:
        return root
    for child in children:
        if child.canonical is not None:
            child.values = child.canonical
        if child.children:
            canonicalize(child)
    if len(children) > 1:
        children.sort(key=_NUMBER_OF)
    return root


_NUMBER_OF = attrgetter("number")


@pausing
def print_message(message: Message) -> str:
    """``message`` as protobuf's C++ ``TextFormat::Print`` writes it."""
    return render(to_tree(message))


# ---------------------------------------------------------------------------
# Keeping comments across a change
# ---------------------------------------------------------------------------


@pausing
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


# ---------------------------------------------------------------------------
# Minimal edits: change only the lines that carry a change
# ---------------------------------------------------------------------------


@pausing
def render_minimal(old: Node, source: bytes, new: Message, path: str = "<text>") -> str:
    """Text of ``new`` written as an edit of ``source`` (whose tree is ``old``).

    Fields whose value did not change keep their original text byte for byte,
    comments and layout included; a changed scalar has only its value
    replaced; removed fields vanish with their comments; new fields are
    inserted in canonical form next to the field before them.  So the textual
    diff between ``source`` and the result holds only lines that carry a change.
    """
    printer = _MinimalPrinter(source, path)
    # The top level has no closing brace: what follows its last field (trailing comments) is kept too.
    return printer.block(old, new, indent="") + printer.text(printer.tail_start(old), len(source))


def comment_lines(text: str) -> List[Tuple[int, str]]:
    """The comments of a prototext, as (line number, comment text from ``#``),
    a ``#`` inside a quoted string not counting."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        if "#" not in line:
            continue  # most lines: no character-by-character walk
        if '"' not in line and "'" not in line:
            found.append((number, line[line.index("#"):].rstrip()))
            continue
        quote = ""
        escaped = False
        for index, char in enumerate(line):
            if quote:
                if escaped:
                    escaped = False
                elif char == "\\":
                    escaped = True
                elif char == quote:
                    quote = ""
            elif char in "\"'":
                quote = char
            elif char == "#":
                found.append((number, line[index:].rstrip()))
                break
    return found


def _line_boundary(source: bytes, pos: int) -> int:
    """Where the text owned by a field ending at ``pos`` stops: after its
    trailing comment and newline, or at ``pos`` if another field follows on
    the same line."""
    end = pos
    size = len(source)
    while end < size and source[end:end + 1] in b" \t\r":
        end += 1
    if end < size and source[end:end + 1] == b"#":
        end = source.find(b"\n", end)
        end = size if end < 0 else end
    if end >= size:
        return size
    if source[end:end + 1] == b"\n":
        return end + 1
    return pos


class _MinimalPrinter:
    """Writes a new message as edits of the old text.

    A block's text is cut into segments, one per child: child ``i`` owns
    ``source[bounds[i]:bounds[i + 1]]`` (the comments above it, itself, and the
    rest of its last line).  Kept children copy their segment, changed ones
    edit it, removed ones drop it, and new ones are inserted between segments.
    """

    def __init__(self, source: bytes, path: str) -> None:
        self.source = source
        self.converter = _Converter(path)

    def text(self, start: int, end: int) -> str:
        return self.source[start:end].decode("utf-8", "surrogateescape")

    def block(self, node: Node, message: Message, indent: str) -> str:
        """The children of ``node`` re-written for ``message``, braces excluded."""
        children = node.children or []
        items = [(field, value) for field, values in message_fields(message) for value in values]
        old_of = self.match(children, items)
        bounds = [self.open_bound(node)]
        bounds.extend(_line_boundary(self.source, child.end) for child in children)
        # New items go after the old child holding the item before them.
        inserts: Dict[int, List[int]] = {}
        item_of: Dict[int, int] = {}
        anchor = -1
        for item, old in enumerate(old_of):
            if old is None:
                inserts.setdefault(anchor, []).append(item)
            else:
                item_of[old] = item
                anchor = max(anchor, old)
        child_indent = self.child_indent(node, indent)
        # A new message follows the style (one line or several) of the nearest
        # written sibling of the same field, preferring the one before it.
        def one_line(name: str, anchor: int) -> bool:
            order = list(range(anchor, -1, -1)) + list(range(anchor + 1, len(children)))
            for j in order:
                if 0 <= j < len(children) and children[j].name == name and children[j].is_message:
                    return b"\n" not in self.source[children[j].start:children[j].end]
            return False

        out: List[str] = []
        self.insert(out, inserts.get(-1, []), items, child_indent, not self.at_line_start(bounds[0]),
                    lambda name: one_line(name, 0))
        for index, child in enumerate(children):
            if index in item_of:  # an old child with no new item is dropped
                field, value = items[item_of[index]]
                out.append(self.rewrite(child, field, value, bounds[index], bounds[index + 1], child_indent))
            pending = inserts.get(index, [])
            if pending:
                at_line_start = (out[-1].endswith("\n") if out else self.at_line_start(bounds[0]))
                self.insert(out, pending, items, child_indent, not at_line_start,
                            functools.partial(one_line, anchor=index))
        return "".join(out)

    def open_bound(self, node: Node) -> int:
        return _line_boundary(self.source, node.header_end) if node.name else 0

    def at_line_start(self, pos: int) -> bool:
        return pos == 0 or self.source[pos - 1:pos] == b"\n"

    def tail_start(self, node: Node) -> int:
        if node.children:
            return _line_boundary(self.source, node.children[-1].end)
        return self.open_bound(node)

    def child_indent(self, node: Node, indent: str) -> str:
        for child in node.children or []:
            line_start = self.source.rfind(b"\n", 0, child.start) + 1
            prefix = self.source[line_start:child.start]
            if not prefix.strip():
                return prefix.decode("utf-8")
        return indent + "  " if node.name else indent

    def insert(self, out: List[str], new: List[int], items, indent: str, inline: bool,
               one_line: Callable[[str], bool]) -> None:
        for item in new:
            field, value = items[item]
            node = _item_tree(field, value)
            if inline:
                out.append(" " + _one_line(node))
            elif node.is_message and one_line(node.name):
                out.append(indent + _one_line(node) + "\n")
            else:
                lines = render(Node("", [node])).splitlines(True)
                out.append("".join(indent + line for line in lines))

    def rewrite(self, child: Node, field, value, start: int, end: int, indent: str) -> str:
        """The segment of one old child, made to carry ``value``."""
        if self.same(child, field, value):
            return self.text(start, end)
        is_message = field.type in (FD.TYPE_MESSAGE, FD.TYPE_GROUP)
        if is_message and child.is_message:
            open_bound = self.open_bound(child)
            inner = self.block(child, value, indent)
            return self.text(start, open_bound) + inner + self.text(self.tail_start(child), end)
        if not is_message and not child.is_message and len(child.values) == 1:
            value_start = child.value_tokens[0][0].start
            return self.text(start, value_start) + format_value(field, value) + self.text(child.end, end)
        # The form changed (a list, or message vs scalar): write it canonically.
        lines = render(Node("", [_item_tree(field, value)])).splitlines(True)
        body = "".join(line if i == 0 else indent + line for i, line in enumerate(lines))
        return self.text(start, child.start) + body.rstrip("\n") + self.text(child.end, end)

    def same(self, child: Node, field, value) -> bool:
        if field.type in (FD.TYPE_MESSAGE, FD.TYPE_GROUP):
            if not child.is_message:
                return False
            old = type(value)()
            self.converter.fill(child, old.DESCRIPTOR, old)
            return old == value
        if child.is_message or len(child.values) != 1:
            return False
        old_value = self.converter.scalar(field, child.value_tokens[0])
        return format_value(field, old_value) == format_value(field, value)

    @staticmethod
    def match(children: List[Node], items) -> List[Optional[int]]:
        """For each new item, the index of the old child it replaces (or None).

        Repeated messages with a ``name`` (layers) are aligned by name, so a
        renamed, inserted or removed layer does not shift the others; other
        fields pair up in order.
        """
        import difflib

        old_of: List[Optional[int]] = [None] * len(items)
        new_by_field: Dict[str, List[int]] = {}
        for index, (field, _) in enumerate(items):
            new_by_field.setdefault(field.name, []).append(index)
        old_by_field: Dict[str, List[int]] = {}
        for index, child in enumerate(children):
            old_by_field.setdefault(child.name, []).append(index)
        for name, new in new_by_field.items():
            old = old_by_field.get(name, [])
            field = items[new[0]][0]
            keyed = field.type == FD.TYPE_MESSAGE and "name" in field.message_type.fields_by_name
            if not keyed:
                for old_index, item in zip(old, new):
                    old_of[item] = old_index
                continue
            matcher = difflib.SequenceMatcher(
                a=[_node_name(children[i]) for i in old], b=[items[i][1].name for i in new], autojunk=False
            )
            for tag, a0, a1, b0, b1 in matcher.get_opcodes():
                if tag == "equal":
                    for offset in range(a1 - a0):
                        old_of[new[b0 + offset]] = old[a0 + offset]
                elif tag == "replace":  # renamed: pair up layers of the same type, in order
                    free = list(old[a0:a1])
                    for item in new[b0:b1]:
                        kind = getattr(items[item][1], "type", None)
                        same = [i for i in free if _node_field(children[i], "type") == kind]
                        if same:
                            old_of[item] = same[0]
                            free.remove(same[0])
        return old_of


def _item_tree(field: FieldDescriptor, value: Any) -> Node:
    if field.type in (FD.TYPE_MESSAGE, FD.TYPE_GROUP):
        return to_tree(value, field.name)
    node = Node(field.name)
    node.values = [format_value(field, value)]
    return node


def _node_name(node: Node) -> Optional[str]:
    return _node_field(node, "name")


def _node_field(node: Node, name: str) -> Optional[str]:
    """The value of the string field ``name`` of a message node, if written."""
    for child in node.children or []:
        if child.name == name and child.values:
            token = child.value_tokens[0][0]
            if token.kind == "string":
                return _unescape(token.text[1:-1].encode("utf-8", "surrogateescape")).decode("utf-8", "replace")
    return None


def _one_line(node: Node) -> str:
    if node.children is None:
        return f"{node.name}: {node.values[0]}"
    inner = " ".join(_one_line(child) for child in node.children)
    return f"{node.name} {{ {inner} }}" if inner else f"{node.name} {{ }}"
