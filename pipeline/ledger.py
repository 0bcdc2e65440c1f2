"""The output directory's ledger: which runs committed, which shards they covered, what model they used.

A run record `_runs/<run_id>.json` (counts, timings, model identity) plus `_runs/<run_id>.shards.parquet`
(one row per input shard: rel path, rows, errors) is written after the run's data files are in place, so a
record exists only for fully committed runs. A later run into the same output:

- skips the shards that committed runs already cover (incremental scheduled runs, re-runs after a crash);
- refuses to mix in rows from a different model, weights or preprocessing;
- removes data files of a run that has no record (a commit interrupted half-way) and stale staging files,
  then processes their shards again, so no row is ever visible twice.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.sink import write_json
from pipeline.sources import resolve_uri

log = logging.getLogger(__name__)

RUNS_DIR = "_runs"
STAGING_DIR = "_staging"
_PART = re.compile(r"^part-(?P<run>[0-9A-Za-z-]+?)-\d{5}\.parquet$")

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
    runs: dict[str, dict] = field(default_factory=dict)  # run_id → record
    done: dict[str, tuple[int, int]] = field(default_factory=dict)  # shard rel → (rows, errors)

    @classmethod
    def read(cls, output: str) -> Ledger:
        fs, root = resolve_uri(output)
        ledger = cls(output)
        infos = fs.get_file_info(pafs.FileSelector(f"{root}/{RUNS_DIR}", allow_not_found=True))
        for info in sorted(infos, key=lambda i: i.path):
            if info.path.endswith(".json"):
                with fs.open_input_stream(info.path) as s:
                    record = json.loads(s.read())
                ledger.runs[record["run_id"]] = record
        for run_id in ledger.runs:
            table = pq.read_table(f"{root}/{RUNS_DIR}/{run_id}.shards.parquet", filesystem=fs)
            for rel, rows, errors in zip(*(table[c].to_pylist() for c in ("shard", "rows", "errors"))):
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

    def clean_uncommitted(self) -> list[str]:
        """Deletes data files whose run has no record, and stale staging files. Returns what it removed."""
        fs, root = resolve_uri(self.output)
        removed = []
        try:
            fs.delete_dir(f"{root}/{STAGING_DIR}")
            removed.append(f"{STAGING_DIR}/")
        except (FileNotFoundError, OSError):
            pass
        for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
            name = info.base_name
            m = _PART.match(name)
            if info.type == pafs.FileType.File and m and m.group("run") not in self.runs:
                fs.delete_file(info.path)
                removed.append(name)
        if removed:
            log.warning("removed files of an interrupted earlier run from %s: %s", self.output, removed[:5])
        return removed


def record_run(output: str, record: dict, shards: Iterable[tuple[str, int, int]]) -> None:
    """Writes the shard table, then the run record: the record's presence is the commit."""
    fs, root = resolve_uri(output)
    fs.create_dir(f"{root}/{RUNS_DIR}", recursive=True)
    shards = list(shards)
    rels, rows, errors = zip(*shards) if shards else ((), (), ())
    table = pa.table(
        {
            "shard": pa.array(rels, pa.string()),
            "rows": pa.array(rows, pa.int64()),
            "errors": pa.array(errors, pa.int64()),
        }
    )
    run_id = record["run_id"]
    pq.write_table(table, f"{root}/{RUNS_DIR}/{run_id}.shards.parquet", filesystem=fs)
    write_json(fs, f"{root}/{RUNS_DIR}/{run_id}.json", record)
