"""A scriptable stand-in for upstream HTTP services, served on 127.0.0.1 by the tests.

Register what a path answers, make requests against `upstream.url(path)`, then look at what
the server received::

    upstream.route("/entries", Reply.json({"results": []}, headers={"Link": '<...>; rel="next"'}))
    upstream.route("/flaky", [Reply(429, headers={"Retry-After": "1"}), Reply.json([1, 2])])
    upstream.route("/download/", lambda request: Reply.file(...), prefix=True)
    ...
    assert [r.query["cursor"] for r in upstream.requests("/entries")] == [...]

An answer is a `Reply` (served every time), a list of replies (served in order, the last
one repeated for any further request), or a function of the `ReceivedRequest` returning a
`Reply`. Paths nobody registered answer 404. A handler that raises answers 500 and its
error is kept in `upstream.errors`, so a test can tell a server bug from a client bug.
"""

from __future__ import annotations

import gzip as gzip_module
import json
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

_STREAM_CHUNK = 1 << 20


@dataclass(frozen=True)
class Reply:
    """One HTTP answer.

    gzip: compress the body and send ``Content-Encoding: gzip``, as services do for text.
    truncate_at: announce the full Content-Length but send only this many body bytes, then
      close the connection (what a dropped connection looks like to the client).
    stream: send the body from this iterable of chunks instead of `body`, for bodies too big
      to build in memory; `stream_length` (required with it) is the Content-Length.
    delay_s: wait this long before answering (to test client timeouts).
    """

    status: int = 200
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    gzip: bool = False
    truncate_at: int | None = None
    stream: Callable[[], Iterable[bytes]] | None = None
    stream_length: int | None = None
    delay_s: float = 0.0

    def __post_init__(self) -> None:
        if (self.stream is None) != (self.stream_length is None):
            raise ValueError("Reply: stream and stream_length go together")
        if self.stream is not None and self.gzip:
            raise ValueError("Reply: a streamed body is sent as given; gzip it yourself")

    @classmethod
    def json(cls, value: Any, status: int = 200, **options: Any) -> Reply:
        headers = {"Content-Type": "application/json", **options.pop("headers", {})}
        return cls(status, json.dumps(value).encode(), headers=headers, **options)

    @classmethod
    def text(cls, text: str, status: int = 200, **options: Any) -> Reply:
        headers = {"Content-Type": "text/plain; charset=utf-8", **options.pop("headers", {})}
        return cls(status, text.encode(), headers=headers, **options)

    @classmethod
    def file(
        cls, path: Path, content_type: str = "application/octet-stream", **options: Any
    ) -> Reply:
        headers = {"Content-Type": content_type, **options.pop("headers", {})}
        return cls(200, path.read_bytes(), headers=headers, **options)


