"""pipeline/gpu_decode.py on CPU (device="cpu"): the batched torchvision path against pipeline.decode.

torchvision.io.decode_jpeg decodes on CPU too, so everything but nvJPEG itself is exercised here: header
routing, the one batched call, resize/crop/patchify, the CPU fallback, per-item errors and the one-by-one
retry when the batched call raises. Every image is generated here with Pillow.
"""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
tvio = pytest.importorskip("torchvision.io")

from pipeline.decode import DecodeError, DecodePatches, to_patches  # noqa: E402
from pipeline.gpu_decode import GpuDecoder, is_jpeg, jpeg_gpu_size  # noqa: E402
from pipeline.sample import encode, photo_like  # noqa: E402
from vit.preprocess import patchify  # noqa: E402

S, P = 224, 16
G = S // P


def jpeg(w: int, h: int, seed: int = 0, **kw) -> bytes:
    return encode(photo_like(np.random.default_rng(seed), w, h), "JPEG", **kw)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def unpatch(p: np.ndarray) -> np.ndarray:
    """(N, P·P·3) in (kh, kw, c) layout → (S, S, 3)."""
    return p.reshape(G, G, P, P, 3).transpose(0, 2, 1, 3, 4).reshape(S, S, 3)


def with_orientation(data: bytes, orientation: int) -> bytes:
    im = Image.open(io.BytesIO(data))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(im, "JPEG", exif=exif.tobytes())


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records the number of images in each torchvision.io.decode_jpeg call."""
    seen: list[int] = []
    real = tvio.decode_jpeg

    def spy(input, *args, **kwargs):
        seen.append(len(input) if isinstance(input, list) else 1)
        return real(input, *args, **kwargs)

    monkeypatch.setattr(tvio, "decode_jpeg", spy)
    return seen


def decoder(**kw) -> GpuDecoder:
    return GpuDecoder(S, P, device="cpu", **kw)


# ---------------------------------------------------------------------------------------------------------
# header routing


def test_is_jpeg() -> None:
    assert is_jpeg(jpeg(32, 24))
    assert not is_jpeg(encode(photo_like(np.random.default_rng(0), 8, 8), "PNG"))
    assert not is_jpeg(b"\xff\xd8")
    assert not is_jpeg(b"")


def test_header_routing() -> None:
    rng = np.random.default_rng(1)
    good = jpeg(300, 200)
    assert jpeg_gpu_size(good) == (300, 200)
    assert jpeg_gpu_size(jpeg(300, 200, progressive=True)) == (300, 200)
    assert jpeg_gpu_size(encode(photo_like(rng, 40, 30).convert("L"), "JPEG")) == (40, 30)
    assert jpeg_gpu_size(with_orientation(good, 1)) == (300, 200)
    assert jpeg_gpu_size(with_orientation(good, 6)) == "exif orientation"
    assert jpeg_gpu_size(encode(photo_like(rng, 40, 30).convert("CMYK"), "JPEG")) == "unusual jpeg"
    assert jpeg_gpu_size(encode(photo_like(rng, 40, 30), "PNG")) == "not jpeg"
    assert jpeg_gpu_size(good, max_pixels=300 * 200 - 1) == "max pixels"
    assert jpeg_gpu_size(good[: len(good) // 2]) == "no end marker"
    assert jpeg_gpu_size(good[:40]) == "truncated header"


# ---------------------------------------------------------------------------------------------------------
# equivalence with the CPU path


def test_matches_cpu_path_in_one_batched_call(calls: list[int]) -> None:
    sizes = [(500, 375), (375, 500), (640, 480), (640, 480), (256, 256), (224, 224), (160, 120), (700, 180)]
    data = [jpeg(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    dec = decoder()
    out, errors = dec(data)
    assert errors == [None] * len(data)
    assert calls == [len(data)]  # one batched decode for all of them
    assert out.dtype == torch.uint8 and out.shape == (len(data), G * G, P * P * 3)
    assert dec.stats["gpu_images"] == len(data) and dec.stats["cpu_images"] == 0
    for (w, h), d, got in zip(sizes, data, out.numpy()):
        ref = to_patches(d, S, P)
        assert got.shape == ref.shape
        assert psnr(got, ref) >= 35, (w, h, psnr(got, ref))
        assert psnr(unpatch(got), unpatch(ref)) >= 35  # the same image once reassembled: same layout


def test_custom_resize_size() -> None:
    d = jpeg(400, 300)
    out, errors = GpuDecoder(S, P, resize_size=S, device="cpu")([d])
    assert errors == [None]
    assert psnr(out[0].numpy(), to_patches(d, S, P, resize_size=S)) >= 35


def test_grayscale_jpeg(calls: list[int]) -> None:
    d = encode(photo_like(np.random.default_rng(2), 360, 240).convert("L"), "JPEG", quality=90)
    out, errors = decoder()([d])
    assert errors == [None] and calls == [1]
    img = unpatch(out[0].numpy())
    assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 0], img[..., 2])
    assert psnr(out[0].numpy(), to_patches(d, S, P)) >= 35


def test_progressive_jpeg(calls: list[int]) -> None:
    d = jpeg(480, 320, seed=3, progressive=True)
    out, errors = decoder()([d])
    assert errors == [None] and calls == [1]
    assert psnr(out[0].numpy(), to_patches(d, S, P)) >= 35


def test_other_inputs_take_the_cpu_path_exactly(calls: list[int]) -> None:
    rng = np.random.default_rng(4)
    rgba = photo_like(rng, 200, 150).convert("RGBA")
    rgba.putalpha(128)
    data = [
        encode(photo_like(rng, 300, 200), "PNG"),
        encode(photo_like(rng, 300, 200), "WEBP", quality=90),
        encode(rgba, "PNG"),
        with_orientation(jpeg(320, 200, seed=5), 6),
        encode(photo_like(rng, 300, 200).convert("CMYK"), "JPEG", quality=90),
        jpeg(3000, 40, seed=6),  # resized to 19200×256: the CPU path crops before resizing
    ]
    dec = decoder()
    out, errors = dec(data)
    assert errors == [None] * len(data)
    assert calls == []  # none of them reached torchvision
    assert dec.stats["cpu_images"] == len(data) and dec.stats["gpu_images"] == 0
    for d, got in zip(data, out.numpy()):
        np.testing.assert_array_equal(got, to_patches(d, S, P))
    assert dec.fallback_reasons == {
        "not jpeg": 3,
        "exif orientation": 1,
        "unusual jpeg": 1,
        "aspect ratio": 1,
    }


def test_mixed_batch_errors_and_patches(calls: list[int]) -> None:
    good = [jpeg(400, 300, seed=7), jpeg(300, 400, seed=8), jpeg(640, 360, seed=9)]
    truncated = jpeg(400, 300, seed=10)[:3000]
    oversized = bytearray(jpeg(64, 48, seed=11))
    sof = oversized.index(b"\xff\xc0")
    oversized[sof + 5 : sof + 9] = (30000).to_bytes(2, "big") * 2  # header claims 30000×30000
    rnd = np.random.default_rng(12).bytes(5000)
    items: list[bytes | None] = [good[0], truncated, rnd, good[1], None, bytes(oversized), good[2]]
    dec = decoder()
    out, errors = dec(items)
    assert calls == [3]  # the good ones, in one batched call

    # The same error text as the CPU stage writes for these rows.
    keys = np.array([str(i) for i in range(len(items))], dtype=object)
    col = np.empty(len(items), dtype=object)
    col[:] = items
    cpu = DecodePatches(S, P)({"key": keys, "bytes": col})
    assert errors == list(cpu["error"])
    assert [e is None for e in errors] == [True, False, False, True, False, False, True]
    assert errors[4] == "decode: DecodeError: cannot decode image: the row has no image bytes"
    assert "truncated" in errors[1] and "900,000,000 pixels" in errors[5]
    assert all(e.startswith("decode: DecodeError: ") for e in errors if e is not None)
    for i, e in enumerate(errors):
        if e is None:
            assert psnr(out[i].numpy(), cpu["patches"][i]) >= 35
        else:
            assert not out[i].any()
    assert dec.stats["errors"] == 4 and dec.stats["gpu_images"] == 3


def test_batched_failure_retried_one_by_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """nvJPEG fails a whole batch for one file it rejects: the others still decode on the device."""
    data = [jpeg(320, 240, seed=i) for i in range(4)]
    rejected = len(data[2])
    seen: list[int] = []
    real = tvio.decode_jpeg

    def picky(input, *args, **kwargs):
        seen.append(len(input))
        if any(len(t) == rejected for t in input):
            raise RuntimeError("nvjpeg: NVJPEG_STATUS_BAD_JPEG")
        return real(input, *args, **kwargs)

    monkeypatch.setattr(tvio, "decode_jpeg", picky)
    dec = decoder()
    out, errors = dec(data)
    assert errors == [None] * 4
    assert seen == [4, 1, 1, 1, 1]
    assert dec.stats["batch_failures"] == 1 and dec.stats["gpu_images"] == 3 and dec.stats["cpu_images"] == 1
    assert dec.fallback_reasons == {"device decode failed": 1}
    np.testing.assert_array_equal(out[2].numpy(), to_patches(data[2], S, P))  # the CPU path took it
    for i in (0, 1, 3):
        assert psnr(out[i].numpy(), to_patches(data[i], S, P)) >= 35


def test_decoder_returning_wrong_shape_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    d = jpeg(320, 240)
    monkeypatch.setattr(tvio, "decode_jpeg", lambda input, **kw: [torch.zeros(3, 8, 8, dtype=torch.uint8)])
    out, errors = decoder()([d])
    assert errors == [None]
    np.testing.assert_array_equal(out[0].numpy(), to_patches(d, S, P))


def test_batch_pixels_splits_decode_calls(calls: list[int]) -> None:
    data = [jpeg(320, 240, seed=i) for i in range(5)]
    whole, _ = decoder()(data)
    calls.clear()
    split, errors = decoder(batch_pixels=2 * 320 * 240)(data)
    assert errors == [None] * 5 and calls == [2, 2, 1]
    assert torch.equal(whole, split)


# ---------------------------------------------------------------------------------------------------------
# layout, inputs, construction


def test_patchify_layout() -> None:
    imgs = torch.randint(0, 256, (2, 3, S, S), dtype=torch.uint8)
    got = patchify(imgs.permute(0, 2, 3, 1), P).numpy()  # as the GPU path patchifies its (B, 3, S, S)
    for b in range(2):
        hwc = imgs[b].permute(1, 2, 0).numpy()
        ref = hwc.reshape(G, P, G, P, 3).transpose(0, 2, 1, 3, 4).reshape(G * G, P * P * 3)
        np.testing.assert_array_equal(got[b], ref)
    # Patch (r, c), pixel (y, x), channel k sits at [r·G + c, (y·P + x)·3 + k].
    assert got[0, 3 * G + 5, (7 * P + 2) * 3 + 1] == imgs[0, 1, 3 * P + 7, 5 * P + 2]


def test_reassembled_patches_are_the_centre_crop() -> None:
    """A 256×256 JPEG is not resized (resize_size 256): the patches reassemble to its decoded centre."""
    d = jpeg(256, 256, seed=13)
    out, errors = decoder()([d])
    assert errors == [None]
    decoded = np.asarray(Image.open(io.BytesIO(d)).convert("RGB"))
    assert psnr(unpatch(out[0].numpy()), decoded[16:240, 16:240]) >= 45


def test_item_types_and_empty_batch() -> None:
    d = jpeg(200, 150)
    out, errors = decoder()([d, bytearray(d), memoryview(d), np.frombuffer(d, np.uint8), 42])  # type: ignore[list-item]
    assert errors[:4] == [None] * 4
    assert errors[4] == "decode: TypeError: expected image bytes, got int"
    for i in range(1, 4):
        assert torch.equal(out[i], out[0])
    out, errors = decoder()([])
    assert out.shape == (0, G * G, P * P * 3) and errors == []


def test_constructor_checks() -> None:
    with pytest.raises(ValueError, match="multiple of patch_size"):
        GpuDecoder(225, 16, device="cpu")
    with pytest.raises(ValueError, match="at least image_size"):
        GpuDecoder(224, 16, resize_size=200, device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            GpuDecoder(224, 16, device="cuda")


def test_module_imports_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None\n"
        "import pipeline.gpu_decode as g; assert g.is_jpeg(b'\\xff\\xd8\\xff\\xe0')"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_decode_error_is_the_cpu_paths() -> None:
    with pytest.raises(DecodeError):
        to_patches(b"\xff\xd8\xff" + bytes(10), S, P)
    _, errors = decoder()([b"\xff\xd8\xff" + bytes(10)])
    assert errors[0] is not None and errors[0].startswith("decode: DecodeError: cannot decode image")
