"""The read stage: resolve an input URI, list its shards, read them into one row per image.

Inputs (``--input``: a local directory, a ``file://`` URI or ``s3://bucket/prefix``; one object works too):

- loose image files: every object under the prefix, recursively, whatever its extension;
  key = path relative to the input root with ``/`` separators.
- webdataset ``.tar`` shards: members are grouped by sample key (member path up to the first ``.`` of its
  basename) across the whole archive, so unsorted members are fine; the image is the first existing
  extension of :data:`IMAGE_EXTENSIONS` (case-insensitive); key = ``<shard rel>#<sample key>``.
- Parquet files with an image-bytes column (``binary``, or a struct with a ``bytes`` field as Hugging Face
  datasets write it); key = ``<file rel>#<row index>``, or ``str(value)`` of ``key_column`` when given.

S3 keys are read as they are: ``%``, ``#``, ``?``, ``+``, ``=``, spaces and unicode in the prefix and in
the object names are key characters (see pipeline/storage.py).

Listing ignores every path with a component starting with ``_`` or ``.`` (markers, hidden files, staging
dirs), as pyarrow.dataset and Spark do. In a local input, symlinked directories are not entered: a link back
up the tree would otherwise list the same images again and again (a loop is followed until the OS gives
up), and a link to a directory elsewhere would read what lies outside the input. A symlinked file is a file:
it is read once, under its own name (the link's path relative to the input); a dangling one becomes an
error row. The input root itself may be a symlink. Sockets, FIFOs and devices are skipped.

``format="auto"`` decides by extension: all ``.tar`` → webdataset, all ``.parquet`` → parquet, neither
present → loose files; a mix of containers and other objects is an :class:`InputError` asking for
``--format``. A forced ``webdataset``/``parquet`` reads only the objects with
that extension (sidecar files such as indexes are skipped); a forced ``files`` reads every object.

Nothing in :class:`ReadShards` raises for a bad input: every problem becomes a row whose ``error`` starts with
``"read: "``. A problem that concerns a whole container rather than one image (truncated or corrupt tar,
unreadable or unsuitable Parquet file, unreadable row groups) yields ONE row per shard with the key
``<shard rel>#.error`` (:data:`SHARD_ERROR_SUFFIX`); that key cannot clash with a sample key (a sample key's
last component never contains a dot) nor with a row index, so it is unique and deterministic.

A retry reads only some rows again: a :class:`Shard` whose ``keys`` is set yields only the rows with those
keys (a loose file's key is its rel, so it is read or not); ``<rel>#.error`` among them re-reads the whole
shard.

Before anything runs, the driver can check the input with :func:`check_parquet_columns` (one file's footer:
is there an image column, and the key column?) and :func:`check_unique_keys` (the key column's values are
unique across the files and new to the output); both raise :class:`InputError`.

Memory: a tar shard is streamed; a sample is emitted as soon as its top-preference (``.jpg``) member is read,
other samples are held (their image bytes only) until the end of the shard, or until ``max_pending_bytes``
is exceeded, when the held samples that have an image are emitted early. Parquet is read one record batch of
``rows_per_batch`` rows at a time. No object larger than ``max_image_bytes`` (``--max-object-bytes``) is
read into memory: a larger loose file, tar member or Parquet value is an error row that names the option.

Transient S3 failures are retried by the AWS SDK (``AwsStandardS3RetryStrategy``, exponential backoff) and
then, for failures in the middle of a body, ``retries`` more times here (a tar shard is re-streamed, samples
already emitted are skipped; a Parquet row group is re-read from where it failed).
"""

from __future__ import annotations

import logging
import os
import stat
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.rows import SHARD_ERROR_SUFFIX
from pipeline.storage import InputError, is_s3, resolve_uri
from pipeline.storage import describe as _describe

log = logging.getLogger(__name__)

