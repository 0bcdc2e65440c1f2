"""Storage: URIs, filesystems, S3 settings and retries, redaction. Every module opens data through here.

A location is a local path, a ``file://`` URI or ``s3://bucket/key-prefix``. S3 keys are literal: the URI
is split at the first ``/`` after the bucket and nothing else is parsed, so ``%``, ``#``, ``?``, ``+``,
``=``, spaces and unicode are key characters, never URL syntax.

On S3, pyarrow's ``S3FileSystem`` keeps "directories" alive with 0-byte marker objects (keys ending in
``/``): ``delete_file`` and ``move`` write one for the parent that they may have emptied, ``delete_dir``
and ``delete_dir_contents`` for the parent of what they removed (so removing ``<output>/_staging`` leaves
an object ``<output>/``), ``create_dir`` one per level. A prefix needs no marker, and markers show up as
empty "files" in other tools, so everything that removes or moves data goes through :func:`delete_file`,
:func:`delete_tree` and :func:`move` here, which call S3 directly (boto3) and write no marker.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
from typing import Any
from urllib.parse import unquote, urlparse

import pyarrow.fs as pafs

S3_MAX_ATTEMPTS = 5
S3_CONNECT_TIMEOUT_S = 10.0
S3_REQUEST_TIMEOUT_S = 60.0  # a stalled transfer fails (and is retried) instead of hanging forever
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")
S3_COPY_MAX_BYTES = 5 * 2**30  # CopyObject's limit; larger objects are copied in parts
S3_DELETE_BATCH = 1000  # DeleteObjects' limit per request


class InputError(ValueError):
    """The input cannot be read at all; the message is one sentence a user can act on."""


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` → (``bucket``, ``some/key``), literally: no percent-decoding, no fragment or
    query. Leading and trailing ``/`` of the key are dropped."""
    if not uri.lower().startswith("s3://"):
        raise InputError(f"Cannot use {uri!r} as an S3 location: it must start with s3://.")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise InputError(f"Cannot use {uri!r}: an S3 URI needs a bucket, as in s3://bucket/prefix.")
    return bucket, key.strip("/")


def resolve_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """Maps a local path, ``file://`` URI or ``s3://bucket/prefix`` to (filesystem, path in it).

    Does not check that the path exists (outputs use it too). The S3 filesystem takes its settings from the
    standard AWS environment: ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` (e.g. MinIO), ``AWS_REGION`` or
    ``AWS_DEFAULT_REGION``, and credentials through the SDK's default chain (environment, profile, instance).
    """
    if not isinstance(uri, str) or not uri.strip():
        raise InputError("No input given: pass a local directory or an s3://bucket/prefix URI.")
    uri = uri.strip()
    scheme = uri.split("://", 1)[0].lower() if "://" in uri else "file"
    if scheme == "file":
        return pafs.LocalFileSystem(), local_path(uri)
    if scheme == "s3":
        bucket, key = split_s3_uri(uri)
        return s3_filesystem(), f"{bucket}/{key}" if key else bucket
    raise InputError(
        f"Cannot use {uri!r}: the scheme {scheme!r} is not supported; use a local path or s3://bucket/prefix."
    )


def is_s3(uri: str) -> bool:
    return uri.strip().lower().startswith("s3://")


def local_path(uri: str) -> str:
    """A local path or ``file://`` URI → an absolute path without trailing ``/`` (symlinks not resolved).

    A plain path is taken as it is (``~`` expanded). A ``file://`` URI is a URL: its percent-escapes are
    decoded, while ``#`` and ``?`` stay part of the path.
    """
    uri = uri.strip()
    if uri.lower().startswith("file://"):
        host, slash, path = uri[len("file://") :].partition("/")
        if host not in ("", "localhost"):
            raise InputError(f"Cannot use {uri!r}: file:// URIs must name a local path (file:///abs/path).")
        uri = unquote(slash + path)
    path = os.path.abspath(os.path.expanduser(uri))
    return path if path == "/" else path.rstrip("/")


def _endpoint() -> tuple[str, str] | None:
    """(scheme, host[:port][/path]) of AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, or None for AWS itself."""
    endpoint = (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "").strip()
    if not endpoint:
        return None
    parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise InputError(f"AWS_ENDPOINT_URL={endpoint!r} is not an http(s) URL such as http://host:9000.")
    return parsed.scheme, parsed.netloc + parsed.path.rstrip("/")


