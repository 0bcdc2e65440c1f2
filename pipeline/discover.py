"""The discover stage: listing partitions → units of the loose files not yet committed, in workers.

Inputs too large to list on the driver (more than STREAM_ABOVE loose files) are listed by this stage, one
Ray Data task per listing partition (pipeline/sources/walk.py). A task lists its partition in sorted pages,
asks the ledger which of a page's files are committed (pipeline/ledger_index.py reads only the index row
groups the page falls in), and groups the rest, in listing order, into units of `files_per_unit` files,
which go on to the read+decode stage as soon as they are formed. The driver holds no key: only the
partitions and one report per partition (`PartitionReport`, how many units it made and what it skipped),
which the commit loop checks against the units it committed.

A partition's units are numbered `unit_id(partition, 0..n-1)`: a task that Ray retries forms the same units
again, and a later run forms units from what is still new.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from pipeline.ledger_index import CommittedShards
from pipeline.sources import Shard
from pipeline.sources.walk import Partition, Walker
from pipeline.units import Unit

STREAM_ABOVE = 100_000  # loose files: up to this many, the driver lists them and makes the units itself
STREAM_ABOVE_ENV = "VIT_EMBED_STREAM_ABOVE"  # sets it (e.g. 0: always list in workers)
PARTITION_BITS = 32  # a streamed unit's id: (partition + 1) << PARTITION_BITS | its number in the partition


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
    units: int  # units made, numbered 0..units-1
    shards: int  # files in them
    skipped_shards: int  # files already committed
    skipped_rows: int


class DiscoverUnits:
    """The stage's callable: a batch of `partition` objects → `unit` batches, one unit each. `report` is
    called once per partition, after its last unit (in a run, it hands the report to the driver)."""

    def __init__(
        self,
        input_uri: str,
        files_per_unit: int,
        committed: CommittedShards,
        report: Callable[[PartitionReport], None] = lambda r: None,
    ) -> None:
        self.walker = Walker(input_uri)
        self.files_per_unit = files_per_unit
        self.committed, self.report = committed, report

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """`partition` holds Partitions to list, or Units the driver made, which pass through."""
        for item in batch["partition"]:
            for unit in [item] if isinstance(item, Unit) else self.units(item):
                yield {"unit": np.array([unit], dtype=object)}

    def units(self, partition: Partition) -> Iterator[Unit]:
        pending: list[Shard] = []
        seq = shards = skipped = skipped_rows = 0
        for page in self.walker.pages(partition):
            done, rows = self.committed.done_in([rel for _, rel, _ in page])
            skipped += int(done.sum())
            skipped_rows += int(rows.sum())
            for (path, rel, size), d in zip(page, done, strict=True):
                if d:
                    continue
                pending.append(Shard(path=path, rel=rel, kind="file", size=size))
                if len(pending) == self.files_per_unit:
                    yield Unit(unit_id(partition.id, seq), tuple(pending))
                    seq, shards, pending = seq + 1, shards + len(pending), []
        if pending:
            yield Unit(unit_id(partition.id, seq), tuple(pending))
            seq, shards = seq + 1, shards + len(pending)
        self.report(PartitionReport(partition.id, seq, shards, skipped, skipped_rows))
