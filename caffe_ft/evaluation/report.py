"""A run's report: ``report.html`` people look at, ``report.json`` with the same data.

:func:`build` gathers what a run did (its settings and strategy, the
loss/accuracy curves from ``metrics.jsonl``, timings, the files it wrote) and
how its final model does on the validation images (:mod:`.metrics`: the
confusion matrix, per-class table, calibration, the worst-classified
images); :func:`write` writes both files atomically.  The page is one
self-contained file: plots are inline PNGs (matplotlib), images inline
``data:`` URIs, and its Content-Security-Policy forbids loading anything
else.  It comes from ``templates/report.html.j2`` with autoescaping on.
:func:`compare_text` and :func:`render_compare` put two runs side by side.
"""

from __future__ import annotations

import base64
import functools
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..errors import CaffeFtError
from ..formats.files import write_atomic
from .metrics import Evaluation, Predictions

FORMAT = "caffe-ft-report/1"
HTML = "report.html"
JSON = "report.json"
#: Images in the grid of worst-classified validation images.
WORST = 24
#: Longer side of a thumbnail in that grid, in pixels.
THUMBNAIL = 96


@dataclass
class RunInfo:
    """What the run was (everything of the report but the evaluation)."""

    title: str
    kind: str  # "finetune" or "train"
    status: str  # done, interrupted, diverged
    settings: Dict[str, Any] = field(default_factory=dict)
    strategy: Optional[str] = None
    notes: List[str] = field(default_factory=list)
    metrics: Optional[str] = None  # the metrics.jsonl the curves come from
    timings: Dict[str, float] = field(default_factory=dict)  # seconds
    files: List[str] = field(default_factory=list)  # paths written


# ------------------------------------------------------------------ the data --


def _curves_json(metrics: Optional[str]) -> Optional[Dict[str, Any]]:
    """The curves of a metrics file as JSON lists, with the iterations they span."""
    from ..training.plot import curves
    from ..training.progress import read_metrics

    if not metrics or not os.path.exists(metrics):
        return None
    records = read_metrics(metrics)
    drawn = curves(records)
    iterations = [int(record["iteration"]) for record in records]
    times = [float(record["time"]) for record in records if isinstance(record.get("time"), (int, float))]
    return {
        "train": [[x, y] for x, y in zip(*drawn.train)],
        "tests": {name: [[x, y] for x, y in zip(*series)] for name, series in drawn.tests.items()},
        "first_iteration": min(iterations) if iterations else None,
        "last_iteration": max(iterations) if iterations else None,
        "span_seconds": round(max(times) - min(times), 3) if times else None,
    }


def curves_of(data: Mapping[str, Any]) -> Any:
    """The :class:`caffe_ft.training.plot.Curves` a report's JSON holds."""
    from ..training.plot import Curves

    result = Curves(([int(x) for x, _ in data["train"]], [float(y) for _, y in data["train"]]))
    for name, points in data["tests"].items():
        result.tests[name] = ([int(x) for x, _ in points], [float(y) for _, y in points])
    return result


def thumbnail(path: Optional[str]) -> Optional[str]:
    """An image file as a small PNG ``data:`` URI (longer side :data:`THUMBNAIL`;
    tiny images are enlarged without smoothing); None when it cannot be read."""
    if not path or not os.path.exists(path):
        return None
    try:
        import cv2
    except ImportError:
        return _raw_data_uri(path)
    image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if image is None:
        return None
    height, width = image.shape[:2]
    factor = THUMBNAIL / max(height, width)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    image = cv2.resize(image, size, interpolation=cv2.INTER_NEAREST if factor > 1 else cv2.INTER_AREA)
    ok, encoded = cv2.imencode(".png", image)
    return "data:image/png;base64," + base64.b64encode(encoded.tobytes()).decode("ascii") if ok else None


_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"),
          (b"BM", "image/bmp"))


def _raw_data_uri(path: str, limit: int = 1 << 18) -> Optional[str]:
    """A browser-readable image file as it is (without OpenCV to shrink it)."""
    if os.path.getsize(path) > limit:
        return None
    with open(path, "rb") as handle:
        data = handle.read()
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")
    return None


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def worst_images(predictions: Predictions, names: Sequence[str], count: int = WORST) -> List[Dict[str, Any]]:
    """The images whose true class got the lowest probability, lowest first, with thumbnails."""
    import numpy as np

    from .predict import image_file

    labels = np.asarray(predictions.labels, dtype=np.int64)
    true = predictions.probs[np.arange(len(labels)), labels]
    order = np.argsort(true, kind="stable")[:count]
    predicted = predictions.predicted
    return [{"source": predictions.sources[i], "label": int(labels[i]), "true_name": names[labels[i]],
             "predicted": int(predicted[i]), "predicted_name": names[predicted[i]],
             "true_probability": float(true[i]), "confidence": float(predictions.probs[i].max()),
             "image": thumbnail(image_file(predictions, predictions.sources[i]))} for i in order]


