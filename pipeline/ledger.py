"""The output directory's ledger: which units of work are committed, by which run, with which model.

    _runs/<run_id>/run.json              identity (model, weights sha256, preprocessing), written at start
    _runs/<run_id>/commit-<seq>.json     one per commit: the data files moved into place and the input
                                         shards they complete (rel path, rows, errors); written after the
                                         files are in place, so it is the commit point
    _runs/<run_id>/summary.json          counts and timings, written when the run ends
    _runs/<run_id>/heartbeat.json        host, pid and time, rewritten every HEARTBEAT_S while it runs

A later run into the same output:

- skips the shards that commit records cover (re-runs after a crash, incremental scheduled runs);
- refuses to mix in rows from a different model, weights or preprocessing;
- refuses to start while another run is writing there (its heartbeat is fresh and, on this host, its
  process is alive): two runs would process the same shards;
- deletes data files that no commit record names (a commit interrupted between moving files and writing
  its record) and stale staging files, then processes their shards again, so no row is visible twice.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field

import pyarrow.fs as pafs

from pipeline.sink import STAGING_DIR, make_dirs, write_json
from pipeline.storage import resolve_uri

log = logging.getLogger(__name__)

RUNS_DIR = "_runs"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 4 * HEARTBEAT_S
_PART = re.compile(r"^part-.+\.parquet$")
_COMMIT = re.compile(r"^commit-\d+\.json$")

# Identity fields that must match between runs sharing one output directory.
IDENTITY_KEYS = (
    "model",
    "weights_sha256",
    "source_format",
    "image_size",
    "patch_size",
    "resize_size",
    "mean",
    "std",
    "preprocessing",
    "embedding_dtype",
    "logits_dtype",
)


class OutputConflictError(ValueError):
    """The output directory holds rows made with a different model or preprocessing."""


@dataclass
class Ledger:
    output: str
    runs: dict[str, dict] = field(default_factory=dict)  # run_id → run.json
    done: dict[str, tuple[int, int]] = field(default_factory=dict)  # shard rel → (rows, errors)
    files: set[str] = field(default_factory=set)  # committed data file names
    finished: set[str] = field(default_factory=set)  # runs with a summary
    heartbeats: dict[str, dict] = field(default_factory=dict)  # run_id → last heartbeat

    @classmethod
    def read(cls, output: str) -> Ledger:
        fs, root = resolve_uri(output)
        ledger = cls(output)
        infos = fs.get_file_info(
            pafs.FileSelector(f"{root}/{RUNS_DIR}", recursive=True, allow_not_found=True)
        )
        for info in sorted(infos, key=lambda i: i.path):
            if info.type != pafs.FileType.File:
                continue
            name, run_id = info.base_name, info.path.rsplit("/", 2)[-2]
            if name == "run.json":
                ledger.runs[run_id] = _read_json(fs, info.path)
            elif name == "summary.json":
                ledger.finished.add(run_id)
            elif name == "heartbeat.json":
                ledger.heartbeats[run_id] = _read_json(fs, info.path)
            elif _COMMIT.match(name):
                record = _read_json(fs, info.path)
                ledger.files.update(record["files"])
                for rel, rows, errors in record["shards"]:
                    ledger.done[rel] = (rows, errors)
        return ledger

    def check_identity(self, identity: dict[str, str]) -> None:
        """Raises OutputConflictError if an earlier run used another model or preprocessing."""
        for run_id, record in self.runs.items():
            theirs = record.get("identity", {})
            diff = [k for k in IDENTITY_KEYS if str(theirs.get(k)) != str(identity.get(k))]
            if diff:
                details = "; ".join(
                    f"{k}: {theirs.get(k)!r} there, {identity.get(k)!r} now" for k in diff[:3]
                )
                raise OutputConflictError(
                    f"{self.output} already holds rows from run {run_id} made with a different model or "
                    f"preprocessing ({details}); write to a new --output so the two never mix."
                )

    def check_no_active_run(self, now: float | None = None) -> None:
        """Raises OutputConflictError while another run is writing into this output."""
        now = time.time() if now is None else now
        for run_id, beat in self.heartbeats.items():
            if run_id in self.finished:
                continue
            same_host = beat.get("host") == socket.gethostname()
            if (same_host and not _alive(int(beat.get("pid", 0)))) or now - beat.get(
                "time", 0
            ) > STALE_AFTER_S:
                continue  # it died: its uncommitted files are cleaned up and its shards redone
            raise OutputConflictError(
                f"run {run_id} (host {beat.get('host')}, pid {beat.get('pid')}) is still writing to "
                f"{self.output}: wait for it to finish; if it died on another machine, this output is free "
                f"{STALE_AFTER_S:.0f} s after its last heartbeat."
            )

    def clean_uncommitted(self) -> list[str]:
        """Deletes stale staging files and data files no commit names. Returns what it removed."""
        fs, root = resolve_uri(self.output)
        removed = []
        try:
            if fs.get_file_info(pafs.FileSelector(f"{root}/{STAGING_DIR}", allow_not_found=True)):
                fs.delete_dir(f"{root}/{STAGING_DIR}")
                removed.append(f"{STAGING_DIR}/")
        except (FileNotFoundError, OSError) as e:
            log.debug("no staging to remove: %s", e)
        for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
            name = info.base_name
            if info.type == pafs.FileType.File and _PART.match(name) and name not in self.files:
                fs.delete_file(info.path)
                removed.append(name)
        if removed:
            log.warning(
                "removed uncommitted files of an interrupted run from %s: %s", self.output, removed[:5]
            )
        return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


def _read_json(fs: pafs.FileSystem, path: str) -> dict:
    with fs.open_input_stream(path) as s:
        return json.loads(s.read())


class RunLedger:
    """The current run's side of the ledger: start record, commit records, summary."""

    def __init__(self, output: str, run_id: str) -> None:
        self.output, self.run_id = output, run_id
        self.seq = 0
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _path(self, name: str) -> tuple[pafs.FileSystem, str]:
        fs, root = resolve_uri(self.output)
        return fs, f"{root}/{RUNS_DIR}/{self.run_id}/{name}"

    def start(self, record: dict) -> None:
        """Writes run.json and starts the heartbeat that tells other runs this output is in use."""
        fs, path = self._path("run.json")
        make_dirs(fs, path.rsplit("/", 1)[0])
        self.heartbeat()
        write_json(fs, path, record)
        self._beat = threading.Thread(target=self._beat_loop, name="ledger-heartbeat", daemon=True)
        self._beat.start()

    def heartbeat(self) -> None:
        fs, path = self._path("heartbeat.json")
        write_json(fs, path, {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()})

    def _beat_loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.heartbeat()
            except OSError as e:  # storage hiccup: the next beat will try again
                log.warning("could not write the run's heartbeat: %s", e)

    def stop(self) -> None:
        self._stop.set()

    def record_commit(self, files: list[str], shards: dict[str, tuple[int, int]]) -> None:
        """Writes the commit record: from here on these shards are done and these files are data."""
        self.seq += 1
        fs, path = self._path(f"commit-{self.seq:06d}.json")
        record = {
            "files": sorted(files),
            "shards": [[rel, r, e] for rel, (r, e) in sorted(shards.items())],
        }
        write_json(fs, path, record)

    def finish(self, summary: dict) -> None:
        self.stop()
        fs, path = self._path("summary.json")
        write_json(fs, path, summary)
