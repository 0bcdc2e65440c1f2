"""`python jobs/embed.py` stopped while it runs: SIGINT (Ctrl-C), SIGTERM (Kubernetes, `ray job stop`), a
second signal, and the Ray cluster going away. Each exits 3 with one sentence and no traceback, and
running the same command again finishes the job with every key exactly once.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest

from jobs.embed import config_from_args, parse_args
from pipeline.run import run
from pipeline.sample import encode, photo_like
from tests.conftest import job_env
from tests.ray_head import RayHead, ray_head, stop

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
SMALL = ["--model", "vit_ti_16", "--weights", "random", "--image-size", "32", "--batch-size", "4"]
JOB = [sys.executable, str(REPO / "jobs" / "embed.py"), "--input", "in", "--output", "out", *SMALL]
RERUN = "units committed so far are kept; run the same command again to do the rest"


def _images(root: Path, n: int) -> set[str]:
    """`n` tiny JPEGs (48x40); returns their keys."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        (root / f"img_{i:04d}.jpg").write_bytes(encode(photo_like(rng, 48, 40)))
    return {f"img_{i:04d}.jpg" for i in range(n)}


def _start(tmp_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """The job in its own session (so a signal to its process group reaches only it and its children),
    with a local Ray of its own unless `env` names a cluster (RAY_ADDRESS: then with absolute paths, the
    cluster's workers do not run in the job's directory)."""
    job = JOB
    if env and env.get("RAY_ADDRESS"):
        job = [*JOB[:2], "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), *JOB[6:]]
    return subprocess.Popen(
        [*job, "--commit-interval", "0.5"],
        cwd=tmp_path,
        env=env or job_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_for(proc: subprocess.Popen, ready: Callable[[], bool], timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the job ended ({proc.returncode}) before it was signalled:\n{out[-2000:]}{err}")
        assert time.monotonic() < deadline, "the job never got going"
        time.sleep(0.05)


def _committed(out: Path) -> int:
    return sum(1 for p in out.glob("*.parquet")) if out.is_dir() else 0


def _finish(proc: subprocess.Popen, within_s: float) -> tuple[float, str]:
    start = time.monotonic()
    try:
        _, err = proc.communicate(timeout=within_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"the job did not stop within {within_s} s")
    return time.monotonic() - start, err


def _rerun_finishes_with_every_key_once(tmp_path: Path, keys: set[str]) -> None:
    """The same command again, in this process on the tests' Ray (the job's start-up is not under test)."""
    config = config_from_args(parse_args([*JOB[2:]]))
    config = dataclasses.replace(config, input=str(tmp_path / "in"), output=str(tmp_path / "out"))
    run(config)
    table = pads.dataset(str(tmp_path / "out"), format="parquet").to_table(columns=["key", "error"])
    found = table["key"].to_pylist()
    assert len(found) == len(set(found)), "a key was written twice"
    assert set(found) == keys
    assert table["error"].null_count == len(keys)


@pytest.mark.parametrize(
    ("sig", "when"),
    [
        # Ctrl-C in a terminal: the whole foreground process group (the job and its local Ray), as soon as
        # the run has started.
        (signal.SIGINT, "started"),
        # Kubernetes stopping the pod: the job's process alone, a driver on a cluster (the tests' Ray),
        # once units are being committed.
        (signal.SIGTERM, "committing"),
    ],
)
def test_a_signal_stops_the_run_with_status_3_and_the_same_command_finishes_it(
    tmp_path: Path, sig: signal.Signals, when: str, ray_local: None, ray_cluster: RayHead
):
    keys = _images(tmp_path / "in", 600)
    proc = _start(tmp_path, job_env(ray_cluster) if when == "committing" else None)
    out = tmp_path / "out"
    if when == "started":
        _wait_for(proc, (out / "_runs").is_dir)
        time.sleep(1.0)
        os.killpg(proc.pid, sig)
    else:
        _wait_for(proc, lambda: _committed(out) > 0)
        proc.send_signal(sig)
    seconds, err = _finish(proc, within_s=30)
    assert proc.returncode == 3, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert f"stopped by {sig.name}: {RERUN}." in err.splitlines()
    assert seconds < 20, f"stopping took {seconds:.1f} s"
    _rerun_finishes_with_every_key_once(tmp_path, keys)


def test_a_second_signal_while_stopping_exits_at_once(tmp_path: Path, ray_local: None):
    keys = _images(tmp_path / "in", 300)
    proc = _start(tmp_path)
    _wait_for(proc, (tmp_path / "out" / "_runs").is_dir)
    # Back to back: the second must find the first's clean-up under way, however fast that clean-up is
    # (CPython runs the handlers in signal order, SIGINT's first).
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGTERM)
    seconds, err = _finish(proc, within_s=30)
    assert proc.returncode == 3, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert any(line.startswith("stopped by SIGTERM while stopping: exiting now") for line in err.splitlines())
    assert seconds < 10, f"the second signal took {seconds:.1f} s"
    _rerun_finishes_with_every_key_once(tmp_path, keys)


@pytest.fixture()
def head() -> Iterator[RayHead]:
    with ray_head() as h:
        yield h


def test_losing_the_cluster_exits_3_with_a_sentence(tmp_path: Path, head: RayHead):
    """Without the job's watch, the driver waits on the dead cluster until Ray ends it with status 1
    (60 s by default). Ray's timeout is set to 15 s here, so the watch gives up after 5 s."""
    address, temp_dir = head.gcs_address, head.temp_dir
    _images(tmp_path / "in", 600)
    env = job_env(RAY_ADDRESS=address, RAY_gcs_rpc_server_reconnect_timeout_s="15")
    proc = _start(tmp_path, env)
    _wait_for(proc, (tmp_path / "out" / "_runs").is_dir)
    start = time.monotonic()
    stop(temp_dir, f":{address.rsplit(':', 1)[1]}")  # the head's processes and their children only
    _, err = _finish(proc, within_s=40)
    seconds = time.monotonic() - start
    assert proc.returncode == 3, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "the Ray cluster went away" in lines[0] and RERUN in lines[0], err[-3000:]
    assert seconds < 30, f"noticing the lost cluster took {seconds:.1f} s"
