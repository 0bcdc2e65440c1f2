"""Stage 2, decode + patchify: encoded image bytes → RGB → ViT preprocessing → uint8 patches.

`to_patches(data)` turns one encoded image into the uint8 patches the model takes; `DecodePatches` is the
Ray Data batch callable around it, which turns every failure into an error row and never raises.

Preprocessing is torchvision's for ViT: resize the shorter side to `resize_size` (default
`round(image_size * 256 / 224)`, 256 for 224) with antialiased bilinear filtering, centre-crop
`image_size`. The longer side becomes `int(resize_size * long / short)` and the crop offsets are
`int(round((resized - image_size) / 2))`, exactly as torchvision computes them. The crop is `image_size²`
whatever the aspect ratio (a 3000×6 strip is upsampled to 128000×256 and cropped; a 1×1 image is one colour).
Patches are laid out (kh, kw, c):
``img.reshape(gh, P, gw, P, 3).transpose(0, 2, 1, 3, 4).reshape(gh * gw, P * P * 3)``.

Colour handling, in this order:

- EXIF orientation is applied (as `PIL.ImageOps.exif_transpose` would).
- Transparency (RGBA, LA, PA, palette or grey/RGB PNGs with a tRNS colour) is composited onto a **white**
  background (255, 255, 255), the colour a browser or image viewer shows behind a transparent image.
- 16-bit greys (Pillow modes I;16*, I) are scaled to 8 bits by `round(v / 257)` (0..65535 → 0..255), not
  clipped; 16-bit RGB PNGs come from Pillow already reduced to 8 bits. Float images (mode F) are taken as
  0..255, as Pillow does. CMYK (including Adobe's inverted CMYK JPEGs), YCbCr, 1-bit, grey and palette
  images use Pillow's conversion to RGB. Animated GIF/WebP/PNG give their first frame.

Decompression bombs: an image with more than `max_pixels` pixels (default `DEFAULT_MAX_PIXELS`, Pillow's
own hard limit) is refused from its header, before any pixel is decoded. Pillow's global
`Image.MAX_IMAGE_PIXELS` still applies on the Pillow path: raising `max_pixels` above 2× that value needs it
raised too.

Decode-time bombs: a progressive JPEG with more than `MAX_JPEG_SCANS` scans is refused before decoding.

Truncated and corrupt files: JPEG data that ends before the last pixel row is an error
(`DecodeError: … truncated …`), as with Pillow's default `LOAD_TRUNCATED_IMAGES = False`: a half-grey image
would give a plausible but wrong embedding, an error row is counted and visible. A JPEG that lacks only its
final end-of-image marker (all pixel data present) decodes. Other recoverable JPEG damage (e.g. stray bytes
between segments) decodes as Pillow decodes it. No global Pillow setting is changed.

Speed: baseline, progressive, grey and YCbCr JPEGs take a fast path: libjpeg-turbo (simplejpeg) decodes at
the smallest 1/2ᵏ DCT scale that keeps the shorter side ≥ 0.9 × `resize_size` (a 1024×768 photo is decoded
at 512×384, a 640×480 one at 320×240, then enlarged ≤ 1.11×; with libjpeg-turbo's faster IDCT and chroma
upsampling when the image shrinks ≥ 1.25×), then
OpenCV resamples only the window that the crop reads: bilinear, after a [1, 2, 1] blur on an axis that
still shrinks ≥ 1.55× (plain bilinear aliases beyond that), box averaging from 2.5× (short sides over
4096). This is not bit-exact with torchvision's antialiased bilinear: PSNR against it is ≥ 38 dB on
photo-like images and ≥ 30 dB on images with detail at every scale (1/f spectrum), ~29.5 dB where a DCT
scale lands exactly on `resize_size`; `benchmarks/decode.py` measures speed and PSNR. OpenCV runs on the
calling thread (its thread-count setting is put back after each image); torch is not imported. Every
other input (PNG, WebP, GIF, TIFF, BMP, CMYK or 12-bit JPEG, anything libjpeg-turbo complains about)
goes through Pillow, resizing only the box that survives the crop (`Image.resize(box=…)`, equal to
torchvision's resize-then-crop up to rounding).
"""

