"""A nearest-neighbour index over an output's embeddings (cosine similarity), kept under ``<output>/_index/``.

Layout::

    _index/index.json                   the manifest, written last (see below)
    _index/<generation>/index.faiss     a serialised FAISS index over L2-normalised vectors (inner product)
    _index/<generation>/keys.parquet    id → key and the data file each vector came from

``index.json`` names its generation's two files, the data files it covers (each with its size and
modification time, so a data file that a rerun with ``--retry-errors`` replaced is noticed), the run ids
they came from, and the model identity (model name, ``weights_sha256``, the seed of random weights,
embedding dimension). Vectors of different models are not comparable: an output whose data files disagree
on the model is refused with one sentence (:class:`VectorIndexError`).

Crash safety: a build writes a new generation directory, then writes the manifest to a staged file in it
and moves it over ``_index/index.json`` (a rename locally, one server-side copy on S3), so a reader sees
the old index or the new one, whole. Only then are generations other than the new one and the one it
replaced removed (a reader that opened the manifest just before keeps its files). A build that stops
before the move leaves the previous index as it was; the next build removes what it left. One build at a
time per output: a build that finds the manifest changed under it while it worked stops with an error.

Kinds (``kind=``): ``flat`` (exact search, FAISS IndexFlatIP), ``ivf`` (IndexIVFFlat: ≈ 2√n k-means
lists; a query scans ``nprobe`` of them, as many as make about ``IVF_SCAN_VALUES`` numbers), ``hnsw``
(IndexHNSWFlat graph, M=32). ``auto`` is exact search while the index holds at most ``FLAT_MAX_VALUES``
numbers (vectors × dimension: ~32k ViT-B vectors; exact search costs ~0.3 ms per 1,000 ViT-B vectors on
one core of the benchmark's machine, 330 ms at 1 M) and IVF above. Measured with benchmarks/index.py
(figures in benchmarks/README.md): FAISS IVF reaches about HNSW's recall per millisecond of search, builds
10–75× faster (100k vectors: 5–40 s against 112–437 s on 2 vCPUs) and removes vectors for real, which a
rerun that replaces files needs; Lance's indexes cost 5–7 ms per query before any search work.

Updates are incremental: only data files that are new, changed (size or modification time) or gone are
read; the vectors of changed and gone files are removed (flat, ivf: ``remove_ids``; hnsw: marked deleted
and skipped by searches, the graph is rebuilt once a quarter of it is deleted) and the files' current
vectors added. The index is rebuilt from all data files instead when ``rebuild=True``, when the kind
changes (``auto`` going from flat to ivf as the output grows, or another ``kind=``), and when an IVF index
has grown to 4× the vectors its lists were trained on. Each build reads and rewrites the whole index file
(FAISS stores an index whole): at 1 M ViT-B vectors that is ~3 GB, and adding or replacing one 4,096-row
data file took 10–16 s where a full build took 113–165 s (``benchmarks/index.py --end-to-end``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.storage import make_dirs, read_json, resolve_uri, write_json

log = logging.getLogger(__name__)

INDEX_DIR = "_index"
MANIFEST = "index.json"
FORMAT = 1
KINDS = ("auto", "flat", "ivf", "hnsw")
FLAT_MAX_VALUES = 25_000_000  # auto: exact search up to this many numbers (vectors × dimension)
IVF_POINTS_PER_LIST = 64  # k-means trains on at most this many vectors per list (FAISS warns below 39)
IVF_MIN_POINTS_PER_LIST = 39
# Numbers (vectors × dimension) an IVF query scans, which sets nprobe: ~16k ViT-B vectors, ~7 ms on one core
# of the benchmark's machine (32 of 2,048 lists at 1 M vectors; benchmarks/README.md).
IVF_SCAN_VALUES = 12_000_000
IVF_MIN_NPROBE = 8
IVF_RETRAIN_GROWTH = 4  # rebuild an IVF index once it holds this many times the vectors it trained on
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128
HNSW_MAX_DELETED = 0.25  # rebuild an HNSW graph once this fraction of it is deleted
IO_CHUNK = 8 * 2**20  # bytes per read or write when streaming an index
FEW_QUERIES = 16  # below this many queries a search runs on one thread (FAISS splits work by query)
_DATA_FILE = re.compile(r"^part-(?P<run>.+)-u\d+\.parquet$")
_IDENTITY = ("model", "weights_sha256", "seed")
# The prefix of the job's footer metadata (pipeline.sink.METADATA_PREFIX; importing pipeline.sink would
# cost this module's command a second or more of start-up).
METADATA_PREFIX = "vit_embed."
KEYS_SCHEMA = pa.schema([("id", pa.int64()), ("key", pa.string()), ("file", pa.string())])


class VectorIndexError(ValueError):
    """The index cannot be built or used; the message is one sentence a user can act on."""


# --------------------------------------------------------------------------------------------------------
# Data files


@dataclass(frozen=True)
class DataFile:
    name: str  # relative to the output
    size: int
    mtime_ns: int

    def stamp(self) -> dict[str, int]:
        return {"size": self.size, "mtime_ns": self.mtime_ns}


def list_data_files(fs: pafs.FileSystem, root: str) -> dict[str, DataFile]:
    """The output's committed data files (``part-*.parquet`` at its top level; ``_*`` is bookkeeping)."""
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=False, allow_not_found=True))
    files = {}
    for info in infos:
        name = info.base_name
        if info.type == pafs.FileType.File and _DATA_FILE.match(name):
            mtime = info.mtime_ns if info.mtime_ns is not None else 0
            files[name] = DataFile(name, int(info.size or 0), int(mtime))
    return files


