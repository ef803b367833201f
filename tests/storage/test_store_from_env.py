"""OSA_STORAGE chooses the store; for S3 the rest of the setup comes from the usual AWS
variables and OSA_S3_ENDPOINT_URL."""

from __future__ import annotations

from pathlib import Path

import pytest

from osa_dagster.settings import Settings
from osa_dagster.storage import FileSystemStore, artifact_store
from osa_dagster.storage.s3 import S3Store

from .servers import S3Endpoint


def test_s3_location_with_endpoint(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OSA_STORAGE", "s3://archive-bucket/osa/prod/")
    monkeypatch.setenv("OSA_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    store = artifact_store(Settings.from_env())
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix) == ("archive-bucket", "osa/prod")
    assert store.client.meta.endpoint_url == "http://127.0.0.1:9"
    assert store.client.meta.region_name == "eu-west-1"
    assert store.client.meta.config.s3["addressing_style"] == "path"
    assert store.client.meta.config.retries["total_max_attempts"] == 1
    assert store.describe("k") == "s3://archive-bucket/osa/prod/k"


def test_s3_location_without_prefix_or_endpoint(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OSA_STORAGE", "s3://archive-bucket")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-south-1")
    store = artifact_store(Settings.from_env())
    assert isinstance(store, S3Store)
    assert store.prefix == ""
    assert store.client.meta.region_name == "ap-south-1"
    assert store.client.meta.config.s3["addressing_style"] == "auto"


def test_region_defaults_to_us_east_1(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OSA_STORAGE", "s3://archive-bucket/p")
    store = artifact_store(Settings.from_env())
    assert isinstance(store, S3Store)
    assert store.client.meta.region_name == "us-east-1"


@pytest.mark.parametrize(
    "value",
    [
        "s3://",
        "s3:///prefix",
        "s3:/bucket",
        "s3://bad bucket/p",
        "s3://bucket:9000/p",
        "s3://bucket/../escape",
        "s3://bucket/p?versionId=1",
    ],
)
def test_malformed_s3_location_is_refused_by_name(monkeypatch: pytest.MonkeyPatch, value: str):
    monkeypatch.setenv("OSA_STORAGE", value)
    with pytest.raises(ValueError, match="OSA_STORAGE") as failure:
        artifact_store(Settings.from_env())
    assert repr(value) in str(failure.value)


def test_credentials_in_the_location_are_not_echoed(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OSA_STORAGE", "s3://AKIDEXAMPLE:hunter2secret@bucket/p")
    with pytest.raises(ValueError, match="OSA_STORAGE") as failure:
        artifact_store(Settings.from_env())
    assert "hunter2secret" not in str(failure.value)
    assert "AKIDEXAMPLE" not in str(failure.value)


def test_folder_location_is_still_the_filesystem_store(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    monkeypatch.setenv("OSA_STORAGE", str(tmp_path / "artifacts"))
    store = artifact_store(Settings.from_env())
    assert isinstance(store, FileSystemStore)
    assert store.root == (tmp_path / "artifacts").resolve()


def test_environment_reaches_a_real_server(
    monkeypatch: pytest.MonkeyPatch, seaweedfs: S3Endpoint, unique_prefix: str
):
    """Credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, the server from
    OSA_S3_ENDPOINT_URL: the variables a deployment sets."""
    monkeypatch.setenv("OSA_STORAGE", f"s3://{seaweedfs.bucket}/{unique_prefix}")
    monkeypatch.setenv("OSA_S3_ENDPOINT_URL", seaweedfs.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweedfs.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweedfs.secret_key)
    store = artifact_store(Settings.from_env())
    store.write_bytes("batches/p1/manifest.json", b"{}")
    assert store.read_bytes("batches/p1/manifest.json") == b"{}"
    assert list(store.list_keys("batches")) == ["batches/p1/manifest.json"]
