"""Parquet files: one row per table row, read one record batch of ``rows_per_batch`` rows at a time; and
the planning-time checks of a Parquet input (its columns, the uniqueness of its keys)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.rows import SHARD_ERROR_SUFFIX, pack_extra
from pipeline.sources.base import STREAM_BUFFER_BYTES, Row, Settings, too_big
from pipeline.sources.listing import Shard
from pipeline.storage import InputError, is_s3, resolve_uri
from pipeline.storage import describe as _describe

log = logging.getLogger(__name__)


def read_parquet(settings: Settings, shard: Shard) -> Iterator[Row]:
    """The rows of a Parquet file; a row group that fails transiently is read again from where it failed."""
    err_key = shard.rel + SHARD_ERROR_SUFFIX
    try:
        (pf,) = settings.retrying(shard.rel, lambda _last: (_open(settings, shard),))  # a stream of one item
    except Exception as e:
        yield err_key, None, f"read: not a readable Parquet file: {_describe(e)}"
        return
    problem = parquet_columns_problem(pf.schema_arrow, settings.image_column, settings.key_column)
    if problem:
        yield err_key, None, "read: " + problem
        return
    kept, problem = _kept_columns(pf.schema_arrow, settings.keep_columns)
    if problem:
        yield err_key, None, "read: " + problem
        return
    columns = [settings.image_column]
    if settings.key_column is not None and settings.key_column != settings.image_column:
        columns.append(settings.key_column)

    problems: list[str] = []
    first = 0  # index of the row group's first row in the file
    for rg in range(pf.num_row_groups):
        n_rows = pf.metadata.row_group(rg).num_rows
        group = _RowGroup(settings, pf, shard.rel, rg, first, columns, kept)
        try:
            yield from settings.retrying(f"{shard.rel} row group {rg}", group.rows)
        except Exception as e:
            problems.append(
                f"row group {rg} (rows {first + group.read}–{first + n_rows - 1}) unreadable: "
                + _describe(e, 200)
            )
        first += n_rows
    if problems:
        yield err_key, None, "read: Parquet file is damaged: " + "; ".join(problems)


def _open(settings: Settings, shard: Shard) -> pq.ParquetFile:
    return pq.ParquetFile(
        settings.fs.open_input_file(shard.path), buffer_size=STREAM_BUFFER_BYTES, pre_buffer=False
    )


def _kept_columns(
    schema: pa.Schema, keep: tuple[tuple[str, pa.DataType], ...]
) -> tuple[list[tuple[str, pa.DataType] | None], str | None]:
    """The `--keep-columns` this file has (None for one it lacks: its values are null), and why they
    cannot be passed through, when a column's type here cannot become the output's."""
    kept: list[tuple[str, pa.DataType] | None] = []
    for name, declared in keep:
        if name not in schema.names:
            kept.append(None)
            continue
        here = schema.field(name).type
        if here != declared and not _castable(here, declared):
            return [], (
                f"Parquet column {name!r} is {here} in this file but {declared} in the output (the type "
                "of the first Parquet file of the input): --keep-columns needs one type across the input"
            )
        kept.append((name, declared))
    return kept, None


def _castable(source: pa.DataType, target: pa.DataType) -> bool:
    """Whether Arrow casts `source` to `target` without changing what the values mean: between integer
    widths, float widths, string or binary sizes and views, and to a larger type."""
    groups = [
        (pa.types.is_integer,),
        (pa.types.is_floating,),
        (pa.types.is_string, pa.types.is_large_string),
        (pa.types.is_binary, pa.types.is_large_binary),
    ]
    return any(any(g(source) for g in group) and any(g(target) for g in group) for group in groups)


class _RowGroup:
    """One row group's rows; ``rows`` called again after a failure resumes after the rows already emitted."""

    def __init__(
        self,
        settings: Settings,
        pf: pq.ParquetFile,
        rel: str,
        rg: int,
        first: int,
        columns: list[str],
        kept: list[tuple[str, pa.DataType] | None],
    ) -> None:
        self.settings, self.pf, self.rel, self.rg, self.columns = settings, pf, rel, rg, columns
        self.kept = kept
        self.first = first  # index of the row group's first row in the file
        self.read = 0  # rows of this row group already emitted

    def rows(self, _last: bool) -> Iterator[Row]:
        seen = 0
        present = [k[0] for k in self.kept if k is not None and k[0] not in self.columns]
        for rb in self.pf.iter_batches(
            batch_size=self.settings.rows_per_batch,
            row_groups=[self.rg],
            columns=self.columns + present,
            use_threads=False,
        ):
            if seen + rb.num_rows <= self.read:  # emitted before a retry
                seen += rb.num_rows
                continue
            images = rb.column(0).to_pylist()
            keys = rb.column(1).to_pylist() if len(self.columns) > 1 else None
            extra = self._extra(rb)
            for j in range(max(0, self.read - seen), rb.num_rows):
                row = _parquet_row(self.settings, self.rel, self.first + seen + j, images[j], keys, j)
                yield row if extra is None else (*row, pack_extra([v[j] for v in extra]))
                self.read = seen + j + 1
            seen += rb.num_rows

    def _extra(self, rb: pa.RecordBatch) -> list[list[Any]] | None:
        """The kept columns' values of a record batch, in the output's types; None when none is kept."""
        if not self.kept:
            return None
        values: list[list[Any]] = []
        for k in self.kept:
            if k is None:
                values.append([None] * rb.num_rows)
            else:
                values.append(rb.column(k[0]).cast(k[1]).to_pylist())
        return values