def require_data_files(
    fs: pafs.FileSystem, root: str, uri: str, error: type[ValueError]
) -> dict[str, DataFile]:
    """`list_data_files`, or `error` with a sentence saying that there is no output at `uri` or that it
    holds no data file yet."""
    files = list_data_files(fs, root)
    if not files:
        if not storage.is_s3(uri) and fs.get_file_info(root).type == pafs.FileType.NotFound:
            raise error(f"There is no output at {uri}: pass the --output of an embedding job.")
        raise error(
            f"{uri} holds no data files (part-*.parquet): run jobs/embed.py with this --output first."
        )
    return files


def _describe_model(model: dict[str, Any]) -> str:
    sha = str(model.get("weights_sha256") or "?")
    seed = f", seed {model['seed']}" if model.get("seed") else ""
    return f"{model.get('model') or '?'} (weights {sha[:12]}{seed}, {model.get('embedding_dim')}-d)"


def _same_model(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal identities; a field that one side does not record (older outputs) is not compared."""
    if a.get("embedding_dim") != b.get("embedding_dim"):
        return False
    return all(a.get(k) == b.get(k) for k in _IDENTITY if a.get(k) is not None and b.get(k) is not None)


@dataclass
class _Opened:
    """A data file's footer: what it holds, before its vectors are read (no file is kept open: an output
    may hold more data files than a process may open at once)."""

    file: DataFile
    path: str
    has_error: bool
    model: dict[str, Any]
    run_id: str


def _unreadable(output: str, f: DataFile, e: Exception) -> VectorIndexError:
    return VectorIndexError(
        f"Cannot index {output}: its data file {f.name} cannot be read ({storage.describe(e, 200)})."
    )


def _open_data_file(fs: pafs.FileSystem, root: str, output: str, f: DataFile) -> _Opened:
    path = f"{root}/{f.name}"
    try:
        with fs.open_input_file(path) as handle:
            schema = pq.ParquetFile(handle).schema_arrow
    except (OSError, pa.ArrowInvalid) as e:
        raise _unreadable(output, f, e) from e
    emb = schema.field("embedding").type if "embedding" in schema.names else None
    if (
        "key" not in schema.names
        or emb is None
        or not pa.types.is_fixed_size_list(emb)
        or not pa.types.is_floating(emb.value_type)
    ):
        raise VectorIndexError(
            f"Cannot index {output}: {f.name} has no 'key' and fixed-size float 'embedding' columns, so it "
            "is not a data file written by jobs/embed.py; move it out of the output."
        )
    meta = {
        k.decode()[len(METADATA_PREFIX) :]: v.decode()
        for k, v in (schema.metadata or {}).items()
        if k.decode().startswith(METADATA_PREFIX)
    }
    model = {k: meta.get(k) for k in _IDENTITY} | {"embedding_dim": int(emb.list_size)}
    match = _DATA_FILE.match(f.name)
    run_id = meta.get("run_id") or (match.group("run") if match else "")
    return _Opened(f, path, "error" in schema.names, model, run_id)


def _read_vectors(fs: pafs.FileSystem, output: str, opened: _Opened) -> tuple[np.ndarray, pa.Array]:
    """The file's good rows: (L2-normalised float32 vectors [n, dim], their keys). Rows with a null
    embedding, an error, or a zero or non-finite vector are skipped."""
    columns = ["key", "embedding"] + (["error"] if opened.has_error else [])
    try:
        with fs.open_input_file(opened.path) as handle:
            table = pq.ParquetFile(handle).read(columns=columns)
    except (OSError, pa.ArrowInvalid) as e:
        raise _unreadable(output, opened.file, e) from e
    keep = pc.is_valid(table["embedding"])
    if opened.has_error:
        keep = pc.and_(keep, pc.is_null(table["error"]))
    table = table.filter(keep)
    dim = opened.model["embedding_dim"]
    if table.num_rows == 0:
        return np.zeros((0, dim), np.float32), pa.array([], pa.string())
    emb = table["embedding"].combine_chunks()
    values = emb.values.slice(emb.offset * dim, len(emb) * dim)
    vectors = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim)
    norms = np.linalg.norm(vectors, axis=1)
    good = np.isfinite(norms) & (norms > 0)
    vectors = vectors[good] / norms[good, None]
    keys = table["key"].combine_chunks()
    if not good.all():
        keys = keys.filter(pa.array(good))
    return np.ascontiguousarray(vectors, dtype=np.float32), keys


# --------------------------------------------------------------------------------------------------------
# FAISS


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as e:
        raise VectorIndexError(
            "The vector index needs FAISS: install it with `pip install faiss-cpu` (a dependency of this "
            "project)."
        ) from e
    return faiss


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """FAISS's OpenMP threads limited to ``n`` inside the block (None: unchanged)."""
    faiss = _faiss()
    before = faiss.omp_get_max_threads()
    if n is not None:
        faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _pow2(x: float) -> int:
    return 1 << max(0, round(math.log2(max(x, 1.0))))


