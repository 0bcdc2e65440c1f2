"""Loose image files: one row per object, keyed by its path relative to the input."""

from __future__ import annotations

from collections.abc import Iterator

from pipeline.sources.base import Row, Settings, too_big
from pipeline.sources.listing import Shard, wanted_keys
from pipeline.storage import describe as _describe


def read_file(settings: Settings, shard: Shard) -> Iterator[Row]:
    """The one row of a loose file: its bytes, or the error that kept them from being read."""
    wanted = wanted_keys(shard)
    if wanted is not None and shard.rel not in wanted:
        return
    if shard.size > settings.max_image_bytes:
        yield shard.rel, None, too_big(settings, "image object", shard.size)
        return
    try:
        # one read is a stream of one item
        (data,) = settings.retrying(
            shard.rel, lambda _last: (_read_object(settings, shard.path, shard.size),)
        )
    except Exception as e:
        yield shard.rel, None, f"read: {_describe(e)}"
        return
    if len(data) > settings.max_image_bytes:
        yield shard.rel, None, too_big(settings, "image object", len(data))
    else:
        yield shard.rel, data, None


def _read_object(settings: Settings, path: str, size: int) -> bytes:
    """The object's bytes, reading at most max_image_bytes + 1 (it may have grown since listing)."""
    limit = settings.max_image_bytes
    with settings.fs.open_input_stream(path, compression=None) as f:
        data = f.read(min(size, limit) + 1)
        if len(data) > size and len(data) <= limit:
            data += f.read(limit + 1 - len(data))
    return bytes(data)
