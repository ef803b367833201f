"""S3 endpoints for the storage tests, all on 127.0.0.1: a real SeaweedFS server, a moto
server, and a proxy that injects faults (error statuses, connection resets) in front of one."""

from __future__ import annotations

import contextlib
import functools
import http.client
import logging
import socket
import struct
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

import boto3
from botocore.client import BaseClient
from moto.server import ThreadedMotoServer

from osa_dagster.storage import local_s3
from osa_dagster.storage.local_s3 import SeaweedFSUnavailable as SeaweedFSUnavailable
from osa_dagster.storage.local_s3 import free_ports as free_ports
from osa_dagster.storage.s3 import RetryPolicy, S3Store, make_s3_client

# Fast enough that exhausting the retries takes well under a second.
TEST_RETRY = RetryPolicy(attempts=4, base_delay=0.02, max_delay=0.1)
BUCKET = "osa-test"
ACCESS_KEY = "osa-test-key"
SECRET_KEY = "osa-test-secret"


@dataclass(frozen=True)
class S3Endpoint:
    """An S3 server for the tests: where it is, its bucket and the credentials it accepts."""

    url: str
    bucket: str = BUCKET
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY

    def client(self, *, url: str | None = None, secret_key: str | None = None) -> BaseClient:
        """A new client: through a proxy (`url`), or with other credentials."""
        session = boto3.session.Session(
            aws_access_key_id=self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
        )
        return make_s3_client(
            endpoint_url=url or self.url, session=session, connect_timeout=2, read_timeout=10
        )

    @functools.cached_property
    def shared_client(self) -> BaseClient:
        # A new boto3 session costs ~0.15 s (it loads the S3 model): one per server will do.
        return self.client()

    def store(self, prefix: str, *, client: BaseClient | None = None, **options: Any) -> S3Store:
        options.setdefault("retry", TEST_RETRY)
        return S3Store(self.bucket, prefix, client or self.shared_client, **options)


# --- SeaweedFS ---------------------------------------------------------------------------


class SeaweedFS(local_s3.SeaweedFS):
    """The project's launcher (osa_dagster.storage.local_s3) with the tests' bucket and
    credentials, and an S3Endpoint to reach it."""

    @classmethod
    def start(cls, workdir: Path, **options: Any) -> Self:
        options = {"bucket": BUCKET, "access_key": ACCESS_KEY, "secret_key": SECRET_KEY} | options
        return super().start(workdir, **options)

    @functools.cached_property
    def endpoint(self) -> S3Endpoint:
        return S3Endpoint(
            url=self.url,
            bucket=self.bucket,
            access_key=self.access_key,
            secret_key=self.secret_key,
        )


# --- moto ----------------------------------------------------------------------------------


@contextlib.contextmanager
def moto_endpoint() -> Iterator[S3Endpoint]:
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = S3Endpoint(url=f"http://{host}:{port}")
        endpoint.client().create_bucket(Bucket=endpoint.bucket)
        yield endpoint
    finally:
        server.stop()


# --- faults --------------------------------------------------------------------------------

RESET = "reset"
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "content-length"}


@dataclass
class FaultProxy:
    """An HTTP proxy in front of an S3 endpoint that answers the next requests with a
    fault instead of forwarding them: an S3 error status, or a connection reset."""

    upstream: str  # host:port
    url: str = ""  # the proxy's own, while it runs
    seen: list[str] = field(default_factory=list)  # "METHOD path" of every request
    _faults: deque[tuple[str | None, int | str, str]] = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    def fail_next(
        self, count: int, *, status: int = 503, code: str = "SlowDown", method: str | None = None
    ) -> None:
        with self._lock:
            self._faults.extend([(method, status, code)] * count)

    def reset_next(self, count: int, *, method: str | None = None) -> None:
        with self._lock:
            self._faults.extend([(method, RESET, "")] * count)

    @property
    def unused(self) -> int:
        """Faults not yet served: 0 once every planned fault has hit a request."""
        with self._lock:
            return len(self._faults)

    def take(self, method: str) -> tuple[int | str, str] | None:
        with self._lock:
            self.seen.append(method)
            for fault in self._faults:
                if fault[0] in (None, method):
                    self._faults.remove(fault)
                    return fault[1], fault[2]
        return None

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Serve on a free port, at `url`."""
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _ProxyHandler)
        self._server.daemon_threads = True
        self._server.proxy = self  # type: ignore[attr-defined]
        thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        try:
            self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
            yield
        finally:
            self._server.shutdown()
            self._server.server_close()
            thread.join()


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive like a real S3 endpoint; also sends 100-continue

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: pytest shows failures, not every proxied request."""

    def _relay(self) -> None:
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        fault = proxy.take(self.command)
        if fault is not None and fault[0] == RESET:
            # Linger 0 makes close() send a TCP RST: what a crashed server or a LB does.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        if fault is not None:
            status, code = fault
            payload = (
                f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                f"<Message>injected by the test proxy</Message><RequestId>t</RequestId></Error>"
            ).encode()
            self.send_response(int(status))
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            return
        upstream = http.client.HTTPConnection(proxy.upstream, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["Content-Length"] = str(len(body))
        upstream.request(self.command, self.path, body=body, headers=headers)
        answer = upstream.getresponse()
        data = answer.read()
        self.send_response(answer.status, answer.reason)
        for name, value in answer.getheaders():
            if name.lower() not in HOP_BY_HOP:
                self.send_header(name, value)
        # A HEAD answer announces the length of a body it does not carry.
        announced = answer.getheader("Content-Length") if self.command == "HEAD" else None
        self.send_header("Content-Length", announced or str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        upstream.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay
