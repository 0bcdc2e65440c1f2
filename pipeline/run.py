"""Builds and runs the Ray Data plan: shards → read → decode → embed → Parquet.

`run(config)` is the whole job as a Python function (what `jobs/embed.py` calls); `plan(config)` does
everything that needs no cluster (argument, weights and input checks) and is what `--dry-run` prints.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import math
import os
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import metadata as importlib_metadata
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from pipeline.commit import Committer, UnitWork, shard_counts
from pipeline.config import CPU_BATCH_SIZE, GPU_BATCH_SIZE, JobConfig
from pipeline.decode import DEFAULT_MAX_PIXELS, DecodePatches, check_sizes
from pipeline.embed import EmbedPatches, ModelSpec
from pipeline.lease import OutputLease
from pipeline.ledger import Ledger, RunLedger, UnitRecord
from pipeline.sink import OutputSpec, ParquetSink, Part, part_from_json, write_parts
from pipeline.sources import (
    ReadShards,
    Shard,
    check_parquet_columns,
    check_unique_keys,
    list_shards,
    shards_to_items,
)
from pipeline.storage import resolve_uri

log = logging.getLogger(__name__)

# Non-secret S3 settings forwarded to the workers of a cluster we connect to, so --input/--output resolve
# the same way there. Credentials are never forwarded: Ray logs a job's runtime_env (and shows it on the
# dashboard), so they must come from the nodes' own environment (a Kubernetes Secret, an instance role).
# A local Ray started here inherits this process's environment, credentials included, without logging it.
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE")
# Loose files are read, committed and skipped in groups ("units"; a tar or Parquet shard is a unit alone),
# one read+decode task and one output file each. Ray Data notices a finished task only every ~0.1 s
# (ray.wait's timeout in its scheduling loop), so short tasks leave their CPU idle between them: a group
# is as large as the input allows while keeping >= UNITS_PER_SLOT tasks per task slot, for balance.
MIN_FILES_PER_UNIT = 256
MAX_FILES_PER_UNIT = 4096
UNITS_PER_SLOT = 4
MAX_INPUT_BLOCKS = 10_000
DECODE_BATCH_ROWS = 256  # images per batch that a read+decode task emits (ReadShards' rows_per_batch)
TICK_S = 0.5  # the commit loop looks at the clock at least this often, whether or not parts arrive
# Rows per write call: what the cluster embeds in one commit interval (so a unit's last rows wait at most
# about that long for the write batch to fill, and commit within about two intervals), at least one model
# batch, at most MAX_WRITE_ROWS (the largest unit of loose files: a unit then mostly is one part, moved
# into place without a merge). Measured with benchmarks/pipeline.py (fake model, 24,000 images, 2 CPUs):
# one write per 64-row block reached 61 % of decode speed, 3,500-row writes 67 % (units of 4,096 in two
# parts, merged), 4,096-row writes 83 %. The rate is an estimate from the model's size and the cluster:
CPU_GMACS_PER_S = 40.0  # fp32 ViT matmuls on one CPU core
GPU_GMACS_PER_S = 150_000.0  # bf16 on an H100-class GPU, about 40 % of its dense peak
DECODE_IMAGES_PER_S = 700  # per read+decode task slot: 1024x768 photographs, the slower measured size
MAX_WRITE_ROWS = 4096
# Writing is mostly I/O and must never wait for a CPU held by decode tasks: without its own CPU a write
# task starts as soon as a batch is ready, so units commit while the run goes on and embedded rows do not
# pile up in the object store (measured: with 0.25 CPU on a 2-CPU node nothing was written until decode
# ran out of input). Ray Data's backpressure still bounds how many run at once.
WRITE_CPUS = 0
# A local Ray keeps idle worker processes this long (Ray's default: 1 s beyond one per CPU). Write tasks
# come every few seconds and took a freshly started worker each time (~0.5 CPU-s of imports, taken from
# decode): measured 6 → 1-2 worker starts per 24,000-image run, and 77 % → 82 % pipeline efficiency.
# On a cluster, set RAY_idle_worker_killing_time_threshold_ms on the nodes (infra/rayjob.yaml does).
IDLE_WORKER_KEEP_MS = 60_000
MOVE_THREADS = 16  # the driver's threads for moving single-part units into place (S3 copies wait on I/O)


def bottleneck(
    stage_seconds: dict[str, float], task_slots: float, actors: int, decode_on_actors: bool = False
) -> str:
    """The stage whose workers were busiest: CPU-task stages share `task_slots`, the model (and, with
    --decode gpu, decoding) runs on `actors`."""
    on_actors = {"embed", "decode"} if decode_on_actors else {"embed"}
    busy = {k: v / (actors if k in on_actors else task_slots) for k, v in stage_seconds.items()}
    return max(busy, key=lambda k: busy[k]) if busy else ""


def bound_hint(bound: str, gpu_actors: bool, decode_on_actors: bool) -> str:
    """One sentence on what to change when `bound` limits the run."""
    if bound == "decode" and decode_on_actors:
        return (
            "Decode-bound on the model actors (--decode gpu): add GPUs, or decode on CPUs again (the "
            "default) with more CPU workers."
        )
    if bound == "decode":
        more = " or use --decode gpu (JPEG decoding on the GPU actors)" if gpu_actors else ""
        return f"Decode-bound: add CPUs (more or larger CPU worker nodes){more}."
    return {
        "read": "Read-bound: the input storage or network is the limit; add CPU workers or nodes near the "
        "data.",
        "embed": "Model-bound: add GPUs (one model actor each), raise --batch-size, or try --compile.",
        "write": "Write-bound: the output storage is the limit.",
    }.get(bound, "")


class JobFailed(RuntimeError):
    """The run finished but must be reported as failed (e.g. too many error rows)."""


def project_version() -> str:
    try:
        return importlib_metadata.version("vit-embed")
    except importlib_metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass
class Plan:
    config: JobConfig
    shards: list[Shard]  # still to do
    skipped_shards: int
    skipped_rows: int
    spec: ModelSpec
    output: OutputSpec
    identity: dict[str, str]
    resize_size: int
    num_params: int
    ledger: Ledger  # the output's ledger as read when planning
    gmacs: float  # the model's multiply-accumulates per image, in billions
    retry: list[tuple[UnitWork, list[Shard]]] = field(default_factory=list)  # --retry-errors units
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        kinds = sorted({s.kind for s in self.shards}) or ["(nothing new)"]
        ident = self.identity
        batch = self.config.batch_size or f"{GPU_BATCH_SIZE} (GPU actors) or {CPU_BATCH_SIZE} (CPU)"
        return "\n".join(
            [
                f"input:   {self.config.input} ({len(self.shards)} shards to do: {', '.join(kinds)}; "
                f"{self.skipped_shards} already done"
                + (
                    f"; {sum(len(w.drop) for w, _ in self.retry)} error rows to retry)" if self.retry else ")"
                ),
                f"output:  {self.config.output}",
                f"model:   {ident['model']} weights={ident['weights']} sha256={ident['weights_sha256'][:16]}",
                f"         embedding[{self.output.embedding_dim}] {self.output.embedding_dtype}, "
                f"logits[{self.output.num_classes}] {self.output.logits_dtype}",
                f"preproc: {ident['preprocessing']}",
                f"batch:   {batch} images per model call",
            ]
        )


@dataclass
class Summary:
    processed: int
    skipped: int
    errors: int
    seconds: float
    images_per_s: float
    output: str
    run_id: str
    error_rate: float
    files: int
    skipped_shards: int = 0
    retried: int = 0  # committed error rows read and embedded again (--retry-errors)
    actors: str = ""
    stage_seconds: dict[str, float] = field(default_factory=dict)  # summed over the workers of a stage
    bound: str = ""  # the stage that limits the run
    hint: str = ""  # what to change about it
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        lines = [
            f"Wrote {self.processed} rows ({self.errors} errors, {self.error_rate:.2%}) in {self.files} "
            f"files to {self.output} in {self.seconds:.1f} s ({self.images_per_s:.1f} images/s).",
        ]
        if self.skipped:
            lines.append(f"Skipped {self.skipped} rows already written by earlier runs.")
        if self.retried:
            lines.append(f"Retried {self.retried} error rows of earlier runs (their rows were replaced).")
        if self.stage_seconds:
            spent = ", ".join(f"{k} {v:.1f}" for k, v in self.stage_seconds.items())
            lines.append(f"Seconds per stage, all workers together: {spent}. {self.hint}".rstrip())
        lines += self.notes
        return "\n".join(lines)


def plan(config: JobConfig, lease: OutputLease | None = None) -> Plan:
    """Validates the arguments, weights and input, then takes `lease` (a run; --dry-run takes none) and
    reads the output's ledger; starts nothing. Arguments refused here leave the output untouched."""
    spec = ModelSpec(
        preset=config.model,
        weights=config.weights,
        image_size=config.image_size,
        seed=config.seed,
        class_names=config.class_names,
        mean=config.mean,
        std=config.std,
    )
    loaded = spec.load()  # validates the weights here, once, before any worker starts
    mc = loaded.model.config
    image_size, patch_size = mc.image_size, mc.patch_size
    resize_size = check_sizes(image_size, patch_size, None)  # the decode stage's default, one definition
    identity = {k: v for k, v in loaded.identity().items() if k not in ("preset", "sha256")}
    identity.update(
        {
            "model": config.model,
            "weights": config.weights,
            "weights_sha256": loaded.sha256 or "random",
            "seed": str(config.seed) if loaded.sha256 is None else "",  # random weights depend on it
            "image_size": str(image_size),
            "patch_size": str(patch_size),
            "resize_size": str(resize_size),
            "preprocessing": (
                f"RGB (EXIF orientation applied, alpha composited on white); torchvision ViT resize: "
                f"shorter side to {resize_size}, bilinear antialias (JPEG: DCT-domain downscale + OpenCV "
                f"resample of the crop window, >= 30 dB PSNR vs torchvision), centre crop {image_size}; "
                f"uint8 patches (kh, kw, c); normalize (x/255 - mean) / std"
            ),
            "embedding": "CLS token after the final LayerNorm",
            "embedding_dtype": config.embedding_dtype,
            "logits_dtype": config.logits_dtype,
            "decode": "JPEG on the model's device (nvJPEG on GPUs), others on CPU"
            if config.decode == "gpu"
            else "CPU (libjpeg-turbo for JPEG, Pillow for other formats)",
            "version": project_version(),
        }
    )
    if loaded.class_names:
        identity["class_names"] = json.dumps(loaded.class_names)
    identity.update(config.extra)
    output = OutputSpec(mc.hidden_dim, mc.num_classes, config.embedding_dtype, config.logits_dtype)

    shards = list_shards(config.input, config.format)
    parquet = [s for s in shards if s.kind == "parquet"]
    if parquet:  # the image and key columns, on one file's schema
        check_parquet_columns(config.input, parquet[0], config.image_column, config.key_column)
    if lease is not None:
        lease.acquire()
    ledger = Ledger.read(config.output)
    ledger.check_identity(identity)
    todo = [s for s in shards if s.rel not in ledger.done]
    if config.key_column is not None and config.key_column != config.image_column:
        check_unique_keys(
            config.input, [s for s in todo if s.kind == "parquet"], config.key_column, committed_keys(ledger)
        )
    skipped = [s for s in shards if s.rel in ledger.done]
    skipped_rows = sum(ledger.done[s.rel][0] for s in skipped)
    num_params = sum(p.numel() for p in loaded.model.parameters())
    plan_ = Plan(
        config,
        todo,
        len(skipped),
        skipped_rows,
        spec,
        output,
        identity,
        resize_size,
        num_params,
        ledger,
        mc.gmacs(),
    )
    if config.retry_errors:
        plan_.retry, plan_.notes = retry_units(ledger, {s.rel: s for s in skipped})
    return plan_


