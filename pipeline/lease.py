"""One run at a time per output: a lease object, `<output>/_lease.json`, taken before anything else.

Acquiring is one atomic create (local: `O_CREAT | O_EXCL`; S3: a PUT with `If-None-Match: *`), so of two
runs started together exactly one gets it. The holder renews it every RENEW_S seconds. A lease is stale when
it was not renewed for LEASE_S seconds, or at once when its holder ran on this host and its process is
gone; a stale lease is taken over by a compare-and-swap (S3: a PUT with `If-Match: <etag>`; local: a
replace under an exclusive `flock` of `<output>/_lease.lock`), so two runs finding the same stale lease
never both win. A renewal that finds the lease taken over marks this run's lease as lost, and the commit
loop stops before its next commit (`check`).
"""

from __future__ import annotations

import contextlib
import email.utils
import fcntl
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

from pipeline.ledger import OutputConflictError
from pipeline.storage import is_s3, resolve_uri, s3_client, split_s3_uri

log = logging.getLogger(__name__)

LEASE_NAME = "_lease.json"
LOCK_NAME = "_lease.lock"  # local outputs: serializes takeovers and renewals (flock, released on exit)
LEASE_S = 120.0  # a lease not renewed for this long is stale
RENEW_S = 20.0
CHECK_RENEW_S = 5.0  # `check` renews first when the last renewal is older than this


class OutputBusyError(OutputConflictError):
    """Another run holds the output's lease; the message names it."""


class LeaseLostError(RuntimeError):
    """This run's lease was taken over (it was not renewed in time); the run must not commit any more."""


@dataclass(frozen=True)
class Holder:
    run_id: str
    host: str
    pid: int
    acquired_at: float
    renewed_at: float

    @classmethod
    def me(cls, run_id: str, acquired_at: float | None = None) -> Holder:
        now = time.time()
        return cls(run_id, socket.gethostname(), os.getpid(), acquired_at or now, now)

    def to_bytes(self) -> bytes:
        return json.dumps(self.__dict__, sort_keys=True).encode()

    @classmethod
    def parse(cls, data: bytes) -> Holder | None:
        try:
            d = json.loads(data)
            return cls(
                str(d["run_id"]),
                str(d["host"]),
                int(d["pid"]),
                float(d["acquired_at"]),
                float(d["renewed_at"]),
            )
        except (ValueError, KeyError, TypeError):
            return None  # unreadable (a torn local write cannot happen, but a hand-made file can): stale

    def describe(self) -> str:
        return f"run {self.run_id} (host {self.host}, pid {self.pid})"


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale(holder: Holder | None, age_s: float) -> bool:
    """True when the lease can be taken over: unreadable, not renewed for LEASE_S, or held by a process of
    this host that no longer exists."""
    if holder is None or age_s > LEASE_S:
        return True
    return holder.host == socket.gethostname() and not _alive(holder.pid)