@dataclass(frozen=True)
class ReceivedRequest:
    """A request as the server saw it. `at` is time.monotonic() when its headers arrived."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: Mapping[str, str]
    """Header names in lower case."""
    body: bytes
    at: float

    def param(self, name: str) -> str | None:
        """The last value of query parameter `name`, None when absent."""
        values = self.query.get(name)
        return values[-1] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


Handler = Callable[[ReceivedRequest], Reply]
Route = Reply | Sequence[Reply] | Handler


class _ScriptedReplies:
    """Replies served in order; the last one again for every request after the script."""

    def __init__(self, replies: Sequence[Reply]) -> None:
        if not replies:
            raise ValueError("a scripted route needs at least one reply")
        self._replies = list(replies)
        self._served = 0
        self._lock = threading.Lock()

    def __call__(self, request: ReceivedRequest) -> Reply:
        with self._lock:
            reply = self._replies[min(self._served, len(self._replies) - 1)]
            self._served += 1
        return reply


class FakeUpstream:
    """A threaded HTTP/1.1 server on 127.0.0.1 at a free port; use as a context manager."""

    def __init__(self) -> None:
        self._routes: dict[tuple[str, str, bool], Handler] = {}
        self._received: list[ReceivedRequest] = []
        self._lock = threading.Lock()
        self.errors: list[BaseException] = []
        self._server = _QuietServer(("127.0.0.1", 0), _handler_class(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            # A short poll interval makes close() quick: tests start many servers.
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fake-upstream",
            daemon=True,
        )

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def route(self, path: str, answer: Route, *, method: str = "GET", prefix: bool = False) -> None:
        """Answer `method` requests for `path` (every path starting with it when `prefix`).

        Registering a path again replaces its answer; the longest matching path wins.
        """
        if isinstance(answer, Reply):
            single = answer
            handler: Handler = lambda _request: single  # noqa: E731
        elif callable(answer):
            handler = answer
        else:
            handler = _ScriptedReplies(answer)
        with self._lock:
            self._routes[(method.upper(), path, prefix)] = handler

    def requests(self, path: str | None = None) -> list[ReceivedRequest]:
        """Every request received so far (for `path` only, when given), in arrival order."""
        with self._lock:
            return [r for r in self._received if path is None or r.path == path]

    def start(self) -> FakeUpstream:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _answer(self, request: ReceivedRequest) -> Reply:
        with self._lock:
            self._received.append(request)
            matches = [
                (len(path), handler)
                for (method, path, prefix), handler in self._routes.items()
                if method == request.method
                and (request.path == path or (prefix and request.path.startswith(path)))
            ]
        if not matches:
            return Reply.text(f"no route for {request.method} {request.path}", status=404)
        handler = max(matches, key=lambda match: match[0])[1]
        try:
            return handler(request)
        except Exception as error:
            self.errors.append(error)
            return Reply.text(f"fake upstream handler failed: {error!r}", status=500)


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients that hang up (a timeout, a test's truncated body) are not server bugs."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _handler_class(upstream: FakeUpstream) -> type[BaseHTTPRequestHandler]:
    class RequestHandler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Idle keep-alive connections give their thread back after this many seconds.
        timeout = 10

        def do_GET(self) -> None:
            self._serve()

        def do_POST(self) -> None:
            self._serve()

        def do_HEAD(self) -> None:
            self._serve()

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet: tests read `upstream.requests()` instead of a log."""

        def _serve(self) -> None:
            arrived = time.monotonic()
            length = int(self.headers.get("Content-Length") or 0)
            split = urlsplit(self.path)
            request = ReceivedRequest(
                method=self.command,
                path=split.path,
                query=parse_qs(split.query, keep_blank_values=True),
                headers={name.lower(): value for name, value in self.headers.items()},
                body=self.rfile.read(length) if length else b"",
                at=arrived,
            )
            reply = upstream._answer(request)
            if reply.delay_s:
                time.sleep(reply.delay_s)
            body = gzip_module.compress(reply.body) if reply.gzip else reply.body
            self.send_response(reply.status)
            for name, value in reply.headers.items():
                self.send_header(name, value)
            if reply.gzip:
                self.send_header("Content-Encoding", "gzip")
            length_sent = reply.stream_length if reply.stream is not None else len(body)
            self.send_header("Content-Length", str(length_sent))
            if reply.truncate_at is not None:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command == "HEAD":
                return
            chunks: Iterable[bytes] = reply.stream() if reply.stream is not None else (body,)
            try:
                self._write_body(chunks, reply.truncate_at)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client gave up; nothing left to tell it

        def _write_body(self, chunks: Iterable[bytes], truncate_at: int | None) -> None:
            remaining = truncate_at
            for chunk in _split(chunks):
                if remaining is not None:
                    chunk = chunk[:remaining]
                    remaining -= len(chunk)
                self.wfile.write(chunk)
                if remaining == 0:
                    break
            if truncate_at is not None:
                self.wfile.flush()
                self.close_connection = True

    return RequestHandler


def _split(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The body in pieces of at most _STREAM_CHUNK bytes, so a truncation lands anywhere."""
    for chunk in chunks:
        for start in range(0, len(chunk), _STREAM_CHUNK):
            yield chunk[start : start + _STREAM_CHUNK]