def committed_keys(ledger: Ledger) -> set[str]:
    """Every key in the output's committed data files (read from their `key` column only): a
    --key-column value already there must not come again."""
    fs, root = resolve_uri(ledger.output)
    keys: set[str] = set()
    for file in ledger.files:
        keys.update(pq.read_table(f"{root}/{file}", columns=["key"], filesystem=fs)["key"].to_pylist())
    return keys


def retry_units(
    ledger: Ledger, listed: dict[str, Shard]
) -> tuple[list[tuple[UnitWork, list[Shard]]], list[str]]:
    """--retry-errors: one unit per committed data file holding error rows. It re-reads only the error
    rows' keys (a shard's `#.error` row: the whole shard) and replaces them in that file."""
    fs, root = resolve_uri(ledger.output)
    units, gone = [], 0
    for file, rels in sorted(ledger.files.items()):
        if not any(ledger.done.get(rel, (0, 0))[1] for rel in rels):
            continue  # the ledger counts each shard's error rows: no need to open the file
        table = pq.read_table(f"{root}/{file}", columns=["key", "error"], filesystem=fs)
        keys = [k for k, e in zip(table["key"].to_pylist(), table["error"].to_pylist()) if e is not None]
        if not keys:
            continue
        # A tar or Parquet shard is a unit alone; loose files share a unit, and a row's key is its path.
        targets = {rels[0]: keys} if len(rels) == 1 else {k: [k] for k in keys if k in rels}
        shards = [
            dataclasses.replace(listed[rel], keys=tuple(ks)) for rel, ks in targets.items() if rel in listed
        ]
        gone += sum(len(ks) for rel, ks in targets.items() if rel not in listed)
        if shards:
            drop = tuple(k for s in shards for k in (s.keys or ()))
            units.append((UnitWork([s.rel for s in shards], replaces=file, drop=drop), shards))
    notes = (
        [f"{gone} error rows are of inputs no longer under --input; they were left as they are."]
        if gone
        else []
    )
    return units, notes


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


