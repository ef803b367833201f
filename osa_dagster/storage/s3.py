"""The artifact store on S3 or an S3-compatible server (SeaweedFS, MinIO, Ceph).

Objects live at `<prefix>/<key>` in one bucket. The store takes a ready boto3 client (one
made by `make_s3_client`, or a `dagster_aws` S3Resource's), so nothing here imports Dagster.

Failures: transient ones (connection refused or reset, timeouts, HTTP 500/502/503/504,
throttling) are retried with exponential backoff and jitter up to `RetryPolicy.attempts`;
anything else fails at once. Both surface as `StoreError`, whose message names the
operation, the s3:// URL, the endpoint and the S3 error code, and never a credential. A
missing key raises FileNotFoundError, as with the filesystem store.
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from itertools import count
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple, NoReturn, TypeVar
from urllib.parse import urlsplit

import boto3
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError, SSLError
from botocore.exceptions import ConnectionError as BotoConnectionError
from s3transfer.exceptions import RetriesExceededError
from s3transfer.futures import TransferFuture
from s3transfer.manager import TransferManager
from s3transfer.subscribers import BaseSubscriber

from osa_dagster.retrying import TRANSIENT_HTTP_STATUS, RetryPolicy
from osa_dagster.settings import BUCKET_NAME, SettingsError
from osa_dagster.storage.store import StoreKeyError, check_key

log = logging.getLogger(__name__)

T = TypeVar("T")

DELETE_BATCH = 1000  # the most keys one DeleteObjects request accepts

TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "RequestLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "TooManyRequestsException",
    }
)
# What a permanent failure means for the operator, by S3 error code.
HINTS = {
    "NoSuchBucket": "bucket {bucket!r} does not exist",
    "AccessDenied": "access to bucket {bucket!r} is denied to these credentials",
    "InvalidAccessKeyId": "the server does not know the access key id (check the credentials)",
    "SignatureDoesNotMatch": "the secret key does not match the access key id",
    # A HEAD answer has no body, so no code says why.
    "403": "access denied (no permission, an unknown access key id or a wrong secret key)",
}


class StoreError(RuntimeError):
    """An S3 operation that failed for good: a permanent error, or retries exhausted."""

    def __init__(self, message: str, *, code: str, url: str) -> None:
        super().__init__(message)
        self.code = code
        self.url = url


class _Object(NamedTuple):
    key: str
    size: int
    etag: str
    modified: datetime


@dataclass(frozen=True)
class _Staged:
    """A downloaded file's size and mtime, to tell on upload whether it was changed."""

    size: int
    mtime_ns: int


class _Listed(BaseSubscriber):
    """Gives s3transfer the size and ETag from the listing: that saves a HEAD request per
    file, and the ETag makes every GET conditional (If-Match), so an object replaced
    while it is being staged fails the staging instead of mixing two versions."""

    def __init__(self, size: int, etag: str) -> None:
        self._size = size
        self._etag = etag

    def on_queued(self, future: TransferFuture, **kwargs: Any) -> None:
        future.meta.provide_transfer_size(self._size)
        future.meta.provide_object_etag(self._etag)


def make_s3_client(
    *,
    endpoint_url: str | None = None,
    region: str = "us-east-1",
    session: boto3.session.Session | None = None,
    connect_timeout: float = 3.0,
    read_timeout: float = 30.0,
) -> BaseClient:
    """A boto3 S3 client suited to S3Store.

    botocore's own retries are off, since S3Store retries every call itself and would
    otherwise multiply both counts. Credentials come from `session`, else from the
    default chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, profiles, instance roles).
    With an endpoint URL (an S3-compatible server) addressing is path-style, since such
    servers rarely have a DNS name per bucket.
    """
    config = Config(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"total_max_attempts": 1, "mode": "standard"},
        s3={"addressing_style": "path" if endpoint_url else "auto"},
    )
    session = session or boto3.session.Session()
    return session.client("s3", endpoint_url=endpoint_url, region_name=region, config=config)


def parse_s3_url(url: str) -> tuple[str, str]:
    """`s3://bucket[/prefix]` -> (bucket, prefix without surrounding slashes)."""
    parts = urlsplit(url)
    shown = url
    if "@" in parts.netloc:  # never echo credentials someone put into the URL
        shown = url.replace(parts.netloc, "***@" + parts.netloc.rsplit("@", 1)[1])
    problem = None
    if parts.scheme != "s3":
        problem = "it must start with s3://"
    elif not BUCKET_NAME.match(parts.netloc):
        problem = "it must name a bucket (letters, digits, '.', '-', '_')"
    elif parts.query or parts.fragment:
        problem = "it must not have a query or a fragment"
    if problem is None:
        prefix = parts.path.strip("/")
        try:
            return parts.netloc, _normalise(prefix) if prefix else ""
        except StoreKeyError:
            problem = "its prefix must be a relative path without '..'"
    raise SettingsError(f"OSA_STORAGE={shown!r} is not a valid S3 location: {problem}")


