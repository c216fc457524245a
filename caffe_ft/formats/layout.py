"""Canonical layout and legacy upgrades of text prototxts, as pure functions.

Both keep every comment of the input: the output is the canonical text Caffe's
own tools print for the same message, with the comments put back beside the
fields they were written against.
"""

from __future__ import annotations

from typing import List, Tuple

from . import prototext
from ..errors import CaffeFtError
from .files import NET, TextFile

# Field renames a legacy upgrade makes, so comments follow their field.
_UPGRADE_RENAMES = {"layers": "layer"}


def format_text(parsed: TextFile) -> str:
    """The canonical text of ``parsed``, comments kept (its tree is reordered)."""
    return format_tree(parsed.tree)


def format_tree(tree: prototext.Node) -> str:
    """The canonical text of a tree checked by :func:`prototext.to_message` or
    :func:`prototext.check_tree`, comments kept (the tree is reordered)."""
    return prototext.render(prototext.canonicalize(tree))


def upgrade_text(parsed: TextFile) -> Tuple[str, List[str]]:
    """Upgrade a legacy net or solver; returns the canonical text and notes.

    ``parsed.message`` is left untouched.
    """
    from . import upgrade

    message = type(parsed.message)()
    message.CopyFrom(parsed.message)
    try:
        if parsed.kind == NET:
            notes = upgrade.upgrade_net(message)
        else:
            notes = upgrade.upgrade_solver(message)
    except CaffeFtError as exc:
        raise exc.located(parsed.path) from None
    tree = prototext.reconcile(parsed.tree, message, _UPGRADE_RENAMES)
    return prototext.render(tree), notes
