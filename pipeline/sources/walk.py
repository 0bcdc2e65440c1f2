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

import bisect
import dataclasses
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
# Files the driver reads of one directory before leaving it whole: one S3 page holds them and the next
# file, so a larger directory costs the exploration one request.
EXPLORE_FILES = PAGE - 1
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
    # A key range of a recursive partition: only the rels r with after < r <= upto (None: unbounded).
    after: str | None = None
    upto: str | None = None

    def holds(self, rel: str) -> bool:
        return (self.after is None or rel > self.after) and (self.upto is None or rel <= self.upto)


def _hidden_name(name: str) -> bool:
    return name.startswith(("_", "."))


def object_path(root: str, rel: str, local: bool) -> str:
    """The path of object `rel` under an input root (resolve_uri's path) in its filesystem."""
    return os.path.join(root, *rel.split("/")) if local else f"{root}/{rel}"


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
        return object_path(self.root, rel, self.local)

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
        entries: Iterator[Entry]
        if partition.recursive and self.local:
            entries = self._local_tree(partition.prefix, partition.after)
        elif partition.recursive:
            entries = self._s3_tree(partition.prefix, partition.after)
        elif partition.files is not None:
            entries = iter(partition.files)
        else:
            files, _, _ = self.list_dir(partition.prefix)
            entries = iter(files)
        page: list[Entry] = []
        for entry in _in_range(entries, partition):
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

    def _local_tree(self, prefix: str, after: str | None = None) -> Iterator[Entry]:
        """Every file under `prefix` in rel order; with `after`, the directories whose every rel comes
        before it are not entered (the files are left to `_in_range`)."""
        files, dirs, _ = self.list_dir(prefix)
        # A directory 'a/' sorts as 'a/' among its siblings' names, so a depth-first walk in that order
        # yields every rel in string order ('a.txt' < 'a/x' < 'a0').
        children: list[tuple[str, Entry | None]] = [(e[1], e) for e in files] + [(d, None) for d in dirs]
        for name, entry in sorted(children, key=lambda c: c[0]):
            if entry is not None:
                yield entry
            elif after is None or name > after or after.startswith(name):
                yield from self._local_tree(name, after)

    def _s3_tree(self, prefix: str, after: str | None = None) -> Iterator[Entry]:
        for page in self._s3_pages(prefix, delimiter=False, after=after):
            for _, entry in page:
                yield entry  # type: ignore[misc]

    def keys_after(self, partition: Partition, start: str | None) -> tuple[list[str], bool]:
        """One S3 request: the rels of `partition`'s range after `start` (None: from its beginning), a probe
        (PROBE_KEYS) at most, and whether the range goes on past them."""
        response = next(iter(self._s3_responses(partition.prefix, False, start, min(PROBE_KEYS, PAGE))), {})
        base = self._base()
        rels = [item["Key"][len(base) :] for item in response.get("Contents", [])]
        inside = [rel for rel in rels if partition.holds(rel)]
        return inside, bool(response.get("IsTruncated")) and len(inside) == len(rels)

    def _base(self) -> str:
        _, _, base = self.root.partition("/")
        return f"{base}/" if base else ""

    def _s3_responses(
        self, prefix: str, delimiter: bool, after: str | None = None, size: int | None = None
    ) -> Iterator[dict]:
        bucket, _, _ = self.root.partition("/")
        base = self._base()
        if self._client is None:
            self._client = storage.shared_s3_client(parse_timestamps=False)  # only keys and sizes are read
        args: dict[str, Any] = {
            "Bucket": bucket,
            "Prefix": base + prefix,
            "PaginationConfig": {"PageSize": size or PAGE},
        }
        if delimiter:
            args["Delimiter"] = "/"
        if after is not None:
            args["StartAfter"] = base + after  # keys after it, in S3's (UTF-8 byte) order
        yield from self._client.get_paginator("list_objects_v2").paginate(**args)

    def _s3_pages(
        self, prefix: str, delimiter: bool, after: str | None = None
    ) -> Iterator[list[tuple[str, Entry | str]]]:
        bucket, _, _ = self.root.partition("/")
        base = self._base()
        for response in self._s3_responses(prefix, delimiter, after):
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


def _in_range(entries: Iterator[Entry], partition: Partition) -> Iterator[Entry]:
    """The entries of a sorted stream that lie in the partition's key range."""
    for entry in entries:
        if partition.upto is not None and entry[1] > partition.upto:
            return
        if partition.after is None or entry[1] > partition.after:
            yield entry


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
    parts = [Partition(-1, prefix, recursive, entries) for prefix, recursive, entries in found]
    if not walker.local:
        parts = split_ranges(walker, parts, target)
    parts.sort(key=lambda p: (p.prefix, p.recursive, p.after is not None, p.after or ""))
    partitions = [dataclasses.replace(p, id=i) for i, p in enumerate(parts)]
    return Exploration(partitions, files, sample, complete)


# Key-range boundaries: a range is cut at `shared + c` for each of these characters, in byte order; keys
# with other characters there fall into the ranges around them.
DESCEND = [chr(c) for c in range(0x21, 0x7F)]
# Non-ASCII names split coarsely, by blocks of code points (UTF-8 keeps their order).
SPLIT_CHARS = [*DESCEND, "\x7f", "\u0100", "\u0800", "\u3000", "\u4e00", "\u7000", "\uac00", "\U00010000"]
MAX_SPLIT_DEPTH = 64  # characters a range's keys may share before it is left whole
MIN_SPLIT_PAGES = 16  # a range estimated at fewer pages is listed, not cut
# Keys one request reads while cutting ranges: enough to estimate a range's size, and a tenth of a page's
# transfer and parsing (the driver makes these requests, one after another for each range it descends).
PROBE_KEYS = 100
ESTIMATE_BYTES = 8  # bytes of a key read as a number by estimated_pages


