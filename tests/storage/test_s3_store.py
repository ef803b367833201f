"""What only the S3 store has: a staging folder, key spelling, s3:// names, and how it
fails. Run on moto and on a real SeaweedFS server; faults come from a proxy in front."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from osa_dagster.storage.s3 import RetryPolicy, S3Store, StoreError

from .servers import TEST_RETRY, FaultProxy, S3Endpoint, free_ports


@pytest.fixture
def s3_store(s3: S3Endpoint, unique_prefix: str) -> S3Store:
    return s3.store(unique_prefix)


@pytest.fixture
def proxy(moto: S3Endpoint) -> Iterator[FaultProxy]:
    faults = FaultProxy(upstream=moto.url.removeprefix("http://"))
    with faults.running():
        yield faults


@pytest.fixture
def proxied_store(moto: S3Endpoint, proxy: FaultProxy, unique_prefix: str) -> S3Store:
    return moto.store(unique_prefix, client=moto.client(url=proxy.url))


# --- staging -------------------------------------------------------------------------------


def test_read_only_staging_uploads_nothing_and_cleans_up(s3_store: S3Store):
    s3_store.write_bytes("in/a.txt", b"a")
    with s3_store.local_dir("in", writable=False) as folder:
        (folder / "a.txt").write_bytes(b"changed")
        (folder / "new.txt").write_bytes(b"new")
    assert not folder.exists()
    assert list(s3_store.list_keys("in")) == ["in/a.txt"]
    assert s3_store.read_bytes("in/a.txt") == b"a"


def test_a_shard_stages_only_its_records_folders(s3_store: S3Store):
    """A hook's shard reads the files of its own records, not the whole batch's."""
    for key in ("files/ab/1abc/a.cif", "files/ab/1abd/b.cif", "files/cd/2cde/c.cif"):
        s3_store.write_bytes(key, key.encode())
    with s3_store.local_dir("files", writable=False, only={"ab/1abc", "cd/2cde"}) as folder:
        staged = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert staged == ["ab/1abc/a.cif", "cd/2cde/c.cif"]
    with (
        pytest.raises(ValueError, match="cannot be written back"),
        s3_store.local_dir("files", writable=True, only={"ab/1abc"}),
    ):
        pass


def test_only_regular_files_are_uploaded_never_through_a_link(moto: S3Endpoint, unique_prefix: str):
    # A hook's output folder is staged like this: what it leaves there must neither upload
    # what a symlink points to nor block the upload (a FIFO).
    store = moto.store(unique_prefix)
    secret = Path(__file__)
    with store.local_dir("work", writable=True) as folder:
        (folder / "out").mkdir()
        (folder / "out" / "features.jsonl").write_bytes(b"kept\n")
        (folder / "out" / "stolen").symlink_to(secret)
        (folder / "linked-folder").symlink_to(secret.parent, target_is_directory=True)
        os.mkfifo(folder / "out" / "errors.jsonl")
    assert list(store.list_keys("work")) == ["work/out/features.jsonl"]


def test_an_error_in_the_body_uploads_nothing(s3_store: S3Store):
    s3_store.write_bytes("out/a.txt", b"a")
    with pytest.raises(RuntimeError), s3_store.local_dir("out", writable=True) as folder:
        (folder / "a.txt").write_bytes(b"half-written")
        (folder / "b.txt").write_bytes(b"b")
        raise RuntimeError("the hook crashed")
    assert not folder.exists()
    assert list(s3_store.list_keys("out")) == ["out/a.txt"]
    assert s3_store.read_bytes("out/a.txt") == b"a"


def test_only_new_and_changed_files_are_uploaded(proxied_store: S3Store, proxy: FaultProxy):
    for name in ("same", "touched", "rewritten"):
        proxied_store.write_bytes(f"w/{name}.txt", b"a")
    proxy.seen.clear()
    with proxied_store.local_dir("w", writable=True) as folder:
        assert proxy.seen == ["GET"] * 4  # one listing, one GET per file, no HEAD
        (folder / "touched.txt").touch()  # a new mtime counts as a change
        (folder / "rewritten.txt").write_bytes(b"b")
        (folder / "new.txt").write_bytes(b"n")
        proxy.seen.clear()
    assert sorted(proxy.seen) == ["PUT"] * 3
    assert proxied_store.read_bytes("w/rewritten.txt") == b"b"


def test_staging_folder_goes_where_asked(s3: S3Endpoint, unique_prefix: str, tmp_path: Path):
    store = s3.store(unique_prefix, staging_dir=tmp_path)
    store.write_bytes("p/x", b"x")
    with store.local_dir("p", writable=False) as folder:
        assert folder.parent == tmp_path
        assert (folder / "x").read_bytes() == b"x"
    assert list(tmp_path.iterdir()) == []


# --- keys and names ------------------------------------------------------------------------


def test_keys_have_one_spelling(s3_store: S3Store):
    s3_store.write_bytes("a//b/./c.txt", b"1")
    assert s3_store.read_bytes("a/b/c.txt") == b"1"
    assert list(s3_store.list_keys("a/")) == ["a/b/c.txt"]


def test_a_prefix_is_not_a_key(s3_store: S3Store):
    s3_store.write_bytes("dir/file", b"1")
    assert not s3_store.exists("dir")


def test_describe_is_an_s3_url(s3: S3Endpoint):
    store = s3.store("/archive/osa/")
    assert store.describe("batches/p1/records.jsonl") == (
        f"s3://{s3.bucket}/archive/osa/batches/p1/records.jsonl"
    )
    assert S3Store(s3.bucket, "", s3.shared_client).describe("k") == f"s3://{s3.bucket}/k"


def test_keys_are_relative_to_the_store_prefix(s3: S3Endpoint, unique_prefix: str):
    outer = s3.store(unique_prefix)
    inner = s3.store(f"{unique_prefix}/inner")
    inner.write_bytes("k/v", b"1")
    assert list(inner.list_keys("k")) == ["k/v"]
    assert list(outer.list_keys("inner")) == ["inner/k/v"]


# --- permanent failures --------------------------------------------------------------------


def test_missing_bucket_fails_at_once_naming_it(s3: S3Endpoint, unique_prefix: str):
    store = S3Store("no-such-bucket-here", unique_prefix, s3.shared_client, retry=TEST_RETRY)
    for operation in (
        lambda: store.write_bytes("k", b"1"),
        lambda: store.read_bytes("k"),
        lambda: list(store.list_keys("p")),
        lambda: store.exists("k"),  # HEAD answers a bare 404 for a missing bucket
    ):
        started = time.monotonic()
        with pytest.raises(StoreError) as failure:
            operation()
        assert failure.value.code == "NoSuchBucket"
        assert "no-such-bucket-here" in str(failure.value)
        assert "attempts" not in str(failure.value)
        assert time.monotonic() - started < 0.5  # no backoff happened


def test_missing_bucket_is_one_request(moto: S3Endpoint, proxy: FaultProxy, unique_prefix: str):
    client = moto.client(url=proxy.url)
    store = S3Store("no-such-bucket-here", unique_prefix, client, retry=TEST_RETRY)
    with pytest.raises(StoreError, match="NoSuchBucket"):
        store.write_bytes("k", b"1")
    assert proxy.seen == ["PUT"]


def test_wrong_secret_fails_at_once_without_showing_it(
    seaweedfs: S3Endpoint, unique_prefix: str, caplog: pytest.LogCaptureFixture
):
    secret = "wrong-secret-0123456789"
    client = seaweedfs.client(secret_key=secret)
    store = S3Store(seaweedfs.bucket, unique_prefix, client, retry=TEST_RETRY)
    with caplog.at_level(logging.DEBUG, logger="osa_dagster"), pytest.raises(StoreError) as failure:
        store.write_bytes("k", b"1")
    assert failure.value.code == "SignatureDoesNotMatch"
    assert "secret key does not match" in str(failure.value)
    assert secret not in str(failure.value)
    assert secret not in caplog.text


def test_unknown_access_key_fails_at_once(seaweedfs: S3Endpoint, unique_prefix: str):
    unknown = S3Endpoint(url=seaweedfs.url, access_key="nobody-knows-me")
    store = S3Store(seaweedfs.bucket, unique_prefix, unknown.client(), retry=TEST_RETRY)
    with pytest.raises(StoreError) as failure:
        store.read_bytes("k")
    assert failure.value.code == "InvalidAccessKeyId"


# --- transient failures --------------------------------------------------------------------


def test_refused_connections_are_retried_then_name_the_endpoint(
    moto: S3Endpoint, caplog: pytest.LogCaptureFixture
):
    (port,) = free_ports(1)  # nothing listens there: every connection is refused
    endpoint = f"http://127.0.0.1:{port}"
    store = S3Store(moto.bucket, "p", moto.client(url=endpoint), retry=TEST_RETRY)
    started = time.monotonic()
    with (
        caplog.at_level(logging.WARNING, logger="osa_dagster"),
        pytest.raises(StoreError) as failure,
    ):
        store.write_bytes("k", b"1")
    message = str(failure.value)
    assert endpoint in message
    assert f"after {TEST_RETRY.attempts} attempts" in message
    assert failure.value.code == "EndpointConnectionError"
    assert len([r for r in caplog.records if "retrying" in r.message]) == TEST_RETRY.attempts - 1
    assert time.monotonic() - started < 2


def test_503_then_success(proxied_store: S3Store, proxy: FaultProxy):
    proxy.fail_next(3, status=503, code="SlowDown")
    proxied_store.write_bytes("k", b"payload")
    assert proxy.seen == ["PUT"] * 4
    proxy.fail_next(2, status=500, code="InternalError")
    assert proxied_store.read_bytes("k") == b"payload"
    assert proxy.unused == 0


def test_connection_resets_then_success(proxied_store: S3Store, proxy: FaultProxy):
    proxied_store.write_bytes("k", b"payload")
    proxy.reset_next(2)
    assert proxied_store.read_bytes("k") == b"payload"
    proxy.reset_next(1, method="HEAD")
    assert proxied_store.exists("k")
    assert proxy.unused == 0


def test_persistent_503_gives_up_after_the_bounded_attempts(
    proxied_store: S3Store, proxy: FaultProxy
):
    proxy.fail_next(100, status=503, code="ServiceUnavailable")
    with pytest.raises(StoreError) as failure:
        proxied_store.write_bytes("k", b"1")
    assert failure.value.code == "ServiceUnavailable"
    assert f"after {TEST_RETRY.attempts} attempts" in str(failure.value)
    assert len(proxy.seen) == TEST_RETRY.attempts


def test_staging_survives_transient_failures(proxied_store: S3Store, proxy: FaultProxy):
    for i in range(5):
        proxied_store.write_bytes(f"in/{i}.txt", str(i).encode())
    proxy.fail_next(2, status=503, method="GET")  # the listing, then one download
    proxy.reset_next(1, method="GET")
    with proxied_store.local_dir("in", writable=True) as folder:
        assert sorted(p.name for p in folder.iterdir()) == [f"{i}.txt" for i in range(5)]
        (folder / "out.txt").write_bytes(b"out")
        (folder / "0.txt").unlink()
        proxy.fail_next(2, status=503, method="PUT")
        proxy.fail_next(1, status=503, method="POST")  # the delete batch
    assert proxy.unused == 0
    assert list(proxied_store.list_keys("in")) == [f"in/{i}.txt" for i in range(1, 5)] + [
        "in/out.txt"
    ]


def test_retry_policy_waits_grow_and_stay_bounded():
    policy = RetryPolicy(attempts=5, base_delay=0.5, max_delay=3.0)
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 3.0), (10, 3.0)]:
        assert ceiling / 2 <= policy.delay(attempt) <= ceiling
    with pytest.raises(ValueError, match="at least 1"):
        RetryPolicy(attempts=0)


def test_a_dagster_aws_client_works(moto: S3Endpoint, unique_prefix: str):
    """The Dagster layer may hand the store the client of its S3Resource."""
    from dagster_aws.s3 import S3Resource

    resource = S3Resource(
        endpoint_url=moto.url,
        region_name="us-east-1",
        max_attempts=0,
        aws_access_key_id=moto.access_key,
        aws_secret_access_key=moto.secret_key,
    )
    store = S3Store(moto.bucket, unique_prefix, resource.get_client(), retry=TEST_RETRY)
    with store.local_dir("out", writable=True) as folder:
        (folder / "a.txt").write_bytes(b"a")
    assert store.read_bytes("out/a.txt") == b"a"
