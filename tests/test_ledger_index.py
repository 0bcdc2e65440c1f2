"""The ledger's index: commit records folded into sorted Parquet segments, read page by page."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from pipeline import ledger_index
from pipeline.ledger import Ledger, RunLedger, UnitRecord
from pipeline.ledger_index import INDEX_DIR, Index


def _commit(out: Path, run_id: str, units: dict[str, dict[str, tuple[int, int]]], replaces: bool = False):
    """Records one commit of `units` (data file → its shards' counts) and puts the files in place."""
    ledger = RunLedger(str(out), run_id)
    if not (out / "_runs" / run_id / "run.json").exists():
        ledger.start({"run_id": run_id, "identity": {"model": "m"}})
    ledger.seq = len(list((out / "_runs" / run_id).glob("commit-*.json")))
    ledger.record_commit([UnitRecord(f, f"_staging/{run_id}/{f}", s, replaces) for f, s in units.items()])
    for file in units:
        (out / file).touch()


def _fold(out: Path, run_id: str) -> Ledger:
    ledger = Ledger.read(str(out))
    ledger.recover()
    ledger.compact(run_id)
    return Ledger.read(str(out))


def _done(ledger: Ledger, rels: list[str]) -> dict[str, int]:
    done, rows = ledger.done_in(sorted(rels))
    return {rel: int(r) for rel, d, r in zip(sorted(rels), done, rows, strict=True) if d}


def test_folding_keeps_what_is_committed_and_removes_the_records(tmp_path: Path):
    _commit(tmp_path, "r1", {"part-1.parquet": {"a/1.jpg": (1, 0), "a/2.jpg": (1, 1)}})
    _commit(tmp_path, "r1", {"part-2.parquet": {"b.tar": (5, 0)}})
    before = Ledger.read(str(tmp_path))
    assert _done(before, ["a/1.jpg", "a/2.jpg", "b.tar", "c.tar"]) == {"a/1.jpg": 1, "a/2.jpg": 1, "b.tar": 5}

    after = _fold(tmp_path, "r2")
    assert not list((tmp_path / "_runs").rglob("commit-*.json")), "folded records are deleted"
    assert (tmp_path / "_runs" / "r1" / "run.json").exists(), "the run's identity stays"
    assert after.record_paths == [] and len(after.index.segments) == 1
    probe = ["a/1.jpg", "a/2.jpg", "b.tar", "c.tar"]
    assert _done(after, probe) == _done(before, probe)
    assert after.committed() == before.committed() == {"a/1.jpg": (1, 0), "a/2.jpg": (1, 1), "b.tar": (5, 0)}
    assert after.files == before.files
    assert after.files["part-1.parquet"] == ledger_index.FileEntry(2, "a/1.jpg", 2, 1)


def test_the_newest_entry_wins_across_segments_and_records(tmp_path: Path):
    _commit(tmp_path, "r1", {"part-1.parquet": {"x.tar": (3, 2)}})
    _fold(tmp_path, "r2")
    # --retry-errors replaced the file's rows: fewer errors now, in a record not yet folded
    _commit(tmp_path, "r2", {"part-1.parquet": {"x.tar": (3, 0)}}, replaces=True)
    ledger = Ledger.read(str(tmp_path))
    assert ledger.committed() == {"x.tar": (3, 0)} and ledger.files["part-1.parquet"].errors == 0
    ledger = _fold(tmp_path, "r3")
    assert ledger.committed() == {"x.tar": (3, 0)} and ledger.files["part-1.parquet"].errors == 0


def test_a_lost_file_in_a_segment_is_redone_and_its_redo_counts(tmp_path: Path):
    _commit(tmp_path, "r1", {"part-1.parquet": {"a": (1, 0)}, "part-2.parquet": {"b": (1, 0)}})
    _fold(tmp_path, "r2")
    (tmp_path / "part-1.parquet").unlink()
    ledger = Ledger.read(str(tmp_path))
    assert ledger.lost == ["part-1.parquet"] and _done(ledger, ["a", "b"]) == {"b": 1}
    _commit(tmp_path, "r2", {"part-3.parquet": {"a": (1, 0)}})  # the redo
    ledger = _fold(tmp_path, "r3")
    assert _done(ledger, ["a", "b"]) == {"a": 1, "b": 1}


def test_segments_merge_into_few_and_answers_match_a_plain_dict(tmp_path: Path):
    """Daily runs of random sizes, some redoing earlier shards: the index holds O(log n) segments and
    answers like a dict of the newest commit of each shard."""
    rng = random.Random(7)
    model: dict[str, int] = {}
    for day in range(30):
        run_id = f"r{day:03d}"
        units = {}
        for u in range(rng.randint(1, 4)):
            n = rng.randint(1, 40)
            rels = {f"d{rng.randint(0, 50):02d}/{rng.randint(0, 10**6):07d}.jpg" for _ in range(n)}
            units[f"part-{run_id}-{u}.parquet"] = {rel: (rng.randint(0, 3), 0) for rel in rels}
        _commit(tmp_path, run_id, units)
        for counts in units.values():
            model.update({rel: r for rel, (r, _) in counts.items()})
        ledger = _fold(tmp_path, f"r{day + 1:03d}")
    assert len(ledger.index.segments) <= 6, ledger.index.segments
    probe = sorted(model) + [f"d{i:02d}/missing.jpg" for i in range(50)]
    assert _done(ledger, probe) == model
    assert {rel: r for rel, (r, _) in ledger.committed().items()} == model


def test_a_page_reads_only_the_row_groups_its_names_fall_in(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(ledger_index, "ROW_GROUP_ROWS", 100)
    _commit(tmp_path, "r1", {"part-1.parquet": {f"k{i:05d}": (1, 0) for i in range(1000)}})
    ledger = _fold(tmp_path, "r2")
    reads = []
    original = Index._row_group
    monkeypatch.setattr(Index, "_row_group", lambda self, seg, i: reads.append(i) or original(self, seg, i))
    assert _done(ledger, ["k00150", "k00151", "k00999", "zzz"]) == {"k00150": 1, "k00151": 1, "k00999": 1}
    assert sorted(set(reads)) == [1, 9]


def test_a_fold_that_crashes_is_finished_by_the_next(tmp_path: Path, monkeypatch):
    _commit(tmp_path, "r1", {"part-1.parquet": {"a": (1, 0)}})
    expected = Ledger.read(str(tmp_path)).committed()

    # Crash after the segment is written, before index.json names it: the records still count.
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ledger_index, "write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        _fold(tmp_path, "r2")
    monkeypatch.undo()
    assert Ledger.read(str(tmp_path)).committed() == expected

    # Crash after index.json, before the folded records are deleted: readers skip them, no double count.
    monkeypatch.setattr(ledger_index.storage, "delete_file", crash)
    with pytest.raises(KeyboardInterrupt):
        _fold(tmp_path, "r3")
    monkeypatch.undo()
    ledger = Ledger.read(str(tmp_path))
    assert list((tmp_path / "_runs").rglob("commit-*.json")), "the record is still there"
    assert ledger.record_paths == [] and ledger.committed() == expected

    _commit(tmp_path, "r3", {"part-2.parquet": {"b": (1, 0)}})
    ledger = _fold(tmp_path, "r4")
    assert ledger.committed() == {**expected, "b": (1, 0)}
    assert not list((tmp_path / "_runs").rglob("commit-*.json"))
    names = {p.name for p in (tmp_path / INDEX_DIR).iterdir()}
    listed = json.loads((tmp_path / INDEX_DIR / "index.json").read_text())["segments"]
    assert names == {"index.json"} | {f"{s['name']}.{t}.parquet" for s in listed for t in ("shards", "files")}


def test_done_in_pages_give_the_same_answer(tmp_path: Path, monkeypatch):
    rels = [f"{i:06d}.jpg" for i in range(0, 3000, 3)]
    _commit(tmp_path, "r1", {"part-1.parquet": {rel: (1, 0) for rel in rels}})
    ledger = _fold(tmp_path, "r2")
    probe = [f"{i:06d}.jpg" for i in range(3000)]
    whole = ledger.done_in(probe)
    monkeypatch.setattr(ledger_index, "LOOKUP_PAGE", 7)
    paged = ledger.done_in(probe)
    assert np.array_equal(whole[0], paged[0]) and np.array_equal(whole[1], paged[1])
    assert int(whole[0].sum()) == 1000


def test_a_run_folds_its_own_records_at_its_end_and_keeps_them_until_the_next_fold(tmp_path: Path):
    from pipeline.ledger import compact_output

    _commit(tmp_path, "r1", {"part-1.parquet": {"a": (1, 0)}})
    compact_output(str(tmp_path), "r1-end")
    records = list((tmp_path / "_runs").rglob("commit-*.json"))
    assert len(records) == 1, "the run's records stay readable"
    ledger = Ledger.read(str(tmp_path))
    assert ledger.record_paths == [] and ledger.committed() == {"a": (1, 0)}, "and are not counted twice"
    _commit(tmp_path, "r2", {"part-2.parquet": {"b": (1, 0)}})
    ledger = _fold(tmp_path, "r3")
    assert not list((tmp_path / "_runs" / "r1").glob("commit-*.json"))
    assert ledger.committed() == {"a": (1, 0), "b": (1, 0)}
