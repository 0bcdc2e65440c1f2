"""Throughput of the ViT on the pipeline's path (uint8 patches → CLS embedding + logits).

Runs the baseline (fp32, eager) and the requested variant in one process, on the same random weights
and input, and prints images/s and the fraction of the FLOP ceiling (2 × GMAC per image against
--peak-tflops; 790 is what an H100's dense bf16 matmuls reach). Examples:

    python benchmarks/model.py --preset vit_b_16 --batch-size 512 --dtype bf16 --compile   # on a GPU
    python benchmarks/model.py --preset vit_ti_16 --batch-size 8 --iters 3                 # CPU smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from vit.checkpoints import load_model
from vit.model import PRESETS, VisionTransformer, autocast, compile_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="vit_b_16", choices=sorted(PRESETS))
    p.add_argument("--weights", default="random", help="checkpoint path/URI, or 'random' (default)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=None, help="default: the preset's / checkpoint's")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16", help="the variant's precision")
    p.add_argument("--compile", action="store_true", help="the variant uses torch.compile")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune")
    p.add_argument("--all", action="store_true", help="run fp32/bf16 × eager/compile")
    p.add_argument("--iters", type=int, default=20, help="timed batches per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches per variant (compile happens here)")
    p.add_argument("--transfer", action="store_true", help="copy each batch host→device inside the timing")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="FLOP ceiling (H100 dense bf16: ~790)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def timed(fn: Callable[[], object], iters: int, warmup: int, device: torch.device) -> float:
    """Median seconds per call of `fn` over `iters` calls, after `warmup` untimed ones."""
    times = []
    for i in range(warmup + iters):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def write_json(path: Path | None, results: object) -> None:
    """Writes `results` to `path` as indented JSON, when a path is given (--json)."""
    if path is not None:
        path.write_text(json.dumps(results, indent=2))


def run_variant(
    model: VisionTransformer, patches: torch.Tensor, args: argparse.Namespace, dtype: str, compiled: bool
) -> tuple[float, torch.Tensor]:
    """Seconds per batch (median over --iters) and the CLS embeddings of the first batch."""
    device = torch.device(args.device)
    if compiled:
        model = compile_model(copy.deepcopy(model), mode=args.compile_mode)
    host = patches.cpu().pin_memory() if args.transfer and device.type == "cuda" else None
    first: list[torch.Tensor] = []

    def step() -> None:
        x = host.to(device, non_blocking=True) if host is not None else patches
        cls, _ = model.forward_patches(x)
        if not first:
            first.append(cls.float().cpu())

    with torch.inference_mode(), autocast(device, dtype):
        seconds = timed(step, args.iters, args.warmup, device)
    return seconds, first[0]


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    model = load_model(args.preset, args.weights, image_size=args.image_size).model.to(device)
    cfg = model.config
    gmac = cfg.gmacs()
    ceiling = args.peak_tflops * 1e12 / (2 * gmac * 1e9)
    name = device_name(device)
    print(f"torch {torch.__version__} on {name}")
    print(
        f"{args.preset} @ {cfg.image_size}px: {cfg.num_patches} patches, {gmac:.2f} GMAC/img; "
        f"ceiling {ceiling:,.0f} img/s at {args.peak_tflops:g} TFLOP/s; batch {args.batch_size}, "
        f"{args.iters} iters after {args.warmup} warm-up{', with host→device copy' if args.transfer else ''}"
    )
    generator = torch.Generator().manual_seed(0)
    patches = torch.randint(
        0, 256, (args.batch_size, cfg.num_patches, cfg.patch_dim), dtype=torch.uint8, generator=generator
    )
    patches = patches.to(device)

    variants = [("fp32", False)]
    if args.all:
        variants += [("fp32", True), ("bf16", False), ("bf16", True)]
    elif (args.dtype, args.compile) != ("fp32", False):
        variants.append((args.dtype, args.compile))

    results: list[dict] = []
    baseline = None
    print(
        f"{'variant':<16}{'img/s':>12}{'ms/batch':>11}{'TFLOP/s':>10}{'of ceiling':>12}"
        f"{'speedup':>9}{'max|Δcls|':>11}"
    )
    for dtype, compiled in variants:
        seconds, cls = run_variant(model, patches, args, dtype, compiled)
        ips = args.batch_size / seconds
        tflops = ips * 2 * gmac / 1e3
        baseline = baseline or (ips, cls)
        row = {
            "preset": args.preset, "image_size": cfg.image_size, "batch_size": args.batch_size,
            "device": name,
            "dtype": dtype, "compile": compiled, "images_per_s": ips, "ms_per_batch": seconds * 1e3,
            "tflops": tflops, "fraction_of_ceiling": tflops / args.peak_tflops,
            "speedup": ips / baseline[0], "max_abs_cls_diff": (cls - baseline[1]).abs().max().item(),
        }  # fmt: skip
        results.append(row)
        label = dtype + (" + compile" if compiled else "")
        print(
            f"{label:<16}{ips:>12,.1f}{seconds * 1e3:>11.2f}{tflops:>10.2f}"
            f"{row['fraction_of_ceiling']:>12.2%}"
            f"{row['speedup']:>8.2f}×{row['max_abs_cls_diff']:>11.2e}"
        )
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
