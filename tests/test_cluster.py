"""Multi-node placement with ray.cluster_utils.Cluster: model actors on the GPU node, decode elsewhere.

The GPU node only declares `num_gpus=1` (there is no GPU here): the actor is placed by Ray's resource
accounting and then runs torch on the CPU, which is what `device="auto"` does without CUDA.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.dataset as pads
import pytest

from pipeline.config import JobConfig
from pipeline.embed import EmbedPatches, ModelSpec
from pipeline.run import run
from pipeline.sample import make_sample
from tests.conftest import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture()
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "include_dashboard": True, "dashboard_port": free_port()},
    )
    c.add_node(num_cpus=2)
    gpu_node = c.add_node(num_cpus=1, num_gpus=1)
    ray.init(address=c.address)
    c.wait_for_nodes()
    try:
        yield c, gpu_node
    finally:
        ray.shutdown()
        c.shutdown()


def test_actors_on_gpu_node_decode_elsewhere(tmp_path: Path, cluster):
    import ray
    from ray.util.state import list_tasks

    _, gpu_node = cluster
    src, out, marks = tmp_path / "in", tmp_path / "out", tmp_path / "marks"
    make_sample(src, n=12)
    marks.mkdir()

    class RecordingEmbed(EmbedPatches):  # defined here so Ray pickles it by value
        def __call__(self, batch):
            node = ray.get_runtime_context().get_node_id()
            (marks / f"embed-{node}").touch()
            return super().__call__(batch)

    cfg = JobConfig(
        input=str(src), output=str(out), model="vit_ti_16", weights="random", image_size=32, batch_size=4
    )
    summary = run(
        cfg,
        embedder=RecordingEmbed,
        embedder_kwargs={"spec": ModelSpec("vit_ti_16", "random", 32), "device": "auto"},
    )
    assert summary.processed == 12
    assert pads.dataset(str(out), format="parquet").count_rows() == 12
    embed_nodes = {p.name.split("-", 1)[1] for p in marks.glob("embed-*")}
    assert embed_nodes == {gpu_node.node_id}
    # Ray records where each task ran: the read+decode tasks never ran on the GPU node.
    tasks = [t for t in list_tasks(detail=True, limit=10_000) if "_read_and_decode" in t.name]
    decode_nodes = {t.node_id for t in tasks}
    assert decode_nodes and gpu_node.node_id not in decode_nodes, decode_nodes