def estimated_pages(p: Partition, page: list[str]) -> float:
    """How many pages of len(`page`) keys `p`'s key range holds, from its first such page: the range's
    width over the page's, keys read as numbers after the bytes the range's bounds share, in the base of
    the byte values seen (16 and a few for hex names, 10 for digits). Within a few times the truth for
    hashed and numbered names; an overestimate only makes a range look worth cutting."""
    lo = (p.prefix if p.after is None else p.after).encode()
    hi = p.prefix.encode() + b"\xff" if p.upto is None else p.upto.encode()
    shared = len(os.path.commonprefix([lo, hi]))  # noqa: RUF071
    keys = [k.encode()[shared : shared + ESTIMATE_BYTES] for k in (page[0], page[-1])]
    seen = {b for k in page for b in k.encode()[shared : shared + ESTIMATE_BYTES]}
    alphabet = sorted(
        seen | set(lo[shared : shared + ESTIMATE_BYTES]) | set(hi[shared : shared + ESTIMATE_BYTES])
    )
    base = len(alphabet) + 1  # 0: past the end of a shorter key

    def at(key: bytes) -> int:
        value = 0
        for i in range(ESTIMATE_BYTES):
            value = value * base + (bisect.bisect_left(alphabet, key[i]) + 1 if i < len(key) else 0)
        return value

    width = at(keys[1]) - at(keys[0])
    return (at(hi[shared:]) - at(lo[shared:])) / width if width > 0 else float("inf")


def _large(p: Partition, probe: list[str]) -> bool:
    """Whether `p`'s range holds MIN_SPLIT_PAGES pages or more, from a probe of its first keys."""
    return estimated_pages(p, probe) * len(probe) / PAGE >= MIN_SPLIT_PAGES


def split_ranges(walker: Walker, parts: list[Partition], target: int) -> list[Partition]:
    """S3: recursive partitions split into key ranges until `target` of them are large (estimated at
    MIN_SPLIT_PAGES pages or more), so that a flat prefix of millions of keys is listed by many workers
    at once (a prefix lists in order, one page after another, but S3's StartAfter starts a listing
    anywhere). Large ranges are split breadth-first (see `_split`); a recursive partition not yet looked
    at counts as large, so an input explored into `target` directories costs no request here."""
    done = [p for p in parts if not p.recursive]
    ranges = [(p, True) for p in parts if p.recursive]  # (range, whether it is large)
    with ThreadPoolExecutor(EXPLORE_THREADS, thread_name_prefix="split") as pool:
        while 0 < sum(full for _, full in ranges) < target:
            large = [p for p, full in ranges if full]
            following = [(p, False) for p, full in ranges if not full]
            for pieces in pool.map(lambda p: _split(walker, p), large):
                following += pieces
            ranges = following
    return done + [p for p, _ in ranges]


def _split(walker: Walker, p: Partition) -> list[tuple[Partition, bool]]:
    """`p`'s key range cut at `anchor + c` for each c in SPLIT_CHARS, the anchor being what its lower bound
    and its first key share. The pieces that hold keys are found by skipping from one to the next, one
    request each (`_scan`). While a single piece `anchor + c` holds every key (names that share more
    characters, like img_000…), that is the new anchor. Empty pieces are merged into their neighbours, so
    the pieces cover `p`'s range, every key once. Returns the pieces and whether each is large; `p`
    itself, not large, when it holds a few pages or cannot be cut."""
    first = walker.keys_after(p, p.after)
    if not first[1] or not _large(p, first[0]):
        return [(p, False)]  # a few pages: listing it costs less than cutting it
    anchor = os.path.commonprefix([p.prefix if p.after is None else p.after, first[0][0]])  # noqa: RUF071
    for _ in range(MAX_SPLIT_DEPTH):
        cuts = [anchor + c for c in SPLIT_CHARS if p.holds(anchor + c)]
        held = _scan(walker, p, cuts, first)
        if len(held) >= 2:
            break
        piece, large = held[0]
        if not large or piece.after not in cuts or piece.after[-1] not in DESCEND:
            return [(p, False)]  # a page or less, or its keys lie past the cuts: one worker lists it
        anchor = piece.after  # every key starts with it: look one character further in
    else:
        return [(p, False)]
    merged = []
    for i, (piece, large) in enumerate(held):  # each stretched over the empty pieces before it
        lo = p.after if i == 0 else held[i - 1][0].upto
        hi = p.upto if i == len(held) - 1 else piece.upto
        merged.append((dataclasses.replace(piece, after=lo, upto=hi), large))
    return merged


def _scan(
    walker: Walker, p: Partition, cuts: list[str], first: tuple[list[str], bool]
) -> list[tuple[Partition, bool]]:
    """The pieces of `p` between `cuts` that hold keys, in order, and whether each is large: from `first`
    (the range's first keys, a probe), then one request after the end of each piece found."""
    bounds = [p.after, *cuts, p.upto]
    held: list[tuple[Partition, bool]] = []
    keys, more = first
    while keys:
        i = bisect.bisect_left(cuts, keys[0])  # the piece (bounds[i], bounds[i + 1]] holds keys[0]
        piece = dataclasses.replace(p, after=bounds[i], upto=bounds[i + 1])
        full = more and all(piece.holds(k) for k in keys)
        held.append((piece, full and _large(piece, keys)))
        if i == len(cuts):
            break
        keys, more = walker.keys_after(p, piece.upto)
    return held