def _files(paths: Sequence[str]) -> List[Dict[str, Any]]:
    listed = []
    for path in sorted(set(paths)):
        size = os.path.getsize(path) if os.path.isfile(path) else None
        listed.append({"path": path, "bytes": size})
    return listed


def build(run: RunInfo, evaluation: Optional[Evaluation] = None,
          predictions: Optional[Predictions] = None) -> Dict[str, Any]:
    """The report's data (what ``report.json`` holds and the page shows)."""
    timings = dict(run.timings)
    if evaluation is not None and evaluation.meta.get("seconds") is not None:
        timings.setdefault("evaluation", float(evaluation.meta["seconds"]))
    curves = _curves_json(run.metrics)
    if curves is not None and curves["span_seconds"] is not None:
        timings.setdefault("metrics first to last record", curves["span_seconds"])
    return {
        "format": FORMAT,
        "title": run.title,
        "kind": run.kind,
        "status": run.status,
        "strategy": run.strategy,
        "settings": run.settings,
        "notes": run.notes,
        "metrics": run.metrics,
        "curves": curves,
        "evaluation": evaluation.as_json() if evaluation is not None else None,
        "worst": worst_images(predictions, evaluation.classes) if evaluation and predictions is not None else [],
        "timings": {name: round(value, 3) for name, value in timings.items()},
        "files": _files([*run.files]),
    }


def load(path: str) -> Dict[str, Any]:
    """A ``report.json`` (or the one in a run's directory)."""
    if os.path.isdir(path):
        path = os.path.join(path, JSON)
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise CaffeFtError("no such file (a run's report.json or its directory)", path) from None
    except ValueError as exc:
        raise CaffeFtError(f"not JSON ({exc})", path) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CaffeFtError("not a caffe-ft report.json", path)
    return data


# ------------------------------------------------------------------ the page --


@functools.lru_cache(maxsize=1)
def _environment() -> Any:
    import jinja2

    from ..resources import resource_dir

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(resource_dir("templates")),
                             undefined=jinja2.StrictUndefined, autoescape=True, keep_trailing_newline=True)
    env.filters["num"] = _number
    env.filters["seconds"] = _seconds
    return env


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"


def _cell_shade(value: int, row_total: int) -> str:
    """The style of a confusion matrix cell: darker for a larger share of its row."""
    share = value / row_total if row_total else 0.0
    return f"background: rgba(31, 119, 180, {share:.3f})" + ("; color: white" if share > 0.5 else "")


def _images(data: Mapping[str, Any]) -> Dict[str, Optional[str]]:
    """The plots of a report as PNG data URIs (drawn from its numbers)."""
    from ..training.plot import png_bytes

    images: Dict[str, Optional[str]] = {"curves": None, "calibration": None}
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # the page says "no plots" instead
        return images
    curves = data.get("curves")
    if curves and (curves["train"] or curves["tests"]):
        images["curves"] = png_uri(png_bytes(curves_of(curves), data.get("title", "")))
    evaluation = data.get("evaluation")
    if evaluation and evaluation["calibration_bins"]:
        images["calibration"] = png_uri(_calibration_png(evaluation["calibration_bins"]))
    return images


def _calibration_png(bins: Sequence[Mapping[str, Any]]) -> bytes:
    """A reliability diagram: accuracy against mean confidence per bin."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    drawing = Figure(figsize=(4.5, 4), dpi=100)
    FigureCanvasAgg(drawing)
    axes = drawing.add_subplot(1, 1, 1)
    axes.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    centres = [(b["low"] + b["high"]) / 2 for b in bins]
    widths = [b["high"] - b["low"] for b in bins]
    axes.bar(centres, [b["accuracy"] for b in bins], width=widths, edgecolor="tab:blue", alpha=0.6,
             label="accuracy")
    axes.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="tab:red",
              markersize=3, label="mean confidence")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_xlabel("confidence")
    axes.set_ylabel("accuracy")
    axes.legend(loc="upper left", fontsize="small")
    drawing.tight_layout()
    buffer = io.BytesIO()
    drawing.savefig(buffer, format="png")
    return buffer.getvalue()


def render_html(data: Mapping[str, Any]) -> str:
    """The page of a report's data."""
    return _environment().get_template("report.html.j2").render(
        report=data, images=_images(data), shade=_cell_shade)


