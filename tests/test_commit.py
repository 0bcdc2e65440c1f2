"""The commit loop and the ledger, without a cluster: units commit when complete, crashes leave no half."""

from __future__ import annotations

import numpy as np
import pyarrow.dataset as pads
import pytest

from pipeline.commit import Committer
from pipeline.ledger import Ledger, OutputConflictError, RunLedger
from pipeline.ledger_index import FileEntry
from pipeline.sink import OutputSpec, ParquetSink
from pipeline.sources import Shard
from pipeline.units import Unit

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


def _setup(tmp_path, units, interval_s=0.0, run_id="r1"):
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.run import _mover, _stager

    sink = ParquetSink(str(tmp_path), SPEC, run_id, {})
    ledger = RunLedger(str(tmp_path), run_id)
    ledger.start({"run_id": run_id, "identity": {"model": "m"}})
    committer = Committer(
        [Unit(u, tuple(Shard(rel, rel, "file", 0) for rel in rels)) for u, rels in units.items()],
        ledger,
        _stager(sink, Ledger.read(str(tmp_path)), remote=False),
        _mover(sink, ThreadPoolExecutor(2)),
        interval_s=interval_s,
    )
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
    assert ledger.committed() == {"a.tar": (4, 0), "b.tar": (2, 0)}
    assert ledger.files == {
        "part-r1-u000000.parquet": FileEntry(1, "a.tar", 4, 0),
        "part-r1-u000001.parquet": FileEntry(1, "b.tar", 2, 0),
    }
    assert not list((tmp_path / "_staging").rglob("*.parquet")), "merged parts are deleted once placed"


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
    assert Ledger.read(str(tmp_path)).committed() == {"empty.tar": (0, 0)}


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


def test_recovery_removes_unrecorded_files_and_staging(tmp_path):
    sink, c = _setup(tmp_path, {0: ["a"], 1: ["b"]})
    for part in sink.write_parts(_rows(0, "a", 1, total=1)):
        c.add(part)  # committed and recorded
    # A file put in place without a record (only a hand-made or foreign file can be: the commit loop
    # records before it moves) ...
    orphan = sink.place_unit(sink.write_parts(_rows(1, "b", 1, total=1)))
    # ... and a staged part of a unit still in flight.
    sink.write_parts(_rows(1, "b", 1))
    ledger = Ledger.read(str(tmp_path))
    assert set(ledger.committed()) == {"a"}
    removed = ledger.recover()
    assert orphan in removed and "_staging/" in removed
    assert _visible_keys(tmp_path) == ["a#0"]


def test_a_recorded_unit_is_moved_into_place_by_the_next_run(tmp_path, monkeypatch):
    """The record is the commit point: a crash after it and before the move leaves the file staged, and
    the next run's recovery moves it into place instead of redoing (or losing) the unit."""
    sink, c = _setup(tmp_path, {0: ["a.tar"]}, interval_s=3600)
    for part in sink.write_parts(_rows(0, "a.tar", 2)) + sink.write_parts(_rows(0, "a.tar", 1, 3, start=2)):
        c.add(part)

    def crash(records, parts):
        raise KeyboardInterrupt

    c.move = crash
    with pytest.raises(KeyboardInterrupt):
        c.finish()
    assert c.moving and _visible_keys(tmp_path) == []  # readers see nothing yet
    ledger = Ledger.read(str(tmp_path))
    assert ledger.committed() == {"a.tar": (3, 0)} and len(ledger.pending) == 1
    ledger.recover()
    assert sorted(_visible_keys(tmp_path)) == ["a.tar#0", "a.tar#1", "a.tar#2"]
    again = Ledger.read(str(tmp_path))
    assert again.pending == [] and again.committed() == {"a.tar": (3, 0)}
    assert not (tmp_path / "_staging").exists()


def test_a_committed_file_deleted_by_hand_is_redone(tmp_path):
    sink, c = _setup(tmp_path, {0: ["a"], 1: ["b"]})
    for part in sink.write_parts(_rows(0, "a", 1, total=1)) + sink.write_parts(_rows(1, "b", 1, total=1)):
        c.add(part)
    (tmp_path / sink.final_name(0)).unlink()
    ledger = Ledger.read(str(tmp_path))
    assert set(ledger.committed()) == {"b"} and ledger.lost == [sink.final_name(0)]


def test_identity_conflict_names_the_difference(tmp_path):
    _setup(tmp_path, {0: ["a"]})
    ledger = Ledger.read(str(tmp_path))
    ledger.check_identity({"model": "m"})
    with pytest.raises(OutputConflictError, match="'m' there, 'other' now"):
        ledger.check_identity({"model": "other"})


def test_the_seed_of_random_weights_is_part_of_the_identity(tmp_path):
    RunLedger(str(tmp_path), "r1").start({"run_id": "r1", "identity": {"model": "m", "seed": "0"}})
    ledger = Ledger.read(str(tmp_path))
    ledger.check_identity({"model": "m", "seed": "0"})
    with pytest.raises(OutputConflictError, match="seed: '0' there, '1' now"):
        ledger.check_identity({"model": "m", "seed": "1"})
    RunLedger(str(tmp_path / "old"), "r0").start({"run_id": "r0", "identity": {"model": "m"}})
    Ledger.read(str(tmp_path / "old")).check_identity({"model": "m", "seed": "1"})  # not recorded then
