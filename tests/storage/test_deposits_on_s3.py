"""Deposits taken from S3 (OSA_DEPOSITS=s3://...): the same verdicts as from a drop folder,
the caps and strict JSON included, with result.json written back as an object; a deposit
over the caps is refused by the sizes S3 lists, before anything is downloaded."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from osa_sdk.contract import BYTES_PER_MB
from osa_sdk.types import OutcomeStatus

from osa_dagster.batch.deposits import (
    pending_deposits,
    read_result,
    validate_deposit,
    write_deposit,
)
from osa_dagster.engine import LocalRunner
from osa_dagster.settings import Settings
from osa_dagster.storage.s3 import S3Store
from tests.faults.conftest import REPO
from tests.faults.test_hostile_deposits import CONVENTION, convention

from .servers import S3Endpoint


class Staging:
    """An S3 store that notes each prefix it stages to a local folder."""

    def __init__(self, store: S3Store) -> None:
        self.store = store
        self.staged: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    @contextmanager
    def local_dir(self, prefix: str, *, writable: bool) -> Iterator[Path]:
        self.staged.append(prefix)
        with self.store.local_dir(prefix, writable=writable) as folder:
            yield folder


@pytest.fixture(autouse=True)
def hooks_import_this_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    """The validator is a module of this repository's tests, which only PYTHONPATH shows
    to the hook's own process."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))


@pytest.mark.parametrize(
    ("files", "request_text", "status", "reason", "staged"),
    [
        ({"good.txt": b"deposited"}, "{}", OutcomeStatus.PASSED, None, True),
        (
            {"good.txt": b"deposited"},
            '{"metadata": {"resolution": NaN}}',
            OutcomeStatus.REJECTED,
            "malformed deposit: deposit.json is not strict JSON: NaN (not a finite number) at "
            "metadata.resolution",
            True,
        ),
        (
            {"good.txt": b"deposited", "big.bin": bytes(BYTES_PER_MB // 10)},
            "{}",
            OutcomeStatus.REJECTED,
            "malformed deposit: files/big.bin is 0.1 MB, over the 0.05 MB a deposited file of "
            "this convention may be",
            False,
        ),
        (
            {"good.txt": b"deposited"},
            " " * 5 * BYTES_PER_MB + "{}",
            OutcomeStatus.REJECTED,
            "malformed deposit: deposit.json is 5.0 MB, over the 4 MB it may be: put data in "
            "files/",
            False,
        ),
    ],
    ids=["honest", "nan", "over-the-cap", "huge-request"],
)
def test_a_deposit_on_s3_gets_its_verdict(
    s3: S3Endpoint,
    unique_prefix: str,
    files: dict[str, bytes],
    request_text: str,
    status: OutcomeStatus,
    reason: str | None,
    staged: bool,
) -> None:
    store = Staging(s3.store(unique_prefix))
    write_deposit(store, CONVENTION, "one", files, request_text)
    assert pending_deposits(store, CONVENTION) == ["one"]

    result = validate_deposit(
        convention(), store, "one", LocalRunner.from_settings(Settings.from_env())
    )

    assert (result.status, result.reason) == (status, reason)
    assert store.staged == ([f"{CONVENTION}/one"] if staged else [])
    assert read_result(store, CONVENTION, "one") == result
    assert pending_deposits(store, CONVENTION) == []
