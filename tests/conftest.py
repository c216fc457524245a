"""Shared fixtures.

Tests marked ``caffe`` need real Caffe (pycaffe, the ``caffe`` CLI tools, the
``caffe-doc`` prototxts, the nsfw model): they run inside the reference
environment made by ``scripts/caffe-env``; ``scripts/test`` deselects them on
the host.  In CI nothing may be skipped: a skip there fails the run.
"""

from __future__ import annotations

import glob
import os
import sys

import pytest

from caffe_ft.formats import prototext
from caffe_ft.formats.schema import load_schema

#: The checkout, and this folder (its helper modules: ft_nets, feature_nets...)
#: importable from the tests in the subfolders.
TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)

# Where Debian's caffe-doc puts the BVLC example and model-zoo prototxts.
CAFFE_DOC_DIRS = ("/usr/share/doc/caffe-doc",)
NSFW_DIR = "/opt/models/nsfw"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "caffe: needs real Caffe (run inside scripts/caffe-env)")
    config.addinivalue_line("markers", "host: runs on the host only (builds wheels, makes venvs)")
    config.addinivalue_line("markers", "image: builds and runs a container image (scripts/build-image; host only)")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A module that skips itself while being collected (a module-level
    ``importorskip``) skips every test in it, before markers deselect any:
    in CI that fails too."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"{collector.nodeid}: skipped while collected in CI, where nothing may be skipped: " \
                          f"{report.longrepr}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where nothing may be skipped: {report.longrepr}"


@pytest.fixture(scope="session")
def schema():
    return load_schema()


@pytest.fixture(scope="session")
def parse_net(schema):
    """``parse_net(text)`` -> NetParameter, for inline prototxt snippets."""

    def parse(text: str, message: str = "NetParameter"):
        return prototext.to_message(prototext.parse(text.encode()), schema.new(message))

    return parse


def cli_runner():
    """A click CliRunner keeping stderr apart on every click (7.x needs asking)."""
    from click.testing import CliRunner

    try:
        return CliRunner(mix_stderr=False)
    except TypeError:  # click >= 8.2 always separates them
        return CliRunner()


def write_datum_lmdb(path, schema, records, map_size: int = 1 << 22) -> None:  # type: ignore[no-untyped-def]
    """An LMDB of ``Datum`` records keyed 00000000, 00000001, ... in order, from
    ``(channels, height, width, data bytes, label)`` tuples (drawn as written)."""
    import lmdb

    env = lmdb.open(str(path), map_size=map_size)
    with env.begin(write=True) as txn:
        for index, (channels, height, width, data, label) in enumerate(records):
            datum = schema.new("Datum")
            datum.channels, datum.height, datum.width = channels, height, width
            datum.data, datum.label = data, label
            txn.put(f"{index:08d}".encode(), datum.SerializeToString())
    env.close()


def caffe_doc_files(pattern: str = "**/*.prototxt") -> list:
    """Prototxt files shipped by Debian's caffe-doc (empty outside the reference env)."""
    found = []
    for root in CAFFE_DOC_DIRS:
        found.extend(glob.glob(os.path.join(root, pattern), recursive=True))
    return sorted(found)
