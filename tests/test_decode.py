"""pipeline/decode.py: bytes → uint8 patches; awkward formats succeed, bad inputs become DecodeError/rows.

Every test image is generated here with Pillow (no binary fixtures).
"""

from __future__ import annotations

import io
import math
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from pipeline import decode, resample
from pipeline.decode import DEFAULT_MAX_PIXELS, DecodeError, DecodePatches, to_patches, to_patches_sized
from pipeline.jpeg import jpeg_header
from pipeline.sample import natural_array as natural_like
from pipeline.sample import photo_array as photo_like
from vit.preprocess import crop_offsets, resized_size

# ---------------------------------------------------------------------------------------------------------
# helpers


def encode(im: Image.Image | np.ndarray, fmt: str, **kw) -> bytes:
    if isinstance(im, np.ndarray):
        im = Image.fromarray(im)
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def unpatch(p: np.ndarray, image_size: int = 224, patch_size: int = 16) -> np.ndarray:
    g = image_size // patch_size
    return (
        p.reshape(g, g, patch_size, patch_size, 3).transpose(0, 2, 1, 3, 4).reshape(image_size, image_size, 3)
    )


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def reference(data: bytes, image_size: int = 224, resize_size: int = 256) -> np.ndarray:
    """torchvision-style preprocessing: PIL decode (+ EXIF orientation), Resize(bilinear, AA), CenterCrop."""
    T = pytest.importorskip("torchvision.transforms")
    im = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    tf = T.Compose(
        [T.Resize(resize_size, T.InterpolationMode.BILINEAR, antialias=True), T.CenterCrop(image_size)]
    )
    return np.asarray(tf(im))


def image(data: bytes, **kw) -> np.ndarray:
    return unpatch(to_patches(data, **kw))


def solid(data: bytes) -> np.ndarray:
    """The single colour of a decoded uniform image (asserts it is uniform)."""
    img = image(data).reshape(-1, 3)
    assert (img.max(0).astype(int) - img.min(0)).max() <= 2, "image is not uniform"
    return img.mean(0)


# ---------------------------------------------------------------------------------------------------------
# shape, layout, parity


@pytest.mark.parametrize(("image_size", "patch_size"), [(224, 16), (32, 8), (28, 14)])
def test_shape_dtype_and_patch_layout(image_size: int, patch_size: int) -> None:
    a = np.random.default_rng(1).integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
    p = to_patches(encode(a, "PNG"), image_size, patch_size, resize_size=image_size)  # no resampling
    g = image_size // patch_size
    assert p.dtype == np.uint8 and p.shape == (g * g, patch_size * patch_size * 3) and p.flags.c_contiguous
    np.testing.assert_array_equal(unpatch(p, image_size, patch_size), a)
    # patch 1 is the second patch of the first row; inside it, (kh, kw, c) order
    np.testing.assert_array_equal(
        p[1].reshape(patch_size, patch_size, 3), a[:patch_size, patch_size : 2 * patch_size]
    )


def test_default_resize_size_follows_image_size() -> None:
    data = encode(photo_like(300, 200), "PNG")
    np.testing.assert_array_equal(image(data), reference(data, 224, 256))
    p = to_patches(data, 112, 16)  # resize 128, crop 112
    np.testing.assert_array_equal(unpatch(p, 112), reference(data, 112, 128))


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (1024, 768), (1023, 767), (2048, 1536), (640, 640)])
def test_jpeg_fast_path_matches_torchvision(size: tuple[int, int]) -> None:
    data = encode(photo_like(*size), "JPEG", quality=90)
    assert psnr(image(data), reference(data)) >= 38


# (size, PSNR floor); comments: the shrink left after the DCT scaling. Plain bilinear below 1.55 (where it
# stays ≥ 30 dB on such detail; 526×395 is the worst case), [1, 2, 1] blur + bilinear from 1.55, upsampling
# below 1. At 1366×1024 the 1/4 DCT scale leaves nothing to resample: its sharper-than-bilinear filter
# alone sets the PSNR (~29.5 dB).
@pytest.mark.parametrize(
    ("size", "floor"),
    [
        ((453, 340), 32),  # 1.33
        ((500, 375), 30.5),  # 1.46
        ((375, 500), 30.5),  # 1.46, portrait
        ((526, 395), 30),  # 1.54
        ((600, 450), 38),  # 1.76 (225 would be below 0.9 × 256: no DCT scaling)
        ((640, 480), 31),  # 1/2 DCT to 240, then 0.94: upsampling
        ((1024, 768), 32),  # 1/2 DCT, then 1.5
        ((1300, 975), 31),  # 1/4 DCT to 244, then 0.95: upsampling
        ((1366, 1024), 28.5),  # 1/4 DCT, then 1.0
        ((300, 200), 42),  # 0.78: upsampling
    ],
)
def test_jpeg_fast_path_faithful_on_natural_detail(size: tuple[int, int], floor: float) -> None:
    data = encode(natural_like(*size), "JPEG", quality=90)
    assert psnr(image(data), reference(data)) >= floor