def actor_stage(config: JobConfig, plan_: Plan) -> ActorStage:
    """One model actor per GPU (num_gpus=1) when the cluster has GPUs, else CPU actors.

    No more actors than fit on the cluster's alive nodes, each actor whole on one node, with one CPU left
    somewhere for the read/decode tasks (without it the actors would wait for rows forever): fewer than
    asked for run with a `note`, none fitting is a ConfigError naming the numbers.
    """
    import ray

    from pipeline.config import ConfigError

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), resources.get("CPU", 1.0)
    memory = int(plan_.num_params * 4 * 2 + 2**30)  # fp32 weights twice (load + device) + torch runtime
    if config.device in ("auto", "cuda") and gpus > 0:
        wanted = config.num_actors or gpus
        args: dict[str, Any] = {"num_gpus": 1, "num_cpus": 1, "memory": memory}
        batch = config.batch_size or GPU_BATCH_SIZE
        what = "GPU model actor"
    elif config.device == "cuda":
        raise JobFailed("--device cuda was given but the Ray cluster has no GPU; use --device auto or cpu.")
    else:
        # Half of the smallest node: an actor must fit again on a surviving node, next to decode tasks,
        # if its node goes away (measured: a 2-CPU actor on 2-CPU nodes never restarted after a removal).
        # Nodes without CPUs (a KubeRay head with num-cpus 0) hold no actor and do not count.
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
    description = f"{size} {kind}, {batch} images per call"
    return ActorStage(args, size, max(1.0, cpus - size * args["num_cpus"]), description, batch, note)


