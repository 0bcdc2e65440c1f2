"""Pipeline efficiency and peak memory, with the fast fake model (``FakeEmbedPatches``).

**Efficiency** (default): end-to-end images/s ÷ the slowest stage's standalone images/s (target ≥ 85 %).
Each round, in this process:

1. *Standalone*: each stage alone over the same N images, on one thread of this process
   (``OMP_NUM_THREADS=1``, as Ray runs a 1-CPU task), in the units the pipeline gives it: read =
   ``ReadShards.batches`` over each unit of ``make_units`` (wrapped by ``tag_rows``, as in the read+decode
   task), decode = ``DecodePatches`` on those batches, embed = the fake model on ``--batch-size`` batches,
   write = ``to_table`` + ``write_parquet`` into one local file. Wall seconds, then × the CPUs the stage
   gets in the pipeline: with C CPUs and no GPU the job gives the model actor ``max(1, C // 2)`` CPUs
   (``pipeline.cluster.actor_stage``) and read+decode tasks the rest, one CPU each; write tasks take no CPU
   (``WRITE_CPUS``). So read and decode × (C − actor CPUs), embed × actors (the fake model is
   single-threaded numpy), write × 1; on 2 CPUs every stage × 1.
2. *End to end*: ``pipeline.run.run(JobConfig(...), embedder=FakeEmbedPatches)`` on the same input into a
   fresh output; its summary's ``images_per_s`` (planning, actor start, execution, commits and the run
   record; the local Ray is started before timing and a warm-up run has started its workers).
3. A ``--small-images`` run: t = fixed + n / marginal splits the per-run fixed cost from the per-image
   rate; the "marginal" efficiency is that rate ÷ the slowest stage.

Printed: the ratio against the slowest stage and against the slowest operator (read+decode as one: they
share a task), and, from a sampler reading ``/proc`` during the end-to-end run, CPU ms per image of the
whole local Ray cluster (driver, task workers, model actor, Ray's own processes) against the stages'
standalone CPU time, and how many Ray worker processes started. The load average is printed too: on a
shared machine other load lowers the end-to-end figure (it needs every core) more than the standalone ones.
Ray keeps idle workers for ``IDLE_WORKER_KEEP_MS`` as the job's local Ray does; ``--ray-default-workers``
uses Ray's default (idle workers beyond one per CPU killed after 1 s), to compare.

Then a run with ``--check-actors`` model actors (fractional CPUs so they fit, a fake model too slow for one
actor) records when each actor was constructed and got its first batch: ``ActorPoolStrategy(size=n)``
starts all n actors at once, with no ramp-up.

**Memory** (``--memory``): peak memory at N and 10 N images (target ≤ 1.2×), a fresh local Ray per run. A
thread samples every process under this one (driver, GCS, raylet, agents, workers, actors) from
``/proc/<pid>/smaps_rollup`` every ``--sample-s``, and Ray's object-store use (pages in ``/dev/shm`` that no
process maps any more are in no process's PSS). The measure is the peak of Σ PSS + object store; Σ PSS,
Σ RSS (shared pages counted once per process) and the PSS per kind of process at the peak are printed too.

    python benchmarks/pipeline.py                      # 3 rounds of 24,000 images, then the actor check
    python benchmarks/pipeline.py --delay-s 0.05       # a slower fake model: embed becomes the bound
    python benchmarks/pipeline.py --memory             # peak memory, 2000 vs 20000 images
    python benchmarks/pipeline.py --memory --memory-images 1000 --rounds 2

Input: ``--unique`` distinct images from ``pipeline.sample.make_sample`` (photo-like JPEG, 1 in 8 PNG,
160–640 px), hard-linked (copied where links fail) into N loose files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")  # standalone stages on one thread (numpy's BLAS too)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from baselines import descendants  # benchmarks/baselines.py, beside this script

from pipeline.cluster import IDLE_WORKER_KEEP_MS
from pipeline.config import JobConfig
from pipeline.decode import DecodePatches
from pipeline.embed import FakeEmbedPatches
from pipeline.run import DECODE_BATCH_ROWS, run
from pipeline.sample import make_sample
from pipeline.sink import OutputSpec, to_table, write_parquet
from pipeline.sources import ReadShards, list_shards
from pipeline.units import make_units, tag_rows
from vit.model import PRESETS

# ---------------------------------------------------------------------------------------------------------
# Input


def make_input(root: Path, n: int, unique: int, seed: int = 0) -> Path:
    """`n` loose image files under root/in-<n>, hard links to `unique` generated images."""
    pool_dir = root / "pool"
    if not pool_dir.exists():
        make_sample(pool_dir, unique, seed)
    pool = sorted(p for p in pool_dir.rglob("*") if p.is_file())
    src = root / f"in-{n}"
    if src.exists():
        return src
    tmp = root / f"_in-{n}"
    shutil.rmtree(tmp, ignore_errors=True)
    for i in range(n):
        p = pool[i % len(pool)]
        dst = tmp / f"{i // 1000:04d}" / f"{i:07d}{p.suffix}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(p, dst)
        except OSError:
            shutil.copyfile(p, dst)
    tmp.rename(src)
    return src


def job_config(args: argparse.Namespace, src: Path, out: Path, **changes: Any) -> JobConfig:
    return JobConfig(
        input=str(src),
        output=str(out),
        model=args.model,
        weights="random",
        image_size=args.image_size,
        batch_size=args.batch_size,
        embedding_dtype=args.dtype,
        logits_dtype=args.dtype,
        **changes,
    )


def fake_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "embedding_dim": PRESETS[args.model].hidden_dim,
        "num_classes": args.num_classes,
        "embedding_dtype": args.dtype,
        "logits_dtype": args.dtype,
        "delay_s": args.delay_s,
    }


def start_ray(num_cpus: int, ray_default_workers: bool = False) -> None:
    """A local Ray as pipeline.cluster.ensure_ray starts it, quieter; Ray's default idle-worker killing
    with `ray_default_workers`."""
    import logging

    import ray

    keep_ms = 1000 if ray_default_workers else IDLE_WORKER_KEEP_MS
    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        _system_config={"idle_worker_killing_time_threshold_ms": keep_ms},
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def load_average() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


# ---------------------------------------------------------------------------------------------------------
# Standalone stages


def _rebatch(batches: list[dict[str, np.ndarray]], size: int) -> list[dict[str, np.ndarray]]:
    whole = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    n = len(whole["key"])
    return [{k: v[i : i + size] for k, v in whole.items()} for i in range(0, n, size)]


def standalone(
    args: argparse.Namespace, src: Path, work: Path, task_slots: float
) -> tuple[dict[str, float], float]:
    """One-thread images/s of each stage run alone over the images under `src`, and their CPU seconds."""
    import pyarrow.fs as pafs

    units = make_units(list_shards(str(src)), task_slots)  # one read+decode task each in the pipeline
    n = sum(len(u.shards) for u in units)
    seconds: dict[str, float] = {}
    cpu0 = time.thread_time()

    t = time.perf_counter()
    reader = ReadShards(str(src), rows_per_batch=DECODE_BATCH_ROWS)
    read = [b for u in units for b in tag_rows(u, reader.batches(u.shards))]
    seconds["read"] = time.perf_counter() - t

    t = time.perf_counter()
    decoder = DecodePatches(image_size=args.image_size, patch_size=PRESETS[args.model].patch_size)
    decoded = [decoder(b) for b in read]
    seconds["decode"] = time.perf_counter() - t
    del read

    cpu = time.thread_time() - cpu0
    batches = _rebatch(decoded, args.batch_size)  # not timed: Ray Data's batching is pipeline overhead
    del decoded
    cpu0 = time.thread_time()
    t = time.perf_counter()
    embedder = FakeEmbedPatches(**fake_kwargs(args))
    embedded = [embedder(b) for b in batches]
    seconds["embed"] = time.perf_counter() - t
    del batches

    t = time.perf_counter()
    spec = OutputSpec(PRESETS[args.model].hidden_dim, args.num_classes, args.dtype, args.dtype)
    schema = spec.schema({"bench": "1"})
    path = work / "standalone.parquet"
    rows = write_parquet(
        (to_table(b, spec, schema) for b in embedded), pafs.LocalFileSystem(), str(path), schema
    )
    seconds["write"] = time.perf_counter() - t
    cpu += time.thread_time() - cpu0
    path.unlink()
    assert rows == n, (rows, n)
    return {k: n / s for k, s in seconds.items()}, cpu


# ---------------------------------------------------------------------------------------------------------
# Actor pool start


class StampedFake(FakeEmbedPatches):
    """FakeEmbedPatches that notes (wall clock) when it was constructed and when its first batch came."""

    def __init__(self, stamp_dir: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._stamp = Path(stamp_dir) / f"actor-{os.getpid()}-{id(self)}"
        self._stamp.write_text(f"{time.time()}\n")
        self._called = False

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self._called:
            self._called = True
            with self._stamp.open("a") as f:
                f.write(f"{time.time()}\n")
        return super().__call__(batch)


def check_actor_start(args: argparse.Namespace, src: Path, work: Path, num_cpus: int) -> dict[str, Any]:
    k = args.check_actors
    stamps = work / "stamps"
    shutil.rmtree(stamps, ignore_errors=True)
    stamps.mkdir()
    actor_cpus = max(0.1, (num_cpus - 1) / k)  # leave one CPU to read+decode
    out = work / "out-actors"
    cfg = job_config(args, src, out, num_actors=k, actor_cpus=actor_cpus)
    # A model slower than decode (64 images per 0.25 s), so one actor cannot keep up and every actor gets
    # work (an idle pool hands every batch to the same actor).
    kwargs = {**fake_kwargs(args), "stamp_dir": str(stamps), "delay_s": max(args.delay_s, 0.25)}
    t0 = time.time()
    summary = run(cfg, embedder=StampedFake, embedder_kwargs=kwargs)
    shutil.rmtree(out, ignore_errors=True)
    actors: list[dict[str, Any]] = []
    for f in sorted(stamps.iterdir()):
        lines = [float(x) for x in f.read_text().split()]
        actors.append(
            {
                "constructed_s": round(lines[0] - t0, 2),
                "first_batch_s": round(lines[1] - t0, 2) if len(lines) > 1 else None,
            }
        )
    actors.sort(key=lambda a: a["constructed_s"])
    spread = actors[-1]["constructed_s"] - actors[0]["constructed_s"] if actors else math.nan
    return {
        "requested": k,
        "actor_cpus": round(actor_cpus, 2),
        "started": len(actors),
        "construction_spread_s": round(spread, 2),
        "actors": actors,
        "run_seconds": summary.seconds,
    }


# ---------------------------------------------------------------------------------------------------------
# Efficiency


def _timed_run(args: argparse.Namespace, src: Path, out: Path) -> tuple[Any, TreeSampler]:
    sampler = TreeSampler(0.25)
    sampler.start()
    summary = run(job_config(args, src, out), embedder=FakeEmbedPatches, embedder_kwargs=fake_kwargs(args))
    sampler.finish()
    shutil.rmtree(out, ignore_errors=True)
    return summary, sampler


def efficiency(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    num_cpus = args.num_cpus or os.cpu_count() or 1
    actor_cpus = max(1, math.floor(num_cpus / 2))  # what pipeline.cluster.actor_stage gives one CPU actor
    decode_slots = max(1, num_cpus - actor_cpus)
    cpus = {"read": decode_slots, "decode": decode_slots, "embed": 1, "write": 1}
    src = make_input(work, args.images, args.unique)
    small = make_input(work, args.small_images, args.unique)
    start_ray(num_cpus, args.ray_default_workers)
    print(
        f"{args.images} images ({args.unique} distinct), {args.model} at {args.image_size} px, fake model "
        f"(delay {args.delay_s} s/batch), batch {args.batch_size}, {args.dtype}; local Ray with {num_cpus} "
        f"CPUs: 1 actor × {actor_cpus} CPU, read+decode tasks on {decode_slots} CPU(s)"
    )
    warmup, _ = _timed_run(args, small, work / "out-warm")
    print(
        f"warm-up run (starts Ray's workers; not counted): {warmup.processed} images in "
        f"{warmup.seconds:.1f} s"
    )

    rounds = []
    for r in range(args.rounds):
        load = load_average()
        one_thread, alone_cpu = standalone(args, src, work, decode_slots)
        alone = {k: v * cpus[k] for k, v in one_thread.items()}
        alone["read+decode"] = 1 / (1 / alone["read"] + 1 / alone["decode"])
        short, _ = _timed_run(args, small, work / f"out-small-{r}")
        summary, sampler = _timed_run(args, src, work / f"out-{r}")
        assert summary.processed == args.images and short.processed == args.small_images, (summary, short)
        bound = min(("read", "decode", "embed", "write"), key=lambda k: alone[k])
        # Per-run fixed cost and per-image rate from the two run lengths: t = fixed + n / marginal.
        marginal = (args.images - args.small_images) / max(1e-9, summary.seconds - short.seconds)
        fixed = short.seconds - args.small_images / marginal
        cpu = sampler.cpu_by_role()
        rec = {
            **{f"{k}_img_s": round(v, 1) for k, v in alone.items()},
            "bound": bound,
            "e2e_img_s": summary.images_per_s,
            "e2e_s": summary.seconds,
            "ratio": round(summary.images_per_s / alone[bound], 3),
            "ratio_vs_operator": round(
                summary.images_per_s / min(alone["read+decode"], alone["embed"], alone["write"]), 3
            ),
            "small_run_s": short.seconds,
            "marginal_img_s": round(marginal, 1),
            "marginal_ratio": round(marginal / alone[bound], 3),
            "fixed_s": round(fixed, 2),
            "standalone_cpu_ms_per_img": round(1000 * alone_cpu / args.images, 3),
            "e2e_cpu_ms_per_img": round(1000 * sampler.cpu_seconds / args.images, 3),
            "e2e_cpu_s_by_process": {k: round(v, 2) for k, v in cpu.items()},
            "e2e_cpus_busy": round(sampler.cpu_seconds / summary.seconds, 2),
            "worker_processes_started": len(sampler.workers_started),
            "load_average": load,
        }
        rounds.append(rec)
        print(
            f"round {r + 1} (load average {load:.1f}): standalone img/s read {alone['read']:.0f}, "
            f"decode {alone['decode']:.0f}, embed {alone['embed']:.0f}, write {alone['write']:.0f} "
            f"(read+decode {alone['read+decode']:.0f})\n"
            f"  end to end {summary.images_per_s:.0f} img/s ({summary.seconds:.1f} s) → {rec['ratio']:.0%} "
            f"of {bound} ({rec['ratio_vs_operator']:.0%} of the slowest operator, read+decode as one)\n"
            f"  with a {args.small_images}-image run ({short.seconds:.1f} s): fixed cost per run "
            f"{fixed:.1f} s, marginal {marginal:.0f} img/s → {rec['marginal_ratio']:.0%} of {bound}\n"
            f"  CPU ms/image: stages alone {rec['standalone_cpu_ms_per_img']:.2f}, whole pipeline "
            f"{rec['e2e_cpu_ms_per_img']:.2f} ({rec['e2e_cpus_busy']:.2f} of {num_cpus} CPUs busy); CPU s: "
            + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items())
            + f"; {len(sampler.workers_started)} Ray worker processes started during the run",
            flush=True,
        )
    result: dict[str, Any] = {"rounds": rounds}
    for key in rounds[0]:
        vals = [r[key] for r in rounds]
        if isinstance(vals[0], (int, float)):
            result[key] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
    result["bound"] = statistics.mode(r["bound"] for r in rounds)
    ratio, marginal_ratio = result["ratio"], result["marginal_ratio"]
    print(
        f"\nefficiency (end to end ÷ slowest stage standalone, target ≥ 85 %): median "
        f"{ratio['median']:.0%}, range {ratio['min']:.0%}–{ratio['max']:.0%} over {len(rounds)} rounds; "
        f"bound stage: {result['bound']}; without the fixed per-run cost: {marginal_ratio['min']:.0%}–"
        f"{marginal_ratio['max']:.0%}"
    )
    if args.check_actors:
        # Enough blocks of DECODE_BATCH_ROWS that both actors get some (an actor takes up to 4 in flight).
        result["actor_start"] = check_actor_start(args, make_input(work, 2048, args.unique), work, num_cpus)
        a = result["actor_start"]
        print(
            f"actor pool, ActorPoolStrategy(size={a['requested']}) via --num-actors {a['requested']} "
            f"(× {a['actor_cpus']} CPU): {a['started']} actors constructed, spread "
            f"{a['construction_spread_s']} s; seconds after run() began (constructed / first batch): "
            + ", ".join(f"{x['constructed_s']} / {x['first_batch_s']}" for x in a["actors"])
        )
    return result


# ---------------------------------------------------------------------------------------------------------
# Memory


def tree(root: int) -> list[int]:
    """`root` and every process under it."""
    return [root, *descendants(root)]


def memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in kB from /proc/<pid>/smaps_rollup; (0, 0) when the process is gone."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of one process; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK


_TICK = os.sysconf("SC_CLK_TCK")


class TreeSampler(threading.Thread):
    """Samples this process and all its descendants (the local Ray cluster) every `interval` seconds.

    CPU: each process's CPU time when first and last seen (0 at first sight for processes that appear
    after the start), so workers that start and exit during the run count too, up to one interval each.
    Memory (`memory=True`): the peaks of the summed RSS and PSS.
    """

    def __init__(self, interval: float, memory: bool = False) -> None:
        super().__init__(daemon=True)
        self.interval, self.memory = interval, memory
        self.stop = threading.Event()
        self.peak_rss = self.peak_pss = self.peak_procs = self.samples = 0
        self._cpu_first: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}
        self._names: dict[int, str] = {}
        self._cpu_first_seen_at_start: set[int] = set()
        self.workers_started: set[int] = set()  # Ray worker processes that appeared during the run
        self.peak_pss_by_role: dict[str, tuple[int, int]] = {}  # role → (processes, kB) at the PSS peak
        self.peak_store = self.peak_total = self._store_kb = 0  # Ray's object store in use; PSS + that
        self.peak_pss_processes: list[tuple[float, str, str]] = []  # (MB, role, command) at the PSS peak
        self._sample(first=True)

    def _sample(self, first: bool = False) -> None:
        pids = tree(os.getpid())
        for pid in pids:
            cpu = cpu_seconds(pid)
            if cpu is not None:
                self._cpu_first.setdefault(pid, cpu if first else 0.0)
                if first:
                    self._cpu_first_seen_at_start.add(pid)
                self._cpu_last[pid] = cpu
                name = self._names.get(pid, "ray::IDLE")
                if name.startswith("ray::IDLE") or "default_worker" in name:  # workers retitle themselves
                    self._names[pid] = _cmdline(pid) or name
                if not first and pid not in self._cpu_first_seen_at_start and _is_worker(self._names[pid]):
                    self.workers_started.add(pid)
        if self.memory and not first:
            mem = {p: memory_kb(p) for p in pids}
            self.peak_rss = max(self.peak_rss, sum(m[0] for m in mem.values()))
            pss = sum(m[1] for m in mem.values())
            if self.samples % 5 == 1:
                self._store_kb = object_store_used_kb()
            self.peak_store = max(self.peak_store, self._store_kb)
            self.peak_total = max(self.peak_total, pss + self._store_kb)
            if pss > self.peak_pss:
                self.peak_pss = pss
                self.peak_pss_by_role = {}
                self.peak_pss_processes = sorted(
                    (
                        (round(kb / 1024, 1), self._role(pid), self._names.get(pid, "")[:60])
                        for pid, (_, kb) in mem.items()
                    ),
                    reverse=True,
                )
                for pid, (_, kb) in mem.items():
                    role = self._role(pid)
                    n, total = self.peak_pss_by_role.get(role, (0, 0))
                    self.peak_pss_by_role[role] = (n + 1, total + kb)
        self.peak_procs = max(self.peak_procs, len(pids))
        self.samples += 1

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            self._sample()

    def finish(self) -> None:
        self.stop.set()
        self.join()
        self._sample()

    @property
    def cpu_seconds(self) -> float:
        return sum(last - self._cpu_first[pid] for pid, last in self._cpu_last.items())

    def _role(self, pid: int) -> str:
        name = self._names.get(pid, "")
        if pid == os.getpid():
            return "driver"
        if "MapWorker" in name:
            return "model actor"
        if _is_worker(name):
            return "task workers"
        if "raylet" in name:
            return "raylet (object store)"
        return "ray internals"

    def cpu_by_role(self) -> dict[str, float]:
        """CPU seconds of the driver, the model actor(s), task workers and Ray's own processes."""
        roles = dict.fromkeys(("driver", "task workers", "model actor", "ray internals"), 0.0)
        for pid, last in self._cpu_last.items():
            role = self._role(pid)
            role = "ray internals" if role.startswith("raylet") else role
            roles[role] += last - self._cpu_first[pid]
        return roles


