"""The output's ledger: which units of work are committed, by which run, with which model.

    _runs/<run_id>/run.json              identity (model, weights sha256, preprocessing), written at start
    _runs/<run_id>/commit-<seq>.json     one per commit: for each unit, its staged file, the data file it
                                         becomes, and the input shards it completes (rel, rows, errors);
                                         written BEFORE the staged files are moved into place, so it is the
                                         commit point and every data file a reader sees is committed
    _runs/<run_id>/summary.json          counts and timings, written when the run ends
    _ledger/                             the index: the commit records of earlier runs folded into sorted
                                         Parquet segments (pipeline/ledger_index.py)

A later run into the same output (see pipeline/lease.py for how runs take turns):

- skips the shards that the index and the commit records cover (re-runs after a crash, incremental
  scheduled runs), checking a sorted listing against them page by page;
- refuses to mix in rows from a different model, weights, seed or preprocessing;
- finishes the moves of committed units whose staged file is still there (a crash between the record and
  the moves), then deletes data files that nothing committed names and everything else under `_staging/`;
- folds the commit records of earlier runs into the index and deletes them (`compact`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from pipeline import storage
from pipeline.ledger_index import SHARDS_SCHEMA, CommittedShards, FileEntry, Index
from pipeline.sink import STAGING_DIR
from pipeline.storage import make_dirs, read_json, relative_path, resolve_uri, write_json

log = logging.getLogger(__name__)

RUNS_DIR = "_runs"
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
    "seed",
    "columns",  # the output's columns and types (pipeline.sink.OutputSpec.columns): one schema per output
)
# Identity fields that older outputs may not record; compared only when both runs record them.
_OPTIONAL_IDENTITY_KEYS = ("seed",)


def _columns_diff(theirs: str | None, ours: str | None) -> str:
    """What differs between two OutputSpec.columns() lines, in words."""
    if theirs is None:
        return "written by an earlier version of the output schema, without a record of its columns"
    a, b = theirs.split("; "), (ours or "").split("; ")
    gone, new = [c for c in a if c not in b], [c for c in b if c not in a]
    parts = ([f"there, not now: {', '.join(gone)}"] if gone else []) + (
        [f"now, not there: {', '.join(new)}"] if new else []
    )
    return ". ".join(parts) or "the same columns in another order"


class OutputConflictError(ValueError):
    """The output directory holds rows made with a different model or preprocessing."""


@dataclass(frozen=True)
class UnitRecord:
    """One unit in a commit record: `staged` (relative to the output) becomes the data file `file`."""

    file: str | None  # None: the unit produced no row (e.g. an empty tar) and has no file
    staged: str | None
    shards: dict[str, tuple[int, int]]  # input shard rel → (rows, errors) in `file`
    replaces: bool = False  # True: `file` was already committed and this is a new version of it

    def to_json(self) -> dict:
        return {
            "file": self.file,
            "staged": self.staged,
            "shards": [[rel, r, e] for rel, (r, e) in sorted(self.shards.items())],
            "replaces": self.replaces,
        }

    @classmethod
    def from_json(cls, d: dict) -> UnitRecord:
        return cls(
            d["file"], d["staged"], {rel: (r, e) for rel, r, e in d["shards"]}, d.get("replaces", False)
        )


@dataclass
class Ledger:
    output: str
    runs: dict[str, dict] = field(default_factory=dict)  # run_id → run.json
    files: dict[str, FileEntry] = field(default_factory=dict)  # committed data files in place or pending
    pending: list[tuple[str, str]] = field(default_factory=list)  # committed (staged, file) not yet moved
    lost: list[str] = field(default_factory=list)  # committed files found neither in place nor staged
    finished: set[str] = field(default_factory=set)  # runs with a summary
    index: Index | None = None  # the folded commit records (pipeline/ledger_index.py)
    records: pa.Table = field(default_factory=SHARDS_SCHEMA.empty_table)  # shards of unfolded records
    record_paths: list[str] = field(default_factory=list)  # those records, relative to the output

    @classmethod
    def read(cls, output: str) -> Ledger:
        """Reads the runs, the index's file list and the commit records not yet folded into the index;
        which shards are committed is asked page by page (`done_in`), never loaded whole."""
        fs, root = resolve_uri(output)
        index = Index(output)
        ledger = cls(output, index=index)
        infos = fs.get_file_info(
            pafs.FileSelector(f"{root}/{RUNS_DIR}", recursive=True, allow_not_found=True)
        )
        folded = set(index.folded)
        records = []
        for info in sorted(infos, key=lambda i: i.path):  # run ids start with their UTC start time
            if info.type != pafs.FileType.File:
                continue
            name, run_id = info.base_name, info.path.rsplit("/", 2)[-2]
            if name == "run.json":
                ledger.runs[run_id] = read_json(fs, info.path)
            elif name == "summary.json":
                ledger.finished.add(run_id)
            elif _COMMIT.match(name) and relative_path(root, info.path) not in folded:
                ledger.record_paths.append(relative_path(root, info.path))
                records.append(read_json(fs, info.path))
        ledger.files = index.files()
        units = [unit for record in records for unit in _units(record)]
        ledger.records = _shard_rows(units)
        for unit in units:
            if unit.file is not None:
                rels = sorted(unit.shards)
                rows, errors = (sum(c[i] for c in unit.shards.values()) for i in (0, 1))
                ledger.files[unit.file] = FileEntry(len(rels), rels[0] if rels else "", rows, errors)
        if not ledger.files:
            return ledger
        placed = {i.base_name for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))}
        staged = {
            relative_path(root, i.path)
            for i in fs.get_file_info(
                pafs.FileSelector(f"{root}/{STAGING_DIR}", recursive=True, allow_not_found=True)
            )
            if i.type == pafs.FileType.File
        }
        for unit in units:
            if unit.file is not None and unit.staged in staged:
                ledger.pending.append((unit.staged, unit.file))  # type: ignore[arg-type]
        moving = {file for _, file in ledger.pending}
        ledger.lost = sorted(f for f in ledger.files if f not in placed and f not in moving)
        for file in ledger.lost:  # deleted by hand: their shards are redone
            del ledger.files[file]
        if ledger.lost:
            log.warning(
                "%d committed data file(s) of %s are missing (e.g. %s): their inputs are processed again",
                len(ledger.lost),
                output,
                ledger.lost[0],
            )
        return ledger

    def shards(self) -> CommittedShards:
        """Which input shards are committed, as workers can ask it (picklable)."""
        return CommittedShards(self.index or Index(self.output), self.records, list(self.lost))

    def done_in(self, rels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """See CommittedShards.done_in."""
        return self.shards().done_in(rels)

    def committed(self) -> dict[str, tuple[int, int]]:
        """See CommittedShards.all."""
        return self.shards().all()

    def compact(self, segment: str, delete: bool = True) -> None:
        """Folds the commit records not yet in the index into it (as segment `segment`) and deletes them
        (`delete=False`: they stay, skipped by readers, until the next fold). Run it while holding the
        output's lease, after `recover`."""
        if self.index is None:
            self.index = Index(self.output)
        self.index.fold(self.records, self.record_paths, segment, delete)
        self.records, self.record_paths = SHARDS_SCHEMA.empty_table(), []

    def check_identity(self, identity: dict[str, str]) -> None:
        """Raises OutputConflictError if an earlier run used another model or preprocessing."""
        for run_id, record in self.runs.items():
            theirs = record.get("identity", {})
            diff = [
                k
                for k in IDENTITY_KEYS
                if str(theirs.get(k)) != str(identity.get(k))
                and not (k in _OPTIONAL_IDENTITY_KEYS and k not in theirs)
            ]
            if diff == ["columns"]:
                raise OutputConflictError(
                    f"{self.output} already holds rows from run {run_id} with other columns "
                    f"({_columns_diff(theirs.get('columns'), identity.get('columns'))}); rerun with that "
                    "run's options (--topk, --logits, --class-names, --keep-columns) or write to a new "
                    "--output, so that one output has one schema."
                )
            if diff:
                details = "; ".join(
                    f"{k}: {theirs.get(k)!r} there, {identity.get(k)!r} now"
                    for k in [k for k in diff if k != "columns"][:3]
                )
                raise OutputConflictError(
                    f"{self.output} already holds rows from run {run_id} made with a different model or "
                    f"preprocessing ({details}); write to a new --output so the two never mix."
                )

    def recover(self) -> list[str]:
        """Finishes the moves of committed units still staged, then deletes data files that no record
        names and the rest of `_staging/`. Run it while holding the output's lease. Returns what it
        removed."""
        fs, root = resolve_uri(self.output)
        for staged, file in self.pending:
            log.warning("finishing the commit of %s in %s", file, self.output)
            storage.move(fs, f"{root}/{staged}", f"{root}/{file}")
        self.pending = []
        removed = [f"{STAGING_DIR}/"] if storage.delete_tree(fs, f"{root}/{STAGING_DIR}") else []
        for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
            name = info.base_name
            if info.type == pafs.FileType.File and _PART.match(name) and name not in self.files:
                storage.delete_file(fs, info.path)
                removed.append(name)
        if removed:
            log.warning(
                "removed uncommitted files of an interrupted run from %s: %s", self.output, removed[:5]
            )
        return removed


