"""Walking an input tree in sorted pages, split into listing partitions that workers list in parallel.

A partition is a directory's own files (`recursive=False`) or everything under a directory
(`recursive=True`), named by its path relative to the input root ('' or ending in '/'). `explore` finds
them on the driver by listing directories breadth-first, one page each, until it has `target` partitions: a
directory whose first page does not hold all of its entries becomes a recursive partition without being
listed further. `Walker.pages(partition)` then lists one partition as pages of (path, rel, size) entries in
`rel` order (UTF-8 byte order, which is S3's listing order and Python's string order), so a page can be
checked against the ledger's sorted index and grouped into units the same way every time.

On S3 a directory listing is a ListObjectsV2 with Delimiter '/' and a recursive one a plain prefix listing,
1,000 keys per request; locally it is os.scandir. Names with a path component starting with '_' or '.' are
skipped, as are directory markers (keys ending in '/'); symlinked directories are not entered.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from pipeline import storage

Entry = tuple[str, str, int]  # (path in the input's filesystem, rel, size)
PAGE = 1000  # entries per page: one S3 ListObjectsV2 response
EXPLORE_FILES = 1000  # files the driver reads of one directory (one S3 request) before leaving it whole
EXPLORE_DIRS = 100_000  # subdirectories the driver reads of one directory
EXPLORE_TARGET = 256  # listing partitions the driver looks for
SAMPLE = 1000  # files the exploration keeps, to tell loose images from tar or Parquet shards
EXPLORE_THREADS = 16  # directories of one level listed at once (S3 requests wait on the network)


@dataclass(frozen=True)
class Partition:
    id: int
    prefix: str  # directory relative to the input root: '' or ending in '/'
    recursive: bool  # everything under `prefix`, or only the files directly in it
    files: tuple[Entry, ...] | None = None  # those files, when the driver's exploration already listed them


def _hidden_name(name: str) -> bool:
    return name.startswith(("_", "."))


def hidden(rel: str) -> bool:
    """True for a path with a component starting with ``_`` or ``.`` (bookkeeping, never an input)."""
    return any(_hidden_name(part) for part in rel.split("/"))


class Walker:
    """Lists one input root (a local directory or an s3://bucket/prefix); picklable, for workers."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        fs, self.root = storage.resolve_uri(uri)
        self.local = isinstance(fs, pafs.LocalFileSystem)
        self._client: Any = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None}

    def path(self, rel: str) -> str:
        """The path of the input's object `rel` in its filesystem."""
        return os.path.join(self.root, *rel.split("/")) if self.local else f"{self.root}/{rel}"

    # One directory ------------------------------------------------------------------------------------

    def list_dir(
        self, prefix: str, file_limit: int | None = None, dir_limit: int | None = None
    ) -> tuple[list[Entry], list[str], bool]:
        """The files and subdirectories (as prefixes ending in '/') directly in `prefix`, sorted, and
        whether that is all of them: reading stops at `file_limit` files or `dir_limit` directories."""
        files: list[Entry] = []
        dirs: list[str] = []
        complete = True
        for kind, item in self._dir_entries(prefix):
            full = files if kind == "file" else dirs
            limit = file_limit if kind == "file" else dir_limit
            if limit is not None and len(full) >= limit:
                complete = False
                break
            full.append(item)  # type: ignore[arg-type]
        return sorted(files, key=lambda e: e[1]), sorted(dirs), complete

    def _dir_entries(self, prefix: str) -> Iterator[tuple[str, Entry | str]]:
        if self.local:
            yield from self._local_dir(prefix)
        else:
            for page in self._s3_pages(prefix, delimiter=True):
                yield from page

    def _local_dir(self, prefix: str) -> Iterator[tuple[str, Entry | str]]:
        top = os.path.join(self.root, prefix) if prefix else self.root
        with os.scandir(top) as it:
            for entry in it:
                if _hidden_name(entry.name):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    yield "dir", f"{prefix}{entry.name}/"
                    continue
                try:
                    st = os.stat(entry.path)
                except FileNotFoundError:  # a dangling symlink: the read stage reports it
                    yield "file", (entry.path, prefix + entry.name, 0)
                    continue
                if stat.S_ISREG(st.st_mode):
                    yield "file", (entry.path, prefix + entry.name, st.st_size)

    # A partition ---------------------------------------------------------------------------------------

    def pages(self, partition: Partition, size: int = PAGE) -> Iterator[list[Entry]]:
        """The partition's files in `rel` order, `size` at a time."""
        if partition.recursive:
            entries = self._local_tree(partition.prefix) if self.local else self._s3_tree(partition.prefix)
        elif partition.files is not None:
            entries = iter(partition.files)
        else:
            files, _, _ = self.list_dir(partition.prefix)
            entries = iter(files)
        page: list[Entry] = []
        for entry in entries:
            page.append(entry)
            if len(page) == size:
                yield page
                page = []
        if page:
            yield page

    def first(self, limit: int) -> tuple[list[Entry], bool]:
        """The first `limit` files of the whole input in `rel` order, and whether that is all of them."""
        entries: list[Entry] = []
        tree = self._local_tree("") if self.local else self._s3_tree("")
        for entry in tree:
            if len(entries) == limit:
                return entries, False
            entries.append(entry)
        return entries, True

    def _local_tree(self, prefix: str) -> Iterator[Entry]:
        files, dirs, _ = self.list_dir(prefix)
        # A directory 'a/' sorts as 'a/' among its siblings' names, so a depth-first walk in that order
        # yields every rel in string order ('a.txt' < 'a/x' < 'a0').
        children: list[tuple[str, Entry | None]] = [(e[1], e) for e in files] + [(d, None) for d in dirs]
        for name, entry in sorted(children, key=lambda c: c[0]):
            if entry is None:
                yield from self._local_tree(name)
            else:
                yield entry

    def _s3_tree(self, prefix: str) -> Iterator[Entry]:
        for page in self._s3_pages(prefix, delimiter=False):
            for _, entry in page:
                yield entry  # type: ignore[misc]

    def _s3_pages(self, prefix: str, delimiter: bool) -> Iterator[list[tuple[str, Entry | str]]]:
        bucket, _, base = self.root.partition("/")
        base = f"{base}/" if base else ""
        if self._client is None:
            self._client = storage.s3_client()
        args = {"Bucket": bucket, "Prefix": base + prefix, "PaginationConfig": {"PageSize": PAGE}}
        if delimiter:
            args["Delimiter"] = "/"
        for response in self._client.get_paginator("list_objects_v2").paginate(**args):
            page: list[tuple[str, Entry | str]] = []
            for item in response.get("CommonPrefixes", []):
                rel = item["Prefix"][len(base) :]
                if not _hidden_name(rel[len(prefix) :].rstrip("/")):
                    page.append(("dir", rel))
            for item in response.get("Contents", []):
                key = item["Key"]
                rel = key[len(base) :]
                if key.endswith("/") or hidden(rel[len(prefix) :]):
                    continue
                page.append(("file", (f"{bucket}/{key}", rel, int(item.get("Size", 0)))))
            yield page


