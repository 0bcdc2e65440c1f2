"""Decode stage: encoded image bytes → RGB → ViT preprocessing → uint8 patches `[N, P·P·3]`, (kh, kw, c).

`to_patches(data)` decodes one image; `DecodePatches` is the Ray Data batch callable around it, which turns
every failure into an error row and never raises. The geometry is torchvision's `Resize(resize_size)` (default
`round(image_size * 256 / 224)`) + `CenterCrop(image_size)`, from `vit.preprocess`. Contract:

- EXIF orientation is applied; transparency is composited onto white; 16-bit greys become `round(v / 257)`;
  other modes (CMYK, palette, …) use Pillow's conversion to RGB; animated images give their first frame.
- An image over `max_pixels` pixels is refused from its header (Pillow's `Image.MAX_IMAGE_PIXELS` still
  applies on the Pillow path), as is a progressive JPEG over `MAX_JPEG_SCANS` scans. Truncated JPEG data is
  a `DecodeError`; a JPEG lacking only its end-of-image marker decodes. EPS is never opened (Ghostscript).
- Common JPEGs take a fast path: libjpeg-turbo at a 1/2ᵏ DCT scale, then OpenCV resamples the crop's window
  on the calling thread (close to torchvision's antialiased bilinear, not bit-exact). Everything else goes
  through Pillow, resizing only the crop's box. torch is not imported; no global Pillow setting changes.
- `exact=True` (`--preprocess exact`) sends every image through Pillow: its decode and its antialiased
  bilinear resize, which give the pixels of torchvision's PIL path (`Image.open(…).convert("RGB")`,
  `Resize`, `CenterCrop`) bit for bit for RGB images without an EXIF orientation (torchvision's loaders do
  not apply it, and drop alpha instead of compositing it).
"""

from __future__ import annotations

import io
import re
import struct
import time
import warnings
from functools import cache
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.jpeg import (
    EXIF_ORIENTATION,
    MAX_JPEG_SCANS,
    JpegHeader,
    decode_scaled,
    is_jpeg,
    jpeg_header,
    orient,
    too_many_scans,
)
from pipeline.resample import resize_crop_array
from pipeline.rows import error_column
from vit.preprocess import crop_offsets, default_resize_size, patch_grid, resized_size

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "MAX_JPEG_SCANS",
    "DecodeError",
    "DecodePatches",
    "as_bytes",
    "check_sizes",
    "scaled_decode",
    "to_patches",
    "to_patches_sized",
]

DEFAULT_MAX_PIXELS: int = 178_956_970  # = 2 × PIL.Image.MAX_IMAGE_PIXELS, where Pillow itself refuses
WHITE = (255, 255, 255)  # background for transparent images

# libjpeg-turbo's faster IDCT and chroma upsampling when the image shrinks at least this much (the
# resampling then hides their small errors); the DCT scale may leave the shorter side down to
# _DCT_MIN_SIDE × resize_size (then enlarged ≤ 1.11×).
_FAST_DECODE_FROM = 1.25
_DCT_MIN_SIDE = 0.9


class DecodeError(ValueError):
    """The bytes are not an image this stage can decode; the message says why in one sentence."""


# ---------------------------------------------------------------------------------------------------------
# Public API


def to_patches(
    data: bytes,
    image_size: int = 224,
    patch_size: int = 16,
    *,
    resize_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    exact: bool = False,
) -> np.ndarray:
    """Encoded image bytes → uint8 patches `[(image_size // patch_size)², patch_size² · 3]`, (kh, kw, c).

    Raises `DecodeError` when the bytes cannot be decoded (empty, not an image, truncated, too many
    pixels) and `ValueError` for impossible sizes. `exact`: Pillow's decode and resize for every image.
    """
    return to_patches_sized(
        data, image_size, patch_size, resize_size=resize_size, max_pixels=max_pixels, exact=exact
    )[0]


