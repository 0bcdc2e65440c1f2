"""The driver's commit loop: complete units are staged, recorded, then moved into place.

Every `interval_s`, the complete units (pipeline/units.py) are staged as one file each, named in a commit
record (the commit point, pipeline/ledger.py), and then moved into place. A crash before the record leaves
nothing visible (the next run removes the staging); a crash after it leaves staged files that the next run
moves into place. A reader never sees a row that is later removed, and no key is ever written twice.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from pipeline.discover import partition_of
from pipeline.ledger import RunLedger, UnitRecord
from pipeline.units import Part, Progress, Unit

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

    Units are given up front or per round (`begin_round`: those the driver made) or, for units the discover
    stage makes while the run goes on (pipeline/discover.py), learnt from their parts; `finish`, at the end
    of every round, checks those against the number of units each listing partition reported.

    `stage(units)` turns complete units into UnitRecords whose staged files are ready to move (merging
    parts, in parallel); `move(records, parts)` moves them into place; `check()` raises when this run may
    no longer commit (its output lease was lost). The ledger's record is written between the two.
    """

    def __init__(
        self,
        units: Iterable[Unit],
        ledger: RunLedger,
        stage: Callable[[list[Progress]], list[UnitRecord]],
        move: Callable[[list[UnitRecord], list[list[Part]]], None],
        interval_s: float = 10.0,
        check: Callable[[], None] = lambda: None,
    ) -> None:
        self.units = {unit.id: Progress(unit) for unit in units}
        self.ledger, self.stage, self.move, self.check = ledger, stage, move, check
        self.interval_s = interval_s
        self.stats = CommitStats()
        self.moving = False  # True from a commit record until its files are in place
        self.committed_ids: set[int] = set()  # streamed units committed: a part for one again is a bug
        self.per_partition: Counter[int] = Counter()  # streamed units committed per listing partition
        self._last = time.monotonic()

    def begin_round(self, units: Iterable[Unit]) -> None:
        """A new round of the run (pipeline/rounds.py) with the units the driver made for it: from now on,
        parts come from this round's units alone (the last round's were all committed by `finish`)."""
        self.units.update((unit.id, Progress(unit)) for unit in units)
        self.committed_ids.clear()

    def add(self, part: Part) -> None:
        progress = self.units.get(part.unit)
        if progress is None:
            if partition_of(part.unit) is None or part.unit in self.committed_ids:
                raise RuntimeError(f"a part of unit {part.unit}, which is committed or was never made")
            progress = self.units[part.unit] = Progress(Unit(part.unit, ()))  # a streamed unit
        progress.add(part)
        for stage, sec in part.seconds.items():
            self.stats.seconds[stage] = self.stats.seconds.get(stage, 0.0) + sec
        crash_point("part")
        self.tick()

    def tick(self) -> None:
        """Commits the complete units when `interval_s` has passed since the last commit."""
        if time.monotonic() - self._last >= self.interval_s:
            self.commit()

    def commit(self) -> None:
        ready = {u: p for u, p in self.units.items() if p.complete}
        if not ready:
            return
        self.check()
        with_rows = [p for p in ready.values() if p.parts or p.unit.replaces]
        empty = [p for p in ready.values() if not (p.parts or p.unit.replaces)]
        records = self.stage(with_rows)
        records += [UnitRecord(None, None, {rel: (0, 0) for rel in p.unit.rels}) for p in empty]
        crash_point("staged")  # staged, not recorded: the next run removes it
        self.moving = True
        self.ledger.record_commit(records)
        crash_point("recorded")  # recorded, not moved: the next run moves it into place
        self.move(records, [p.parts for p in with_rows])
        self.moving = False
        crash_point("committed")
        for u, p in ready.items():
            self.stats.rows += p.written
            self.stats.errors += sum(part.errors for part in p.parts)
            self.stats.retried += len(p.unit.drop)
            partition = partition_of(u)
            if partition is not None:
                self.committed_ids.add(u)
                self.per_partition[partition] += 1
            del self.units[u]
        self.stats.files += sum(1 for r in records if r.file is not None)
        self.stats.commits += 1
        self._last = time.monotonic()

    def finish(self, streamed: Mapping[int, int] | None = None) -> None:
        """Commits what is complete; units that produced no row at all (e.g. an empty tar) count as done.
        `streamed`: listing partition → units the discover stage made of it, all of which must be committed
        by now."""
        for p in self.units.values():
            if not p.parts:
                p.total = 0
        self.commit()
        if self.units:
            lost = {u: (p.written, p.total) for u, p in list(self.units.items())[:5]}
            raise RuntimeError(f"the pipeline ended with incomplete units (written, total): {lost}")
        missing = {
            k: (n, self.per_partition[k]) for k, n in (streamed or {}).items() if self.per_partition[k] != n
        }
        if missing:
            raise RuntimeError(
                f"the pipeline ended before every listed unit arrived (partition: made, committed): {missing}"
            )
