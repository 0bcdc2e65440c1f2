"""A `ray start --head` of a test's own, on free ports, and stopping only the processes it started.

Its processes are found by the unique temp dir in their command lines: `ray stop` would stop every Ray on
the machine.
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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import free_port

BIN = Path(sys.executable).parent
PORT_OPTIONS = (
    "port",
    "dashboard-port",
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "runtime-env-agent-port",
    "metrics-export-port",
    "ray-client-server-port",
    "node-manager-port",
    "object-manager-port",
)


@dataclass(frozen=True)
class RayHead:
    gcs_address: str  # host:port, for RAY_ADDRESS
    dashboard_url: str  # for `ray job submit --address` (only with a dashboard)
    temp_dir: str
    env: dict[str, str]  # this process's environment with the head's `ray` first on PATH, no RAY_ADDRESS


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


def stop(*markers: str) -> None:
    """SIGTERM, then SIGKILL, the processes whose command line names a marker, with their descendants."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _our_pids(markers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + 10
        while _our_pids(markers) and time.time() < deadline:
            time.sleep(0.2)


@contextlib.contextmanager
def ray_head(
    dashboard: bool = False, num_cpus: int = 2, system_config: dict | None = None
) -> Iterator[RayHead]:
    """A head node with every port option on a free port; stopped (its processes only) on exit.

    Its processes run in its temp dir: a job that passes relative local paths to workers cannot write into
    the directory the tests run from."""
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths have a length limit
    ports = {option: free_port() for option in PORT_OPTIONS}
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("RAY_ADDRESS", None)
    cmd = [str(BIN / "ray"), "start", "--head", f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}"]
    cmd += [f"--{option}={port}" for option, port in ports.items()]
    cmd += ["--disable-usage-stats", f"--include-dashboard={str(dashboard).lower()}"]
    if dashboard:
        cmd.append("--dashboard-host=127.0.0.1")
    if system_config:
        cmd.append(f"--system-config={json.dumps(system_config)}")
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=180, cwd=temp_dir)
    gcs = f"127.0.0.1:{ports['port']}"
    try:
        yield RayHead(gcs, f"http://127.0.0.1:{ports['dashboard-port']}", temp_dir, env)
    finally:
        stop(temp_dir, f":{ports['port']}")
        shutil.rmtree(temp_dir, ignore_errors=True)