from __future__ import annotations

import io
import math
import re
import struct
import threading
import time
import warnings
from functools import cache
from typing import Any, Literal, NamedTuple

import cv2
import numpy as np
import simplejpeg
from PIL import Image, UnidentifiedImageError

from pipeline.rows import error_column

__all__ = ["DEFAULT_MAX_PIXELS", "DecodeError", "DecodePatches", "to_patches"]

DEFAULT_MAX_PIXELS: int = 178_956_970  # = 2 × PIL.Image.MAX_IMAGE_PIXELS, where Pillow itself refuses
WHITE = (255, 255, 255)  # background for transparent images

MAX_JPEG_SCANS = 500  # progressive JPEGs with more scans are refused (libjpeg-turbo's suggested limit)
_EXIF_ORIENTATION = 0x0112
_SCRATCH_MAX_BYTES = 32 * 2**20  # decode buffers up to this size are reused per thread
_scratch = threading.local()
# Fast-path resampling: bilinear, after a [1, 2, 1] blur along an axis that shrinks by ≥ _BLUR_FROM (below
# it plain bilinear keeps ≥ 30 dB from the antialiased reference even on images with detail at every
# scale; above it aliases more), box averaging from _AREA_FROM. benchmarks/README.md has the measurements.
_BLUR_FROM = 1.55
_AREA_FROM = 2.5
_WINDOW_SEARCH = 64  # extra outputs tried to align a resampling window on a whole pixel
# libjpeg-turbo's faster IDCT and chroma upsampling (~10 % less decode time) when the image shrinks at
# least this much: the resampling then hides their small errors (see benchmarks/README.md).
_FAST_DECODE_FROM = 1.25
# The DCT scale may leave the shorter side down to this fraction of resize_size (then enlarged ≤ 1.11×):
# 640×480 decodes at 320×240, 25 % less time, natural-detail PSNR 42.8 → 32.2 dB (photo-like 45 → 43).
# At 0.85 the worst case (a 436-pixel short side) fell to 30.9 dB; benchmarks/README.md has the figures.
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
) -> np.ndarray:
    """Encoded image bytes → uint8 patches `[(image_size // patch_size)², patch_size² · 3]`, (kh, kw, c).

    Raises `DecodeError` when the bytes cannot be decoded (empty, not an image, truncated, too many
    pixels) and `ValueError` for impossible sizes.
    """
    resize_size = check_sizes(image_size, patch_size, resize_size)
    g = image_size // patch_size
    out = np.empty((g * g, patch_size * patch_size * 3), dtype=np.uint8)
    _patches_into(out, data, image_size, patch_size, resize_size, max_pixels)
    return out


