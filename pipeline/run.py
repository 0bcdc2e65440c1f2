"""The run: units → read+decode (CPU tasks) → embed (model actors) → write parts (CPU tasks) → commit.

`run(config)` is the whole job as a Python function (what `jobs/embed.py` calls): it plans
(pipeline/plan.py), builds the Ray Data pipeline once per round (pipeline/rounds.py: at most a million input
objects each), and feeds the parts it writes to the commit loop (pipeline/commit.py), which makes complete
units visible every `--commit-interval` seconds.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.cluster import (
    ActorStage,
    actor_stage,
    ensure_ray,
    write_batch_rows,
)
from pipeline.commit import CommitStats, Committer
from pipeline.config import JobConfig
from pipeline.decode import DecodePatches
from pipeline.discover import (
    STREAM_ABOVE,
    DiscoverUnits,
    Lap,
    ManifestBuckets,
    PartitionReport,
    SortedKeys,
    sort_bucket,
)
from pipeline.embed import EmbedPatches
from pipeline.lease import OutputLease
from pipeline.ledger import Ledger, RunLedger, UnitRecord, compact_output
from pipeline.plan import Plan, plan
from pipeline.rounds import Round, RoundBox, Rounds, ask_grant, release_memory, round_objects, send_report
from pipeline.sink import STAGING_DIR, ParquetSink, write_parts
from pipeline.sources import ReadShards
from pipeline.storage import InputError
from pipeline.units import Part, Progress, Unit, files_per_unit, make_units, tag_rows

log = logging.getLogger(__name__)

MAX_INPUT_BLOCKS = 10_000
SHUFFLE_PARTITIONS = 200  # hash-shuffle partitions that sort a large manifest (Ray Data's default)
DECODE_BATCH_ROWS = 256  # images per batch that a read+decode task emits (ReadShards' rows_per_batch)
TICK_S = 0.5  # the commit loop looks at the clock at least this often, whether or not parts arrive
# Write tasks take no CPU: writing is mostly I/O, and a write task that waited for a CPU held by decode
# tasks would let embedded rows pile up in the object store instead of committing while the run goes on.
# Ray Data's backpressure still bounds how many run at once.
WRITE_CPUS = 0
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
    rounds: int = 1  # Ray Data executions the run went in (pipeline/rounds.py)
    actors: str = ""
    stage_seconds: dict[str, float] = field(default_factory=dict)  # summed over the workers of a stage
    bound: str = ""  # the stage that limits the run
    hint: str = ""  # what to change about it
    notes: list[str] = field(default_factory=list)
    # Where the start went, in seconds: `imports` (jobs/embed.py), `plan`, `ray` (starting or connecting)
    # and `model_start` (a model actor's own start: torch's import, the weights, the device; the mean over
    # actors) are durations; `first_part` and `first_row` are from the start of the run until the first
    # part was written and the first rows were committed.
    startup: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        config: JobConfig,
        run_id: str,
        job: Plan,
        seconds: float,
        stats: CommitStats | None = None,
        actors: ActorStage | None = None,
        startup: dict[str, float] | None = None,
        rounds: int = 1,
    ) -> Summary:
        """The summary of a run that committed `stats` (none: it had nothing to do)."""
        stats = stats or CommitStats()
        stage_seconds = dict(stats.seconds)
        startup = dict(startup or {})
        if actors and "model_start" in stage_seconds:  # each actor's own start (once per round), on average
            startup["model_start"] = stage_seconds.pop("model_start") / (actors.size * max(1, rounds))
        error_rate = stats.errors / stats.rows if stats.rows else 0.0
        on_actors = config.decode == "gpu"  # decode time was spent in the model actors
        bound = bottleneck(stage_seconds, actors.task_slots, actors.size, on_actors) if actors else ""
        first = actors.note if actors else "Nothing new to process."
        return cls(
            processed=stats.rows,
            skipped=job.skipped_rows,
            errors=stats.errors,
            seconds=round(seconds, 3),
            images_per_s=round(stats.rows / seconds, 2) if seconds and stats.rows else 0.0,
            output=config.output,
            run_id=run_id,
            error_rate=round(error_rate, 6),
            files=stats.files,
            skipped_shards=job.skipped_shards,
            retried=stats.retried,
            rounds=rounds,
            actors=actors.description if actors else "",
            stage_seconds={k: round(v, 3) for k, v in stage_seconds.items()},
            bound=bound,
            hint=bound_hint(bound, "num_gpus" in actors.remote_args, on_actors) if actors else "",
            notes=[n for n in (first, *job.notes) if n],
            startup={k: round(v, 3) for k, v in startup.items()},
        )

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
        if self.rounds > 1:
            lines.append(
                f"The run went in {self.rounds} rounds (one Ray Data execution each, which keeps the "
                "driver's memory bounded; VIT_EMBED_ROUND_OBJECTS sets the input objects per round)."
            )
        if self.stage_seconds:
            spent = ", ".join(f"{k} {v:.1f}" for k, v in self.stage_seconds.items())
            lines.append(f"Seconds per stage, all workers together: {spent}. {self.hint}".rstrip())
        if "first_row" in self.startup:
            s = self.startup
            names = {
                "imports": "imports",
                "plan": "plan",
                "ray": "Ray",
                "manifest": "sorting the manifest",
                "model_start": "model actor start",
            }
            before = ", ".join(f"{name} {s[k]:.1f} s" for k, name in names.items() if k in s)
            lines.append(
                f"Start: {before}; the first rows were committed {s['first_row']:.1f} s into the run (the "
                f"first part written at {s.get('first_part', 0):.1f} s)."
            )
        lines += self.notes
        return "\n".join(lines)


def decoded_block_bytes(image_size: int, rows: int = DECODE_BATCH_ROWS) -> int:
    """3/4 of `rows` decoded images' bytes (uint8 patches + ~256 B of key and bookkeeping): a batch of
    `rows` exceeds it (so it is emitted at once) without reaching 1.5× (where Ray Data would split it).
    With --decode gpu the rows carry encoded bytes, usually smaller: a block then holds a few batches."""
    return int(0.75 * rows * (image_size * image_size * 3 + 256))


def _read_and_decode(batch: dict, read_kwargs: dict, decode_kwargs: dict | None) -> Iterator[dict]:
    """Reads then decodes one unit in one CPU task, as a generator so a large shard streams in batches;
    rows are tagged with their unit (pipeline/units.py). `decode_kwargs` None: the model actor decodes
    (--decode gpu) and the rows keep their bytes."""
    read = ReadShards(**read_kwargs, rows_per_batch=DECODE_BATCH_ROWS)
    decode = DecodePatches(**decode_kwargs) if decode_kwargs is not None else None
    for unit in batch["unit"]:
        for rows in tag_rows(unit, read.batches(unit.shards)):
            yield rows if decode is None else decode(rows)


def build_dataset(
    config: JobConfig,
    job: Plan,
    units: list[Unit],
    sink: ParquetSink,
    actors: ActorStage,
    embedder: Callable | type | None = None,
    embedder_kwargs: dict | None = None,
    discover: DiscoverUnits | None = None,
    laps: list[Lap] | None = None,
):
    """The Ray Data plan of one round: units → read+decode (CPU tasks) → embed (actors) → write parts (CPU
    tasks); with `laps`, listing partitions → units (the `discover` stage's CPU tasks) first."""
    import ray

    allow_python_objects()
    # With laps, the discover stage lists their partitions into units and passes the driver's units through.
    listing = discover if laps else None
    items: list[dict[str, Any]] = [{"unit": u} for u in units]
    if listing is not None:
        items = [{"partition": p} for p in [*units, *(laps or [])]]
    ds: ray.data.Dataset = ray.data.from_items(items, override_num_blocks=min(len(items), MAX_INPUT_BLOCKS))
    if listing is not None:
        # One unit per block (the repartition is fused into the discover tasks): each unit is its own
        # read+decode task, and leaves its discover task as soon as it is formed.
        ds = ds.map_batches(listing, batch_size=1).repartition(target_num_rows_per_block=1)
    # Ray Data gathers a task's output batches into blocks of target_max_block_size (128 MiB by default)
    # before passing them on: a unit's decoded rows would then reach the model only when the whole unit is
    # done, and sit in the task's memory until then. Sized to just under one read batch's decoded rows,
    # every batch of ReadShards.rows_per_batch images leaves the task as a block as soon as it is decoded.
    ds.context.target_max_block_size = decoded_block_bytes(job.model.image_size)
    read_kwargs = {
        "input_uri": config.input,
        "image_column": config.image_column,
        "key_column": config.key_column,
        "max_image_bytes": config.max_object_bytes,
        "keep_columns": job.output.extra if config.keep_columns else (),
    }
    decode_kwargs = job.decode_settings()
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
            "spec": job.spec,
            "embedding_dtype": config.embedding_dtype,
            "logits_dtype": config.logits_dtype,
            # GPU actors take "auto": a node that declares a GPU without having one still runs (on CPU).
            "device": "auto" if "num_gpus" in actors.remote_args else "cpu",
            "cpu_threads": actors.cpu_threads,
            "compile": config.compile,
            "decode": decode_kwargs if on_device else None,
            "exact": config.preprocess == "exact",
        }
    # What the model's head writes is the output's: also for a stand-in embedder (tests, benchmarks).
    heads = {"keep_logits": job.output.logits, "topk": job.output.topk}
    ds = ds.map_batches(
        embedder,
        batch_size=actors.batch_size,
        fn_constructor_kwargs={**(embedder_kwargs or {}), **heads},
        compute=ray.data.ActorPoolStrategy(size=actors.size),
        **actors.remote_args,
    )
    return ds.map_batches(
        write_parts,  # type: ignore[arg-type]
        batch_size=write_batch_rows(actors, job.gmacs, config.commit_interval_s),
        fn_kwargs={"sink": sink},
        num_cpus=WRITE_CPUS,
    )


