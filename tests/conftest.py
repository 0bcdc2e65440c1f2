"""Shared fixtures: a real S3 endpoint (moto's server on 127.0.0.1) and a real local Ray.

Both are started once per test session and torn down at the end; nothing outside the test's own
processes is touched.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

# Ray: no token auth file outside the project, no usage stats.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

TEST_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-do-not-log",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Starts moto's S3 server on a free loopback port and points the AWS environment at it.

    Yields the endpoint URL. Tests create their own buckets (use unique names).
    """
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in [*TEST_AWS_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(TEST_AWS_ENV)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture()
def s3_bucket(s3_server: str, request: pytest.FixtureRequest) -> str:
    """A fresh, empty bucket for one test; returns its name."""
    import uuid

    import boto3

    name = f"t-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name


@pytest.fixture()
def ray_local(s3_server: str) -> Iterator[None]:
    """A real local Ray (2 CPUs), started after the S3 environment is set so workers inherit it.

    Started on first use and kept for the session (a test that needs another Ray shuts it down first;
    the next user starts it again).
    """
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield


@pytest.fixture(scope="session", autouse=True)
def _shutdown_ray_at_exit() -> Iterator[None]:
    yield
    import sys

    if "ray" in sys.modules:
        import ray

        ray.shutdown()