class DecodePatches:
    """Ray Data `map_batches` callable: {key, shard, bytes, error, …} → {key, shard, patches, error, …}.

    Never raises for a bad image: its row gets `error = "decode: <ExceptionClass>: <message>"` and zero
    patches. Rows that arrive with an error (from the read stage) pass through unchanged, as do their zeros.
    Adds `decode_s`: each row's share of the batch's decode time (the run's per-stage report adds them up).
    """

    def __init__(
        self,
        image_size: int = 224,
        patch_size: int = 16,
        resize_size: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.resize_size = check_sizes(image_size, patch_size, resize_size)
        self.image_size = image_size
        self.patch_size = patch_size
        self.max_pixels = max_pixels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        keys = batch["key"]
        n = len(keys)
        data = batch.get("bytes")
        errors_in = error_column(batch)
        g = self.image_size // self.patch_size
        patches = np.zeros((n, g * g, self.patch_size * self.patch_size * 3), dtype=np.uint8)
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
                _patches_into(
                    patches[i],
                    as_bytes(item),
                    self.image_size,
                    self.patch_size,
                    self.resize_size,
                    self.max_pixels,
                )
                errors[i] = None
            except Exception as e:  # a bad image is a row, never a crash
                patches[i] = 0
                errors[i] = f"decode: {type(e).__name__}: {e}"
        # Columns this stage does not know (e.g. the run's bookkeeping) pass through unchanged.
        passthrough = {k: v for k, v in batch.items() if k not in ("bytes", "error")}
        seconds = np.full(n, (time.perf_counter() - t0) / max(1, n))
        return {**passthrough, "patches": patches, "error": errors, "decode_s": seconds}


def _patches_into(
    out: np.ndarray, data: bytes, image_size: int, patch_size: int, resize_size: int, max_pixels: int
) -> None:
    """Decodes `data` and writes its patches into `out` ((image_size // patch_size)², patch_size² · 3)."""
    img = _decode_resize_crop(data, image_size, resize_size, max_pixels)  # (S, S, 3) uint8, maybe a view
    g, p = image_size // patch_size, patch_size
    np.copyto(out.reshape(g, g, p, p, 3), img.reshape(g, p, g, p, 3).transpose(0, 2, 1, 3, 4))


# ---------------------------------------------------------------------------------------------------------
# Geometry (torchvision's Resize(int) + CenterCrop)


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
        resize_size = round(image_size * 256 / 224)
    if resize_size < image_size:
        raise ConfigError(f"resize_size ({resize_size}) must be at least image_size ({image_size}).")
    return int(resize_size)


def _resized_size(w: int, h: int, resize_size: int) -> tuple[int, int]:
    """torchvision's `Resize(resize_size)` output (width, height) for a (w, h) image."""
    if w <= h:
        return resize_size, int(resize_size * h / w)
    return int(resize_size * w / h), resize_size


def _crop_offsets(nw: int, nh: int, image_size: int) -> tuple[int, int]:
    """torchvision's `CenterCrop(image_size)` (left, top) in the resized image."""
    return round((nw - image_size) / 2.0), round((nh - image_size) / 2.0)


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
    data: bytes | memoryview, image_size: int, resize_size: int, max_pixels: int
) -> np.ndarray:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"to_patches() expects bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise DecodeError("cannot decode image: the data is empty (0 bytes)")
    head = bytes(data[:16])
    if head.startswith(b"\xff\xd8\xff"):
        hdr = jpeg_header(data)
        if not isinstance(hdr, str) and hdr.width and hdr.height:  # else (incl. a DNL height) Pillow decides
            w, h, orientation = hdr.width, hdr.height, hdr.orientation
            _check_pixels(w, h, max_pixels)
            # Every scan re-reads the whole image: thousands of tiny scans make a small file decode for
            # minutes. An SOS marker cannot occur inside entropy-coded data (0xFF is stuffed there).
            if hdr.progressive and (scans := bytes(data).count(b"\xff\xda")) > MAX_JPEG_SCANS:
                raise DecodeError(
                    f"cannot decode image: progressive JPEG with {scans} scans, more than {MAX_JPEG_SCANS} "
                    "(a decode-time bomb)"
                )
            if hdr.common:
                arr, k = _decode_jpeg_turbo(data, w, h, resize_size)
                if arr is not None:
                    if orientation >= 5:
                        w, h = h, w
                    mirror_x, mirror_y = orientation in (2, 3, 6, 7), orientation in (3, 4, 7, 8)
                    return _resize_crop_array(
                        _orient(arr, orientation), w, h, 2**k, image_size, resize_size, mirror_x, mirror_y
                    )
    return _resize_crop_pil(_open_rgb(data, head, max_pixels), image_size, resize_size)


def _check_pixels(w: int, h: int, max_pixels: int) -> None:
    if w * h > max_pixels:
        raise DecodeError(
            f"cannot decode image: {w}×{h} = {w * h:,} pixels exceeds the limit of {max_pixels:,} "
            "(max_pixels; a decompression-bomb guard: raise it if such images are expected)"
        )