def write_batch_rows(actors: ActorStage, gmacs: float, interval_s: float) -> int:
    """Rows per write call: the rows the cluster embeds in interval_s by estimate (the model actors, or the
    read+decode slots when they are slower), within [one model batch, MAX_WRITE_ROWS]."""
    gpu = "num_gpus" in actors.remote_args
    per_actor = GPU_GMACS_PER_S if gpu else CPU_GMACS_PER_S * float(actors.remote_args["num_cpus"])
    rate = min(actors.size * per_actor / max(gmacs, 1e-9), actors.task_slots * DECODE_IMAGES_PER_S)
    return int(min(MAX_WRITE_ROWS, max(actors.batch_size, rate * interval_s)))


def files_per_unit(num_files: int, task_slots: float) -> int:
    """Loose files per unit: UNITS_PER_SLOT units per task slot, within [MIN, MAX]_FILES_PER_UNIT."""
    per_unit = math.ceil(num_files / max(1.0, UNITS_PER_SLOT * task_slots))
    return max(MIN_FILES_PER_UNIT, min(MAX_FILES_PER_UNIT, per_unit))


def make_units(shards: list[Shard], task_slots: float = 1.0) -> dict[int, list[Shard]]:
    """Units of work: each tar or Parquet shard alone, loose files in groups (see files_per_unit)."""
    files = [s for s in shards if s.kind == "file"]
    n = files_per_unit(len(files), task_slots)
    groups = [files[i : i + n] for i in range(0, len(files), n)]
    groups += [[s] for s in shards if s.kind != "file"]
    return dict(enumerate(groups))


