"""Input manifests (``--input-list``): the objects to read are named by a manifest instead of listing
``--input``.

A manifest is one of

- a Parquet file (or a directory of them) with a column ``key`` and optionally ``bucket`` and ``size``
  (S3 Inventory's Parquet columns have these names);
- a CSV file (``.csv``, or gzipped ``.csv.gz``) whose header row names a ``key`` column, optionally
  ``bucket`` and ``size``;
- an S3 Inventory report's ``manifest.json``, which names its data files (``files``), their format
  (``fileFormat``: CSV or Parquet) and, for CSV, their columns (``fileSchema``). Its CSV files are gzipped,
  have no header row, and hold URL-encoded keys. Rows of versions that are not the latest, and delete
  markers, are left out when the report has those columns.

Column names are matched without regard to case or ``_``. Keys of a Parquet or CSV manifest are taken
literally; only S3 Inventory's CSV keys are decoded.

Each key is a full object key in ``--input``'s bucket and must lie under ``--input``'s prefix; the shard's
``rel`` is the key without that prefix. For a local ``--input`` directory the keys are paths relative to
it (and a ``bucket`` column is not looked at). Keys ending in ``/`` (folder markers) and names with a
component starting with ``_`` or ``.`` are skipped as listing skips them; a key named twice is read once.
Whether the named objects exist is not checked here (that would be one request per object): the read
stage turns a missing object into an error row.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.fs as pafs

from pipeline.sources.listing import Shard, make_shards
from pipeline.sources.walk import hidden, object_path
from pipeline.storage import InputError, is_s3, read_json, resolve_uri, split_s3_uri
from pipeline.storage import describe as _describe

PAGE_ROWS = 65_536  # manifest rows per page (one record batch)
CSV_BLOCK_BYTES = 4 * 2**20  # bytes the CSV reader parses at a time

# (path in resolve_uri(--input)'s filesystem, rel, size): what make_shards takes.
Entry = tuple[str, str, int]


def list_manifest(uri: str, list_uri: str, format: str = "auto") -> list[Shard]:
    """The shards a manifest names under the input ``uri``, sorted by ``rel``, each key once.

    The same shards (kinds, ``--format`` filter, refusal of mixed kinds) as listing the same objects would
    give, except that a size the manifest does not give is 0. InputError when the manifest cannot be read,
    names objects outside the input, or names nothing to read.
    """
    entries, _ = manifest_head(uri, list_uri)
    return manifest_shards(uri, list_uri, entries, format)


def manifest_head(
    uri: str, list_uri: str, limit: int | None = None, files: list[ManifestFile] | None = None
) -> tuple[list[Entry], bool]:
    """The manifest's first objects, each key once: all of them, or, when it names more than ``limit``
    keys, the first ``limit`` + 1 read. Returns them and whether that is all. What was refused in the part
    read raises its InputError, as in ``manifest_pages``."""
    target = _Target.of(uri)
    entries: dict[str, Entry] = {}
    for page in _entry_pages(list_uri, target, files):
        for entry in page:
            entries.setdefault(entry[1], entry)
        if limit is not None and len(entries) > limit:
            target.raise_refusals(list_uri)
            return list(entries.values()), False
    target.raise_refusals(list_uri)
    return list(entries.values()), True


def manifest_shards(uri: str, list_uri: str, entries: list[Entry], format: str = "auto") -> list[Shard]:
    """The shards of a manifest's entries (all of them, each key once), as ``list_manifest``."""
    if not entries:
        raise InputError(
            f"Manifest {list_uri} names no objects to read under {uri} (names starting with '_' or '.' and "
            "keys ending in '/' are skipped)."
        )
    return make_shards(uri, entries, format)


def manifest_pages(uri: str, list_uri: str, files: list[ManifestFile] | None = None) -> Iterator[list[Entry]]:
    """The manifest's objects under the input ``uri``, one page of (path, rel, size) per record batch read,
    in the manifest's order; hidden names and folder markers are left out, a key may come twice.
    ``files``: only these of the manifest's data files (``manifest_files``), e.g. one in a worker.

    Keys in another bucket than the input's, or outside its prefix, are refused with one InputError
    (their count and the first of them) after the last page: use the pages once the iterator has ended
    without error.
    """
    target = _Target.of(uri)
    yield from _entry_pages(list_uri, target, files)
    # Read in part (a worker's data file), the count is that part's: the message says which.
    target.raise_refusals(
        list_uri if files is None else f"{list_uri} (in {', '.join(f.path for f in files)})"
    )