FORMATS = ("auto", "files", "webdataset", "parquet")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")  # tar member preference order
TAR_SUFFIXES = (".tar",)
PARQUET_SUFFIXES = (".parquet",)
OUTPUT_COLUMNS = ("key", "shard", "bytes", "error")
_IMAGE_RANK = {ext: rank for rank, ext in enumerate(IMAGE_EXTENSIONS)}
DEFAULT_MAX_IMAGE_BYTES = 64 * 2**20
DEFAULT_MAX_PENDING_BYTES = 1024 * 2**20
STREAM_BUFFER_BYTES = 8 * 2**20  # one ranged GET per 8 MiB when streaming a tar from S3

T = TypeVar("T")


# --------------------------------------------------------------------------------------------------------
# Listing


@dataclass(frozen=True)
class Shard:
    path: str  # path in resolve_uri(input)'s filesystem
    rel: str  # path relative to the input root, '/' separators
    kind: str  # "file" | "webdataset" | "parquet"
    size: int
    keys: tuple[str, ...] | None = None  # read only these rows' keys (a retry); None: every row


def shards_to_items(shards: list[Shard]) -> list[dict[str, Any]]:
    """Rows for ``ray.data.from_items``: the columns ReadShards expects (path, rel, kind, size, keys), with
    ``keys`` None or a list."""
    return [{**asdict(s), "keys": None if s.keys is None else list(s.keys)} for s in shards]


def _wanted(shard: Shard) -> frozenset[str] | None:
    """The keys to emit from a shard; None for every row (no filter, or the shard's error key is in it)."""
    if shard.keys is None or shard.rel + SHARD_ERROR_SUFFIX in shard.keys:
        return None
    return frozenset(shard.keys)


def _hidden(rel: str) -> bool:
    return any(part.startswith(("_", ".")) for part in rel.split("/"))


def _classify(rel: str) -> str:
    name = rel.lower()
    if name.endswith(TAR_SUFFIXES):
        return "webdataset"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "file"


def list_shards(uri: str, format: str = "auto") -> list[Shard]:
    """Lists the input recursively into shards sorted by ``rel``; InputError when there is nothing to read."""
    if format not in FORMATS:
        raise InputError(f"Unknown input format {format!r}: choose one of {', '.join(FORMATS)}.")
    fs, root = resolve_uri(uri)
    try:
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise InputError(f"Input {uri} does not exist.")
        if info.type == pafs.FileType.File:
            entries = [(info, info.base_name)]
        elif isinstance(fs, pafs.LocalFileSystem):
            entries = _walk_local(root)
        else:
            selector = pafs.FileSelector(root, recursive=True)
            base = root.rstrip("/") + "/"
            entries = [
                (i, i.path[len(base) :])
                for i in fs.get_file_info(selector)
                if i.type == pafs.FileType.File and i.path.startswith(base)
            ]
            entries = [(i, rel) for i, rel in entries if not _hidden(rel)]
    except InputError:
        raise
    except (OSError, pa.ArrowException) as e:
        raise _listing_error(uri, e) from None

    if not entries:
        raise InputError(
            f"Input {uri} is empty: no files under it (names starting with '_' or '.' are ignored)."
        )
    classes = [_classify(rel) for _, rel in entries]
    if format == "auto":
        found = set(classes)
        if len(found) > 1:
            n_tar, n_pq = classes.count("webdataset"), classes.count("parquet")
            n_other = classes.count("file")
            raise InputError(
                f"Input {uri} mixes {n_tar} .tar, {n_pq} .parquet and {n_other} other files; pass --format "
                "webdataset or parquet to read only those files, or --format files to read every file as "
                "an image."
            )
        kind, chosen = found.pop(), entries
    elif format == "files":
        kind, chosen = "file", entries
    else:
        kind = format
        chosen = [(i, rel) for (i, rel), c in zip(entries, classes, strict=True) if c == kind]
        if not chosen:
            suffix = TAR_SUFFIXES[0] if kind == "webdataset" else PARQUET_SUFFIXES[0]
            raise InputError(f"Input {uri} has no {suffix} files, which --format {format} reads.")
    shards = [Shard(path=i.path, rel=rel, kind=kind, size=int(i.size or 0)) for i, rel in chosen]
    return sorted(shards, key=lambda s: s.rel)