def decoded_block_bytes(image_size: int, rows: int = DECODE_BATCH_ROWS) -> int:
    """3/4 of `rows` decoded images' bytes (uint8 patches + ~256 B of key and bookkeeping): a batch of
    `rows` exceeds it (so it is emitted at once) without reaching 1.5× (where Ray Data would split it).
    With --decode gpu the rows carry encoded bytes, usually smaller: a block then holds a few batches."""
    return int(0.75 * rows * (image_size * image_size * 3 + 256))


def _read_and_decode(batch: dict, read_kwargs: dict, decode_kwargs: dict | None) -> Iterator[dict]:
    """Read then decode one unit in one CPU task, as a generator so a large shard streams in batches.

    Adds `unit` to every row and `unit_rows` (the unit's row count) to the rows of its last batch, which
    is held back one step for that; -1 elsewhere. The commit loop needs both (pipeline/commit.py).
    `read_s` (and DecodePatches' `decode_s`) carry each row's share of its batch's time to the per-stage
    report.
    """
    read = ReadShards(**read_kwargs, rows_per_batch=DECODE_BATCH_ROWS)
    decode = DecodePatches(**decode_kwargs) if decode_kwargs is not None else None

    def decoded(rows: dict) -> dict:  # --decode gpu: the model actor decodes the bytes
        return rows if decode is None else decode(rows)

    for unit, shards_json in zip(batch["unit"], batch["shards"]):
        shards = json.loads(shards_json)
        columns = {k: np.array([s[k] for s in shards], dtype=object) for k in ("path", "rel", "kind", "size")}
        columns["keys"] = np.empty(len(shards), dtype=object)  # element by element: lists must stay lists
        for i, s in enumerate(shards):
            columns["keys"][i] = s.get("keys")
        held, total = None, 0
        rows_iter = read(columns)
        while True:
            start = time.perf_counter()
            rows = next(rows_iter, None)
            if rows is None:
                break
            n = len(rows["key"])
            total += n
            rows["unit"] = np.full(n, int(unit), np.int64)
            rows["unit_rows"] = np.full(n, -1, np.int64)
            rows["read_s"] = np.full(n, (time.perf_counter() - start) / n)
            if held is not None:
                yield decoded(held)
            held = rows
        if held is not None:
            held["unit_rows"][:] = total
            yield decoded(held)


def build_dataset(
    config: JobConfig,
    plan_: Plan,
    units: dict[int, list[Shard]],
    sink: ParquetSink,
    actors: ActorStage,
    embedder: Callable | type | None = None,
    embedder_kwargs: dict | None = None,
):
    """The Ray Data plan: units → read+decode (CPU tasks) → embed (actors) → write parts (CPU tasks)."""
    import ray

    items = [{"unit": u, "shards": json.dumps(shards_to_items(s))} for u, s in units.items()]
    ds: ray.data.Dataset = ray.data.from_items(items, override_num_blocks=min(len(items), MAX_INPUT_BLOCKS))
    # Ray Data gathers a task's output batches into blocks of target_max_block_size (128 MiB by default)
    # before passing them on: a unit's decoded rows would then reach the model only when the whole unit is
    # done, and sit in the task's memory until then. Sized to just under one read batch's decoded rows,
    # every batch of ReadShards.rows_per_batch images leaves the task as a block as soon as it is decoded.
    ds.context.target_max_block_size = decoded_block_bytes(int(plan_.identity["image_size"]))
    read_kwargs = {
        "input_uri": config.input,
        "image_column": config.image_column,
        "key_column": config.key_column,
        "max_image_bytes": config.max_object_bytes,
    }
    decode_kwargs = {
        "image_size": int(plan_.identity["image_size"]),
        "patch_size": int(plan_.identity["patch_size"]),
        "resize_size": plan_.resize_size,
        "max_pixels": config.max_pixels or DEFAULT_MAX_PIXELS,
    }
    on_device = config.decode == "gpu"
    if on_device and embedder is not None:
        raise ValueError("--decode gpu needs the real model stage (EmbedPatches), not a custom embedder")
    ds = ds.map_batches(
        _read_and_decode,  # type: ignore[arg-type]  # Ray's stubs do not model fn_kwargs
        batch_size=1,
        fn_kwargs={"read_kwargs": read_kwargs, "decode_kwargs": None if on_device else decode_kwargs},
        num_cpus=1,
    )
    if embedder is None:
        embedder = EmbedPatches
        embedder_kwargs = {
            "spec": plan_.spec,
            "embedding_dtype": config.embedding_dtype,
            "logits_dtype": config.logits_dtype,
            # GPU actors take "auto": a node that declares a GPU without having one still runs (on CPU).
            "device": "auto" if "num_gpus" in actors.remote_args else "cpu",
            "cpu_threads": int(actors.remote_args["num_cpus"]),
            "compile": config.compile,
            "decode": decode_kwargs if on_device else None,
        }
    ds = ds.map_batches(
        embedder,
        batch_size=actors.batch_size,
        fn_constructor_kwargs=embedder_kwargs or {},
        compute=ray.data.ActorPoolStrategy(size=actors.size),
        **actors.remote_args,
    )
    return ds.map_batches(
        write_parts,  # type: ignore[arg-type]
        batch_size=write_batch_rows(actors, plan_.gmacs, config.commit_interval_s),
        fn_kwargs={"sink": sink},
        num_cpus=WRITE_CPUS,
    )


