"""ViT preprocessing geometry and the patch layout of `VisionTransformer.forward_patches`.

torchvision's ViT preprocessing is `Resize(resize_size)` (shorter side to `resize_size`) then
`CenterCrop(image_size)`; `resized_size` and `crop_offsets` compute what those two do, exactly.
`patchify` lays an image out as the model's uint8 patches. The CPU and GPU decode paths and the model share
these. Imports neither numpy nor torch (decode workers import this without torch); the array functions
take numpy arrays and torch tensors alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = ["crop_offsets", "default_resize_size", "patch_grid", "patchify", "resized_size", "unpatchify"]

Images = TypeVar("Images", "np.ndarray", "torch.Tensor")


def default_resize_size(image_size: int) -> int:
    """torchvision's ViT recipe scaled to `image_size`: 256 for a 224 crop."""
    return round(image_size * 256 / 224)


def resized_size(w: int, h: int, resize_size: int) -> tuple[int, int]:
    """torchvision's `Resize(resize_size)` output (width, height) for a (w, h) image: the shorter side
    becomes `resize_size`, the longer `int(resize_size * long / short)`."""
    if w <= h:
        return resize_size, int(resize_size * h / w)
    return int(resize_size * w / h), resize_size


def crop_offsets(nw: int, nh: int, image_size: int) -> tuple[int, int]:
    """torchvision's `CenterCrop(image_size)` (left, top) in an (nw, nh) image."""
    return round((nw - image_size) / 2.0), round((nh - image_size) / 2.0)


def patch_grid(images: Images, patch_size: int) -> Images:
    """(…, H, W, C) → (…, H/P, W/P, P, P, C), a view (for any crop of an image too): [..., r, c] is
    patch (r, c), its pixels laid out (kh, kw, c)."""
    *lead, h, w, c = images.shape
    p = patch_size
    return images.reshape(*lead, h // p, p, w // p, p, c).swapaxes(-4, -3)


def patchify(images: Images, patch_size: int) -> Images:
    """(…, H, W, C) → (…, N, P·P·C): patches row-major, each laid out (kh, kw, c)."""
    *lead, h, w, c = images.shape
    p = patch_size
    return patch_grid(images, p).reshape(*lead, (h // p) * (w // p), p * p * c)


def unpatchify(patches: Images, patch_size: int, grid: int) -> Images:
    """`patchify`'s inverse: (…, N, P·P·C) → (…, H, W, C) for a `grid` × `grid` image."""
    *lead, _, k = patches.shape
    p = patch_size
    c = k // (p * p)
    x = patches.reshape(*lead, grid, grid, p, p, c).swapaxes(-4, -3)  # (…, gh, P, gw, P, C)
    return x.reshape(*lead, grid * p, grid * p, c)