def _stager(
    sink: ParquetSink, ledger: Ledger, remote: bool = True
) -> Callable[[list[Progress]], list[UnitRecord]]:
    """Stages complete units as one file each: a single part is already that file (no task, which would
    cost a worker process); several parts (and --retry-errors replacements, which also read the committed
    file) are merged in Ray tasks, off the driver (`remote=False`: in this process)."""
    merge: Callable[..., Any] = ParquetSink.stage_unit
    replace: Callable[..., Any] = ParquetSink.stage_replacement
    get: Callable[[Any], Any] = lambda x: x  # noqa: E731
    if remote:
        import ray

        merge = ray.remote(num_cpus=WRITE_CPUS, max_retries=3)(merge).remote
        replace = ray.remote(num_cpus=WRITE_CPUS, max_retries=3)(replace).remote
        get = ray.get

    def run_all(units: list[Progress]) -> list[UnitRecord]:
        started: dict[int, Any] = {}
        for i, p in enumerate(units):
            file = p.unit.replaces
            if file is not None:
                entry = ledger.files[file]
                single = entry.first_shard if entry.shards == 1 else None
                started[i] = replace(sink, p.parts, file, p.unit.drop, single)
            elif len(p.parts) > 1:
                started[i] = merge(sink, p.parts)
        records = []
        for i, p in enumerate(units):
            if p.unit.replaces is not None:
                staged, counts = get(started[i])
                records.append(UnitRecord(p.unit.replaces, staged, counts, replaces=True))
            else:
                staged = get(started[i]) if i in started else sink.relative(p.parts[0].staged)
                records.append(UnitRecord(sink.final_name(p.unit.id), staged, p.shard_counts()))
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
                for part in batch["part"]:
                    q.put(part)
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


