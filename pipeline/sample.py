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


PHOTOGRAPHS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
)
_MIN_PHOTOS_PER_SIZE = 4  # below this, native-resolution crops of the photos large enough are added


def photographs(
    sizes: tuple[tuple[int, int], ...] = ((500, 375), (1024, 768)), quality: int = 90
) -> dict[str, bytes]:
    """Real photographs as JPEG (`quality`) at each (width, height): {"<photo>-<w>x<h>.jpg": bytes}.

    Made from scikit-image's colour samples (`skimage.data`, shipped in its wheel): each photo's largest
    central crop of the size's aspect ratio, resized down with Pillow's LANCZOS (or kept, if already that
    size). A photo smaller than a size in either dimension is skipped for that size, never upscaled
    (upscaling smooths it, which flatters DCT-domain decoding). The photos: astronaut 512², chelsea 451×300,
    coffee 600×400, rocket 640×427, immunohistochemistry 512², hubble_deep_field 1000×872, retina 1411²
    (width × height). So 500×375 has six (all but chelsea), and 1024×768 only retina (hubble_deep_field is
    24 px too narrow). Where fewer than four photos reach a size, crops at that size at native resolution
    (no resampling) of the photos large enough are added, at five positions: the centre and the middle of
    each edge ("<photo>-crop-<position>-<w>x<h>.jpg"). 1024×768 is thus retina alone: the whole photo
    resized 1411×1058 → 1024×768, and five native crops of it (a fundus photograph: its dark surround fills
    0–10 % of each crop).
    """
    try:
        from skimage import data as skdata
    except ImportError:
        raise ImportError(
            "photographs() needs scikit-image for its sample photos: pip install scikit-image"
        ) from None
    arrays = {name: np.asarray(getattr(skdata, name)())[..., :3] for name in PHOTOGRAPHS}
    out: dict[str, bytes] = {}
    for w, h in sizes:
        found = 0
        for name, a in arrays.items():
            ah, aw = a.shape[:2]
            cw, ch = (aw, aw * h // w) if aw * h <= ah * w else (ah * w // h, ah)  # largest w:h crop
            if cw < w or ch < h:
                continue
            left, top = (aw - cw) // 2, (ah - ch) // 2
            im = Image.fromarray(np.ascontiguousarray(a[top : top + ch, left : left + cw]), "RGB")
            if (cw, ch) != (w, h):
                im = im.resize((w, h), Image.Resampling.LANCZOS)
            out[f"{name}-{w}x{h}.jpg"] = encode(im, quality=quality)
            found += 1
        if found >= _MIN_PHOTOS_PER_SIZE:
            continue
        for name, a in arrays.items():
            ah, aw = a.shape[:2]
            if aw < w or ah < h:
                continue
            cx, cy = (aw - w) // 2, (ah - h) // 2
            positions = {"centre": (cx, cy), "left": (0, cy), "right": (aw - w, cy), "top": (cx, 0)}
            positions["bottom"] = (cx, ah - h)
            for where, (x, y) in positions.items():
                crop = np.ascontiguousarray(a[y : y + h, x : x + w])
                out[f"{name}-crop-{where}-{w}x{h}.jpg"] = encode(
                    Image.fromarray(crop, "RGB"), quality=quality
                )
    return out
