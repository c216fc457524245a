"""caffe-ft: fine-tune Caffe models with deterministic, reviewable rewrites.

The library API is :mod:`caffe_ft.api` (``caffe_ft.rewrite``, ``caffe_ft.finetune``,
``caffe_ft.check``, ``caffe_ft.init``, ``caffe_ft.train``, ``caffe_ft.evaluate``, ``caffe_ft.export_onnx``), loaded on first use so
that ``import caffe_ft`` stays cheap.  The packages follow the pipeline:
``formats`` (Caffe files) < ``net`` (questions about a net) < ``data`` (inputs)
< ``training`` (engines) < ``heads`` / ``export`` < ``evaluation`` (metrics, reports)
< ``recipe`` (strategies and
jobs) < ``api`` < ``cli``; a package imports only from those below it.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from .version import __version__  # noqa: F401  (caffe_ft.__version__)


def _import_protobuf_without_pkg_resources() -> None:
    """Import ``google.protobuf`` without paying for ``pkg_resources``.

    Debian's protobuf 3.12 (the one beside pycaffe) declares its namespace
    through ``pkg_resources`` on import, which alone costs ~45 ms, half of a
    ``caffe-ft fmt`` run.  The namespace declaration is not needed, so a stub
    stands in for ``pkg_resources`` during that one import.
    """
    if "google.protobuf" in sys.modules or "pkg_resources" in sys.modules:
        return
    stub = types.ModuleType("pkg_resources")
    stub.declare_namespace = lambda name: None  # type: ignore[attr-defined]
    sys.modules["pkg_resources"] = stub
    try:
        # The package and its C++ extension package declare it (no module is
        # loaded beyond their __init__: commands that need no message classes,
        # like ``fmt`` with a cached field table, import no more of protobuf).
        import google.protobuf  # noqa: F401
    except ImportError:
        pass  # reported where protobuf is used
    try:
        import google.protobuf.pyext  # noqa: F401
    except ImportError:
        pass  # protobuf >= 4 has no pyext
    finally:
        if sys.modules.get("pkg_resources") is stub:
            del sys.modules["pkg_resources"]


_import_protobuf_without_pkg_resources()

_API = ("check", "evaluate", "export_onnx", "finetune", "init", "rewrite", "train")


def __getattr__(name: str) -> Any:
    """``caffe_ft.rewrite`` & co., imported from :mod:`caffe_ft.api` when first used."""
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'caffe_ft' has no attribute {name!r}")
