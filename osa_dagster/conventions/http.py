"""The one HTTP client every ingester uses to talk to upstream services.

It adds what a bulk ingest needs on top of `requests`: timeouts on every call, retries
with exponential backoff on 429, 5xx, dropped connections and truncated bodies (waiting
what a `Retry-After` header asks), a per-host request rate shared by all threads, and
downloads streamed to disk in chunks so that a 200 MB file never sits in memory.

Every error names the URL it is about, so a failed discover or fetch says which request
broke.
"""

from __future__ import annotations

import email.utils
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import requests
import urllib3.exceptions
from osa_sdk.authoring import FetchContext
from osa_sdk.types import IngesterFileRef
from requests.structures import CaseInsensitiveDict

from osa_dagster.retrying import RetryPolicy

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_DOWNLOAD_CHUNK = 1 << 20
_BODY_EXCERPT = 200
_RETRYABLE_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
    urllib3.exceptions.ProtocolError,
    urllib3.exceptions.ReadTimeoutError,
    urllib3.exceptions.DecodeError,
)

Params = Mapping[str, str | int] | None
Headers = Mapping[str, str] | None


class UpstreamError(Exception):
    """An upstream request failed for good; the message names the URL."""

    def __init__(self, url: str, problem: str, status: int | None = None) -> None:
        url = without_secrets(url)
        super().__init__(f"{url}: {problem}")
        self.url = url
        self.status = status


class NotFound(UpstreamError):
    """The upstream has no such resource (404 or 410): the record is gone, not the service."""


class _Retryable(Exception):
    """One attempt failed in a way that another attempt may not."""

    def __init__(self, problem: str, retry_after_s: float | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class HttpResponse:
    """A complete answer; `headers` is case-insensitive and `body` already decoded of any
    Content-Encoding (gzip)."""

    url: str
    status: int
    headers: Mapping[str, str]
    body: bytes

    def text(self) -> str:
        return self.body.decode(_charset(self.headers.get("Content-Type", "")), errors="replace")

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError as error:
            excerpt = self.body[:_BODY_EXCERPT].decode("utf-8", errors="replace")
            raise UpstreamError(
                self.url, f"answer is not JSON ({error}); it begins {excerpt!r}", self.status
            ) from None

    def links(self) -> dict[str, str]:
        """The RFC 8288 Link header as rel -> absolute URL (e.g. {"next": "https://..."})."""
        header = self.headers.get("Link")
        if not header:
            return {}
        links: dict[str, str] = {}
        for link in requests.utils.parse_header_links(header):
            url = link.get("url")
            if not url:
                continue
            for rel in link.get("rel", "").split():
                links.setdefault(rel.lower(), urljoin(self.url, url))
        return links


@dataclass(frozen=True)
class DownloadedFile:
    """A file `HttpClient.download_file` wrote into a batch, with the answer's headers."""

    ref: IngesterFileRef
    url: str
    headers: Mapping[str, str]

    @property
    def last_modified(self) -> datetime | None:
        """The Last-Modified header as an aware datetime, None when absent or unreadable."""
        value = self.headers.get("Last-Modified")
        return _http_date(value) if value else None


class _HostRateLimit:
    """Spaces requests to each host (host:port) at least 1/requests_per_second apart,
    across threads.

    A host that answered Retry-After is also held back for every thread until then: one
    429 must not be followed by the other threads' requests a moment later.
    """

    def __init__(self, requests_per_second: float | None) -> None:
        if requests_per_second is not None and requests_per_second <= 0:
            raise ValueError(f"requests_per_second must be > 0, got {requests_per_second}")
        self._interval = 1.0 / requests_per_second if requests_per_second else 0.0
        self._next_slot: dict[str, float] = {}
        self._lock = threading.Lock()

    def wait_turn(self, host: str) -> None:
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next_slot.get(host, now))
            self._next_slot[host] = slot + self._interval
        if slot > now:
            time.sleep(slot - now)

    def hold(self, host: str, seconds: float) -> None:
        with self._lock:
            until = time.monotonic() + seconds
            self._next_slot[host] = max(self._next_slot.get(host, until), until)


