"""The driver's commit loop: which units of work are complete, putting them in place, recording them.

Every row carries its `unit` (a tar or Parquet shard, or a group of loose files) and, on the unit's last
row only, `unit_rows` = how many rows the unit has. Write tasks report one `Part` per unit per batch. A
unit is complete when the rows of its parts add up to its total; complete units are placed (one file each,
see ParquetSink.place_unit) and then named in a commit record (pipeline/ledger.py). A crash at any point
leaves each unit either recorded, or not recorded and removed by the next run: never half, never twice.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.ledger import RunLedger
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


@dataclass
class _Unit:
    shards: list[str]  # input shard rels in this unit
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
    seconds: dict[str, float] = field(default_factory=dict)  # stage → seconds, summed over workers


class Committer:
    """Feed it parts with `add`; it commits complete units every `interval_s` seconds and at `finish`."""

    def __init__(
        self,
        units: dict[int, list[str]],
        ledger: RunLedger,
        place: Callable[[list[list[Part]]], list[str]],
        interval_s: float = 10.0,
    ) -> None:
        self.units = {u: _Unit(shards) for u, shards in units.items()}
        self.ledger, self.place, self.interval_s = ledger, place, interval_s
        self.stats = CommitStats()
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
        if time.monotonic() - self._last >= self.interval_s:
            self.commit()

    def commit(self) -> None:
        ready = {u: unit for u, unit in self.units.items() if unit.complete}
        if not ready:
            return
        files = self.place([unit.parts for unit in ready.values() if unit.parts])
        crash_point("placed")  # files are visible, the record is not written yet
        shards: dict[str, tuple[int, int]] = {rel: (0, 0) for unit in ready.values() for rel in unit.shards}
        for unit in ready.values():
            for part in unit.parts:
                for rel, (r, e) in part.shards.items():
                    r0, e0 = shards[rel]
                    shards[rel] = (r0 + r, e0 + e)
        self.ledger.record_commit(files, shards)
        crash_point("committed")
        for u, unit in ready.items():
            self.stats.rows += unit.written
            self.stats.errors += sum(p.errors for p in unit.parts)
            del self.units[u]
        self.stats.files += len(files)
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
