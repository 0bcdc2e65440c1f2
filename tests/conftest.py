"""Shared fixtures: a real S3 endpoint and a real local Ray.

The S3 endpoint is moto's server on 127.0.0.1, started once per test session, or the endpoint named by
VIT_EMBED_TEST_S3_ENDPOINT (a MinIO, e.g. infra/minio-compose.yaml's) with the credentials in
VIT_EMBED_TEST_S3_ACCESS_KEY_ID / VIT_EMBED_TEST_S3_SECRET_ACCESS_KEY and VIT_EMBED_TEST_S3_REGION
(default us-east-1). On a real endpoint each test's bucket is deleted after the test, and the buckets a
test made itself (named t-<12 hex digits>) at the end of the session.

Ray: one `ray start --head` of the session's own (2 CPUs, free ports, tests/ray_head.py), started on first
use and stopped at the end. The tests' in-process runs (ray_local) and the jobs they start as subprocesses
where the test is not about the job's own local Ray (job_env, with RAY_ADDRESS) join it instead of each
starting a local Ray, which costs seconds of a 2-core machine every time. Tests about a Ray of their own
(signals to its process group, a lost or resized cluster, `ray job submit`, Ray's own log files) still
start one.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from pipeline.config import JobConfig
    from tests.ray_head import RayHead

# Ray: no token auth file outside the project, no usage stats.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

S3_ENDPOINT = os.environ.get("VIT_EMBED_TEST_S3_ENDPOINT", "")  # empty: moto's server
if S3_ENDPOINT:
    _missing = [
        f"VIT_EMBED_TEST_S3_{k}"
        for k in ("ACCESS_KEY_ID", "SECRET_ACCESS_KEY")
        if not os.environ.get(f"VIT_EMBED_TEST_S3_{k}")
    ]
    if _missing:
        raise pytest.UsageError(f"VIT_EMBED_TEST_S3_ENDPOINT is set: set {' and '.join(_missing)} too")
    _region = os.environ.get("VIT_EMBED_TEST_S3_REGION") or "us-east-1"
    TEST_AWS_ENV = {
        "AWS_ACCESS_KEY_ID": os.environ["VIT_EMBED_TEST_S3_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": os.environ["VIT_EMBED_TEST_S3_SECRET_ACCESS_KEY"],
        "AWS_REGION": _region,
        "AWS_DEFAULT_REGION": _region,
    }
else:
    TEST_AWS_ENV = {
        "AWS_ACCESS_KEY_ID": "testing-key-id",
        "AWS_SECRET_ACCESS_KEY": "testing-secret-do-not-log",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
# Buckets the tests create: s3_bucket's, and those a test makes itself with the same pattern.
TEST_BUCKET = re.compile(r"t-[0-9a-f]{12}")

# Test files that start Ray nodes of their own (a head, a multi-node Cluster, jobs with a local Ray).
# With pytest-xdist (`-n 2 --dist loadgroup`, as CI runs the suite) they share one group, so they run one
# after the other in one process: Ray gives a new node 30 s to register, which two nodes starting at once
# on a busy 2-core machine can exceed. Every other file is a group of its own (its module fixtures are
# made once).
OWN_RAY_FILES = frozenset(
    {"test_cluster.py", "test_faults.py", "test_job_submit.py", "test_recovery.py", "test_signals.py"}
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        name = item.path.name
        item.add_marker(pytest.mark.xdist_group("own-ray" if name in OWN_RAY_FILES else name))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def create_bucket(s3, name: str) -> None:
    region = TEST_AWS_ENV["AWS_REGION"]
    if region == "us-east-1":
        s3.create_bucket(Bucket=name)
    else:
        s3.create_bucket(Bucket=name, CreateBucketConfiguration={"LocationConstraint": region})


def delete_bucket(s3, name: str) -> None:
    """Removes a bucket with everything in it (objects and unfinished multipart uploads)."""
    for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=name):
        for upload in page.get("Uploads", []):
            s3.abort_multipart_upload(Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"])
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
    s3.delete_bucket(Bucket=name)


def _test_buckets(s3) -> set[str]:
    return {b["Name"] for b in s3.list_buckets()["Buckets"] if TEST_BUCKET.fullmatch(b["Name"])}


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A real S3 endpoint, with the AWS environment pointed at it; yields the endpoint URL.

    moto's server on a free loopback port, or VIT_EMBED_TEST_S3_ENDPOINT when set. Tests create their own
    buckets (use s3_bucket, or unique names matching TEST_BUCKET).
    """
    saved = {k: os.environ.get(k) for k in [*TEST_AWS_ENV, "AWS_ENDPOINT_URL"]}
    server = None
    if S3_ENDPOINT:
        endpoint = S3_ENDPOINT
    else:
        from moto.server import ThreadedMotoServer

        port = free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(TEST_AWS_ENV)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    before: set[str] = set()
    if S3_ENDPOINT:
        import boto3

        before = _test_buckets(boto3.client("s3", endpoint_url=endpoint))
    try:
        yield endpoint
    finally:
        if S3_ENDPOINT:
            s3 = boto3.client("s3", endpoint_url=endpoint)
            for name in sorted(_test_buckets(s3) - before):
                delete_bucket(s3, name)
        if server is not None:
            server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture()