def _in_folders(relative: str, folders: set[str]) -> bool:
    """Whether the path is inside one of the folders (each a path relative to the same base)."""
    parts = relative.split("/")
    return any("/".join(parts[:depth]) in folders for depth in range(1, len(parts)))


def _normalise(key: str) -> str:
    """A checked key in one spelling: S3 would keep 'a//b' and 'a/./b' apart from 'a/b'."""
    normal = PurePosixPath(check_key(key)).as_posix()
    if normal == ".":
        raise StoreKeyError(f"artifact key {key!r} must name something inside the store")
    return normal


def _unwrap(error: BaseException) -> BaseException:
    # s3transfer reports a download that failed its own attempts with the real cause inside.
    if isinstance(error, RetriesExceededError):
        return error.last_exception
    return error


def _error_code(error: BaseException) -> str:
    if isinstance(error, ClientError):
        details = error.response.get("Error", {})
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return str(details.get("Code") or status or "ClientError")
    return type(error).__name__


def _is_transient(error: BaseException) -> bool:
    if isinstance(error, ClientError):
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return status in TRANSIENT_HTTP_STATUS or _error_code(error) in TRANSIENT_CODES
    if isinstance(error, SSLError):  # a certificate problem does not heal by waiting
        return False
    return isinstance(error, BotoConnectionError | HTTPClientError | IncompleteReadError)


