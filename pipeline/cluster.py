"""The Ray cluster: connecting to it, and placing the model actors on its nodes.

`ensure_ray` connects to RAY_ADDRESS (as under `ray job submit`) or starts a local Ray; `actor_stage`
decides how many model actors run, with which resources, and how large the model and write batches are.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Protocol

from pipeline.config import CPU_BATCH_SIZE, GPU_BATCH_SIZE, ConfigError, JobConfig

# Non-secret S3 settings forwarded to the workers of a cluster we connect to, so --input/--output resolve
# the same way there. Credentials are never forwarded: Ray logs a job's runtime_env (and shows it on the
# dashboard), so they must come from the nodes' own environment (a Kubernetes Secret, an instance role).
# A local Ray started here inherits this process's environment, credentials included, without logging it.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE")
# How long a local Ray keeps idle worker processes (Ray's default: 1 s): write tasks come every few seconds
# and would otherwise each start a worker (~0.5 CPU-s of imports taken from decoding). On a cluster the
# nodes set RAY_idle_worker_killing_time_threshold_ms (infra/rayjob.yaml does).
IDLE_WORKER_KEEP_MS = 60_000
# Estimates of the cluster's embedding rate, for sizing write batches (write_batch_rows):
CPU_GMACS_PER_S = 40.0  # fp32 ViT matmuls on one CPU core
GPU_GMACS_PER_S = 150_000.0  # bf16 on an H100-class GPU, about 40 % of its dense peak
DECODE_IMAGES_PER_S = 700  # per read+decode task slot, 1024x768 photographs
MAX_WRITE_ROWS = 4096  # the largest unit of loose files: such a unit is then mostly one part


class _Sized(Protocol):
    num_params: int


def _worker_env() -> dict[str, str]:
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connects to RAY_ADDRESS when set (as under `ray job submit`), else starts a local Ray.

    `ray.init` replaces the driver's SIGTERM handler (with one that calls sys.exit); handlers the caller
    installed itself (jobs/embed.py's, which stop the run with status 3) are put back afterwards.
    """
    import signal
    import threading

    import ray

    if ray.is_initialized():
        return
    own = threading.current_thread() is threading.main_thread()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if own else {}
    try:
        if os.environ.get("RAY_ADDRESS"):
            ray.init(runtime_env={"env_vars": _worker_env()}, log_to_driver=True)
        else:  # workers inherit this environment
            ray.init(
                address="local",
                num_cpus=num_cpus,
                include_dashboard=False,
                _system_config={"idle_worker_killing_time_threshold_ms": IDLE_WORKER_KEEP_MS},
            )
    finally:
        for signum, handler in handlers.items():
            if callable(handler) and handler is not signal.default_int_handler:
                signal.signal(signum, handler)


@dataclass(frozen=True)
class ActorStage:
    """How the model actors are placed on this cluster."""

    remote_args: dict[str, Any]
    size: int
    task_slots: float  # CPUs left for the read/decode/write tasks
    description: str
    batch_size: int  # images per model call
    note: str = ""  # one sentence when fewer actors run than were asked for (they did not fit)
    cpu_threads: int = 1  # torch's threads in a CPU model actor