def to_patches_sized(
    data: bytes,
    image_size: int = 224,
    patch_size: int = 16,
    *,
    resize_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    exact: bool = False,
) -> tuple[np.ndarray, tuple[int, int]]:
    """`to_patches`, and the image's (width, height) before resizing, after EXIF orientation."""
    resize_size = check_sizes(image_size, patch_size, resize_size)
    g = image_size // patch_size
    out = np.empty((g * g, patch_size * patch_size * 3), dtype=np.uint8)
    size = _patches_into(out, data, image_size, patch_size, resize_size, max_pixels, exact)
    return out, size


class DecodePatches:
    """Ray Data `map_batches` callable: {key, shard, bytes, error, …} → {key, shard, patches, error, …}.

    Never raises for a bad image: its row gets `error = "decode: <ExceptionClass>: <message>"` and zero
    patches. Rows that arrive with an error (from the read stage) pass through unchanged, as do their zeros.
    Adds `width` and `height` (int32, the image's size before resizing, after EXIF orientation; -1 where it
    was not decoded) and `decode_s`: each row's share of the batch's decode time (the run's per-stage
    report adds them up).
    """

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        resize_size: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        exact: bool = False,
    ) -> None:
        self.resize_size = check_sizes(image_size, patch_size, resize_size)
        self.image_size = image_size
        self.patch_size = patch_size
        self.max_pixels = max_pixels
        self._sizes = (image_size, patch_size, self.resize_size, max_pixels, exact)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        keys = batch["key"]
        n = len(keys)
        data = batch.get("bytes")
        errors_in = error_column(batch)
        g = self.image_size // self.patch_size
        patches = np.zeros((n, g * g, self.patch_size * self.patch_size * 3), dtype=np.uint8)
        sizes = np.full((n, 2), -1, dtype=np.int32)
        errors = np.empty(n, dtype=object)
        for i in range(n):
            previous = errors_in[i]
            if previous is not None:
                errors[i] = previous
                continue
            item = None if data is None else data[i]
            try:
                if item is None:
                    raise DecodeError("cannot decode image: the row has no image bytes")
                sizes[i] = _patches_into(patches[i], as_bytes(item), *self._sizes)
                errors[i] = None
            except Exception as e:  # a bad image is a row, never a crash
                patches[i] = 0
                errors[i] = f"decode: {type(e).__name__}: {e}"
        # Columns this stage does not know (e.g. the run's bookkeeping) pass through unchanged.
        passthrough = {k: v for k, v in batch.items() if k not in ("bytes", "error")}
        seconds = np.full(n, (time.perf_counter() - t0) / max(1, n))
        return {
            **passthrough,
            "patches": patches,
            "error": errors,
            "width": sizes[:, 0],
            "height": sizes[:, 1],
            "decode_s": seconds,
        }


def _patches_into(
    out: np.ndarray,
    data: bytes,
    image_size: int,
    patch_size: int,
    resize_size: int,
    max_pixels: int,
    exact: bool = False,
) -> tuple[int, int]:
    """Decodes `data` and writes its patches into `out` ((image_size // patch_size)², patch_size² · 3);
    returns the image's (width, height) as decoded and oriented, before resizing."""
    img, size = _decode_resize_crop(data, image_size, resize_size, max_pixels, exact)  # (S, S, 3) uint8
    grid = patch_grid(img, patch_size)  # (g, g, P, P, 3), a view
    np.copyto(out.reshape(grid.shape), grid)
    return size


def check_sizes(image_size: int, patch_size: int, resize_size: int | None) -> int:
    """The resize size to use (default round(image_size·256/224)); a ConfigError (a ValueError) for
    impossible sizes, so the job refuses them before it starts."""
    from pipeline.config import ConfigError

    if image_size < 1 or patch_size < 1 or image_size % patch_size:
        fits = max(1, round(image_size / max(1, patch_size))) * patch_size
        raise ConfigError(
            f"--image-size {image_size} must be a positive multiple of patch_size {patch_size} (the "
            f"model's patch size), e.g. {fits}."
        )
    if resize_size is None:
        resize_size = default_resize_size(image_size)
    if resize_size < image_size:
        raise ConfigError(f"resize_size ({resize_size}) must be at least image_size ({image_size}).")
    return int(resize_size)


