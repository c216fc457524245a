"""The torch engine: Caffe nets trained on PyTorch with Caffe's own semantics.

:mod:`.net` turns a phase-filtered ``NetParameter`` into a ``torch.nn.Module``
whose parameters are kept per layer in Caffe's blob order and shapes;
:mod:`.solver` applies Caffe's update rules to them; :mod:`.engine` runs a
solver file the way the pycaffe engine does (tests, progress, snapshots in
Caffe's formats).  These are the only modules that import ``torch``; nothing
else in caffe-ft imports this package except lazily, from the CLI.
"""

from __future__ import annotations

#: What to run when torch is missing.
INSTALL_HINT = "the torch engine needs PyTorch: pip install 'caffe-ft[torch]'"


def require_torch() -> None:
    """Raise a one-line :class:`~caffe_ft.errors.CaffeFtError` when torch cannot be imported."""
    import importlib.util

    from ...errors import CaffeFtError

    try:
        found = importlib.util.find_spec("torch") is not None
    except ValueError:  # a module object without a spec (set to None to hide it)
        found = False
    if not found:
        raise CaffeFtError(INSTALL_HINT)