def _parquet_row(settings: Settings, rel: str, index: int, value: Any, keys: list | None, j: int) -> Row:
    if keys is None or settings.key_column == settings.image_column:
        key = f"{rel}#{index}"
    elif keys[j] is None:
        return f"{rel}#{index}", None, f"read: key column {settings.key_column!r} is null in row {index}"
    else:
        key = str(keys[j])
    if isinstance(value, dict):  # struct column (Hugging Face datasets' Image feature)
        if value.get("bytes") is None and value.get("path"):
            return key, None, _path_only(settings, value["path"], index)
        value = value.get("bytes")
    if value is None:
        return key, None, f"read: Parquet column {settings.image_column!r} is null in row {index}"
    if len(value) > settings.max_image_bytes:
        return key, None, too_big(settings, f"image value in row {index}", len(value))
    return key, bytes(value), None


def _path_only(settings: Settings, path: str, index: int) -> str:
    """The error of a Hugging Face Image struct that names a file instead of holding its bytes."""
    return (
        f"read: Parquet column {settings.image_column!r} holds only a file path ({path!r}) in row {index}, "
        "not the image bytes, so it was not embedded; export the dataset with the image bytes embedded "
        "(with `datasets`: embed_external_files, or cast the column to Image(decode=True), before "
        "to_parquet)"
    )


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


def kept_column_types(
    input_uri: str, shard: Shard, names: tuple[str, ...]
) -> tuple[tuple[str, pa.DataType], ...]:
    """The (name, type) of the `--keep-columns` in one Parquet shard (the first of the input): the output
    columns they become. Raises InputError when the file lacks one or cannot be read."""
    where = _where(input_uri, shard)
    try:
        with resolve_uri(input_uri)[0].open_input_file(shard.path) as f:
            schema = pq.ParquetFile(f).schema_arrow
    except (OSError, pa.ArrowException) as e:
        raise InputError(
            f"Cannot read the columns of Parquet file {where} to type --keep-columns: {_describe(e, 200)}."
        ) from e
    missing = [n for n in names if n not in schema.names]
    if missing:
        raise InputError(
            f"Parquet file {where} has no column {missing[0]!r} (columns: {_listed(schema.names)}); "
            "--keep-columns names columns of the input."
        )
    return tuple((n, schema.field(n).type) for n in names)


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
