"""Approximate nearest-neighbour search over embeddings: FAISS and Lance against exact search.

Goal: recall@10 ≥ 0.95 at ≤ 10 ms per single query over 1 M vectors of dimension 768 (ViT-B's), cosine
similarity (vectors L2-normalised, inner product), on the machine it runs on.

For each data set, size and candidate it prints: build seconds, the build's memory (peak resident memory
growth of this process while building, measured by resetting the kernel's high-water mark through
``/proc/self/clear_refs``), the index's own bytes (FAISS: serialised; Lance: the index files on disk), and
for each search setting recall@10 against exact search and the latency of single queries (median and p95
over ``--queries`` queries, searched one at a time on one thread, as an interactive user would; also the
process's CPU milliseconds per query, median, which other load on the machine inflates less than the wall
time). Exact top-10s are computed in the same process by blocked matrix products (numpy/BLAS); the
``flat`` candidate is exact search through FAISS's IndexFlatIP, timed like the others (its recall is 1 by
construction).

Data (``--data``; vectors and queries are float32, L2-normalised; queries are fresh draws, not in the set):

- ``random``: i.i.d. Gaussian vectors. Nearest neighbours of a random query in 768 dimensions are barely
  nearer than anything else, so this is the worst case for every ANN method.
- ``clustered``: a mixture of ``--clusters`` Gaussian clusters (centres ~ N(0, I); a point is its centre
  plus N(0, ``--spread``² I) noise; spread 1 puts a point at cosine ≈ 0.71 from its centre and ≈ 0.5 from
  another member of its cluster). Real embeddings are clustered too (near-duplicates, classes), so this is
  closer to them, but real embeddings also have a lower intrinsic dimension than this isotropic noise.

Candidates (``--configs``; each is built once and searched with every setting listed):

- ``flat``: faiss.IndexFlatIP (exact).
- ``hnsw``: faiss.IndexHNSWFlat, M=32, efConstruction=``--ef-construction``; efSearch swept.
- ``hnsw-sq8``: the same graph over 8-bit scalar-quantised vectors (a quarter of the bytes per distance)
  with exact re-ranking of the top k×4 (IndexRefineFlat).
- ``ivf``: faiss.IndexIVFFlat, nlist ≈ 2√n rounded to a power of two, k-means 10 iterations on ≤ 64
  points per list; nprobe swept.
- ``ivf-sq8``: the same lists holding 8-bit vectors, exact re-ranking of the top k×4; nprobe swept.
- ``lance-ivfpq``: a Lance dataset with an IVF_PQ index (√n partitions, 96 sub-vectors), nprobes swept,
  refine_factor 4 (exact re-ranking).
- ``lance-hnsw``: Lance's IVF_HNSW_SQ index (√n / 4 partitions), nprobes swept.

    .venv/bin/python benchmarks/index.py                                   # 100k, both data sets, all
    .venv/bin/python benchmarks/index.py --sizes 1000000 --configs flat,ivf,ivf-sq8 --data random
    .venv/bin/python benchmarks/index.py --sizes 20000 --queries 200 --json   # quick
    .venv/bin/python benchmarks/index.py --end-to-end 1000000   # pipeline.vector_index, as jobs/index.py

1 M vectors of 768 floats are 3 GB; with the exact top-10s and the largest index this needs ~8 GB of
memory. On 2 vCPUs an HNSW build over 1 M takes tens of minutes; IVF builds take a few.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

os.environ.setdefault("LANCE_LOG", "error")  # Lance warns on every query that names its columns
K = 10
GOAL_RECALL = 0.95
GOAL_MS = 10.0
ALL_CONFIGS = ("flat", "hnsw", "hnsw-sq8", "ivf", "ivf-sq8", "lance-ivfpq", "lance-hnsw")


# --------------------------------------------------------------------------------------------------------
# Data


def _normalise(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def make_data(kind: str, n: int, nq: int, dim: int, clusters: int, spread: float, seed: int):
    """(vectors [n, dim], queries [nq, dim]), float32, L2-normalised, generated in blocks (no float64 copy
    of the whole set)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32) if kind == "clustered" else None

    def draw(m: int) -> np.ndarray:
        out = np.empty((m, dim), np.float32)
        for s in range(0, m, 65536):
            e = min(m, s + 65536)
            block = rng.standard_normal((e - s, dim), dtype=np.float32)
            if centres is not None:
                block *= spread
                block += centres[rng.integers(clusters, size=e - s)]
            out[s:e] = _normalise(block)
        return out

    return draw(n), draw(nq)


