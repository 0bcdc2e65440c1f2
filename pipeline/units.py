"""Units of work: the inputs that are read, committed and skipped together.

A tar or Parquet shard is a unit alone; loose files share units of MIN_FILES_PER_UNIT to
MAX_FILES_PER_UNIT files. One task reads and decodes a unit, and the unit becomes one output file. Its rows
carry `unit` (the unit's id) and, on its last batch only, `unit_rows` (the unit's row count; -1 on the
others). The write stage reports a `Part` per unit per write call; the unit is complete when its parts'
rows add up to `unit_rows` (`Progress`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline.sources import Shard

MIN_FILES_PER_UNIT = 256
MAX_FILES_PER_UNIT = 4096
# Ray Data notices a finished task only every ~0.1 s, so short tasks leave their CPU idle: a unit is as
# large as the input allows while keeping UNITS_PER_SLOT tasks per task slot, for balance.
UNITS_PER_SLOT = 4


@dataclass(frozen=True)
class Unit:
    """One unit of work; `replaces` and `drop` are set on the units of --retry-errors."""

    id: int
    shards: tuple[Shard, ...]
    replaces: str | None = None  # the committed data file whose rows this unit replaces
    drop: tuple[str, ...] = ()  # keys of that file being retried (replaced, or removed when a shard's error)

    @property
    def rels(self) -> list[str]:
        return [s.rel for s in self.shards]


def files_per_unit(num_files: int, task_slots: float) -> int:
    """Loose files per unit: UNITS_PER_SLOT units per task slot, within [MIN, MAX]_FILES_PER_UNIT."""
    per_unit = math.ceil(num_files / max(1.0, UNITS_PER_SLOT * task_slots))
    return max(MIN_FILES_PER_UNIT, min(MAX_FILES_PER_UNIT, per_unit))


def make_units(shards: list[Shard], task_slots: float = 1.0, retry: Sequence[Unit] = ()) -> list[Unit]:
    """Loose files in groups of files_per_unit, then each tar or Parquet shard alone, then the `retry`
    units (--retry-errors, pipeline/plan.py); numbered 0, 1, … in that order."""
    files = [s for s in shards if s.kind == "file"]
    n = files_per_unit(len(files), task_slots)
    groups = [tuple(files[i : i + n]) for i in range(0, len(files), n)]
    groups += [(s,) for s in shards if s.kind != "file"]
    units = [Unit(i, group) for i, group in enumerate(groups)]
    return units + [dataclasses.replace(u, id=len(units) + i) for i, u in enumerate(retry)]


def tag_rows(unit: Unit, batches: Iterator[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    """The unit's row batches with `unit`, `unit_rows` (the unit's row count on its last batch, which is
    held back one step for that; -1 elsewhere) and `read_s` (each row's share of the time its batch took
    to read)."""
    held, total = None, 0
    while True:
        start = time.perf_counter()
        rows = next(batches, None)
        if rows is None:
            break
        n = len(rows["key"])
        total += n
        rows["unit"] = np.full(n, unit.id, np.int64)
        rows["unit_rows"] = np.full(n, -1, np.int64)
        rows["read_s"] = np.full(n, (time.perf_counter() - start) / n)
        if held is not None:
            yield held
        held = rows
    if held is not None:
        held["unit_rows"][:] = total
        yield held


@dataclass(frozen=True)
class Part:
    """One staged data file: rows of a single unit, written by one write call."""

    staged: str  # path in the output's filesystem, under _staging/<run_id>/
    unit: int
    rows: int
    errors: int
    unit_rows: int  # the unit's row count when this part holds its last row, else -1
    shards: dict[str, tuple[int, int]]  # input shard rel → (rows, errors) in this part
    seconds: dict[str, float] = field(default_factory=dict)  # stage → seconds spent on these rows


@dataclass
class Progress:
    """The parts of one unit that have arrived, and whether they are all of it."""

    unit: Unit
    parts: list[Part] = field(default_factory=list)
    written: int = 0
    total: int = -1  # -1 until the part with the unit's last row arrives

    def add(self, part: Part) -> None:
        self.parts.append(part)
        self.written += part.rows
        if part.unit_rows >= 0:
            self.total = part.unit_rows
        if self.written > self.total >= 0:
            raise RuntimeError(f"unit {part.unit} got {self.written} rows, more than its {self.total}")

    @property
    def complete(self) -> bool:
        return self.total >= 0 and self.written == self.total

    def shard_counts(self) -> dict[str, tuple[int, int]]:
        """(rows, errors) per input shard of the unit, added up over its parts."""
        counts: dict[str, tuple[int, int]] = {rel: (0, 0) for rel in self.unit.rels}
        for part in self.parts:  # a streamed unit (pipeline/discover.py) is known by its parts' shards
            for rel, (r, e) in part.shards.items():
                r0, e0 = counts.get(rel, (0, 0))
                counts[rel] = (r0 + r, e0 + e)
        return counts
