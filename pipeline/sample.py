"""A small generated image dataset, so the job can be tried (and tested) without downloading anything."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth gradients, a few soft blobs and mild noise: compresses and resizes like a photo."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):
        a, b, phase = rng.uniform(-1, 1, 3)
        img[..., c] = 128 + 80 * np.sin(a * x / width * 6 + b * y / height * 6 + phase * 3)
    for _ in range(4):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.05, 0.3) * min(width, height) + 1
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        img += blob[..., None] * rng.uniform(-120, 120, 3)
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def encode(img: Image.Image, fmt: str = "JPEG", **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}) | kwargs)
    return buf.getvalue()


def make_sample(directory: str | Path, n: int = 48, seed: int = 0) -> list[Path]:
    """Writes `n` JPEG and PNG images of assorted sizes into `directory` (with one nested folder)."""
    rng = np.random.default_rng(seed)
    root = Path(directory)
    paths = []
    for i in range(n):
        w, h = int(rng.integers(160, 640)), int(rng.integers(120, 480))
        fmt, ext = ("PNG", "png") if i % 8 == 7 else ("JPEG", "jpg")
        path = root / ("more" if i % 3 == 2 else "") / f"img_{i:04d}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(photo_like(rng, w, h), fmt))
        paths.append(path)
    return paths
