"""Small labelled image data sets made on the fly (for the feature, linear-head
and advisor tests and the feature benchmark).

Two kinds, each with classes a linear probe can learn:

* ``photo``: photo-like pictures: shaded backgrounds and objects textured
  with 1/f noise (the amplitude spectrum of natural images), soft-edged; the
  class is the objects' shape (round, wide or tall);
* ``noise``: textures nothing like photographs, saturated random noise at
  one pixel (or, upscaled, a few pixels) per value; the class is the block
  size and the palette.

``write_dataset`` writes PNG files and a Caffe image list (``path label``);
its ``separation`` (photo only) below 1 makes the classes harder to tell apart.
"""

from __future__ import annotations

import os
from typing import List, Tuple

import numpy as np

KINDS = ("photo", "noise")


def pink_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    """A size x size field with a natural image's 1/f amplitude spectrum, zero mean, unit sd."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.fftfreq(size)[None, :]
    radius = np.sqrt(fx ** 2 + fy ** 2)
    radius[0, 0] = 1.0
    spectrum = (rng.normal(size=(size, size)) + 1j * rng.normal(size=(size, size))) / radius
    spectrum[0, 0] = 0
    field = np.real(np.fft.ifft2(spectrum))
    return (field - field.mean()) / (field.std() + 1e-12)


def photo_image(rng: np.random.Generator, label: int, size: int, separation: float = 1.0) -> np.ndarray:
    """A photo-like BGR uint8 image of class ``label``: a 1/f-textured, shaded
    background and a few textured objects with soft edges, round (class 0),
    wide (1) or tall (2); ``separation`` below 1 makes the shapes closer (a
    harder task)."""
    import cv2

    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * np.pi)
    light = (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5))[..., None]
    base = rng.uniform(60, 190, 3)
    image = base + 50 * light + 25 * pink_noise(rng, size)[..., None] + 8 * np.stack(
        [pink_noise(rng, size) for _ in range(3)], axis=-1)
    wide = (1.0 + 1.0 * separation, 1.0 - 0.45 * separation)
    aspect = [(1.0, 1.0), wide, wide[::-1]][label % 3]
    for _ in range(int(rng.integers(2, 4))):
        cx, cy = rng.uniform(0.25, 0.75, 2)
        radius = rng.uniform(0.1, 0.18)
        shape = ((xx - cx) / (radius * aspect[0])) ** 2 + ((yy - cy) / (radius * aspect[1])) ** 2
        mask = np.clip((1.0 - shape) * 8, 0, 1)[..., None]
        colour = rng.uniform(30, 225, 3) + 20 * pink_noise(rng, size)[..., None] - 40 * light
        image = image * (1 - mask) + colour * mask
    image = cv2.GaussianBlur(image.astype(np.float32), (0, 0), 0.6)
    return np.clip(image, 0, 255).astype(np.uint8)


def noise_image(rng: np.random.Generator, label: int, size: int) -> np.ndarray:
    """A saturated noise texture of class ``label`` (block size and palette)."""
    import cv2

    block = 1 + 3 * (label % 2)
    cells = max(size // block, 1)
    if label % 3 == 2:
        values = rng.integers(0, 2, (cells, cells, 3)) * 255  # two-level, every channel
    else:
        values = rng.integers(0, 256, (cells, cells, 3))
    image = cv2.resize(values.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
    return image


def write_dataset(directory: str, kind: str, per_class: int, classes: int = 2, size: int = 64,
                  seed: int = 0, list_name: str = "list.txt", separation: float = 1.0) -> str:
    """Write ``per_class`` images of each class and a Caffe image list; return the list's path."""
    import cv2

    make = {"photo": lambda *args: photo_image(*args, separation=separation), "noise": noise_image}[kind]
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    lines: List[Tuple[str, int]] = []
    for index in range(per_class * classes):
        label = index % classes
        path = os.path.join(directory, f"{kind}_{index:04d}.png")
        cv2.imwrite(path, make(rng, label, size))
        lines.append((path, label))
    list_path = os.path.join(directory, list_name)
    with open(list_path, "w", encoding="utf-8") as handle:
        handle.writelines(f"{path} {label}\n" for path, label in lines)
    return list_path