@pytest.mark.parametrize(
    ("start", "s", "off"), [(58, 1.4663, 0.0), (16, 1.5, 0.0), (43, 0.37, 0.0), (58, 1.5015, 0.5)]
)
def test_resampling_window_lands_on_a_whole_pixel(start: int, s: float, off: float) -> None:
    first, end, m = resample._window(start, s, off, 224, 10_000)
    assert 0 <= m <= start and end - first >= (m + 224) * s
    assert abs(first - ((start - m) * s + off)) / s <= 0.05  # in output pixels


@pytest.mark.parametrize("size", [(500, 375), (333, 1000), (1024, 768), (640, 480), (300, 200)])
def test_windowed_resample_equals_whole_image_resample_then_crop(size: tuple[int, int]) -> None:
    """Only the crop's window is resampled; that changes nothing but a sub-0.05-pixel alignment."""
    cv2 = pytest.importorskip("cv2")
    w, h = size
    factor = 2 if min(size) >= 512 else 1
    arr = np.ascontiguousarray(photo_like(w, h)[::factor, ::factor])
    got = resample.resize_crop_array(arr, w, h, factor, 224, 256)
    nw, nh = resized_size(w, h, 256)
    left, top = crop_offsets(nw, nh, 224)
    sx, sy = w / nw / factor, h / nh / factor
    src = arr
    if max(sx, sy) >= resample._BLUR_FROM:
        src = cv2.GaussianBlur(arr, (3, 3), 0, borderType=cv2.BORDER_REPLICATE)
    whole = cv2.resize(src, (nw, nh), interpolation=cv2.INTER_LINEAR)[top : top + 224, left : left + 224]
    assert got.shape == (224, 224, 3)
    assert psnr(got, whole) >= 50 and np.abs(got.astype(int) - whole).max() <= 12


def test_opencv_thread_setting_is_kept_and_does_not_change_pixels() -> None:
    cv2 = pytest.importorskip("cv2")
    data = encode(photo_like(640, 480), "JPEG", quality=90)
    threads = cv2.getNumThreads()
    try:
        cv2.setNumThreads(1)
        one = image(data)
        cv2.setNumThreads(4)
        np.testing.assert_array_equal(image(data), one)
        assert cv2.getNumThreads() == 4  # restored after the single-threaded resampling
    finally:
        cv2.setNumThreads(threads)


def test_fast_path_does_not_import_torch() -> None:
    """A decode worker should not pay torch's import (hundreds of MB per process)."""
    code = (
        "import sys, io, numpy as np\n"
        "from PIL import Image\n"
        "from pipeline.decode import to_patches\n"
        "buf = io.BytesIO(); Image.fromarray(np.full((300, 400, 3), 90, np.uint8)).save(buf, 'JPEG')\n"
        "assert to_patches(buf.getvalue()).shape == (196, 768)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=120)


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (257, 256), (224, 224), (100, 80), (1000, 333)])
def test_pillow_path_equals_torchvision(size: tuple[int, int]) -> None:
    data = encode(photo_like(*size), "PNG")
    got, want = image(data), reference(data)
    # Equal up to the rounding of the crop box's float coordinates: a few pixels off by one.
    assert np.abs(got.astype(int) - want).max() <= 1 and np.mean(got != want) < 0.01


def test_jpeg_rgb_webp_same_picture() -> None:
    a = photo_like(400, 300)
    ref = reference(encode(a, "PNG"))
    for data in [encode(a, "JPEG", quality=95), encode(a, "WEBP", lossless=True), encode(a, "TIFF")]:
        assert psnr(image(data), ref) >= 35


# ---------------------------------------------------------------------------------------------------------
# EXIF orientation


