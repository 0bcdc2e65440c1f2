"""Crashes and faults: SIGKILL of the driver at several points then a re-run, a killed model actor, a
removed worker node. After recovery every input key is in the output exactly once."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest

from pipeline.config import JobConfig
from pipeline.embed import FakeEmbedPatches
from pipeline.run import run
from pipeline.sample import encode, photo_like
from tests.conftest import job_env, small_config
from tests.ray_head import RayHead

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
SMALL = ["--model", "vit_ti_16", "--weights", "random", "--image-size", "32", "--batch-size", "4"]
FAKE = {"embedding_dim": 192, "num_classes": 1000}


def _tar_shards(root: Path, shards: int, per_shard: int) -> set[str]:
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    keys = set()
    for s in range(shards):
        with tarfile.open(root / f"shard-{s:03d}.tar", "w") as tf:
            for i in range(per_shard):
                data = encode(photo_like(rng, 40, 30))
                info = tarfile.TarInfo(f"s{i:04d}.jpg")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
                keys.add(f"shard-{s:03d}.tar#s{i:04d}")
    return keys


def _keys(out: Path) -> list[str]:
    if not list(out.glob("*.parquet")):
        return []
    return pads.dataset(str(out), format="parquet").to_table(columns=["key"])["key"].to_pylist()


def _small_config(src: Path, out: Path, batch_size: int) -> JobConfig:
    """The tests' job in-process: a tiny model at 32 px, a commit after every part."""
    return small_config(src, out, batch_size=batch_size, commit_interval_s=0)


def _job(cwd: Path, head: RayHead, *args: str, crash_at: str) -> subprocess.CompletedProcess:
    """The job as a user runs it, a driver on the tests' Ray cluster (`head`), killed at `crash_at`."""
    env = job_env(head, VIT_EMBED_CRASH_AT=crash_at)
    where = ["--input", str(cwd / "in"), "--output", str(cwd / "out")]  # absolute: the workers' cwd differs
    cmd = [sys.executable, str(REPO / "jobs" / "embed.py"), *where, *SMALL, *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("crash_at", ["part:1", "staged:1", "recorded:1", "recorded:3"])
def test_sigkill_of_the_driver_then_rerun_gives_every_key_once(
    tmp_path: Path, crash_at: str, ray_cluster: RayHead, ray_local: None
):
    """part: a part reported, nothing committed; staged: a commit's files staged, not recorded; recorded:
    the commit record written, the files not moved into place yet; recorded:3: a later commit interrupted,
    after two complete ones (the state right after a commit's moves). Whatever a reader saw after the
    crash is still there after the rerun, unchanged: no reader ever sees a row that is later removed."""
    expected = _tar_shards(tmp_path / "in", shards=5, per_shard=3)
    crashed = _job(tmp_path, ray_cluster, "--commit-interval", "0", crash_at=crash_at)
    assert crashed.returncode == -9, crashed.stderr[-3000:]
    seen = _keys(tmp_path / "out")
    assert len(seen) == len(set(seen)), "duplicates after a crash"
    visible = {p.name: p.read_bytes() for p in (tmp_path / "out").glob("*.parquet")}
    # The same command again (in this process, on the tests' Ray: the job's own start-up is not under test).
    summary = run(_small_config(tmp_path / "in", tmp_path / "out", batch_size=4))
    final = _keys(tmp_path / "out")
    assert sorted(final) == sorted(expected), "rows lost or written twice"
    assert summary.processed + summary.skipped == len(expected)
    assert all((tmp_path / "out" / name).read_bytes() == data for name, data in visible.items())
    if crash_at in ("recorded:1", "recorded:3"):
        assert summary.skipped > 0, "committed units must not be redone"
    assert not (tmp_path / "out" / "_staging").exists()


def test_a_killed_model_actor_is_replaced_and_no_row_is_lost(tmp_path: Path, ray_local: None):
    src, out, marker = tmp_path / "in", tmp_path / "out", tmp_path / "killed-once"
    expected = _tar_shards(src, shards=4, per_shard=5)

    class DiesOnce(FakeEmbedPatches):  # defined in the test: Ray pickles it by value
        def __call__(self, batch):
            if not marker.exists():
                marker.touch()
                os._exit(1)  # the actor's process dies mid-batch
            return super().__call__(batch)

    cfg = _small_config(src, out, batch_size=4)
    summary = run(cfg, embedder=DiesOnce, embedder_kwargs=FAKE)
    assert marker.exists()
    assert sorted(_keys(out)) == sorted(expected)
    assert summary.processed == len(expected) and summary.errors == 0


def test_a_removed_worker_node_does_not_lose_rows(tmp_path: Path):
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    worker = cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    src, out, started = tmp_path / "in", tmp_path / "out", tmp_path / "embedding-started"
    expected = _tar_shards(src, shards=8, per_shard=4)

    class Marks(FakeEmbedPatches):  # defined in the test: Ray pickles it by value
        def __call__(self, batch):
            started.touch()
            return super().__call__(batch)

    cfg = _small_config(src, out, batch_size=2)
    result: dict = {}

    def job() -> None:
        try:
            result["summary"] = run(cfg, embedder=Marks, embedder_kwargs={**FAKE, "delay_s": 0.5})
        except BaseException as e:  # reported below
            result["error"] = e

    thread = threading.Thread(target=job)
    try:
        thread.start()
        deadline = time.time() + 120
        while not started.exists() and time.time() < deadline and thread.is_alive():
            time.sleep(0.1)
        assert thread.is_alive(), f"the run ended before the node could be removed: {result}"
        cluster.remove_node(worker)
        thread.join(timeout=300)
        assert not thread.is_alive(), "the run did not finish after the node was removed"
        assert "error" not in result, result.get("error")
        assert sorted(_keys(out)) == sorted(expected)
    finally:
        ray.shutdown()
        cluster.shutdown()
