"""Fixtures for the store tests: real S3 servers on 127.0.0.1, and one `store` fixture that
gives every semantics test the filesystem store, S3 on moto and S3 on SeaweedFS in turn."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from osa_dagster.storage import ArtifactStore, FileSystemStore
from tests.fixtures.services import unavailable

from .servers import S3Endpoint, SeaweedFS, SeaweedFSUnavailable, moto_endpoint


@pytest.fixture(autouse=True)
def no_real_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Credentials and config of the machine running the tests stay out of them, and
    boto3 never asks an instance-metadata endpoint for credentials."""
    for name in ("AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION", "OSA_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "osa-env-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "osa-env-secret")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="session")
def seaweedfs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """A real SeaweedFS S3 server for the session. Where it cannot start, CI fails and a
    developer's run skips the SeaweedFS cases with the reason."""
    try:
        server = SeaweedFS.start(tmp_path_factory.mktemp("seaweedfs"))
    except SeaweedFSUnavailable as error:
        unavailable(f"SeaweedFS unavailable: {error}")
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="session")
def seaweedfs(seaweedfs_server: SeaweedFS) -> S3Endpoint:
    return seaweedfs_server.endpoint


@pytest.fixture(scope="session")
def moto() -> Iterator[S3Endpoint]:
    with moto_endpoint() as endpoint:
        yield endpoint


@pytest.fixture(params=["moto", "seaweedfs"])
def s3(request: pytest.FixtureRequest) -> S3Endpoint:
    """Each S3 server in turn."""
    return request.getfixturevalue(request.param)


@pytest.fixture
def unique_prefix() -> str:
    """The servers live for the session: each test works under its own prefix."""
    return f"tests/{uuid.uuid4().hex}"


@pytest.fixture(params=["filesystem", "moto", "seaweedfs"])
def store(request: pytest.FixtureRequest, tmp_path: Path, unique_prefix: str) -> ArtifactStore:
    """Each store implementation in turn, empty."""
    if request.param == "filesystem":
        return FileSystemStore(tmp_path / "store")
    endpoint: S3Endpoint = request.getfixturevalue(request.param)
    return endpoint.store(unique_prefix)