def _entry_pages(list_uri: str, target: _Target, files: list[ManifestFile] | None) -> Iterator[list[Entry]]:
    """The manifest's records mapped to entries under `target`, a page per record batch (empty pages left
    out); what is refused is counted in `target`, not raised."""
    for records in _record_pages(list_uri, target, files):
        page = [e for e in (target.entry(b, k, s) for b, k, s in records) if e is not None]
        if page:
            yield page


@dataclass(frozen=True)
class ManifestFile:
    """One data file of a manifest: the unit in which workers read a large one (picklable)."""

    path: str  # in resolve_uri(list_uri)'s filesystem
    format: str  # "parquet" or "csv"
    size: int  # bytes
    columns: tuple[str, ...] | None = None  # an S3 Inventory CSV file's: no header row, URL-encoded keys


def manifest_files(uri: str, list_uri: str) -> list[ManifestFile]:
    """The data files of the manifest of the input ``uri``: the files of a Parquet directory, the one CSV
    or Parquet file named, or those an S3 Inventory manifest.json names. InputError when the manifest
    cannot be read or is an inventory of another bucket."""
    return list(_guarded(list_uri, lambda: _files(list_uri, _Target.of(uri))))


# --------------------------------------------------------------------------------------------------------
# Mapping keys to the input


@dataclass
class _Target:
    """Where the keys point: the input's filesystem root, its bucket and prefix (S3), and what was refused."""

    uri: str
    root: str  # resolve_uri(uri)'s path
    bucket: str | None  # None: a local input
    prefix: str  # S3: the input's key prefix without '/' at either end; local: ""
    first: dict[str, str] = field(default_factory=dict)  # refusal ("other_bucket", "outside") -> example
    counts: dict[str, int] = field(default_factory=dict)  # refusal -> how many

    @classmethod
    def of(cls, uri: str) -> _Target:
        _, root = resolve_uri(uri)
        if is_s3(uri):
            bucket, prefix = split_s3_uri(uri.strip())
            return cls(uri, root, bucket, prefix)
        return cls(uri, root, None, "")

    def entry(self, bucket: str | None, key: str, size: int | None) -> Entry | None:
        if not key or key.endswith("/"):
            return None  # a folder marker: no image
        if self.bucket is None:
            parts = key.split("/")
            if key.startswith("/") or any(p in ("", ".", "..") for p in parts):
                self._refuse("outside", key)  # never read outside the input directory
                return None
            rel = key
        else:
            if bucket and bucket != self.bucket:
                self._refuse("other_bucket", f"s3://{bucket}/{key}")
                return None
            if self.prefix:
                if not key.startswith(self.prefix + "/"):
                    self._refuse("outside", key)
                    return None
                rel = key[len(self.prefix) + 1 :]
            else:
                rel = key
        if hidden(rel):
            return None
        return object_path(self.root, rel, self.bucket is None), rel, max(0, int(size or 0))

    def _refuse(self, kind: str, example: str) -> None:
        self.first.setdefault(kind, example)
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def raise_refusals(self, list_uri: str) -> None:
        """One InputError for what was refused; `list_uri` names the manifest (and which part was read)."""
        for kind in ("other_bucket", "outside"):
            if kind not in self.counts:
                continue
            n, first = self.counts[kind], self.first[kind]
            objects = f"{n} object{'s' if n != 1 else ''}"
            if kind == "other_bucket":
                raise InputError(
                    f"Manifest {list_uri} names {objects} in another bucket than --input's ({self.bucket}), "
                    f"e.g. {first}: pass an --input in that bucket, or a manifest of s3://{self.bucket} only."
                )
            where = (
                f"keys must start with '{self.prefix}/'"
                if self.bucket is not None and self.prefix
                else "keys of a local --input are relative paths inside it, without '.' or '..' parts"
            )
            raise InputError(
                f"Manifest {list_uri} names {objects} outside --input {self.uri}, e.g. {first!r} ({where}): "
                "pass the --input that holds them, or a manifest of that input's objects only."
            )


# --------------------------------------------------------------------------------------------------------
# Reading manifests: pages of (bucket or None, key, size or None)

Record = tuple[str | None, str, int | None]


