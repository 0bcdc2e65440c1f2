"""A small generated image dataset, so the job can be tried (and tested) without downloading anything."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def photo_array(w: int, h: int, seed: int = 0) -> np.ndarray:
    """Deterministic photo-like RGB: smooth gradients, shapes with edges, fine texture, mild noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    x /= w
    y /= h
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        a, b, f1, f2, p = rng.uniform(0, 1, 5)
        img[..., c] = (
            128
            + 60 * np.sin(2 * np.pi * (3 * f1 * x + p)) * np.cos(4 * np.pi * f2 * y)
            + 40 * (a * x - b * y)
        )
    for _ in range(12):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.03, 0.2)
        if rng.uniform() < 0.5:
            m = ((x - cx) ** 2 * (w / h) ** 2 + (y - cy) ** 2) < r * r
        else:
            m = (abs(x - cx) < r) & (abs(y - cy) < r * 0.6)
        img[m] = 0.3 * img[m] + 0.7 * rng.uniform(0, 255, 3)
    img += 6 * np.sin(40 * np.pi * x * (1 + y))[..., None]
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def natural_array(w: int, h: int, seed: int = 0) -> np.ndarray:
    """Deterministic RGB with a natural image's 1/f amplitude spectrum: detail at every scale, unlike
    photo_array's smooth shapes, so a resize that aliases shows it here."""
    rng = np.random.default_rng(seed)
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    f = np.hypot(fx, fy)
    f[0, 0] = 1.0
    shape = (h, w // 2 + 1)
    shared = rng.normal(size=shape) + 1j * rng.normal(size=shape)
    out = []
    for _ in range(3):  # correlated channels, as in photos
        z = 0.8 * shared + 0.2 * (rng.normal(size=shape) + 1j * rng.normal(size=shape))
        x = np.fft.irfft2(z / f, s=(h, w))
        out.append((x - x.mean()) / x.std() * 50 + 128)
    return np.clip(np.stack(out, -1), 0, 255).astype(np.uint8)


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A photo-like PIL image (see photo_array) seeded from `rng`."""
    return Image.fromarray(photo_array(width, height, seed=int(rng.integers(2**31))), "RGB")


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
