"""CPU decode stage benchmark on real photographs: both preprocessing modes of `pipeline.decode.to_patches`
against torchvision's PIL path and against libjpeg-turbo alone.

Per image size, in one process, single-threaded, on the same JPEGs (q90 by default):

- fast: `to_patches(data)` (libjpeg-turbo DCT-scaled decode + OpenCV resample of the crop window + patchify)
- exact: `to_patches(data, exact=True)` (Pillow's decode and resize: torchvision's pixels)
- baseline: torchvision's path, `Image.open(...).convert("RGB")` → `Resize(256, bilinear, antialias=True)`
  → `CenterCrop(224)` → uint8 array
- scaled decode: the fast path's own libjpeg-turbo decode (`pipeline.decode.scaled_decode`: the DCT scale
  and IDCT it picks, header parse included), nothing after it: what fast mode would cost if resampling and
  patchifying were free, so the most it can reach
- full decode: libjpeg-turbo (simplejpeg) decode to RGB at full size, nothing else
- floor: libjpeg-turbo at its smallest DCT scale, 1/8 (IDCT of the DC coefficient only): the entropy
  (Huffman) decode that no CPU decode of the JPEG avoids

Images: `pipeline.sample.photographs` (scikit-image's colour photos, see its docstring for which photos
each size has); an extra line per size on generated photo-like images (`pipeline.sample.photo_array`),
labelled as such: they are smoother than photographs and flatter DCT-domain decoding. Times: CPU seconds
per image (`time.process_time`, all threads of the process); each round times every method in turn (order
rotated per round) over enough passes to last `--min-time`. Images/s per core: the best round; ratios: the
median over rounds of each round's ratio (a round's methods run back to back, so a drift in the machine's
speed cancels out). Fidelity: PSNR of fast against the baseline's pixels (min and median over the photos),
and the share of photos where exact equals the baseline bit for bit. Embeddings (unless `--no-cosine` or
`--quick`): the CLS cosine of fast mode through `vit_b_16` (seeded random weights) against the baseline's
pixels through torchvision's own `vit_b_16`, over the photographs and every photo whole (`embedding_cosines`).

    python benchmarks/decode.py                  # 500×375 and 1024×768, about a minute
    python benchmarks/decode.py --quick          # fewer, shorter repeats
    python benchmarks/decode.py --sizes 640x480 --repeats 7 --json
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core: CPU seconds per image are what matters

import numpy as np
import simplejpeg
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.decode import scaled_decode, to_patches
from pipeline.jpeg import jpeg_header
from pipeline.sample import encode, photo_array, photographs
from vit.preprocess import crop_offsets, resized_size

FLOOR_TARGET = 0.85  # fast path's target speed, as a share of the entropy-decode floor
COSINE_TARGET = 0.998  # fast mode's worst embedding cosine against torchvision's preprocessing


def make_baseline(image_size: int = 224, resize_size: int = 256) -> Callable[[bytes], np.ndarray]:
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


def methods() -> dict[str, Callable[[bytes], object]]:
    return {
        "fast": to_patches,
        "exact": lambda d: to_patches(d, exact=True),
        "baseline": make_baseline(),
        "scaled decode": lambda d: scaled_decode(d, jpeg_header(d), 256),  # type: ignore[arg-type]
        "full decode": lambda d: simplejpeg.decode_jpeg(d, colorspace="RGB"),
        # min_width/min_height of 1: the smallest scale libjpeg-turbo offers, 1/8
        "floor": lambda d: simplejpeg.decode_jpeg(d, colorspace="RGB", min_width=1, min_height=1),
    }


def unpatch(p: np.ndarray, image_size: int = 224, patch_size: int = 16) -> np.ndarray:
    g = image_size // patch_size
    return (
        p.reshape(g, g, patch_size, patch_size, 3).transpose(0, 2, 1, 3, 4).reshape(image_size, image_size, 3)
    )


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def cpu_seconds_per_image(fn: Callable[[bytes], object], images: list[bytes], passes: int) -> float:
    t = time.process_time()
    for _ in range(passes):
        for d in images:
            fn(d)
    return (time.process_time() - t) / (passes * len(images))


def measure(images: list[bytes], repeats: int, min_time: float) -> dict[str, list[float]]:
    """CPU seconds per image of each method, one figure per round."""
    fns = methods()
    passes = {}
    for name, fn in fns.items():  # warm-up, and passes enough for min_time
        passes[name] = max(1, math.ceil(min_time / (cpu_seconds_per_image(fn, images, 1) * len(images))))
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(cpu_seconds_per_image(fns[name], images, passes[name]))
    return times


def ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """How many times faster `a` is than `b`: the median over rounds (a round's methods run back to back, so
    a drift in the machine's speed cancels out of the ratio)."""
    return statistics.median(tb / ta for ta, tb in zip(times[a], times[b], strict=True))


def fidelity(images: list[bytes]) -> dict[str, float]:
    baseline = make_baseline()
    psnrs, equal = [], 0
    for d in images:
        ref = baseline(d)
        psnrs.append(psnr(unpatch(to_patches(d)), ref))
        equal += bool(np.array_equal(unpatch(to_patches(d, exact=True)), ref))
    return {
        "psnr_db_min": round(min(psnrs), 1),
        "psnr_db_median": round(statistics.median(psnrs), 1),
        "exact_equal": equal / len(images),
    }


def embedding_cosines(images: dict[str, bytes]) -> list[tuple[float, str, str]]:
    """Fast mode through a ViT against torchvision's pixels through the same ViT: (cosine of the CLS
    embeddings, name, size) per image, worst first. The model is torchvision's `vit_b_16` with seeded random
    weights (its head re-initialized), loaded into `vit/`; the reference is torchvision's transforms on
    Pillow's decode (the baseline above) fed to torchvision's own model."""
    import tempfile

    import torch
    import torchvision.models as tvm
    import torchvision.transforms as T

    from vit.checkpoints import load_model

    torch.manual_seed(0)
    tv = tvm.vit_b_16().eval()
    torch.manual_seed(1)
    torch.nn.init.normal_(tv.heads.head.weight, std=0.05)
    torch.nn.init.normal_(tv.heads.head.bias, std=0.05)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(tv.state_dict(), f"{tmp}/vit_b_16.pth")
        ours = load_model("vit_b_16", f"{tmp}/vit_b_16.pth").model.eval()
    normalize = T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    baseline = make_baseline()
    captured: dict[str, torch.Tensor] = {}
    tv.heads.register_forward_hook(lambda _m, inputs, _o: captured.update(cls=inputs[0]))
    out = []
    for name, data in images.items():
        with torch.inference_mode():
            tv(normalize(Image.fromarray(baseline(data)))[None])
            cls, _ = ours.forward_patches(torch.from_numpy(to_patches(data)[None]))
        cos = float(torch.nn.functional.cosine_similarity(cls, captured["cls"], dim=1)[0])
        w, h = Image.open(io.BytesIO(data)).size
        out.append((cos, name, f"{w}x{h}"))
    return sorted(out)


def cosine_images(sizes: list[tuple[int, int]], quality: int) -> dict[str, bytes]:
    """The benchmark's photographs at `sizes`, and every photo whole (the 512-px ones land on the DCT
    scale's boundary: a 1/2-scale decode gives exactly 256)."""
    from skimage import data as skdata

    from pipeline.sample import PHOTOGRAPHS

    whole = {
        f"{name}.jpg": encode(Image.fromarray(np.asarray(getattr(skdata, name)())[..., :3]), quality=quality)
        for name in PHOTOGRAPHS
    }
    return {**photographs(tuple(sizes), quality), **whole}


def result(label: str, w: int, h: int, images: list[bytes], repeats: int, min_time: float) -> dict:
    times = measure(images, repeats, min_time)
    ips = {k: 1 / min(v) for k, v in times.items()}
    fast_of_floor = 1 / ratio(times, "floor", "fast")
    return {
        "size": f"{w}x{h}",
        "images": label,
        "n": len(images),
        "jpeg_kb": round(sum(map(len, images)) / len(images) / 1024, 1),
        **{f"{k.replace(' ', '_')}_img_s": round(v, 1) for k, v in ips.items()},
        "fast_vs_baseline": round(ratio(times, "fast", "baseline"), 2),
        "fast_pct_of_floor": round(100 * fast_of_floor, 1),
        "scaled_decode_pct_of_floor": round(100 / ratio(times, "floor", "scaled decode"), 1),
        "fast_pct_of_scaled_decode": round(100 / ratio(times, "scaled decode", "fast"), 1),
        "floor_target_met": fast_of_floor >= FLOOR_TARGET,
        "exact_vs_baseline": round(ratio(times, "exact", "baseline"), 2),
        **fidelity(images),
    }


def run(
    sizes: list[tuple[int, int]], repeats: int, min_time: float, quality: int, generated: int
) -> list[dict]:
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    photos = photographs(tuple(sizes), quality)
    results = []
    for w, h in sizes:
        real = [d for n, d in photos.items() if n.endswith(f"-{w}x{h}.jpg")]
        if real:
            results.append(result("photographs", w, h, real, repeats, min_time))
        if generated:
            made = [
                encode(Image.fromarray(photo_array(w, h, seed)), quality=quality) for seed in range(generated)
            ]
            results.append(result("generated photo-like", w, h, made, repeats, min_time))
    return results


def machine() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        uptime = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        uptime = "load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())
    import cv2
    import PIL

    libs = f"Pillow {PIL.__version__}, simplejpeg {simplejpeg.__version__}, OpenCV {cv2.__version__}"
    try:
        import torchvision

        libs += f", torchvision {torchvision.__version__}"
    except ImportError:
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "uptime": uptime,
        "machine": f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
        "python": f"Python {platform.python_version()}; {libs}",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="500x375,1024x768", help="comma-separated WxH (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=7, help="timing rounds, best kept (default: %(default)s)")
    ap.add_argument(
        "--min-time", type=float, default=0.2, help="CPU seconds per method per round (default: %(default)s)"
    )
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality (default: %(default)s)")
    ap.add_argument(
        "--generated",
        type=int,
        default=6,
        help="generated photo-like images per size, 0: none (default: %(default)s)",
    )
    ap.add_argument(
        "--no-cosine", action="store_true", help="skip the embedding cosines against torchvision (~30 s)"
    )
    ap.add_argument(
        "--quick", action="store_true", help="3 rounds of 0.1 s, no cosines: a rough figure in ~20 s"
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object per line instead of a table")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.min_time = 3, 0.1
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",")]
    info = machine()
    results = run(sizes, args.repeats, args.min_time, args.quality, args.generated)  # type: ignore[arg-type]
    cosines = [] if args.quick or args.no_cosine else embedding_cosines(cosine_images(sizes, args.quality))  # type: ignore[arg-type]
    info["uptime_after"] = machine()["uptime"]
    if args.json:
        print(json.dumps(info))
        for r in results:
            print(json.dumps(r))
        if cosines:
            print(
                json.dumps(
                    {"cosines": [{"cosine": round(c, 6), "image": n, "size": s} for c, n, s in cosines]}
                )
            )
        return
    print(f"{info['date']}; {info['machine']}")
    print(f"{info['python']}")
    print(f"uptime before: {info['uptime']}")
    print(f"uptime after:  {info['uptime_after']}")
    print(
        f"decode + resize + crop to 224, JPEG q{args.quality}, 1 thread, CPU time, images/s per core "
        f"(best of {args.repeats})"
    )
    head = ("size", "images", "n", "KB", "fast", "exact", "baseline", "scaled dec", "full dec", "floor")
    row = "{:>9} {:>21} {:>2} {:>6} {:>7} {:>7} {:>8} {:>10} {:>8} {:>7}"
    print(row.format(*head))
    for r in results:
        print(
            row.format(
                r["size"],
                r["images"],
                r["n"],
                r["jpeg_kb"],
                r["fast_img_s"],
                r["exact_img_s"],
                r["baseline_img_s"],
                r["scaled_decode_img_s"],
                r["full_decode_img_s"],
                r["floor_img_s"],
            )
        )
    print()
    head2 = (
        "size",
        "images",
        "fast/base",
        "fast % floor",
        "scaled dec % floor",
        "fast % scaled dec",
        "exact/base",
        "PSNR min",
        "median",
        "exact==base",
    )
    row = "{:>9} {:>21} {:>9} {:>19} {:>18} {:>17} {:>10} {:>8} {:>6} {:>11}"
    print(row.format(*head2))
    for r in results:
        met = "met" if r["floor_target_met"] else "not met"
        print(
            row.format(
                r["size"],
                r["images"],
                f"{r['fast_vs_baseline']}×",
                f"{r['fast_pct_of_floor']} % ({met})",
                f"{r['scaled_decode_pct_of_floor']} %",
                f"{r['fast_pct_of_scaled_decode']} %",
                f"{r['exact_vs_baseline']}×",
                r["psnr_db_min"],
                r["psnr_db_median"],
                f"{100 * r['exact_equal']:.0f} %",
            )
        )
    print(
        f"target: fast ≥ {100 * FLOOR_TARGET:.0f} % of the floor; 'scaled dec % floor' is the most any path "
        "through that decode can reach; PSNR is fast against the baseline, in dB"
    )
    if cosines:
        values = [c for c, _, _ in cosines]
        met = "met" if values[0] >= COSINE_TARGET else "not met"
        print()
        print(
            f"fast mode through vit_b_16 (seeded random weights) against torchvision's pixels through it, "
            f"{len(values)} photographs: CLS cosine worst {values[0]:.5f} (target ≥ {COSINE_TARGET}: {met}), "
            f"median {statistics.median(values):.5f}; the worst:"
        )
        for c, n, size in cosines[:5]:
            print(f"  {c:.5f}  {n} ({size})")


if __name__ == "__main__":
    main()