class S3Store:
    """Keys are objects under `prefix` in `bucket`; see the module doc for failures.

    Listing order and hidden names follow FileSystemStore, so callers see the same keys in
    the same order on either store: keys are sorted by path components, and a key whose
    last component starts with "." (a temporary file there) is not listed. Unlike a
    folder on disk, a prefix is not a key: `exists("a")` is False when only "a/b" exists.

    The client should not retry by itself (`make_s3_client` turns that off; a dagster_aws
    S3Resource needs `max_attempts=0`), or its retries multiply with the store's.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str,
        client: BaseClient,
        *,
        retry: RetryPolicy | None = None,
        transfer: TransferConfig | None = None,
        staging_dir: Path | None = None,
    ) -> None:
        self.bucket = bucket
        self.prefix = _normalise(prefix.strip("/")) if prefix.strip("/") else ""
        self.client = client
        self.retry = retry or RetryPolicy()
        # s3transfer's own download attempts would nest inside ours: one is enough.
        self.transfer = transfer or TransferConfig(num_download_attempts=1)
        self.staging_dir = staging_dir
        self._bucket_seen = False

    # --- the ArtifactStore protocol ---------------------------------------------------

    def read_bytes(self, key: str) -> bytes:
        name = self._object(key)

        def get() -> bytes:
            # The body is read inside the retried call: a reset mid-body is transient too.
            return self.client.get_object(Bucket=self.bucket, Key=name)["Body"].read()

        try:
            return self._call("get", name, get)
        except StoreError as error:
            if error.code == "NoSuchKey":
                raise FileNotFoundError(f"no artifact at {error.url}") from error
            raise

    def iter_lines(self, key: str) -> Iterator[bytes]:
        """Opening the object is retried like any call; a connection lost in the middle of
        the body ends the iteration with a StoreError, as the lines read are already used."""
        name = self._object(key)
        try:
            body = self._call(
                "get", name, lambda: self.client.get_object(Bucket=self.bucket, Key=name)["Body"]
            )
        except StoreError as error:
            if error.code == "NoSuchKey":
                raise FileNotFoundError(f"no artifact at {error.url}") from error
            raise
        with closing(body):
            try:
                yield from body.iter_lines()
            except Exception as error:
                self._fail("get", name, error, attempts=1)

    def write_bytes(self, key: str, data: bytes) -> None:
        """One PUT: S3 replaces an object atomically, so readers see the old or the new."""
        name = self._object(key)
        self._call(
            "put", name, lambda: self.client.put_object(Bucket=self.bucket, Key=name, Body=data)
        )

    def exists(self, key: str) -> bool:
        name = self._object(key)
        try:
            self._call("head", name, lambda: self.client.head_object(Bucket=self.bucket, Key=name))
        except StoreError as error:
            if error.code != "404":
                raise
            # A missing bucket also answers HEAD with a bare 404: check it once, so that a
            # wrong bucket fails loudly instead of looking like an empty store.
            self._check_bucket()
            return False
        return True

    def list_keys(self, prefix: str) -> Iterator[str]:
        base = self._object(prefix) + "/"
        keys = [
            self._relative(item.key)
            for item in self._objects(base)
            if not PurePosixPath(item.key).name.startswith(".")
        ]
        yield from sorted(keys, key=lambda k: k.split("/"))

    def sizes(self, prefix: str) -> dict[str, int]:
        base = self._object(prefix) + "/"
        return {item.key[len(base) :]: item.size for item in self._objects(base)}

    def delete_prefix(self, prefix: str) -> None:
        """Every object under `prefix`, and an object named `prefix` itself."""
        base = self._object(prefix)
        # Listed in full before deleting: a continuation token across deletions is not
        # something every S3-compatible server gets right.
        names = [base, *(item.key for item in self._objects(base + "/"))]
        self._delete(names)

    @contextmanager
    def local_dir(
        self, prefix: str, *, writable: bool, only: Collection[str] | None = None
    ) -> Iterator[Path]:
        """A temporary folder holding a copy of every object under `prefix`; with `only`
        (reading only), of the objects in those folders under it.

        If writable and the body exits without error, the folder is synchronised back:
        new and changed files are uploaded, and objects whose file was removed are
        deleted, so the store ends up holding exactly what the folder held (as with
        FileSystemStore, whose folder is the store itself). A file counts as changed when
        its size or modification time differs from the staged copy; staged files carry
        their object's LastModified time, which any later write replaces. On an error
        nothing is uploaded. The folder is removed on exit in every case.
        """
        if writable and only is not None:
            raise ValueError("a folder staged in part cannot be written back")
        base = self._object(prefix)
        with tempfile.TemporaryDirectory(prefix="osa-s3-", dir=self.staging_dir) as tmp:
            folder = Path(tmp)
            staged = self._download(base, folder, only)
            yield folder
            if writable:
                self._synchronise(base, folder, staged)

    def describe(self, key: str) -> str:
        return self._url(self._object(key))

    # --- keys -------------------------------------------------------------------------

    def _object(self, key: str) -> str:
        key = _normalise(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _relative(self, name: str) -> str:
        return name[len(self.prefix) + 1 :] if self.prefix else name

    def _url(self, name: str) -> str:
        return f"s3://{self.bucket}/{name}"

    # --- calls with retries -----------------------------------------------------------

    def _call(self, operation: str, name: str, call: Callable[[], T]) -> T:
        attempt = 0
        while True:
            attempt += 1
            try:
                return call()
            except Exception as error:
                self._give_up_unless_transient(operation, name, error, attempt)
                self._wait(operation, name, error, attempt)

    def _give_up_unless_transient(
        self, operation: str, name: str, error: BaseException, attempt: int
    ) -> None:
        cause = _unwrap(error)
        if not _is_transient(cause):
            self._fail(operation, name, cause, attempts=1)
        if attempt >= self.retry.attempts:
            self._fail(operation, name, cause, attempts=attempt)

    def _wait(self, operation: str, name: str, error: BaseException, attempt: int) -> None:
        delay = self.retry.delay(attempt)
        log.warning(
            "S3 %s %s: %s (%s), attempt %d of %d; retrying in %.2f s",
            operation,
            self._url(name),
            _error_code(_unwrap(error)),
            self.client.meta.endpoint_url,
            attempt,
            self.retry.attempts,
            delay,
        )
        time.sleep(delay)

    def _fail(self, operation: str, name: str, error: BaseException, *, attempts: int) -> NoReturn:
        code = _error_code(error)
        url = self._url(name)
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        hint = HINTS.get(code, "")
        hint = f"{hint.format(bucket=self.bucket)}; " if hint else ""
        # botocore's messages hold the code, the server's message and the URL, never keys.
        message = (
            f"S3 {operation} {url} failed{tries} at endpoint {self.client.meta.endpoint_url}: "
            f"{code}: {hint}{error}"
        )
        raise StoreError(message, code=code, url=url) from error

    def _check_bucket(self) -> None:
        if self._bucket_seen:
            return
        try:
            self._call("head-bucket", "", lambda: self.client.head_bucket(Bucket=self.bucket))
        except StoreError as error:
            if error.code == "404":
                code = "NoSuchBucket"
                raise StoreError(
                    f"S3 head-bucket {error.url} failed at endpoint "
                    f"{self.client.meta.endpoint_url}: {code}: "
                    f"{HINTS[code].format(bucket=self.bucket)}",
                    code=code,
                    url=error.url,
                ) from error
            raise
        self._bucket_seen = True

    # --- listing and deleting ---------------------------------------------------------

    def _objects(self, base: str) -> Iterator[_Object]:
        """Every object whose key starts with `base`, page by page; folder markers ("a/")
        that some tools create are not objects here."""
        request: dict[str, str] = {"Bucket": self.bucket, "Prefix": base}
        while True:
            page = self._call("list", base, lambda: self.client.list_objects_v2(**request))
            for item in page.get("Contents", []):
                if not item["Key"].endswith("/"):
                    yield _Object(item["Key"], item["Size"], item["ETag"], item["LastModified"])
            if not page.get("IsTruncated"):
                return
            request["ContinuationToken"] = page["NextContinuationToken"]

    def _delete(self, names: list[str]) -> None:
        for start in range(0, len(names), DELETE_BATCH):
            batch = names[start : start + DELETE_BATCH]
            request = {"Objects": [{"Key": name} for name in batch], "Quiet": True}
            delete = partial(self.client.delete_objects, Bucket=self.bucket, Delete=request)
            answer = self._call("delete", batch[0], delete)
            # DeleteObjects answers 200 even when single keys failed: they are listed.
            for failure in answer.get("Errors", []):
                code = failure.get("Code", "DeleteFailed")
                url = self._url(failure.get("Key", batch[0]))
                raise StoreError(
                    f"S3 delete {url} failed at endpoint {self.client.meta.endpoint_url}: "
                    f"{code}: {failure.get('Message', '')}",
                    code=code,
                    url=url,
                )

    # --- staging ----------------------------------------------------------------------

    def _download(
        self, base: str, folder: Path, only: Collection[str] | None = None
    ) -> dict[str, _Staged]:
        """Copy every object under `base` (in the folders `only` names, if given) into
        `folder`, streaming to disk; returns what was staged, by path relative to the folder."""
        objects: dict[str, _Object] = {}
        wanted = None if only is None else {_normalise(name) for name in only}
        for item in self._objects(base + "/"):
            relative = item.key[len(base) + 1 :]
            if wanted is not None and not _in_folders(relative, wanted):
                continue
            try:
                check_key(relative)
            except StoreKeyError as error:  # a key like "p/../x" must not escape the folder
                raise StoreError(
                    f"S3 key {self._url(item.key)} cannot be staged: {error}",
                    code="UnsafeKey",
                    url=self._url(item.key),
                ) from error
            objects[relative] = item
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)

        def submit(manager: TransferManager, relative: str) -> TransferFuture:
            item = objects[relative]
            listed = _Listed(item.size, item.etag)
            return manager.download(
                self.bucket, item.key, str(folder / relative), subscribers=[listed]
            )

        self._transfer("download", {r: item.key for r, item in objects.items()}, submit)
        staged: dict[str, _Staged] = {}
        for relative, item in objects.items():
            path = folder / relative
            stamp = item.modified.timestamp()
            os.utime(path, (stamp, stamp))
            info = path.stat()
            staged[relative] = _Staged(info.st_size, info.st_mtime_ns)
        return staged

    def _synchronise(self, base: str, folder: Path, staged: dict[str, _Staged]) -> None:
        present: set[str] = set()
        changed: dict[str, str] = {}
        for path in folder.rglob("*"):
            # Regular files only, never through a link: a hook's output folder is in here, and
            # a symlink it left must not upload what it points to, nor a FIFO block the upload.
            info = path.lstat()
            if not stat.S_ISREG(info.st_mode):
                continue
            relative = path.relative_to(folder).as_posix()
            present.add(relative)
            if staged.get(relative) != _Staged(info.st_size, info.st_mtime_ns):
                changed[relative] = f"{base}/{relative}"

        def submit(manager: TransferManager, relative: str) -> TransferFuture:
            return manager.upload(str(folder / relative), self.bucket, changed[relative])

        self._transfer("upload", changed, submit)
        # Deleted after the uploads, so an interruption leaves a surplus, never a gap.
        self._delete([f"{base}/{relative}" for relative in sorted(staged.keys() - present)])

    def _transfer(
        self,
        operation: str,
        names: dict[str, str],
        submit: Callable[[TransferManager, str], TransferFuture],
    ) -> None:
        """Run one transfer per entry of `names` (relative path -> object key) through one
        transfer manager, which runs them concurrently and streams large files in parts.
        The ones that fail transiently are retried together, as the others finish."""
        if not names:
            return
        with create_transfer_manager(self.client, self.transfer) as manager:
            pending = list(names)
            for attempt in count(1):
                futures = {relative: submit(manager, relative) for relative in pending}
                failed: list[tuple[str, BaseException]] = []
                for relative, future in futures.items():
                    try:
                        future.result()
                    except Exception as error:
                        self._give_up_unless_transient(operation, names[relative], error, attempt)
                        failed.append((relative, error))
                if not failed:
                    return
                relative, first_error = failed[0]
                self._wait(operation, names[relative], first_error, attempt)
                pending = [relative for relative, _ in failed]
