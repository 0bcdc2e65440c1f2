"""The driver's commit loop: which units of work are complete, staging them, recording them, placing them.

Every row carries its `unit` (a tar or Parquet shard, or a group of loose files) and, on the unit's last
row only, `unit_rows` = how many rows the unit has. Write tasks report one `Part` per unit per batch. A
unit is complete when the rows of its parts add up to its total. Every `interval_s`, complete units are
staged as one file each, named in a commit record (the commit point, pipeline/ledger.py), and then moved
into place. A crash before the record leaves nothing visible (the next run removes the staging); a crash
after it leaves staged files that the next run moves into place. A reader never sees a row that is later
removed, and no key is ever written twice.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.ledger import RunLedger, UnitRecord
from pipeline.sink import Part

log = logging.getLogger(__name__)

# Fault injection for tests: "<point>:<n>" kills this process the n-th time <point> is reached.
CRASH_ENV = "VIT_EMBED_CRASH_AT"
_hits: dict[str, int] = {}


def crash_point(point: str) -> None:
    """SIGKILLs this process at the n-th time `point` is reached, when VIT_EMBED_CRASH_AT="point:n"."""
    spec = os.environ.get(CRASH_ENV, "")
    if not spec.startswith(point + ":"):
        return
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] == int(spec.rsplit(":", 1)[1]):
        log.warning("fault injection: killing the driver at %s #%d", point, _hits[point])
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class UnitWork:
    """What the commit loop needs to know of a unit before its rows arrive."""

    shards: list[str]  # input shard rels in this unit
    replaces: str | None = None  # --retry-errors: the committed data file whose rows this unit replaces
    drop: tuple[str, ...] = ()  # --retry-errors: keys of that file being retried (replaced or removed)


def shard_counts(work: UnitWork, parts: list[Part]) -> dict[str, tuple[int, int]]:
    """(rows, errors) per input shard of a unit, added up over its parts."""
    shards: dict[str, tuple[int, int]] = {rel: (0, 0) for rel in work.shards}
    for part in parts:
        for rel, (r, e) in part.shards.items():
            r0, e0 = shards[rel]
            shards[rel] = (r0 + r, e0 + e)
    return shards


@dataclass
class _Unit:
    work: UnitWork
    parts: list[Part] = field(default_factory=list)
    written: int = 0
    total: int = -1  # -1 until the part with the unit's last row arrives

    @property
    def complete(self) -> bool:
        return self.total >= 0 and self.written == self.total


@dataclass
class CommitStats:
    rows: int = 0
    errors: int = 0
    files: int = 0
    commits: int = 0
    retried: int = 0  # committed error rows that were read and embedded again
    seconds: dict[str, float] = field(default_factory=dict)  # stage → seconds, summed over workers


class Committer:
    """Feed it parts with `add` and call `tick` often; it commits complete units every `interval_s`
    seconds and at `finish`.

    `stage(units)` turns complete units into UnitRecords whose staged files are ready to move (merging
    parts, in parallel); `move(records)` moves them into place; `check()` raises when this run may no
    longer commit (its output lease was lost). The ledger's record is written between the two.
    """

    def __init__(
        self,
        units: dict[int, UnitWork],
        ledger: RunLedger,
        stage: Callable[[list[tuple[UnitWork, list[Part]]]], list[UnitRecord]],
        move: Callable[[list[UnitRecord], list[list[Part]]], None],
        interval_s: float = 10.0,
        check: Callable[[], None] = lambda: None,
    ) -> None:
        self.units = {u: _Unit(work) for u, work in units.items()}
        self.ledger, self.stage, self.move, self.check = ledger, stage, move, check
        self.interval_s = interval_s
        self.stats = CommitStats()
        self.moving = False  # True from a commit record until its files are in place
        self._last = time.monotonic()

    def add(self, part: Part) -> None:
        unit = self.units[part.unit]
        unit.parts.append(part)
        unit.written += part.rows
        for stage, sec in part.seconds.items():
            self.stats.seconds[stage] = self.stats.seconds.get(stage, 0.0) + sec
        if part.unit_rows >= 0:
            unit.total = part.unit_rows
        if unit.written > unit.total >= 0:
            raise RuntimeError(f"unit {part.unit} got {unit.written} rows, more than its {unit.total}")
        crash_point("part")
        self.tick()

    def tick(self) -> None:
        """Commits the complete units when `interval_s` has passed since the last commit."""
        if time.monotonic() - self._last >= self.interval_s:
            self.commit()

    def commit(self) -> None:
        ready = {u: unit for u, unit in self.units.items() if unit.complete}
        if not ready:
            return
        self.check()
        with_rows = [unit for unit in ready.values() if unit.parts or unit.work.replaces]
        empty = [unit for unit in ready.values() if not (unit.parts or unit.work.replaces)]
        records = self.stage([(unit.work, unit.parts) for unit in with_rows])
        records += [UnitRecord(None, None, {rel: (0, 0) for rel in unit.work.shards}) for unit in empty]
        crash_point("staged")  # staged, not recorded: the next run removes it
        self.moving = True
        self.ledger.record_commit(records)
        crash_point("recorded")  # recorded, not moved: the next run moves it into place
        self.move(records, [unit.parts for unit in with_rows])
        self.moving = False
        crash_point("committed")
        for u, unit in ready.items():
            self.stats.rows += unit.written
            self.stats.errors += sum(p.errors for p in unit.parts)
            self.stats.retried += len(unit.work.drop)
            del self.units[u]
        self.stats.files += sum(1 for r in records if r.file is not None)
        self.stats.commits += 1
        self._last = time.monotonic()

    def finish(self) -> None:
        """Commits what is complete; units that produced no row at all (e.g. an empty tar) count as done."""
        for unit in self.units.values():
            if not unit.parts:
                unit.total = 0
        self.commit()
        if self.units:
            lost = {u: (unit.written, unit.total) for u, unit in list(self.units.items())[:5]}
            raise RuntimeError(f"the pipeline ended with incomplete units (written, total): {lost}")