class HttpClient:
    """GET/POST with retries, per-host rate limits and streamed downloads; thread-safe.

    max_attempts counts the first try. Backoff before retry n is
    backoff_base_s * 2^(n-1) with jitter, at most max_backoff_s; a Retry-After header
    replaces it, and one asking for more than max_backoff_s fails the request at once
    rather than hanging the batch.
    """

    def __init__(
        self,
        *,
        timeout_s: float = 30.0,
        max_attempts: int = 5,
        max_backoff_s: float = 60.0,
        requests_per_second: float | None = None,
        user_agent: str = "osa-dagster",
        backoff_base_s: float = 1.0,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = timeout_s
        self.retry = RetryPolicy(
            attempts=max_attempts, base_delay=backoff_base_s, max_delay=max_backoff_s
        )
        self.user_agent = user_agent
        self._rate_limit = _HostRateLimit(requests_per_second)
        # requests.Session is not documented as thread-safe: one per thread, all closed
        # by close().
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._sessions_lock = threading.Lock()

    def get(self, url: str, *, params: Params = None, headers: Headers = None) -> HttpResponse:
        """The whole answer of a GET, in memory: for JSON and text pages, not files."""
        return self._request("GET", url, params=params, headers=headers)

    def get_json(self, url: str, *, params: Params = None, headers: Headers = None) -> Any:
        return self.get(url, params=params, headers=headers).json()

    def post(
        self, url: str, payload: Any, *, params: Params = None, headers: Headers = None
    ) -> HttpResponse:
        """POST `payload` as JSON. Retried like get(): use it for idempotent queries only."""
        return self._request("POST", url, params=params, headers=headers, payload=payload)

    def post_json(
        self, url: str, payload: Any, *, params: Params = None, headers: Headers = None
    ) -> Any:
        return self.post(url, payload, params=params, headers=headers).json()

    def download(
        self, url: str, ctx: FetchContext, source_id: str, name: str, *, params: Params = None
    ) -> IngesterFileRef:
        """Stream `url` into record `source_id`'s file `name`; NotFound on 404/410."""
        return self.download_file(url, ctx, source_id, name, params=params).ref

    def download_file(
        self, url: str, ctx: FetchContext, source_id: str, name: str, *, params: Params = None
    ) -> DownloadedFile:
        """download(), also returning the answer's headers (Last-Modified, ETag, ...).

        The body is stored exactly as sent when `name` ends in ".gz", even if the server
        labels it Content-Encoding: gzip (servers do that for .gz files, and decoding
        would leave plain text under a .gz name); other files are decoded. Compression
        is not asked for (Accept-Encoding: identity), so most servers send bytes as-is.
        """
        keep_encoded = name.endswith(".gz")

        def attempt() -> DownloadedFile:
            with self._send("GET", url, params, {"Accept-Encoding": "identity"}) as response:
                self._check_status(response)
                expected = _content_length(response)
                pending = ctx.open_file(source_id, name)
                with pending as out:
                    for chunk in response.raw.stream(
                        _DOWNLOAD_CHUNK, decode_content=not keep_encoded
                    ):
                        out.write(chunk)
                    # Raw bytes are what Content-Length counts; decoded ones are not.
                    on_wire = response.raw.tell()
                    if expected is not None and on_wire < expected:
                        raise _Retryable(f"body truncated: {on_wire} of {expected} bytes arrived")
                return DownloadedFile(pending.ref, response.url, _headers(response))

        return self._with_retries(_full_url(url, params), attempt)

    def close(self) -> None:
        with self._sessions_lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # Internals

    def _request(
        self,
        method: str,
        url: str,
        *,
        params: Params,
        headers: Headers,
        payload: Any = None,
    ) -> HttpResponse:

        def attempt() -> HttpResponse:
            with self._send(method, url, params, headers, payload) as response:
                self._check_status(response)
                # .content decodes gzip and, through urllib3, refuses a body shorter than
                # its Content-Length (ProtocolError, retried).
                body = response.content
                return HttpResponse(response.url, response.status_code, _headers(response), body)

        return self._with_retries(_full_url(url, params), attempt)

    def _with_retries(self, full_url: str, attempt: Callable[[], _T]) -> _T:
        """`attempt()` until it succeeds, retrying what is transient, at most max_attempts."""
        for number in range(1, self.retry.attempts + 1):
            try:
                return attempt()
            except _Retryable as failure:
                self._before_retry(full_url, number, failure)
            except _RETRYABLE_ERRORS as error:
                self._before_retry(full_url, number, _Retryable(_describe(error)))
            except requests.RequestException as error:
                raise UpstreamError(full_url, _describe(error)) from error
        raise AssertionError("unreachable: the last attempt raises")

    @contextmanager
    def _send(
        self,
        method: str,
        url: str,
        params: Params,
        headers: Headers,
        payload: Any = None,
    ) -> Iterator[requests.Response]:
        host = urlsplit(url).netloc
        self._rate_limit.wait_turn(host)
        response = self._session().request(
            method,
            url,
            params=dict(params) if params else None,
            headers=dict(headers) if headers else None,
            json=payload,
            timeout=self.timeout_s,
            stream=True,
            allow_redirects=True,
        )
        try:
            yield response
        finally:
            response.close()

    def _check_status(self, response: requests.Response) -> None:
        status = response.status_code
        if status == 429 or 500 <= status <= 599:
            retry_after = _retry_after_s(response.headers.get("Retry-After"))
            if retry_after is not None:
                self._rate_limit.hold(urlsplit(response.url).netloc, retry_after)
            raise _Retryable(f"HTTP {status} {response.reason}", retry_after)
        if status in (404, 410):
            raise NotFound(response.url, f"HTTP {status} {response.reason}", status)
        if status >= 400:
            raise UpstreamError(
                response.url, f"HTTP {status} {response.reason}: {_excerpt(response)}", status
            )

    def _before_retry(self, url: str, attempt: int, failure: _Retryable) -> None:
        """Sleep before the next attempt, or raise UpstreamError if there is none."""
        if attempt >= self.retry.attempts:
            raise UpstreamError(url, f"{failure.problem} (gave up after {attempt} attempts)")
        if failure.retry_after_s is not None:
            if failure.retry_after_s > self.retry.max_delay:
                raise UpstreamError(
                    url,
                    f"{failure.problem}; the server asks to wait {failure.retry_after_s:.0f} s "
                    f"(Retry-After), more than max_backoff_s={self.retry.max_delay:g}",
                )
            delay = failure.retry_after_s
        else:
            delay = self.retry.delay(attempt)
        log.warning(
            "%s: %s; attempt %d of %d, retrying in %.1f s",
            url,
            failure.problem,
            attempt,
            self.retry.attempts,
            delay,
        )
        time.sleep(delay)

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers["User-Agent"] = self.user_agent
            self._local.session = session
            with self._sessions_lock:
                self._sessions.append(session)
        return session


# Query parameters that carry credentials: never written into messages or logs.
_SECRET_PARAMS = frozenset({"api_key", "apikey", "token", "access_token"})


def without_secrets(url: str) -> str:
    """`url` with the values of credential parameters (api_key, token...) blanked."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if not any(k.lower() in _SECRET_PARAMS for k, _ in query):
        return url
    shown = [(k, "***" if k.lower() in _SECRET_PARAMS else v) for k, v in query]
    return urlunsplit(parts._replace(query=urlencode(shown)))


def _full_url(url: str, params: Params) -> str:
    """The URL with its query string, as it will be requested, credentials blanked (for
    error messages and logs)."""
    if not params:
        return without_secrets(url)
    shown = {k: ("***" if k.lower() in _SECRET_PARAMS else v) for k, v in params.items()}
    prepared = requests.Request("GET", url, params=shown).prepare().url
    return prepared or url


def _headers(response: requests.Response) -> Mapping[str, str]:
    return CaseInsensitiveDict(response.headers)


def _content_length(response: requests.Response) -> int | None:
    value = response.headers.get("Content-Length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _retry_after_s(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delay-seconds or HTTP-date); None if
    absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    when = _http_date(value)
    if when is None:
        log.warning("ignoring a Retry-After header that is neither seconds nor a date: %r", value)
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _http_date(value: str) -> datetime | None:
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _charset(content_type: str) -> str:
    for parameter in content_type.split(";")[1:]:
        key, _, value = parameter.partition("=")
        if key.strip().lower() == "charset" and value.strip():
            return value.strip().strip('"')
    return "utf-8"


def _excerpt(response: requests.Response) -> str:
    try:
        head = response.raw.read(_BODY_EXCERPT, decode_content=True) or b""
    except _RETRYABLE_ERRORS:
        head = b""
    return repr(head.decode("utf-8", errors="replace"))


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