def ivf_lists(n: int) -> int:
    """Lists for an IVF index over n vectors: ≈ 2√n, a power of two, ≥ 39 training vectors each."""
    return max(1, min(_pow2(2 * math.sqrt(n)), n // IVF_MIN_POINTS_PER_LIST))


def _training_sample(parts: list[np.ndarray], size: int) -> np.ndarray:
    """`size` vectors drawn at random (seeded) from all of `parts`, without joining the parts whole."""
    n = sum(len(p) for p in parts)
    if n <= size:
        return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    chosen = np.sort(np.random.default_rng(0).choice(n, size, replace=False))
    bounds = np.cumsum([0] + [len(p) for p in parts])
    return np.concatenate(
        [p[chosen[(chosen >= lo) & (chosen < hi)] - lo] for p, lo, hi in zip(parts, bounds[:-1], bounds[1:])]
    )


def ivf_nprobe(n: int, nlist: int, dim: int) -> int:
    """Lists a query scans: about IVF_SCAN_VALUES numbers, at least IVF_MIN_NPROBE lists, at most all."""
    per_list = max(1.0, n / nlist) * dim
    return max(1, min(nlist, max(IVF_MIN_NPROBE, round(IVF_SCAN_VALUES / per_list))))


def _new_index(kind: str, parts: list[np.ndarray], dim: int) -> tuple[Any, dict[str, Any]]:
    """An empty index of `kind` (IVF trained on a sample of `parts`, the vectors it will hold) and its
    search parameters."""
    faiss = _faiss()
    if kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim)), {}
    if kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        params = {"M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": HNSW_EF_SEARCH}
        return faiss.IndexIDMap2(hnsw), params
    n = sum(len(p) for p in parts)
    nlist = ivf_lists(n)
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.niter = 10
    ivf.cp.max_points_per_centroid = IVF_POINTS_PER_LIST
    ivf.cp.seed = 1234
    ivf.train(_training_sample(parts, IVF_POINTS_PER_LIST * nlist))
    return ivf, {"nlist": nlist, "nprobe": ivf_nprobe(n, nlist, dim), "trained_on": n}