def _walk_local(root: str) -> list[tuple[pafs.FileInfo, str]]:
    """(info, rel) of the files under a local directory, hidden names pruned; symlinked directories are not
    entered, a symlinked file is listed as a file (size of its target), a dangling symlink with size 0."""

    def fail(exc: OSError) -> None:
        raise exc

    entries = []
    for top, dirs, files in os.walk(root, onerror=fail):  # followlinks=False: linked dirs are not entered
        dirs[:] = [d for d in dirs if not d.startswith(("_", "."))]
        base = os.path.relpath(top, root).replace(os.sep, "/")
        for name in files:
            if name.startswith(("_", ".")):
                continue
            path = os.path.join(top, name)
            try:
                st = os.stat(path)
            except FileNotFoundError:  # a dangling symlink: the read stage reports it
                size = 0
            else:
                if not stat.S_ISREG(st.st_mode):
                    continue
                size = st.st_size
            rel = name if base == "." else f"{base}/{name}"
            entries.append((pafs.FileInfo(path, pafs.FileType.File, size=size), rel))
    return entries


def _listing_error(uri: str, exc: BaseException) -> InputError:
    text = str(exc)
    if isinstance(exc, PermissionError) or any(
        code in text for code in ("ACCESS_DENIED", "AccessDenied", "INVALID_ACCESS_KEY_ID", "SIGNATURE")
    ):
        return InputError(
            f"Access to {uri} was denied: check the credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) "
            f"and the bucket's permissions ({_describe(exc, 200)})."
        )
    if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text:
        return InputError(f"Input {uri}: the bucket does not exist.")
    if "NETWORK_CONNECTION" in text or "curlCode" in text or "connect" in text.lower():
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS"
        return InputError(
            f"Cannot reach the S3 endpoint ({endpoint}) to list {uri}: check AWS_ENDPOINT_URL and the "
            f"network ({_describe(exc, 200)})."
        )
    return InputError(f"Cannot list input {uri}: {_describe(exc, 300)}.")


# --------------------------------------------------------------------------------------------------------
# Reading


@dataclass
class _Sample:
    """A tar sample being assembled: extensions seen, and its best image member so far."""

    exts: list[str] = field(default_factory=list)
    rank: int = len(IMAGE_EXTENSIONS)  # preference rank of the chosen image member; len() = none yet
    data: bytes | None = None
    error: str | None = None

    @property
    def has_image(self) -> bool:
        return self.rank < len(IMAGE_EXTENSIONS)


@dataclass
class _TarNotes:
    """What tarfile skipped or could not read in one pass (filled by _tarinfo_class's hook)."""

    zero_blocks: int = 0
    bad_blocks: int = 0
    first_bad_offset: int = -1
    truncated_header_at: int = -1
    problems: list[str] = field(default_factory=list)


# tarfile's header exceptions: in CPython since 3.2, though not in its docs (nor typeshed).
_EOF_HEADER: type[Exception] = tarfile.EOFHeaderError  # type: ignore[attr-defined]
_INVALID_HEADER: type[Exception] = tarfile.InvalidHeaderError  # type: ignore[attr-defined]
_TRUNCATED_HEADER: type[Exception] = tarfile.TruncatedHeaderError  # type: ignore[attr-defined]


