"""The torch engine: Caffe nets trained on PyTorch with Caffe's own semantics.

:mod:`.net` turns a phase-filtered ``NetParameter`` into a ``torch.nn.Module``
whose parameters are kept per layer in Caffe's blob order and shapes;
:mod:`.solver` applies Caffe's update rules to them; :mod:`.engine` runs a
solver file the way the pycaffe engine does (tests, progress, snapshots in
Caffe's formats).  These are the only modules that import ``torch``; nothing
else in caffe-ft imports this package except lazily, from the CLI.
"""

from __future__ import annotations

import os
import sys

# OpenMP threads that wait by sleeping, not spinning, unless the user says otherwise: read once, when torch
# loads its OpenMP runtime, so set before any of these modules imports torch.  On a shared machine a spinning
# thread burns the time slice its partner needs to reach the barrier: ResNet-50 on 2 cores at a load
# average of 6 took 9.1 s per iteration with 2 spinning threads, 3.1 s with 2 sleeping ones (2.3-3.0 s with one
# thread), see BENCHMARKS.md.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
