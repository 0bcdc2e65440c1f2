"""The read stage's entry: :class:`ReadShards` turns shards into batches of image rows, one reader per
format, every retry through :meth:`ReadShards.retrying`."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.rows import SHARD_ERROR_SUFFIX
from pipeline.sources.base import Row, Settings
from pipeline.sources.files import read_file
from pipeline.sources.listing import Shard, wanted_keys
from pipeline.sources.parquet import read_parquet
from pipeline.sources.webdataset import read_tar
from pipeline.storage import describe as _describe
from pipeline.storage import resolve_uri

log = logging.getLogger(__name__)

OUTPUT_COLUMNS = ("key", "shard", "bytes", "error", "extra", "bytes_sha256")
DEFAULT_MAX_IMAGE_BYTES = 64 * 2**20
DEFAULT_MAX_PENDING_BYTES = 1024 * 2**20

READERS: dict[str, Callable[[Settings, Shard], Iterator[Row]]] = {
    "file": read_file,
    "webdataset": read_tar,
    "parquet": read_parquet,
}

T = TypeVar("T")


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and not isinstance(
        exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
    )


class ReadShards:
    """Ray Data ``map_batches`` callable: shard descriptors in, image rows out (a generator).

    In: columns ``path``, ``rel``, ``kind``, ``size`` and optionally ``keys`` (None, or the keys to read
    again; see :func:`shards_to_items`); or :class:`Shard` objects through :meth:`batches`. Out: batches of
    at most ``rows_per_batch`` rows with ``key`` (str), ``shard`` (str, the Shard's rel), ``bytes`` (bytes or
    None), ``error`` (str or None), ``extra`` (the values passed through to the output, as
    :func:`pipeline.rows.pack_extra` bytes, or None) and ``bytes_sha256`` (hex SHA-256 of the bytes, or
    None), all numpy object arrays. Never raises for a bad input. ``max_image_bytes`` is
    ``--max-object-bytes``; ``keep_columns`` the (name, Arrow type) of Parquet columns to pass through.

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
        keep_columns: Iterable[tuple[str, pa.DataType]] = (),
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
        self.keep_columns = tuple(keep_columns)
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
        keys: Any = batch.get("keys")  # absent, or per shard None or a list of keys (see Shard.keys)
        if keys is None:
            keys = [None] * len(batch["path"])
        columns = zip(batch["path"], batch["rel"], batch["kind"], batch["size"], keys, strict=True)
        yield from self.batches(
            Shard(str(p), str(r), str(k), int(n), None if only is None else tuple(str(x) for x in only))
            for p, r, k, n, only in columns
        )

    def batches(self, shards: Iterable[Shard]) -> Iterator[dict[str, np.ndarray]]:
        """The rows of ``shards`` in batches of at most ``rows_per_batch`` rows (columns: OUTPUT_COLUMNS)."""
        rows: list[tuple] = []
        for shard in shards:
            for row in self.read_shard(shard):
                key, data, error, *extra = row
                sha = None if data is None else hashlib.sha256(data).hexdigest()
                rows.append((key, shard.rel, data, error, extra[0] if extra else None, sha))
                if len(rows) >= self.rows_per_batch:
                    yield _to_batch(rows)
                    rows = []
        if rows:
            yield _to_batch(rows)

    def read_shard(self, shard: Shard) -> Iterator[Row]:
        """The rows of one shard; an unexpected failure becomes the shard's error row.

        With ``shard.keys`` set, only the rows with those keys (see :func:`wanted_keys`).
        """
        wanted = wanted_keys(shard)
        for row in self._read_shard(shard):
            if wanted is None or row[0] in wanted:
                yield row

    def _read_shard(self, shard: Shard) -> Iterator[Row]:
        reader = READERS.get(shard.kind)
        if reader is None:
            yield shard.rel + SHARD_ERROR_SUFFIX, None, f"read: unknown shard kind {shard.kind!r}"
            return
        shard_error_sent = False
        try:
            for row in reader(self, shard):
                shard_error_sent = shard_error_sent or row[0] == shard.rel + SHARD_ERROR_SUFFIX
                yield row
        except Exception as e:  # a bug or an unforeseen failure: still a row, never a crashed job
            log.exception("reading %s failed", shard.rel)
            if not shard_error_sent:
                yield shard.rel + SHARD_ERROR_SUFFIX, None, f"read: {_describe(e)}"

    def retrying(self, what: str, attempt: Callable[[bool], Iterable[T]]) -> Iterator[T]:
        """The items of ``attempt(last)``; after a transient failure (:func:`_transient`), it waits
        ``retry_backoff_s * 2**n`` and calls ``attempt`` again, up to ``retries`` times, ``last`` being True
        on the final call. ``attempt`` resumes by itself: it skips what an earlier call already yielded.
        The final failure, or one that is not transient, is raised."""
        for n in range(self.retries + 1):
            last = n == self.retries
            try:
                yield from attempt(last)
                return
            except Exception as e:
                if last or not _transient(e):
                    raise
                delay = self.retry_backoff_s * 2**n
                log.warning("retrying %s in %.1fs after %s", what, delay, _describe(e, 200))
                time.sleep(delay)


def _to_batch(rows: list[tuple]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for c, name in enumerate(OUTPUT_COLUMNS):
        column = np.empty(len(rows), dtype=object)
        column[:] = [row[c] for row in rows]
        out[name] = column
    return out
