"""What every stage's rows share: the `key` conventions and the `error` column.

A row's `key` is its input's path relative to `--input` (loose files), `<shard>#<sample key>` (tar
samples), `<file>#<row index>` or the `--key-column` value (Parquet rows). A problem with a whole container
is one row keyed `<shard>#.error` (SHARD_ERROR_SUFFIX): no sample key or row index ends that way.

`error` is a str where a row failed, None where it did not. Ray Data stores an all-null column with
Arrow's null type and hands it back to numpy as float NaNs, so a stage must not test `error is None`: it
asks `error_column(batch)` for a clean object array instead (`optional_column` for other nullable
columns of str or bytes).

Values a reader passes through to the output unchanged (a Parquet input's `--keep-columns`, a tar sample's
sidecars) travel as ONE `extra` column of bytes per row, `pack_extra(values)`: Ray Data turns numpy
columns into Arrow and back, which would make integers with nulls into floats and lose their exactness;
bytes cross unchanged, and the sink unpacks them into the output's declared types.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SHARD_ERROR_SUFFIX = "#.error"


def optional_column(batch: Mapping[str, np.ndarray], name: str, kind: type = str) -> np.ndarray:
    """The batch's `name` values as an object array of `kind` (str or bytes) or None, also when the
    column is absent or Ray Data handed an all-null column back as NaNs."""
    raw = batch.get(name)
    n = len(batch["key"])
    if raw is None:
        return np.full(n, None, dtype=object)
    return np.array([v if isinstance(v, kind) else None for v in raw], dtype=object)


# The nullable columns that stages pass along (of str or bytes): a stage that gets a batch from Ray Data
# hands them on cleaned (`clean_nullable`), or a column that was all null in one block (NaNs after Ray
# Data's conversion, float64 in the next block) would not merge with a block where it holds values.
NULLABLE = {"error": str, "bytes_sha256": str, "extra": bytes}


def clean_nullable(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`batch` with its NULLABLE columns as object arrays of their kind or None."""
    for name, kind in NULLABLE.items():
        if name in batch:
            batch[name] = optional_column(batch, name, kind)
    return batch


def error_column(batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """The batch's `error` values as an object array of str (failed) or None (fine)."""
    return optional_column(batch, "error")


def pack_extra(values: Sequence[Any]) -> bytes:
    """A row's pass-through values (plain Python values, as `pyarrow` `to_pylist` gives them) → bytes.
    Pickled: the bytes are made and read by this job's own stages, never taken from the input."""
    return pickle.dumps(tuple(values), protocol=5)


def unpack_extra(data: bytes | None, width: int) -> tuple[Any, ...]:
    """`pack_extra`'s bytes → the row's `width` values; all None for a row without any (e.g. an error
    row of a whole shard)."""
    if data is None:
        return (None,) * width
    return tuple(pickle.loads(data))  # written by pack_extra in this job's read stage


def ok_mask(errors: np.ndarray) -> np.ndarray:
    """True where a row has no error."""
    return np.array([e is None for e in errors], dtype=bool)
