"""Write: embedded rows → Parquet with plain fixed-size-list columns and the run's identity in the footer.

Layout of an output directory::

    part-<run_id>-<task>-<n>.parquet    data, visible to pyarrow.dataset / DuckDB / Polars / Spark
    _staging/<run_id>/…                 files being written; invisible (leading underscore)
    _runs/<run_id>.json                 the run record, written last (see pipeline/run.py)

Write tasks write into `_staging/<run_id>/` under names fixed by their task index, so a retried task
overwrites its own file instead of adding a second copy. When every write task has finished, the driver
moves the staged files into place (`commit`), so a run's rows become visible together or not at all.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.rows import error_column, ok_mask
from pipeline.sources import resolve_uri

log = logging.getLogger(__name__)

METADATA_PREFIX = "vit_embed."
ROW_GROUP_ROWS = 16_384
_ARROW_DTYPES = {"float32": pa.float32(), "float16": pa.float16()}


@dataclass(frozen=True)
class OutputSpec:
    """Shape and types of the output columns."""

    embedding_dim: int
    num_classes: int  # 0: the model has no classification head, no `logits` column
    embedding_dtype: str = "float32"
    logits_dtype: str = "float32"

    def schema(self, metadata: Mapping[str, str] | None = None) -> pa.Schema:
        fields = [
            pa.field("key", pa.string(), nullable=False),
            pa.field("embedding", pa.list_(_ARROW_DTYPES[self.embedding_dtype], self.embedding_dim)),
        ]
        if self.num_classes:
            fields.append(pa.field("logits", pa.list_(_ARROW_DTYPES[self.logits_dtype], self.num_classes)))
        fields.append(pa.field("error", pa.string()))
        meta = {f"{METADATA_PREFIX}{k}": str(v) for k, v in (metadata or {}).items()}
        return pa.schema(fields, metadata=meta or None)


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


def to_table(batch: Mapping[str, np.ndarray], spec: OutputSpec, schema: pa.Schema | None = None) -> pa.Table:
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
    if spec.num_classes:
        logits = np.asarray(batch["logits"]).reshape(n, spec.num_classes)
        columns["logits"] = _vectors(logits, ok, spec.num_classes, spec.logits_dtype)
    columns["error"] = pa.array(list(errors), pa.string())
    return pa.Table.from_pydict(columns, schema=schema or spec.schema())


def write_parquet(tables: Iterable[pa.Table], fs: pafs.FileSystem, path: str, schema: pa.Schema) -> int:
    """Streams tables into one zstd Parquet file in row groups of about ROW_GROUP_ROWS rows."""
    rows = 0
    pending: list[pa.Table] = []
    pending_rows = 0
    float_leaves = [f"{f.name}.list.element" for f in schema if pa.types.is_fixed_size_list(f.type)]
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


@dataclass(frozen=True)
class StagedFile:
    staged: str  # path in the filesystem, under _staging/<run_id>/
    final: str  # where commit moves it
    rows: int
    errors: int
    shards: dict[str, tuple[int, int]]  # input shard rel → (rows, errors) in this file


class ParquetSink:
    """Ray Data Datasink (duck-typed here, subclassed in `make_datasink`) writing one file per write task.

    Plain Python so it is testable without a cluster: `write()` takes Arrow/numpy blocks.
    """

    def __init__(
        self,
        output: str,
        spec: OutputSpec,
        run_id: str,
        metadata: Mapping[str, str],
        min_rows_per_file: int = 4096,
    ) -> None:
        self.output = output.rstrip("/")
        self.spec = spec
        self.run_id = run_id
        self.metadata = dict(metadata)
        self._min_rows = min_rows_per_file
        self.committed: list[StagedFile] = []

    def _fs(self) -> tuple[pafs.FileSystem, str]:
        return resolve_uri(self.output)

    @property
    def staging_dir(self) -> str:
        return f"_staging/{self.run_id}"

    def write_blocks(self, blocks: Iterable[Any], task_idx: int) -> list[StagedFile]:
        fs, root = self._fs()
        schema = self.spec.schema(self.metadata)
        name = f"part-{self.run_id}-{task_idx:05d}.parquet"
        staged, final = f"{root}/{self.staging_dir}/{name}", f"{root}/{name}"
        fs.create_dir(f"{root}/{self.staging_dir}", recursive=True)
        shards: dict[str, tuple[int, int]] = {}

        def tables() -> Iterable[pa.Table]:
            for block in blocks:
                batch = _block_to_numpy(block)
                table = to_table(batch, self.spec, schema)
                failed = table["error"].is_valid().to_numpy(zero_copy_only=False)
                for shard, bad in zip(batch["shard"], failed):
                    rows, errs = shards.get(shard, (0, 0))
                    shards[str(shard)] = (rows + 1, errs + int(bad))
                yield table

        rows = write_parquet(tables(), fs, staged, schema)
        if rows == 0:
            fs.delete_file(staged)
            return []
        errors = sum(e for _, e in shards.values())
        return [StagedFile(staged, final, rows, errors, shards)]

    def commit(self, staged: Iterable[StagedFile]) -> list[StagedFile]:
        """Moves every staged file into place; the run's rows appear together."""
        fs, root = self._fs()
        done = []
        for f in staged:
            fs.move(f.staged, f.final)
            done.append(f)
        self._remove_staging(fs, root)
        self.committed = done
        return done

    def abort(self) -> None:
        """Removes this run's staged files (best effort): nothing of a failed run becomes visible."""
        fs, root = self._fs()
        self._remove_staging(fs, root)

    def _remove_staging(self, fs: pafs.FileSystem, root: str) -> None:
        parent = f"{root}/{self.staging_dir.split('/')[0]}"
        for d in (f"{root}/{self.staging_dir}", parent):
            try:
                if d == parent and fs.get_file_info(pafs.FileSelector(d, allow_not_found=True)):
                    break  # another run's staging is still there
                fs.delete_dir(d)
            except (FileNotFoundError, OSError) as e:  # S3: an empty prefix is already gone
                log.debug("nothing to remove at %s: %s", d, e)


