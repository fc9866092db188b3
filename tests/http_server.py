"""A local HTTP server for tests: in-memory files on 127.0.0.1, with injectable faults.

    with serve({"/model.bin": data}, {"/model.bin": Fault(drop_after=100, times=1)}) as server:
        fetch(..., server.url("/model.bin"), ...)
        assert server.requests[1].range == "bytes=100-"

Serves GET with a correct Content-Length and honours `Range: bytes=N-` (206 + Content-Range, or 416 past
the end) unless a fault says otherwise: ignore_range answers 200 with the whole file, range_from 206 from another byte
than the one asked for. Unknown paths are 404. Nothing leaves the machine, and nothing outlives the `with` block.
"""

from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

RANGE_PREFIX = "bytes="


@dataclass(frozen=True)
class Fault:
    """How one path misbehaves.

    The failures (drop_after, status, delay_s) hit the first `times` requests of the path (all of them when
    `times` is None); ignore_range, range_from and omit_length describe the server and hold for every request.
    """

    drop_after: int | None = None  # announce the full Content-Length, send this many body bytes, hang up
    status: int | None = None  # answer with this status and an empty body
    delay_s: float = 0.0  # wait before answering, to provoke client timeouts
    times: int | None = None
    ignore_range: bool = False  # answer 200 with the whole file even to a Range request
    range_from: int | None = None  # answer a Range request with 206 and Content-Range from this byte, whatever was asked
    omit_length: bool = False  # no Content-Length: the body ends when the connection closes


@dataclass(frozen=True)
class Seen:
    """One request the server received."""

    path: str
    range: str | None  # the Range header, verbatim


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a handler stuck in a client's socket must not keep the test process alive

    def __init__(self, files: dict[str, bytes], faults: dict[str, Fault]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files = files
        self.faults = faults
        self.stopping = threading.Event()  # wakes handlers sleeping in delay_s at shutdown
        self._lock = threading.Lock()
        self._seen: list[Seen] = []

    def record(self, seen: Seen) -> int:
        """Log a request; return how many earlier requests the same path had."""
        with self._lock:
            earlier = sum(1 for s in self._seen if s.path == seen.path)
            self._seen.append(seen)
            return earlier

    def seen(self) -> list[Seen]:
        with self._lock:
            return list(self._seen)

    def handle_error(self, request, client_address) -> None:
        # A client that timed out or hung up is what the fault tests provoke; anything else is a bug here.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do, so a drop really cuts a reused connection
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the tests assert on `LocalServer.requests` instead."""

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        range_header = self.headers.get("Range")
        earlier = self.server.record(Seen(path, range_header))
        fault = self.server.faults.get(path, Fault())
        failing = fault.times is None or earlier < fault.times
        if failing and fault.delay_s and self.server.stopping.wait(fault.delay_s):
            return
        body = self.server.files.get(path)
        start = None if fault.ignore_range or body is None else _range_start(range_header)
        if start is not None and fault.range_from is not None:
            start = fault.range_from
        if body is None:
            self._send_empty(404)
        elif failing and fault.status:
            self._send_empty(fault.status)
        elif start is not None and start >= len(body):
            self._send_empty(416, {"Content-Range": f"bytes */{len(body)}"})
        else:
            self._send_body(body, start or 0, start is not None, fault, failing)

    def _send_empty(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send_body(self, body: bytes, start: int, partial: bool, fault: Fault, failing: bool) -> None:
        payload = body[start:]
        self.send_response(206 if partial else 200)
        self.send_header("Content-Type", "application/octet-stream")
        if not fault.ignore_range:
            self.send_header("Accept-Ranges", "bytes")
        if partial:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        if fault.omit_length:
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if failing and fault.drop_after is not None:
            self.wfile.write(payload[: fault.drop_after])
            self._hang_up()
        else:
            self.wfile.write(payload)

    def _hang_up(self) -> None:
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)


def _range_start(header: str | None) -> int | None:
    """N from `bytes=N-`; other range forms are not needed by the tests and are ignored (-> 200)."""
    if not header or not header.startswith(RANGE_PREFIX) or not header.endswith("-"):
        return None
    start = header[len(RANGE_PREFIX) : -1]
    return int(start) if start.isdigit() else None


class LocalServer:
    """What `serve` yields: the base URL and the requests received so far."""

    def __init__(self, server: _Server) -> None:
        self._server = server
        host, port = server.server_address[:2]
        self.base_url = f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    @property
    def files(self) -> dict[str, bytes]:
        """The served files; tests may change them while the server runs (e.g. a file updated upstream)."""
        return self._server.files

    @property
    def requests(self) -> list[Seen]:
        return self._server.seen()


@contextmanager
def serve(files: dict[str, bytes], faults: dict[str, Fault] | None = None) -> Iterator[LocalServer]:
    """Serve `files` (path -> bytes, paths starting with "/") on 127.0.0.1 until the block exits."""
    server = _Server(dict(files), dict(faults or {}))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield LocalServer(server)
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
