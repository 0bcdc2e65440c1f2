"""`ray job submit --working-dir .` against a real head with a dashboard, started and stopped by the test.

Only the processes this test started are stopped (found by the unique temp dir in their command lines):
`ray stop` would stop every Ray on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from pipeline.sample import make_sample
from tests.conftest import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _processes() -> dict[int, tuple[int, str]]:
    """pid → (parent pid, command line) for every process we can see."""
    procs = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            procs[int(d.name)] = (ppid, cmd)
    return procs


def _our_pids(markers: tuple[str, ...]) -> set[int]:
    """Processes whose command line names one of our markers, and all their descendants."""
    procs = _processes()
    ours = {pid for pid, (_, cmd) in procs.items() if any(m in cmd for m in markers)} - {os.getpid()}
    grew = True
    while grew:
        children = {pid for pid, (ppid, _) in procs.items() if ppid in ours} - ours - {os.getpid()}
        ours |= children
        grew = bool(children)
    return ours


def _stop(*markers: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _our_pids(markers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + 10
        while _our_pids(markers) and time.time() < deadline:
            time.sleep(0.2)


@pytest.fixture()
def ray_head():
    temp_dir = tempfile.mkdtemp(prefix="rjs", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs, dash = free_port(), free_port()
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        f"--port={gcs}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        "--include-dashboard=true",
        "--num-cpus=2",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=180)
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        _stop(temp_dir, f":{gcs}")
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_the_job(tmp_path: Path, ray_head):
    address, env = ray_head
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
