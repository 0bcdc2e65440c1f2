"""The fast path's resampling: a JPEG decoded at a 1/2ᵏ DCT scale → torchvision's resize + centre crop.

Only the window that the crop reads is filtered and resampled, with OpenCV on the calling thread: bilinear,
after a [1, 2, 1] blur along an axis that still shrinks by at least _BLUR_FROM (plain bilinear aliases
beyond it), box averaging from _AREA_FROM. benchmarks/README.md has the PSNR against torchvision.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from vit.preprocess import crop_offsets, resized_size

_BLUR_FROM = 1.55
_AREA_FROM = 2.5
_WINDOW_SEARCH = 64  # extra outputs tried to align a resampling window on a whole pixel


def resize_crop_array(
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
    nw, nh = resized_size(w, h, resize_size)
    left, top = crop_offsets(nw, nh, size)
    dh, dw = arr.shape[:2]
    sx, sy = w / nw / factor, h / nh / factor  # decoded pixels per output pixel
    offx = (dw * factor - w) / factor if mirror_x else 0.0
    offy = (dh * factor - h) / factor if mirror_y else 0.0
    x0, x1, mx = _window(left, sx, offx, size, dw)
    y0, y1, my = _window(top, sy, offy, size, dh)
    # On the calling thread whatever cv2.setNumThreads says: a thread pool costs more CPU than this small
    # job saves. The setting is restored (a thread changing it at this very moment could see it undone).
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
