"""The one error type users see.

Every problem with the user's input becomes a :class:`CaffeFtError` that knows
where it happened (file, line and column, or a layer).  The CLI prints it as a
single ``path:line:col: message`` line and exits with status 2.
"""

from __future__ import annotations

from typing import Optional, Sequence


class CaffeFtError(Exception):
    """A user error with an optional location."""

    def __init__(
        self,
        message: str,
        path: Optional[str] = None,
        line: Optional[int] = None,
        column: Optional[int] = None,
        layer: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.line = line
        self.column = column
        self.layer = layer

    def located(self, path: str) -> "CaffeFtError":
        """Return this error with ``path`` filled in when it had none."""
        if self.path is None:
            self.path = path
        return self

    def __str__(self) -> str:
        where = []
        if self.path is not None:
            where.append(self.path)
            if self.line is not None:
                where.append(str(self.line))
                if self.column is not None:
                    where.append(str(self.column))
        prefix = ":".join(where)
        text = self.message
        if self.layer is not None:
            text = f"layer '{self.layer}': {text}"
        return f"{prefix}: {text}" if prefix else text


def listing(names: Sequence[str], limit: int = 8) -> str:
    """``names`` joined by commas for a message, or their first and last few
    and a count where there are more than ``limit``: a message naming every
    layer of a ResNet-50 is one line of 4 KB."""
    if len(names) <= limit:
        return ", ".join(names)
    half = limit // 2
    return f"{', '.join(names[:half])}, ..., {', '.join(names[-half:])} ({len(names)} in all)"