def _record_pages(
    list_uri: str, target: _Target, files: list[ManifestFile] | None = None
) -> Iterator[list[Record]]:
    def pages() -> Iterator[list[Record]]:
        fs, _ = resolve_uri(list_uri)
        for file in _files(list_uri, target) if files is None else files:
            if file.format == "parquet":
                yield from _parquet_pages(list_uri, fs, file.path)
            else:
                yield from _csv_pages(list_uri, fs, file.path, list(file.columns) if file.columns else None)

    yield from _guarded(list_uri, pages)


def _guarded(list_uri: str, items: Callable[[], Iterable[Any]]) -> Iterator[Any]:
    """`items()`, with what reading the manifest raises worded as an InputError."""
    try:
        yield from items()
    except InputError:
        raise
    except (OSError, pa.ArrowException, ValueError) as e:
        raise InputError(f"Cannot read manifest {list_uri}: {_describe(e, 300)}.") from None


def _files(list_uri: str, target: _Target) -> list[ManifestFile]:
    fs, path = resolve_uri(list_uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"Manifest {list_uri} (--input-list) does not exist.")
    name = path.lower()
    if info.type == pafs.FileType.Directory:
        paths = sorted(pads.dataset(path, filesystem=fs, format="parquet").files)
        return [ManifestFile(i.path, "parquet", int(i.size or 0)) for i in fs.get_file_info(paths)]
    if name.endswith((".parquet", ".pq")):
        return [ManifestFile(path, "parquet", int(info.size or 0))]
    if name.endswith((".csv", ".csv.gz")):
        return [ManifestFile(path, "csv", int(info.size or 0))]
    if name.endswith(".json"):
        return _inventory_files(list_uri, fs, path, target)
    raise InputError(
        f"Cannot tell the format of manifest {list_uri}: --input-list takes a .parquet file or a "
        "directory of them, a .csv or .csv.gz file with a header row, or an S3 Inventory manifest.json."
    )


def _canonical(name: str) -> str:
    return name.lower().replace("_", "").replace(" ", "")


# canonical column name -> the name used below
_COLUMNS = {"key": "key", "bucket": "bucket", "size": "size", "islatest": "is_latest", "isdeletemarker": "dm"}


def _pick(list_uri: str, names: list[str]) -> dict[str, str]:
    """The manifest's own names of the columns read: {"key": …, optional "bucket", "size", "is_latest",
    "dm"}; InputError without a key column."""
    found: dict[str, str] = {}
    for name in names:
        role = _COLUMNS.get(_canonical(name))
        if role is not None and role not in found:
            found[role] = name
    if "key" not in found:
        shown = ", ".join(names[:12]) + (", …" if len(names) > 12 else "")
        raise InputError(
            f"Manifest {list_uri} has no 'key' column (its columns: {shown or 'none'}): a manifest needs a "
            "column 'key' with the object keys, optionally 'bucket' and 'size'."
        )
    return found


def _records(batch: pa.RecordBatch | pa.Table, cols: dict[str, str], decode: bool) -> list[Record]:
    """One page of records from a batch; rows of versions that are not the latest and of delete markers
    are left out. ``decode``: the keys are S3 Inventory CSV keys, URL-encoded."""

    def column(role: str) -> list[Any] | None:
        name = cols.get(role)
        return None if name is None else batch.column(batch.schema.get_field_index(name)).to_pylist()

    keys = column("key") or []
    n = len(keys)
    buckets = column("bucket") or [None] * n
    sizes = column("size") or [None] * n
    latest = column("is_latest") or [None] * n
    markers = column("dm") or [None] * n
    out: list[Record] = []
    for key, bucket, size, is_latest, marker in zip(keys, buckets, sizes, latest, markers, strict=True):
        if key is None or _false(is_latest) or _true(marker):
            continue
        if decode:
            # S3 Inventory's CSV keys are URL-encoded the way HTML forms encode values: a space is '+',
            # and a '+' in the key is '%2B' (as in S3 event notifications). unquote_plus undoes exactly
            # that; unquote would leave every space as '+'. Parquet inventories hold the keys as they are.
            key = unquote_plus(key)
        out.append((bucket or None, key, None if size is None else int(size)))
    return out