def _with_orientation(fmt: str, orientation: int) -> tuple[bytes, np.ndarray]:
    a = np.full((120, 200, 3), 200, np.uint8)
    a[:40, :50] = (255, 0, 0)  # red block top-left
    a[-30:, -60:] = (0, 0, 255)  # blue block bottom-right
    exif = Image.Exif()
    exif[0x0112] = orientation
    kw = {"quality": 95} if fmt == "JPEG" else {}
    data = encode(a, fmt, exif=exif.tobytes(), **kw)
    return data, a


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_applied(fmt: str, orientation: int) -> None:
    data, _ = _with_orientation(fmt, orientation)
    got, want = image(data), reference(data)  # reference applies ImageOps.exif_transpose
    assert psnr(got, want) >= 30


@pytest.mark.parametrize("orientation", range(2, 9))
@pytest.mark.parametrize("size", [(1200, 800), (1203, 805)])  # odd: a partial DCT pixel on the far edge
def test_exif_orientation_with_dct_scaling(orientation: int, size: tuple[int, int]) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(photo_like(*size), "JPEG", quality=90, exif=exif.tobytes())
    assert psnr(image(data), reference(data)) >= 40


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])  # the libjpeg-turbo path and the Pillow path
@pytest.mark.parametrize("size", [(200, 120), (1200, 800)])
def test_source_size_is_as_displayed(fmt: str, size: tuple[int, int]) -> None:
    for orientation, shown in ((1, size), (3, size), (6, size[::-1]), (8, size[::-1])):
        exif = Image.Exif()
        exif[0x0112] = orientation
        data = encode(photo_like(*size), fmt, exif=exif.tobytes())
        patches, got = to_patches_sized(data)
        assert got == shown
        np.testing.assert_array_equal(patches, to_patches(data))


def test_exif_rotate_90_clockwise_moves_top_left_to_top_right() -> None:
    data, _ = _with_orientation("JPEG", 6)  # 6: rotate 90° clockwise to display
    img = image(data, resize_size=224)
    assert img.shape == (224, 224, 3)
    top_right, bottom_left = img[5, -5], img[-5, 5]
    assert top_right[0] > 240 and top_right[1] < 20  # red (was top-left) is now top-right
    assert bottom_left[2] > 240 and bottom_left[0] < 20  # blue (was bottom-right) is now bottom-left
    assert np.all(img[5, 5] == 200) and np.all(img[-5, -5] == 200)


# ---------------------------------------------------------------------------------------------------------
# awkward formats and modes


def test_jpeg_header_reads_the_frame_and_says_why_not() -> None:
    data = encode(photo_like(120, 80), "JPEG", quality=90, progressive=True)
    hdr = jpeg_header(data)
    assert not isinstance(hdr, str)
    assert (hdr.width, hdr.height, hdr.components, hdr.precision, hdr.orientation) == (120, 80, 3, 8, 1)
    assert hdr.progressive and hdr.frame == 0xC2 and data[hdr.sos : hdr.sos + 2] == b"\xff\xda"
    rotated, _ = _with_orientation("JPEG", 6)
    assert jpeg_header(rotated).orientation == 6  # type: ignore[union-attr]
    assert jpeg_header(data[: hdr.sos - 5]) == "truncated header"
    assert jpeg_header(b"\xff\xd8\xff\xd9\x00\x00") == "no scan"
    assert jpeg_header(b"\xff\xd8\x00\x00\x00\x00") == "malformed header"


def test_cmyk_jpeg_colour() -> None:
    data = encode(Image.new("CMYK", (64, 48), (255, 0, 0, 0)), "JPEG", quality=95)  # pure cyan
    r, g, b = solid(data)
    assert r < 10 and g > 245 and b > 245


def test_grayscale_and_progressive_jpeg() -> None:
    assert np.allclose(solid(encode(Image.new("L", (80, 60), 128), "JPEG")), 128, atol=2)
    data = encode(photo_like(500, 375), "JPEG", quality=90, progressive=True)
    assert psnr(image(data), reference(data)) >= 30


def test_rgba_png_composited_on_white() -> None:
    data = encode(Image.new("RGBA", (50, 40), (255, 0, 0, 128)), "PNG")  # half-transparent red
    r, g, b = solid(data)
    assert r == 255 and abs(g - 127) <= 1 and abs(b - 127) <= 1
    assert np.all(solid(encode(Image.new("RGBA", (5, 5), (0, 0, 0, 0)), "PNG")) == 255)  # transparent → white


