"""The commit loop and the ledger, without a cluster: units commit when complete, crashes leave no half."""

from __future__ import annotations

import numpy as np
import pyarrow.dataset as pads
import pytest

from pipeline.commit import Committer
from pipeline.ledger import Ledger, OutputConflictError, RunLedger
from pipeline.sink import OutputSpec, ParquetSink

SPEC = OutputSpec(4, 2)


def _rows(unit: int, shard: str, n: int, total: int = -1, start: int = 0) -> dict[str, np.ndarray]:
    return {
        "key": np.array([f"{shard}#{i}" for i in range(start, start + n)], dtype=object),
        "shard": np.array([shard] * n, dtype=object),
        "embedding": np.ones((n, 4), np.float32),
        "logits": np.ones((n, 2), np.float32),
        "error": np.array([None] * n, dtype=object),
        "unit": np.full(n, unit, np.int64),
        "unit_rows": np.full(n, total, np.int64),
    }


@pytest.fixture(autouse=True)
def _stop_heartbeats(monkeypatch):
    """Every RunLedger started here stops its heartbeat thread at the end of the test (it would otherwise
    keep rewriting heartbeat.json under the test's tmp_path, which later tests watch)."""
    started: list[RunLedger] = []
    original = RunLedger.start

    def start(self, record):
        started.append(self)
        original(self, record)

    monkeypatch.setattr(RunLedger, "start", start)
    yield
    for ledger in started:
        ledger.stop()


def _setup(tmp_path, units, interval_s=0.0, run_id="r1"):
    sink = ParquetSink(str(tmp_path), SPEC, run_id, {})
    ledger = RunLedger(str(tmp_path), run_id)
    ledger.start({"run_id": run_id, "identity": {"model": "m"}})
    committer = Committer(units, ledger, lambda us: [sink.place_unit(p) for p in us], interval_s=interval_s)
    return sink, committer


def _visible_keys(tmp_path) -> list[str]:
    """The keys a reader of the output directory sees (pyarrow.dataset skips `_` paths)."""
    if not list(tmp_path.glob("*.parquet")):
        return []
    return pads.dataset(str(tmp_path), format="parquet").to_table()["key"].to_pylist()


def test_a_unit_becomes_visible_only_when_all_its_rows_are_staged(tmp_path):
    sink, c = _setup(tmp_path, {0: ["a.tar"], 1: ["b.tar"]})
    for part in sink.write_parts(_rows(0, "a.tar", 3)):
        c.add(part)
    assert _visible_keys(tmp_path) == []  # unit 0's total is not known yet
    for part in sink.write_parts(_rows(1, "b.tar", 2, total=2)):
        c.add(part)
    assert sorted(_visible_keys(tmp_path)) == ["b.tar#0", "b.tar#1"]
    for part in sink.write_parts(_rows(0, "a.tar", 1, total=4, start=3)):
        c.add(part)
    assert len(_visible_keys(tmp_path)) == 6
    c.finish()
    assert c.stats.rows == 6 and c.stats.files == 2 and c.stats.commits == 2
    assert sorted(p.name for p in tmp_path.glob("*.parquet")) == [
        "part-r1-u000000.parquet",
        "part-r1-u000001.parquet",
    ]
    ledger = Ledger.read(str(tmp_path))
    assert ledger.done == {"a.tar": (4, 0), "b.tar": (2, 0)}
    assert ledger.files == {"part-r1-u000000.parquet", "part-r1-u000001.parquet"}


def test_commits_wait_for_the_interval(tmp_path):
    sink, c = _setup(tmp_path, {0: ["a"], 1: ["b"]}, interval_s=3600)
    for part in sink.write_parts(
        {k: np.concatenate([_rows(0, "a", 2, 2)[k], _rows(1, "b", 1, 1)[k]]) for k in _rows(0, "a", 1)}
    ):
        c.add(part)
    assert _visible_keys(tmp_path) == []
    c.finish()
    assert c.stats.commits == 1 and len(_visible_keys(tmp_path)) == 3