class JpegHeader(NamedTuple):
    """What the markers before a JPEG's first scan say (see jpeg_header)."""

    frame: int  # the SOFn marker: 0xC0 baseline, 0xC1 extended, 0xC2 progressive, others rarer
    precision: int  # bits per sample
    components: int
    width: int
    height: int  # 0 when a DNL marker gives it later
    orientation: int  # EXIF orientation, 1 when absent
    adobe_transform: int | None  # the Adobe APP14 colour transform flag, when present
    component_ids: bytes
    sos: int  # offset of the first start-of-scan marker

    @property
    def progressive(self) -> bool:
        return self.frame in (0xC2, 0xC6, 0xCA, 0xCE)

    @property
    def common(self) -> bool:
        """An 8-bit Huffman-coded (baseline, extended or progressive) grey or three-component frame: what
        libjpeg-turbo's fast path here and nvJPEG (pipeline/gpu_decode.py) both take."""
        return self.frame in (0xC0, 0xC1, 0xC2) and self.precision == 8 and self.components in (1, 3)


_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # frame headers (C4: DHT, C8: JPG, CC: DAC)


def jpeg_header(data: bytes | memoryview) -> JpegHeader | str:
    """Reads the markers of a JPEG (starting FF D8) up to its first scan; reads no pixel data.

    Returns the header, or why it cannot be read in a word or two ("truncated header", "malformed header",
    "malformed exif", "no scan"); the callers then leave the file to Pillow, which decides.
    """
    n = len(data)
    pos = 2
    orientation = 1
    adobe_transform: int | None = None
    frame: tuple[int, int, int] | None = None  # (marker, segment start, segment end)
    while True:
        if pos + 4 > n:
            return "truncated header"
        if data[pos] != 0xFF:
            return "malformed header"
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # standalone markers
            pos += 2
            continue
        if marker == 0xD9:
            return "no scan"
        length = (data[pos + 2] << 8) | data[pos + 3]
        seg, end = pos + 4, pos + 2 + length
        if length < 2 or end > n:
            return "truncated header"
        if marker == 0xDA:
            break
        if marker == 0xE1 and length >= 8 and bytes(data[seg : seg + 6]) == b"Exif\x00\x00":
            o = exif_orientation(bytes(data[seg + 6 : end]))
            if o is None:
                return "malformed exif"
            orientation = o
        elif marker == 0xEE and length >= 14 and bytes(data[seg : seg + 5]) == b"Adobe":
            adobe_transform = data[seg + 11]
        elif marker in _SOF:
            if frame is not None:
                return "malformed header"
            frame = (marker, seg, end)
        pos = end
    if frame is None or frame[2] - frame[1] < 6:
        return "malformed header"
    marker, seg, end = frame
    components = data[seg + 5]
    ids = bytes(data[seg + 6 + 3 * i] for i in range(components) if seg + 6 + 3 * i < end)
    return JpegHeader(
        frame=marker,
        precision=data[seg],
        components=components,
        width=(data[seg + 3] << 8) | data[seg + 4],
        height=(data[seg + 1] << 8) | data[seg + 2],
        orientation=orientation,
        adobe_transform=adobe_transform,
        component_ids=ids,
        sos=pos,
    )


def exif_orientation(tiff: bytes) -> int | None:
    """The Orientation tag of IFD0 in a TIFF-structured EXIF block (1 when absent; None when malformed)."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return None
    order: Literal["little", "big"] = "little" if tiff[:2] == b"II" else "big"
    ifd = int.from_bytes(tiff[4:8], order)
    if ifd + 2 > len(tiff):
        return None
    count = int.from_bytes(tiff[ifd : ifd + 2], order)
    for i in range(count):
        entry = ifd + 2 + 12 * i
        if entry + 12 > len(tiff):
            return None
        if int.from_bytes(tiff[entry : entry + 2], order) == _EXIF_ORIENTATION:
            value = int.from_bytes(tiff[entry + 8 : entry + 10], order)
            return value if 1 <= value <= 8 else 1  # Pillow ignores out-of-range orientations
    return 1


def _orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Applies an EXIF orientation to an (H, W, C) array, as PIL.ImageOps.exif_transpose does (a view)."""
    if orientation == 1:
        return arr
    views = {
        2: lambda a: a[:, ::-1],  # FLIP_LEFT_RIGHT
        3: lambda a: a[::-1, ::-1],  # ROTATE_180
        4: lambda a: a[::-1],  # FLIP_TOP_BOTTOM
        5: lambda a: a.transpose(1, 0, 2),  # TRANSPOSE
        6: lambda a: np.rot90(a, -1),  # ROTATE_270 (90° clockwise)
        7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # TRANSVERSE
        8: lambda a: np.rot90(a, 1),  # ROTATE_90 (90° counter-clockwise)
    }
    return views[orientation](arr)