def _search_params(kind: str, params: dict[str, Any], deleted: np.ndarray) -> Any:
    faiss = _faiss()
    if kind == "ivf":
        p = faiss.SearchParametersIVF()
        p.nprobe = int(params["nprobe"])
        return p
    if kind == "hnsw":
        p = faiss.SearchParametersHNSW()
        p.efSearch = int(params["ef_search"])
        if len(deleted):
            p.sel = faiss.IDSelectorNot(faiss.IDSelectorBatch(deleted))
        return p
    return None


def _read_index(fs: pafs.FileSystem, path: str) -> Any:
    """A FAISS index read from `path` in `fs`, streamed (no second copy of its bytes in memory)."""
    faiss = _faiss()
    with fs.open_input_file(path) as f:
        reader = faiss.PyCallbackIOReader(f.read, IO_CHUNK)
        try:
            return faiss.read_index(reader)
        finally:
            del reader


def _write_index(fs: pafs.FileSystem, path: str, index: Any) -> None:
    """Writes a FAISS index to `path` in `fs`, streamed."""
    faiss = _faiss()
    with fs.open_output_stream(path) as s:
        writer = faiss.PyCallbackIOWriter(s.write, IO_CHUNK)
        try:
            faiss.write_index(index, writer)
        finally:
            del writer  # flushes its last chunk


# --------------------------------------------------------------------------------------------------------
# The index as stored


def _index_root(root: str) -> str:
    return f"{root}/{INDEX_DIR}"


def _read_manifest(fs: pafs.FileSystem, root: str) -> dict[str, Any] | None:
    try:
        manifest = read_json(fs, f"{_index_root(root)}/{MANIFEST}")
    except FileNotFoundError:
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None
    return manifest


@dataclass
class VectorIndex:
    """An opened index: search it; its attributes say what it covers.

    ``files`` maps each covered data file to its size, modification time, vectors and run id; ``run_ids``
    lists the runs those files came from; ``model`` is the model identity; ``vectors`` counts searchable
    vectors; ``params`` holds the search settings (``nprobe`` for ivf, ``ef_search`` for hnsw), which may be
    changed before searching.
    """

    output: str
    kind: str
    dim: int
    model: dict[str, Any]
    files: dict[str, dict[str, Any]]
    run_ids: list[str]
    params: dict[str, Any]
    generation: str
    built_at: str
    index: Any = field(repr=False)
    ids: np.ndarray = field(repr=False)  # sorted ids of live vectors
    keys: pa.Array = field(repr=False)  # keys[i] belongs to ids[i]
    deleted: np.ndarray = field(repr=False)  # ids in the hnsw graph that are skipped

    @property
    def vectors(self) -> int:
        return len(self.ids)

    @classmethod
    def open(cls, output: str) -> VectorIndex | None:
        """The output's index, or None when it has none."""
        fs, root = resolve_uri(output)
        for attempt in range(3):  # a build may replace the generation between reading the manifest and files
            manifest = _read_manifest(fs, root)
            if manifest is None:
                return None
            try:
                return cls._load(output, fs, root, manifest)
            except FileNotFoundError:
                if attempt == 2:
                    raise
        return None

    @classmethod
    def _load(cls, output: str, fs: pafs.FileSystem, root: str, manifest: dict[str, Any]) -> VectorIndex:
        base = _index_root(root)
        index = _read_index(fs, f"{base}/{manifest['index_file']}")
        with fs.open_input_file(f"{base}/{manifest['keys_file']}") as f:
            table = pq.ParquetFile(f).read()  # read_table would import pyarrow.dataset
        live = pc.is_valid(table["key"])
        ids = table["id"].to_numpy()
        live_np = live.to_numpy()
        order = np.argsort(ids[live_np], kind="stable")
        return cls(
            output=output,
            kind=manifest["kind"],
            dim=int(manifest["model"]["embedding_dim"]),
            model=manifest["model"],
            files=manifest["files"],
            run_ids=manifest["run_ids"],
            params=dict(manifest["params"]),
            generation=manifest["generation"],
            built_at=manifest["built_at"],
            index=index,
            ids=ids[live_np][order],
            keys=table["key"].filter(live).combine_chunks().take(pa.array(order)),
            deleted=np.sort(ids[~live_np]).astype(np.int64),
        )

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[str, float]]]:
        """The k nearest keys of each query with their cosine similarity, best first (fewer when the index
        holds fewer). `queries` is [n, dim] or one vector [dim]; it need not be normalised."""
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise VectorIndexError(
                f"Queries must be vectors of {self.dim} numbers (the index's embedding dimension), got an "
                f"array of shape {np.shape(queries)}."
            )
        if k < 1:
            raise VectorIndexError(f"k must be at least 1, got {k}.")
        norms = np.linalg.norm(q, axis=1, keepdims=True)
        q = np.ascontiguousarray(q / np.where(norms > 0, norms, 1), dtype=np.float32)
        if not len(q):
            return []
        k_eff = max(1, min(k, self.vectors))
        with _threads(1 if len(q) < FEW_QUERIES else None):
            scores, labels = self.index.search(
                q, k_eff, params=_search_params(self.kind, self.params, self.deleted)
            )
        results = []
        for row_s, row_l in zip(scores, labels):
            found = row_l >= 0
            pos = np.searchsorted(self.ids, row_l[found])
            keys = self.keys.take(pa.array(pos)).to_pylist() if len(pos) else []
            results.append(list(zip(keys, row_s[found].astype(float).tolist())))
        return results

    def stale(self, output: str | None = None) -> list[str]:
        """Data files of the output (default: the one this index was opened from) that the index does not
        cover as they are now: new, replaced (size or modification time changed) or gone."""
        fs, root = resolve_uri(output or self.output)
        current = list_data_files(fs, root)
        return stale_files(self.files, current)


