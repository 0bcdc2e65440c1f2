"""`--decode gpu`: batched JPEG decode with nvJPEG on the model's device, CPU fallback for everything else.

`GpuDecoder(image_size, patch_size, device=...)(items)` turns a list of encoded images into the uint8 patches
`[B, N, P·P·3]` (kh, kw, c) that `vit`'s `forward_patches` takes, already on `device`, plus one error string
(or None) per item. It lives inside the GPU actor: no Ray here, and torch/torchvision are imported only when
a decoder is built, so this module imports without them.

What goes to the GPU: JPEGs whose header (read here, before any pixel is decoded) says baseline, extended
or progressive Huffman coding, 8-bit, grey or 3-component YCbCr, EXIF orientation 1 or absent, at most
`max_pixels` pixels, at most `MAX_JPEG_SCANS` scans, and an end-of-image marker after the first scan (so a
truncated file is never half-decoded). They are decoded in one batched call,
`torchvision.io.decode_jpeg(list_of_tensors, device=device, mode=ImageReadMode.RGB)` (split only when the
decoded pixels would exceed `batch_pixels`), then resized exactly as torchvision's ViT preprocessing does:
the shorter side to `resize_size` with `F.interpolate(mode="bilinear", antialias=True)` on float32 (images
of equal size are resized together), rounded and clamped to uint8, centre-cropped with torchvision's
`CenterCrop` arithmetic, and patchified on the device.

Everything else — PNG, WebP, GIF, …, EXIF-rotated, CMYK/Adobe-RGB/12-bit/arithmetic-coded JPEGs, images over
`max_pixels`, extreme aspect ratios, truncated files, and any image the batched decode or the resize rejects
— goes through `pipeline.decode.to_patches` on the CPU (so its output and its error messages are exactly the
CPU path's) and is copied to the device. When the batched decode raises, its images are retried one by one
and each that still fails takes the CPU path: one bad file never fails a batch. A failure on the CPU path
gives the error `"decode: <ExceptionClass>: <message>"` (as `pipeline.decode.DecodePatches` writes it) and
zero patches.

Faithfulness: this path decodes at full size and resizes in float32, where the CPU path decodes large JPEGs
at a 1/2ᵏ DCT scale and resizes with torch's uint8 kernel. With torchvision's CPU decoder (libjpeg-turbo)
the two agreed to 44–57 dB PSNR on photo-like JPEGs from 123×457 to 3000×300 (the tests assert ≥ 35 dB);
nvJPEG's chroma upsampling and IDCT are not libjpeg's, so on CUDA the figure is expected lower (not yet
measured).
Files that are corrupt inside their entropy-coded data but still carry an end-of-image marker are decoded as
the decoder on `device` sees fit (nvJPEG's tolerance is not libjpeg's).

On CUDA, the CPU-path images are decoded after the device work is queued, so they overlap it. CUDA's
antialiased interpolate refuses downscale factors beyond ~94× ("Too much shared memory required": a shorter
side over ~24,000 px for a 256 target, i.e. more pixels than the default `max_pixels` allows); such images,
like any whose resize raises (e.g. out of device memory), take the CPU path.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

from pipeline.decode import (
    DEFAULT_MAX_PIXELS,
    MAX_JPEG_SCANS,
    DecodeError,
    as_bytes,
    check_sizes,
    jpeg_header,
    to_patches,
)

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_BATCH_PIXELS", "MAX_JPEG_SCANS", "GpuDecoder", "is_jpeg", "jpeg_gpu_size"]

DEFAULT_BATCH_PIXELS = 256 * 2**20  # decoded pixels per batched decode call (768 MiB of uint8 RGB)
_RESIZE_PIXELS = 32 * 2**20  # input pixels per float32 resize call (384 MiB of float32 RGB)
_MAX_CROP_AREA = 16  # resized image larger than this many crops (aspect ratio beyond ~12:1): CPU path
_NO_BYTES = "cannot decode image: the row has no image bytes"


def is_jpeg(data: bytes) -> bool:
    """True when the bytes start with a JPEG start-of-image marker followed by another marker (FF D8 FF)."""
    return bytes(data[:3]) == b"\xff\xd8\xff"


def jpeg_gpu_size(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int] | str:
    """(width, height) when `data` is a JPEG the GPU path takes; otherwise why not, in a word or two.

    Reads only the markers before the first scan (plus a search for the scan and end-of-image markers);
    never decodes pixel data.
    """
    if not is_jpeg(data):
        return "not jpeg"
    hdr = jpeg_header(data)
    if isinstance(hdr, str):
        return hdr
    w, h, orientation, sos = hdr.width, hdr.height, hdr.orientation, hdr.sos
    if not hdr.common or w == 0 or h == 0:
        return "unusual jpeg"
    # RGB-coded (not YCbCr) JPEGs: libjpeg honours these signals, nvJPEG may not.
    if hdr.components == 3 and (
        hdr.adobe_transform == 0 or (hdr.adobe_transform is None and hdr.component_ids == b"RGB")
    ):
        return "unusual jpeg"
    if orientation != 1:
        return "exif orientation"
    if w * h > max_pixels:
        return "max pixels"  # the CPU path refuses it from the header, with its own message
    if hdr.progressive and bytes(data).count(b"\xff\xda") > MAX_JPEG_SCANS:
        return "too many scans"
    # 0xFF in entropy-coded data is always stuffed (FF 00) or a restart marker (FF D0..D7): an FF D9 after
    # the first scan is an end-of-image marker. Without one the file is truncated (or lacks only its EOI,
    # which the CPU path tells apart).
    if bytes(data).rfind(b"\xff\xd9", sos) < 0:
        return "no end marker"
    return w, h


class GpuDecoder:
    """Encoded images → (uint8 patches `[B, N, P·P·3]` on `device`, per-item error or None). Never raises
    for a bad image.

    `stats` counts batches, images, images decoded on the device (`gpu_images`), on the CPU path
    (`cpu_images`), errors, batched decode calls that raised (`batch_failures`) and wall seconds (device
    work may still be queued when a call returns). `fallback_reasons` counts why images took the CPU path.
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        resize_size: int | None = None,
        device: str = "cuda",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        batch_pixels: int = DEFAULT_BATCH_PIXELS,
    ) -> None:
        import torch

        resize_size = check_sizes(image_size, patch_size, resize_size)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"GpuDecoder(device={device!r}): torch sees no CUDA device")
        self.image_size = image_size
        self.patch_size = patch_size
        self.resize_size = int(resize_size)
        self.max_pixels = max_pixels
        self.batch_pixels = batch_pixels
        self.grid = image_size // patch_size
        self.stats: dict[str, float] = {
            "batches": 0,
            "images": 0,
            "gpu_images": 0,
            "cpu_images": 0,
            "errors": 0,
            "batch_failures": 0,
            "seconds": 0.0,
        }
        self.fallback_reasons: Counter[str] = Counter()

    # -----------------------------------------------------------------------------------------------------

    def __call__(self, items: list[bytes | None]) -> tuple[torch.Tensor, list[str | None]]:
        import torch

        t0 = time.perf_counter()
        n = len(items)
        s, p = self.image_size, self.patch_size
        out = torch.zeros((n, self.grid**2, p * p * 3), dtype=torch.uint8, device=self.device)
        errors: list[str | None] = [None] * n
        data: list[bytes | None] = [None] * n
        gpu: list[tuple[int, int, int]] = []  # (index, width, height)
        cpu: list[int] = []
        for i, item in enumerate(items):
            try:
                if item is None:
                    raise DecodeError(_NO_BYTES)
                data[i] = b = as_bytes(item)
            except Exception as e:
                errors[i] = f"decode: {type(e).__name__}: {e}"
                continue
            size = jpeg_gpu_size(b, self.max_pixels)
            if isinstance(size, str):
                self._fallback(cpu, i, size)
                continue
            w, h = size
            nw, nh = self._resized_size(w, h)
            if nw * nh > _MAX_CROP_AREA * s * s:
                self._fallback(cpu, i, "aspect ratio")
                continue
            gpu.append((i, w, h))

        # Device path: batched decode (split only past batch_pixels), then resize + crop + patchify.
        chunk: list[tuple[int, int, int]] = []
        pixels = 0
        for entry in gpu:
            if chunk and pixels + entry[1] * entry[2] > self.batch_pixels:
                self._decode_chunk(chunk, data, out, cpu)
                chunk, pixels = [], 0
            chunk.append(entry)
            pixels += entry[1] * entry[2]
        if chunk:
            self._decode_chunk(chunk, data, out, cpu)

        # CPU path: pipeline.decode, then one host → device copy.
        done: list[int] = []
        host = np.zeros((len(cpu), self.grid**2, p * p * 3), dtype=np.uint8)
        for i in sorted(cpu):
            raw = data[i]
            if raw is None:  # cannot happen: only items with bytes are routed
                continue
            try:
                host[len(done)] = to_patches(
                    raw, s, p, resize_size=self.resize_size, max_pixels=self.max_pixels
                )
                done.append(i)
            except Exception as e:  # a bad image is an error string, never a crash
                errors[i] = f"decode: {type(e).__name__}: {e}"
        if done:
            out[done] = torch.from_numpy(host[: len(done)]).to(self.device)

        self.stats["batches"] += 1
        self.stats["images"] += n
        self.stats["cpu_images"] += len(cpu)
        self.stats["gpu_images"] += len({i for i, _, _ in gpu}.difference(cpu))
        self.stats["errors"] += sum(e is not None for e in errors)
        self.stats["seconds"] += time.perf_counter() - t0
        return out, errors

    # -----------------------------------------------------------------------------------------------------

    def _fallback(self, cpu: list[int], i: int, reason: str) -> None:
        cpu.append(i)
        self.fallback_reasons[reason] += 1

    def _resized_size(self, w: int, h: int) -> tuple[int, int]:
        """torchvision's `Resize(resize_size)` output (width, height) for a (w, h) image."""
        r = self.resize_size
        return (r, int(r * h / w)) if w <= h else (int(r * w / h), r)

    def _decode_chunk(
        self, chunk: list[tuple[int, int, int]], data: list[bytes | None], out: torch.Tensor, cpu: list[int]
    ) -> None:
        """Decodes `chunk` on the device in one call (one by one if that raises) and writes its patches."""
        import torch
        import torchvision.io

        mode = torchvision.io.ImageReadMode.RGB

        def decode(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
            with warnings.catch_warnings():  # torchvision ≥ 0.29 deprecates torchvision.io's decoders
                warnings.simplefilter("ignore", DeprecationWarning)
                return list(torchvision.io.decode_jpeg(tensors, mode=mode, device=self.device))

        # A writable copy: torch.frombuffer warns on read-only bytes (decode_jpeg only reads it).
        tensors = [torch.frombuffer(bytearray(data[i] or b"\0"), dtype=torch.uint8) for i, _, _ in chunk]
        decoded: list[torch.Tensor | None]
        try:
            decoded = list(decode(tensors))
        except Exception:  # one bad file fails nvJPEG's whole batch: retry each image alone
            self.stats["batch_failures"] += 1
            decoded = []
            for t in tensors:
                try:
                    decoded.append(decode([t])[0])
                except Exception:
                    decoded.append(None)
        groups: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
        for (i, w, h), img in zip(chunk, decoded):
            if img is None or tuple(img.shape) != (3, h, w):
                self._fallback(cpu, i, "device decode failed")
            else:
                groups.setdefault((w, h), []).append((i, img))
        del tensors, decoded
        for (w, h), members in groups.items():
            per_call = max(1, _RESIZE_PIXELS // (w * h))
            for k in range(0, len(members), per_call):
                part = members[k : k + per_call]
                index = [i for i, _ in part]
                try:
                    out[index] = self._resize_crop_patchify(torch.stack([img for _, img in part]), w, h)
                except Exception:  # e.g. out of device memory for a huge image: the CPU path takes it
                    for i in index:
                        self._fallback(cpu, i, "device resize failed")

    def _resize_crop_patchify(self, imgs: torch.Tensor, w: int, h: int) -> torch.Tensor:
        """(B, 3, h, w) uint8 → (B, N, P·P·3) uint8: torchvision's Resize + CenterCrop, then (kh, kw, c)."""
        import torch
        import torch.nn.functional as F

        s = self.image_size
        nw, nh = self._resized_size(w, h)
        left, top = round((nw - s) / 2.0), round((nh - s) / 2.0)  # torchvision's CenterCrop offsets
        x = imgs.float()
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        x = x[:, :, top : top + s, left : left + s].round_().clamp_(0, 255).to(torch.uint8)
        return patchify(x, self.patch_size)


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, 3, S, S) images → (B, (S/P)², P·P·3) patches laid out (kh, kw, c), as `pipeline.decode`."""
    b, c, s, _ = imgs.shape
    g = s // patch_size
    x = imgs.permute(0, 2, 3, 1)  # (B, S, S, 3)
    x = x.reshape(b, g, patch_size, g, patch_size, c).permute(0, 1, 3, 2, 4, 5)  # (B, gh, gw, P, P, 3)
    return x.reshape(b, g * g, patch_size * patch_size * c)