def write(outdir: str, data: Mapping[str, Any]) -> Tuple[str, str]:
    """Write ``report.html`` and ``report.json`` into ``outdir``; returns their paths.

    Both are listed among the files of the report before they are written."""
    html_path, json_path = os.path.join(outdir, HTML), os.path.join(outdir, JSON)
    data = dict(data)
    data["files"] = [*data["files"], *({"path": path, "bytes": None} for path in (html_path, json_path)
                                      if path not in {item["path"] for item in data["files"]})]
    os.makedirs(outdir, exist_ok=True)
    page = render_html(data)
    write_atomic(json_path, json.dumps(data, indent=1, allow_nan=False) + "\n")
    write_atomic(html_path, page)
    return html_path, json_path


# --------------------------------------------------------------- comparisons --


def _summary_rows(report: Mapping[str, Any]) -> Dict[str, Any]:
    evaluation = report.get("evaluation") or {}
    curves = report.get("curves") or {}
    rows: Dict[str, Any] = {"status": report.get("status"), "strategy": report.get("strategy")}
    if evaluation:
        rows["images"] = evaluation["count"]
        rows["accuracy"] = evaluation["accuracy"]
        for k, value in sorted(evaluation["top_k"].items(), key=lambda item: int(item[0])):
            if k != "1":
                rows[f"top-{k} accuracy"] = value
        rows["macro F1"] = evaluation["macro"]["f1"]
        rows["expected calibration error"] = evaluation["ece"]
    if curves.get("last_iteration") is not None:
        rows["iterations"] = curves["last_iteration"]
    for name, value in (report.get("timings") or {}).items():
        rows[f"time: {name}"] = _seconds(value)
    return rows


def comparison(reports: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """Reports' numbers side by side: summary rows, the settings that differ
    (all of them for one report), F1 per class; one value per report in each row."""
    rows = [_summary_rows(each) for each in reports]
    settings = [each.get("settings") or {} for each in reports]
    f1 = [{row["class"]: row["f1"] for row in (each.get("evaluation") or {}).get("per_class", [])}
          for each in reports]

    def table(columns: Sequence[Mapping[str, Any]], names: Sequence[str]) -> List[Tuple[Any, ...]]:
        return [(name, *(column.get(name) for column in columns)) for name in names]

    def union(columns: Sequence[Mapping[str, Any]]) -> List[str]:
        names: List[str] = []
        for column in columns:
            names.extend(name for name in column if name not in names)
        return names

    differing = [name for name in union(settings)
                 if len(reports) == 1 or len({json.dumps(each.get(name), sort_keys=True) for each in settings}) > 1]
    titles = [str(each.get("title", "")) for each in reports]
    if len(set(titles)) < len(titles):
        titles = [f"{number}: {title}" for number, title in enumerate(titles, 1)]
    return {"titles": titles, "summary": table(rows, union(rows)),
            "settings": table(settings, differing), "per_class_f1": table(f1, union(f1))}


def compare_text(reports: Sequence[Mapping[str, Any]]) -> str:
    """:func:`comparison` as a text table."""
    result = comparison(reports)
    rows: List[Tuple[str, ...]] = [("", *result["titles"])]
    blank = ("",) * len(reports)
    rows += [(name, *map(_number, values)) for name, *values in result["summary"]]
    if result["settings"]:
        rows.append(("settings" + (" that differ:" if len(reports) > 1 else ":"), *blank))
        rows += [(f"  {name}", *map(_number, values)) for name, *values in result["settings"]]
    if result["per_class_f1"]:
        rows.append(("F1 per class:", *blank))
        rows += [(f"  {name}", *map(_number, values)) for name, *values in result["per_class_f1"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(reports) + 1)]
    return "\n".join(("  ".join([row[0].ljust(widths[0]), *(cell.rjust(width) for cell, width in
                                                           zip(row[1:], widths[1:]))])).rstrip()
                     for row in rows) + "\n"


def render_compare(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    """A page with two runs side by side: the summary table and both runs' plots."""
    return _environment().get_template("report_compare.html.j2").render(
        table=comparison([a, b]), images=[_images(a), _images(b)], reports=[a, b])
