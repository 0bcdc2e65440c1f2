"""How a run stops: SIGINT and SIGTERM, and a Ray cluster that goes away, end it with status 3.

What was committed stays; the same command does the rest (the commit protocol, pipeline/commit.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from types import FrameType

RERUN = "units committed so far are kept; run the same command again to do the rest"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: raised in the main thread, so the run's clean-up (`finally`) runs."""

    def __init__(self, signum: int) -> None:
        self.name = signal.Signals(signum).name
        super().__init__(self.name)


class _StopOnSignal:
    """The handler of SIGINT and SIGTERM: the first raises Stopped, a second exits at once (status 3)."""

    def __init__(self) -> None:
        self.stopping = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.stopping:
            os.write(2, f"stopped by {name} while stopping: exiting now; {RERUN}.\n".encode())
            _stop_local_ray()
            os._exit(3)
        self.stopping = True
        raise Stopped(signum)


def _stop_local_ray(timeout_s: float = 2.0) -> None:
    """Stops the processes of a local Ray this process started (none when it connected to a cluster),
    the raylet first: it stops its workers and agents, which outlive a raylet killed by our exit."""
    ray = sys.modules.get("ray")
    node = getattr(getattr(getattr(ray, "_private", None), "worker", None), "_global_node", None)
    kinds = sorted(getattr(node, "all_processes", {}).items(), key=lambda kind: kind[0] != "raylet")
    for _, infos in kinds:
        for info in infos:
            try:
                info.process.terminate()
                info.process.wait(timeout_s)
            except Exception:  # best effort: the process exits next whatever happens here
                pass


def end_after_stop(status: int = 3) -> None:
    """Ends the process with `status` once a stop's clean-up has run, without `ray.shutdown()` and the
    interpreter's teardown. After `ray.shutdown()`, a thread still inside the abandoned Ray Data iterator
    that touches the core worker makes Ray end the process with status 1 ("The core worker process is not
    initialized yet or already shutdown"). A local Ray's processes end with this one: Ray starts them
    bound to it (Linux's parent-death signal), and its workers follow their raylet."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


def install_signal_handlers() -> None:
    """SIGINT (Ctrl-C) and SIGTERM (Kubernetes, `ray job stop`) stop the run with status 3.

    `pipeline.cluster.ensure_ray` puts these back after `ray.init`, which replaces the driver's SIGTERM
    handler with one that calls sys.exit.
    """
    handler = _StopOnSignal()
    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)


class ClusterWatch(threading.Thread):
    """Ends the process with one sentence and status 3 when the Ray cluster stops answering.

    Without it the driver waits on a dead cluster until Ray's core worker gives up on the GCS
    (RAY_gcs_rpc_server_reconnect_timeout_s, 60 s by default) and ends the process itself with status 1
    and a C++ log line. The watch probes the GCS port every `interval_s` while Ray is connected. When the
    GCS does not answer and this node's raylet does not either (the head went away: Ray ends the driver
    soon), it exits at once; when only the GCS is silent, after `grace_s` (10 s less than Ray's timeout,
    so a GCS that restarts within Ray's window, as with GCS fault tolerance, does not stop the run). The
    cluster's work is lost either way, and the next run removes what this one left uncommitted.
    """

    def __init__(self, interval_s: float = 1.0, grace_s: float | None = None) -> None:
        super().__init__(name="cluster-watch", daemon=True)
        ray_timeout = float(os.environ.get("RAY_gcs_rpc_server_reconnect_timeout_s", "60"))  # noqa: SIM112
        self.interval_s = interval_s
        self.grace_s = grace_s if grace_s is not None else max(5.0, ray_timeout - 10.0)

    def endpoints(self) -> tuple[str, str | None] | None:
        """(the GCS's host:port, this node's raylet socket) while Ray is connected, else None."""
        ray = sys.modules.get("ray")
        try:
            if not (ray and ray.is_initialized()):
                return None
            node = getattr(ray._private.worker.global_worker, "node", None)
            return str(ray.get_runtime_context().gcs_address), getattr(node, "raylet_socket_name", None)
        except Exception:  # connecting or shutting down
            return None

    def run(self) -> None:
        silent_since: float | None = None
        while True:
            time.sleep(self.interval_s)
            ends = self.endpoints()
            if ends is None or _answers(ends[0], timeout_s=self.interval_s):
                silent_since = None
                continue
            now = time.monotonic()
            silent_since = silent_since or now
            raylet_gone = ends[1] is not None and not _socket_answers(ends[1], self.interval_s)
            if (raylet_gone or now - silent_since >= self.grace_s) and self.endpoints():
                os.write(
                    2,
                    f"error: the Ray cluster went away: its GCS at {ends[0]} has not answered for "
                    f"{now - silent_since:.0f} s; {RERUN}.\n".encode(),
                )
                os._exit(3)


def _socket_answers(path: str, timeout_s: float) -> bool:
    """Whether something accepts connections on the Unix socket at `path`."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout_s)
            s.connect(path)
            return True
    except OSError:
        return False


def _answers(address: str, timeout_s: float) -> bool:
    """Whether something accepts TCP connections at host:port."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False