def exact_top_k(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest inner products of each query, best first, by blocked matrix products."""
    best_s = np.full((len(q), k), -np.inf, np.float32)
    best_i = np.zeros((len(q), k), np.int64)
    for s in range(0, len(x), 131072):
        scores = q @ x[s : s + 131072].T
        top = np.argpartition(-scores, min(k, scores.shape[1] - 1), axis=1)[:, :k]
        cand_s = np.concatenate([best_s, np.take_along_axis(scores, top, 1)], axis=1)
        cand_i = np.concatenate([best_i, top + s], axis=1)
        order = np.argsort(-cand_s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_i, order, 1)
    return best_i


# --------------------------------------------------------------------------------------------------------
# Measuring


def _status() -> dict[str, int]:
    with open("/proc/self/status") as f:
        return {
            line.split(":")[0]: int(line.split()[1]) * 1024
            for line in f
            if line.startswith(("VmRSS", "VmHWM"))
        }


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class Built:
    search: Callable[[np.ndarray, Any], np.ndarray]  # (one query [1, dim], setting) → ids [k]
    settings: list[Any]
    setting_name: str
    index_bytes: int
    cleanup: Callable[[], None] = field(default=lambda: None)


def _pow2(x: float) -> int:
    return int(2 ** round(np.log2(max(x, 1))))


def _ivf_nlist(n: int) -> int:
    return max(16, _pow2(2 * np.sqrt(n)))


def _faiss_ivf(x: np.ndarray, sq8: bool) -> Any:
    import faiss

    d, n = x.shape[1], len(x)
    nlist = _ivf_nlist(n)
    quantizer = faiss.IndexFlatIP(d)
    if sq8:
        base = faiss.IndexIVFScalarQuantizer(
            quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
        )
    else:
        base = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    base.cp.niter = 10
    base.cp.max_points_per_centroid = 64
    sample = x[np.random.default_rng(1).choice(n, size=min(n, 64 * nlist), replace=False)]
    base.train(sample)
    index = faiss.IndexRefineFlat(base) if sq8 else base  # the wrapper keeps `base` and `quantizer` alive
    if sq8:
        index.k_factor = 4
    index.add(x)
    return index, base, nlist


def build(config: str, x: np.ndarray, args: argparse.Namespace, workdir: str) -> Built:
    import faiss

    d = x.shape[1]
    if config == "flat":
        index = faiss.IndexFlatIP(d)
        index.add(x)
        return Built(lambda q, _: index.search(q, K)[1][0], [None], "-", index.ntotal * d * 4)
    if config in ("hnsw", "hnsw-sq8"):
        if config == "hnsw":
            hnsw = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        else:
            hnsw = faiss.IndexHNSWSQ(d, faiss.ScalarQuantizer.QT_8bit, 32, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = args.ef_construction
        if config == "hnsw-sq8":
            hnsw.train(x[:100_000])
        index = hnsw if config == "hnsw" else faiss.IndexRefineFlat(hnsw)
        if config == "hnsw-sq8":
            index.k_factor = 4
        index.add(x)
        size = len(faiss.serialize_index(index))

        def search(q: np.ndarray, ef: int) -> np.ndarray:
            hnsw.hnsw.efSearch = ef
            return index.search(q, K)[1][0]

        return Built(search, [32, 64, 128, 256, 512], "efSearch", size)
    if config in ("ivf", "ivf-sq8"):
        index, base, nlist = _faiss_ivf(x, config == "ivf-sq8")
        size = len(faiss.serialize_index(index))

        def search(q: np.ndarray, nprobe: int) -> np.ndarray:
            base.nprobe = nprobe
            return index.search(q, K)[1][0]

        probes = [p for p in (8, 16, 32, 64, 128, 256, 512) if p <= nlist // 2]
        return Built(search, probes, f"nprobe/{nlist}", size)
    if config.startswith("lance-"):
        return _lance(config, x, workdir)
    raise SystemExit(f"Unknown configuration {config!r}: choose from {', '.join(ALL_CONFIGS)}.")


def _lance(config: str, x: np.ndarray, workdir: str) -> Built:
    import lance
    import pyarrow as pa

    d, n = x.shape[1], len(x)
    path = os.path.join(workdir, f"{config}.lance")
    shutil.rmtree(path, ignore_errors=True)

    def batches() -> Iterator[pa.RecordBatch]:
        for s in range(0, n, 65536):
            block = x[s : s + 65536]
            yield pa.record_batch(
                [
                    pa.array(np.arange(s, s + len(block), dtype=np.int64)),
                    pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1)), d),
                ],
                names=["id", "vector"],
            )

    schema = pa.schema([("id", pa.int64()), ("vector", pa.list_(pa.float32(), d))])
    ds = lance.write_dataset(pa.RecordBatchReader.from_batches(schema, batches()), path)
    if config == "lance-ivfpq":
        partitions = _pow2(np.sqrt(n))
        ds.create_index(
            "vector", "IVF_PQ", metric="dot", num_partitions=partitions, num_sub_vectors=96, replace=True
        )
        refine: int | None = 4
    else:
        partitions = max(1, _pow2(np.sqrt(n) / 4))
        ds.create_index("vector", "IVF_HNSW_SQ", metric="dot", num_partitions=partitions, replace=True)
        refine = None
    ds = lance.dataset(path)
    index_dir = os.path.join(path, "_indices")
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(index_dir) for f in fs)

    def search(q: np.ndarray, nprobes: int) -> np.ndarray:
        nearest: dict[str, Any] = {"column": "vector", "q": q[0], "k": K, "nprobes": nprobes}
        if refine:
            nearest["refine_factor"] = refine
        return ds.to_table(columns=["id"], nearest=nearest)["id"].to_numpy()

    probes = [p for p in (1, 2, 4, 8, 16, 32, 64, 128) if p <= partitions]
    return Built(search, probes, f"nprobes/{partitions}", size, lambda: shutil.rmtree(path, True))


def measure(built: Built, q: np.ndarray, truth: np.ndarray, setting: Any) -> dict[str, float]:
    import faiss

    faiss.omp_set_num_threads(1)  # FAISS parallelises over queries: one query is one thread's work
    try:
        return _measure(built, q, truth, setting)
    finally:
        faiss.omp_set_num_threads(os.cpu_count() or 1)


def _measure(built: Built, q: np.ndarray, truth: np.ndarray, setting: Any) -> dict[str, float]:
    for i in range(min(10, len(q))):  # warm-up (caches, lazy loading)
        built.search(q[i : i + 1], setting)
    wall, cpu, hits = [], [], 0
    for i in range(len(q)):
        t, c = time.perf_counter(), time.process_time()
        ids = built.search(q[i : i + 1], setting)
        cpu.append((time.process_time() - c) * 1e3)
        wall.append((time.perf_counter() - t) * 1e3)
        hits += len(set(ids[:K].tolist()) & set(truth[i].tolist()))
    return {
        "recall": hits / (K * len(q)),
        "p50_ms": float(np.median(wall)),
        "p95_ms": float(np.percentile(wall, 95)),
        "cpu_p50_ms": float(np.median(cpu)),
    }


# --------------------------------------------------------------------------------------------------------


def end_to_end(n: int, args: argparse.Namespace, workdir: str) -> None:
    """``pipeline.vector_index`` as jobs/index.py runs it, on an output written with the job's writer: n
    clustered vectors (float16, 1 % error rows) in 4,096-row data files; a full build (kind auto), one new
    file, one replaced file, a build with nothing to do, opening the index, 200 single queries."""
    import pyarrow.fs as pafs

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from pipeline.sink import OutputSpec, to_table, write_parquet
    from pipeline.vector_index import VectorIndex, build_index

    out, rows, dim = os.path.join(workdir, "output"), 4096, args.dim
    os.makedirs(out, exist_ok=True)
    spec = OutputSpec(dim, 0, "float16")
    identity = {"model": "vit_b_16", "weights_sha256": "0" * 64, "seed": ""}
    rng = np.random.default_rng(args.seed)
    centres = rng.standard_normal((args.clusters, dim), dtype=np.float32)

    def write(name: str, m: int, run_id: str) -> np.ndarray:
        x = centres[rng.integers(args.clusters, size=m)]
        x += args.spread * rng.standard_normal((m, dim), dtype=np.float32)
        batch = {
            "key": np.array([f"images/{name}/{i}.jpg" for i in range(m)], dtype=object),
            "embedding": x,
            "error": np.array(["decode: broken" if b else None for b in rng.random(m) < 0.01], object),
        }
        schema = spec.schema(identity | {"run_id": run_id})
        write_parquet([to_table(batch, spec, schema)], pafs.LocalFileSystem(), f"{out}/{name}", schema)
        return x

    t = time.perf_counter()
    for u in range(-(-n // rows)):
        write(f"part-run1-u{u:06d}.parquet", min(rows, n - u * rows), "run1")
    print(f"wrote {n} rows in {-(-n // rows)} files in {time.perf_counter() - t:.0f} s; load {load()}")

    def step(what: str) -> None:
        rss = _status()["VmRSS"]
        _reset_peak()
        s = build_index(out)
        print(
            f"{what}: {s['seconds']:.1f} s, kind {s['kind']} {s['params']}, {s['vectors']} vectors, "
            f"{s['files_read']} file(s) read, rebuilt {s['rebuilt']}, peak memory +"
            f"{(_status()['VmHWM'] - rss) / 2**20:.0f} MB; load {load()}",
            flush=True,
        )

    step("full build")
    queries = write("part-run2-u000000.parquet", rows, "run2")
    step("one new file")
    write("part-run1-u000003.parquet", rows, "run1")
    step("one replaced file")
    step("nothing new")
    t = time.perf_counter()
    vi = VectorIndex.open(out)
    assert vi is not None
    opened = time.perf_counter() - t
    times = []
    for q in queries[:200]:
        t = time.perf_counter()
        vi.search(q, K)
        times.append((time.perf_counter() - t) * 1e3)
    print(
        f"open: {opened:.1f} s; search (k={K}, one query at a time): median {np.median(times):.2f} ms, "
        f"p95 {np.percentile(times, 95):.2f} ms; load {load()}"
    )


def load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def header() -> dict[str, Any]:
    import faiss

    try:
        import lance

        lance_version = lance.__version__
    except ImportError:
        lance_version = "not installed"
    with open("/proc/cpuinfo") as f:
        cpu = next(
            (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
            platform.processor(),
        )
    return {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": f"{cpu}, {os.cpu_count()} vCPU",
        "faiss": faiss.__version__,
        "lance": lance_version,
        "numpy": np.__version__,
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100000", help="comma-separated numbers of vectors")
    p.add_argument("--data", default="random,clustered", help="random, clustered or both")
    p.add_argument("--configs", default=",".join(ALL_CONFIGS), help=f"of {', '.join(ALL_CONFIGS)}")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--queries", type=int, default=300, help="single queries timed per setting (≥ 200)")
    p.add_argument("--clusters", type=int, default=2000)
    p.add_argument("--spread", type=float, default=1.0)
    p.add_argument("--ef-construction", type=int, default=80)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where Lance datasets go (default: a temp directory)")
    p.add_argument("--json", action="store_true", help="one JSON object per result line instead of a table")
    p.add_argument(
        "--end-to-end",
        type=int,
        default=0,
        metavar="N",
        help="instead: time pipeline.vector_index (build, updates, open, search) on an output of N vectors",
    )
    args = p.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(configs) - set(ALL_CONFIGS))
    if unknown:
        p.error(f"unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(ALL_CONFIGS)}")
    if any(c.startswith("lance-") for c in configs):
        try:
            import lance  # noqa: F401
        except ImportError:
            p.error("the lance-* configurations need Lance: pip install pylance, or leave them out")

    head = header()
    print(" | ".join(f"{k}: {v}" for k, v in head.items()), flush=True)
    if args.end_to_end:
        workdir = args.workdir or tempfile.mkdtemp(prefix="index-bench-")
        try:
            end_to_end(args.end_to_end, args, workdir)
        finally:
            if args.workdir is None:
                shutil.rmtree(workdir, ignore_errors=True)
        return 0
    print(f"goal: recall@{K} ≥ {GOAL_RECALL} at ≤ {GOAL_MS} ms per single query", flush=True)
    if not args.json:
        print(
            "| data | n | config | build s | build MB | index MB | setting | recall@10 | p50 ms | p95 ms "
            "| CPU p50 ms | load |\n|---|---|---|---|---|---|---|---|---|---|---|---|",
            flush=True,
        )
    workdir = args.workdir or tempfile.mkdtemp(prefix="index-bench-")
    try:
        for data in [d for d in args.data.split(",") if d]:
            for n in [int(s) for s in args.sizes.split(",") if s]:
                x, q = make_data(data, n, args.queries, args.dim, args.clusters, args.spread, args.seed)
                truth = exact_top_k(x, q, K)
                for config in configs:
                    rss = _status()["VmRSS"]
                    peak_ok = _reset_peak()
                    t = time.perf_counter()
                    built = build(config, x, args, workdir)
                    build_s = time.perf_counter() - t
                    build_mb = (_status()["VmHWM"] - rss) / 2**20 if peak_ok else float("nan")
                    for setting in built.settings:
                        row = {
                            "data": data,
                            "n": n,
                            "config": config,
                            "build_s": round(build_s, 2),
                            "build_mb": round(build_mb),
                            "index_mb": round(built.index_bytes / 2**20),
                            "setting": f"{built.setting_name}={setting}" if setting is not None else "-",
                            **{
                                k: round(v, 4 if k == "recall" else 3)
                                for k, v in measure(built, q, truth, setting).items()
                            },
                            "load": load(),
                        }
                        if args.json:
                            print(json.dumps(row), flush=True)
                        else:
                            print("| " + " | ".join(str(v) for v in row.values()) + " |", flush=True)
                    built.cleanup()
                    del built
                del x, q, truth
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"uptime at the end: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