def stale_files(covered: dict[str, dict[str, Any]], current: dict[str, DataFile]) -> list[str]:
    """The data files the manifest (`covered`) does not cover as they are now: new, replaced or gone."""
    changed = [
        name
        for name, f in current.items()
        if name not in covered or covered[name]["size"] != f.size or covered[name]["mtime_ns"] != f.mtime_ns
    ]
    return sorted(changed + [name for name in covered if name not in current])


# --------------------------------------------------------------------------------------------------------
# Building


def _choose_kind(kind: str, vectors: int, dim: int) -> str:
    if kind != "auto":
        return kind
    return "flat" if vectors * dim <= FLAT_MAX_VALUES else "ivf"


def _check_models(
    output: str, opened: list[_Opened], known: tuple[dict[str, Any], str] | None
) -> tuple[dict[str, Any], str] | None:
    """The one model identity of `opened` and of `known` (an identity and where it comes from), with where
    it comes from; raises on a mix."""
    for o in opened:
        if known is None:
            known = (o.model, o.file.name)
        elif not _same_model(known[0], o.model):
            raise VectorIndexError(
                f"Cannot index {output}: {o.file.name} holds embeddings of {_describe_model(o.model)} but "
                f"{known[1]} holds embeddings of {_describe_model(known[0])}; an index covers one model's "
                "embeddings, so keep each model's output in its own directory."
            )
    return known