def _region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3FileSystem configured from the AWS environment, with retries and timeouts.

    pyarrow's ``S3FileSystem()`` constructor ignores ``AWS_ENDPOINT_URL`` (only ``FileSystem.from_uri``
    reads it), so the endpoint is parsed here. No credential is passed explicitly: the SDK's default chain
    reads them, and nothing secret ends up in a pickled filesystem.
    """
    kwargs: dict[str, Any] = {
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
        "connect_timeout": S3_CONNECT_TIMEOUT_S,
        "request_timeout": S3_REQUEST_TIMEOUT_S,
    }
    region = _region()
    if region:
        kwargs["region"] = region
    endpoint = _endpoint()
    if endpoint:
        kwargs["scheme"], kwargs["endpoint_override"] = endpoint
    return pafs.S3FileSystem(**kwargs)


def s3_client(parse_timestamps: bool = True) -> Any:
    """A boto3 S3 client with the same endpoint, region, retries and timeouts as :func:`s3_filesystem`, for
    what pyarrow cannot do (conditional writes, removing and moving without directory markers, listing
    from a key on).

    Each call builds a new client in its own boto3 session, so threads may call it concurrently. With
    `parse_timestamps` False, timestamps (``LastModified``) stay the strings S3 sent: botocore parses each
    with dateutil, which is about 60 % of the client's CPU time for a page of 1,000 listed keys.
    """
    import boto3
    import botocore.session
    from botocore.config import Config

    core = botocore.session.get_session()
    if not parse_timestamps:
        core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=str)
    endpoint = _endpoint()
    return boto3.session.Session(botocore_session=core).client(
        "s3",
        endpoint_url=f"{endpoint[0]}://{endpoint[1]}" if endpoint else None,
        region_name=_region(),
        config=Config(
            retries={"mode": "standard", "max_attempts": S3_MAX_ATTEMPTS},
            connect_timeout=S3_CONNECT_TIMEOUT_S,
            read_timeout=S3_REQUEST_TIMEOUT_S,
        ),
    )


_clients: dict[tuple[str | bool | None, ...], Any] = {}
_clients_lock = threading.Lock()


def shared_s3_client(parse_timestamps: bool = True) -> Any:
    """One :func:`s3_client` per process, AWS environment and `parse_timestamps` (clients are thread-safe,
    building one costs ~0.3 s of CPU); a changed endpoint, region, key id or profile gets a new one, and
    so does a forked child (it must not share its parent's connections)."""
    env = (
        "AWS_ENDPOINT_URL_S3",
        "AWS_ENDPOINT_URL",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_ACCESS_KEY_ID",
        "AWS_PROFILE",
    )
    key = (*(os.environ.get(name) for name in env), parse_timestamps, str(os.getpid()))
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = _clients[key] = s3_client(parse_timestamps)
        return client


def redact(text: str) -> str:
    """``text`` with the values of the AWS secret environment variables replaced by ``***``."""
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


def describe(exc: BaseException, limit: int = 400) -> str:
    """``ExceptionClass: message`` on one line, secrets removed, bounded length."""
    msg = " ".join(str(exc).split())
    text = redact(f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__)
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------------------------------------
# Paths and small documents in an output


def relative_path(root: str, path: str) -> str:
    """`path` (in the output's filesystem) relative to the output's `root`."""
    if not path.startswith(root + "/"):
        raise ValueError(f"{path!r} is not under the output {root!r}")
    return path[len(root) + 1 :]


def make_dirs(fs: pafs.FileSystem, path: str) -> None:
    """Creates a local directory; on object stores it does nothing, since keys need no folders and pyarrow
    would write a marker object for every level, including levels above --output."""
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(path, recursive=True)


def write_json(fs: pafs.FileSystem, path: str, obj: Any) -> None:
    """Writes a small JSON document atomically where the filesystem allows it (local: temp + rename)."""
    data = json.dumps(obj, indent=2, sort_keys=True).encode()
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp"
        with fs.open_output_stream(tmp) as s:
            s.write(data)
        fs.move(tmp, path)
    else:  # an S3 PUT is atomic
        with fs.open_output_stream(path) as s:
            s.write(data)


def read_json(fs: pafs.FileSystem, path: str) -> Any:
    with fs.open_input_stream(path) as s:
        return json.loads(s.read())


# --------------------------------------------------------------------------------------------------------
# Removing and moving without directory markers


def _bucket_key(path: str) -> tuple[str, str]:
    """An S3FileSystem path ``bucket/key`` → (bucket, key)."""
    bucket, _, key = path.partition("/")
    return bucket, key


def _os_error(exc: Exception, path: str) -> OSError:
    """A botocore error as the OSError pyarrow would raise: FileNotFoundError, PermissionError or OSError."""
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    if code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
        return FileNotFoundError(f"s3://{path} does not exist ({describe(exc, 200)})")
    if code in ("403", "AccessDenied"):
        return PermissionError(f"access to s3://{path} was denied ({describe(exc, 200)})")
    return OSError(f"s3://{path}: {describe(exc, 300)}")


def delete_file(fs: pafs.FileSystem, path: str) -> None:
    """Removes one file (a path in ``fs``, as :func:`resolve_uri` gives). A missing file is not an error.

    On S3 this is one DeleteObject and, unlike ``S3FileSystem.delete_file``, writes no marker object for the
    parent "directory" it may leave empty.
    """
    if isinstance(fs, pafs.S3FileSystem):
        bucket, key = _bucket_key(path)
        try:
            shared_s3_client().delete_object(Bucket=bucket, Key=key)
        except Exception as e:
            raise _os_error(e, path) from e
        return
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(path)


def delete_tree(fs: pafs.FileSystem, path: str) -> int:
    """Removes the directory ``path`` and everything under it; returns how many files (on S3: objects,
    directory markers included) it removed. A missing directory removes nothing and is not an error.

    On S3 this lists the keys under ``<path>/`` and removes them with DeleteObjects, 1000 per request, and,
    unlike ``S3FileSystem.delete_dir``, writes no marker object for the parent. A bucket is never removed
    whole: ``path`` must name a prefix inside one. Locally, symlinks are removed, never followed.
    """
    if isinstance(fs, pafs.S3FileSystem):
        bucket, prefix = _bucket_key(path.rstrip("/"))
        if not prefix:
            raise ValueError(f"delete_tree needs a prefix inside the bucket, not the whole bucket {bucket!r}")
        client, removed = shared_s3_client(), 0
        try:
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
            for page in pages:
                keys = [obj["Key"] for obj in page.get("Contents", [])]
                for i in range(0, len(keys), S3_DELETE_BATCH):
                    batch = [{"Key": k} for k in keys[i : i + S3_DELETE_BATCH]]
                    answer = client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
                    if answer.get("Errors"):
                        first = answer["Errors"][0]
                        raise OSError(
                            f"could not remove {len(answer['Errors'])} object(s) under s3://{path}, e.g. "
                            f"{first.get('Key')!r}: {first.get('Code')} {first.get('Message', '')}".rstrip()
                        )
                    removed += len(batch)
        except OSError:
            raise
        except Exception as e:
            raise _os_error(e, path) from e
        return removed
    if isinstance(fs, pafs.LocalFileSystem):
        if os.path.islink(path):
            os.unlink(path)
            return 1
        if not os.path.isdir(path):
            return 0
        removed = sum(  # files, and symlinks to directories (listed as directories, never walked)
            len(files) + sum(os.path.islink(os.path.join(top, d)) for d in dirs)
            for top, dirs, files in os.walk(path)
        )
        shutil.rmtree(path)
        return removed
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    if not infos and fs.get_file_info(path).type == pafs.FileType.NotFound:
        return 0
    fs.delete_dir(path)
    return sum(1 for i in infos if i.type == pafs.FileType.File)


def move(fs: pafs.FileSystem, src: str, dst: str) -> None:
    """Moves one file to ``dst``, replacing what is there. Locally a rename (atomic); on S3 a server-side
    copy (one CopyObject up to 5 GiB, a multipart copy above) then a DeleteObject of ``src``: ``dst``
    appears whole or not at all, and, unlike ``S3FileSystem.move``, no marker object is written for the
    parent of ``src``. A missing ``src`` raises FileNotFoundError.
    """
    if not isinstance(fs, pafs.S3FileSystem):
        fs.move(src, dst)
        return
    from boto3.s3.transfer import TransferConfig

    (src_bucket, src_key), (dst_bucket, dst_key) = _bucket_key(src), _bucket_key(dst)
    client = shared_s3_client()
    try:
        client.copy(
            {"Bucket": src_bucket, "Key": src_key},
            dst_bucket,
            dst_key,
            Config=TransferConfig(
                multipart_threshold=S3_COPY_MAX_BYTES, multipart_chunksize=512 * 2**20, use_threads=False
            ),
        )
    except Exception as e:
        raise _os_error(e, src) from e
    delete_file(fs, src)
