"""Storage: URIs, filesystems, S3 settings and retries, redaction. Every module opens data through here.

A location is a local path, a ``file://`` URI or ``s3://bucket/key-prefix``. S3 keys are literal: the URI
is split at the first ``/`` after the bucket and nothing else is parsed, so ``%``, ``#``, ``?``, ``+``,
``=``, spaces and unicode are key characters, never URL syntax.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import unquote, urlparse

import pyarrow.fs as pafs

S3_MAX_ATTEMPTS = 5
S3_CONNECT_TIMEOUT_S = 10.0
S3_REQUEST_TIMEOUT_S = 60.0  # a stalled transfer fails (and is retried) instead of hanging forever
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")


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
    if "://" not in uri:
        return pafs.LocalFileSystem(), _local_path(uri)
    scheme, rest = uri.split("://", 1)
    scheme = scheme.lower()
    if scheme == "file":  # a URL: percent-escapes are decoded, '#' and '?' stay part of the path
        host, slash, path = rest.partition("/")
        if host not in ("", "localhost"):
            raise InputError(f"Cannot use {uri!r}: file:// URIs must name a local path (file:///abs/path).")
        return pafs.LocalFileSystem(), _local_path(unquote(slash + path))
    if scheme == "s3":
        bucket, key = split_s3_uri(uri)
        return s3_filesystem(), f"{bucket}/{key}" if key else bucket
    raise InputError(
        f"Cannot use {uri!r}: the scheme {scheme!r} is not supported; use a local path or s3://bucket/prefix."
    )


def is_s3(uri: str) -> bool:
    return uri.strip().lower().startswith("s3://")


def _local_path(path: str) -> str:
    path = os.path.abspath(os.path.expanduser(path))
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


def s3_client() -> Any:
    """A boto3 S3 client with the same endpoint, region, retries and timeouts as :func:`s3_filesystem`, for
    what pyarrow cannot do (conditional writes)."""
    import boto3
    from botocore.config import Config

    endpoint = _endpoint()
    return boto3.client(
        "s3",
        endpoint_url=f"{endpoint[0]}://{endpoint[1]}" if endpoint else None,
        region_name=_region(),
        config=Config(
            retries={"mode": "standard", "max_attempts": S3_MAX_ATTEMPTS},
            connect_timeout=S3_CONNECT_TIMEOUT_S,
            read_timeout=S3_REQUEST_TIMEOUT_S,
        ),
    )


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