def test_la_and_palette_transparency_on_white() -> None:
    assert np.all(solid(encode(Image.new("LA", (30, 30), (0, 0)), "PNG")) == 255)
    assert np.all(solid(encode(Image.new("LA", (30, 30), (0, 255)), "PNG")) == 0)
    p = Image.new("P", (40, 40), 0)
    p.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    p.paste(1, (20, 0, 40, 40))  # right half: index 1 (blue); left half: index 0, transparent
    img = image(encode(p, "PNG", transparency=0), resize_size=224)
    assert np.all(img[:, :100] == 255)
    assert np.all(img[:, 124:] == (0, 0, 255))
    rgb = Image.new("RGB", (20, 20), (10, 20, 30))
    assert np.all(solid(encode(rgb, "PNG", transparency=(10, 20, 30))) == 255)  # tRNS colour key


def test_16bit_png_scaled_not_clipped() -> None:
    a = np.full((32, 32), 1000, np.uint16)  # clipping would give 255, scaling 4
    a[:, 16:] = 65535
    im = Image.fromarray(a)
    data = encode(im, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    img = image(data, resize_size=224)
    assert np.all(img[:, :100] == 4) and np.all(img[:, 124:] == 255)


def _png16(a: np.ndarray) -> bytes:
    """A 16-bit RGB or RGBA PNG, written by hand (Pillow cannot write these)."""
    h, w, c = a.shape

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in a)
    ihdr = struct.pack(">IIBBBBB", w, h, 16, {3: 2, 4: 6}[c], 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def test_16bit_rgb_and_rgba_png() -> None:
    a = np.zeros((8, 8, 3), np.uint16)
    a[..., 0], a[..., 1], a[..., 2] = 65535, 1000, 32896
    assert np.allclose(solid(_png16(a)), (255, 4, 128), atol=1)
    a = np.zeros((8, 8, 4), np.uint16)
    a[..., 0], a[..., 3] = 65535, 32896  # half-transparent red
    assert np.allclose(solid(_png16(a)), (255, 127, 127), atol=1)


def test_one_bit_images() -> None:
    im = Image.new("1", (64, 64), 0)
    im.paste(1, (32, 0, 64, 64))
    for fmt in ["PNG", "BMP", "TIFF"]:
        img = image(encode(im, fmt), resize_size=224)
        assert np.all(img[:, :100] == 0) and np.all(img[:, 124:] == 255)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animated_gives_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (40, 30), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    kw = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **kw)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    assert np.allclose(solid(data), (255, 0, 0), atol=2)


@pytest.mark.parametrize("fmt", ["WEBP", "TIFF", "BMP", "PNG", "GIF", "JPEG"])
def test_one_by_one_pixel(fmt: str) -> None:
    data = encode(Image.new("RGB", (1, 1), (10, 200, 30)), fmt, **({"quality": 100} if fmt == "JPEG" else {}))
    assert np.allclose(solid(data), (10, 200, 30), atol=4)


