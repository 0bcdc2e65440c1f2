"""`--decode gpu`: batched JPEG decode + resize + crop + patchify on the model's device with
`pipeline.gpu_decode.GpuDecoder`, against the CPU path (`pipeline.decode.to_patches`) in the same process.

For each size: up to `--distinct` real photographs (`pipeline.sample.photographs`, JPEG quality 90; six
at each default size) tiled to `--images`, decoded in batches of
`--batch-size` on `--device` (cuda when available); images/s over `--rounds` rounds (median, with
`torch.cuda.synchronize` around each round), the CPU path's single-thread images/s on the same images, and
the PSNR of the device output against the CPU path's (worst image; the CPU path is itself ≥ 30 dB from
torchvision's preprocessing, see benchmarks/decode.py). On a machine without a GPU it runs torchvision's CPU
decoder through the same code (a smoke test of the script, not a GPU figure).

    python benchmarks/gpu_decode.py                              # 500x375 and 1024x768, 2048 images each
    python benchmarks/gpu_decode.py --images 256 --rounds 1      # quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from decode import psnr  # benchmarks/decode.py, beside this script

from pipeline.decode import to_patches
from pipeline.gpu_decode import GpuDecoder
from pipeline.sample import photographs


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(size: tuple[int, int], args: argparse.Namespace) -> dict:
    w, h = size
    distinct = list(photographs(((w, h),)).values())[: args.distinct]
    images = [distinct[i % len(distinct)] for i in range(args.images)]
    decoder = GpuDecoder(args.image_size, args.patch_size, device=args.device)
    decoder(images[: args.batch_size])  # warm-up: CUDA context, nvJPEG handles, kernels
    sync(args.device)
    rates = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        for i in range(0, len(images), args.batch_size):
            _, errors = decoder(images[i : i + args.batch_size])
            assert not any(errors), errors
        sync(args.device)
        rates.append(len(images) / (time.perf_counter() - start))
    device_out, _ = decoder(distinct)
    device_out = device_out.cpu().numpy()
    start = time.thread_time()  # this thread only: torch's idle worker threads spin on the process's clock
    cpu_out = [to_patches(d, args.image_size, args.patch_size) for d in distinct]
    cpu_rate = len(distinct) / (time.thread_time() - start)
    worst = min(psnr(device_out[i], cpu_out[i]) for i in range(len(distinct)))
    stats = {k: v for k, v in decoder.stats.items() if k in ("gpu_images", "cpu_images", "batch_failures")}
    return {
        "size": f"{w}x{h}",
        "device": args.device,
        "device_img_s": round(statistics.median(rates), 1),
        "device_img_s_range": [round(min(rates), 1), round(max(rates), 1)],
        "cpu_path_img_s_one_thread": round(cpu_rate, 1),
        "psnr_vs_cpu_path_db": round(worst, 1),
        "routing": stats,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="500x375,1024x768")
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--distinct", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    if args.device == "cpu":
        print("no GPU: torchvision's CPU decoder through the GPU path's code (a smoke test, not a figure)")
    results = []
    for size in sizes:
        r = measure(size, args)  # type: ignore[arg-type]
        results.append(r)
        print(
            f"{r['size']:>10} on {r['device']}: {r['device_img_s']:.0f} img/s "
            f"(rounds {r['device_img_s_range'][0]:.0f}–{r['device_img_s_range'][1]:.0f}), "
            f"batch {args.batch_size}; CPU path {r['cpu_path_img_s_one_thread']:.0f} img/s on one thread; "
            f"PSNR vs CPU path {r['psnr_vs_cpu_path_db']} dB (worst of {args.distinct}); "
            f"routing {r['routing']}",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