def _shard_rows(units: list[UnitRecord]) -> pa.Table:
    """The shards of `units` as index rows (rel, rows, errors, file), in record order."""
    entries = [(rel, r, e, u.file) for u in units for rel, (r, e) in u.shards.items()]
    return pa.table(
        {name: [entry[i] for entry in entries] for i, name in enumerate(SHARDS_SCHEMA.names)},
        schema=SHARDS_SCHEMA,
    )


def _units(record: dict) -> list[UnitRecord]:
    """The units of a commit record; records written before per-unit records name placed files only."""
    if "units" in record:
        return [UnitRecord.from_json(u) for u in record["units"]]
    shards = {rel: (r, e) for rel, r, e in record["shards"]}
    files = record["files"]
    return [UnitRecord(f, None, shards if i == 0 else {}) for i, f in enumerate(files)] or [
        UnitRecord(None, None, shards)
    ]


def compact_output(output: str, segment: str) -> None:
    """Folds the output's commit records into its index, leaving them in place until the next fold (what a
    run does at its end: its records stay readable); hold the output's lease."""
    Ledger.read(output).compact(segment, delete=False)


class RunLedger:
    """The current run's side of the ledger: start record, commit records, summary."""

    def __init__(self, output: str, run_id: str) -> None:
        self.output, self.run_id = output, run_id
        self.seq = 0

    def _path(self, name: str) -> tuple[pafs.FileSystem, str]:
        fs, root = resolve_uri(self.output)
        return fs, f"{root}/{RUNS_DIR}/{self.run_id}/{name}"

    def start(self, record: dict) -> None:
        """Writes run.json: the run's identity."""
        fs, path = self._path("run.json")
        make_dirs(fs, path.rsplit("/", 1)[0])
        write_json(fs, path, record)

    def record_commit(self, units: list[UnitRecord]) -> None:
        """Writes the commit record: from here on these units are committed, even before their staged
        files are moved into place (a later run finishes the moves)."""
        self.seq += 1
        fs, path = self._path(f"commit-{self.seq:06d}.json")
        write_json(fs, path, {"units": [u.to_json() for u in units]})

    def finish(self, summary: dict) -> None:
        fs, path = self._path("summary.json")
        write_json(fs, path, summary)