def build_index(output: str, *, kind: str = "auto", rebuild: bool = False) -> dict[str, Any]:
    """Builds or updates the index of `output` (a local directory or s3://bucket/prefix); returns a summary:
    kind, vectors, files (covered), files_added / files_changed / files_removed (against the index as it
    was; with `rebuild` every file counts as added), files_read, vectors_added / vectors_removed, rebuilt
    (every data file was read and the index made anew), updated (False: nothing had changed and nothing was
    written), seconds, and the model, run ids, search parameters and generation of the index.

    ``kind="auto"`` keeps the kind an index was built with when it was asked for explicitly."""
    start = time.perf_counter()
    if kind not in KINDS:
        raise VectorIndexError(f"Unknown index kind {kind!r}: choose one of {', '.join(KINDS)}.")
    fs, root = resolve_uri(output)
    current = require_data_files(fs, root, output, VectorIndexError)
    existing = _read_manifest(fs, root)
    manifest = None if rebuild else existing
    requested = kind
    if manifest and kind == "auto" and manifest.get("requested", "auto") != "auto":
        requested = manifest["requested"]
    covered: dict[str, dict[str, Any]] = manifest["files"] if manifest else {}
    names = stale_files(covered, current)
    todo = [current[n] for n in names if n in current]
    gone = [n for n in names if n not in current]
    changed = [f.name for f in todo if f.name in covered]
    opened = [_open_data_file(fs, root, output, f) for f in todo]
    known = _check_models(
        output, opened, (manifest["model"], "the files indexed so far") if manifest else None
    )

    summary: dict[str, Any] = {
        "output": output,
        "files_added": len(todo) - len(changed),
        "files_changed": len(changed),
        "files_removed": len(gone),
    }
    old_vectors = int(manifest["vectors"]) if manifest else 0
    wanted = known and _choose_kind(requested, old_vectors, int(known[0]["embedding_dim"]))
    if manifest and not names and wanted == manifest["kind"]:
        return summary | _result(manifest, start, files_read=0, added=0, removed=0, rebuilt=False)

    log.info("reading %d new or replaced data file(s) of %s", len(opened), output)
    read = [(o, *_read_vectors(fs, output, o)) for o in opened]
    added = sum(len(v) for _, v, _ in read)
    removed = sum(int(covered[n].get("vectors", 0)) for n in [*changed, *gone])
    assert known is not None
    dim = int(known[0]["embedding_dim"])
    target = _choose_kind(requested, old_vectors - removed + added, dim)

    state = None
    if manifest and target == manifest["kind"]:
        state = _Incremental.load(fs, root, manifest)
        if state.needs_rebuild(added, removed):
            state = None
    if state is not None:
        state.remove_files({*changed, *gone})
        files = {n: v for n, v in covered.items() if n in current and n not in changed}
    else:  # a full build: the files not read above are read too
        seen = {o.file.name for o in opened}
        rest = [_open_data_file(fs, root, output, current[n]) for n in sorted(current) if n not in seen]
        log.info("building a %s index anew: reading %d more data file(s)", target, len(rest))
        known = _check_models(output, rest, known)
        read += [(o, *_read_vectors(fs, output, o)) for o in rest]
        read.sort(key=lambda r: r[0].file.name)
        state = _Incremental.new(target, dim, [v for _, v, _ in read])
        files = {}
    files_read = len(read)
    read.reverse()
    while read:  # each file's vectors are let go once in the index
        o, vectors, keys = read.pop()
        state.add(vectors, keys, o.file.name)
        files[o.file.name] = o.file.stamp() | {"vectors": len(vectors), "run_id": o.run_id}

    assert known is not None
    generation = _generation()
    log.info("writing generation %s: %d vectors", generation, state.index.ntotal)
    new_manifest = state.write(fs, root, generation) | {
        "format": FORMAT,
        "kind": state.kind,
        "requested": requested,
        "generation": generation,
        "previous": existing["generation"] if existing else None,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": known[0],
        "files": dict(sorted(files.items())),
        "run_ids": sorted({f["run_id"] for f in files.values() if f.get("run_id")}),
    }
    _commit(fs, root, output, new_manifest)
    return summary | _result(
        new_manifest, start, files_read=files_read, added=added, removed=removed, rebuilt=state.rebuilt
    )


def _generation() -> str:
    """A new generation's name: the UTC time to the microsecond, so names sort in the order builds began."""
    now = time.time_ns()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now // 10**9))
    return f"{stamp}.{now % 10**9 // 1000:06d}-{uuid.uuid4().hex[:6]}"


def _result(
    manifest: dict[str, Any], start: float, *, files_read: int, added: int, removed: int, rebuilt: bool
) -> dict[str, Any]:
    return {
        "kind": manifest["kind"],
        "vectors": int(manifest["vectors"]),
        "files": len(manifest["files"]),
        "run_ids": manifest["run_ids"],
        "model": manifest["model"],
        "params": manifest["params"],
        "files_read": files_read,
        "vectors_added": added,
        "vectors_removed": removed,
        "rebuilt": rebuilt,
        "updated": files_read > 0 or rebuilt,
        "generation": manifest["generation"],
        "seconds": round(time.perf_counter() - start, 3),
    }


