"""A semantic diff of two nets or two solvers, layer by layer, for code review.

Comments, layout and the spelling of values do not matter here: two files are
compared as the messages Caffe would read.  Both inputs must be in the current
format (the CLI upgrades legacy files first).

**Defaults.**  A scalar field left unset and the same field set to its
default value mean the same to Caffe, so that is *not* a change, in nets and
solvers alike; an absent sub-message and an empty one (``convolution_param
{}``) are equal for the same reason.  A repeated entry is different: adding
``param { lr_mult: 1 }`` or an ``include`` rule adds an entry and is shown,
every field it sets listed against ``(unset)`` (an empty entry as ``{}``).
``(unset)`` always means "not in the file"; Caffe then uses the default.

**Layers** are matched in three steps, each deterministic:

1. *By name.*  The k-th layer called ``x`` in A pairs with the k-th called
   ``x`` in B (train_val nets often give a TRAIN and a TEST layer one name).
   :class:`difflib.SequenceMatcher` (no autojunk) aligns the two name lists;
   pairs it aligns are in place, pairs it leaves out are MOVED.
2. *Renamed.*  Inside each ``replace`` block of that alignment, the layers
   whose names the other net lacks are aligned again by type, with the same
   matcher; each aligned pair is one layer RENAMED (``fc8`` -> ``fc8_ft``).
3. What is left is REMOVED (in A only) or ADDED (in B only).

A matched layer reports its changed fields as dotted paths with canonical text
values (``param[0].lr_mult: 1 -> 0``; repeated fields compared index by
index) and whether it became FROZEN or UNFROZEN (:func:`graph.is_learnable`
flips on a layer that has parameters in both nets).

**Order.**  Net-level fields come first, in field-number order; then layers in
B's order, each removed layer where it stood in A: after the removed layer's
nearest in-place predecessor.  A layer called ``x`` that is the second of that
name is shown as ``x#2``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Tuple

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from . import graph
from ..formats.schema import is_repeated
from ..formats.prototext import format_value, message_fields

FIELD = "field"  # a net-level or solver field
ADDED = "added"
REMOVED = "removed"
CHANGED = "changed"  # a layer of both nets (same name, or renamed)

FROZEN = "frozen"
UNFROZEN = "unfrozen"

# A repeated scalar longer than this (blob data) is compared as a whole.
_LONG = 64
_MESSAGE_TYPES = (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_GROUP)


@dataclass(frozen=True)
class FieldChange:
    """One field that differs: canonical text values, ``None`` where unset."""

    path: str
    old: Optional[str]
    new: Optional[str]


@dataclass(frozen=True)
class Change:
    """One entry of a diff.

    ``kind`` FIELD: a net-level or solver field, the single item of
    ``fields``.  ADDED / REMOVED: a layer of one net only.  CHANGED: a layer
    of both, with the fields that differ.  ``layer`` / ``index`` name the
    layer in B (in A when removed), ``old_layer`` / ``old_index`` in A.
    """

    kind: str
    layer: str = ""
    type: str = ""
    index: Optional[int] = None
    old_layer: str = ""
    old_index: Optional[int] = None
    fields: Tuple[FieldChange, ...] = ()
    renamed: bool = False
    moved: bool = False
    learning: str = ""  # FROZEN, UNFROZEN or ""

    def notes(self) -> List[str]:
        """The markers shown after the layer name, in a fixed order."""
        if self.kind in (ADDED, REMOVED):
            return [self.kind] + ([self.type] if self.type else [])
        flags = (("renamed", self.renamed), ("moved", self.moved), (self.learning, bool(self.learning)))
        return [word for word, on in flags if on]


# ---------------------------------------------------------------------------
# Field-by-field comparison
# ---------------------------------------------------------------------------


def _set_fields(message: Message) -> List[FieldDescriptor]:
    return [field for field, _ in message_fields(message)]


def _entries_only(message: Message, path: str) -> List[FieldChange]:
    """Every field ``message`` sets, as leaves of an entry that exists on one side only."""
    found: List[FieldChange] = []
    for field, values in message_fields(message):
        repeated = is_repeated(field)
        for i, value in enumerate(values):
            sub = f"{path}.{field.name}[{i}]" if repeated else f"{path}.{field.name}"
            if field.type in _MESSAGE_TYPES:
                found.extend(_entries_only(value, sub) or [FieldChange(sub, None, "{}")])
            else:
                found.append(FieldChange(sub, None, format_value(field, value)))
    return found


def _flip(changes: List[FieldChange]) -> List[FieldChange]:
    return [FieldChange(c.path, c.new, c.old) for c in changes]


def _entry(field: FieldDescriptor, old: Any, new: Any, path: str) -> List[FieldChange]:
    """Entry ``path`` of a repeated field; ``old`` or ``new`` is None where that side lacks it."""
    if field.type in _MESSAGE_TYPES:
        if old is None:
            return _entries_only(new, path) or [FieldChange(path, None, "{}")]
        if new is None:
            return _flip(_entries_only(old, path) or [FieldChange(path, None, "{}")])
        return compare_messages(old, new, path)
    old_text = None if old is None else format_value(field, old)
    new_text = None if new is None else format_value(field, new)
    return [] if old_text == new_text else [FieldChange(path, old_text, new_text)]


def _count(values: Sequence[Any]) -> Optional[str]:
    return f"[{len(values)} values]" if len(values) else None


def _repeated(field: FieldDescriptor, old: Sequence[Any], new: Sequence[Any], path: str) -> List[FieldChange]:
    if field.type not in _MESSAGE_TYPES and max(len(old), len(new)) > _LONG:
        return [] if list(old) == list(new) else [FieldChange(path, _count(old), _count(new))]
    found: List[FieldChange] = []
    for i in range(max(len(old), len(new))):
        found.extend(_entry(
            field, old[i] if i < len(old) else None, new[i] if i < len(new) else None, f"{path}[{i}]"
        ))
    return found


def compare_messages(a: Message, b: Message, prefix: str = "", skip: Sequence[str] = ()) -> List[FieldChange]:
    """The fields that differ between ``a`` and ``b`` (same type), as dotted paths.

    Unset singular fields count as their defaults (see the module docstring);
    a side that does not set a differing field shows ``None`` (unset).
    Fields named in ``skip`` (at the top level) are ignored.
    """
    fields = {field.number: field for field in _set_fields(a) + _set_fields(b) if field.name not in skip}
    found: List[FieldChange] = []
    for number in sorted(fields):
        field = fields[number]
        path = f"{prefix}.{field.name}" if prefix else field.name
        old, new = getattr(a, field.name), getattr(b, field.name)
        if is_repeated(field):
            found.extend(_repeated(field, old, new, path))
        elif field.type in _MESSAGE_TYPES:
            found.extend(compare_messages(old, new, path))
        elif format_value(field, old) != format_value(field, new):
            found.append(FieldChange(
                path,
                format_value(field, old) if a.HasField(field.name) else None,
                format_value(field, new) if b.HasField(field.name) else None,
            ))
    return found


def diff_solvers(a: Message, b: Message) -> List[Change]:
    """Field-by-field changes from solver ``a`` to ``b``, in field-number order.

    A field set to its default in one solver and unset in the other is not a
    change: Caffe reads both the same way.
    """
    return [Change(FIELD, fields=(change,)) for change in compare_messages(a, b)]


# ---------------------------------------------------------------------------
# Layer alignment
# ---------------------------------------------------------------------------

Key = Tuple[str, int]


def _keys(layers: Sequence[Message]) -> List[Key]:
    """(name, how many earlier layers share it) for each layer."""
    seen: Dict[str, int] = {}
    keys = []
    for layer in layers:
        keys.append((layer.name, seen.get(layer.name, 0)))
        seen[layer.name] = seen.get(layer.name, 0) + 1
    return keys


def _label(key: Key) -> str:
    name, occurrence = key
    name = name or "(unnamed)"
    return name if occurrence == 0 else f"{name}#{occurrence + 1}"


@dataclass(frozen=True)
class Alignment:
    """Which layer of A goes with which of B.

    ``in_place`` pairs (A index, B index) are increasing on both sides;
    ``renamed`` is the subset of them matched by type; ``moved`` pairs share a
    name but are out of order.
    """

    in_place: Tuple[Tuple[int, int], ...]
    renamed: FrozenSet[Tuple[int, int]]
    moved: Tuple[Tuple[int, int], ...]


def align_layers(a: Sequence[Message], b: Sequence[Message]) -> Alignment:
    """Pair the layers of two nets (see the module docstring for the rules)."""
    keys_a, keys_b = _keys(a), _keys(b)
    only_a, only_b = set(keys_a) - set(keys_b), set(keys_b) - set(keys_a)
    in_place: List[Tuple[int, int]] = []
    renamed: set = set()
    matcher = difflib.SequenceMatcher(None, keys_a, keys_b, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            in_place.extend(zip(range(i1, i2), range(j1, j2)))
        elif tag == "replace":
            left = [i for i in range(i1, i2) if keys_a[i] in only_a]
            right = [j for j in range(j1, j2) if keys_b[j] in only_b]
            by_type = difflib.SequenceMatcher(
                None, [a[i].type for i in left], [b[j].type for j in right], autojunk=False
            )
            for block in by_type.get_matching_blocks():
                pairs = zip(left[block.a : block.a + block.size], right[block.b : block.b + block.size])
                for pair in pairs:
                    in_place.append(pair)
                    renamed.add(pair)
    placed = {keys_a[i] for i, _ in in_place}
    index_b = {key: j for j, key in enumerate(keys_b)}
    moved = tuple(
        (i, index_b[key]) for i, key in enumerate(keys_a) if key in index_b and key not in placed
    )
    return Alignment(tuple(sorted(in_place)), frozenset(renamed), moved)


def _learning(old: Message, new: Message) -> str:
    if not (graph.param_blob_count(old) and graph.param_blob_count(new)):
        return ""
    was, now = graph.is_learnable(old), graph.is_learnable(new)
    if was == now:
        return ""
    return UNFROZEN if now else FROZEN


def diff_nets(a: Message, b: Message) -> List[Change]:
    """Changes from net ``a`` to net ``b`` (both current-format NetParameters).

    Net-level fields first, then one :class:`Change` per layer that differs,
    in B's layer order with removed layers where they stood in A.
    """
    layers_a, layers_b = list(a.layer), list(b.layer)
    keys_a, keys_b = _keys(layers_a), _keys(layers_b)
    alignment = align_layers(layers_a, layers_b)
    pairs = {j: (i, False) for i, j in alignment.in_place}
    pairs.update({j: (i, True) for i, j in alignment.moved})
    matched_a = {i for i, _ in pairs.values()}

    ordered: List[Tuple[Tuple[int, int, int], Change]] = []
    for j, new in enumerate(layers_b):
        if j not in pairs:
            ordered.append(((j, 1, 0), Change(ADDED, _label(keys_b[j]), new.type, index=j)))
            continue
        i, moved = pairs[j]
        old = layers_a[i]
        change = Change(
            CHANGED, _label(keys_b[j]), new.type, index=j, old_layer=_label(keys_a[i]), old_index=i,
            fields=tuple(compare_messages(old, new, skip=("name",))),
            renamed=(i, j) in alignment.renamed, moved=moved, learning=_learning(old, new),
        )
        if change.fields or change.notes():
            ordered.append(((j, 1, 0), change))
    in_place_b = dict(alignment.in_place)
    anchor = 0
    for i, old in enumerate(layers_a):
        if i in in_place_b:
            anchor = in_place_b[i] + 1
        elif i not in matched_a:
            ordered.append(((anchor, 0, i), Change(REMOVED, _label(keys_a[i]), old.type, index=i)))
    net_level = [Change(FIELD, fields=(c,)) for c in compare_messages(a, b, skip=("layer",))]
    return net_level + [change for _, change in sorted(ordered, key=lambda item: item[0])]


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def _value(text: Optional[str]) -> str:
    return "(unset)" if text is None else text


def _field_line(change: FieldChange, indent: str) -> str:
    return f"{indent}{change.path}: {_value(change.old)} -> {_value(change.new)}\n"


def format_changes(changes: Sequence[Change]) -> str:
    """The text form: field lines unindented, a header per layer with its fields indented.

    Empty when there are no changes.
    """
    out: List[str] = []
    for change in changes:
        if change.kind == FIELD:
            out.append(_field_line(change.fields[0], ""))
            continue
        sign = {ADDED: "+", REMOVED: "-"}.get(change.kind, "~")
        name = f"{change.old_layer} -> {change.layer}" if change.renamed else change.layer
        notes = change.notes()
        out.append(f"{sign} {name}" + (f" ({', '.join(notes)})" if notes else "") + "\n")
        out.extend(_field_line(field, "    ") for field in change.fields)
    return "".join(out)


def _field_json(change: FieldChange) -> Dict[str, Any]:
    return {"path": change.path, "old": change.old, "new": change.new}


def change_to_json(change: Change) -> Dict[str, Any]:
    """One change as plain data (values stay canonical text, ``None`` when unset)."""
    if change.kind == FIELD:
        return {"change": FIELD, **_field_json(change.fields[0])}
    data: Dict[str, Any] = {"change": change.kind, "layer": change.layer, "type": change.type}
    if change.kind == CHANGED:
        data.update({
            "index": change.index,
            "old_layer": change.old_layer,
            "old_index": change.old_index,
            "renamed": change.renamed,
            "moved": change.moved,
            "learning": change.learning or None,
            "fields": [_field_json(field) for field in change.fields],
        })
    else:
        data["index"] = change.index
    return data


def to_json(changes: Sequence[Change]) -> Dict[str, Any]:
    """The JSON-ready form ``diff --json`` prints: ``{"equal": bool, "changes": [...]}``."""
    return {"equal": not changes, "changes": [change_to_json(change) for change in changes]}


def diff_files(a: Any, b: Any) -> List[Change]:
    """The changes from parsed file ``a`` to ``b`` (two nets or two solvers,
    legacy ones compared in their upgraded form)."""
    from ..errors import CaffeFtError
    from ..formats.files import NET, SOLVER
    from ..formats.upgrade import net_needs_upgrade, upgrade_net, upgrade_solver

    if a.kind != b.kind:
        what = {NET: "a net", SOLVER: "a solver"}
        raise CaffeFtError(f"{what[a.kind]} cannot be compared with {what[b.kind]} ({b.path})", a.path)
    current = []
    for parsed in (a, b):
        message = type(parsed.message)()
        message.CopyFrom(parsed.message)
        try:
            if parsed.kind == SOLVER:
                upgrade_solver(message)
            elif net_needs_upgrade(message):
                upgrade_net(message)
        except CaffeFtError as exc:
            raise exc.located(parsed.path) from None
        current.append(message)
    return (diff_solvers if a.kind == SOLVER else diff_nets)(*current)
