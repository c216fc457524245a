"""What the examples share: synthetic "style" images (stripes, checks, dots)
and a way to show each caffe-ft command as it runs."""

from __future__ import annotations

import os
import shlex
import subprocess
from typing import Sequence

STYLES = ("stripes", "checks", "dots")
SIZE = 256


def style_image(rng, label: int, size: int):  # type: ignore[no-untyped-def]
    """A BGR uint8 picture of one class: two random colours laid out as stripes, checks or dots."""
    import numpy as np

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle, freq = rng.uniform(0, np.pi), rng.uniform(4, 10)
    u = np.cos(angle) * xx + np.sin(angle) * yy
    v = -np.sin(angle) * xx + np.cos(angle) * yy
    if label == 0:
        mask = np.sin(2 * np.pi * freq * u) > 0
    elif label == 1:
        mask = (np.sin(2 * np.pi * freq * u) > 0) ^ (np.sin(2 * np.pi * freq * v) > 0)
    else:
        mask = np.hypot((u * freq) % 1 - 0.5, (v * freq) % 1 - 0.5) < rng.uniform(0.2, 0.35)
    colours = rng.uniform(0, 255, (2, 3))
    image = np.where(mask[..., None], colours[0], colours[1]) + rng.normal(0, 12, (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


def write_images(folder: str, train_per_class: int, val_per_class: int) -> tuple:
    """Synthetic images and their train/val image lists; returns the two list paths.  The lists name the
    images relative to the working directory, as Caffe reads them (``caffe-ft rewrite`` adds the
    root_folder its output folder needs), so no file names the folder the example runs in."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    lists = {"train": [], "val": []}
    for label, style in enumerate(STYLES):
        for index in range(train_per_class + val_per_class):
            path = os.path.join(folder, "images", f"{style}_{index:03d}.png")
            cv2.imwrite(path, style_image(rng, label, SIZE))
            lists["train" if index < train_per_class else "val"].append(f"{path} {label}")
    paths = []
    for split, lines in lists.items():
        paths.append(os.path.join(folder, f"{split}.txt"))
        with open(paths[-1], "w") as handle:
            handle.write("\n".join(lines) + "\n")
    return tuple(paths)


def caffe_ft(*args: str, ok: Sequence[int] = (0,)) -> int:
    """Print and run a caffe-ft command, its output shown; stop unless its exit status is in ``ok``."""
    command = ["caffe-ft", *args]
    print("\n$ " + " ".join(shlex.quote(word) for word in command), flush=True)
    status = subprocess.run(command).returncode
    if status not in ok:
        raise SystemExit(f"failed (exit {status})")
    return status
