"""JPEG files: the markers both decode paths route on, and libjpeg-turbo decoding at a DCT scale.

`jpeg_header(data)` reads the markers before the first scan (frame type, precision, size, components, EXIF
orientation, Adobe transform) without decoding a pixel; `too_many_scans(data, header)` is the
decode-time-bomb check both paths apply. `decode_scaled` and `orient` (EXIF orientation on an array) are
the CPU fast path's decoder. No torch.
"""

from __future__ import annotations

import threading
from typing import Any, Literal, NamedTuple

import numpy as np
import simplejpeg

__all__ = [
    "EXIF_ORIENTATION",
    "MAX_JPEG_SCANS",
    "JpegHeader",
    "decode_scaled",
    "exif_orientation",
    "is_jpeg",
    "jpeg_header",
    "orient",
    "too_many_scans",
]

MAX_JPEG_SCANS = 500  # progressive JPEGs with more scans are refused (libjpeg-turbo's suggested limit)
EXIF_ORIENTATION = 0x0112  # the Orientation tag
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # frame headers (C4: DHT, C8: JPG, CC: DAC)
_SCRATCH_MAX_BYTES = 32 * 2**20  # decode buffers up to this size are reused per thread
_scratch = threading.local()


def is_jpeg(data: bytes | memoryview) -> bool:
    """True when the bytes start with a JPEG start-of-image marker followed by another marker (FF D8 FF)."""
    return bytes(data[:3]) == b"\xff\xd8\xff"


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
        libjpeg-turbo's fast path (pipeline/decode.py) and nvJPEG (pipeline/gpu_decode.py) both take."""
        return self.frame in (0xC0, 0xC1, 0xC2) and self.precision == 8 and self.components in (1, 3)


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
        if int.from_bytes(tiff[entry : entry + 2], order) == EXIF_ORIENTATION:
            value = int.from_bytes(tiff[entry + 8 : entry + 10], order)
            return value if 1 <= value <= 8 else 1  # Pillow ignores out-of-range orientations
    return 1


def orient(arr: np.ndarray, orientation: int) -> np.ndarray:
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


def too_many_scans(data: bytes | memoryview, header: JpegHeader) -> int | None:
    """The scan count of a progressive JPEG with more than `MAX_JPEG_SCANS` scans (a decode-time bomb), else
    None.

    Every scan re-reads the whole image: thousands of tiny scans make a small file decode for minutes. An SOS
    marker cannot occur inside entropy-coded data (0xFF is stuffed there), so counting FF DA counts scans.
    """
    if not header.progressive:
        return None
    scans = bytes(data).count(b"\xff\xda")
    return scans if scans > MAX_JPEG_SCANS else None


def decode_scaled(
    data: bytes | memoryview, w: int, h: int, min_side: float, fast: bool = False
) -> tuple[np.ndarray | None, int]:
    """libjpeg-turbo decode of a (w, h) JPEG to RGB at the smallest 1/2ᵏ scale (k ≤ 3) whose shorter side
    stays ≥ `min_side`: (the (⌈h/2ᵏ⌉, ⌈w/2ᵏ⌉, 3) uint8 array, k), or (None, 0) if libjpeg-turbo complains
    (truncated data included; lacking only the end-of-image marker is not). `fast`: libjpeg-turbo's faster
    IDCT and chroma upsampling. The array may live in a per-thread buffer that the thread's next call reuses.
    """
    k = 0
    while k < 3 and -(-min(w, h) // 2 ** (k + 1)) >= min_side:
        k += 1
    dw, dh = -(-w // 2**k), -(-h // 2**k)
    size = dw * dh * 3
    buf = None
    if size <= _SCRATCH_MAX_BYTES:
        buf = getattr(_scratch, "buf", None)
        if buf is None or buf.size < size:
            buf = _scratch.buf = np.empty(max(size, 2**20), dtype=np.uint8)
    kw: dict[str, Any] = {"min_height": dh, "min_width": dw} if k else {}
    if fast:
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
