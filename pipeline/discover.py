"""The discover stage: listing partitions → units of the loose files not yet committed, in workers.

Inputs too large to list on the driver (more than STREAM_ABOVE loose files) are listed by this stage, one
Ray Data task per listing partition (pipeline/sources/walk.py). A task lists its partition in sorted pages,
asks the ledger which of a page's files are committed (pipeline/ledger_index.py reads only the index row
groups the page falls in), and groups the rest, in listing order, into units of `files_per_unit` files,
which go on to the read+decode stage as soon as they are formed. The driver holds no key: only the
partitions and one report per partition (`PartitionReport`, how many units it made and what it skipped),
which the commit loop checks against the units it committed.

A manifest (`--input-list`) naming more than STREAM_ABOVE objects is not read on the driver either. Before
the pipeline starts, workers read its data files (`ManifestBuckets`, one task per file), Ray Data's hash
shuffle gathers each key's rows in one of `LargeManifest.buckets` buckets (by a hash of the key), and
`sort_bucket` writes each bucket as a Parquet file of its keys, sorted and each once, under the run's
staging directory. Each such file (`SortedKeys`) is then a partition of this stage, paged through like a
listing: a key the manifest names twice, in one file or in two, is read once.

A partition's units are numbered `unit_id(partition, 0..n-1)`: a task that Ray retries forms the same units
again, and a later run forms units from what is still new.
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.ledger_index import CommittedShards
from pipeline.sources import Shard
from pipeline.sources.manifest import ManifestFile, manifest_pages
from pipeline.sources.walk import PAGE, Entry, Partition, Walker
from pipeline.storage import make_dirs, resolve_uri
from pipeline.units import Unit

STREAM_ABOVE = 100_000  # loose files: up to this many, the driver lists them and makes the units itself
STREAM_ABOVE_ENV = "VIT_EMBED_STREAM_ABOVE"  # sets it (e.g. 0: always list in workers)
PARTITION_BITS = 32  # a streamed unit's id: (partition + 1) << PARTITION_BITS | its number in the partition
BUCKET_BYTES = 8 * 2**20  # a large manifest's bytes per bucket (about a million keys, compressed)
MIN_BUCKETS, MAX_BUCKETS = 16, 4096


def stream_above() -> int:
    """Loose files above which the input is listed by the discover stage: STREAM_ABOVE, or the
    VIT_EMBED_STREAM_ABOVE environment variable."""
    value = os.environ.get(STREAM_ABOVE_ENV, "").strip()
    return int(value) if value else STREAM_ABOVE


def unit_id(partition: int, seq: int) -> int:
    return (partition + 1) << PARTITION_BITS | seq


def partition_of(unit: int) -> int | None:
    """The listing partition of a streamed unit; None for the units the driver made."""
    return (unit >> PARTITION_BITS) - 1 if unit >> PARTITION_BITS else None


@dataclass(frozen=True)
class PartitionReport:
    partition: int
    units: int  # units made of the partition so far, numbered 0..units-1 (earlier laps' included)
    shards: int  # files in this lap's units
    skipped_shards: int  # files this lap found already committed
    skipped_rows: int
    # True when the lap stopped because its round was full: the partition's next lap lists the files
    # after `resume` (None: from the partition's start).
    more: bool = False
    resume: str | None = None


@dataclass(frozen=True)
class Lap:
    """What one discover task lists of a partition in one round of the run (pipeline/rounds.py): its files
    after `partition.after`, as units numbered from `seq`, for as long as the round has room."""

    partition: Partition | SortedKeys
    seq: int = 0


Grant = Callable[[int, int, int], bool]  # (partition, unit number, files) → may the round take that unit


def always(partition: int, seq: int, files: int) -> bool:
    return True


class DiscoverUnits:
    """The stage's callable: a batch of `partition` objects → `unit` batches, one unit each. `report` is
    called once per partition, after its last unit (in a run, it hands the report to the driver). `grant`
    is asked before each unit is gathered, with the most files it can hold: False ends the lap there (the
    round is full; pipeline/rounds.py)."""

    def __init__(
        self,
        input_uri: str,
        files_per_unit: int,
        committed: CommittedShards,
        report: Callable[[PartitionReport], None] = lambda r: None,
        grant: Grant = always,
    ) -> None:
        self.walker = Walker(input_uri)
        self.files_per_unit = files_per_unit
        self.committed, self.report, self.grant = committed, report, grant

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """`partition` holds Laps (or Partitions, listed whole) to list, or Units the driver made, which pass
        through."""
        for item in batch["partition"]:
            if isinstance(item, Unit):
                units: Iterator[Unit] = iter([item])
            elif isinstance(item, Lap):
                units = self.units(item.partition, item.seq)
            else:
                units = self.units(item)
            for unit in units:
                yield {"unit": np.array([unit], dtype=object)}

    def units(self, partition: Partition | SortedKeys, seq: int = 0) -> Iterator[Unit]:
        """The partition's files after `partition.after` that are not committed, in units numbered from
        `seq`, for as long as `grant` allows; the report then says where the next lap resumes."""
        pending: list[Shard] = []
        shards, skipped, skipped_rows = 0, 0, 0
        last = partition.after  # the last file passed, committed or taken
        if isinstance(partition, SortedKeys):
            pages = partition.pages(self.walker)
        else:
            pages = self.walker.pages(partition)
        for page in pages:
            done, rows = self.committed.done_in([rel for _, rel, _ in page])
            for (path, rel, size), d, r in zip(page, done, rows, strict=True):
                if d:  # counted as it is passed: a lap that stops mid-page leaves the rest to the next
                    skipped, skipped_rows, last = skipped + 1, skipped_rows + int(r), rel
                    continue
                if not pending and not self.grant(partition.id, seq, self.files_per_unit):
                    report = PartitionReport(partition.id, seq, shards, skipped, skipped_rows, True, last)
                    self.report(report)
                    return
                pending.append(Shard(path=path, rel=rel, kind="file", size=size))
                last = rel
                if len(pending) == self.files_per_unit:
                    yield Unit(unit_id(partition.id, seq), tuple(pending))
                    seq, shards, pending = seq + 1, shards + len(pending), []
        if pending:
            yield Unit(unit_id(partition.id, seq), tuple(pending))
            seq, shards = seq + 1, shards + len(pending)
        self.report(PartitionReport(partition.id, seq, shards, skipped, skipped_rows))


# --------------------------------------------------------------------------------------------------------
# Large manifests: read in workers, gathered into buckets of sorted keys


@dataclass(frozen=True)
class LargeManifest:
    """A manifest too large for the driver: its data files, read by workers, and how many buckets its
    keys are gathered into."""

    files: tuple[ManifestFile, ...]
    buckets: int

    @classmethod
    def of(cls, files: list[ManifestFile]) -> LargeManifest:
        size = sum(f.size for f in files)
        return cls(tuple(files), max(MIN_BUCKETS, min(MAX_BUCKETS, math.ceil(size / BUCKET_BYTES))))


def bucket_of(rel: str, buckets: int) -> int:
    return zlib.crc32(rel.encode()) % buckets


class ManifestBuckets:
    """A batch of `file` objects (ManifestFile) → tables of (bucket, rel, size), a page at a time; the
    manifest's refusals (keys of another bucket, or outside the input) raise an InputError."""

    def __init__(self, input_uri: str, list_uri: str, buckets: int) -> None:
        self.input_uri, self.list_uri, self.buckets = input_uri, list_uri, buckets

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[pa.Table]:
        for file in batch["file"]:
            for page in manifest_pages(self.input_uri, self.list_uri, [file]):
                yield pa.table(
                    {
                        "bucket": pa.array([bucket_of(rel, self.buckets) for _, rel, _ in page], pa.int32()),
                        "rel": [rel for _, rel, _ in page],
                        "size": pa.array([size for _, _, size in page], pa.int64()),
                    }
                )


