"""`ray job submit --working-dir .` against a real head with a dashboard, started and stopped by the test."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from pipeline.sample import make_sample
from tests.ray_head import BIN, RayHead, ray_head

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture()
def ray_head_with_dashboard() -> Iterator[RayHead]:
    with ray_head(dashboard=True) as head:
        yield head


def test_ray_job_submit_runs_the_job(tmp_path: Path, ray_head_with_dashboard: RayHead):
    address, env = ray_head_with_dashboard.dashboard_url, ray_head_with_dashboard.env
    src, out = tmp_path / "in", tmp_path / "out"
    make_sample(src, n=6)
    cmd = [
        str(BIN / "ray"),
        "job",
        "submit",
        f"--address={address}",
        f"--working-dir={REPO}",
        "--",
        "python",
        "jobs/embed.py",
        "--input",
        str(src),
        "--output",
        str(out),
        "--model",
        "vit_ti_16",
        "--weights",
        "random",
        "--image-size",
        "32",
        "--batch-size",
        "4",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "succeeded" in proc.stdout
    # The job's last stdout line is its JSON summary (ray prints its own lines after it).
    summary = next(json.loads(line) for line in reversed(proc.stdout.splitlines()) if line.startswith("{"))
    assert summary["processed"] == 6 and summary["errors"] == 0
    table = pads.dataset(str(out), format="parquet").to_table()
    assert sorted(table["key"].to_pylist()) == sorted(p.relative_to(src).as_posix() for p in src.rglob("*.*"))
