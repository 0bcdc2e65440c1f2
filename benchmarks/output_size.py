"""Output bytes per image with float16 embedding + float16 logits, ViT-B/16 (target ≤ 3.0 KB).

Runs the real stages without Ray, in this process: ``--images`` photo-like images from
``pipeline.sample.make_sample`` (JPEG q90, 1 in 8 PNG, 160–640 px) → ``DecodePatches`` (224 px) →
``EmbedPatches`` (``vit_b_16`` with random weights, CPU, fp32: 768-d CLS embedding, 1000 logits), then writes
the same rows seven ways and reads the sizes back from the files:

- **ours**: float16 + float16 with the pipeline's own writer (``pipeline.sink.to_table`` +
  ``write_parquet``: zstd, dictionary for key/error, byte-stream-split on float32 leaves only: DuckDB
  cannot read it on float16 columns), without top-k columns; then with the job's default top-5 classes,
  scores and (ImageNet-1k) names; then with ``--logits none`` (top-5 only). Every variant has the
  provenance columns (width, height, bytes_sha256, run_id);
- float16 + float16, zstd, byte-stream-split (smaller, but DuckDB cannot read it);
- float16 + float16, byte-stream-split, zstd level 19 instead of Arrow's default 1 (a lossless lever);
- float32 + float32 with the pipeline's writer (byte-stream-split);
- **baseline**: float32 + float32, zstd, no byte-stream-split (what ``pyarrow.parquet.write_table`` with
  zstd gives).

Per image: the column chunks' compressed bytes ÷ rows (what a file converges to), and the footer (schema,
row-group metadata, the ``vit_embed.*`` identity) in bytes per file, amortized over the smallest and the
largest unit of loose files (``pipeline.units.MIN_FILES_PER_UNIT`` and ``MAX_FILES_PER_UNIT`` rows: one
unit is one output file). The encodings are read back from the file's metadata, so they show whether
byte-stream-split was applied (a list column is named by its leaf path, ``embedding.list.element``; its
plain name is silently ignored). Column bytes are also printed for 32–1024 rows per file, with and without
byte-stream-split: small files (a small unit, the last file of a run) give zstd less to learn from.

Random weights: the embedding is the CLS token after the final LayerNorm, so its scale and sign pattern
look like a trained model's; the logits come from a random head (std 0.02 weights), a narrow, nearly
Gaussian cloud, where a trained head gives a wide distribution with a few large positive values. float16
compressibility depends mostly on how many distinct exponents occur (the 10 mantissa bits are close to
random either way), so the script prints the order-0 entropy of the high and low bytes too: the floor for
a byte-wise lossless coder. Rerun with ``--weights`` on a trained checkpoint for its figures.

    python benchmarks/output_size.py                   # 256 images, ~1–2 min on 2 CPUs
    python benchmarks/output_size.py --images 64       # quick (fewer rows per file: see the README)
    python benchmarks/output_size.py --weights vit_b_16-c867db91.pth --images 512
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from pipeline.decode import DecodePatches
from pipeline.embed import EmbedPatches, ModelSpec
from pipeline.sample import make_sample
from pipeline.sink import ROW_GROUP_ROWS, OutputSpec, to_table, write_parquet
from pipeline.units import MAX_FILES_PER_UNIT, MIN_FILES_PER_UNIT
from vit.checkpoints import imagenet_class_names

TARGET_BYTES = 3000  # 3.0 KB (3.0 KiB = 3072 would be looser)

# (name, embedding dtype, logits dtype, byte-stream-split, zstd level (None: the pipeline's own writer),
# the OutputSpec's other options: "names" stands for the 1,000 ImageNet-1k class names)
VARIANTS: list[tuple[str, str, str, bool, int | None, dict[str, Any]]] = [
    ("ours: f16+f16, pipeline writer", "float16", "float16", False, None, {}),
    ("ours + top-5 with names", "float16", "float16", False, None, {"topk": 5, "class_names": "names"}),
    (
        "ours, --logits none, top-5",
        "float16",
        "float16",
        False,
        None,
        {"logits": False, "topk": 5, "class_names": "names"},
    ),
    ("f16+f16, BSS", "float16", "float16", True, 1, {}),
    ("f16+f16, BSS, zstd 19", "float16", "float16", True, 19, {}),
    ("f32+f32, BSS", "float32", "float32", True, None, {}),
    ("baseline: f32+f32, no BSS", "float32", "float32", False, 1, {}),
]
OWN = ("key", "embedding", "logits", "top", "error")  # column groups printed; the rest is "provenance"


def embed_images(args: argparse.Namespace, work: Path) -> dict[str, np.ndarray]:
    """Sample images → patches → (embedding, logits) in float32, with keys as the job would write them."""
    import torch

    paths = make_sample(work / "in", args.images, args.seed)
    keys = np.array([str(p.relative_to(work / "in")) for p in paths], dtype=object)
    data = np.empty(len(paths), dtype=object)
    data[:] = [p.read_bytes() for p in paths]
    torch.set_num_threads(args.threads)
    spec = ModelSpec(args.model, args.weights, image_size=args.image_size, seed=args.seed)
    embedder = EmbedPatches(spec, "float32", "float32", device="cpu", cpu_threads=args.threads)
    patch_size = embedder.loaded.model.config.patch_size
    image_size = embedder.loaded.model.config.image_size
    decoder = DecodePatches(image_size=image_size, patch_size=patch_size)
    outs = []
    t = time.perf_counter()
    for i in range(0, len(keys), args.batch_size):
        batch = {"key": keys[i : i + args.batch_size], "bytes": data[i : i + args.batch_size]}
        outs.append(embedder(decoder(batch)))
    seconds = time.perf_counter() - t
    columns = ("key", "embedding", "logits", "top_classes", "top_scores", "width", "height", "error")
    out = {k: np.concatenate([o[k] for o in outs]) for k in columns}
    out["bytes_sha256"] = np.array([hashlib.sha256(d).hexdigest() for d in data], dtype=object)
    errors = [e for e in out["error"] if e is not None]
    assert not errors, errors[:3]
    print(
        f"{len(keys)} images → {args.model} ({args.weights} weights, {image_size} px) on CPU × "
        f"{args.threads} threads in {seconds:.0f} s; embedding {out['embedding'].shape}, "
        f"logits {out['logits'].shape}",
        flush=True,
    )
    return out


def write_variant(
    rows: dict[str, np.ndarray],
    path: Path,
    emb: str,
    logits: str,
    bss: bool,
    level: int | None,
    meta: dict[str, str],
    options: dict[str, Any] | None = None,
) -> None:
    n, dim = rows["embedding"].shape
    options = dict(options or {})
    if options.get("class_names") == "names":
        options["class_names"] = imagenet_class_names()
    spec = OutputSpec(dim, rows["logits"].shape[1], emb, logits, **options)
    schema = spec.schema(meta)
    table = to_table(rows, spec, schema, run_id=meta["run_id"])
    if level is None:  # the pipeline's writer, as the job calls it
        written = write_parquet([table], pafs.LocalFileSystem(), str(path), schema)
        assert written == n
        return
    leaves = [f"{f.name}.list.element" for f in schema if pa.types.is_fixed_size_list(f.type)]
    pq.write_table(  # the pipeline's settings (pipeline.sink.write_parquet) but BSS and level as given
        table,
        str(path),
        compression="zstd",
        compression_level=level,  # Arrow's default for zstd is 1
        use_dictionary=["key", "error"],
        use_byte_stream_split=leaves if bss else False,
        write_statistics=["key"],
        row_group_size=ROW_GROUP_ROWS,
    )


def measure(path: Path) -> dict[str, Any]:
    """File size, compressed bytes per column, encodings, footer bytes."""
    md = pq.ParquetFile(path).metadata
    columns: dict[str, int] = {}
    encodings: dict[str, set[str]] = {}
    for g in range(md.num_row_groups):
        rg = md.row_group(g)
        for c in range(rg.num_columns):
            col = rg.column(c)
            name = col.path_in_schema.split(".")[0]
            name = "top" if name.startswith("top_") else name if name in OWN else "provenance"
            columns[name] = columns.get(name, 0) + col.total_compressed_size
            encodings.setdefault(name, set()).update(col.encodings)
    size = path.stat().st_size
    return {
        "rows": md.num_rows,
        "file_bytes": size,
        "column_bytes": columns,
        "data_bytes": sum(columns.values()),
        "footer_bytes": size - sum(columns.values()),  # footer + magic; page headers are in the columns
        "encodings": {k: sorted(v) for k, v in encodings.items()},
    }


def byte_entropy(values: np.ndarray) -> tuple[float, float]:
    """Order-0 entropy (bits) of the high and the low byte of float16 values."""
    u = np.ascontiguousarray(values.astype(np.float16)).view(np.uint16).ravel()
    out = []
    for b in ((u >> 8).astype(np.uint8), (u & 0xFF).astype(np.uint8)):
        p = np.bincount(b, minlength=256) / b.size
        p = p[p > 0]
        out.append(float(-(p * np.log2(p)).sum()))
    return out[0], out[1]


def identity_metadata(args: argparse.Namespace) -> dict[str, str]:
    """Footer key-values like a real run's (pipeline/plan.py's identity; values here are representative)."""
    meta = {
        "model": args.model,
        "weights": args.weights,
        "weights_sha256": "random" if args.weights == "random" else "0" * 64,
        "source_format": "random",
        "image_size": str(args.image_size or 224),
        "patch_size": "16",
        "resize_size": "256",
        "mean": "[0.485, 0.456, 0.406]",
        "std": "[0.229, 0.224, 0.225]",
        "preprocessing": "RGB (EXIF orientation applied, alpha composited on white); resize shorter side to "
        "256 bilinear antialias; centre crop 224; uint8 patches (kh, kw, c); normalize (x/255 - mean) / std",
        "embedding": "CLS token after the final LayerNorm",
        "version": "0.1.0",
        "run_id": "20261126T000000Z-abcdef",
    }
    if args.class_names:
        meta["class_names"] = json.dumps([f"n{i:08d} class name {i}" for i in range(1000)])
    return meta


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=256, help="images to embed (default: %(default)s)")
    p.add_argument("--model", default="vit_b_16", help="preset (default: %(default)s)")
    p.add_argument("--weights", default="random", help="checkpoint path, or random (default)")
    p.add_argument("--image-size", type=int, default=None, help="default: the preset's (224)")
    p.add_argument("--batch-size", type=int, default=32, help="images per model call (default: %(default)s)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all)")
    p.add_argument("--seed", type=int, default=0, help="sample images and random weights (default: 0)")
    p.add_argument(
        "--class-names",
        action="store_true",
        help="put 1000 class names in the footer, as a named checkpoint does",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-output-size-") as tmp:
        work = Path(tmp)
        rows = embed_images(args, work)
        meta = identity_metadata(args)
        results = {}
        for i, (name, emb, logits, bss, level, options) in enumerate(VARIANTS):
            path = work / f"variant-{i}.parquet"
            write_variant(rows, path, emb, logits, bss, level, meta, options)
            results[name] = measure(path)

        # Fewer rows per file (a small unit, the tail of a run): zstd has less data to learn from.
        by_rows = {}
        for k in sorted({m for m in (32, 64, 128, 256, 512, 1024) if m < len(rows["key"])}):
            head = {c: v[:k] for c, v in rows.items()}
            for bss, level in ((True, None), (False, 1)):
                path = work / f"rows-{k}-{bss}.parquet"
                write_variant(head, path, "float16", "float16", bss, level, meta)
                by_rows[(k, bss)] = measure(path)["data_bytes"] / k

    n = len(rows["key"])
    dim, classes = rows["embedding"].shape[1], rows["logits"].shape[1]
    base = results[VARIANTS[-1][0]]
    f16_bss = results[VARIANTS[3][0]]
    small, large = f"bytes_per_image_{MIN_FILES_PER_UNIT}_rows", f"bytes_per_image_{MAX_FILES_PER_UNIT}_rows"
    print(
        f"\nbytes per image ({n} rows in one file; raw float16 = {2 * (dim + classes)} B, float32 = "
        f"{4 * (dim + classes)} B); columns = key + embedding + logits + error (compressed, with page "
        f"headers); the footer is per file:"
    )
    titles = (
        "variant",
        "columns",
        "key",
        "embedding",
        "logits",
        "top-k",
        "prov.",
        "error",
        "footer/file",
        f"@{MIN_FILES_PER_UNIT} rows",
        "vs baseline",
    )
    w = max(len(name) for name in results)
    row = f"{{:<{w}}} {{:>7}} {{:>5}} {{:>9}} {{:>7}} {{:>5}} {{:>5}} {{:>5}} {{:>11}} {{:>9}} {{:>11}}"
    print(row.format(*titles))
    for name, r in results.items():
        per = {k: v / n for k, v in r["column_bytes"].items()}
        r["bytes_per_image"] = round(r["data_bytes"] / n, 1)
        r[small] = round(r["data_bytes"] / n + r["footer_bytes"] / MIN_FILES_PER_UNIT, 1)
        r[large] = round(r["data_bytes"] / n + r["footer_bytes"] / MAX_FILES_PER_UNIT, 1)
        r["ratio_vs_baseline"] = round(r["data_bytes"] / base["data_bytes"], 3)
        print(
            f"{name:<{w}} {r['bytes_per_image']:>7.0f} {per.get('key', 0):>5.0f} {per['embedding']:>9.0f} "
            f"{per.get('logits', 0):>7.0f} {per.get('top', 0):>5.0f} {per.get('provenance', 0):>5.0f} "
            f"{per.get('error', 0):>5.0f} {r['footer_bytes']:>11} {r[small]:>9.0f} "
            f"{r['ratio_vs_baseline']:>10.2f}×"
        )
    ours = results[VARIANTS[0][0]]
    print("\nencodings of the float columns (from the files):")
    for name, r in results.items():
        print(
            f"  {name:<{w}} embedding {','.join(r['encodings']['embedding'])}; "
            f"logits {','.join(r['encodings'].get('logits', ['(none)']))}"
        )

    if by_rows:
        print(
            "\nfloat16 + float16 column bytes per image by rows per file, with / without byte-stream-split: "
            + ", ".join(
                f"{k}: {by_rows[(k, True)]:.0f} / {by_rows[(k, False)]:.0f}"
                for k in sorted({k for k, _ in by_rows})
            )
        )
    print("\nvalues (float16 high byte = sign + exponent + 2 mantissa bits; low byte = 8 mantissa bits):")
    floor = 0.0  # order-0 entropy of the float16 bytes, B/image: what a byte-wise coder can reach at best
    for col in ("embedding", "logits"):
        v = rows[col].astype(np.float32)
        hi, lo = byte_entropy(v)
        floor += (hi + lo) / 8 * v.shape[1]
        per_value = ours["column_bytes"][col] / v.size
        print(
            f"  {col:<9} mean {v.mean():+.3f} std {v.std():.3f} min {v.min():+.2f} max {v.max():+.2f}; "
            f"entropy high byte {hi:.2f} bits, low byte {lo:.2f} bits → order-0 bound "
            f"{(hi + lo) / 8:.2f} B/value; written {per_value:.2f} B/value"
        )
    bss_gain = ours["data_bytes"] / f16_bss["data_bytes"]
    verdict = "met" if ours[small] <= TARGET_BYTES else "NOT met"
    print(
        "\nfloat16 + float16, the pipeline's writer (zstd; no byte-stream-split on float16, see sink.py): "
        f"{ours['bytes_per_image']:.0f} B/image of column data, {ours[small]:.0f} B/image with the footer "
        f"of a {MIN_FILES_PER_UNIT}-row file ({ours[large]:.0f} B at {MAX_FILES_PER_UNIT} rows); target "
        f"≤ {TARGET_BYTES} B (3.0 KB): {verdict} (3.0 KiB = 3072 B: "
        f"{'met' if ours[small] <= 3072 else 'NOT met'}). "
        f"{base['data_bytes'] / ours['data_bytes']:.2f}× smaller than the float32 no-BSS baseline; "
        f"byte-stream-split on float16 would make it {bss_gain:.2f}× smaller again. Order-0 entropy of "
        f"these float16 bytes: {floor:.0f} B/image of embedding + logits (a byte-wise lossless coder's "
        f"floor). Random weights: a trained head's logits may compress differently."
    )
    full, lean = results[VARIANTS[1][0]], results[VARIANTS[2][0]]
    print(
        "\nWith the default columns (float16, top-5 with ImageNet names, provenance): "
        f"{full[small]:.0f} B/image at {MIN_FILES_PER_UNIT} rows per file; with --logits none: "
        f"{lean[small]:.0f} B/image "
        f"({lean[small] / full[small]:.2f}× of that)."
    )
    if args.json:
        out = {
            "images": n,
            "embedding_dim": dim,
            "num_classes": classes,
            "variants": results,
            "f16_bytes_per_image_by_rows": {
                f"{k}{'' if bss else ' no BSS'}": v for (k, bss), v in by_rows.items()
            },
        }
        args.json.write_text(
            json.dumps(out, indent=2, default=lambda o: sorted(o) if isinstance(o, set) else o)
        )


if __name__ == "__main__":
    main()
