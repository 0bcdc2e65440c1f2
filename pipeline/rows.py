"""What every stage's rows share: the `key` conventions and the `error` column.

A row's `key` is its input's path relative to `--input` (loose files), `<shard>#<sample key>` (tar
samples), `<file>#<row index>` or the `--key-column` value (Parquet rows). A problem with a whole container
is one row keyed `<shard>#.error` (SHARD_ERROR_SUFFIX): no sample key or row index ends that way.

`error` is a str where a row failed, None where it did not. Ray Data stores an all-null column with
Arrow's null type and hands it back to numpy as float NaNs, so a stage must not test `error is None`: it
asks `error_column(batch)` for a clean object array instead.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

SHARD_ERROR_SUFFIX = "#.error"


def error_column(batch: Mapping[str, np.ndarray]) -> np.ndarray:
    """The batch's `error` values as an object array of str (failed) or None (fine)."""
    raw = batch.get("error")
    n = len(batch["key"])
    if raw is None:
        return np.full(n, None, dtype=object)
    return np.array([e if isinstance(e, str) else None for e in raw], dtype=object)


def ok_mask(errors: np.ndarray) -> np.ndarray:
    """True where a row has no error."""
    return np.array([e is None for e in errors], dtype=bool)