def _true(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def _false(value: Any) -> bool:
    return value is False or (isinstance(value, str) and value.strip().lower() == "false")


def _parquet_pages(list_uri: str, fs: pafs.FileSystem, path: str) -> Iterator[list[Record]]:
    dataset = pads.dataset(path, filesystem=fs, format="parquet")
    cols = _pick(list_uri, dataset.schema.names)
    for role in ("key", "bucket"):
        if role in cols and not _stringish(dataset.schema.field(cols[role]).type):
            raise InputError(
                f"Manifest {list_uri}: its column {cols[role]!r} is {dataset.schema.field(cols[role]).type}, "
                "not text."
            )
    if "size" in cols and not pa.types.is_integer(dataset.schema.field(cols["size"]).type):
        cols.pop("size")  # not a byte count: sizes are only a hint, left at 0
    for batch in dataset.to_batches(columns=list(dict.fromkeys(cols.values())), batch_size=PAGE_ROWS):
        if batch.num_rows:
            yield _records(batch, cols, decode=False)


def _stringish(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        return _stringish(t.value_type)
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _csv_stream(fs: pafs.FileSystem, path: str) -> Any:
    return fs.open_input_stream(path, compression="gzip" if path.lower().endswith(".gz") else None)


def _csv_pages(
    list_uri: str, fs: pafs.FileSystem, path: str, inventory_columns: list[str] | None = None
) -> Iterator[list[Record]]:
    """A CSV file's records. The first row names the columns, except in an S3 Inventory CSV file: it has
    no header row, its columns are ``inventory_columns`` (the manifest's fileSchema) and its keys are
    URL-encoded."""
    names = inventory_columns
    if names is None:  # read the header first, to read the key and bucket columns as text
        with _csv_stream(fs, path) as s:
            names = pacsv.open_csv(s, read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES)).schema.names
    cols = _pick(list_uri, names)
    types = {cols[r]: pa.string() for r in ("key", "bucket", "is_latest", "dm") if r in cols}
    if "size" in cols:
        types[cols["size"]] = pa.int64()
    read = pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES, column_names=inventory_columns)
    convert = pacsv.ConvertOptions(column_types=types, include_columns=list(dict.fromkeys(cols.values())))
    with _csv_stream(fs, path) as s:
        rows: list[Record] = []
        for batch in pacsv.open_csv(s, read_options=read, convert_options=convert):
            rows.extend(_records(batch, cols, decode=inventory_columns is not None))
            if len(rows) >= PAGE_ROWS:
                yield rows
                rows = []
        if rows:
            yield rows


def _inventory_files(list_uri: str, fs: pafs.FileSystem, path: str, target: _Target) -> list[ManifestFile]:
    """The data files of an S3 Inventory report, from its manifest.json.

    The manifest names its data files by key in the destination bucket. For a manifest on S3 they are read
    from there; for a local copy of the report they are looked for where the report's layout puts them,
    ``<manifest's folder>/../data/<file name>`` (``<prefix>/<bucket>/<config>/<date>/manifest.json`` next to
    ``<prefix>/<bucket>/<config>/data/``).
    """
    doc = read_json(fs, path)
    if not isinstance(doc, dict) or not isinstance(doc.get("files"), list) or "fileFormat" not in doc:
        raise InputError(
            f"Manifest {list_uri} is not an S3 Inventory manifest.json (it needs 'fileFormat' and 'files')."
        )
    source = doc.get("sourceBucket")
    if target.bucket is not None and source and source != target.bucket:
        raise InputError(
            f"Manifest {list_uri} is an inventory of bucket {source}, not of --input's bucket "
            f"{target.bucket}: pass an --input in {source}, or the inventory of {target.bucket}."
        )
    fmt = str(doc["fileFormat"]).strip().lower()
    if fmt not in ("csv", "parquet"):
        raise InputError(
            f"Manifest {list_uri}: the inventory's format is {doc['fileFormat']}, which is not read here; "
            "configure the inventory as CSV or Parquet."
        )
    destination = str(doc.get("destinationBucket") or "").rsplit(":", 1)[-1]  # arn:aws:s3:::name
    names = tuple(n.strip() for n in str(doc.get("fileSchema") or "").split(",") if n.strip())
    files = []
    for f in doc["files"]:
        key = f.get("key") if isinstance(f, dict) else None
        if not key:
            raise InputError(f"Manifest {list_uri}: an entry of 'files' has no 'key'.")
        if isinstance(fs, pafs.LocalFileSystem):
            file = os.path.join(os.path.dirname(os.path.dirname(path)), "data", key.rsplit("/", 1)[-1])
        elif destination:
            file = f"{destination}/{key}"
        else:
            raise InputError(f"Manifest {list_uri} names no destinationBucket for its files.")
        size = f.get("size") if isinstance(f.get("size"), int) else 0
        files.append(ManifestFile(file, fmt, size, names if fmt == "csv" else None))
    return files
