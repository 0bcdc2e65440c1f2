"""Queries over a job's output: nearest neighbours, top classes, duplicates, errors, statistics.

An output (a local directory or ``s3://bucket/prefix``) holds its rows in ``part-*.parquet`` files at its
top level; names starting with ``_`` are bookkeeping (``_runs/``, ``_ledger/``, ``_index/``, …) and are
never read as data. Each function here takes the output's URI and returns plain dicts and lists (what
``jobs/query.py`` prints, as a table or as JSON).

Table work (lookups by key, counts, grouping) runs in DuckDB. A local output's files are read by DuckDB
itself; an ``s3://`` output is read through pyarrow's S3 filesystem (DuckDB's own S3 support, the httpfs
extension, is downloaded on first use, which machines without internet access cannot do): its data files
form a pyarrow dataset registered in DuckDB, which pushes the columns and filters of each query into the
scan, so a lookup by key reads the key column and the row groups that may hold the key, not every
embedding. Vectors (embeddings, logits) are read with pyarrow in batches and compared in numpy.

Nearest neighbours use the output's vector index (``pipeline/vector_index.py``, built by
``jobs/index.py``) when it covers the data files as they are now, and an exact search otherwise:

- exact ``similar`` streams every embedding once in batches of ``VECTOR_BATCH_ROWS`` rows (~50 MB of
  float32 at D=768): memory does not grow with the output, time and bytes read do (a million ViT-B
  vectors are ~3 GB to read);
- exact ``dups`` holds all normalised vectors in memory (N·D float32) and compares them block by block
  (a block of rows against all later rows, at most ``BLOCK_VALUES`` similarities at once): it runs up to
  ``DUPS_EXACT_MAX_VALUES`` numbers (N·D: ~65,000 ViT-B or ~260,000 ViT-Ti vectors, 200 MB, O(N²·D) time,
  about a minute on 2 cores at the limit); above that, near duplicates come from the index's k nearest
  neighbours of every vector, or are skipped with a note saying to build the index. Both keep at most
  ``limit`` pairs, the most similar ones.
"""

from __future__ import annotations

import heapq
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.sink import footer_metadata
from pipeline.storage import InputError, resolve_uri
from pipeline.vector_index import (
    INDEX_DIR,
    MANIFEST,
    DataFile,
    VectorIndex,
    require_data_files,
    stale_files,
)

if TYPE_CHECKING:
    import duckdb

VECTOR_BATCH_ROWS = 16_384  # rows per batch when vectors are streamed (the job's row-group size)
DUPS_EXACT_MAX_VALUES = 50_000_000  # exact near-duplicate search up to this many numbers (vectors × D)
BLOCK_VALUES = 8_000_000  # similarities computed at once in exact dups (32 MB of float32)
DEFAULT_K = 10
DEFAULT_THRESHOLD = 0.95
DEFAULT_LIMIT = 1000
DUPS_NEIGHBOURS = 10  # neighbours of each vector that dups asks the index for
_GLOB = re.compile(r"[*?\[\]{}]")  # characters DuckDB's read_parquet takes as a glob pattern
# Model identity and preprocessing as recorded in every data file's footer (pipeline/plan.py).
IDENTITY_FIELDS = (
    "model",
    "weights",
    "weights_sha256",
    "seed",
    "source_format",
    "image_size",
    "patch_size",
    "resize_size",
    "preprocess",
    "mean",
    "std",
    "embedding_dtype",
    "logits_dtype",
    "version",
)


class QueryError(ValueError):
    """The query cannot be answered; the message is one sentence a user can act on."""


# --------------------------------------------------------------------------------------------------------
# The output