class _LocalStore:
    """The lease file in a local (or mounted) directory."""

    def __init__(self, root: str) -> None:
        self.path = os.path.join(root, LEASE_NAME)
        self.lock_path = os.path.join(root, LOCK_NAME)
        self.root = root

    @contextlib.contextmanager
    def _locked(self):
        os.makedirs(self.root, exist_ok=True)
        fd = os.open(self.lock_path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _read(self) -> tuple[Holder | None, float] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
                age = time.time() - os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None
        return Holder.parse(data), age

    def _replace(self, holder: Holder) -> None:
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(holder.to_bytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def acquire(self, me: Holder) -> Holder | None:
        """Takes the lease; returns None on success, else the live holder."""
        with self._locked():
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                found = self._read()
                if found is not None and not stale(*found):
                    return found[0]
                if found is not None:
                    log.warning("taking over the stale lease of %s", found[0].describe() if found[0] else "?")
                self._replace(me)
                return None
            with os.fdopen(fd, "wb") as f:
                f.write(me.to_bytes())
                f.flush()
                os.fsync(f.fileno())
            return None

    def renew(self, me: Holder) -> bool:
        with self._locked():
            found = self._read()
            if found is None or found[0] is None or found[0].run_id != me.run_id:
                return False
            self._replace(me)
            return True

    def release(self, me: Holder) -> None:
        with self._locked():
            found = self._read()
            if found is not None and found[0] is not None and found[0].run_id == me.run_id:
                os.unlink(self.path)


def _code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


class _S3Store:
    """The lease object on S3 (or MinIO): conditional PUTs do the atomic parts."""

    def __init__(self, output: str) -> None:
        bucket, prefix = split_s3_uri(output)
        self.bucket, self.key = bucket, f"{prefix}/{LEASE_NAME}" if prefix else LEASE_NAME
        self.client = s3_client()
        self.etag: str | None = None

    def _read(self) -> tuple[Holder | None, float, str] | None:
        try:
            r = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            return None
        # Age by the server's clock on both ends (the response's Date and the object's Last-Modified), so
        # clock skew between the machines of two runs does not matter.
        server_now = email.utils.parsedate_to_datetime(r["ResponseMetadata"]["HTTPHeaders"]["date"])
        age = (server_now - r["LastModified"]).total_seconds()
        return Holder.parse(r["Body"].read()), age, r["ETag"]

    def _put(self, holder: Holder, **condition: Any) -> bool:
        try:
            r = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=holder.to_bytes(), **condition)
        except Exception as e:  # botocore.exceptions.ClientError
            if _code(e) in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409"):
                return False
            raise
        self.etag = r["ETag"]
        return True

    def acquire(self, me: Holder) -> Holder | None:
        for _ in range(3):  # the lease may change between the failed create and the read
            if self._put(me, IfNoneMatch="*"):
                return None
            found = self._read()
            if found is None:
                continue  # released in between: try the create again
            holder, age, etag = found
            if not stale(holder, age):
                return holder
            log.warning("taking over the stale lease of %s", holder.describe() if holder else "?")
            if self._put(me, IfMatch=etag):
                return None
        found = self._read()
        return found[0] if found and found[0] else Holder("unknown", "unknown", 0, 0.0, 0.0)

    def renew(self, me: Holder) -> bool:
        if self.etag is not None and self._put(me, IfMatch=self.etag):
            return True
        found = self._read()  # a renewal whose reply was lost still changed the etag: is it still ours?
        if found is None or found[0] is None or found[0].run_id != me.run_id:
            return False
        self.etag = found[2]
        return self._put(me, IfMatch=self.etag)

    def release(self, me: Holder) -> None:
        found = self._read()
        if found is not None and found[2] == self.etag:
            self.client.delete_object(Bucket=self.bucket, Key=self.key)


class OutputLease:
    """`with OutputLease(output, run_id):` holds the output for one run, renewed in the background."""

    def __init__(self, output: str, run_id: str) -> None:
        self.output, self.run_id = output, run_id
        self._store: _LocalStore | _S3Store = (
            _S3Store(output) if is_s3(output) else _LocalStore(resolve_uri(output)[1])
        )
        self._me = Holder.me(run_id)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False
        self.lost = False
        self._renewed = time.monotonic()

    def acquire(self) -> None:
        holder = self._store.acquire(self._me)
        if holder is not None:
            raise OutputBusyError(
                f"{self.output} is in use by {holder.describe()}, which started "
                f"{_ago(holder.acquired_at)}: wait for it to finish; if it died on another machine, the "
                f"output is free {LEASE_S:.0f} s after its last renewal."
            )
        self.held = True
        self._thread = threading.Thread(target=self._renew_loop, name="output-lease", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(RENEW_S):
            self.renew()

    def renew(self) -> None:
        try:
            ok = self._store.renew(Holder.me(self.run_id, self._me.acquired_at))
        except Exception as e:  # storage hiccup: the next renewal tries again; LEASE_S leaves room for it
            log.warning("could not renew the lease on %s: %s", self.output, e)
            return
        if not ok:
            self.lost = True
            self._stop.set()
            log.error("the lease on %s was taken over by another run", self.output)
        else:
            self._renewed = time.monotonic()

    def check(self) -> None:
        """Raises LeaseLostError when another run took the output over; call before each commit. Renews
        first unless that was done in the last CHECK_RENEW_S, so a run that was paused past the lease's
        expiry (and taken over meanwhile) finds out before it commits, not at its next renewal."""
        if self.held and not self.lost and time.monotonic() - self._renewed > CHECK_RENEW_S:
            self.renew()
        if self.lost:
            raise LeaseLostError(
                f"another run took over {self.output} because this run did not renew its lease for "
                f"{LEASE_S:.0f} s; this run stopped before committing more. Units committed so far are "
                "kept."
            )

    def release(self) -> None:
        """Gives the lease back (nothing to do when it was never taken, or was lost)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not self.held or self.lost:
            return
        self.held = False
        try:
            self._store.release(self._me)
        except Exception as e:  # the lease expires by itself
            log.warning("could not release the lease on %s: %s", self.output, e)

    def __enter__(self) -> OutputLease:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _ago(t: float) -> str:
    s = max(0.0, time.time() - t)
    return f"{s:.0f} s ago" if s < 120 else f"{s / 60:.0f} min ago"
