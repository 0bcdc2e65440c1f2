"""A run in rounds (pipeline/rounds.py): bounded slices of the driver's units, partitions listed in laps that
resume where the last stopped, and whole runs in several rounds that write every key once."""

from __future__ import annotations

import ctypes
import platform
import subprocess
import sys
import weakref
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.discover import (
    STREAM_ABOVE_ENV,
    DiscoverUnits,
    SortedKeys,
    partition_of,
    sort_bucket,
)
from pipeline.embed import FakeEmbedPatches
from pipeline.ledger_index import SHARDS_SCHEMA, CommittedShards, Index
from pipeline.rounds import (
    ROUND_OBJECTS,
    ROUND_OBJECTS_ENV,
    RoundBox,
    Rounds,
    objects_in,
    release_memory,
    round_objects,
)
from pipeline.run import run
from pipeline.sources import Shard
from pipeline.sources import walk as walk_module
from pipeline.sources.walk import Partition, Walker, explore
from pipeline.units import Unit
from tests.conftest import small_config
from tests.ray_head import RayHead
from tests.test_discover import FAKE, _images, _keys, _names, killed_job


def _files(n: int, start: int = 0) -> tuple[Shard, ...]:
    return tuple(
        Shard(path=f"/x/{i}.jpg", rel=f"{i}.jpg", kind="file", size=10) for i in range(start, start + n)
    )


def test_the_bound_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(ROUND_OBJECTS_ENV, raising=False)
    assert round_objects() == ROUND_OBJECTS
    monkeypatch.setenv(ROUND_OBJECTS_ENV, "2500")
    assert round_objects() == 2500
    monkeypatch.setenv(ROUND_OBJECTS_ENV, "0")
    assert round_objects() is None


def _private_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's malloc_trim"
)
def test_a_rounds_end_gives_freed_memory_back_to_the_system():
    class Cycle:
        def __init__(self) -> None:
            self.me = self

    cycle = Cycle()
    alive = weakref.ref(cycle)
    del cycle
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    chunks = [libc.malloc(4096) for _ in range(25_000)]  # 100 MiB in the C heap, below mmap's threshold
    for chunk in chunks:
        ctypes.memset(chunk, 1, 4096)
    keep = libc.malloc(64)  # after them in the heap: free() cannot give back what lies below it
    for chunk in chunks:
        libc.free(chunk)
    before = _private_bytes()
    release_memory()
    after = _private_bytes()
    libc.free(keep)
    assert alive() is None, "a garbage cycle outlived the round"
    assert before - after > 50 * 2**20, f"{(before - after) / 2**20:.0f} MiB given back of 100 freed"


def test_the_drivers_units_go_in_slices_of_at_most_the_bound_in_order():
    units = [Unit(i, _files(4, 4 * i)) for i in range(10)]
    shard = Shard(path="/x/a.tar", rel="a.tar", kind="tar", size=20 * 64 * 1024)
    units.append(Unit(10, (shard,)))  # a shard counts by its bytes: 20 objects, over the bound alone
    assert objects_in(units[0]) == 4 and objects_in(units[10]) == 20
    rounds = Rounds(units, [], bound=10)
    seen = []
    while (r := rounds.next()) is not None:
        assert not r.laps
        assert sum(objects_in(u) for u in r.units) <= 10 or len(r.units) == 1
        seen.append([u.id for u in r.units])
    assert seen == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10]] and rounds.count == 6
    one = Rounds(units, [], bound=None)
    assert [u.id for u in one.next().units] == list(range(11)) and one.next() is None  # type: ignore[union-attr]


def _committed(tmp_path: Path, rels: list[str]) -> CommittedShards:
    records = pa.table(
        {
            "rel": rels,
            "rows": [1] * len(rels),
            "errors": [0] * len(rels),
            "file": ["part-x.parquet"] * len(rels),
        },
        schema=SHARDS_SCHEMA,
    )
    return CommittedShards(Index(str(tmp_path / "out")), records)