@dataclass
class Exploration:
    partitions: list[Partition]
    files: int  # files the driver saw
    sample: list[Entry]  # the first of them, up to SAMPLE
    complete: bool  # True: the driver saw every file (no partition is left to a worker to discover)


def explore(walker: Walker, target: int = EXPLORE_TARGET) -> Exploration:
    """Listing partitions for `walker`'s input: directories are listed breadth-first on this process, a level
    at a time in EXPLORE_THREADS threads, until there are `target` partitions or no directory is left to
    split. A directory's own files are a partition, which carries them (they are not listed twice); a
    directory with more than EXPLORE_FILES files (or EXPLORE_DIRS subdirectories) is left whole to a worker,
    so a flat prefix is listed by one worker, in order. Partitions are numbered in prefix order."""
    found: list[tuple[str, bool, tuple[Entry, ...] | None]] = []
    level, files, complete = [""], 0, True
    sample: list[Entry] = []
    with ThreadPoolExecutor(EXPLORE_THREADS, thread_name_prefix="explore") as pool:
        while level and len(found) + len(level) < target:
            following = []
            for prefix, (entries, dirs, whole) in zip(
                level, pool.map(lambda p: walker.list_dir(p, EXPLORE_FILES, EXPLORE_DIRS), level), strict=True
            ):
                files += len(entries)
                sample += entries[: SAMPLE - len(sample)]
                if not whole:
                    found.append((prefix, True, None))
                    complete = False
                    continue
                if entries:  # listed whole (at most EXPLORE_FILES): the worker is handed them
                    found.append((prefix, False, tuple(entries)))
                following += dirs
            level = following
    found += [(prefix, True, None) for prefix in level]
    complete = complete and not level
    found.sort(key=lambda f: (f[0], f[1]))
    partitions = [
        Partition(i, prefix, recursive, files) for i, (prefix, recursive, files) in enumerate(found)
    ]
    return Exploration(partitions, files, sample, complete)