def actor_stage(config: JobConfig, plan: _Sized) -> ActorStage:
    """One model actor per GPU (num_gpus=1) when the cluster has GPUs, else CPU actors.

    No more actors than fit on the cluster's alive nodes, each actor whole on one node, with one CPU left
    somewhere for the read/decode tasks (without it the actors would wait for rows forever): fewer than
    asked for run with a `note`, none fitting is a ConfigError naming the numbers.
    """
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), resources.get("CPU", 1.0)
    memory = int(plan.num_params * 4 * 2 + 2**30)  # fp32 weights twice (load + device) + torch runtime
    if config.device in ("auto", "cuda") and gpus > 0:
        wanted = config.num_actors or gpus
        args: dict[str, Any] = {"num_gpus": 1, "num_cpus": 1, "memory": memory}
        batch = config.batch_size or GPU_BATCH_SIZE
        what = "GPU model actor"
    elif config.device == "cuda":
        raise ConfigError("--device cuda was given but the Ray cluster has no GPU; use --device auto or cpu.")
    else:
        # Half of the smallest node: an actor must fit again on a surviving node, next to decode tasks,
        # if its node goes away. Nodes without CPUs (a KubeRay head with num-cpus 0) do not count.
        node_cpus = [n.get("CPU", 0.0) for n in nodes if n.get("CPU", 0.0) > 0] or [cpus]
        actor_cpus = config.actor_cpus or max(1.0, math.floor(min(node_cpus) / 2))
        wanted = config.num_actors or 1
        # `memory` differs from the decode tasks' resources, so Ray Data does not fuse decode into the actor.
        args = {"num_cpus": actor_cpus, "memory": memory}
        batch = config.batch_size or CPU_BATCH_SIZE
        what = "model actor"
    need = {"CPU": float(args["num_cpus"]), "GPU": float(args.get("num_gpus", 0)), "memory": float(memory)}

    def fits(node: dict[str, float], spare_cpus: float = 0.0) -> int:
        """Actors that fit on `node` with `spare_cpus` of its CPUs kept free (a node that reports no
        `memory` resource is not limited by it)."""
        free = {"memory": math.inf, **node, "CPU": node.get("CPU", 0.0) - spare_cpus}
        return max(0, math.floor(min(free.get(k, 0.0) / v + 1e-6 for k, v in need.items() if v > 0)))

    per_node = [fits(n) for n in nodes]
    # One CPU for reading and decoding: keep it on the node where it costs the fewest actors.
    cost = [k - fits(n, 1.0) for n, k in zip(nodes, per_node) if n.get("CPU", 0.0) >= 1.0]
    size = min(wanted, sum(per_node) - min(cost, default=sum(per_node)))
    largest = {k: max((n.get(k, 0.0) for n in nodes), default=0.0) for k in need}
    gib = 2**30
    each = f"{need['CPU']:g} CPU{'' if need['CPU'] == 1 else 's'}" + (", 1 GPU" if need["GPU"] else "")
    each += f" and {need['memory'] / gib:.1f} GiB of Ray's memory resource"
    if size < 1:
        if max(per_node, default=0) >= 1 or not cost:
            fix = (
                f"use --actor-cpus {math.floor(largest['CPU'] - 1):g} or less"
                if largest["CPU"] >= 2 and not need["GPU"]
                else "run it where there are at least 2 CPUs"
            )
            problem = (
                f"the read/decode tasks need 1 CPU besides the actor's {need['CPU']:g}, and the largest "
                f"node has {largest['CPU']:g} in all; {fix}"
            )
        elif not need["GPU"] and largest["CPU"] < need["CPU"]:
            problem = (
                f"--actor-cpus {need['CPU']:g} needs {need['CPU']:g} CPUs per model actor; the largest node "
                f"has {largest['CPU']:g}"
            )
        else:
            problem = (
                f"a {config.model} actor needs {each} on one node, and no alive node has them all (the "
                f"largest: {largest['CPU']:g} CPUs, {largest['GPU']:g} GPUs, "
                f"{largest['memory'] / gib:.1f} GiB)"
            )
        raise ConfigError(f"No {what} fits on this Ray cluster: {problem}.")
    note = ""
    if size < wanted:
        asked = f"--num-actors {wanted}" if config.num_actors else f"{wanted} (one per GPU)"
        note = (
            f"Running {size} {what}(s) instead of {asked}: no more fit on the cluster's nodes with a CPU "
            f"left for reading and decoding (each actor takes {each})."
        )
    kind = "GPU actor(s)" if need["GPU"] else f"CPU actor(s) x {need['CPU']:g} CPUs"
    threads = max(1, int(need["CPU"]))
    if not need["GPU"] and config.actor_cpus is None:
        # A ViT on CPUs costs 10-200x what decoding its images does, so the read+decode tasks leave most of
        # the CPUs beside the actor idle: torch runs on its share of the whole node (oversubscribed while
        # decode tasks run, which the OS shares out). An explicit --actor-cpus is kept to.
        sharing = max(1, math.ceil(size / len(node_cpus)))  # actors on one node
        threads = max(threads, int(min(node_cpus) // sharing))
        kind += f" (torch on {threads} threads)"
    description = f"{size} {kind}, {batch} images per call"
    slots = max(1.0, cpus - size * args["num_cpus"])
    return ActorStage(args, size, slots, description, batch, note, threads)


def write_batch_rows(actors: ActorStage, gmacs: float, interval_s: float) -> int:
    """Rows per write call: the rows the cluster embeds in interval_s by estimate (the model actors, or the
    read+decode slots when they are slower), within [one model batch, MAX_WRITE_ROWS]."""
    gpu = "num_gpus" in actors.remote_args
    per_actor = GPU_GMACS_PER_S if gpu else CPU_GMACS_PER_S * float(actors.remote_args["num_cpus"])
    rate = min(actors.size * per_actor / max(gmacs, 1e-9), actors.task_slots * DECODE_IMAGES_PER_S)
    return int(min(MAX_WRITE_ROWS, max(actors.batch_size, rate * interval_s)))
