"""A fault-injecting loopback proxy in front of an S3 endpoint (moto), for tests.

``FaultProxy(upstream, choose)`` listens on 127.0.0.1, forwards every request to ``upstream`` and, for the
requests ``choose`` picks, injects a fault instead of (or on top of) forwarding:

- ``"slowdown"``: 503 with S3's ``SlowDown`` error body (throttling), not forwarded;
- ``"internal"``: 500 with S3's ``InternalError`` body, not forwarded;
- ``"reset"``: the connection is reset (TCP RST) after the request was read, not forwarded;
- ``"truncate"``: forwarded, but the response body is cut in half and the connection closed (a transfer
  that dies in the middle of a body);
- ``"delay"``: forwarded after :data:`DELAY_S` seconds;

and two that are meant to be permanent (returned on every try), not forwarded:

- ``"gone"``: 404 ``NoSuchKey`` (an object deleted between listing and reading);
- ``"denied"``: 403 ``AccessDenied``.

``choose(method, target, attempt)`` gets the request's method, its target (path and query, plus the
``Range`` header when there is one) and how many times the proxy has seen that exact request before
(0 on the first try), and returns a fault name or None. Deciding from the request and its attempt number,
never from arrival order, keeps the set of injected faults the same whatever the scheduling.

``injected`` counts the faults by kind; ``log`` lists ``(method, target, fault)`` for every request seen.
Requests are handled in threads; the proxy never changes a request it forwards (SigV4 signs the Host
header, which moto does not check).
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

FAULTS = ("slowdown", "internal", "reset", "truncate", "delay")  # transient: a retry gets through
PERMANENT = ("gone", "denied")
DELAY_S = 0.5
UPSTREAM_TIMEOUT_S = 30.0
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-connection",
}

Chooser = Callable[[str, str, int], "str | None"]


def _error_xml(code: str, message: str) -> bytes:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        "<RequestId>fault-proxy</RequestId></Error>"
    ).encode()


class FaultProxy:
    def __init__(self, upstream: str, choose: Chooser) -> None:
        parsed = urlparse(upstream)
        assert parsed.scheme == "http" and parsed.hostname, upstream
        self.upstream_host = parsed.hostname
        self.upstream_port = parsed.port or 80
        self.choose = choose
        self.injected: Counter[str] = Counter()
        self.log: list[tuple[str, str, str | None]] = []
        self._seen: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "start() the proxy first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- bookkeeping

    def _decide(self, method: str, target: str) -> str | None:
        with self._lock:
            attempt = self._seen[(method, target)]
            self._seen[(method, target)] += 1
        fault = self.choose(method, target, attempt)
        if fault is not None and fault not in FAULTS + PERMANENT:
            raise ValueError(f"unknown fault {fault!r}")
        return fault

    def _record(self, method: str, target: str, fault: str | None) -> None:
        with self._lock:
            self.log.append((method, target, fault))
            if fault:
                self.injected[fault] += 1

    @property
    def total_injected(self) -> int:
        return sum(self.injected.values())


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"  # keep-alive, as the AWS SDK expects

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        body = self._read_body()
        rng = self.headers.get("Range")
        target = self.path + (f" Range={rng}" if rng else "")
        fault = self.owner._decide(self.command, target)
        if fault != "truncate":  # a truncation counts once it has happened (a HEAD has no body to cut)
            self.owner._record(self.command, target, fault)
        if fault == "slowdown":
            return self._error(503, "SlowDown", "Please reduce your request rate.")
        if fault == "internal":
            return self._error(500, "InternalError", "We encountered an internal error. Please try again.")
        if fault == "gone":
            return self._error(404, "NoSuchKey", "The specified key does not exist.")
        if fault == "denied":
            return self._error(403, "AccessDenied", "Access Denied")
        if fault == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()  # RST, no response
            return None
        if fault == "delay":
            time.sleep(DELAY_S)
        status, reason, headers, payload = self._forward(body)
        self.send_response(status, reason)
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                self.send_header(name, value)
        declared = len(payload)
        if self.command == "HEAD":
            declared = int(dict((k.lower(), v) for k, v in headers).get("content-length", 0))
        self.send_header("Content-Length", str(declared))
        truncate = fault == "truncate" and self.command != "HEAD" and len(payload) >= 2
        if fault == "truncate":
            self.owner._record(self.command, target, fault if truncate else None)
        if truncate:
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            return None
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
        return None

    def _forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(
            self.owner.upstream_host, self.owner.upstream_port, timeout=UPSTREAM_TIMEOUT_S
        )
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            headers["Content-Length"] = str(len(body))
            conn.request(
                self.command,
                self.path,
                body=body if body or self.command in ("PUT", "POST") else None,
                headers=headers,
            )
            resp = conn.getresponse()
            payload = resp.read()
            return resp.status, resp.reason, resp.getheaders(), payload
        finally:
            conn.close()

    def _error(self, status: int, code: str, message: str) -> None:
        payload = _error_xml(code, message)
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(payload)))
        if status == 503:
            self.send_header("Retry-After", "0")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle
