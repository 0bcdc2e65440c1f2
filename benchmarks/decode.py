"""CPU decode stage benchmark: `pipeline.decode.to_patches` vs torchvision-style PIL preprocessing.

Baseline, per image: `Image.open(...).convert("RGB")` → `Resize(256, bilinear, antialias=True)` →
`CenterCrop(224)` → numpy. Ours: `to_patches(data)` (decode + resize + crop + patchify). Both run in this
process, single-threaded, on the same photo-like JPEGs (quality 90, generated deterministically); times
are CPU seconds (`time.process_time`, all threads of the process), alternating baseline and ours round by
round, medians reported. PSNR is ours (patches put back into an image) against the baseline's output, on
the timed photo-like images and, untimed, on natural-like ones (a 1/f spectrum: detail at every scale,
which shows aliasing that the smooth photo-like images hide).

    python benchmarks/decode.py                  # 500×375 and 1024×768
    python benchmarks/decode.py --sizes 2048x1536 --rounds 3 --json
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core: CPU seconds per image are what matters

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.decode import to_patches
from pipeline.sample import natural_array as natural_like
from pipeline.sample import photo_array as photo_like
from vit.preprocess import crop_offsets, resized_size


def jpeg(a: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_baseline(image_size: int = 224, resize_size: int = 256):
    try:
        import torchvision.transforms as T

        tf = T.Compose(
            [T.Resize(resize_size, T.InterpolationMode.BILINEAR, antialias=True), T.CenterCrop(image_size)]
        )
    except ImportError:  # the same operations, as torchvision performs them on a PIL image
        print("torchvision not installed: baseline uses the equivalent PIL calls", file=sys.stderr)

        def tf(im: Image.Image) -> Image.Image:
            nw, nh = resized_size(*im.size, resize_size)
            im = im.resize((nw, nh), Image.Resampling.BILINEAR)
            left, top = crop_offsets(nw, nh, image_size)
            return im.crop((left, top, left + image_size, top + image_size))

    def baseline(data: bytes) -> np.ndarray:
        return np.asarray(tf(Image.open(io.BytesIO(data)).convert("RGB")))

    return baseline


def unpatch(p: np.ndarray, image_size: int = 224, patch_size: int = 16) -> np.ndarray:
    g = image_size // patch_size
    return (
        p.reshape(g, g, patch_size, patch_size, 3).transpose(0, 2, 1, 3, 4).reshape(image_size, image_size, 3)
    )


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def cpu_seconds_per_image(fn, images: list[bytes], repeat: int) -> float:
    t = time.process_time()
    for _ in range(repeat):
        for d in images:
            fn(d)
    return (time.process_time() - t) / (repeat * len(images))


def run(sizes: list[tuple[int, int]], n_images: int, rounds: int, repeat: int, quality: int) -> list[dict]:
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    baseline = make_baseline()
    variants = {"ours": to_patches}
    results = []
    for w, h in sizes:
        images = [jpeg(photo_like(w, h, seed), quality) for seed in range(n_images)]
        psnrs = [psnr(unpatch(to_patches(d)), baseline(d)) for d in images]  # also warms up
        natural = [jpeg(natural_like(w, h, seed), quality) for seed in range(3)]
        psnrs_natural = [psnr(unpatch(to_patches(d)), baseline(d)) for d in natural]
        times: dict[str, list[float]] = {"baseline": [], **{k: [] for k in variants}}
        for _ in range(rounds):  # alternate, so drifts in machine speed hit both alike
            times["baseline"].append(cpu_seconds_per_image(baseline, images, repeat))
            for name, fn in variants.items():
                times[name].append(cpu_seconds_per_image(fn, images, repeat))
        ratios = [b / o for b, o in zip(times["baseline"], times["ours"], strict=True)]
        base_s, ours_s = statistics.median(times["baseline"]), statistics.median(times["ours"])
        results.append(
            {
                "size": f"{w}x{h}",
                "jpeg_kb": round(sum(map(len, images)) / len(images) / 1024, 1),
                "baseline_img_s": round(1 / base_s, 1),
                "ours_img_s": round(1 / ours_s, 1),
                "ratio": round(statistics.median(ratios), 2),
                "ratio_min": round(min(ratios), 2),
                "ratio_max": round(max(ratios), 2),
                "psnr_db_min": round(min(psnrs), 1),
                "psnr_db_mean": round(statistics.mean(psnrs), 1),
                "psnr_natural_db_min": round(min(psnrs_natural), 1),
            }
        )
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="500x375,1024x768", help="comma-separated WxH (default: %(default)s)")
    ap.add_argument("--images", type=int, default=6, help="distinct images per size (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=7, help="alternating timing rounds (default: %(default)s)")
    ap.add_argument(
        "--repeat", type=int, default=5, help="passes over the images per round (default: %(default)s)"
    )
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality (default: %(default)s)")
    ap.add_argument("--json", action="store_true", help="print one JSON object per size instead of a table")
    args = ap.parse_args()
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",")]
    results = run(sizes, args.images, args.rounds, args.repeat, args.quality)  # type: ignore[arg-type]
    if args.json:
        for r in results:
            print(json.dumps(r))
        return
    print(f"decode + resize + crop to 224, JPEG q{args.quality}, 1 thread, CPU time")
    head = ("size", "KB", "baseline img/s", "ours img/s", "ratio", "min", "max", "PSNR dB", "natural PSNR dB")
    print("{:>10} {:>6} {:>15} {:>11} {:>6} {:>5} {:>5} {:>8} {:>16}".format(*head))
    for r in results:
        print(
            f"{r['size']:>10} {r['jpeg_kb']:>6} {r['baseline_img_s']:>15} {r['ours_img_s']:>11} "
            f"{r['ratio']:>6} {r['ratio_min']:>5} {r['ratio_max']:>5} {r['psnr_db_min']:>8} "
            f"{r['psnr_natural_db_min']:>16}"
        )


if __name__ == "__main__":
    main()
