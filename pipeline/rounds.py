"""The run in rounds: one Ray Data execution per round, each over at most `round_objects()` input objects.

Ray Data keeps the statistics of every block an execution makes until the execution ends, and Ray's core
worker keeps bookkeeping of its own: a few hundred bytes of driver memory per image, which over a billion
images is more than any head node has. So a run goes in rounds. A round is one execution of the pipeline
(pipeline/run.py `build_dataset`) over

- a slice of the units the driver made (pipeline/units.py), in order, and
- a lap of some of the listing partitions (pipeline/discover.py `Lap`): a discover task lists a
  partition's files after its `after` key and stops after `quota` units, reporting the last file it took
  (`PartitionReport.resume`). The partition's next lap, in a later round, lists the files after that one,
  numbering its units on from where the last lap stopped, so a run's unit ids never repeat.

The commit loop runs across rounds; at the end of a round every unit it made is committed (`Committer.
finish`), the execution's state is freed, and the model actors start again in the next round (seconds,
against the minutes a round of a million images takes on a GPU).

A run with fewer objects than the bound is one round, as a run always was. Objects are counted as they are
known before reading: a loose file is one, a tar or Parquet shard its bytes / SHARD_IMAGE_BYTES.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

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


def objects_in(unit: Unit) -> int:
    """The input objects a unit stands for: its loose files, and its shards by their bytes."""
    return sum(1 if s.kind == "file" else max(1, s.size // SHARD_IMAGE_BYTES) for s in unit.shards)


@dataclass(frozen=True)
class Round:
    number: int  # 1, 2, …
    units: list[Unit]  # units the driver made
    laps: list[Lap]  # partitions for the discover stage to list


class Rounds:
    """The rounds of a run, one at a time: `next()` gives the next round (None when nothing is left), and
    `reported()` takes the reports of its laps, which say which partitions go on in a later round."""

    def __init__(
        self,
        units: Sequence[Unit],
        partitions: Iterable[Partition | SortedKeys],
        files_per_unit: int,
        bound: int | None,
    ) -> None:
        self.units = deque(units)
        # Last partition first: where names grow with time (dates, sequence numbers), a rerun's new files
        # are in the last directories, and reach the model without waiting for the committed ones to be
        # listed and skipped.
        self.waiting: deque[Lap] = deque(Lap(p) for p in reversed(list(partitions)))
        self.files_per_unit, self.bound = files_per_unit, bound
        self.count = 0

    def next(self) -> Round | None:
        if not self.units and not self.waiting:
            return None
        self.count += 1
        if self.bound is None:  # everything at once
            everything = Round(self.count, list(self.units), list(self.waiting))
            self.units, self.waiting = deque(), deque()
            return everything
        units: list[Unit] = []
        taken = 0
        while self.units and (not units or taken + objects_in(self.units[0]) <= self.bound):
            unit = self.units.popleft()
            units.append(unit)
            taken += objects_in(unit)
        laps: list[Lap] = []
        if self.waiting and (taken < self.bound or not units):
            # Units this round may still make: spread over as many partitions as there are units, so a
            # round of few large partitions lists each for longer, and one of many lists one unit of each.
            room = max(1, math.ceil((self.bound - taken) / self.files_per_unit))
            listed = min(len(self.waiting), room)
            quota = max(1, room // listed)
            laps = [dataclasses.replace(self.waiting.popleft(), quota=quota) for _ in range(listed)]
        return Round(self.count, units, laps)

    def reported(self, laps: Sequence[Lap], reports: Iterable[PartitionReport]) -> None:
        """The laps of the round just finished, and their reports: a lap that stopped at its quota goes on
        in a later round from the file after the last it took."""
        by_partition = {r.partition: r for r in reports}
        for lap in laps:
            report = by_partition[lap.partition.id]
            if report.resume is not None:
                partition = dataclasses.replace(lap.partition, after=report.resume)
                self.waiting.append(Lap(partition, seq=report.units))