def allow_python_objects() -> None:
    """Units, partitions and parts travel between stages as Python objects, which Ray Data stores pickled:
    said before the first block is made, so that it does not warn that it cannot make an Arrow column of
    them."""
    import ray

    ray.data.DataContext.get_current().enable_fallback_to_arrow_object_ext_type = True


def _open_round(box: Any, this: Round) -> None:
    """Tells the discover stage's RoundBox how many files the round's laps may take."""
    if this.laps:
        import ray

        ray.get(box.open.remote(this.room))


def _lap_reports(job: Plan, box: Any, laps: list[Lap]) -> list[PartitionReport]:
    """The discover stage's reports on a round's laps, taken from `box`; adds what they skipped to `job`."""
    if not laps:
        return []
    import ray

    reports = ray.get(box.take.remote())
    if len(reports) != len(laps):
        raise RuntimeError(f"{len(laps) - len(reports)} listing partitions never reported")
    job.skipped_shards += sum(r.skipped_shards for r in reports)
    job.skipped_rows += sum(r.skipped_rows for r in reports)
    return reports


def sort_manifest(config: JobConfig, job: Plan, run_id: str) -> list[SortedKeys]:
    """A large manifest's keys, gathered by workers into buckets of sorted keys, each key once
    (pipeline/discover.py), written under the run's staging directory: the discover stage's partitions.
    Runs before the pipeline starts; an InputError raised while reading the manifest (a key outside the
    input) is raised here, before anything is written."""
    import ray

    assert job.manifest is not None and config.input_list is not None
    buckets = job.manifest.buckets
    scratch = f"{config.output.rstrip('/')}/{STAGING_DIR}/{run_id}/manifest"
    files = [{"file": f} for f in job.manifest.files]
    allow_python_objects()
    ds: ray.data.Dataset = ray.data.from_items(files, override_num_blocks=min(len(files), MAX_INPUT_BLOCKS))
    ds = ds.map_batches(ManifestBuckets(config.input, config.input_list, buckets), batch_size=1)
    grouped = ds.groupby("bucket", num_partitions=min(buckets, SHUFFLE_PARTITIONS))
    try:
        rows = grouped.map_groups(
            functools.partial(sort_bucket, scratch=scratch), batch_format="pyarrow"
        ).take_all()
    except Exception as e:
        cause = _input_error(e)
        if cause is None:
            raise
        raise InputError(str(cause)) from None
    return sorted((SortedKeys(r["bucket"], r["uri"], r["keys"]) for r in rows), key=lambda p: p.id)