def test_a_unit_without_rows_is_done_at_the_end(tmp_path):
    _, c = _setup(tmp_path, {0: ["empty.tar"]})
    c.finish()
    assert Ledger.read(str(tmp_path)).done == {"empty.tar": (0, 0)}


def test_an_incomplete_unit_at_the_end_is_an_error_not_a_silent_loss(tmp_path):
    sink, c = _setup(tmp_path, {0: ["a.tar"]})
    for part in sink.write_parts(_rows(0, "a.tar", 2)):
        c.add(part)
    with pytest.raises(RuntimeError, match="incomplete units"):
        c.finish()


def test_more_rows_than_the_total_is_caught(tmp_path):
    sink, c = _setup(tmp_path, {0: ["a.tar"]}, interval_s=3600)
    for part in sink.write_parts(_rows(0, "a.tar", 2, total=2)):
        c.add(part)
    with pytest.raises(RuntimeError, match="more than"):
        for part in sink.write_parts(_rows(0, "a.tar", 1, total=2)):
            c.add(part)


def test_cleanup_removes_unrecorded_files_and_staging(tmp_path):
    sink, c = _setup(tmp_path, {0: ["a"], 1: ["b"]})
    for part in sink.write_parts(_rows(0, "a", 1, total=1)):
        c.add(part)  # committed and recorded
    # A placed file whose commit record was never written (the driver died in between) ...
    orphan = sink.place_unit(sink.write_parts(_rows(1, "b", 1, total=1)))
    # ... and a staged part of a unit still in flight.
    sink.write_parts(_rows(1, "b", 1))
    ledger = Ledger.read(str(tmp_path))
    assert set(ledger.done) == {"a"}
    removed = ledger.clean_uncommitted()
    assert orphan in removed and "_staging/" in removed
    assert _visible_keys(tmp_path) == ["a#0"]


def test_identity_conflict_names_the_difference(tmp_path):
    _setup(tmp_path, {0: ["a"]})
    ledger = Ledger.read(str(tmp_path))
    ledger.check_identity({"model": "m"})
    with pytest.raises(OutputConflictError, match="'m' there, 'other' now"):
        ledger.check_identity({"model": "other"})


def test_a_live_run_blocks_a_second_one_and_a_dead_one_does_not(tmp_path, monkeypatch):
    import json
    import os
    import socket
    import time

    beat = tmp_path / "_runs" / "other" / "heartbeat.json"
    beat.parent.mkdir(parents=True)

    def write(host: str, pid: int, age_s: float) -> Ledger:
        beat.write_text(json.dumps({"host": host, "pid": pid, "time": time.time() - age_s}))
        return Ledger.read(str(tmp_path))

    with pytest.raises(OutputConflictError, match="still writing"):
        write("elsewhere", 123, age_s=5).check_no_active_run()
    write("elsewhere", 123, age_s=3600).check_no_active_run()  # no heartbeat for an hour: it died
    write(socket.gethostname(), 2**22 + 7, age_s=1).check_no_active_run()  # this host, no such process
    with pytest.raises(OutputConflictError):
        write(socket.gethostname(), os.getpid(), age_s=1).check_no_active_run()
    (beat.parent / "summary.json").write_text("{}")  # a finished run never blocks
    Ledger.read(str(tmp_path)).check_no_active_run()


def test_the_run_heartbeat_is_written_and_stops(tmp_path):
    ledger = RunLedger(str(tmp_path), "r9")
    ledger.start({"run_id": "r9", "identity": {}})
    assert (tmp_path / "_runs" / "r9" / "heartbeat.json").exists()
    with pytest.raises(OutputConflictError):
        Ledger.read(str(tmp_path)).check_no_active_run()
    ledger.finish({"run_id": "r9"})
    Ledger.read(str(tmp_path)).check_no_active_run()