def _tarinfo_class(notes: _TarNotes) -> type[tarfile.TarInfo]:
    """A TarInfo subclass that records the header blocks tarfile skips with ``ignore_zeros=True``."""

    class _Info(tarfile.TarInfo):
        @classmethod
        def fromtarfile(cls, tf: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
            try:
                return super().fromtarfile(tf)
            except _EOF_HEADER:
                notes.zero_blocks += 1
                raise
            except _INVALID_HEADER:
                notes.bad_blocks += 1
                if notes.first_bad_offset < 0:
                    notes.first_bad_offset = tf.offset
                raise
            except _TRUNCATED_HEADER:
                notes.truncated_header_at = tf.offset
                raise

    return _Info


def _sample_key(name: str) -> tuple[str, str] | None:
    """webdataset's split: ``dir/base.ext.more`` → (``dir/base``, ``ext.more``); None for non-sample names."""
    while name.startswith("./"):
        name = name[2:]
    dirname, _, base = name.rpartition("/")
    if not base or base.startswith(".") or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return (f"{dirname}/{stem}" if dirname else stem), ext


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and not isinstance(
        exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
    )


Row = tuple[str, "bytes | None", "str | None"]  # key, bytes, error (the shard column is added by ReadShards)


class ReadShards:
    """Ray Data ``map_batches`` callable: shard descriptors in, image rows out (a generator).

    In: columns ``path``, ``rel``, ``kind``, ``size`` and optionally ``keys`` (None, or the keys to read
    again; see :func:`shards_to_items`). Out: batches of at most ``rows_per_batch`` rows with ``key`` (str),
    ``shard`` (str, the Shard's rel), ``bytes`` (bytes or None) and ``error`` (str or None), all numpy object
    arrays. Never raises for a bad input. ``max_image_bytes`` is ``--max-object-bytes``.

    The filesystem is built lazily in the worker and is not pickled with the callable.
    """

    def __init__(
        self,
        input_uri: str,
        image_column: str = "image",
        key_column: str | None = None,
        rows_per_batch: int = 256,
        max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        retries: int = 2,
        retry_backoff_s: float = 0.5,
        filesystem: pafs.FileSystem | None = None,
    ) -> None:
        if rows_per_batch < 1:
            raise ValueError("rows_per_batch must be >= 1")
        self.input_uri = input_uri
        self.image_column = image_column or "image"
        self.key_column = key_column or None
        self.rows_per_batch = int(rows_per_batch)
        self.max_image_bytes = int(max_image_bytes)
        self.max_pending_bytes = int(max_pending_bytes)
        self.retries = max(0, int(retries))
        self.retry_backoff_s = float(retry_backoff_s)
        self._fs = filesystem

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fs"] = None
        return state

    @property
    def fs(self) -> pafs.FileSystem:
        if self._fs is None:
            self._fs = resolve_uri(self.input_uri)[0]
        return self._fs

    # -- batching

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        rows: list[tuple[str, str, bytes | None, str | None]] = []
        keys: Any = batch.get("keys")  # absent, or per shard None or a list of keys (see Shard.keys)
        if keys is None:
            keys = [None] * len(batch["path"])
        for path, rel, kind, size, only in zip(
            batch["path"], batch["rel"], batch["kind"], batch["size"], keys, strict=True
        ):
            only = None if only is None else tuple(str(k) for k in only)
            shard = Shard(str(path), str(rel), str(kind), int(size), only)
            for key, data, error in self.read_shard(shard):
                rows.append((key, str(rel), data, error))
                if len(rows) >= self.rows_per_batch:
                    yield _to_batch(rows)
                    rows = []
        if rows:
            yield _to_batch(rows)

    def read_shard(self, shard: Shard) -> Iterator[Row]:
        """The rows of one shard; an unexpected failure becomes the shard's error row.

        With ``shard.keys`` set, only the rows with those keys (see :func:`_wanted`).
        """
        wanted = _wanted(shard)
        for row in self._read_shard(shard):
            if wanted is None or row[0] in wanted:
                yield row

    def _read_shard(self, shard: Shard) -> Iterator[Row]:
        readers: dict[str, Callable[[Shard], Iterator[Row]]] = {
            "file": self._read_file,
            "webdataset": self._read_tar,
            "parquet": self._read_parquet,
        }
        reader = readers.get(shard.kind)
        if reader is None:
            yield shard.rel + SHARD_ERROR_SUFFIX, None, f"read: unknown shard kind {shard.kind!r}"
            return
        shard_error_sent = False
        try:
            for row in reader(shard):
                shard_error_sent = shard_error_sent or row[0] == shard.rel + SHARD_ERROR_SUFFIX
                yield row
        except Exception as e:  # a bug or an unforeseen failure: still a row, never a crashed job
            log.exception("reading %s failed", shard.rel)
            if not shard_error_sent:
                yield shard.rel + SHARD_ERROR_SUFFIX, None, f"read: {_describe(e)}"

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except Exception as e:
                if attempt >= self.retries or not _transient(e):
                    raise
                self._backoff(what, attempt, e)
        raise AssertionError("unreachable")

    def _backoff(self, what: str, attempt: int, exc: BaseException) -> None:
        delay = self.retry_backoff_s * 2**attempt
        log.warning("retrying %s in %.1fs after %s", what, delay, _describe(exc, 200))
        time.sleep(delay)

    def _too_big(self, what: str, size: int) -> str:
        return f"read: {what} is {size} bytes, over --max-object-bytes ({self.max_image_bytes} bytes)"

    # -- loose files

    def _read_file(self, shard: Shard) -> Iterator[Row]:
        wanted = _wanted(shard)
        if wanted is not None and shard.rel not in wanted:
            return
        if shard.size > self.max_image_bytes:
            yield shard.rel, None, self._too_big("image object", shard.size)
            return
        try:
            data = self._retry(shard.rel, lambda: self._read_object(shard.path, shard.size))
        except Exception as e:
            yield shard.rel, None, f"read: {_describe(e)}"
            return
        if len(data) > self.max_image_bytes:
            yield shard.rel, None, self._too_big("image object", len(data))
        else:
            yield shard.rel, data, None

    def _read_object(self, path: str, size: int) -> bytes:
        """The object's bytes, reading at most max_image_bytes + 1 (it may have grown since listing)."""
        with self.fs.open_input_stream(path, compression=None) as f:
            data = f.read(min(size, self.max_image_bytes) + 1)
            if len(data) > size and len(data) <= self.max_image_bytes:
                data += f.read(self.max_image_bytes + 1 - len(data))
        return bytes(data)

    # -- webdataset tar shards

    def _read_tar(self, shard: Shard) -> Iterator[Row]:
        done: set[str] = set()  # sample keys already emitted (survives a restart after a transient failure)
        for attempt in range(self.retries + 1):
            try:
                yield from self._tar_pass(shard, done, salvage=attempt == self.retries)
                return
            except Exception as e:
                if attempt < self.retries and _transient(e):
                    self._backoff(shard.rel, attempt, e)
                    continue
                what = "could not be opened" if not done else "could not be read to the end"
                yield shard.rel + SHARD_ERROR_SUFFIX, None, f"read: tar shard {what}: {_describe(e)}"
                return

    def _tar_pass(self, shard: Shard, done: set[str], salvage: bool) -> Iterator[Row]:
        """One streaming pass over a tar shard; rows of samples in ``done`` are not emitted again.

        Samples are held in ``pending`` (first-seen order) until no preferable image member can follow.
        ``salvage`` (the last attempt): on a failure, emit the held samples that have an image, then re-raise.
        """
        pending: dict[str, _Sample] = {}
        try:
            yield from self._tar_stream(shard, done, pending)
        except Exception:
            if salvage:
                for key in [k for k, s in pending.items() if s.has_image]:
                    yield _emit(shard, done, key, pending.pop(key))
            raise

    def _tar_stream(self, shard: Shard, done: set[str], pending: dict[str, _Sample]) -> Iterator[Row]:
        notes = _TarNotes()
        pending_bytes = 0
        wanted = _wanted(shard)
        with self.fs.open_input_stream(shard.path, compression=None, buffer_size=STREAM_BUFFER_BYTES) as raw:
            try:
                tf = tarfile.open(  # noqa: SIM115 (closed by the `with tf` below)
                    fileobj=raw,  # type: ignore[arg-type]
                    mode="r|",
                    ignore_zeros=True,  # skip damaged header blocks and resynchronise on the next member
                    tarinfo=_tarinfo_class(notes),
                )
            except tarfile.ReadError as e:
                yield shard.rel + SHARD_ERROR_SUFFIX, None, f"read: not a readable tar archive ({e})"
                return
            with tf:
                try:
                    for member in tf:
                        tf.members.clear()  # type: ignore[attr-defined]  # stream mode would otherwise keep every header in memory
                        split = _sample_key(member.name) if member.isfile() else None
                        if split is None or split[0] in done:
                            continue  # dirs, links, names without extension, late members of emitted samples
                        if wanted is not None and f"{shard.rel}#{split[0]}" not in wanted:
                            continue  # a retry of other samples
                        key, ext = split
                        sample = pending.setdefault(key, _Sample())
                        sample.exts.append(ext)
                        rank = _IMAGE_RANK.get(ext.lower())
                        if rank is None or rank >= sample.rank:
                            continue
                        pending_bytes -= len(sample.data or b"")
                        sample.rank, sample.data, sample.error = rank, None, None
                        if member.size > self.max_image_bytes:
                            sample.error = self._too_big(f"tar member {member.name!r}", member.size)
                        else:
                            try:
                                sample.data = tf.extractfile(member).read()  # type: ignore[union-attr]
                                pending_bytes += len(sample.data)
                            except tarfile.ReadError as e:  # the archive ends inside this member
                                sample.error = f"read: tar member {member.name!r} is truncated ({e})"
                                notes.problems.append(f"the archive ends inside member {member.name!r}")
                                break
                        if rank == 0:  # nothing can be preferred to it: emit now, keep memory flat
                            yield _emit(shard, done, key, pending.pop(key))
                        elif pending_bytes > self.max_pending_bytes:  # exactness yields to bounded memory
                            for k in [k for k, s in pending.items() if s.has_image]:
                                yield _emit(shard, done, k, pending.pop(k))
                            pending_bytes = 0
                except tarfile.ReadError as e:  # the archive ends inside a member that was skipped
                    notes.problems.append(f"the archive ends early ({e})")
                end = tf.fileobj.tell() if tf.fileobj is not None else -1
        for key in list(pending):
            yield _emit(shard, done, key, pending.pop(key))
        problem = _tar_problem(notes, end)
        if problem:
            yield shard.rel + SHARD_ERROR_SUFFIX, None, f"read: tar shard is damaged: {problem}"

    # -- Parquet

    def _read_parquet(self, shard: Shard) -> Iterator[Row]:
        err_key = shard.rel + SHARD_ERROR_SUFFIX
        try:
            pf = self._retry(
                shard.rel,
                lambda: pq.ParquetFile(
                    self.fs.open_input_file(shard.path), buffer_size=STREAM_BUFFER_BYTES, pre_buffer=False
                ),
            )
        except Exception as e:
            yield err_key, None, f"read: not a readable Parquet file: {_describe(e)}"
            return
        problem = parquet_columns_problem(pf.schema_arrow, self.image_column, self.key_column)
        if problem:
            yield err_key, None, "read: " + problem
            return
        columns = [self.image_column]
        if self.key_column is not None and self.key_column != self.image_column:
            columns.append(self.key_column)

        problems: list[str] = []
        first = 0  # index of the row group's first row in the file
        for rg in range(pf.num_row_groups):
            n_rows = pf.metadata.row_group(rg).num_rows
            read = 0  # rows of this row group already emitted
            for attempt in range(self.retries + 1):
                try:
                    seen = 0
                    for rb in pf.iter_batches(
                        batch_size=self.rows_per_batch, row_groups=[rg], columns=columns, use_threads=False
                    ):
                        if seen + rb.num_rows <= read:  # emitted before a retry
                            seen += rb.num_rows
                            continue
                        images = rb.column(0).to_pylist()
                        keys = rb.column(1).to_pylist() if len(columns) > 1 else None
                        for j in range(max(0, read - seen), rb.num_rows):
                            yield self._parquet_row(shard.rel, first + seen + j, images[j], keys, j)
                            read = seen + j + 1
                        seen += rb.num_rows
                    break
                except Exception as e:
                    if attempt < self.retries and _transient(e):
                        self._backoff(f"{shard.rel} row group {rg}", attempt, e)
                        continue
                    problems.append(
                        f"row group {rg} (rows {first + read}–{first + n_rows - 1}) unreadable: "
                        + _describe(e, 200)
                    )
                    break
            first += n_rows
        if problems:
            yield err_key, None, "read: Parquet file is damaged: " + "; ".join(problems)

    def _parquet_row(self, rel: str, index: int, value: Any, keys: list | None, j: int) -> Row:
        if keys is None or self.key_column == self.image_column:
            key = f"{rel}#{index}"
        elif keys[j] is None:
            return f"{rel}#{index}", None, f"read: key column {self.key_column!r} is null in row {index}"
        else:
            key = str(keys[j])
        if isinstance(value, dict):  # struct column (Hugging Face datasets' Image feature)
            if value.get("bytes") is None and value.get("path"):
                return key, None, self._path_only(value["path"], index)
            value = value.get("bytes")
        if value is None:
            return key, None, f"read: Parquet column {self.image_column!r} is null in row {index}"
        if len(value) > self.max_image_bytes:
            return key, None, self._too_big(f"image value in row {index}", len(value))
        return key, bytes(value), None

    def _path_only(self, path: str, index: int) -> str:
        """The error of a Hugging Face Image struct that names a file instead of holding its bytes."""
        return (
            f"read: Parquet column {self.image_column!r} holds only a file path ({path!r}) in row {index}, "
            "not the image bytes, so it was not embedded; export the dataset with the image bytes embedded "
            "(with `datasets`: embed_external_files, or cast the column to Image(decode=True), before "
            "to_parquet)"
        )


def _emit(shard: Shard, done: set[str], key: str, sample: _Sample) -> Row:
    """The row of a finished tar sample; marks it done."""
    done.add(key)
    if sample.has_image:
        return f"{shard.rel}#{key}", sample.data, sample.error
    found = ", ".join(dict.fromkeys(e.lower() for e in sample.exts))
    return f"{shard.rel}#{key}", None, f"read: tar sample has no image member (found: {found})"


def _tar_problem(notes: _TarNotes, end: int) -> str | None:
    problems = list(notes.problems)
    if notes.bad_blocks:
        problems.append(
            f"skipped {notes.bad_blocks} unreadable 512-byte header block(s) from byte "
            f"{notes.first_bad_offset}; members stored there are lost"
        )
    if notes.truncated_header_at >= 0:
        problems.append(f"the archive is cut inside a header at byte {notes.truncated_header_at}")
    elif not notes.problems and not notes.bad_blocks and notes.zero_blocks == 0:
        problems.append(f"no end-of-archive marker after byte {end}: the file looks truncated")
    return "; ".join(problems) or None


def _is_image_bytes(t: pa.DataType) -> bool:
    """Whether a column of type ``t`` holds encoded images: binary, or a struct with a binary ``bytes``
    field (Hugging Face datasets' Image feature). The one definition, for the reader and the checks."""
    if pa.types.is_struct(t):
        idx = t.get_field_index("bytes")
        return idx >= 0 and _is_binary(t.field(idx).type)
    return _is_binary(t)


def _listed(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def parquet_columns_problem(
    schema: pa.Schema, image_column: str, key_column: str | None, subject: str = "Parquet file"
) -> str | None:
    """Why Parquet data with ``schema`` cannot be read with these columns, as one sentence about
    ``subject`` (without the final period) that says which option to pass; None when it can.

    The image column must exist and hold image bytes (:func:`_is_image_bytes`); the key column, when given,
    must exist. The sentence names the columns that do hold image bytes.
    """
    names = schema.names
    images = [f.name for f in schema if _is_image_bytes(f.type) and f.name != image_column]
    if len(images) == 1:
        hint = f"the image bytes look to be in {images[0]!r}: pass --image-column {images[0]}"
    elif images:
        hint = f"columns holding image bytes: {_listed(images)}; pass --image-column with one of them"
    else:
        hint = "no column holds image bytes (binary, or a struct with a binary 'bytes' field)"
    if image_column not in names:
        return f"{subject} has no column {image_column!r} (columns: {_listed(names)}); {hint}"
    image_type = schema.field(image_column).type
    if not _is_image_bytes(image_type):
        return (
            f"{subject} has column {image_column!r} of type {image_type}, not image bytes (binary, or a "
            f"struct with a binary 'bytes' field); {hint}"
        )
    if key_column is not None and key_column not in names:
        return (
            f"{subject} has no key column {key_column!r} (columns: {_listed(names)}); pass --key-column "
            "with one of them, or leave it out to key rows by file and row index"
        )
    return None


def _where(input_uri: str, shard: Shard) -> str:
    """A shard's location as a user would type it."""
    return f"s3://{shard.path}" if is_s3(input_uri) else shard.path


def check_parquet_columns(input_uri: str, shard: Shard, image_column: str, key_column: str | None) -> None:
    """Raises InputError when a Parquet shard lacks the image column, its image column does not hold image
    bytes, or it lacks the key column; the same checks as the read stage (:func:`parquet_columns_problem`).

    Reads only the file's footer. A file that cannot be read at all is left to the read stage, which turns
    it into the shard's error row; a shard that is not Parquet is not checked.
    """
    if shard.kind != "parquet":
        return
    try:
        with resolve_uri(input_uri)[0].open_input_file(shard.path) as f:
            schema = pq.ParquetFile(f).schema_arrow
    except (OSError, pa.ArrowException) as e:
        log.info("not checking the columns of %s: %s", shard.rel, _describe(e, 200))
        return
    where = _where(input_uri, shard)
    problem = parquet_columns_problem(
        schema, image_column or "image", key_column or None, f"Parquet file {where}"
    )
    if problem:
        raise InputError(problem + ".")


def _key_values(fs: pafs.FileSystem, shard: Shard, column: str) -> Iterator[tuple[int, Any]]:
    """(row index, value) of one column of a Parquet shard, one record batch at a time; nothing when the
    file cannot be read or lacks the column (the read stage reports those)."""
    try:
        with fs.open_input_file(shard.path) as f:
            pf = pq.ParquetFile(f, buffer_size=STREAM_BUFFER_BYTES, pre_buffer=False)
            if column not in pf.schema_arrow.names:
                return
            index = 0
            for rb in pf.iter_batches(batch_size=65_536, columns=[column], use_threads=False):
                for value in rb.column(0).to_pylist():
                    yield index, value
                    index += 1
    except (OSError, pa.ArrowException) as e:
        log.info("not checking the keys of %s: %s", shard.rel, _describe(e, 200))


def check_unique_keys(
    input_uri: str,
    shards: list[Shard],
    key_column: str,
    existing: set[str] | frozenset[str] = frozenset(),
) -> None:
    """Raises InputError at the first value of ``key_column`` that two rows share, or that ``existing``
    (the keys already in --output) holds: the output holds each key once. Keys compare as the read stage
    makes them (``str(value)``); null values are not keys (the read stage makes them error rows).

    Reads only that column of each Parquet shard, one record batch at a time; memory grows with the number
    of distinct keys. Shards that are not Parquet are skipped.
    """
    fs = resolve_uri(input_uri)[0]
    seen: dict[str, tuple[Shard, int]] = {}
    for shard in shards:
        if shard.kind != "parquet":
            continue
        for index, value in _key_values(fs, shard, key_column):
            if value is None:
                continue
            key = str(value)
            if key in existing:
                raise InputError(
                    f"Key column {key_column!r} holds {_shown(key)!r} in {_where(input_uri, shard)} row "
                    f"{index}, a key already in --output, which holds each key once: choose a --key-column "
                    "whose values are unique, or write to a new --output."
                )
            first = seen.get(key)
            if first is None:
                seen[key] = (shard, index)
            else:
                raise InputError(
                    f"Key column {key_column!r} holds {_shown(key)!r} more than once, in "
                    f"{_where(input_uri, first[0])} row {first[1]} and {_where(input_uri, shard)} row "
                    f"{index}; the output holds each key once: choose a --key-column whose values are "
                    "unique, or leave it out to key rows by file and row index."
                )


def _shown(key: str, limit: int = 80) -> str:
    return key if len(key) <= limit else key[: limit - 1] + "…"


def _is_binary(t: pa.DataType) -> bool:
    checks = [pa.types.is_binary, pa.types.is_large_binary, pa.types.is_fixed_size_binary]
    if hasattr(pa.types, "is_binary_view"):
        checks.append(pa.types.is_binary_view)
    return any(check(t) for check in checks)


def _to_batch(rows: list[tuple[str, str, bytes | None, str | None]]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for c, name in enumerate(OUTPUT_COLUMNS):
        column = np.empty(len(rows), dtype=object)
        column[:] = [row[c] for row in rows]
        out[name] = column
    return out
