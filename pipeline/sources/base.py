"""What the format readers share: the row they yield and the reader settings they use."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol, TypeVar

import pyarrow.fs as pafs

T = TypeVar("T")

Row = tuple[str, "bytes | None", "str | None"]  # key, bytes, error (the shard column is added by ReadShards)
STREAM_BUFFER_BYTES = 8 * 2**20  # one ranged GET per 8 MiB when streaming a tar or Parquet file from S3


class Settings(Protocol):
    """The settings of a :class:`~pipeline.sources.read.ReadShards` that a format reader uses."""

    image_column: str
    key_column: str | None
    rows_per_batch: int
    max_image_bytes: int
    max_pending_bytes: int

    @property
    def fs(self) -> pafs.FileSystem: ...

    def retrying(self, what: str, attempt: Callable[[bool], Iterable[T]]) -> Iterator[T]: ...


def too_big(settings: Settings, what: str, size: int) -> str:
    """The error of an object over ``--max-object-bytes``."""
    return f"read: {what} is {size} bytes, over --max-object-bytes ({settings.max_image_bytes} bytes)"
