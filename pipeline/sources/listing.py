"""Listing an input into shards: one loose file, tar or Parquet file each, sorted by path."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
from botocore.exceptions import BotoCoreError, ClientError

from pipeline.config import FORMATS
from pipeline.rows import SHARD_ERROR_SUFFIX
from pipeline.sources.walk import Partition, Walker
from pipeline.storage import InputError, resolve_uri
from pipeline.storage import describe as _describe

TAR_SUFFIXES = (".tar",)
PARQUET_SUFFIXES = (".parquet",)


@dataclass(frozen=True, slots=True)
class Shard:
    """One unit of input: a loose file, a webdataset tar or a Parquet file."""

    path: str  # path in resolve_uri(input)'s filesystem
    rel: str  # path relative to the input root, '/' separators
    kind: str  # "file" | "webdataset" | "parquet"
    size: int
    keys: tuple[str, ...] | None = None  # read only these rows' keys (a retry); None: every row


def shards_to_items(shards: list[Shard]) -> list[dict[str, Any]]:
    """Rows for ``ray.data.from_items``: the columns ReadShards expects (path, rel, kind, size, keys), with
    ``keys`` None or a list."""
    return [{**asdict(s), "keys": None if s.keys is None else list(s.keys)} for s in shards]


def wanted_keys(shard: Shard) -> frozenset[str] | None:
    """The keys to emit from a shard; None for every row (no filter, or the shard's error key is in it)."""
    if shard.keys is None or shard.rel + SHARD_ERROR_SUFFIX in shard.keys:
        return None
    return frozenset(shard.keys)


def classify(rel: str) -> str:
    """A file's kind by its name: "webdataset" (.tar), "parquet" or "file" (an image)."""
    name = rel.lower()
    if name.endswith(TAR_SUFFIXES):
        return "webdataset"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "file"


def list_shards(uri: str, format: str = "auto") -> list[Shard]:
    """Lists the input recursively into shards sorted by ``rel``; InputError when there is nothing to read.
    (A manifest, ``--input-list``, names the shards instead: :mod:`pipeline.sources.manifest`.)"""
    if format not in FORMATS:
        raise InputError(f"Unknown input format {format!r}: choose one of {', '.join(FORMATS)}.")
    fs, root = resolve_uri(uri)
    try:
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            raise InputError(f"Input {uri} does not exist.")
        if info.type == pafs.FileType.File:
            entries = [(info.path, info.base_name, int(info.size or 0))]
        else:  # the lister of the streamed listing: os.scandir, or S3 ListObjectsV2 pages
            entries = [e for page in Walker(uri).pages(Partition(0, "", recursive=True)) for e in page]
    except InputError:
        raise
    except (OSError, pa.ArrowException, BotoCoreError, ClientError) as e:
        raise _listing_error(uri, e) from None

    if not entries:
        raise InputError(
            f"Input {uri} is empty: no files under it (names starting with '_' or '.' are ignored)."
        )
    return make_shards(uri, entries, format)


def make_shards(uri: str, entries: list[tuple[str, str, int]], format: str = "auto") -> list[Shard]:
    """Shards of (path, rel, size) entries, sorted by ``rel``: each entry's kind by its extension, the
    ``--format`` filter, and with ``auto`` the refusal of an input that mixes kinds. ``uri`` names the input
    in messages; ``entries`` is not empty."""
    classes = [classify(rel) for _, rel, _ in entries]
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
        chosen = [e for e, c in zip(entries, classes, strict=True) if c == kind]
        if not chosen:
            suffix = TAR_SUFFIXES[0] if kind == "webdataset" else PARQUET_SUFFIXES[0]
            raise InputError(f"Input {uri} has no {suffix} files, which --format {format} reads.")
    shards = [Shard(path=path, rel=rel, kind=kind, size=size) for path, rel, size in chosen]
    return sorted(shards, key=lambda s: s.rel)


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