@pytest.mark.parametrize("size", [(3000, 6), (6, 3000), (1, 500), (4000, 2), (2, 2)])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_extreme_aspect_ratios(size: tuple[int, int], fmt: str) -> None:
    w, h = size
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = (np.arange(w) * 255 // max(w - 1, 1))[None, :]  # red ramps left → right
    a[..., 1] = (np.arange(h) * 255 // max(h - 1, 1))[:, None]  # green ramps top → bottom
    data = encode(a, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    img = image(data)
    assert img.shape == (224, 224, 3)
    want = reference(data)
    assert psnr(img, want) >= 30 if fmt == "JPEG" else np.abs(img.astype(int) - want).max() <= 1


def test_jpeg_with_recoverable_damage_decodes_as_pillow_does() -> None:
    data = encode(photo_like(320, 240), "JPEG", quality=90)
    damaged = data[:-2] + b"\x00\x00\x00\xff\xd9"  # stray bytes before the end marker: libjpeg warns
    assert psnr(image(damaged), reference(data)) >= 40


def test_progressive_scan_bomb_refused() -> None:
    data = encode(photo_like(64, 48), "JPEG", progressive=True)
    filler = b"\xff\xda" * 600
    bomb = data[:2] + b"\xff\xef" + struct.pack(">H", len(filler) + 2) + filler + data[2:]  # in an APP15
    with pytest.raises(DecodeError, match="scans"):
        to_patches(bomb)


def test_jpeg_missing_only_end_marker_decodes() -> None:
    data = encode(photo_like(320, 240), "JPEG", quality=90)
    assert data.endswith(b"\xff\xd9")
    np.testing.assert_array_equal(image(data[:-2]), image(data))


# ---------------------------------------------------------------------------------------------------------
# bad inputs


def _png_with_size(w: int, h: int) -> bytes:
    """A small valid PNG whose IHDR claims (w, h): a decompression bomb's header, CRC fixed up."""
    data = bytearray(encode(Image.new("L", (8, 8)), "PNG"))
    ihdr = bytearray(data[12:29])  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", w, h)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def _jpeg_with_size(w: int, h: int) -> bytes:
    data = bytearray(encode(Image.new("RGB", (16, 16)), "JPEG"))
    i = data.index(b"\xff\xc0")
    data[i + 5 : i + 9] = struct.pack(">HH", h, w)
    return bytes(data)


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "empty"),
        (np.random.default_rng(0).bytes(5000), "not a recognised image format"),
        (
            b"<!DOCTYPE html><html><body>404 Not Found</body></html>",
            "not a recognised image format (first bytes b'<!DOC",
        ),
        (b"Just some text saved as .jpg\n" * 10, "not a recognised image format"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "JPEG"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", "PNG"),
        (b"GIF89a\x10\x00", "GIF"),
    ],
)
def test_bad_bytes_raise_readable_decode_error(data: bytes, words: str) -> None:
    with pytest.raises(DecodeError, match="cannot decode image") as e:
        to_patches(data)
    assert words in str(e.value)
    assert isinstance(e.value, ValueError)


def test_a_shard_read_as_an_image_says_it_is_a_shard() -> None:
    """A .tar or .parquet file found among a streamed input's loose images reaches the decode stage."""
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as t:
        jpg = encode(photo_like(32, 32), "JPEG")
        info = tarfile.TarInfo("000.jpg")
        info.size = len(jpg)
        t.addfile(info, io.BytesIO(jpg))
    parquet = io.BytesIO()
    pq.write_table(pa.table({"image": [b"x"]}), parquet)
    for data, kind in [(tar.getvalue(), "tar archive"), (parquet.getvalue(), "Parquet file")]:
        with pytest.raises(DecodeError, match=f"this is a {kind}.*pass --format"):
            to_patches(data)


def test_eps_is_not_handed_to_ghostscript() -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"
    assert "EPS" not in decode._pil_formats() and "PNG" in decode._pil_formats()
    with pytest.raises(DecodeError, match="not a recognised image format"):
        to_patches(eps)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF"])
def test_truncated_files_raise(fmt: str) -> None:
    data = encode(photo_like(300, 200), fmt, **({"progressive": True} if fmt == "JPEG" else {}))
    for cut in [len(data) // 2, 40]:
        with pytest.raises(DecodeError, match=r"cannot decode image: .*(truncated|corrupt)"):
            to_patches(data[:cut])
    if fmt == "JPEG":
        with pytest.raises(DecodeError, match="truncated"):
            to_patches(encode(photo_like(300, 200), "JPEG")[:-200])  # baseline, pixel data missing


def test_pixel_limit_checked_from_header_before_decoding() -> None:
    # The bombs' pixel data is that of a tiny image: decoding would fail differently.
    for bomb in [_png_with_size(30000, 30000), _jpeg_with_size(60000, 60000)]:
        with pytest.raises(DecodeError, match="pixels exceeds the limit of 178,956,970"):
            to_patches(bomb)
    with pytest.raises(
        DecodeError, match=r"12000×12000 = 144,000,000 pixels exceeds the limit of 100,000,000"
    ):
        to_patches(_png_with_size(12000, 12000), max_pixels=100_000_000)  # between Pillow's warn and error
    data = encode(photo_like(400, 300), "JPEG")
    with pytest.raises(DecodeError, match=r"400×300 = 120,000 pixels exceeds the limit of 100,000"):
        to_patches(data, max_pixels=100_000)
    with pytest.raises(DecodeError, match="exceeds"):
        to_patches(encode(photo_like(400, 300), "PNG"), max_pixels=100_000)
    assert to_patches(data, max_pixels=120_000).shape == (196, 768)
    assert DEFAULT_MAX_PIXELS == 178_956_970


def test_bad_sizes_are_value_errors() -> None:
    data = encode(photo_like(64, 64), "PNG")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        to_patches(data, 100, 16)
    with pytest.raises(ValueError, match="resize_size"):
        to_patches(data, 224, 16, resize_size=200)
    with pytest.raises(ValueError, match="multiple"):
        DecodePatches(image_size=30, patch_size=16)


# ---------------------------------------------------------------------------------------------------------
# the batch callable


def test_decode_patches_rows_errors_and_passthrough() -> None:
    good = encode(photo_like(320, 240), "JPEG", quality=90)
    rows = [
        ("a.jpg", good, None),
        ("b.jpg", b"<html>oops</html>", None),
        ("c.jpg", None, None),
        ("d.jpg", None, "read: FileNotFoundError: gone"),
        ("e.jpg", good, "read: something"),  # a row with an error passes through even with bytes
        ("f.png", encode(Image.new("RGBA", (9, 9), (0, 0, 0, 0)), "PNG"), None),
        ("g.jpg", b"", None),
        ("h.jpg", 12345, None),  # not bytes at all: still an error row, never an exception
    ]
    batch = {
        "key": np.array([r[0] for r in rows], dtype=object),
        "shard": np.array(["s0"] * len(rows), dtype=object),
        "bytes": np.array([r[1] for r in rows] + [None], dtype=object)[:-1],
        "error": np.array([r[2] for r in rows], dtype=object),
    }
    stage = DecodePatches(image_size=224, patch_size=16)
    out = stage(batch)
    assert set(out) == {"key", "shard", "patches", "error", "width", "height", "decode_s"}
    assert list(out["key"]) == [r[0] for r in rows] and list(out["shard"]) == ["s0"] * len(rows)
    assert out["patches"].shape == (len(rows), 196, 768) and out["patches"].dtype == np.uint8
    err = out["error"]
    assert err.dtype == object and err[0] is None and err[5] is None
    assert err[1].startswith("decode: DecodeError: cannot decode image: not a recognised image format")
    assert err[2].startswith("decode: DecodeError:") and "no image bytes" in err[2]
    assert err[3] == "read: FileNotFoundError: gone" and err[4] == "read: something"
    assert "empty" in err[6] and err[7].startswith("decode: TypeError:")
    np.testing.assert_array_equal(out["patches"][0], to_patches(good))
    assert np.all(out["patches"][5] == 255)
    for i in (1, 2, 3, 4, 6, 7):
        assert not out["patches"][i].any()
    # the source size before resizing; -1 where the image was not decoded
    assert [(int(w), int(h)) for w, h in zip(out["width"], out["height"])] == [
        (320, 240),
        (-1, -1),
        (-1, -1),
        (-1, -1),
        (-1, -1),
        (9, 9),
        (-1, -1),
        (-1, -1),
    ]
    assert out["decode_s"].shape == (len(rows),) and (out["decode_s"] > 0).all()


def test_decode_patches_empty_batch_and_small_sizes() -> None:
    empty = {k: np.array([], dtype=object) for k in ("key", "shard", "bytes", "error")}
    out = DecodePatches(32, 8)(empty)
    assert out["patches"].shape == (0, 16, 192) and len(out["error"]) == 0
    data = encode(photo_like(50, 40), "WEBP")
    batch = {
        "key": np.array(["k"], dtype=object),
        "shard": np.array(["s"], dtype=object),
        "bytes": np.array([data], dtype=object),
        "error": np.array([None], dtype=object),
    }
    out = DecodePatches(image_size=32, patch_size=8, resize_size=40)(batch)
    np.testing.assert_array_equal(out["patches"][0], to_patches(data, 32, 8, resize_size=40))
    assert out["error"][0] is None


def test_all_null_error_column_from_ray_is_not_an_error():
    # Ray Data hands an all-null `error` column to numpy as float NaNs: those rows must be decoded.
    data = _jpeg_with_size(64, 48)
    batch = {
        "key": np.array(["a", "b"], dtype=object),
        "shard": np.array(["s", "s"], dtype=object),
        "bytes": np.array([data, data], dtype=object),
        "error": np.array([np.nan, np.nan], dtype=np.float32),
    }
    out = DecodePatches(image_size=32, patch_size=16)(batch)
    assert list(out["error"]) == [None, None] and out["patches"].any()
