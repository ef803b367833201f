"""The shared upstream HTTP client against a local fake server (no test reaches the internet).

Timings are measured on the server side, from the arrival times it records.
"""

from __future__ import annotations

import gzip
import itertools
import json
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest
from osa_sdk.authoring import FetchContext
from osa_sdk.contract import BYTES_PER_MB

from osa_dagster.conventions.http import HttpClient, NotFound, UpstreamError
from tests.conventions.fake_upstream import FakeUpstream, Reply

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def client():
    with HttpClient(backoff_base_s=0.01, max_backoff_s=5, timeout_s=10) as client:
        yield client


def fetch_context(tmp_path: Path, *source_ids: str) -> FetchContext:
    return FetchContext(tmp_path / "files", source_ids=source_ids or None)


def gaps(upstream: FakeUpstream, path: str) -> list[float]:
    times = sorted(r.at for r in upstream.requests(path))
    return [later - earlier for earlier, later in itertools.pairwise(times)]


# --- answers ----------------------------------------------------------------------------


def test_get_decodes_gzip_and_headers_are_case_insensitive(fake_upstream, client):
    fake_upstream.route("/page", Reply.text("héllo wörld", gzip=True, headers={"X-Total": "7"}))
    response = client.get(fake_upstream.url("/page"), params={"q": "a b", "n": 2})
    assert response.text() == "héllo wörld"
    assert response.headers["x-total"] == response.headers["X-TOTAL"] == "7"
    assert response.headers["content-encoding"] == "gzip"  # it really was sent compressed
    [request] = fake_upstream.requests("/page")
    assert request.query == {"q": ["a b"], "n": ["2"]}
    assert request.headers["user-agent"] == "osa-dagster"


def test_links_parses_rfc8288_and_resolves_relative_urls(fake_upstream, client):
    link = '</page?cursor=abc&size=2>; rel="next", <https://other.example/first>; rel="first prev"'
    fake_upstream.route("/page", Reply.json([], headers={"Link": link}))
    response = client.get(fake_upstream.url("/page"))
    assert response.links() == {
        "next": fake_upstream.url("/page?cursor=abc&size=2"),
        "first": "https://other.example/first",
        "prev": "https://other.example/first",
    }


def test_following_next_links_walks_every_page(fake_upstream, client):
    pages = {None: ([1, 2], "c1"), "c1": ([3, 4], "c2"), "c2": ([5], None)}

    def page(request):
        items, cursor = pages[request.param("cursor")]
        headers = {"Link": f'<{fake_upstream.url("/items")}?cursor={cursor}>; rel="next"'}
        return Reply.json(items, headers=headers if cursor else {})

    fake_upstream.route("/items", page)
    url: str | None = fake_upstream.url("/items")
    items = []
    while url:
        response = client.get(url)
        items += response.json()
        url = response.links().get("next")
    assert items == [1, 2, 3, 4, 5]
    assert [r.param("cursor") for r in fake_upstream.requests("/items")] == [None, "c1", "c2"]


def test_malformed_json_fails_naming_the_url(fake_upstream, client):
    fake_upstream.route(
        "/api", Reply(200, b'{"results": [1, 2', {"Content-Type": "application/json"})
    )
    with pytest.raises(UpstreamError) as raised:
        client.get_json(fake_upstream.url("/api"), params={"page": 3})
    assert fake_upstream.url("/api?page=3") in str(raised.value)
    assert "not JSON" in str(raised.value)
    assert len(fake_upstream.requests("/api")) == 1  # a malformed answer is not retried


def test_post_json_sends_the_payload(fake_upstream, client):
    fake_upstream.route("/query", lambda r: Reply.json({"echo": r.json()}), method="POST")
    assert client.post_json(fake_upstream.url("/query"), {"rows": 3}) == {"echo": {"rows": 3}}
    assert fake_upstream.requests("/query")[0].headers["content-type"] == "application/json"


@pytest.mark.parametrize("status", [404, 410])
def test_gone_resources_raise_not_found_at_once(fake_upstream, client, status):
    fake_upstream.route("/gone", Reply.text("no such entry", status=status))
    with pytest.raises(NotFound, match=r"/gone: HTTP " + str(status)):
        client.get(fake_upstream.url("/gone"))
    assert len(fake_upstream.requests("/gone")) == 1


