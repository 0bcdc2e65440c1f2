"""The ledger's index: which input shards are committed, in Parquet segments read by key range.

    _ledger/index.json                the current segments (oldest first) and the commit records they hold
    _ledger/<segment>.shards.parquet  rel, rows, errors, file: one row per committed input shard, sorted by
                                      rel, in row groups of ROW_GROUP_ROWS with min/max statistics
    _ledger/<segment>.files.parquet   file, shards, first_shard, rows, errors: one row per data file

Commit records (`_runs/<run>/commit-<n>.json`, pipeline/ledger.py) stay the commit point. A run holding the
output's lease folds the records of earlier runs into a new segment and then deletes them (`fold`), so the
records a planner parses are those of the last run only. Segments merge like an LSM tree: the newest into the
one before while it is at least half that one's size (up to MERGE_MAX_ROWS rows), so an output holds
O(log n) segments and a shard is rewritten O(log n) times over the output's life.

Where a shard appears more than once (a --retry-errors replacement, a redo after a data file was lost), the
newest entry wins. `lookup(rels)` reads only the row groups whose [min, max] rel range holds a wanted rel:
checking a page of a sorted listing costs that page, not every committed shard.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.storage import make_dirs, read_json, write_json

log = logging.getLogger(__name__)

INDEX_DIR = "_ledger"
ROW_GROUP_ROWS = 65_536
LOOKUP_PAGE = 65_536  # shard names checked against the index at a time
MERGE_MAX_ROWS = 20_000_000  # a merge reads both segments into the driver's memory (~100 B per shard)

SHARDS_SCHEMA = pa.schema(
    [
        pa.field("rel", pa.string(), nullable=False),
        pa.field("rows", pa.int64(), nullable=False),
        pa.field("errors", pa.int64(), nullable=False),
        pa.field("file", pa.string()),  # null: the shard produced no row (e.g. an empty tar)
    ]
)
FILES_SCHEMA = pa.schema(
    [
        pa.field("file", pa.string(), nullable=False),
        pa.field("shards", pa.int64(), nullable=False),
        pa.field("first_shard", pa.string(), nullable=False),
        pa.field("rows", pa.int64(), nullable=False),
        pa.field("errors", pa.int64(), nullable=False),
    ]
)
_LAST = pc.ScalarAggregateOptions(skip_nulls=False)


@dataclass(frozen=True)
class FileEntry:
    """A committed data file: how many input shards it holds (the first by name), its rows and errors."""

    shards: int
    first_shard: str
    rows: int
    errors: int


def newest(table: pa.Table, key: str) -> pa.Table:
    """One row per `key`, the last one in table order (the newest), sorted by `key`."""
    others = [(c, "last", _LAST) for c in table.column_names if c != key]
    result = table.group_by(key, use_threads=False).aggregate(others)
    result = result.rename_columns(
        [key if c == key else c.removesuffix("_last") for c in result.column_names]
    )
    return result.select(table.column_names).sort_by(key)


def files_of(shards: pa.Table) -> pa.Table:
    """The files table of a shards table (newest entries only): shards with no file are left out."""
    with_file = shards.filter(pc.is_valid(shards["file"]))
    grouped = with_file.group_by("file", use_threads=False).aggregate(
        [("rel", "count"), ("rel", "min"), ("rows", "sum"), ("errors", "sum")]
    )
    return pa.table(
        {
            "file": grouped["file"],
            "shards": grouped["rel_count"],
            "first_shard": grouped["rel_min"],
            "rows": grouped["rows_sum"],
            "errors": grouped["errors_sum"],
        },
        schema=FILES_SCHEMA,
    ).sort_by("file")


@dataclass(frozen=True)
class Segment:
    name: str
    rows: int  # shards in it


class Index:
    """The segments of one output, as `index.json` names them; reads them by key range."""

    def __init__(self, output: str) -> None:
        self.output = output
        self.fs, root = storage.resolve_uri(output)
        self.dir = f"{root}/{INDEX_DIR}"
        state = self._state()
        self.segments = [Segment(s["name"], s["rows"]) for s in state.get("segments", [])]
        self.folded: list[str] = state.get("folded", [])  # commit records (relative to the output)
        self._ranges: dict[str, list[tuple[str | None, str | None]]] = {}
        self._cached: dict[str, tuple[int, pa.Table]] = {}  # segment → its last row group read

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_ranges": {}, "_cached": {}}

    def _state(self) -> dict:
        try:
            return read_json(self.fs, f"{self.dir}/index.json")
        except FileNotFoundError:
            return {}

    def _path(self, segment: str, table: str) -> str:
        return f"{self.dir}/{segment}.{table}.parquet"

    # Reading ------------------------------------------------------------------------------------------

    def files(self) -> dict[str, FileEntry]:
        """Every data file the segments name, newest entry first."""
        tables = [
            pq.read_table(self._path(s.name, "files"), filesystem=self.fs, schema=FILES_SCHEMA)
            for s in self.segments
        ]
        if not tables:
            return {}
        table = newest(pa.concat_tables(tables), "file")
        return {
            f: FileEntry(n, first, r, e)
            for f, n, first, r, e in zip(*(table[c].to_pylist() for c in FILES_SCHEMA.names), strict=True)
        }

    def read_all(self) -> pa.Table:
        """Every segment's rows, oldest segment first."""
        tables = [self._read(s.name) for s in self.segments]
        return pa.concat_tables(tables) if tables else SHARDS_SCHEMA.empty_table()

    def lookup(self, rels: Sequence[str]) -> pa.Table:
        """The segments' rows (oldest segment first, not yet reduced to the newest) for the sorted `rels`;
        only row groups whose rel range holds one of them are read."""
        if not rels or not self.segments:
            return SHARDS_SCHEMA.empty_table()
        wanted = pa.array(rels, pa.string())
        found = []
        for seg in self.segments:
            for i, (lo, hi) in enumerate(self._row_group_ranges(seg.name)):
                j = 0 if lo is None else bisect.bisect_left(rels, lo)
                if j == len(rels) or (hi is not None and rels[j] > hi):
                    continue
                group = self._row_group(seg.name, i)
                found.append(group.filter(pc.is_in(group["rel"], value_set=wanted)))
        return pa.concat_tables(found) if found else SHARDS_SCHEMA.empty_table()

    def _row_group_ranges(self, segment: str) -> list[tuple[str | None, str | None]]:
        if segment not in self._ranges:
            meta = pq.read_metadata(self._path(segment, "shards"), filesystem=self.fs)
            ranges = []
            for i in range(meta.num_row_groups):
                stats = meta.row_group(i).column(0).statistics
                ok = stats is not None and stats.has_min_max
                ranges.append((stats.min, stats.max) if ok else (None, None))  # type: ignore[union-attr]
            self._ranges[segment] = ranges
        return self._ranges[segment]

    def _row_group(self, segment: str, i: int) -> pa.Table:
        cached = self._cached.get(segment)
        if cached is None or cached[0] != i:  # a sorted listing reads each row group once, in order
            file = pq.ParquetFile(self._path(segment, "shards"), filesystem=self.fs)
            cached = (i, file.read_row_group(i).cast(SHARDS_SCHEMA))
            self._cached[segment] = cached
        return cached[1]

    # Writing (holding the output's lease) -----------------------------------------------------------

    def fold(self, records: pa.Table, record_paths: list[str], segment: str, delete: bool = True) -> None:
        """Writes `records` (shard rows of the commit records at `record_paths`, oldest first) as a new
        segment named `segment`, merges segments, points index.json at the result, then deletes the folded
        records (`delete=False`: the next fold does) and every index file that index.json no longer names.
        Each step is safe to crash after: an unnamed segment is removed by the next fold, a folded record
        still present is skipped by readers."""
        root = self.dir.rsplit("/", 1)[0]
        for path in self.folded:  # left by a fold that crashed before deleting them
            storage.delete_file(self.fs, f"{root}/{path}")
        segments = list(self.segments)
        if record_paths:
            make_dirs(self.fs, self.dir)
            segments.append(self._write(segment, newest(records.cast(SHARDS_SCHEMA), "rel")))
        merges = 0
        while (
            len(segments) >= 2
            and 2 * segments[-1].rows >= segments[-2].rows
            and segments[-1].rows + segments[-2].rows <= MERGE_MAX_ROWS
        ):
            older, newer = segments[-2:]
            merges += 1
            merged = pa.concat_tables([self._read(older.name), self._read(newer.name)])
            segments[-2:] = [self._write(f"{segment}-m{merges}", newest(merged, "rel"))]
        if segments == self.segments and not self.folded:
            return
        write_json(
            self.fs,
            f"{self.dir}/index.json",
            {"segments": [{"name": s.name, "rows": s.rows} for s in segments], "folded": record_paths},
        )
        self.segments, self.folded = segments, record_paths
        self._ranges.clear()
        self._cached.clear()
        for path in record_paths if delete else []:
            storage.delete_file(self.fs, f"{root}/{path}")
        keep = {f"{s.name}.{t}.parquet" for s in segments for t in ("shards", "files")} | {"index.json"}
        for info in self.fs.get_file_info(pafs.FileSelector(self.dir, allow_not_found=True)):
            if info.type == pafs.FileType.File and info.base_name not in keep:
                storage.delete_file(self.fs, info.path)

    def _read(self, segment: str) -> pa.Table:
        return pq.read_table(self._path(segment, "shards"), filesystem=self.fs, schema=SHARDS_SCHEMA)

    def _write(self, segment: str, shards: pa.Table) -> Segment:
        for table, name in ((shards, "shards"), (files_of(shards), "files")):
            path = self._path(segment, name)
            tmp = f"{path}.tmp" if isinstance(self.fs, pafs.LocalFileSystem) else path
            pq.write_table(table, tmp, filesystem=self.fs, row_group_size=ROW_GROUP_ROWS, compression="zstd")
            if tmp != path:
                self.fs.move(tmp, path)
        return Segment(segment, shards.num_rows)