def _run_laps(stage_of, partitions, bound: int, per_unit: int, units=(), retried: bool = False):
    """Rounds driven as a run drives them, with the discover stage and its RoundBox in this process: the
    units of every round. `retried`: every lap runs twice, as a task Ray retries (the second's units are
    checked against the first's and kept)."""
    box = RoundBox()
    stage = stage_of(box.add, box.grant)
    rounds = Rounds(list(units), partitions, bound, per_unit)
    made: list[list[Unit]] = []
    while (r := rounds.next()) is not None:
        # Every partition in the first round; later, twice as many as the room holds units at most.
        assert len(r.laps) <= (len(partitions) if r.number == 1 else 2 * -(-(r.room or 0) // per_unit))
        box.open(r.room)
        this = list(r.units)
        for lap in r.laps:
            once = list(stage.units(lap.partition, lap.seq))
            if retried:
                assert list(stage.units(lap.partition, lap.seq)) == once, "a retried lap forms the same units"
            this += once
        assert len(box.take()) == len(r.laps)
        made.append(this)
        rounds.reported(r.laps, box.take())
    return made


def test_partitions_are_listed_in_laps_that_resume_after_the_last_file_taken(tmp_path: Path):
    src = tmp_path / "in"
    names = [
        *_names(3, 10),
        *(f"d01/sub/{i:02d}.jpg" for i in range(7)),
        *(f"flat/{i:03d}.jpg" for i in range(40)),
    ]
    _images(src, names)
    walker = Walker(str(src))
    partitions = explore(walker, target=3).partitions
    assert any(p.recursive for p in partitions)
    done = sorted(names)[::5]
    committed = _committed(tmp_path, done)

    def stage(report, grant):
        return DiscoverUnits(str(src), 3, committed, report=report, grant=grant)

    whole = [u for p in partitions for u in stage(lambda r: None, lambda *a: True).units(p)]
    made = _run_laps(stage, partitions, bound=7, per_unit=3, retried=True)
    assert len(made) > 3, "several rounds"
    assert all(sum(len(u.shards) for u in this) <= 7 for this in made), "a round stays within its bound"
    assert all(made), "every round makes progress"
    every = [u for this in made for u in this]
    rels = [s.rel for u in every for s in u.shards]
    assert Counter(rels) == Counter(set(names) - set(done)), "every new file once, none committed"
    assert len({u.id for u in every}) == len(every)
    for p in partitions:  # a partition's units are numbered on across its laps, in listing order
        mine = [u for u in every if partition_of(u.id) == p.id]
        assert [u.id & 0xFFFFFFFF for u in mine] == list(range(len(mine)))
        assert [s.rel for u in mine for s in u.shards] == [
            s.rel for u in whole if partition_of(u.id) == p.id for s in u.shards
        ]


def test_laps_over_a_manifests_buckets_resume_too(tmp_path: Path):
    rels = [f"k/{i:05d}.jpg" for i in range(0, 3000, 7)]
    table = pa.table(
        {"bucket": pa.array([0] * len(rels), pa.int32()), "rel": rels[::-1], "size": [1] * len(rels)}
    )
    row = sort_bucket(table, str(tmp_path / "scratch")).to_pylist()[0]
    bucket = SortedKeys(0, row["uri"], row["keys"])
    committed = _committed(tmp_path, rels[10:20])

    def stage(report, grant):
        return DiscoverUnits(str(tmp_path / "in"), 16, committed, report=report, grant=grant)

    made = _run_laps(stage, [bucket], bound=100, per_unit=16)
    assert len(made) == 5 and all(len(this) == 6 for this in made[:-1]), "six units of 16 in 100 files"
    got = [s.rel for this in made for u in this for s in u.shards]
    assert got == [r for r in rels if r not in set(rels[10:20])]
    later = SortedKeys(0, row["uri"], row["keys"], after=rels[200])
    assert [e[1] for page in later.pages(Walker(str(tmp_path / "in")), size=50) for e in page] == rels[201:]


@pytest.mark.parametrize(
    "after", ["d01/", "d01", "d01/005.jpg", "d01/sub/", "d01/sub/03.jpg", "d0", "e", "", "a"]
)
def test_a_local_tree_listed_after_a_key_holds_exactly_the_files_after_it(tmp_path: Path, after: str):
    src = tmp_path / "in"
    names = [*_names(3, 10), *(f"d01/sub/{i:02d}.jpg" for i in range(7)), "d01.jpg", "d01/sub.jpg"]
    _images(src, names)
    walker = Walker(str(src))
    got = [e[1] for page in walker.pages(Partition(0, "", True, after=after or None), size=4) for e in page]
    assert got == sorted(n for n in names if n > after)


# ---- whole runs in rounds


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "driver"])
def test_a_run_in_rounds_writes_every_key_once_and_a_rerun_only_the_new(
    tmp_path: Path, ray_local: None, monkeypatch, streamed: bool
):
    src, out = tmp_path / "in", tmp_path / "out"
    names = _names(4, 9)
    _images(src, names)
    monkeypatch.setenv(STREAM_ABOVE_ENV, "0" if streamed else "1000000")
    monkeypatch.setenv(ROUND_OBJECTS_ENV, "10")
    monkeypatch.setattr(walk_module, "EXPLORE_FILES", 4)  # some directories are left whole to a worker
    monkeypatch.setattr("pipeline.run.files_per_unit", lambda n, slots: 3)
    monkeypatch.setattr("pipeline.units.files_per_unit", lambda n, slots: 3)
    config = small_config(src, out, batch_size=8, commit_interval_s=0)
    summary = run(config, embedder=FakeEmbedPatches, embedder_kwargs=FAKE)
    assert summary.rounds >= 3 and "rounds" in summary.describe(), summary
    assert summary.processed == len(names) and sorted(_keys(out)) == sorted(names)

    _images(src, _names(4, 2, tag="new-"), seed=1)
    summary = run(config, embedder=FakeEmbedPatches, embedder_kwargs=FAKE)
    assert summary.processed == 8 and summary.skipped == len(names), summary
    keys = _keys(out)
    assert len(keys) == len(set(keys)) and set(keys) == {*names, *_names(4, 2, tag="new-")}


