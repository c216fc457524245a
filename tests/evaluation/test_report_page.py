"""report.html in a real browser: Debian's chromium, headless, on a report built from saved data.

The report is built by the same code a run uses (:func:`caffe_ft.evaluation.report.build`),
from a metrics file and predictions saved as a run saves them, with real PNG
images; chromium then loads the page from disk.  The page's own tiny script
marks ``<body data-images="ok">`` only when every image decoded, and records
script and resource errors on ``<html data-errors>``; chromium's console log
(``--enable-logging=stderr``) must be empty (a blocked network load, which the
page's Content-Security-Policy forbids, would show there too).  Chromium
lives on the host (scripts/test installs it), so these tests are host-only.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from caffe_ft.evaluation import report
from caffe_ft.evaluation.metrics import Predictions, evaluate, softmax
from caffe_ft.training.progress import MetricsWriter

pytestmark = pytest.mark.host
SECTIONS = ("settings", "curves", "evaluation", "confusion", "per-class", "calibration", "worst", "timings", "files")
HOSTILE = 'run <script>document.title="owned"</script> & co'


def chromium():
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("chromium is not installed (scripts/test installs Debian's chromium)")
    return found


def browse(page, tmp_path, *args):
    """Run headless chromium on ``page``; returns (stdout, console lines)."""
    done = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         "--virtual-time-budget=5000", *args, f"file://{page}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, [line for line in done.stderr.splitlines() if ":CONSOLE" in line]


def saved_run(folder, classes=4, count=60, seed=0):
    """What a run leaves: a metrics file, images, and its predictions on them."""
    import matplotlib.image

    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    labels = rng.integers(0, classes, count)
    scores = rng.normal(size=(count, classes))
    scores[np.arange(count), labels] += 1.5
    sources = []
    for index in range(count):
        name = f"images/{index:03d}.png"
        matplotlib.image.imsave(os.path.join(folder, name), rng.random((20, 20, 3)))
        sources.append(name)
    metrics = os.path.join(folder, "metrics.jsonl")
    writer = MetricsWriter(metrics, clock=iter(range(10_000)).__next__)
    for iteration in range(80):
        if iteration % 20 == 0:
            writer.test(iteration, 0, {"accuracy": 0.2 + iteration / 200, "loss": 2.0 - iteration / 50})
        writer.train(iteration, 2.0 / (1 + iteration / 10) + rng.random() * 0.1, 0.01)
    writer.test(80, 0, {"accuracy": 0.65, "loss": 0.5})
    writer.close()
    predictions = Predictions(softmax(scores), labels, sources, {"data": os.path.join(folder, "val.txt"),
                                                                "root_folder": folder + "/"})
    return metrics, predictions


def write_report(folder, title=HOSTILE):
    metrics, predictions = saved_run(folder)
    run = report.RunInfo(title, "train", "done", {"solver": "solver.prototxt", "base_lr": 0.01, "test_iter": [3]},
                         notes=["trained to iteration 80"], metrics=metrics, timings={"training": 95.0},
                         files=[metrics])
    evaluation = evaluate(predictions, names=["cat", "dog", "<bird>", "fish"])
    return report.write(os.path.join(folder, "out"), report.build(run, evaluation, predictions))


def test_the_report_renders_in_chromium_with_every_section_and_image(tmp_path):
    html, json_path = write_report(str(tmp_path))
    dom, console = browse(html, tmp_path, "--dump-dom")
    assert console == []
    body = re.search(r"<body([^>]*)>", dom).group(1)
    assert 'data-images="ok"' in body
    assert f'data-image-count="{2 + report.WORST}"' in body  # curves, calibration and the worst images
    assert "data-errors" not in re.search(r"<html([^>]*)>", dom).group(1)
    for section in SECTIONS:
        assert f'<section id="{section}">' in dom
    # Names from the run are text, not markup.
    assert "<title>" + HOSTILE.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;") in dom
    assert '<script>document.title="owned"' not in dom and "&lt;bird&gt;" in dom
    shot = tmp_path / "page.png"
    browse(html, tmp_path, f"--screenshot={shot}", "--window-size=1200,2400")
    import matplotlib.image

    pixels = matplotlib.image.imread(str(shot))
    assert pixels.shape[:2] == (2400, 1200)
    assert pixels[..., :3].std() > 0.05  # text, tables and plots, not a blank page


def test_two_runs_side_by_side_render(tmp_path):
    first, _ = write_report(str(tmp_path / "a"), "run a")
    second, _ = write_report(str(tmp_path / "b"), "run b")
    page = tmp_path / "compare.html"
    from caffe_ft.cli import main
    from conftest import cli_runner

    result = cli_runner().invoke(main, ["report", str(tmp_path / "a" / "out"), str(tmp_path / "b" / "out" /
                                                                                    "report.json"),
                                        "-o", str(page)])
    assert result.exit_code == 0, result.stderr
    assert re.search(r"^accuracy\s+0\.\d{4}\s+0\.\d{4}$", result.stdout, re.M)
    dom, console = browse(str(page), tmp_path, "--dump-dom")
    assert console == []
    assert 'data-images="ok"' in dom and 'data-image-count="4"' in dom
    for section in ("summary", "settings", "per-class", "curves"):
        assert f'<section id="{section}">' in dom
