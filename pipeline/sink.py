"""Write: embedded rows → Parquet with plain fixed-size-list columns and the run's identity in the footer.

Layout of an output directory::

    part-<run_id>-u<unit>.parquet        data, one file per unit of work, visible to pyarrow.dataset /
                                         DuckDB / Polars / Spark
    _staging/<run_id>/…                  parts being written and units being committed; invisible
    _runs/<run_id>/…                     the ledger (pipeline/ledger.py)

Write tasks write each block's rows as one part per unit of work into `_staging/<run_id>/` under a fresh
name (a retried task writes new names; its abandoned attempt is never committed). The commit loop
(pipeline/commit.py) stages a complete unit as one file, records it, and moves it into place, so a unit's
rows become visible together, and only once committed.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.rows import SHARD_ERROR_SUFFIX, error_column, ok_mask, optional_column, unpack_extra
from pipeline.storage import make_dirs, relative_path, resolve_uri
from pipeline.units import Part

log = logging.getLogger(__name__)

METADATA_PREFIX = "vit_embed."
STAGING_DIR = "_staging"
# Stages whose per-row seconds arrive as `<stage>_s` columns; `model_start` is the model actors' start
# (pipeline/embed.py), which the run reports with its start rather than as a stage.
STAGES = ("read", "decode", "embed", "model_start")
# The output table's columns, as OutputSpec.schema() writes them; recorded in every footer. Raise it with
# any change of a column's name, type or meaning (README "Output" documents each version's columns).
SCHEMA_VERSION = "2"
ROW_GROUP_ROWS = 16_384
_ARROW_DTYPES = {"float32": pa.float32(), "float16": pa.float16()}


@dataclass(frozen=True)
class OutputSpec:
    """Shape and types of the output columns; `schema()` is the one definition of the table's schema.

    `logits`: write the full logits vector (`--logits full`); `topk`: write the `topk` most probable
    classes and their softmax scores (0: not); `class_names`: also write the top classes' names; `extra`:
    the (name, Arrow type) of columns passed through from the input (pipeline.rows.pack_extra).
    """

    embedding_dim: int
    num_classes: int  # 0: the model has no classification head, no `logits` or top-k columns
    embedding_dtype: str = "float32"
    logits_dtype: str = "float32"
    logits: bool = True
    topk: int = 0
    class_names: tuple[str, ...] | None = None
    extra: tuple[tuple[str, pa.DataType], ...] = ()

    @property
    def k(self) -> int:
        """Columns of the top-k lists: `topk`, at most the number of classes."""
        return min(self.topk, self.num_classes)

    def schema(self, metadata: Mapping[str, str] | None = None) -> pa.Schema:
        fields = [
            pa.field("key", pa.string(), nullable=False),
            pa.field("embedding", pa.list_(_ARROW_DTYPES[self.embedding_dtype], self.embedding_dim)),
        ]
        if self.num_classes and self.logits:
            fields.append(pa.field("logits", pa.list_(_ARROW_DTYPES[self.logits_dtype], self.num_classes)))
        if self.k:
            fields += [
                pa.field("top_classes", pa.list_(pa.int32())),
                pa.field("top_scores", pa.list_(pa.float32())),
            ]
            if self.class_names:
                fields.append(pa.field("top_names", pa.list_(pa.string())))
        fields += [
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            pa.field("bytes_sha256", pa.string()),
            pa.field("run_id", pa.string()),
            pa.field("error", pa.string()),
        ]
        fields += [pa.field(name, type_) for name, type_ in self.extra]
        meta = {f"{METADATA_PREFIX}{k}": str(v) for k, v in (metadata or {}).items()}
        meta[f"{METADATA_PREFIX}schema_version"] = SCHEMA_VERSION
        return pa.schema(fields, metadata=meta)

    def columns(self) -> str:
        """The columns and their types in one line: what a run records so that one output never holds
        two schemas (pipeline/ledger.py compares it between runs)."""
        return "; ".join(f"{f.name}: {f.type}" for f in self.schema())


def footer_metadata(table_or_path: pa.Table | pa.Schema | pq.ParquetFile) -> dict[str, str]:
    """The `vit_embed.*` key-value metadata of a written file or table, prefix removed."""
    if isinstance(table_or_path, pq.ParquetFile):
        schema = table_or_path.schema_arrow
    elif isinstance(table_or_path, pa.Schema):
        schema = table_or_path
    else:
        schema = table_or_path.schema
    raw = schema.metadata or {}
    return {
        k.decode()[len(METADATA_PREFIX) :]: v.decode()
        for k, v in raw.items()
        if k.decode().startswith(METADATA_PREFIX)
    }


def _vectors(values: np.ndarray, ok: np.ndarray, width: int, dtype: str) -> pa.FixedSizeListArray:
    """`[B, width]` numbers → fixed_size_list<dtype>[width], null where `ok` is False."""
    flat = pa.array(np.ascontiguousarray(values, dtype=np.dtype(dtype)).reshape(-1))
    mask = pa.array(~ok) if not ok.all() else None
    return pa.FixedSizeListArray.from_arrays(flat, width, mask=mask)


def _lists(values: np.ndarray, ok: np.ndarray, type_: pa.DataType) -> pa.ListArray:
    """`[B, K]` values → list<type_>, null where `ok` is False."""
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type_)
    mask = pa.array(~ok) if not ok.all() else None
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1], mask=mask).cast(pa.list_(type_))


def _sizes(batch: Mapping[str, np.ndarray], name: str, n: int) -> pa.Array:
    """The `width` or `height` column: int32, null where the stage did not learn it (-1) or absent."""
    raw = batch.get(name)
    if raw is None:
        return pa.nulls(n, pa.int32())
    values = np.asarray(raw, dtype=np.int32).reshape(n)
    return pa.array(values, pa.int32(), mask=values < 0)


def to_table(
    batch: Mapping[str, np.ndarray], spec: OutputSpec, schema: pa.Schema | None = None, run_id: str = ""
) -> pa.Table:
    """An embed-stage batch (see ARCHITECTURE.md) → an Arrow table with the output schema."""
    errors = error_column(batch)
    ok = ok_mask(errors)
    n = len(errors)
    columns: dict[str, pa.Array] = {
        "key": pa.array([str(k) for k in batch["key"]], pa.string()),
        "embedding": _vectors(
            np.asarray(batch["embedding"]).reshape(n, spec.embedding_dim),
            ok,
            spec.embedding_dim,
            spec.embedding_dtype,
        ),
    }
    if spec.num_classes and spec.logits:
        logits = np.asarray(batch["logits"]).reshape(n, spec.num_classes)
        columns["logits"] = _vectors(logits, ok, spec.num_classes, spec.logits_dtype)
    if spec.k:
        classes = np.asarray(batch["top_classes"], dtype=np.int32).reshape(n, spec.k)
        columns["top_classes"] = _lists(classes, ok, pa.int32())
        columns["top_scores"] = _lists(np.asarray(batch["top_scores"]).reshape(n, spec.k), ok, pa.float32())
        if spec.class_names:
            names = pa.array(spec.class_names, pa.string()).take(pa.array(classes.reshape(-1)))
            mask = pa.array(~ok) if not ok.all() else None
            columns["top_names"] = pa.FixedSizeListArray.from_arrays(names, spec.k, mask=mask).cast(
                pa.list_(pa.string())
            )
    columns["width"] = _sizes(batch, "width", n)
    columns["height"] = _sizes(batch, "height", n)
    columns["bytes_sha256"] = pa.array(list(optional_column(batch, "bytes_sha256")), pa.string())
    columns["run_id"] = pa.array([run_id] * n, pa.string())
    columns["error"] = pa.array(list(errors), pa.string())
    if spec.extra:
        packed = optional_column(batch, "extra", bytes)
        rows = [unpack_extra(p, len(spec.extra)) for p in packed]
        for i, (name, type_) in enumerate(spec.extra):
            columns[name] = pa.array([r[i] for r in rows], type_)
    return pa.Table.from_pydict(columns, schema=schema or spec.schema())


def write_parquet(tables: Iterable[pa.Table], fs: pafs.FileSystem, path: str, schema: pa.Schema) -> int:
    """Streams tables into one zstd Parquet file in row groups of about ROW_GROUP_ROWS rows."""
    rows = 0
    pending: list[pa.Table] = []
    pending_rows = 0
    # Byte-stream-split only on float32 vectors: DuckDB (2.0) cannot read it on float16 columns (a
    # FIXED_LEN_BYTE_ARRAY in Parquet). A list column is named by its leaf path, not its name.
    float_leaves = [
        f"{f.name}.list.element"
        for f in schema
        if pa.types.is_fixed_size_list(f.type) and pa.types.is_float32(f.type.value_type)
    ]
    with (
        fs.open_output_stream(path) as stream,
        pq.ParquetWriter(
            stream,
            schema,
            compression="zstd",
            use_dictionary=["key", "error"],
            use_byte_stream_split=float_leaves,
            write_statistics=["key"],
        ) as writer,
    ):
        for table in tables:
            pending.append(table)
            pending_rows += table.num_rows
            if pending_rows >= ROW_GROUP_ROWS:
                writer.write_table(pa.concat_tables(pending), row_group_size=ROW_GROUP_ROWS)
                rows += pending_rows
                pending, pending_rows = [], 0
        if pending_rows:
            writer.write_table(pa.concat_tables(pending), row_group_size=ROW_GROUP_ROWS)
            rows += pending_rows
    return rows


class ParquetSink:
    """Writes staged Parquet parts (one per unit per write call) and commits them into place.

    Plain Python, so it is testable without a cluster: `write_parts` takes one batch as a dict of numpy
    arrays with the embed stage's columns plus `unit` and `unit_rows` (pipeline/units.py).
    """

    def __init__(self, output: str, spec: OutputSpec, run_id: str, metadata: Mapping[str, str]) -> None:
        # Only strings and small values: this object is pickled into every write task.
        self.output = output.rstrip("/")
        self.spec = spec
        self.run_id = run_id
        self.metadata = dict(metadata)

    @property
    def staging_dir(self) -> str:
        return f"{STAGING_DIR}/{self.run_id}"

    def write_parts(self, batch: Mapping[str, np.ndarray]) -> list[Part]:
        fs, root = resolve_uri(self.output)
        schema = self.spec.schema(self.metadata)
        make_dirs(fs, f"{root}/{self.staging_dir}")
        units = np.asarray(batch["unit"], dtype=np.int64)
        unit_rows = np.asarray(batch["unit_rows"], dtype=np.int64)
        parts = []
        for unit in np.unique(units):
            start = time.perf_counter()
            idx = np.flatnonzero(units == unit)
            sub = {k: np.asarray(v)[idx] for k, v in batch.items()}
            table = to_table(sub, self.spec, schema, self.run_id)
            failed = table["error"].is_valid().to_numpy(zero_copy_only=False)
            shards: dict[str, tuple[int, int]] = {}
            for shard, bad in zip(sub["shard"], failed):
                rows, errs = shards.get(str(shard), (0, 0))
                shards[str(shard)] = (rows + 1, errs + int(bad))
            # A fresh name per attempt: a retried task never overwrites a part another attempt reported.
            staged = f"{root}/{self.staging_dir}/u{int(unit):06d}-{uuid.uuid4().hex}.parquet"
            write_parquet([table], fs, staged, schema)
            total = int(unit_rows[idx].max())
            seconds = {
                stage: float(np.asarray(sub[f"{stage}_s"], dtype=np.float64).sum())
                for stage in STAGES
                if f"{stage}_s" in sub
            }
            seconds["write"] = time.perf_counter() - start
            parts.append(Part(staged, int(unit), table.num_rows, int(failed.sum()), total, shards, seconds))
        return parts

    def final_name(self, unit: int) -> str:
        return f"part-{self.run_id}-u{unit:06d}.parquet"

    def relative(self, path: str) -> str:
        """A path in the output's filesystem → relative to the output (as commit records name files)."""
        return relative_path(resolve_uri(self.output)[1], path)

    def stage_unit(self, parts: list[Part]) -> str:
        """One unit's rows as ONE staged file, ready to be moved into place; returns its path relative to
        the output. A single part is that file; several are merged into `_staging/<run_id>/<final name>`
        (idempotent: a retried merge writes the same file again). The parts are left for `delete_parts`."""
        fs, root = resolve_uri(self.output)
        if len(parts) == 1:
            return relative_path(root, parts[0].staged)
        name = self.final_name(parts[0].unit)
        schema = self.spec.schema(self.metadata)
        merged = f"{root}/{self.staging_dir}/{name}"
        write_parquet(
            (pq.read_table(p.staged, filesystem=fs, schema=schema) for p in parts), fs, merged, schema
        )
        return relative_path(root, merged)

    def stage_replacement(
        self, parts: list[Part], file: str, drop: Iterable[str], single_shard: str | None
    ) -> tuple[str, dict[str, tuple[int, int]]]:
        """A new version of the committed data file `file`, staged: its rows minus those whose key is among
        the parts' keys (a retried key that did not come back keeps its old row, so nothing is lost) or is a
        shard's error key in `drop` (that shard was read again whole), plus the parts' rows. Returns the
        staged path (relative to the output) and the (rows, errors) of each input shard in the new version:
        `single_shard` when the file is one tar or Parquet shard's, else its loose files (one row each,
        keyed by the file's path). Moving it over `file` swaps the rows in one step: a reader sees the old
        file or the new one, never both."""
        fs, root = resolve_uri(self.output)
        schema = self.spec.schema(self.metadata)
        new = [pq.read_table(p.staged, filesystem=fs, schema=schema) for p in parts]
        new_keys = {k for t in new for k in t["key"].to_pylist()}
        old = pq.read_table(f"{root}/{file}", filesystem=fs)
        gone = new_keys | {k for k in drop if k.endswith(SHARD_ERROR_SUFFIX)}
        keep = [k not in gone for k in old["key"].to_pylist()]
        # The committed file keeps its own footer (its run id); the replaced rows come from this run.
        table = pa.concat_tables(
            [old.filter(pa.array(keep)).cast(old.schema), *[t.cast(old.schema) for t in new]]
        )
        staged = f"{root}/{self.staging_dir}/{file}"
        write_parquet([table], fs, staged, old.schema)
        keys = table["key"].to_pylist()
        bad = table["error"].is_valid().to_pylist()
        if single_shard is not None:  # a tar or Parquet shard is a unit, hence a file, alone
            counts = {single_shard: (len(keys), sum(bad))}
        else:  # loose files: each key is its file's path
            counts = {key: (1, int(b)) for key, b in zip(keys, bad, strict=True)}
        return relative_path(root, staged), counts

    def move_into_place(self, staged: str, name: str) -> None:
        """Moves a staged file (path relative to the output) to `name` in the dataset, replacing a file of
        that name: a rename locally, a server-side copy on S3, either way atomic for readers."""
        fs, root = resolve_uri(self.output)
        storage.move(fs, f"{root}/{staged}", f"{root}/{name}")

    def delete_parts(self, parts: list[Part]) -> None:
        """Deletes staged parts that a merged file replaced (missing ones are fine)."""
        fs, _ = resolve_uri(self.output)
        for p in parts:
            storage.delete_file(fs, p.staged)

    def place_unit(self, parts: list[Part]) -> str:
        """Stages and moves one unit's parts into place as ONE file, without a commit record; returns its
        name. The commit loop does the same two steps with the record in between (pipeline/commit.py)."""
        name = self.final_name(parts[0].unit)
        staged = self.stage_unit(parts)
        self.move_into_place(staged, name)
        if len(parts) > 1:
            self.delete_parts(parts)
        return name

    def remove_staging(self) -> None:
        """Removes `_staging/`: what is there belongs to this run (the lease keeps other runs out, and the
        run's recovery removed older leftovers). Call it only when no committed unit is still staged."""
        fs, root = resolve_uri(self.output)
        storage.delete_tree(fs, f"{root}/{STAGING_DIR}")


def write_parts(batch: dict[str, np.ndarray], sink: ParquetSink) -> dict[str, np.ndarray]:
    """The write stage as a Ray Data map_batches function: one result row per part written."""
    written = sink.write_parts(batch)
    parts = np.empty(len(written), dtype=object)
    parts[:] = written
    return {"part": parts}
