"""Sizing decisions, without a cluster: units of work, block sizes, model actors, the bound stage."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.cluster import actor_stage
from pipeline.config import CPU_BATCH_SIZE, GPU_BATCH_SIZE, JobConfig
from pipeline.decode import DecodePatches
from pipeline.run import DECODE_BATCH_ROWS, bottleneck, bound_hint, decoded_block_bytes
from pipeline.sample import encode, photo_like
from pipeline.sources import Shard
from pipeline.units import MAX_FILES_PER_UNIT, MIN_FILES_PER_UNIT, make_units


def test_bottleneck_weighs_stage_time_by_workers():
    seconds = {"read": 1.0, "decode": 30.0, "embed": 12.0, "write": 0.5}
    assert bottleneck(seconds, task_slots=1, actors=1) == "decode"
    assert bottleneck(seconds, task_slots=15, actors=1) == "embed"  # 15 decode CPUs, one GPU
    assert bottleneck({}, task_slots=1, actors=1) == ""
    # --decode gpu: decoding ran on the one actor, next to the model
    assert bottleneck(seconds, task_slots=15, actors=1, decode_on_actors=True) == "decode"


def test_hints_name_what_to_change():
    assert "--decode gpu" in bound_hint("decode", gpu_actors=True, decode_on_actors=False)
    assert "--decode gpu" not in bound_hint("decode", gpu_actors=False, decode_on_actors=False)
    assert "add GPUs" in bound_hint("decode", gpu_actors=True, decode_on_actors=True)
    assert bound_hint("embed", True, False).startswith("Model-bound")
    assert bound_hint("", False, False) == ""


def test_units_group_loose_files_by_cluster_size_and_keep_shards_alone():
    def files(n: int) -> list[Shard]:
        return [Shard(f"/in/{i}.jpg", f"{i}.jpg", "file", 1) for i in range(n)]

    small = make_units(files(300), task_slots=15)  # a small input still gets units of at least the minimum
    assert [len(u.shards) for u in small] == [MIN_FILES_PER_UNIT, 300 - MIN_FILES_PER_UNIT]
    mid = make_units(files(6000), task_slots=1)  # four tasks for the one slot
    assert [len(u.shards) for u in mid] == [1500] * 4
    big = make_units(files(100_000), task_slots=2)
    assert max(len(u.shards) for u in big) == MAX_FILES_PER_UNIT
    mixed = make_units([*files(10), Shard("/in/a.tar", "a.tar", "webdataset", 9)], task_slots=4)
    assert [u.rels for u in mixed][-1] == ["a.tar"] and len(mixed) == 2
    every = [rel for u in big for rel in u.rels]
    assert sorted(every) == sorted(s.rel for s in files(100_000))  # each file in exactly one unit


@pytest.mark.parametrize("image_size", [32, 224, 384])
def test_a_decoded_batch_leaves_the_task_as_one_block(image_size: int):
    """Ray Data emits a task's output once its buffer exceeds target_max_block_size and splits blocks of
    1.5× that or more: one read batch of decoded rows must fall in between."""
    from ray.data.block import BlockAccessor

    rng = np.random.default_rng(0)
    data = encode(photo_like(rng, 64, 48))
    n = DECODE_BATCH_ROWS
    batch = {
        "key": np.array([f"dir/{i:06d}.jpg" for i in range(n)], dtype=object),
        "shard": np.array([f"dir/{i:06d}.jpg" for i in range(n)], dtype=object),
        "bytes": np.array([data] * n, dtype=object),
        "error": np.array([None] * n, dtype=object),
    }
    out = DecodePatches(image_size=image_size, patch_size=16)(batch)
    for col in ("unit", "unit_rows"):
        out[col] = np.zeros(n, np.int64)
    out["read_s"] = np.zeros(n, np.float64)
    size = BlockAccessor.for_block(BlockAccessor.batch_to_block(out)).size_bytes()
    target = decoded_block_bytes(image_size)
    assert target < size < 1.5 * target


@pytest.mark.parametrize(
    "gpus, batch_size, expected",
    [(2, None, GPU_BATCH_SIZE), (0, None, CPU_BATCH_SIZE), (2, 32, 32), (0, 512, 512)],
)
def test_model_batch_size_defaults_by_actor_kind(monkeypatch, gpus: int, batch_size, expected: int):
    """GPU actors get large batches unless --batch-size says otherwise; CPU actors smaller ones."""
    import ray

    resources = {"CPU": 8.0, **({"GPU": float(gpus)} if gpus else {})}
    monkeypatch.setattr(ray, "cluster_resources", lambda: resources)
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": resources}])
    config = JobConfig(input="in", output="out", batch_size=batch_size)
    stage = actor_stage(config, SimpleNamespace(num_params=1000))  # type: ignore[arg-type]
    assert stage.batch_size == expected
    assert f"{expected} images per call" in stage.description
    assert stage.size == (gpus or 1) and ("num_gpus" in stage.remote_args) == bool(gpus)


@pytest.mark.parametrize(
    "node_cpus, nodes, actor_cpus, num_actors, reserved, threads",
    [
        (2, 1, None, None, 1, 2),  # a 2-CPU machine: half reserved, torch on both
        (16, 1, None, None, 8, 16),
        (16, 2, None, 3, 8, 8),  # three actors on two nodes: two share one node
        (16, 4, None, 4, 8, 16),  # one actor per node
        (8, 1, 3.0, None, 3, 3),  # an explicit --actor-cpus is kept to
    ],
)
def test_cpu_actors_run_torch_on_their_share_of_the_node(
    monkeypatch, node_cpus: int, nodes: int, actor_cpus, num_actors, reserved: int, threads: int
):
    """A ViT on CPUs costs far more than decoding its images: the actor reserves half a node (decode tasks
    get the rest), and torch uses the CPUs the decode tasks leave idle, unless --actor-cpus says."""
    import ray

    node = {"CPU": float(node_cpus), "memory": 64.0 * 2**30}
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": float(node_cpus * nodes)})
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": dict(node)}] * nodes)
    config = JobConfig(input="in", output="out", actor_cpus=actor_cpus, num_actors=num_actors)
    stage = actor_stage(config, SimpleNamespace(num_params=1000))  # type: ignore[arg-type]
    assert stage.remote_args["num_cpus"] == reserved and stage.cpu_threads == threads
    assert stage.size == (num_actors or 1)


def test_write_batches_hold_a_commit_interval_of_rows():
    from pipeline.cluster import MAX_WRITE_ROWS, ActorStage, write_batch_rows
    from vit.model import PRESETS

    def stage(gpu: bool, size: int = 1, slots: float = 1.0, batch: int = 64) -> ActorStage:
        args = {"num_gpus": 1, "num_cpus": 1} if gpu else {"num_cpus": 1}
        return ActorStage(args, size, slots, "", batch)

    b16 = PRESETS["vit_b_16"].gmacs()  # 17.6 GMAC per image
    # ViT-B/16 on one CPU: a couple of images per second; a write per model batch, the smallest there is.
    assert write_batch_rows(stage(gpu=False), b16, 10.0) == 64
    # On a GPU fed by 15 decode slots: thousands of images per second; the largest parts.
    assert write_batch_rows(stage(gpu=True, slots=15, batch=256), b16, 10.0) == MAX_WRITE_ROWS
    # A tiny model: decode is the limit (one slot here, ~700 images/s), an interval of its output.
    tiny = PRESETS["vit_ti_16"].gmacs() / 49  # 32 px instead of 224
    assert write_batch_rows(stage(gpu=False), tiny, 2.0) == 1400
    assert write_batch_rows(stage(gpu=False), tiny, 10.0) == MAX_WRITE_ROWS
    assert write_batch_rows(stage(gpu=False), tiny, 0.0) == 64  # --commit-interval 0: every model batch