@dataclass
class Output:
    """An output's data files, the schema and footer of its newest one, and how to read them."""

    uri: str
    fs: pafs.FileSystem
    root: str
    files: dict[str, DataFile]
    schema: pa.Schema
    footer: dict[str, str]

    @classmethod
    def open(cls, uri: str) -> Output:
        try:
            fs, root = resolve_uri(uri)
        except InputError as e:
            raise QueryError(str(e)) from e
        try:
            files = require_data_files(fs, root, uri, QueryError)
            newest = max(files)  # part-<run_id>-u…: run ids start with the run's start time
            with fs.open_input_file(f"{root}/{newest}") as f:
                schema = pq.ParquetFile(f).schema_arrow
        except OSError as e:
            raise QueryError(f"Cannot read the output {uri}: {storage.describe(e, 300)}.") from e
        except pa.ArrowInvalid as e:
            raise QueryError(
                f"Cannot read the data file {newest} of {uri} ({storage.describe(e, 200)}): move it out of "
                "the output if it was not written by jobs/embed.py."
            ) from e
        emb = schema.field("embedding").type if "embedding" in schema.names else None
        if "key" not in schema.names or emb is None or not pa.types.is_fixed_size_list(emb):
            raise QueryError(
                f"{newest} in {uri} has no 'key' and fixed-size 'embedding' columns, so it is not a data "
                "file written by jobs/embed.py; move it out of the output."
            )
        return cls(uri, fs, root, files, schema, footer_metadata(schema))

    @property
    def paths(self) -> list[str]:
        return [f"{self.root}/{name}" for name in sorted(self.files)]

    @property
    def dim(self) -> int:
        return int(self.schema.field("embedding").type.list_size)

    def has(self, column: str) -> bool:
        return column in self.schema.names

    def dataset(self, schema: pa.Schema | None = None) -> ds.Dataset:
        return ds.dataset(self.paths, filesystem=self.fs, format="parquet", schema=schema or self.schema)

    def connect(self) -> duckdb.DuckDBPyConnection:
        """A DuckDB connection with the output's rows as the view ``data``."""
        import duckdb

        con = duckdb.connect()
        if not storage.is_s3(self.uri) and not _GLOB.search(self.root):
            pattern = f"{self.root}/part-*.parquet".replace("'", "''")
            con.execute(f"CREATE VIEW data AS SELECT * FROM read_parquet('{pattern}')")
        else:  # S3, or a local path that DuckDB would take as a pattern
            # DuckDB cannot take Arrow's half floats: float16 vectors are read as float32.
            fields = [
                f.with_type(pa.list_(pa.float32(), f.type.list_size))
                if pa.types.is_fixed_size_list(f.type) and pa.types.is_float16(f.type.value_type)
                else f
                for f in self.schema
            ]
            con.register("data", self.dataset(pa.schema(fields)))
        return con

    def vectors(
        self, column: str = "embedding", key: str | None = None, batch_rows: int = VECTOR_BATCH_ROWS
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(keys as an object array, L2-normalised float32 vectors [n, D]) of the rows without an error, in
        batches; rows whose vector is null, zero or not finite are skipped. `key`: only that key's row."""
        keep = pc.field(column).is_valid()
        if self.has("error"):
            keep = keep & pc.field("error").is_null()
        if key is not None:
            keep = keep & (pc.field("key") == key)
        scanner = self.dataset().scanner(
            columns=["key", column],
            filter=keep,
            batch_size=batch_rows,
            batch_readahead=1,
            fragment_readahead=1,
        )
        width = int(self.schema.field(column).type.list_size)
        for batch in scanner.to_batches():
            if batch.num_rows == 0:
                continue
            vectors = _matrix(batch.column(1), width)
            norms = np.linalg.norm(vectors, axis=1)
            good = np.isfinite(norms) & (norms > 0)
            keys = batch.column(0).to_numpy(zero_copy_only=False)
            yield keys[good], vectors[good] / norms[good, None]

    def row(self, key: str, columns: list[str]) -> dict[str, Any]:
        """The named columns of the row with `key` (DuckDB; no vector columns)."""
        con = self.connect()
        listed = ", ".join(f'"{c}"' for c in columns if self.has(c))
        cursor = con.execute(f"SELECT {listed} FROM data WHERE key = ? LIMIT 1", [key])
        found = cursor.fetchone()
        if found is None:
            raise QueryError(f"{self.uri} has no row with the key {key!r}; `stats` shows what it holds.")
        return dict(zip([d[0] for d in cursor.description or []], found))


def _matrix(column: pa.Array | pa.ChunkedArray, width: int) -> np.ndarray:
    """A fixed_size_list<float16|float32>[width] column without nulls → float32 [n, width]."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    values = column.values.slice(column.offset * width, len(column) * width)
    return np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, width)


# --------------------------------------------------------------------------------------------------------
# The index, when it is current


def _read_index_manifest(out: Output) -> dict[str, Any] | None:
    try:
        manifest = storage.read_json(out.fs, f"{out.root}/{INDEX_DIR}/{MANIFEST}")
    except FileNotFoundError:
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None


def index_state(out: Output) -> dict[str, Any]:
    """Whether the output has an index and whether it covers the data files as they are now (read from the
    index's manifest, without loading the index)."""
    manifest = _read_index_manifest(out)
    if manifest is None:
        return {"exists": False}
    stale = stale_files(manifest["files"], out.files)
    return {
        "exists": True,
        "kind": manifest.get("kind"),
        "vectors": manifest.get("vectors"),
        "built_at": manifest.get("built_at"),
        "current": not stale,
        "stale_files": len(stale),
    }


def _usable_index(out: Output) -> tuple[VectorIndex | None, str]:
    """The output's index when it is current, else None; and words on the index, for the output."""
    state = index_state(out)
    build = f"`python jobs/index.py --output {out.uri}`"
    if not state["exists"]:
        return None, f"the output has no vector index; {build} builds one"
    if not state["current"]:
        return None, (
            f"the vector index does not cover {state['stale_files']} new or changed data file(s); {build} "
            "updates it"
        )
    from pipeline.vector_index import VectorIndexError

    try:
        index = VectorIndex.open(out.uri)
    except (VectorIndexError, OSError) as e:
        return None, f"the vector index cannot be opened: {storage.describe(e, 200)}"
    if index is None or index.stale(out.uri):
        return None, f"the vector index changed while it was opened; {build} updates it"
    params = ", ".join(f"{k}={v}" for k, v in index.params.items() if k in ("nprobe", "ef_search"))
    how = "exact" if index.kind == "flat" else "approximate" + (f", {params}" if params else "")
    return index, f"{index.kind}: {how}; {index.vectors} vectors"


def _described(search: str, vectors: int, why: str) -> str:
    if search == "index":
        return f"the output's vector index ({why})"
    return f"exact search over {vectors} vectors ({why})"


# --------------------------------------------------------------------------------------------------------
# similar


def _exact_top(out: Output, query: np.ndarray, k: int) -> tuple[list[tuple[str, float]], int]:
    """The k rows most similar to the normalised `query`, best first, and how many vectors were compared.
    One batch of vectors in memory at a time."""
    best_keys = np.empty(0, dtype=object)
    best_scores = np.empty(0, dtype=np.float32)
    seen = 0
    for keys, vectors in out.vectors():
        seen += len(keys)
        scores = vectors @ query
        if len(scores) > k:
            top = np.argpartition(-scores, k - 1)[:k]
            keys, scores = keys[top], scores[top]
        best_keys = np.concatenate([best_keys, keys])
        best_scores = np.concatenate([best_scores, scores])
        if len(best_scores) > k:
            top = np.argpartition(-best_scores, k - 1)[:k]
            best_keys, best_scores = best_keys[top], best_scores[top]
    order = np.lexsort((best_keys.astype(str), -best_scores)) if len(best_keys) else np.empty(0, int)
    return [(str(best_keys[i]), float(best_scores[i])) for i in order], seen


def _search(out: Output, query: np.ndarray, k: int) -> tuple[list[tuple[str, float]], dict[str, Any]]:
    index, how = _usable_index(out)
    if index is not None:
        if index.dim != len(query):
            raise QueryError(
                f"The vector index of {out.uri} holds {index.dim}-d vectors but the query is {len(query)}-d; "
                f"rebuild it with `python jobs/index.py --output {out.uri} --rebuild`."
            )
        found = index.search(query[None, :], k)[0]
        return found, {"search": "index", "index_kind": index.kind, "how": _described("index", 0, how)}
    found, seen = _exact_top(out, query, k)
    return found, {"search": "exact", "vectors": seen, "how": _described("exact", seen, how)}


def similar_to_key(output: str, key: str, k: int = DEFAULT_K) -> dict[str, Any]:
    """The k rows whose embeddings are most similar (cosine) to the row `key`'s, best first; `key` itself
    comes first. Error rows never appear."""
    out = Output.open(output)
    found = list(out.vectors(key=key))
    if not found or not len(found[0][0]):
        row = out.row(key, ["key", "error"])  # raises for an unknown key
        raise QueryError(
            f"The row {key!r} has no embedding (an error row: {row.get('error') or 'no vector'}), so it has "
            "no neighbours."
        )
    query = found[0][1][0]
    results, search = _search(out, query, k)
    mine = [r for r in results if r[0] == key]
    results = mine + [r for r in results if r[0] != key]  # cosine 1 with itself: first among equals
    return {
        "output": output,
        "query": {"key": key},
        **search,
        "k": k,
        "results": [{"key": k_, "cosine": round(c, 6)} for k_, c in results],
    }


def _json_list(text: str | None, what: str) -> tuple[float, float, float] | None:
    if not text:
        return None
    try:
        values = tuple(float(v) for v in json.loads(text))
    except (ValueError, TypeError) as e:
        raise QueryError(
            f"The output's footer records {what} as {text!r}, which is not a list of numbers."
        ) from e
    if len(values) != 3:
        raise QueryError(f"The output's footer records {what} as {text!r}, not three numbers.")
    return values[0], values[1], values[2]


def embed_image(out: Output, image: str, weights: str | None = None) -> np.ndarray:
    """One image file (a local path or s3:// URI) → its embedding, made with the output's recorded model
    and preprocessing on the CPU. `weights` replaces the recorded weights' path (it must hold the same
    bytes: the recorded sha256 is checked)."""
    meta = out.footer
    missing = [k for k in ("model", "weights", "image_size", "patch_size") if not meta.get(k)]
    if missing:
        raise QueryError(
            f"The data files of {out.uri} do not record {', '.join(missing)} in their footer, so an image "
            "cannot be embedded the way the job did."
        )
    recorded = meta["weights"]
    path = weights or recorded
    random = meta.get("weights_sha256") == "random" or recorded == "random"
    if random:
        path = "random"
    try:
        fs, local = resolve_uri(image)
        with fs.open_input_file(local) as f:
            data = f.read()
    except (OSError, InputError) as e:
        raise QueryError(f"Cannot read the image {image}: {storage.describe(e, 200)}.") from e

    from pipeline.decode import DecodeError, to_patches
    from pipeline.embed import ModelSpec

    image_size, patch_size = int(meta["image_size"]), int(meta["patch_size"])
    resize = int(meta["resize_size"]) if meta.get("resize_size") else None
    mode = meta.get("preprocess") or "fast"  # outputs written before --preprocess existed: fast
    if mode not in ("fast", "exact"):
        raise QueryError(
            f"The data files of {out.uri} record the preprocessing mode {mode!r}, which this version of "
            "jobs/query.py cannot reproduce; query them with the version of the project that wrote them."
        )
    exact = mode == "exact"
    try:
        patches = to_patches(data, image_size, patch_size, resize_size=resize, exact=exact)
    except (DecodeError, ValueError) as e:
        raise QueryError(f"Cannot decode the image {image}: {str(e).rstrip('.')}.") from e
    spec = ModelSpec(
        preset=meta["model"],
        weights=path,
        image_size=image_size,
        seed=int(meta.get("seed") or 0) if random else 0,
        class_names="none",
        mean=_json_list(meta.get("mean"), "mean"),
        std=_json_list(meta.get("std"), "std"),
    )
    from vit.checkpoints import CheckpointError

    try:
        loaded = spec.load()
    except (CheckpointError, OSError, InputError, ValueError) as e:
        hint = "" if weights else "; pass --weights with a copy of that checkpoint that opens here"
        raise QueryError(
            f"Cannot embed {image} with the output's model: its weights {path} cannot be opened "
            f"({storage.describe(e, 200)}){hint}."
        ) from e
    if not random and loaded.sha256 != meta.get("weights_sha256"):
        raise QueryError(
            f"The weights {path} are not the ones {out.uri} was made with (sha256 {loaded.sha256} vs the "
            f"recorded {meta.get('weights_sha256')}), so the image's embedding would not be comparable; "
            "pass --weights with the checkpoint the job used."
        )
    import torch

    model = loaded.model.eval()
    with torch.inference_mode():
        cls, _ = model.forward_patches(torch.from_numpy(patches)[None], exact)
    vector = cls[0].float().numpy()
    if vector.shape[0] != out.dim:
        raise QueryError(
            f"The recorded model gives {vector.shape[0]}-d embeddings but {out.uri} holds {out.dim}-d ones."
        )
    return vector


def similar_to_image(
    output: str, image: str, k: int = DEFAULT_K, weights: str | None = None
) -> dict[str, Any]:
    """The k rows most similar to one image file, embedded with the output's model and preprocessing."""
    out = Output.open(output)
    vector = embed_image(out, image, weights)
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0:
        raise QueryError(
            f"The model gave {image} an embedding that is zero or not finite; it has no neighbours."
        )
    results, search = _search(out, (vector / norm).astype(np.float32), k)
    return {
        "output": output,
        "query": {"image": image},
        **search,
        "k": k,
        "results": [{"key": k_, "cosine": round(c, 6)} for k_, c in results],
    }


# --------------------------------------------------------------------------------------------------------
# top


def _class_names(recorded: str | None, classes: list[int]) -> list[str] | None:
    """The names of `classes` from the footer's `class_names` (a JSON list, or the shipped ImageNet-1k)."""
    if not recorded:
        return None
    from vit.checkpoints import IMAGENET_1K, imagenet_class_names

    if recorded == IMAGENET_1K:
        every: Sequence[str] = imagenet_class_names()
    else:
        try:
            every = json.loads(recorded)
        except ValueError:
            return None
    if not isinstance(every, (list, tuple)) or any(not 0 <= c < len(every) for c in classes):
        return None
    return [str(every[c]) for c in classes]


def top(output: str, key: str) -> dict[str, Any]:
    """The row's most probable classes: index, name (when the output has names) and softmax score, best
    first. From the top-k columns, or from the logits when the output has no top-k columns."""
    out = Output.open(output)
    row = out.row(key, ["key", "top_classes", "top_scores", "top_names", "error"])
    if row.get("error") is not None:
        raise QueryError(f"The row {key!r} is an error row ({row['error']}), so it has no classes.")
    if out.has("top_classes"):
        classes, scores = row["top_classes"], row["top_scores"]
        names = row.get("top_names")
        source = "top_classes"
    elif out.has("logits"):
        scan = out.dataset().to_table(
            columns=["logits"], filter=(pc.field("key") == key) & pc.field("logits").is_valid()
        )
        if scan.num_rows == 0:
            raise QueryError(f"The row {key!r} has no logits, so it has no classes.")
        logits = _matrix(scan.column(0), int(out.schema.field("logits").type.list_size))
        from pipeline.embed import top_k

        idx, probs = top_k(logits[:1], min(5, logits.shape[1]))
        classes, scores, names, source = idx[0].tolist(), probs[0].tolist(), None, "logits"
        names = _class_names(out.footer.get("class_names"), classes)
    else:
        raise QueryError(
            f"{output} has neither top-k columns nor logits (written with --topk 0 and --logits none, or "
            "by a checkpoint without a classification head), so its rows have no classes."
        )
    results = []
    for i, (c, s) in enumerate(zip(classes, scores)):
        entry: dict[str, Any] = {"rank": i + 1, "class": int(c), "score": round(float(s), 6)}
        if names is not None:
            entry["name"] = names[i]
        results.append(entry)
    return {"output": output, "key": key, "source": source, "names": names is not None, "classes": results}


# --------------------------------------------------------------------------------------------------------
# dups


class _Pairs:
    """The `limit` most similar distinct pairs seen, with the pairs at or above `threshold`."""

    def __init__(self, threshold: float, limit: int) -> None:
        self.threshold, self.limit = threshold, limit
        self.pairs: dict[tuple[str, str], float] = {}
        self.truncated = False

    def add(self, a: str, b: str, cosine: float) -> None:
        if a == b or cosine < self.threshold:
            return
        pair = (a, b) if a < b else (b, a)
        if pair in self.pairs:
            self.pairs[pair] = max(self.pairs[pair], cosine)
            return
        self.pairs[pair] = cosine
        if len(self.pairs) > 2 * self.limit:
            self._prune()

    def _prune(self) -> None:
        if len(self.pairs) > self.limit:
            self.truncated = True
            kept = heapq.nlargest(self.limit, self.pairs.items(), key=lambda kv: (kv[1], kv[0]))
            self.pairs = dict(kept)

    def result(self) -> list[tuple[str, str, float]]:
        self._prune()
        return sorted(((a, b, c) for (a, b), c in self.pairs.items()), key=lambda p: (-p[2], p[0], p[1]))


def _near_exact(out: Output, pairs: _Pairs, capacity: int) -> int:
    """All pairs by block-wise products of the normalised vectors, held in memory (at most `capacity`
    rows: the rows without an error); returns N."""
    x = np.empty((capacity, out.dim), np.float32)
    keys = np.empty(capacity, dtype=object)
    n = 0
    for batch_keys, vectors in out.vectors():
        if n + len(vectors) > capacity:  # rows committed since they were counted
            raise QueryError(f"{out.uri} changed while it was read; run the command again.")
        x[n : n + len(vectors)], keys[n : n + len(vectors)] = vectors, batch_keys
        n += len(vectors)
    x = x[:n]
    block = max(1, min(4096, BLOCK_VALUES // max(1, n)))
    for start in range(0, n, block):
        stop = min(n, start + block)
        sims = x[start:stop] @ x[start:].T  # [rows, n - start]: this block against itself and all later rows
        rows = stop - start
        sims[:, :rows][np.tril_indices(rows)] = -np.inf  # each pair once, no pair of a row with itself
        flat = sims.ravel()
        hits = np.flatnonzero(flat >= pairs.threshold)
        if len(hits) > pairs.limit:
            hits = hits[np.argpartition(-flat[hits], pairs.limit - 1)[: pairs.limit]]
            pairs.truncated = True
        for h in hits.tolist():
            i, j = divmod(h, sims.shape[1])
            pairs.add(str(keys[start + i]), str(keys[start + j]), float(flat[h]))
    return n


def _near_index(out: Output, index: VectorIndex, pairs: _Pairs, neighbours: int) -> int:
    """Pairs from the index's `neighbours` nearest neighbours of every vector; returns N."""
    n = 0
    for keys, vectors in out.vectors(batch_rows=4096):
        n += len(keys)
        for key, found in zip(keys.tolist(), index.search(vectors, neighbours + 1)):
            for other, cosine in found:
                pairs.add(key, other, cosine)
    return n


def dups(
    output: str,
    threshold: float = DEFAULT_THRESHOLD,
    limit: int = DEFAULT_LIMIT,
    neighbours: int = DUPS_NEIGHBOURS,
) -> dict[str, Any]:
    """Exact duplicates (rows with the same `bytes_sha256`, grouped) and near-duplicate pairs (cosine of
    the embeddings ≥ `threshold`, at most `limit`, the most similar first)."""
    if not 0 < threshold <= 1:
        raise QueryError(f"The threshold is a cosine similarity above 0 and at most 1, not {threshold}.")
    out = Output.open(output)
    con = out.connect()
    exact: list[dict[str, Any]] = []
    if out.has("bytes_sha256"):
        groups = con.execute(
            "SELECT bytes_sha256, list(key ORDER BY key) AS keys FROM data WHERE bytes_sha256 IS NOT NULL "
            "GROUP BY bytes_sha256 HAVING count(*) > 1 ORDER BY count(*) DESC, keys[1]"
        ).fetchall()
        exact = [{"sha256": sha, "keys": keys} for sha, keys in groups]
    group_of = {key: i for i, g in enumerate(exact) for key in g["keys"]}
    ok_rows = con.execute(
        "SELECT count(*) FROM data" + (" WHERE error IS NULL" if out.has("error") else "")
    ).fetchone()
    vectors = int(ok_rows[0]) if ok_rows else 0
    pairs = _Pairs(threshold, limit)
    index, how = _usable_index(out)
    result: dict[str, Any] = {"output": output, "exact": exact, "threshold": threshold, "limit": limit}
    if index is not None:
        n = _near_index(out, index, pairs, neighbours)
        how = _described("index", n, f"{how}; the {neighbours} nearest neighbours of each vector")
        result |= {"search": "index", "index_kind": index.kind, "how": how}
    elif vectors * out.dim <= DUPS_EXACT_MAX_VALUES:
        n = _near_exact(out, pairs, vectors)
        result |= {"search": "exact", "how": _described("exact", n, how)}
    else:
        result |= {
            "search": None,
            "near": None,
            "truncated": False,
            "how": (
                f"near duplicates skipped: an exact search of {vectors} {out.dim}-d vectors is above this "
                f"command's limit of {DUPS_EXACT_MAX_VALUES:,} numbers; build the vector index with "
                f"`python jobs/index.py --output {output}` and dups uses its nearest neighbours"
            ),
        }
        return result
    near = [
        {
            "a": a,
            "b": b,
            "cosine": round(c, 6),
            "same_bytes": a in group_of and group_of[a] == group_of.get(b),
        }
        for a, b, c in pairs.result()
    ]
    return result | {"vectors": n, "near": near, "truncated": pairs.truncated}


# --------------------------------------------------------------------------------------------------------
# errors, stats


def errors(output: str, list_keys: bool = False) -> dict[str, Any]:
    """Error rows counted by message, most frequent first; with `list_keys` the keys of each message."""
    out = Output.open(output)
    con = out.connect()
    total = con.execute("SELECT count(*) FROM data").fetchone()
    rows = int(total[0]) if total else 0
    if not out.has("error"):
        return {"output": output, "rows": rows, "error_rows": 0, "errors": []}
    agg = "list(key ORDER BY key)" if list_keys else "NULL"
    found = con.execute(
        f"SELECT error, count(*) AS n, {agg} AS keys FROM data WHERE error IS NOT NULL "
        "GROUP BY error ORDER BY n DESC, error"
    ).fetchall()
    groups = []
    for message, count, keys in found:
        entry: dict[str, Any] = {"error": message, "count": int(count)}
        if list_keys:
            entry["keys"] = keys
        groups.append(entry)
    return {
        "output": output,
        "rows": rows,
        "error_rows": sum(g["count"] for g in groups),
        "errors": groups,
    }


def stats(output: str) -> dict[str, Any]:
    """What the output holds: rows, error rows, rows per run, the model and preprocessing, the schema, the
    data files' size, and whether a vector index exists and covers the data as it is now."""
    out = Output.open(output)
    con = out.connect()
    has_error, has_run = out.has("error"), out.has("run_id")
    err = "count(error)" if has_error else "0"
    runs: list[dict[str, Any]] = []
    if has_run:
        runs = [
            {"run_id": run_id, "rows": int(n), "error_rows": int(e)}
            for run_id, n, e in con.execute(
                f"SELECT run_id, count(*), {err} FROM data GROUP BY run_id ORDER BY run_id"
            ).fetchall()
        ]
        rows, error_rows = sum(r["rows"] for r in runs), sum(r["error_rows"] for r in runs)
    else:
        counted = con.execute(f"SELECT count(*), {err} FROM data").fetchone()
        rows, error_rows = (int(counted[0]), int(counted[1])) if counted else (0, 0)
    meta = out.footer
    emb = out.schema.field("embedding").type
    return {
        "output": output,
        "rows": rows,
        "error_rows": error_rows,
        "runs": runs,
        "data_files": len(out.files),
        "data_bytes": sum(f.size for f in out.files.values()),
        "model": {k: meta[k] for k in IDENTITY_FIELDS if meta.get(k)},
        "embedding": {"dim": int(emb.list_size), "dtype": np.dtype(emb.value_type.to_pandas_dtype()).name},
        "class_names": "top_names" in out.schema.names,
        "schema_version": meta.get("schema_version"),
        "columns": [{"name": f.name, "type": str(f.type)} for f in out.schema],
        "index": index_state(out),
    }
