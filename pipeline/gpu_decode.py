"""`--decode gpu`: batched JPEG decode with nvJPEG on the model's device, CPU fallback for everything else.

`GpuDecoder(image_size, patch_size, device=...)(items)` turns a list of encoded images into the uint8 patches
`[B, N, P·P·3]` (kh, kw, c) that `vit`'s `forward_patches` takes, already on `device`, plus one error string
(or None) per item; it never raises for a bad image. No Ray here; torch/torchvision are imported only when a
decoder is built.

JPEGs that `jpeg_gpu_size` accepts from their header (common 8-bit YCbCr or grey frames, no EXIF rotation,
within `max_pixels` and `MAX_JPEG_SCANS`, with an end-of-image marker) are decoded in one batched
`torchvision.io.decode_jpeg` call (split past `batch_pixels`), resized as torchvision's ViT preprocessing
does (float32, antialiased bilinear), centre-cropped and patchified on the device; when that call raises,
its images are retried one by one. Everything else, and any image the device decode or resize rejects, goes
through `pipeline.decode.to_patches` on the CPU, so its output and error messages are the CPU path's. The
two paths agree closely, not bit-exactly; data corrupt inside a scan decodes as the device's decoder sees fit.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from typing import TYPE_CHECKING

import numpy as np

from pipeline.decode import DEFAULT_MAX_PIXELS, DecodeError, as_bytes, check_sizes, to_patches_sized
from pipeline.jpeg import MAX_JPEG_SCANS, is_jpeg, jpeg_header, too_many_scans
from vit.preprocess import crop_offsets, patchify, resized_size

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_BATCH_PIXELS",
    "MAX_JPEG_SCANS",
    "GpuDecoder",
    "is_jpeg",
    "jpeg_gpu_size",
]

DEFAULT_BATCH_PIXELS = 256 * 2**20  # decoded pixels per batched decode call (768 MiB of uint8 RGB)
_RESIZE_PIXELS = 32 * 2**20  # input pixels per float32 resize call (384 MiB of float32 RGB)
_MAX_CROP_AREA = 16  # resized image larger than this many crops (aspect ratio beyond ~12:1): CPU path
_NO_BYTES = "cannot decode image: the row has no image bytes"


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
    if too_many_scans(data, hdr):
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

    `sizes` holds the (width, height) of each image of the last call before resizing (None where not
    decoded). `stats` counts batches, images, images decoded on the device (`gpu_images`), on the CPU path
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
        exact: bool = False,
    ) -> None:
        import torch

        if exact:
            raise ValueError(
                "GpuDecoder cannot decode exactly as Pillow does: use pipeline.decode (exact=True)"
            )
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
        self.sizes: list[tuple[int, int] | None] = []  # (width, height) of the last call's images

    # -----------------------------------------------------------------------------------------------------

    def __call__(self, items: list[bytes | None]) -> tuple[torch.Tensor, list[str | None]]:
        import torch

        t0 = time.perf_counter()
        n = len(items)
        s, p = self.image_size, self.patch_size
        out = torch.zeros((n, self.grid**2, p * p * 3), dtype=torch.uint8, device=self.device)
        errors: list[str | None] = [None] * n
        self.sizes = [None] * n  # known from the JPEG header, or from the CPU path
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
            self.sizes[i] = size
            nw, nh = resized_size(w, h, self.resize_size)
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

        # CPU path: pipeline.decode (on CUDA it overlaps the queued device work), then one host → device copy.
        done: list[int] = []
        host = np.zeros((len(cpu), self.grid**2, p * p * 3), dtype=np.uint8)
        for i in sorted(cpu):
            raw = data[i]
            if raw is None:  # cannot happen: only items with bytes are routed
                continue
            try:
                host[len(done)], self.sizes[i] = to_patches_sized(
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
                except Exception:  # out of device memory, a downscale CUDA's antialias refuses: CPU path
                    for i in index:
                        self._fallback(cpu, i, "device resize failed")

    def _resize_crop_patchify(self, imgs: torch.Tensor, w: int, h: int) -> torch.Tensor:
        """(B, 3, h, w) uint8 → (B, N, P·P·3) uint8: torchvision's Resize + CenterCrop, then (kh, kw, c)."""
        import torch
        import torch.nn.functional as F

        s = self.image_size
        nw, nh = resized_size(w, h, self.resize_size)
        left, top = crop_offsets(nw, nh, s)
        x = imgs.float()
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        x = x[:, :, top : top + s, left : left + s].round_().clamp_(0, 255).to(torch.uint8)
        return patchify(x.permute(0, 2, 3, 1), self.patch_size)  # (B, S, S, 3) → (B, N, P·P·3)