def _decode_jpeg_turbo(
    data: bytes | memoryview, w: int, h: int, resize_size: int
) -> tuple[np.ndarray | None, int]:
    """libjpeg-turbo decode at 1/2ᵏ scale (shorter side stays ≥ _DCT_MIN_SIDE × resize_size). (None, 0) if
    it complains."""
    k = 0
    while k < 3 and -(-min(w, h) // 2 ** (k + 1)) >= _DCT_MIN_SIDE * resize_size:
        k += 1
    dw, dh = -(-w // 2**k), -(-h // 2**k)
    size = dw * dh * 3
    buf = None
    if size <= _SCRATCH_MAX_BYTES:
        buf = getattr(_scratch, "buf", None)
        if buf is None or buf.size < size:
            buf = _scratch.buf = np.empty(max(size, 2**20), dtype=np.uint8)
    kw: dict[str, Any] = {"min_height": dh, "min_width": dw} if k else {}
    if min(w, h) >= _FAST_DECODE_FROM * resize_size:
        kw["fastdct"] = kw["fastupsample"] = True
    try:
        arr = simplejpeg.decode_jpeg(data, colorspace="RGB", buffer=buf, strict=True, **kw)
    except ValueError as e:
        arr = None
        # All pixel data present but the end-of-image marker missing: decode as complete.
        if "Premature end" in str(e) and bytes(data[-2:]) != b"\xff\xd9":
            try:
                arr = simplejpeg.decode_jpeg(bytes(data) + b"\xff\xd9", colorspace="RGB", buffer=buf, **kw)
            except ValueError:
                arr = None
    if arr is None or arr.shape != (dh, dw, 3):
        return None, 0
    return arr, k


def _sniff(head: bytes) -> str | None:
    if head.startswith(b"\xff\xd8\xff"):
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


def _open_rgb(data: bytes | memoryview, head: bytes, max_pixels: int) -> Image.Image:
    """Pillow decode → oriented RGB image, with every mode converted as the module docstring says."""
    fmt = _sniff(head)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=_pil_formats())
        _check_pixels(im.width, im.height, max_pixels)
        im.load()
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
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


def _resize_crop_pil(im: Image.Image, image_size: int, resize_size: int) -> np.ndarray:
    """Pillow's antialiased bilinear on the crop box only: equals torchvision's Resize then CenterCrop."""
    w, h = im.size
    nw, nh = _resized_size(w, h, resize_size)
    left, top = _crop_offsets(nw, nh, image_size)
    sx, sy = w / nw, h / nh
    box = (left * sx, top * sy, (left + image_size) * sx, (top + image_size) * sy)
    return np.asarray(im.resize((image_size, image_size), Image.Resampling.BILINEAR, box=box))


def _resize_crop_array(
    arr: np.ndarray,
    w: int,
    h: int,
    factor: int,
    image_size: int,
    resize_size: int,
    mirror_x: bool = False,
    mirror_y: bool = False,
) -> np.ndarray:
    """Resize + centre-crop an (H, W, 3) array decoded at 1/factor of the original (w, h) image.

    Output pixel j of the crop samples the decoded image at (left + j + ½)·s − ½ (+ an offset on a mirrored
    axis, whose partial last DCT pixel came first): the same centres as torchvision's resize. Only the window
    that the crop reads is filtered and resampled; OpenCV's bilinear maps from the window's first pixel, so
    the window starts `m` outputs before the crop, on a whole pixel within 0.05 output px of the exact one.
    """
    size = image_size
    nw, nh = _resized_size(w, h, resize_size)
    left, top = _crop_offsets(nw, nh, size)
    dh, dw = arr.shape[:2]
    sx, sy = w / nw / factor, h / nh / factor  # decoded pixels per output pixel
    offx = (dw * factor - w) / factor if mirror_x else 0.0
    offy = (dh * factor - h) / factor if mirror_y else 0.0
    x0, x1, mx = _window(left, sx, offx, size, dw)
    y0, y1, my = _window(top, sy, offy, size, dh)
    # OpenCV would spread the blur over its thread pool: more CPU in all for a few hundred microseconds'
    # work, so this runs on the calling thread whatever cv2.setNumThreads says (and restores it; a thread
    # changing the setting at this very moment could see it undone).
    threads = cv2.getNumThreads()
    if threads != 1:
        cv2.setNumThreads(1)
    try:
        out = _resample(arr, (x0, x1, y0, y1), sx, sy)
    finally:
        if threads != 1:
            cv2.setNumThreads(threads)
    if out.shape[0] < my + size or out.shape[1] < mx + size:  # rounding at the image's far edge
        pad_y, pad_x = max(0, my + size - out.shape[0]), max(0, mx + size - out.shape[1])
        out = cv2.copyMakeBorder(out, 0, pad_y, 0, pad_x, cv2.BORDER_REPLICATE)
    return out[my : my + size, mx : mx + size]


def _resample(arr: np.ndarray, window: tuple[int, int, int, int], sx: float, sy: float) -> np.ndarray:
    """Resamples arr[y0:y1, x0:x1] by 1/sx, 1/sy (OpenCV: output j at x0 + (j + ½)·sx − ½)."""
    x0, x1, y0, y1 = window
    dh, dw = arr.shape[:2]
    if max(sx, sy) >= _AREA_FROM:  # beyond what the DCT scales reach (> 4096-pixel short sides)
        src, interp = arr[y0:y1, x0:x1], cv2.INTER_AREA
    else:
        kx, ky = (3 if sx >= _BLUR_FROM else 1), (3 if sy >= _BLUR_FROM else 1)
        if kx == ky == 1:
            src = arr[y0:y1, x0:x1]
        else:  # blur a window one pixel wider, so that its edges see their real neighbours
            bx0, by0 = max(0, x0 - 1), max(0, y0 - 1)
            win = _contiguous(arr[by0 : min(dh, y1 + 1), bx0 : min(dw, x1 + 1)])
            blurred = cv2.GaussianBlur(win, (kx, ky), 0, borderType=cv2.BORDER_REPLICATE)
            src = blurred[y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0]
        interp = cv2.INTER_LINEAR
    return cv2.resize(_contiguous(src), None, fx=1.0 / sx, fy=1.0 / sy, interpolation=interp)


def _window(start: int, s: float, off: float, size: int, n: int) -> tuple[int, int, int]:
    """(first, end, m) of the decoded pixels that outputs start − m … start + size − 1 read, along one axis.

    `m` extra outputs make the window's first pixel fall (nearly) on a whole decoded pixel: output j sits
    at (start + j + ½)·s − ½ + off, and OpenCV puts it at first + (m + j + ½)·s − ½.
    """
    best_m, best_err = 0, math.inf
    for m in range(min(start, _WINDOW_SEARCH) + 1):
        x = (start - m) * s + off
        err = abs(x - round(x)) / s  # in output pixels
        if err < best_err:
            best_m, best_err = m, err
            if err <= 0.05:
                break
    first = max(0, round((start - best_m) * s + off))
    end = min(n, first + math.ceil((best_m + size) * s) + 2)  # + 2: the last output's bilinear taps
    return first, end, best_m


def _contiguous(a: np.ndarray) -> np.ndarray:
    """`a` itself when OpenCV can take it as it is (rows may be strided), else a C-contiguous copy."""
    st = a.strides
    if st[2] == 1 and st[1] == a.shape[2] and st[0] > 0:
        return a
    return np.ascontiguousarray(a)