def _stager(
    sink: ParquetSink, ledger: Ledger, remote: bool = True
) -> Callable[[list[tuple[UnitWork, list[Part]]]], list[UnitRecord]]:
    """Stages complete units as one file each: a single part is already that file; several parts (and
    --retry-errors replacements, which also read the committed file) are merged in Ray tasks, off the
    driver (`remote=False`: in this process). Measured: a Ray task for a single-part unit cost a new
    worker process (~0.4 CPU-s) each."""
    merge: Callable[..., Any] = ParquetSink.stage_unit
    replace: Callable[..., Any] = ParquetSink.stage_replacement
    get: Callable[[Any], Any] = lambda x: x  # noqa: E731
    if remote:
        import ray

        merge = ray.remote(num_cpus=WRITE_CPUS, max_retries=3)(merge).remote
        replace = ray.remote(num_cpus=WRITE_CPUS, max_retries=3)(replace).remote
        get = ray.get

    def run_all(units: list[tuple[UnitWork, list[Part]]]) -> list[UnitRecord]:
        started: dict[int, Any] = {}
        for i, (work, parts) in enumerate(units):
            if work.replaces is not None:
                started[i] = replace(sink, parts, work.replaces, work.drop, ledger.files[work.replaces])
            elif len(parts) > 1:
                started[i] = merge(sink, parts)
        records = []
        for i, (work, parts) in enumerate(units):
            if work.replaces is not None:
                staged, counts = get(started[i])
                records.append(UnitRecord(work.replaces, staged, counts, replaces=True))
            else:
                staged = get(started[i]) if i in started else sink.relative(parts[0].staged)
                records.append(UnitRecord(sink.final_name(parts[0].unit), staged, shard_counts(work, parts)))
        return records

    return run_all


def _mover(
    sink: ParquetSink, pool: ThreadPoolExecutor
) -> Callable[[list[UnitRecord], list[list[Part]]], None]:
    """Moves staged units into place in `pool`'s threads (S3 copies wait on I/O), then deletes the parts
    that merged files replaced."""

    def run_all(records: list[UnitRecord], parts: list[list[Part]]) -> None:
        moves = [pool.submit(sink.move_into_place, r.staged, r.file) for r in records if r.file and r.staged]
        for m in moves:
            m.result()
        staged = {r.staged for r in records}
        leftovers = [p for ps in parts for p in ps if sink.relative(p.staged) not in staged]
        for d in [
            pool.submit(sink.delete_parts, leftovers[i : i + 64]) for i in range(0, len(leftovers), 64)
        ]:
            d.result()

    return run_all


def _parts(ds: Any) -> Iterator[Part | None]:
    """The write stage's parts as they come, and None whenever TICK_S passes without one, so the commit
    loop keeps its interval however long the next part takes (and the main thread stays responsive to
    signals)."""
    q: queue.Queue = queue.Queue()
    done = object()

    def produce() -> None:
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                for text in batch["part"]:
                    q.put(part_from_json(str(text)))
            q.put(done)
        except BaseException as e:  # handed to the main thread
            q.put(e)

    threading.Thread(target=produce, name="parts", daemon=True).start()
    while True:
        try:
            item = q.get(timeout=TICK_S)
        except queue.Empty:
            yield None
            continue
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def run(
    config: JobConfig,
    *,
    embedder: Callable | type | None = None,
    embedder_kwargs: dict | None = None,
    num_cpus: int | None = None,
) -> Summary:
    """Runs the job. `embedder` swaps the model stage (e.g. `FakeEmbedPatches`) for tests and benchmarks.

    The output's lease is taken once the arguments are checked, before the output is read, and held to
    the end (pipeline/lease.py)."""
    run_id = new_run_id()
    lease = OutputLease(config.output, run_id)
    try:
        return _run(config, run_id, lease, embedder, embedder_kwargs, num_cpus)
    finally:
        lease.release()