def test_other_client_errors_are_not_retried_and_show_the_body(fake_upstream, client):
    fake_upstream.route("/bad", Reply.text("attribute foo is unknown", status=400))
    with pytest.raises(UpstreamError, match="attribute foo is unknown") as raised:
        client.get(fake_upstream.url("/bad"))
    assert not isinstance(raised.value, NotFound)
    assert raised.value.status == 400
    assert len(fake_upstream.requests("/bad")) == 1


# --- retries ------------------------------------------------------------------------------


def test_429_waits_the_seconds_retry_after_asks(fake_upstream, client):
    fake_upstream.route(
        "/busy", [Reply(429, headers={"Retry-After": "1"}), Reply.json({"ok": True})]
    )
    assert client.get_json(fake_upstream.url("/busy")) == {"ok": True}
    [gap] = gaps(fake_upstream, "/busy")
    assert gap >= 1.0


def test_503_retry_after_as_an_http_date_is_honoured(fake_upstream, client):
    # An HTTP date has whole seconds: 3 s ahead is at least 2 s after formatting.
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=3), usegmt=True)
    fake_upstream.route("/busy", [Reply(503, headers={"Retry-After": when}), Reply.json(1)])
    assert client.get_json(fake_upstream.url("/busy")) == 1
    [gap] = gaps(fake_upstream, "/busy")
    assert gap >= 2.0


def test_retry_after_beyond_max_backoff_fails_at_once(fake_upstream, client):
    fake_upstream.route("/busy", Reply(429, headers={"Retry-After": "3600"}))
    with pytest.raises(UpstreamError, match=r"/busy: .*3600 s.*max_backoff_s=5"):
        client.get(fake_upstream.url("/busy"))
    # It did not wait and ask again: one request, and the error says why.
    assert len(fake_upstream.requests("/busy")) == 1


def test_persistent_5xx_gives_up_after_max_attempts_naming_the_url(fake_upstream):
    fake_upstream.route("/down", Reply.text("oops", status=502))
    with (
        HttpClient(max_attempts=3, backoff_base_s=0.01) as client,
        pytest.raises(UpstreamError, match=r"/down: HTTP 502.*gave up after 3 attempts"),
    ):
        client.get(fake_upstream.url("/down"))
    assert len(fake_upstream.requests("/down")) == 3


def test_backoff_grows_between_attempts(fake_upstream):
    fake_upstream.route("/down", [Reply(500)] * 3 + [Reply.json("up")])
    with HttpClient(max_attempts=4, backoff_base_s=0.2) as client:
        assert client.get_json(fake_upstream.url("/down")) == "up"
    first, second, third = gaps(fake_upstream, "/down")
    # Jitter draws each wait from [ceiling/2, ceiling] with ceilings 0.2, 0.4, 0.8 s.
    assert first >= 0.1
    assert second >= 0.2
    assert third >= 0.4
    assert third > first


def test_truncated_body_is_retried(fake_upstream, client):
    body = json.dumps(list(range(5000))).encode()
    fake_upstream.route("/big", [Reply(200, body, truncate_at=100), Reply(200, body)])
    assert client.get_json(fake_upstream.url("/big")) == list(range(5000))
    assert len(fake_upstream.requests("/big")) == 2


def test_an_unusable_url_fails_naming_it(client):
    with pytest.raises(UpstreamError, match=r"^htp://example\.org/x: InvalidSchema"):
        client.get("htp://example.org/x")


def test_a_dead_server_is_a_connection_error_naming_the_url():
    with FakeUpstream() as upstream:
        url = upstream.url("/x")
    with (
        HttpClient(max_attempts=2, backoff_base_s=0.01) as client,
        pytest.raises(UpstreamError, match=r"127\.0\.0\.1:\d+/x: ConnectionError.*2 attempts"),
    ):
        client.get(url)


def test_slow_answers_time_out_and_are_retried(fake_upstream):
    fake_upstream.route("/slow", [Reply.json("late", delay_s=2), Reply.json("quick")])
    with HttpClient(timeout_s=0.5, backoff_base_s=0.01) as client:
        assert client.get_json(fake_upstream.url("/slow")) == "quick"


# --- rate limit ---------------------------------------------------------------------------