def _input_error(e: BaseException | None) -> InputError | None:
    """The InputError a worker raised, found in the exceptions Ray wraps it in."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, InputError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _fold_this_run(output: str, run_id: str) -> None:
    """Folds this run's commit records into the ledger's index in a Ray task (its memory grows with the
    run's shards: not the driver's), so that the next run plans from the index alone. A failure leaves the
    records for the next run to fold."""
    import ray

    try:
        fold = ray.remote(num_cpus=0, max_retries=1)(compact_output)
        ray.get(fold.remote(output, f"{run_id}-end"))
    except Exception as e:  # the rows are committed either way
        log.warning(
            "could not fold the run's commit records into the ledger's index (the next run will): %s", e
        )


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
    job = plan(config, lease)
    startup = {"plan": time.perf_counter() - start}
    job.ledger.recover()  # finish or remove what an interrupted run left, before writing anything
    job.ledger.compact(run_id)  # fold earlier runs' commit records into the ledger's index
    if not job.shards and not job.retry and not job.streamed:
        return Summary.of(config, run_id, job, time.perf_counter() - start)
    began = time.perf_counter()
    ensure_ray(num_cpus)
    startup["ray"] = time.perf_counter() - began
    if job.manifest is not None:
        began = time.perf_counter()
        job.partitions.extend(sort_manifest(config, job, run_id))
        startup["manifest"] = time.perf_counter() - began

    actors = actor_stage(config, job)
    units = make_units(job.shards, actors.task_slots, retry=job.retry)
    per_unit = files_per_unit(STREAM_ABOVE, actors.task_slots)  # whatever VIT_EMBED_STREAM_ABOVE says
    rounds = Rounds(units, job.partitions, round_objects(), per_unit)
    discover, box = None, None
    if job.partitions:  # the discover tasks read the index, which holds every committed shard by now
        import ray

        box = ray.remote(num_cpus=0)(RoundBox).remote()
        report, grant = functools.partial(send_report, box), functools.partial(ask_grant, box)
        discover = DiscoverUnits(config.input, per_unit, job.ledger.shards(), report, grant)
    sink = ParquetSink(config.output, job.output, run_id, {**job.identity, "run_id": run_id})
    run_ledger = RunLedger(config.output, run_id)
    run_ledger.start({"run_id": run_id, "started_at": started_at, "identity": job.identity})
    movers = ThreadPoolExecutor(MOVE_THREADS, thread_name_prefix="place")
    committer = Committer(
        (),
        run_ledger,
        _stager(sink, job.ledger),
        _mover(sink, movers),
        interval_s=config.commit_interval_s,
        check=lease.check,
    )
    try:
        while (this := rounds.next()) is not None:
            committer.begin_round(this.units)
            _open_round(box, this)
            ds = build_dataset(
                config, job, this.units, sink, actors, embedder, embedder_kwargs, discover, this.laps
            )
            for part in _parts(ds):
                if part is None:
                    committer.tick()
                else:
                    startup.setdefault("first_part", time.perf_counter() - start)
                    committer.add(part)
                if committer.stats.rows and "first_row" not in startup:
                    startup["first_row"] = time.perf_counter() - start
            del ds  # the execution's state (queued units, Ray Data's statistics of its blocks) goes with it
            reports = _lap_reports(job, box, this.laps)
            committer.finish({r.partition: r.units for r in reports})
            rounds.reported(this.laps, reports)
            release_memory()
            if committer.stats.rows and "first_row" not in startup:
                startup["first_row"] = time.perf_counter() - start
    finally:
        movers.shutdown()
        if not committer.moving:  # committed units still staged are moved into place by the next run
            sink.remove_staging()  # parts of units that did not complete are never used
    seconds = time.perf_counter() - start
    summary = Summary.of(config, run_id, job, seconds, committer.stats, actors, startup, rounds.count)
    run_ledger.finish(
        {
            "run_id": run_id,
            "started_at": started_at,
            "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
            "commits": committer.stats.commits,
            "summary": summary.to_json(),
        }
    )
    _fold_this_run(config.output, run_id)
    if summary.error_rate > config.max_error_rate:
        summary.notes.append(
            f"Error rate {summary.error_rate:.2%} is above --max-error-rate {config.max_error_rate:.2%}: the "
            f"rows were written, but check the `error` column (e.g. SELECT error, count(*) … GROUP BY error)."
        )
    return summary