class _Incremental:
    """An index being built or updated: the FAISS index, the keys table, the next free id."""

    def __init__(self, kind: str, index: Any, params: dict[str, Any], keys: pa.Table, next_id: int):
        self.kind, self.index, self.params = kind, index, params
        self.keys, self.next_id = keys, next_id
        self.rebuilt = False

    @classmethod
    def new(cls, kind: str, dim: int, parts: list[np.ndarray]) -> _Incremental:
        n = sum(len(p) for p in parts)
        if kind != "flat" and n == 0:
            kind = "flat"  # nothing to train or link yet
        index, params = _new_index(kind, parts, dim)
        state = cls(kind, index, params, KEYS_SCHEMA.empty_table(), 0)
        state.rebuilt = True
        return state

    @classmethod
    def load(cls, fs: pafs.FileSystem, root: str, manifest: dict[str, Any]) -> _Incremental:
        base = _index_root(root)
        index = _read_index(fs, f"{base}/{manifest['index_file']}")
        with fs.open_input_file(f"{base}/{manifest['keys_file']}") as f:
            keys = pq.ParquetFile(f).read().cast(KEYS_SCHEMA)
        return cls(manifest["kind"], index, dict(manifest["params"]), keys, int(manifest["next_id"]))

    def needs_rebuild(self, added: int, removed: int) -> bool:
        live = self.keys.num_rows - self.keys["key"].null_count
        if self.kind == "ivf":
            return live - removed + added > IVF_RETRAIN_GROWTH * max(1, int(self.params["trained_on"]))
        if self.kind == "hnsw":
            deleted = self.keys["key"].null_count + removed
            return deleted > HNSW_MAX_DELETED * max(1, self.keys.num_rows + added)
        return False

    def remove_files(self, names: set[str]) -> None:
        if not names:
            return
        hit = pc.is_in(self.keys["file"], pa.array(sorted(names), pa.string()))
        hit = pc.fill_null(hit, False)
        ids = self.keys["id"].filter(hit).to_numpy()
        if self.kind == "hnsw":  # the graph keeps them; searches skip ids whose key is null
            nulls = pa.nulls(self.keys.num_rows, pa.string())
            self.keys = self.keys.set_column(1, "key", pc.if_else(hit, nulls, self.keys["key"]))
            self.keys = self.keys.set_column(2, "file", pc.if_else(hit, nulls, self.keys["file"]))
            return
        self.index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64))
        self.keys = self.keys.filter(pc.invert(hit))

    def add(self, vectors: np.ndarray, keys: pa.Array, file: str) -> None:
        if not len(vectors):
            return
        ids = np.arange(self.next_id, self.next_id + len(vectors), dtype=np.int64)
        self.index.add_with_ids(vectors, ids)
        self.next_id += len(vectors)
        batch = pa.table(
            [pa.array(ids), keys.cast(pa.string()), pa.array([file] * len(vectors), pa.string())],
            schema=KEYS_SCHEMA,
        )
        self.keys = pa.concat_tables([self.keys, batch])

    def write(self, fs: pafs.FileSystem, root: str, generation: str) -> dict[str, Any]:
        """Writes the generation's files; returns the manifest's fields about them."""
        directory = f"{_index_root(root)}/{generation}"
        make_dirs(fs, directory)
        _write_index(fs, f"{directory}/index.faiss", self.index)
        with fs.open_output_stream(f"{directory}/keys.parquet") as s:
            pq.write_table(self.keys.combine_chunks(), s, compression="zstd")
        return {
            "index_file": f"{generation}/index.faiss",
            "keys_file": f"{generation}/keys.parquet",
            "vectors": self.keys.num_rows - self.keys["key"].null_count,
            "deleted": self.keys["key"].null_count,
            "next_id": self.next_id,
            "params": self.params,
        }


def _commit(fs: pafs.FileSystem, root: str, output: str, manifest: dict[str, Any]) -> None:
    """Moves the new manifest into place, then removes generations no reader needs any more."""
    base = _index_root(root)
    staged = f"{base}/{manifest['generation']}/{MANIFEST}"
    write_json(fs, staged, manifest)
    now = _read_manifest(fs, root)
    if (now["generation"] if now else None) != manifest["previous"]:
        storage.delete_tree(fs, f"{base}/{manifest['generation']}")
        raise VectorIndexError(
            f"Another index build of {output} finished while this one ran; run this build again to include "
            "what changed since."
        )
    storage.move(fs, staged, f"{base}/{MANIFEST}")
    keep = {manifest["generation"], manifest["previous"]}
    for info in fs.get_file_info(pafs.FileSelector(base, recursive=False, allow_not_found=True)):
        name = info.base_name
        if info.type == pafs.FileType.Directory and name not in keep and name < manifest["generation"]:
            storage.delete_tree(fs, info.path)
