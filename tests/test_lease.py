"""The output lease: one run at a time, taken atomically, stale leases taken over by compare-and-swap.
Local directories and a real S3 endpoint (moto's server)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from pipeline import lease as lease_mod
from pipeline.lease import LEASE_NAME, LeaseLostError, OutputBusyError, OutputLease


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "out")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/emb#1/out"


def _write_lease(output: str, holder: dict) -> None:
    """A lease left by another run (written directly, as that run would have)."""
    body = json.dumps(holder).encode()
    if output.startswith("s3://"):
        from pipeline.storage import s3_client, split_s3_uri

        bucket, key = split_s3_uri(output)
        s3_client().put_object(Bucket=bucket, Key=f"{key}/{LEASE_NAME}", Body=body)
    else:
        os.makedirs(output, exist_ok=True)
        Path(output, LEASE_NAME).write_bytes(body)


def _holder(run_id: str, host: str, pid: int) -> dict:
    now = time.time()
    return {"run_id": run_id, "host": host, "pid": pid, "acquired_at": now, "renewed_at": now}


def test_one_of_many_simultaneous_runs_gets_the_lease(output: str):
    leases = [OutputLease(output, f"run{i}") for i in range(6)]
    barrier = threading.Barrier(len(leases))
    won, refused = [], []

    def take(lease: OutputLease) -> None:
        barrier.wait()
        try:
            lease.acquire()
            won.append(lease.run_id)
        except OutputBusyError as e:
            refused.append(str(e))

    threads = [threading.Thread(target=take, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 5
    assert all(f"run {won[0]}" in message for message in refused), refused[0]
    for lease in leases:
        lease.release()
    with OutputLease(output, "after"):  # released: free again
        pass


def test_a_live_lease_refuses_and_names_its_holder(output: str):
    _write_lease(output, _holder("20260101T000000Z-abc", "elsewhere", 42))
    with pytest.raises(OutputBusyError, match=r"run 20260101T000000Z-abc \(host elsewhere, pid 42\)"):
        OutputLease(output, "mine").acquire()


def test_a_lease_of_a_dead_process_on_this_host_is_taken_over_at_once(output: str):
    _write_lease(output, _holder("dead", socket.gethostname(), 2**22 + 11))
    with OutputLease(output, "mine") as lease:
        lease.check()


def test_an_expired_lease_is_taken_over(output: str, monkeypatch: pytest.MonkeyPatch):
    _write_lease(output, _holder("silent", "elsewhere", 42))
    monkeypatch.setattr(lease_mod, "LEASE_S", -1.0)  # every lease is past its expiry
    with OutputLease(output, "mine") as lease:
        lease.check()


def test_a_run_whose_lease_was_taken_over_stops_committing(output: str, monkeypatch: pytest.MonkeyPatch):
    first = OutputLease(output, "first")
    first.acquire()
    monkeypatch.setattr(lease_mod, "LEASE_S", -1.0)  # first missed its renewals
    second = OutputLease(output, "second")
    second.acquire()
    first.renew()
    with pytest.raises(LeaseLostError, match="another run took over"):
        first.check()
    first.release()  # does not remove the new holder's lease
    monkeypatch.setattr(lease_mod, "LEASE_S", 120.0)
    with pytest.raises(OutputBusyError, match="run second"):
        OutputLease(output, "third").acquire()
    second.renew()
    second.check()
    second.release()


def test_a_run_paused_past_its_lease_finds_out_before_committing(
    output: str, monkeypatch: pytest.MonkeyPatch
):
    first = OutputLease(output, "first")
    first.acquire()
    monkeypatch.setattr(lease_mod, "LEASE_S", -1.0)
    second = OutputLease(output, "second")
    second.acquire()  # took over while `first` was paused
    monkeypatch.setattr(lease_mod, "CHECK_RENEW_S", 0.0)
    try:
        with pytest.raises(LeaseLostError):
            first.check()  # no renewal ran in between: check() renews itself
    finally:  # their renewal threads would go on writing the lease after the test
        first.release()
        second.release()


def test_renewal_keeps_the_lease(output: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(lease_mod, "RENEW_S", 0.05)
    with OutputLease(output, "mine") as lease:
        time.sleep(0.4)
        lease.check()
        with pytest.raises(OutputBusyError):
            OutputLease(output, "other").acquire()
