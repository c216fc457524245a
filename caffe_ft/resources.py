"""Where caffe-ft's data files are: installed inside the package, or at the
top of a source checkout (``proto/``, ``templates/``)."""

from __future__ import annotations

import os

from .errors import CaffeFtError

_HERE = os.path.dirname(os.path.abspath(__file__))


def resource_dir(name: str) -> str:
    """The directory ``name`` (``"proto"`` or ``"templates"``)."""
    for candidate in (os.path.join(_HERE, name), os.path.join(os.path.dirname(_HERE), name)):
        if os.path.isdir(candidate):
            return candidate
    raise CaffeFtError(f"caffe-ft's {name}/ directory is missing; reinstall caffe-ft")