# ---------------------------------------------------------------------------------------------------------
# Decoding


def as_bytes(item: Any) -> bytes:
    """A batch cell (bytes, bytearray, memoryview, numpy bytes or uint8 array) as bytes."""
    if isinstance(item, bytes):
        return item
    if isinstance(item, (bytearray, memoryview, np.bytes_)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8:
        return item.tobytes()
    raise TypeError(f"expected image bytes, got {type(item).__name__}")


def _decode_resize_crop(
    data: bytes | memoryview, image_size: int, resize_size: int, max_pixels: int, exact: bool = False
) -> tuple[np.ndarray, tuple[int, int]]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"to_patches() expects bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise DecodeError("cannot decode image: the data is empty (0 bytes)")
    head = bytes(data[:16])
    if is_jpeg(head):
        hdr = jpeg_header(data)
        if not isinstance(hdr, str) and hdr.width and hdr.height:  # else (incl. a DNL height) Pillow decides
            w, h, orientation = hdr.width, hdr.height, hdr.orientation
            _check_pixels(w, h, max_pixels)
            if scans := too_many_scans(data, hdr):
                raise DecodeError(
                    f"cannot decode image: progressive JPEG with {scans} scans, more than {MAX_JPEG_SCANS} "
                    "(a decode-time bomb)"
                )
            if hdr.common and not exact:
                arr, k = scaled_decode(data, hdr, resize_size)
                if arr is not None:
                    if orientation >= 5:
                        w, h = h, w
                    mirror_x, mirror_y = orientation in (2, 3, 6, 7), orientation in (3, 4, 7, 8)
                    img = resize_crop_array(
                        orient(arr, orientation), w, h, 2**k, image_size, resize_size, mirror_x, mirror_y
                    )
                    return img, (w, h)
    rgb = _open_rgb(data, head, max_pixels)
    return _resize_crop_pil(rgb, image_size, resize_size, whole=exact), rgb.size


def scaled_decode(
    data: bytes | memoryview, hdr: JpegHeader, resize_size: int
) -> tuple[np.ndarray | None, int]:
    """The fast path's decode of a common JPEG (`hdr.common`): libjpeg-turbo at the smallest 1/2ᵏ DCT scale
    that keeps the shorter side ≥ _DCT_MIN_SIDE × `resize_size`, with its faster IDCT and upsampling when
    the image shrinks ≥ _FAST_DECODE_FROM×; `decode_scaled`'s (array, k), before orientation."""
    fast = min(hdr.width, hdr.height) >= _FAST_DECODE_FROM * resize_size
    return decode_scaled(data, hdr.width, hdr.height, _DCT_MIN_SIDE * resize_size, fast)


def _check_pixels(w: int, h: int, max_pixels: int) -> None:
    if w * h > max_pixels:
        raise DecodeError(
            f"cannot decode image: {w}×{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} "
            "(max_pixels; a decompression-bomb guard: raise it if such images are expected)"
        )


def _sniff(head: bytes) -> str | None:
    if is_jpeg(head):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[:2] == b"BM":
        return "BMP"
    return None


def _shard_format(data: bytes | memoryview) -> str | None:
    """What kind of shard these bytes are, when they are one: a file a streamed input of loose images
    found after its kind was decided reaches the decode stage as an image."""
    if len(data) >= 262 and bytes(data[257:262]) == b"ustar":
        return "tar archive (a webdataset shard?)"
    if bytes(data[:4]) == b"PAR1":
        return "Parquet file"
    return None


def _open_rgb(data: bytes | memoryview, head: bytes, max_pixels: int) -> Image.Image:
    """Pillow decode → oriented RGB image, with every mode converted as the module docstring says."""
    fmt = _sniff(head)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=_pil_formats())
        _check_pixels(im.width, im.height, max_pixels)
        im.load()
        orientation = im.getexif().get(EXIF_ORIENTATION, 1)
        rgb = _to_rgb(im)
    except DecodeError:
        raise
    except Image.DecompressionBombError as e:  # Pillow's own limit, checked in Image.open
        found = re.search(r"\((\d+) pixels\)", str(e))
        limit = min(max_pixels, 2 * (Image.MAX_IMAGE_PIXELS or max_pixels))
        count = f"{int(found.group(1)):,} pixels" if found else "the image's size"
        raise DecodeError(
            f"cannot decode image: {count} exceeds the limit of {limit:,} "
            "(max_pixels and PIL.Image.MAX_IMAGE_PIXELS; a decompression-bomb guard)"
        ) from None
    except UnidentifiedImageError:
        if shard := _shard_format(data):
            raise DecodeError(
                f"cannot decode image: this is a {shard}, not an image; an input is either loose images or "
                "shards of one kind (pass --format to say which to read)"
            ) from None
        if fmt is None:
            raise DecodeError(
                f"cannot decode image: not a recognised image format (first bytes {head!r})"
            ) from None
        raise DecodeError(
            f"cannot decode image: looks like {fmt} but its header is truncated or corrupt "
            f"(first bytes {head!r})"
        ) from None
    except MemoryError:
        raise
    except Exception as e:  # Pillow's plugins raise OSError, SyntaxError, struct.error, EOFError, …
        what = fmt or "image"
        reason = str(e) or type(e).__name__
        if "truncated" in reason.lower() or isinstance(e, (EOFError, struct.error)):
            raise DecodeError(f"cannot decode image: {what} data is truncated ({reason})") from None
        raise DecodeError(f"cannot decode image: {what} data is corrupt or unsupported ({reason})") from None
    if isinstance(orientation, int) and 2 <= orientation <= 8:
        rgb = rgb.transpose(_PIL_ORIENT[orientation])
    return rgb