def s3_bucket(s3_server: str) -> Iterator[str]:
    """A fresh, empty bucket for one test, uniquely named; yields its name. On a real endpoint
    (VIT_EMBED_TEST_S3_ENDPOINT) it is deleted with its contents after the test."""
    import uuid

    import boto3

    name = f"t-{uuid.uuid4().hex[:12]}"
    s3 = boto3.client("s3", endpoint_url=s3_server)
    create_bucket(s3, name)
    yield name
    if S3_ENDPOINT:
        delete_bucket(s3, name)


# What a local Ray started by the job sets (pipeline/cluster.py): write tasks come every few seconds and
# would otherwise each start a worker.
RAY_SYSTEM_CONFIG = {"idle_worker_killing_time_threshold_ms": 60_000}


@pytest.fixture(scope="session")
def ray_cluster(s3_server: str) -> Iterator[RayHead]:
    """The session's Ray: a head node with 2 CPUs on free ports, started after the S3 environment is set
    so that its workers inherit it (credentials included, as a cluster's nodes have their own)."""
    import ray

    from tests.ray_head import ray_head

    with ray_head(num_cpus=2, system_config=RAY_SYSTEM_CONFIG) as head:
        try:
            yield head
        finally:
            if ray.is_initialized():  # disconnect before the head goes away
                ray.shutdown()


def small_config(src: Path, out: Path, **options: Any) -> JobConfig:
    """The tests' job in-process: a tiny model (ViT-Ti, random weights) at 32 px unless `options` say
    otherwise."""
    from pipeline.config import JobConfig

    options = {"image_size": 32, **options}
    return JobConfig(input=str(src), output=str(out), model="vit_ti_16", weights="random", **options)


def job_env(head: RayHead | None = None, **extra: str) -> dict[str, str]:
    """The environment of a `python jobs/embed.py` the tests start: on `head` (RAY_ADDRESS; give it absolute
    local paths, its workers do not run in the job's directory), or with a local Ray of its own."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", **extra}
    if head is not None:
        env["RAY_ADDRESS"] = head.gcs_address
    elif "RAY_ADDRESS" not in extra:
        env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture()
def ray_local(ray_cluster: RayHead) -> Iterator[None]:
    """This process connected to the session's Ray (ray_cluster), whose workers see the S3 environment.

    Connected on first use and kept for the session (a test that needs another Ray shuts it down first;
    the next user connects again).
    """
    import ray

    if not ray.is_initialized():
        ray.init(address=ray_cluster.gcs_address, log_to_driver=False)
    yield


@pytest.fixture(scope="session", autouse=True)
def _shutdown_ray_at_exit() -> Iterator[None]:
    yield
    import sys

    if "ray" in sys.modules:
        import ray

        ray.shutdown()