def _block_to_numpy(block: Any) -> Mapping[str, np.ndarray]:
    if isinstance(block, Mapping):
        return block
    from ray.data.block import BlockAccessor  # a Ray block: only reached inside a Ray write task

    return BlockAccessor.for_block(block).to_batch_format("numpy")


def make_datasink(sink: ParquetSink) -> Any:
    """Wraps a ParquetSink as a `ray.data.Datasink` (Ray is imported only here)."""
    from ray.data import Datasink

    class _ParquetDatasink(Datasink[list[StagedFile]]):
        def __init__(self) -> None:
            self.sink = sink

        def write(self, blocks: Iterable[Any], ctx: Any) -> list[StagedFile]:
            return self.sink.write_blocks(blocks, ctx.task_idx)

        def on_write_complete(self, write_result: Any) -> None:
            staged = [f for task in write_result.write_returns for f in task]
            self.sink.commit(staged)

        def on_write_failed(self, error: Exception) -> None:
            self.sink.abort()

        @property
        def min_rows_per_write(self) -> int:
            return self.sink._min_rows

        def get_name(self) -> str:
            return "WriteParquet"

    return _ParquetDatasink()


def write_json(fs: pafs.FileSystem, path: str, obj: Any) -> None:
    """Writes a small JSON document atomically where the filesystem allows it (local: temp + rename)."""
    data = json.dumps(obj, indent=2, sort_keys=True).encode()
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp"
        with fs.open_output_stream(tmp) as s:
            s.write(data)
        fs.move(tmp, path)
    else:  # an S3 PUT is atomic
        with fs.open_output_stream(path) as s:
            s.write(data)
