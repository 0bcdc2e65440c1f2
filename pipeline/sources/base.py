"""What the format readers share: the row they yield and the reader settings they use."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs

T = TypeVar("T")

# key, bytes, error and, where the reader passes values through to the output, their
# pipeline.rows.pack_extra bytes (the shard column is added by ReadShards)
Row = tuple[str, bytes | None, str | None] | tuple[str, bytes | None, str | None, bytes | None]
STREAM_BUFFER_BYTES = 8 * 2**20  # one ranged GET per 8 MiB when streaming a tar or Parquet file from S3


class Settings(Protocol):
    """The settings of a :class:`~pipeline.sources.read.ReadShards` that a format reader uses."""

    image_column: str
    key_column: str | None
    rows_per_batch: int
    max_image_bytes: int
    max_pending_bytes: int
    keep_columns: tuple[tuple[str, pa.DataType], ...]  # Parquet inputs: columns passed to the output

    @property
    def fs(self) -> pafs.FileSystem: ...

    def retrying(self, what: str, attempt: Callable[[bool], Iterable[T]]) -> Iterator[T]: ...


def too_big(settings: Settings, what: str, size: int) -> str:
    """The error of an object over ``--max-object-bytes``."""
    return f"read: {what} is {size} bytes, over --max-object-bytes ({settings.max_image_bytes} bytes)"
