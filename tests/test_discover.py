"""Streamed planning: listing partitions → units in workers (pipeline/discover.py), and whole runs on it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from pipeline.config import JobConfig
from pipeline.discover import STREAM_ABOVE_ENV, DiscoverUnits, PartitionReport, partition_of, unit_id
from pipeline.embed import FakeEmbedPatches
from pipeline.ledger import Ledger
from pipeline.ledger_index import SHARDS_SCHEMA, CommittedShards, Index
from pipeline.plan import plan
from pipeline.run import run
from pipeline.sample import encode, photo_like
from pipeline.sources import walk as walk_module
from pipeline.sources.walk import Walker, explore
from tests.conftest import job_env, small_config
from tests.ray_head import RayHead

REPO = Path(__file__).resolve().parents[1]
FAKE = {"embedding_dim": 192, "num_classes": 1000}


def _images(root: Path, names: list[str], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(encode(photo_like(rng, 40, 30)))


def _names(dirs: int, per_dir: int, tag: str = "") -> list[str]:
    return [f"d{d:02d}/{tag}{i:03d}.jpg" for d in range(dirs) for i in range(per_dir)]


def _committed(tmp_path: Path, counts: dict[str, int]) -> CommittedShards:
    records = pa.table(
        {
            "rel": list(counts),
            "rows": list(counts.values()),
            "errors": [0] * len(counts),
            "file": ["part-x.parquet"] * len(counts),
        },
        schema=SHARDS_SCHEMA,
    )
    return CommittedShards(Index(str(tmp_path / "out")), records)


def _discover(src: Path, committed: CommittedShards, per_unit: int = 4):
    reports: list[PartitionReport] = []
    stage = DiscoverUnits(str(src), per_unit, committed, report=reports.append)
    partitions = explore(Walker(str(src)), target=3).partitions
    units = [u for p in partitions for u in stage.units(p)]
    return units, reports, partitions


def test_units_are_formed_the_same_way_every_time_and_skip_committed_files(tmp_path: Path):
    src = tmp_path / "in"
    _images(src, _names(5, 7))
    nothing = CommittedShards(Index(str(tmp_path / "out")))
    first, reports, partitions = _discover(src, nothing)
    again, _, _ = _discover(src, nothing)
    assert first == again
    rels = [s.rel for u in first for s in u.shards]
    assert sorted(rels) == sorted(_names(5, 7)) and len(set(rels)) == len(rels)
    assert len({u.id for u in first}) == len(first)
    assert all(partition_of(u.id) in {p.id for p in partitions} for u in first)
    assert sum(r.units for r in reports) == len(first) and sum(r.shards for r in reports) == 35

    done = {rel: 1 for rel in rels[::3]}
    later, reports, _ = _discover(src, _committed(tmp_path, done))
    assert sorted(s.rel for u in later for s in u.shards) == sorted(set(rels) - set(done))
    assert sum(r.skipped_shards for r in reports) == len(done) == sum(r.skipped_rows for r in reports)


def test_new_removed_and_renamed_files_between_runs(tmp_path: Path):
    src = tmp_path / "in"
    _images(src, _names(4, 6))
    nothing = CommittedShards(Index(str(tmp_path / "out")))
    units, _, _ = _discover(src, nothing)
    committed = _committed(tmp_path, {s.rel: 1 for u in units for s in u.shards})
    _images(src, _names(4, 2, tag="new-"), seed=1)  # new files in every directory
    (src / "d01" / "000.jpg").unlink()  # removed
    (src / "d02" / "001.jpg").rename(src / "d02" / "renamed.jpg")  # renamed: a new key
    (src / "d09").mkdir()
    _images(src, ["d09/x.jpg"], seed=2)  # a new directory
    units, reports, _ = _discover(src, committed)
    todo = sorted(s.rel for u in units for s in u.shards)
    assert todo == sorted([*_names(4, 2, tag="new-"), "d02/renamed.jpg", "d09/x.jpg"])
    assert sum(r.skipped_shards for r in reports) == 4 * 6 - 2


def test_unit_ids_of_partitions_never_meet_the_drivers_units():
    assert partition_of(5) is None and partition_of(unit_id(0, 0)) == 0
    assert partition_of(unit_id(300, 2**31)) == 300 and unit_id(0, 0) > 10**9


def _config(src: Path, out: Path, **kw) -> JobConfig:
    return small_config(src, out, batch_size=8, commit_interval_s=0, **kw)


def _keys(out: Path) -> list[str]:
    return pads.dataset(str(out), format="parquet").to_table(columns=["key"])["key"].to_pylist()


@pytest.mark.integration
@pytest.mark.slow
def test_a_streamed_run_then_reruns_write_every_key_once(tmp_path: Path, ray_local: None, monkeypatch):
    monkeypatch.setenv(STREAM_ABOVE_ENV, "0")  # list in workers whatever the size
    monkeypatch.setattr(walk_module, "EXPLORE_FILES", 8)  # some directories are left whole to a worker
    src, out = tmp_path / "in", tmp_path / "out"
    _images(src, _names(6, 10))
    (src / "bad.jpg").write_bytes(b"not an image")
    job = plan(_config(src, out))
    assert job.partitions and not job.shards
    summary = run(_config(src, out), embedder=FakeEmbedPatches, embedder_kwargs=FAKE)
    expected = sorted([*_names(6, 10), "bad.jpg"])
    assert sorted(_keys(out)) == expected
    assert summary.processed == 61 and summary.errors == 1 and summary.skipped == 0

    _images(src, _names(6, 3, tag="new-"), seed=1)
    (src / "d00" / "000.jpg").rename(src / "d00" / "moved.jpg")
    _images(src, ["bad.jpg"], seed=3)  # fixed: --retry-errors re-reads it though the input is streamed
    summary = run(_config(src, out, retry_errors=True), embedder=FakeEmbedPatches, embedder_kwargs=FAKE)
    assert summary.processed == 20 and summary.retried == 1, summary
    assert summary.skipped_shards == 60 and summary.skipped == 60
    table = pads.dataset(str(out), format="parquet").to_table(columns=["key", "error"])
    keys = table["key"].to_pylist()
    assert len(keys) == len(set(keys)), "no key twice"
    assert set(keys) == {*expected, *_names(6, 3, tag="new-"), "d00/moved.jpg"}
    assert table["error"].null_count == table.num_rows, "the error row was replaced"
    first_run = sorted(out.glob("_runs/*/run.json"))[0].parent
    assert not list(first_run.glob("commit-*.json")) and Ledger.read(str(out)).index.segments, "folded"


def killed_job(
    head: RayHead, src: Path, out: Path, crash_at: str, **env: str
) -> tuple[list[str], dict[str, str], list[str]]:
    """`python jobs/embed.py` on `head` with a tiny model, committing every unit at once, killed at
    VIT_EMBED_CRASH_AT=`crash_at`: its command line and environment (without the crash), and the keys
    its output shows."""
    env = job_env(head, **env)
    small = ["--model", "vit_ti_16", "--weights", "random", "--image-size", "32", "--batch-size", "8"]
    cmd = [sys.executable, str(REPO / "jobs" / "embed.py"), "--input", str(src), "--output", str(out), *small]
    crashed = subprocess.run(
        [*cmd, "--commit-interval", "0"],
        env={**env, "VIT_EMBED_CRASH_AT": crash_at},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert crashed.returncode == -9, crashed.stderr[-3000:]
    return cmd, env, _keys(out) if list(out.glob("*.parquet")) else []


@pytest.mark.integration
@pytest.mark.slow
def test_a_driver_killed_while_the_listing_streams_then_rerun_writes_every_key_once(
    tmp_path: Path, ray_cluster: RayHead, ray_local: None, monkeypatch
):
    src, out = tmp_path / "in", tmp_path / "out"
    names = _names(12, 20)
    _images(src, names)
    # A driver on the tests' Ray cluster, killed at its second commit while partitions are still listed.
    _, _, seen = killed_job(ray_cluster, src, out, "recorded:2", **{STREAM_ABOVE_ENV: "0"})
    assert len(seen) == len(set(seen)) and len(seen) < len(names), "the crash came before the end"
    monkeypatch.setenv(STREAM_ABOVE_ENV, "0")
    summary = run(_config(src, out), embedder=FakeEmbedPatches, embedder_kwargs=FAKE)
    final = _keys(out)
    assert sorted(final) == sorted(names), "rows lost or written twice"
    assert summary.skipped > 0 and summary.processed + summary.skipped == len(names)


@pytest.mark.integration
@pytest.mark.slow
def test_a_discover_task_that_dies_mid_listing_is_retried_and_every_key_is_written_once(
    tmp_path: Path, ray_local: None, monkeypatch
):
    """Ray runs the task again; the retry forms the same units, and none is read or committed twice."""
    src, out, marker = tmp_path / "in", tmp_path / "out", tmp_path / "died-once"
    names = _names(3, 12)
    _images(src, names)

    class DiesOnce(DiscoverUnits):  # defined in the test: Ray pickles it by value
        def units(self, partition, seq=0):
            for n, unit in enumerate(super().units(partition, seq)):
                if n == 2 and not marker.exists():
                    marker.touch()
                    os._exit(1)  # the worker process dies after its partition's first two units
                yield unit

    monkeypatch.setenv(STREAM_ABOVE_ENV, "0")
    monkeypatch.setattr("pipeline.run.DiscoverUnits", DiesOnce)
    monkeypatch.setattr("pipeline.run.files_per_unit", lambda n, slots: 3)
    summary = run(_config(src, out), embedder=FakeEmbedPatches, embedder_kwargs=FAKE)
    assert marker.exists(), "the fault was injected"
    keys = _keys(out)
    assert sorted(keys) == sorted(names), "rows lost or written twice"
    assert summary.processed == len(names)


def test_the_threshold_decides_between_the_driver_and_workers(tmp_path: Path, monkeypatch):
    src = tmp_path / "in"
    _images(src, _names(5, 4))
    monkeypatch.setattr(walk_module, "EXPLORE_FILES", 3)  # the exploration cannot see the whole tree
    for limit, streamed in (("19", True), ("20", False), ("1000", False), ("0", True)):
        monkeypatch.setenv(STREAM_ABOVE_ENV, limit)
        job = plan(_config(src, tmp_path / "out"))
        assert bool(job.partitions) == streamed and len(job.shards) == (0 if streamed else 20), limit
    monkeypatch.setenv(STREAM_ABOVE_ENV, "5")
    (src / "a.tar").write_bytes(b"")  # first in name order: --format auto sees it and the driver refuses
    with pytest.raises(Exception, match="mixes"):
        plan(_config(src, tmp_path / "out"))


def test_an_input_that_cannot_be_explored_is_worded_by_the_listing_and_a_bug_is_not_hidden(
    tmp_path: Path, monkeypatch
):
    from pipeline import plan as plan_module

    with pytest.raises(Exception, match="nowhere"):  # missing: the driver's listing words it
        plan(_config(tmp_path / "nowhere", tmp_path / "out"))
    src = tmp_path / "in"
    _images(src, _names(2, 2))

    def broken(_walker):
        raise TypeError("a bug in exploring")

    monkeypatch.setattr(plan_module, "explore", broken)
    with pytest.raises(TypeError, match="a bug in exploring"):
        plan(_config(src, tmp_path / "out"))