@dataclass
class CommittedShards:
    """Which input shards are committed: the index's segments, the shard rows of commit records not yet
    folded into it, and the data files found missing (whose shards count as not done). Picklable, so the
    workers that list the input ask it page by page."""

    index: Index
    records: pa.Table = field(default_factory=SHARDS_SCHEMA.empty_table)
    lost: list[str] = field(default_factory=list)

    def done_in(self, rels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """For the sorted shard names `rels`: whether each is committed, and its committed row count. Reads
        the index LOOKUP_PAGE names at a time (only the row groups a page's names fall in)."""
        done = np.zeros(len(rels), dtype=bool)
        rows = np.zeros(len(rels), dtype=np.int64)
        for start in range(0, len(rels), LOOKUP_PAGE):
            page = rels[start : start + LOOKUP_PAGE]
            wanted = pa.array(page, pa.string())
            found = [self.index.lookup(page)]
            if self.records.num_rows:
                found.append(self.records.filter(pc.is_in(self.records["rel"], value_set=wanted)))
            table = self._valid(newest(pa.concat_tables(found), "rel"))
            at = pc.index_in(wanted, value_set=table["rel"])
            hit = at.is_valid().to_numpy(zero_copy_only=False)
            done[start : start + len(page)] = hit
            if table.num_rows:
                counts = table["rows"].to_numpy()[pc.fill_null(at, 0).to_numpy()]
                rows[start : start + len(page)] = np.where(hit, counts, 0)
        return done, rows

    def all(self) -> dict[str, tuple[int, int]]:
        """Every committed shard → (rows, errors). Reads the whole index: for tools and tests, not for
        planning (`done_in`)."""
        table = self._valid(newest(pa.concat_tables([self.index.read_all(), self.records]), "rel"))
        return {
            rel: (r, e)
            for rel, r, e in zip(*(table[c].to_pylist() for c in ("rel", "rows", "errors")), strict=True)
        }

    def _valid(self, table: pa.Table) -> pa.Table:
        if not self.lost:
            return table
        return table.filter(pc.invert(pc.is_in(table["file"], value_set=pa.array(self.lost, pa.string()))))