def test_rate_limit_spaces_requests_to_a_host_across_threads(fake_upstream):
    fake_upstream.route("/r", Reply.json("ok"))
    with HttpClient(requests_per_second=10) as client:

        def three_requests() -> None:
            for _ in range(3):
                client.get(fake_upstream.url("/r"))

        threads = [threading.Thread(target=three_requests) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    spacing = gaps(fake_upstream, "/r")
    assert len(spacing) == 11
    # The limiter spaces sends 0.1 s apart. Arrivals at this in-process server jitter
    # around them (a few can bunch up on a loaded machine), so the check is on their span,
    # with one interval of slack; without a limiter all 12 arrive within a few ms.
    assert sum(spacing) >= 10 * 0.1


def test_rate_limit_is_per_host(fake_upstream):
    fake_upstream.route("/r", Reply.json("ok"))
    with FakeUpstream() as other:
        other.route("/r", Reply.json("ok"))
        with HttpClient(requests_per_second=4) as client:
            started = time.monotonic()
            for _ in range(3):
                client.get(fake_upstream.url("/r"))
                client.get(other.url("/r"))
            elapsed = time.monotonic() - started
    assert sum(gaps(fake_upstream, "/r")) >= 0.25
    assert sum(gaps(other, "/r")) >= 0.25
    # Each host alone needs 2 gaps of 0.25 s; one limit shared by both would need 5.
    assert elapsed < 1.15


def test_retry_after_holds_the_host_for_other_threads_too(fake_upstream):
    fake_upstream.route("/a", [Reply(429, headers={"Retry-After": "1"}), Reply.json("a")])
    fake_upstream.route("/b", Reply.json("b"))
    with HttpClient(backoff_base_s=0.01) as client:
        client_a = threading.Thread(target=client.get, args=(fake_upstream.url("/a"),))
        client_a.start()
        while not fake_upstream.requests("/a"):
            time.sleep(0.01)
        time.sleep(0.1)  # the 429 has been answered and read by now
        client.get(fake_upstream.url("/b"))
        client_a.join()
    [first_a, _] = fake_upstream.requests("/a")
    [b] = fake_upstream.requests("/b")
    assert b.at - first_a.at >= 1.0


# --- downloads ----------------------------------------------------------------------------


def test_download_writes_the_file_and_measures_it(fake_upstream, client, tmp_path):
    data = bytes(range(256)) * 4000
    fake_upstream.route("/f.bin", Reply(200, data))
    ctx = fetch_context(tmp_path, "id:1/x")
    ref = client.download(fake_upstream.url("/f.bin"), ctx, "id:1/x", "f.bin")
    assert (ctx.record_dir("id:1/x") / "f.bin").read_bytes() == data
    assert ref.size_mb == len(data) / BYTES_PER_MB


def test_truncated_download_is_retried_and_leaves_no_partial_file(fake_upstream, client, tmp_path):
    data = b"0123456789" * 300_000
    fake_upstream.route("/f.bin", [Reply(200, data, truncate_at=1_234_567), Reply(200, data)])
    ctx = fetch_context(tmp_path)
    client.download(fake_upstream.url("/f.bin"), ctx, "a", "f.bin")
    assert len(fake_upstream.requests("/f.bin")) == 2
    assert [p.name for p in ctx.record_dir("a").iterdir()] == ["f.bin"]
    assert (ctx.record_dir("a") / "f.bin").read_bytes() == data


def test_download_that_stays_truncated_fails_without_a_file(fake_upstream, tmp_path):
    fake_upstream.route("/f.bin", Reply(200, b"x" * 10_000, truncate_at=5_000))
    ctx = fetch_context(tmp_path)
    with (
        HttpClient(max_attempts=2, backoff_base_s=0.01) as client,
        pytest.raises(UpstreamError, match=r"/f\.bin: .*5000 bytes read.*2 attempts"),
    ):
        client.download(fake_upstream.url("/f.bin"), ctx, "a", "f.bin")
    assert not any(ctx.record_dir("a").iterdir())


def test_download_404_raises_not_found_and_frees_the_name(fake_upstream, client, tmp_path):
    fake_upstream.route("/f.bin", [Reply.text("not found", status=404), Reply(200, b"now here")])
    ctx = fetch_context(tmp_path)
    with pytest.raises(NotFound, match=r"/f\.bin: HTTP 404"):
        client.download(fake_upstream.url("/f.bin"), ctx, "a", "f.bin")
    assert not ctx.record_dir("a").exists()
    client.download(fake_upstream.url("/f.bin"), ctx, "a", "f.bin")
    assert (ctx.record_dir("a") / "f.bin").read_bytes() == b"now here"


def test_gz_files_are_stored_as_sent_even_when_labelled_content_encoding(
    fake_upstream, client, tmp_path
):
    compressed = gzip.compress(b"data_1ABC\n" * 1000)
    labelled = {"Content-Encoding": "gzip", "Content-Type": "application/octet-stream"}
    fake_upstream.route("/1abc.cif.gz", Reply(200, compressed, labelled))
    fake_upstream.route("/notes.txt", Reply.text("plain words", gzip=True))
    ctx = fetch_context(tmp_path)
    client.download(fake_upstream.url("/1abc.cif.gz"), ctx, "1ABC", "1abc.cif.gz")
    client.download(fake_upstream.url("/notes.txt"), ctx, "1ABC", "notes.txt")
    assert (ctx.record_dir("1ABC") / "1abc.cif.gz").read_bytes() == compressed
    assert (ctx.record_dir("1ABC") / "notes.txt").read_text() == "plain words"
    assert {r.headers["accept-encoding"] for r in fake_upstream.requests()} == {"identity"}


def test_download_file_reports_last_modified(fake_upstream, client, tmp_path):
    fake_upstream.route(
        "/f", Reply(200, b"x", headers={"Last-Modified": "Wed, 04 Dec 2024 00:00:05 GMT"})
    )
    download = client.download_file(fake_upstream.url("/f"), fetch_context(tmp_path), "a", "f")
    assert download.last_modified == datetime(2024, 12, 4, 0, 0, 5, tzinfo=UTC)


# --- memory -------------------------------------------------------------------------------

BIG_MB = 200

# Runs in a fresh interpreter so its peak RSS is its own: the growth of ru_maxrss (kB on
# Linux) over the transfer of a BIG_MB body, by download() or, as a control that shows the
# measure would catch buffering, by get().
# Peak RSS from VmHWM, which belongs to this process's own memory: ru_maxrss would start at
# the peak of the (large) pytest process that spawned it, hiding growth below that.
_MEASURE = """
import sys
from pathlib import Path
from osa_sdk.authoring import FetchContext
from osa_dagster.conventions.http import HttpClient
from osa_sdk.contract import BYTES_PER_MB

def peak_kb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

url, mode, folder = sys.argv[1:]
client = HttpClient()
before = peak_kb()
if mode == "download":
    ref = client.download(url, FetchContext(Path(folder)), "big", "big.bin")
    size_mb = ref.size_mb
else:
    size_mb = len(client.get(url).body) / BYTES_PER_MB
after = peak_kb()
print(size_mb, (after - before) / 1024)
"""


def _peak_growth_mb(url: str, mode: str, folder: Path) -> tuple[float, float]:
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, url, mode, str(folder)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    size_mb, growth_mb = map(float, done.stdout.split())
    return size_mb, growth_mb


@pytest.mark.slow
def test_a_200_mb_download_never_sits_in_memory(fake_upstream, tmp_path):
    chunk = bytes(range(256)) * 4096  # 1 MiB

    def body():
        for _ in range(BIG_MB * BYTES_PER_MB // len(chunk)):
            yield chunk

    length = BIG_MB * BYTES_PER_MB // len(chunk) * len(chunk)
    fake_upstream.route("/big.bin", Reply(stream=body, stream_length=length))

    size_mb, download_growth = _peak_growth_mb(fake_upstream.url("/big.bin"), "download", tmp_path)
    assert size_mb == length / BYTES_PER_MB
    assert (tmp_path / "big" / "big.bin").stat().st_size == length
    _, buffered_growth = _peak_growth_mb(fake_upstream.url("/big.bin"), "get", tmp_path)
    print(f"peak RSS growth: download {download_growth:.1f} MB, get {buffered_growth:.1f} MB")
    assert download_growth < 30
    assert buffered_growth > length / BYTES_PER_MB * 0.9


def test_an_api_key_never_appears_in_an_error(fake_upstream):
    fake_upstream.route("/gone", Reply(status=404))
    client = HttpClient(max_attempts=1)
    with pytest.raises(NotFound) as raised:
        client.get(fake_upstream.url("/gone"), params={"term": "x", "api_key": "s3cret"})
    assert "s3cret" not in str(raised.value)
    assert "api_key=%2A%2A%2A" in str(raised.value) or "api_key=***" in str(raised.value)