@dataclass(frozen=True)
class SortedKeys:
    """One bucket of a large manifest: a Parquet file of (rel, size), sorted by rel, each rel once; a
    partition of the discover stage."""

    id: int  # the bucket
    uri: str  # the file
    keys: int
    after: str | None = None  # only the rels after this one (a later lap of the partition)

    def pages(self, walker: Walker, size: int = PAGE) -> Iterator[list[Entry]]:
        fs, path = resolve_uri(self.uri)
        file = pq.ParquetFile(path, filesystem=fs)
        groups = list(range(file.metadata.num_row_groups))
        if self.after is not None:  # from the first row group that holds a rel after it (its statistics)
            column = file.schema_arrow.get_field_index("rel")
            stats = [file.metadata.row_group(g).column(column).statistics for g in groups]
            groups = [
                g
                for g, st in zip(groups, stats, strict=True)
                if not (st and st.has_min_max) or st.max > self.after
            ]
        for batch in file.iter_batches(batch_size=size, row_groups=groups, columns=["rel", "size"]):
            if self.after is not None:
                batch = batch.filter(pc.greater(batch.column(0), self.after))
            rels, sizes = batch.column(0).to_pylist(), batch.column(1).to_pylist()
            if rels:
                yield [(walker.path(rel), rel, size) for rel, size in zip(rels, sizes, strict=True)]


def sort_bucket(table: pa.Table, scratch: str) -> pa.Table:
    """Ray Data's `map_groups` function: all rows of one bucket → its SortedKeys file under `scratch` (a
    directory URI), written again identically when a task is retried; returns (bucket, uri, keys)."""
    bucket = int(table["bucket"][0].as_py())
    table = table.select(["rel", "size"]).sort_by([("rel", "ascending"), ("size", "descending")])
    rels = table["rel"]
    if table.num_rows > 1:  # sorted: a key named more than once is a run of equal rels; keep the first
        repeat = pc.equal(rels.slice(1), rels.slice(0, table.num_rows - 1))
        table = table.filter(pa.concat_arrays([pa.array([True]), pc.invert(repeat).combine_chunks()]))
    uri = f"{scratch.rstrip('/')}/bucket-{bucket:05d}.parquet"
    fs, path = resolve_uri(uri)
    make_dirs(fs, path.rsplit("/", 1)[0])
    pq.write_table(table, path, filesystem=fs, row_group_size=65_536)
    return pa.table({"bucket": [bucket], "uri": [uri], "keys": [table.num_rows]})