def _run(
    config: JobConfig,
    run_id: str,
    lease: OutputLease,
    embedder: Callable | type | None,
    embedder_kwargs: dict | None,
    num_cpus: int | None,
) -> Summary:
    start = time.perf_counter()
    started_at = dt.datetime.now(dt.timezone.utc).isoformat()
    plan_ = plan(config, lease)
    plan_.ledger.recover()  # finish or remove what an interrupted run left, before writing anything
    if not plan_.shards and not plan_.retry:
        return Summary(
            processed=0,
            skipped=plan_.skipped_rows,
            errors=0,
            seconds=round(time.perf_counter() - start, 3),
            images_per_s=0.0,
            output=config.output,
            run_id=run_id,
            error_rate=0.0,
            files=0,
            skipped_shards=plan_.skipped_shards,
            notes=["Nothing new to process.", *plan_.notes],
        )
    ensure_ray(num_cpus)

    actors = actor_stage(config, plan_)
    units = make_units(plan_.shards, actors.task_slots)
    work = {u: UnitWork([s.rel for s in shards]) for u, shards in units.items()}
    for unit_work, shards in plan_.retry:
        units[len(units)] = shards
        work[len(work)] = unit_work
    sink = ParquetSink(config.output, plan_.output, run_id, {**plan_.identity, "run_id": run_id})
    run_ledger = RunLedger(config.output, run_id)
    run_ledger.start({"run_id": run_id, "started_at": started_at, "identity": plan_.identity})
    movers = ThreadPoolExecutor(MOVE_THREADS, thread_name_prefix="place")
    committer = Committer(
        work,
        run_ledger,
        _stager(sink, plan_.ledger),
        _mover(sink, movers),
        interval_s=config.commit_interval_s,
        check=lease.check,
    )
    ds = build_dataset(config, plan_, units, sink, actors, embedder, embedder_kwargs)
    try:
        for part in _parts(ds):
            if part is None:
                committer.tick()
            else:
                committer.add(part)
        committer.finish()
    finally:
        movers.shutdown()
        if not committer.moving:  # committed units still staged are moved into place by the next run
            sink.remove_staging()  # parts of units that did not complete are never used
    stats = committer.stats
    seconds = time.perf_counter() - start
    error_rate = stats.errors / stats.rows if stats.rows else 0.0
    on_actors = config.decode == "gpu"  # decode time was spent in the model actors
    bound = bottleneck(stats.seconds, actors.task_slots, actors.size, decode_on_actors=on_actors)
    summary = Summary(
        processed=stats.rows,
        skipped=plan_.skipped_rows,
        errors=stats.errors,
        seconds=round(seconds, 3),
        images_per_s=round(stats.rows / seconds, 2) if seconds else 0.0,
        output=config.output,
        run_id=run_id,
        error_rate=round(error_rate, 6),
        files=stats.files,
        skipped_shards=plan_.skipped_shards,
        retried=stats.retried,
        actors=actors.description,
        stage_seconds={k: round(v, 3) for k, v in stats.seconds.items()},
        bound=bound,
        hint=bound_hint(bound, "num_gpus" in actors.remote_args, on_actors),
        notes=[n for n in (getattr(actors, "note", ""), *plan_.notes) if n],
    )
    run_ledger.finish(
        {
            "run_id": run_id,
            "started_at": started_at,
            "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
            "commits": stats.commits,
            "summary": summary.to_json(),
        }
    )
    if error_rate > config.max_error_rate:
        summary.notes.append(
            f"Error rate {error_rate:.2%} is above --max-error-rate {config.max_error_rate:.2%}: the rows "
            f"were written, but check the `error` column (e.g. SELECT error, count(*) … GROUP BY error)."
        )
    return summary