@pytest.mark.integration
@pytest.mark.slow
def test_a_driver_killed_in_a_later_round_then_rerun_writes_every_key_once(
    tmp_path: Path, ray_cluster: RayHead, ray_local: None
):
    src, out = tmp_path / "in", tmp_path / "out"
    names = _names(6, 20)
    _images(src, names)
    # Rounds of 40 objects (a unit holds 256 files at least, so a round is one unit of each of a few
    # partitions); killed at the third commit, after the first round.
    cmd, env, seen = killed_job(
        ray_cluster, src, out, "recorded:3", **{STREAM_ABOVE_ENV: "0", ROUND_OBJECTS_ENV: "40"}
    )
    assert len(seen) == len(set(seen)) and 0 < len(seen) < len(names), "the crash came mid-run"
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(_keys(out)) == sorted(names), "rows lost or written twice"


def test_a_local_tree_listed_after_a_key_does_not_enter_the_directories_before_it(
    tmp_path: Path, monkeypatch
):
    src = tmp_path / "in"
    _images(src, [*_names(4, 3), "d01/sub/x.jpg"])
    walker = Walker(str(src))
    listed: list[str] = []
    real = walker.list_dir
    monkeypatch.setattr(walker, "list_dir", lambda prefix, *a: listed.append(prefix) or real(prefix, *a))
    got = [e[1] for page in walker.pages(Partition(0, "", True, after="d01/sub/x.jpg")) for e in page]
    assert got == [*_names(4, 3)][6:] and listed == ["", "d01/", "d01/sub/", "d02/", "d03/"]


def test_the_round_box_grants_while_the_room_lasts_and_answers_a_retry_the_same():
    from pipeline.discover import PartitionReport

    box = RoundBox()
    box.open(10)
    assert box.grant(0, 0, 4) and box.grant(0, 1, 4)
    assert not box.grant(1, 0, 4), "8 + 4 files do not fit in 10"
    box.add(PartitionReport(0, 2, 5, 0, 0))  # its second unit held 1 file: 3 files of room come back
    assert box.grant(2, 0, 4), "5 + 4 fit"
    box.add(PartitionReport(0, 2, 5, 0, 0))  # a retried task's report gives nothing back again
    assert not box.grant(3, 0, 4) and not box.grant(1, 0, 4), "a question asked again gets its first answer"
    assert box.grant(2, 0, 4) and len(box.take()) == 1
    box.open(1)
    assert box.grant(5, 0, 4), "the first unit of a round is always granted"
    assert not box.grant(5, 1, 4) and not box.take()