# Ray's own actors and agents (everything else named ray::… runs our tasks: read+decode, write, place).
_RAY_INTERNAL = ("_StatsActor", "AutoscalingCoordinator", "ActorLocationTracker", "Agent")


def _is_worker(name: str) -> bool:
    """A Ray worker process running (or ready to run) our tasks or actors, not one of Ray's own actors."""
    worker = name.startswith("ray::") or "default_worker" in name
    return worker and not any(x in name for x in _RAY_INTERNAL)


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read(200).replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def object_store_used_kb() -> int:
    """Bytes in Ray's object store (its own accounting), in kB.

    Objects live in shared memory (/dev/shm); a page a worker wrote is in no process's PSS once that worker
    has unmapped it, so the sum of PSS alone can miss them.
    """
    import ray

    total = ray.cluster_resources().get("object_store_memory", 0)
    free = ray.available_resources().get("object_store_memory", 0)
    return int(max(0, total - free) // 1024)


def idle_memory_kb() -> tuple[int, int]:
    mem = [memory_kb(p) for p in tree(os.getpid())]
    return sum(m[0] for m in mem), sum(m[1] for m in mem)


def memory(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import ray

    num_cpus = args.num_cpus or os.cpu_count() or 1
    sizes = [args.memory_images, 10 * args.memory_images]
    inputs = {n: make_input(work, n, args.unique) for n in sizes}
    print(
        f"peak memory of the local Ray cluster ({num_cpus} CPUs; driver + GCS + raylet + workers), "
        f"{args.model} at {args.image_size} px, fake model, sampled every {args.sample_s} s"
    )
    runs: dict[int, list[dict[str, Any]]] = {n: [] for n in sizes}
    for r in range(args.rounds):
        for n in sizes:
            start_ray(num_cpus, args.ray_default_workers)
            time.sleep(1.0)
            idle = idle_memory_kb()
            sampler = TreeSampler(args.sample_s, memory=True)
            sampler.start()
            out = work / f"out-mem-{n}-{r}"
            summary = run(
                job_config(args, inputs[n], out), embedder=FakeEmbedPatches, embedder_kwargs=fake_kwargs(args)
            )
            sampler.finish()
            ray.shutdown()
            shutil.rmtree(out, ignore_errors=True)
            assert summary.processed == n, summary
            rec = {
                "images": n,
                "peak_total_mb": round(sampler.peak_total / 1024, 1),
                "peak_pss_mb": round(sampler.peak_pss / 1024, 1),
                "peak_object_store_mb": round(sampler.peak_store / 1024, 1),
                "peak_rss_sum_mb": round(sampler.peak_rss / 1024, 1),
                "idle_pss_mb": round(idle[1] / 1024, 1),
                "processes": sampler.peak_procs,
                "peak_pss_mb_by_role": {
                    role: {"processes": n, "mb": round(kb / 1024, 1)}
                    for role, (n, kb) in sorted(sampler.peak_pss_by_role.items())
                },
                "peak_pss_processes": sampler.peak_pss_processes,
                "samples": sampler.samples,
                "img_s": summary.images_per_s,
            }
            runs[n].append(rec)
            print(
                f"round {r + 1}, {n:>6} images: peak PSS + object store {rec['peak_total_mb']:.0f} MB; "
                f"peak PSS {rec['peak_pss_mb']:.0f} MB (idle cluster {rec['idle_pss_mb']:.0f} MB), "
                f"peak object store {rec['peak_object_store_mb']:.0f} MB, "
                f"peak RSS sum {rec['peak_rss_sum_mb']:.0f} MB, {rec['processes']} processes, "
                f"{rec['samples']} samples, {rec['img_s']:.0f} img/s\n"
                "  at the peak, PSS MB (processes): "
                + ", ".join(
                    f"{role} {v['mb']:.0f} ({v['processes']})"
                    for role, v in rec["peak_pss_mb_by_role"].items()
                ),
                flush=True,
            )
    small, big = runs[sizes[0]], runs[sizes[1]]

    def ratio(key: str) -> list[float]:
        return [round(b[key] / s[key], 2) for s, b in zip(small, big)]

    result = {
        "runs": runs,
        "total_ratio": ratio("peak_total_mb"),
        "pss_ratio": ratio("peak_pss_mb"),
        "rss_sum_ratio": ratio("peak_rss_sum_mb"),
        "object_store_ratio": [
            round(b["peak_object_store_mb"] / max(s["peak_object_store_mb"], 0.1), 1)
            for s, b in zip(small, big)
        ],
    }
    print(
        f"\npeak memory, {sizes[1]} ÷ {sizes[0]} images (target ≤ 1.2): PSS + object store "
        f"{result['total_ratio']}; PSS {result['pss_ratio']}; RSS sum {result['rss_sum_ratio']}; "
        f"object store alone {result['object_store_ratio']}"
    )
    return result


# ---------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--memory", action="store_true", help="measure peak memory at N and 10N images instead")
    p.add_argument(
        "--images", type=int, default=24000, help="efficiency: images per run (default: %(default)s)"
    )
    p.add_argument(
        "--small-images", type=int, default=500, help="efficiency: the short run (default: %(default)s)"
    )
    p.add_argument("--memory-images", type=int, default=2000, help="memory: N (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default: 3, or 1 with --memory)")
    p.add_argument("--unique", type=int, default=64, help="distinct images generated (default: %(default)s)")
    p.add_argument(
        "--model", default="vit_ti_16", choices=sorted(PRESETS), help="preset (default: %(default)s)"
    )
    p.add_argument("--image-size", type=int, default=32, help="model input size (default: %(default)s)")
    p.add_argument("--num-classes", type=int, default=1000, help="fake logits width (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, help="images per model call (default: %(default)s)")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "float16"], help="embedding/logits dtype"
    )
    p.add_argument("--delay-s", type=float, default=0.0, help="fake model's sleep per batch (default: 0)")
    p.add_argument(
        "--ray-default-workers",
        action="store_true",
        help="start Ray with its default idle-worker killing (1 s) instead of the job's "
        "IDLE_WORKER_KEEP_MS, to compare",
    )
    p.add_argument("--num-cpus", type=int, default=None, help="local Ray CPUs (default: all)")
    p.add_argument(
        "--check-actors", type=int, default=2, help="actor-start check with this many actors (0: skip)"
    )
    p.add_argument(
        "--sample-s", type=float, default=0.05, help="memory sampling interval (default: %(default)s)"
    )
    p.add_argument(
        "--workdir", type=Path, default=None, help="inputs/outputs here (default: a temp dir, removed)"
    )
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.memory else 3
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        result = memory(args, work) if args.memory else efficiency(args, work)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
