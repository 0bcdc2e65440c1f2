"""The model stage as the pipeline runs it: `EmbedPatches.__call__` on numpy batches (uint8 patches in;
float embedding and logits out, with the bookkeeping columns), against the model's forward alone on a batch
already on the device, in the same process.

The gap between the two is the actor's own cost per batch: the host→device copy (pinned, non-blocking),
the device→host copy of the outputs and the numpy work around them. Ray Data's batching (Arrow → numpy) is
not included: run benchmarks/pipeline.py for that. The actor is timed twice: as the pipeline runs it (on a
GPU the batch in `pipeline.embed.CUDA_PIECES` pieces, each piece's copy overlapping the model's work on the
previous one) and with the batch in one piece (copy, then compute), and its rows are checked against the
forward alone.

    python benchmarks/embed_actor.py --preset vit_b_16 --batch-size 512                 # on a GPU
    python benchmarks/embed_actor.py --preset vit_b_16 --batch-size 512 --compile
    python benchmarks/embed_actor.py --preset vit_ti_16 --batch-size 8 --iters 3         # CPU smoke run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from model import device_name, timed, write_json  # benchmarks/model.py, beside this script

from pipeline.embed import EmbedPatches, ModelSpec
from vit.model import PRESETS, autocast


def batch_of(n: int, num_patches: int, patch_dim: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "key": np.array([f"img/{i:08d}.jpg" for i in range(n)], dtype=object),
        "shard": np.array(["img"] * n, dtype=object),
        "error": np.array([None] * n, dtype=object),
        "unit": np.zeros(n, np.int64),
        "unit_rows": np.full(n, -1, np.int64),
        "read_s": np.zeros(n),
        "decode_s": np.zeros(n),
        "patches": rng.integers(0, 256, (n, num_patches, patch_dim), dtype=np.uint8),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="vit_b_16", choices=sorted(PRESETS))
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--dtype", choices=["float32", "float16"], default="float16", help="output dtypes")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    actor = EmbedPatches(
        ModelSpec(args.preset, "random"),
        embedding_dtype=args.dtype,
        logits_dtype=args.dtype,
        device="auto",
        compile=args.compile,
    )
    cfg = actor.loaded.model.config
    device = actor.device
    rng = np.random.default_rng(0)
    batches = [batch_of(args.batch_size, cfg.num_patches, cfg.patch_dim, rng) for _ in range(2)]
    on_device = torch.from_numpy(batches[0]["patches"]).to(device)

    def forward_only() -> None:
        with torch.inference_mode(), autocast(device):
            actor.model.forward_patches(on_device)

    calls = iter(range(1 << 30))

    def actor_call() -> None:
        out = actor(batches[next(calls) % 2])
        assert out["embedding"].shape == (args.batch_size, cfg.hidden_dim)

    fwd = timed(forward_only, args.iters, args.warmup, device)
    pieces = actor.pieces
    act = timed(actor_call, args.iters, args.warmup, device)
    actor.pieces = 1
    act_whole = timed(actor_call, args.iters, args.warmup, device)
    actor.pieces = pieces
    with torch.inference_mode(), autocast(device):
        reference = actor.model.forward_patches(on_device)[0].float().cpu().numpy()
    rows = actor(batches[0])["embedding"].astype(np.float32)
    worst = float(np.abs(rows - reference).max())
    name = device_name(device)
    result = {
        "preset": args.preset,
        "device": name,
        "batch_size": args.batch_size,
        "compile": args.compile,
        "output_dtype": args.dtype,
        "forward_only_img_s": round(args.batch_size / fwd, 1),
        "actor_img_s": round(args.batch_size / act, 1),
        "actor_over_forward": round(fwd / act, 3),
        "pieces": pieces,
        "actor_one_piece_img_s": round(args.batch_size / act_whole, 1),
        "pieces_over_one_piece": round(act_whole / act, 3),
        "max_abs_diff_vs_forward": worst,
    }
    print(
        f"{args.preset} batch {args.batch_size}{' compiled' if args.compile else ''} on {name}: "
        f"forward alone {result['forward_only_img_s']:,.0f} img/s; EmbedPatches (numpy in/out) "
        f"{result['actor_img_s']:,.0f} img/s = {result['actor_over_forward']:.0%} of it, in {pieces} "
        f"piece(s); in one piece {result['actor_one_piece_img_s']:,.0f} img/s (pieces: "
        f"{result['pieces_over_one_piece']:.2f}× that); embedding vs the forward alone: "
        f"max |diff| {worst:.2g} ({args.dtype} output)"
    )
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
