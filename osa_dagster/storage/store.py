"""The artifact store: every read and write of batch artifacts goes through it.

Keys are "/"-separated relative paths ("batches/pdb/<partition>/raw/records.jsonl").
The filesystem store is the default; code that needs a local folder (a hook runner
mounting files) asks for one with `local_dir`, which a remote store satisfies by
staging, so no caller assumes that a key is a local file.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Protocol

from osa_dagster.atomic_files import write_atomically
from osa_dagster.retrying import RetryPolicy
from osa_dagster.settings import Settings

DEFAULT_RETRY = RetryPolicy()


class StoreKeyError(ValueError):
    """A key that is absolute or climbs out of the store."""


def check_key(key: str) -> str:
    path = PurePosixPath(key)
    if not key or path.is_absolute() or ".." in path.parts:
        raise StoreKeyError(f"artifact key {key!r} must be a relative path inside the store")
    return key


class ArtifactStore(Protocol):
    def read_bytes(self, key: str) -> bytes: ...

    def iter_lines(self, key: str) -> Iterator[bytes]:
        """The lines of a key, without their line ends, read as they are consumed: memory
        stays that of one line whatever the size of the artifact."""
        ...

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write atomically: a reader sees the old content or the new, never a mix."""
        ...

    def exists(self, key: str) -> bool: ...

    def list_keys(self, prefix: str) -> Iterator[str]: ...

    def sizes(self, prefix: str) -> dict[str, int]:
        """The size in bytes of everything `local_dir(prefix)` would hold, hidden files
        included, by path relative to `prefix`: what staging it would cost, known first."""
        ...

    def delete_prefix(self, prefix: str) -> None: ...

    @contextmanager
    def local_dir(
        self, prefix: str, *, writable: bool, only: Collection[str] | None = None
    ) -> Iterator[Path]:
        """A local folder holding the keys under `prefix`; if writable, what is written
        there is in the store once the context exits without error. With `only` (folders
        under `prefix`, for reading only), a store that copies keys to a local folder
        copies just those; it may hold the others too."""
        ...

    def describe(self, key: str) -> str:
        """Where a key lives, for messages and metadata (a path or a URL)."""
        ...


class FileSystemStore:
    """Keys are files under a root folder."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def read_bytes(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def iter_lines(self, key: str) -> Iterator[bytes]:
        with self.path(key).open("rb") as stream:
            for line in stream:
                yield line.rstrip(b"\r\n")

    def write_bytes(self, key: str, data: bytes) -> None:
        write_atomically(self.path(key), data)

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def list_keys(self, prefix: str) -> Iterator[str]:
        base = self.path(prefix)
        if not base.is_dir():
            return
        for path in sorted(base.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                yield path.relative_to(self.root).as_posix()

    def sizes(self, prefix: str) -> dict[str, int]:
        base = self.path(prefix)
        return {
            path.relative_to(base).as_posix(): path.stat().st_size
            for path in base.rglob("*")
            if path.is_file()
        }

    def delete_prefix(self, prefix: str) -> None:
        target = self.path(prefix)
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)

    @contextmanager
    def local_dir(
        self, prefix: str, *, writable: bool, only: Collection[str] | None = None
    ) -> Iterator[Path]:
        folder = self.path(prefix)
        if writable:
            folder.mkdir(parents=True, exist_ok=True)
        yield folder

    def describe(self, key: str) -> str:
        return str(self.path(key))


def artifact_store(configured: Settings) -> ArtifactStore:
    """The store of the settings' OSA_STORAGE (see `store_at`); default <data dir>/artifacts."""
    return _configured_store(configured.artifacts_location, configured)


def deposits_store(configured: Settings) -> ArtifactStore:
    """Where people deposit single records to validate: the settings' OSA_DEPOSITS (a folder
    or an S3 prefix, as `store_at` reads it); default <data dir>/deposits, a drop folder."""
    return _configured_store(configured.deposits_location, configured)


def _configured_store(location: str, configured: Settings) -> ArtifactStore:
    return store_at(
        location,
        endpoint_url=configured.s3_endpoint_url,
        retry=s3_retry(configured.s3_retry_attempts, configured.s3_retry_max_wait_s),
    )


def s3_retry(attempts: int, max_wait_s: float) -> RetryPolicy:
    """OSA_S3_RETRY_ATTEMPTS and OSA_S3_RETRY_MAX_WAIT_S as a retry policy."""
    return RetryPolicy(attempts=attempts, max_delay=max_wait_s)


def store_at(
    location: str, *, endpoint_url: str | None = None, retry: RetryPolicy = DEFAULT_RETRY
) -> ArtifactStore:
    """The store at `location`: a folder (optionally file://...) or s3://bucket[/prefix].

    For S3: `endpoint_url` (OSA_S3_ENDPOINT_URL; None: AWS) points at an S3-compatible
    server (path-style addressing then), the region is AWS_REGION or AWS_DEFAULT_REGION
    (default us-east-1), and credentials come from boto3's default chain
    (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, profiles, instance roles), and transient
    failures are retried as `retry` says.
    """
    if location.lower().startswith("s3:"):
        # Imported here so that the filesystem default does not pay for importing boto3.
        from osa_dagster.storage.s3 import S3Store, make_s3_client, parse_s3_url

        bucket, prefix = parse_s3_url(location)
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        client = make_s3_client(endpoint_url=endpoint_url, region=region or "us-east-1")
        return S3Store(bucket, prefix, client, retry=retry)
    return FileSystemStore(Path(location.removeprefix("file://")))