# Pillow formats never tried: EPS is rendered by running Ghostscript on the file, and an input (bytes anyone
# can put in a bucket) must never start a program.
_PIL_REFUSED = frozenset({"EPS"})


@cache
def _pil_formats() -> tuple[str, ...]:
    Image.init()  # registers every plugin (and any added before the first decode, e.g. pillow-heif)
    return tuple(f for f in Image.OPEN if f not in _PIL_REFUSED)


_PIL_ORIENT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB") and "transparency" in im.info
    ):
        rgba = im if mode == "RGBA" else (im.convert("LA") if mode == "La" else im).convert("RGBA")
        background = Image.new("RGBA", im.size, (*WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im).astype(np.int64)
        grey = ((np.clip(a, 0, 65535) * 2 + 257) // 514).astype(np.uint8)  # round(v / 257)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB")
    return im.convert("RGB")


# ---------------------------------------------------------------------------------------------------------
# Resize + crop


def _resize_crop_pil(im: Image.Image, image_size: int, resize_size: int, whole: bool = False) -> np.ndarray:
    """Pillow's antialiased bilinear on the crop box only: torchvision's Resize then CenterCrop, to within
    a rounding of some pixels; `whole`: the whole image resized, then cropped, as torchvision does it (the
    same pixels, bit for bit)."""
    w, h = im.size
    nw, nh = resized_size(w, h, resize_size)
    left, top = crop_offsets(nw, nh, image_size)
    if whole:
        resized = im.resize((nw, nh), Image.Resampling.BILINEAR)
        return np.asarray(resized.crop((left, top, left + image_size, top + image_size)))
    sx, sy = w / nw, h / nh
    box = (left * sx, top * sy, (left + image_size) * sx, (top + image_size) * sy)
    return np.asarray(im.resize((image_size, image_size), Image.Resampling.BILINEAR, box=box))
