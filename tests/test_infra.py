"""infra/ stays true to the code: manifests parse, their command lines are ones jobs/embed.py accepts,
the schedule runs the same job, and the image copies paths that exist."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from jobs.embed import config_from_args, parse_args

INFRA = Path(__file__).resolve().parent.parent / "infra"


def _load(name: str) -> dict:
    return yaml.safe_load((INFRA / name).read_text())


def _entrypoint_config(spec: dict):
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "jobs/embed.py"]
    return config_from_args(parse_args(argv[2:]))


def test_rayjob_runs_the_job_with_valid_flags_on_cpu_and_gpu_groups():
    job = _load("rayjob.yaml")
    assert job["kind"] == "RayJob" and job["apiVersion"] == "ray.io/v1"
    config = _entrypoint_config(job["spec"])
    assert config.input.startswith("s3://") and config.output.startswith("s3://")
    groups = {g["groupName"]: g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    gpu = groups["gpu-embed"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    cpu = groups["cpu-decode"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1" and "nvidia.com/gpu" not in cpu
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == "2.60.0"


def test_the_schedule_runs_exactly_the_rayjob():
    cron = _load("raycronjob.yaml")
    assert cron["kind"] == "RayCronJob" and cron["spec"]["schedule"]
    assert cron["spec"]["jobTemplate"] == _load("rayjob.yaml")["spec"]


def test_images_and_dockerfile_agree():
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert "rayproject/ray:2.60.0" in dockerfile
    for line in dockerfile.splitlines():
        if line.startswith("COPY"):
            for src in line.split()[1:-1]:
                if not src.startswith("--"):
                    assert (INFRA.parent / src).exists(), src
    job = _load("rayjob.yaml")
    images = {c["image"] for c in _containers(job)}
    assert images == {"vit-embed:0.1.0"}


def test_minio_compose_creates_the_buckets_the_examples_use():
    compose = _load("minio-compose.yaml")
    buckets = compose["services"]["buckets"]["entrypoint"]
    for uri in ("s3://images", "s3://embeddings", "s3://models"):
        assert f"local/{uri.removeprefix('s3://')}" in buckets


def _containers(node):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "containers":
                yield from v
            else:
                yield from _containers(v)
    elif isinstance(node, list):
        for v in node:
            yield from _containers(v)
