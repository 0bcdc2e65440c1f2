"""The run in rounds: one Ray Data execution per round, each over at most `round_objects()` input objects.

Within one execution the driver holds what the execution has made and not yet finished: the discover stage
lists far ahead of reading, and every unit it has formed is a small object that Ray keeps in the driver
(objects under 100 KiB live in their owner's process), with a copy in each task waiting for a CPU to read
it; Ray Data's statistics of the execution's blocks too. Over a billion images that is more than any head
node has, so a run goes in rounds. A round is one execution of the pipeline
(pipeline/run.py `build_dataset`) over

- a slice of the units the driver made (pipeline/units.py), in order, and
- a lap of each listing partition still waiting (pipeline/discover.py `Lap`), when the slice leaves room:
  a discover task lists a partition's files after its `after` key and asks the round's `RoundBox` actor
  before gathering each unit; when the round is full it stops, reporting the last file it passed
  (`PartitionReport.resume`). The partition's next lap, in a later round, lists the files after that one,
  numbering its units on from where the last lap stopped, so a run's unit ids never repeat.

The commit loop runs across rounds; at the end of a round every unit it made is committed (`Committer.
finish`), the execution's state is freed, and the model actors start again in the next round (seconds,
against the minutes a round of a million images takes on a GPU).

A run with fewer objects than the bound is one round, as a run always was. Objects are counted as they are
known before reading: a loose file is one, a tar or Parquet shard its bytes / SHARD_IMAGE_BYTES.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import os
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline.discover import Lap, PartitionReport, SortedKeys
from pipeline.sources.walk import Partition
from pipeline.units import Unit

ROUND_OBJECTS = 1_000_000  # input objects per round
ROUND_OBJECTS_ENV = "VIT_EMBED_ROUND_OBJECTS"  # sets it; 0: the whole run in one round
SHARD_IMAGE_BYTES = 64 * 1024  # a tar or Parquet shard counts as one object per this many bytes


def round_objects() -> int | None:
    """Input objects per round: ROUND_OBJECTS, or the VIT_EMBED_ROUND_OBJECTS environment variable; None
    (no bound) when that is 0."""
    value = os.environ.get(ROUND_OBJECTS_ENV, "").strip()
    bound = int(value) if value else ROUND_OBJECTS
    return bound if bound > 0 else None


def release_memory() -> None:
    """Gives what a finished round freed back to the system: Python's garbage cycles, then the C heap's free
    pages (glibc's `malloc_trim`; nothing elsewhere). The round's execution has freed its state, but glibc
    keeps freed pages in its heaps for later allocations, which land among them: over 19 rounds of 16,000
    files (benchmarks/scale.py's full run) the driver's private memory after each round went 426 → 438 MiB
    without the trim and 403 → 411 MiB with it."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # AttributeError: not glibc
        ctypes.CDLL(None).malloc_trim(0)


def objects_in(unit: Unit) -> int:
    """The input objects a unit stands for: its loose files, and its shards by their bytes."""
    return sum(1 if s.kind == "file" else max(1, s.size // SHARD_IMAGE_BYTES) for s in unit.shards)


@dataclass(frozen=True)
class Round:
    number: int  # 1, 2, …
    units: list[Unit]  # units the driver made
    laps: list[Lap]  # partitions for the discover stage to list
    room: int | None  # files the laps may take (None: all there are)


class Rounds:
    """The rounds of a run, one at a time: `next()` gives the next round (None when nothing is left), and
    `reported()` takes the reports of its laps, which say which partitions go on in a later round.

    A round that has room left after the driver's units has a lap of every partition not listed yet, and of
    up to twice as many partitions known to hold more new files (`resumed`) as the room holds units; the
    laps share the room (`RoundBox.grant`, asked before each unit is gathered). So a rerun's partitions
    without new files all finish in its first round, and a round of a few large partitions lists each for
    longer, while few laps are started only to find the round full."""

    def __init__(
        self,
        units: Sequence[Unit],
        partitions: Iterable[Partition | SortedKeys],
        bound: int | None,
        files_per_unit: int = 1,
    ) -> None:
        self.units = deque(units)
        # Last partition first: where names grow with time (dates, sequence numbers), a rerun's new files
        # are in the last directories, and reach the model without waiting for the committed ones to be
        # listed and skipped.
        self.fresh: deque[Lap] = deque(Lap(p) for p in reversed(list(partitions)))
        self.resumed: deque[Lap] = deque()
        self.bound, self.files_per_unit = bound, files_per_unit
        self.count = 0

    def next(self) -> Round | None:
        if not self.units and not self.fresh and not self.resumed:
            return None
        self.count += 1
        if self.bound is None:  # everything at once
            everything = Round(self.count, list(self.units), [*self.fresh, *self.resumed], None)
            self.units, self.fresh, self.resumed = deque(), deque(), deque()
            return everything
        units: list[Unit] = []
        taken = 0
        while self.units and (not units or taken + objects_in(self.units[0]) <= self.bound):
            unit = self.units.popleft()
            units.append(unit)
            taken += objects_in(unit)
        laps: list[Lap] = []
        room = max(0, self.bound - taken)
        if (self.fresh or self.resumed) and (room or not units):
            laps, self.fresh = list(self.fresh), deque()
            more = max(1, 2 * -(-room // self.files_per_unit))
            while self.resumed and more:
                laps.append(self.resumed.popleft())
                more -= 1
        return Round(self.count, units, laps, room)

    def reported(self, laps: Sequence[Lap], reports: Iterable[PartitionReport]) -> None:
        """The laps of the round just finished, and their reports: a lap that stopped because the round was
        full goes on in a later round from the file after the last it passed."""
        by_partition = {r.partition: r for r in reports}
        for lap in laps:
            report = by_partition[lap.partition.id]
            if report.more:
                partition = dataclasses.replace(lap.partition, after=report.resume)
                self.resumed.append(Lap(partition, seq=report.units))


class RoundBox:
    """A Ray actor's class, shared by a round's discover tasks: the room left in the round, and the
    partition reports (one per partition; a retried task's replaces its first) for the driver to take at
    the round's end."""

    def __init__(self) -> None:
        self.reports: dict[int, PartitionReport] = {}
        self.room: int | None = None
        self.granted = 0
        self.answers: dict[tuple[int, int], bool] = {}
        self.reserved: dict[int, int] = {}  # partition → files granted to its lap

    def open(self, room: int | None) -> None:
        """A new round, whose laps may take `room` files (None: all there are)."""
        self.room, self.granted, self.answers, self.reports, self.reserved = room, 0, {}, {}, {}

    def grant(self, partition: int, seq: int, files: int) -> bool:
        """May the round take unit `seq` of `partition`, of up to `files` files? Always the first unit asked
        for (a round makes progress); then while the room lasts. The same question gets the same answer: a
        retried task forms the same units as its first attempt."""
        key = (partition, seq)
        if key not in self.answers:
            fits = self.room is None or self.granted == 0 or self.granted + files <= self.room
            self.answers[key] = fits
            if fits:
                self.granted += files
                self.reserved[partition] = self.reserved.get(partition, 0) + files
        return self.answers[key]

    def add(self, report: PartitionReport) -> None:
        """A lap's report; the room its units did not fill (a partition's last unit is seldom full) goes
        back to the round, once (a retried task reports the same)."""
        if report.partition not in self.reports:
            self.granted -= self.reserved.get(report.partition, 0) - report.shards
        self.reports[report.partition] = report

    def take(self) -> list[PartitionReport]:
        return list(self.reports.values())


def send_report(box: Any, report: PartitionReport) -> None:
    """Hands a partition report to a RoundBox actor and waits for it to be taken (a task's calls still in
    flight when it ends could be lost)."""
    import ray

    ray.get(box.add.remote(report))


def ask_grant(box: Any, partition: int, seq: int, files: int) -> bool:
    """`RoundBox.grant`, asked of the round's actor."""
    import ray

    return ray.get(box.grant.remote(partition, seq, files))
