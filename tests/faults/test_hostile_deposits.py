"""Hostile deposits: a deposit may only ever have what was deposited read from it.

Symlinks (to /etc/shadow, to /proc/self/environ, to a folder of credentials), a linked
files/, a FIFO, a device and a linked deposit.json are refused with the reason in
result.json, and nothing they point to is opened; a 400 MB deposit.json is refused unread;
a folder whose name cannot be a deposit's gets a result.json saying so. An honest deposit
beside them passes.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from osa_sdk.contract import BYTES_PER_MB
from osa_sdk.types import OutcomeStatus

from osa_dagster.batch.deposits import (
    FILES_DIR,
    RESULT_FILE,
    pending_deposits,
    read_result,
    refuse_misnamed_deposits,
    validate_deposit,
    write_deposit,
)
from osa_dagster.conventions.base import Convention
from osa_dagster.engine import LocalRunner
from osa_dagster.engine.spec import HookSpec, MemoryPolicy, sdk_hook_command
from osa_dagster.storage.store import FileSystemStore
from tests.fixtures.hostile_convention import PeakGrowth
from tests.fixtures.toy_convention import ToyIngester

from .conftest import REPO

CONVENTION = "deposited"


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FileSystemStore:
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    return FileSystemStore(tmp_path / "deposits")


def convention() -> Convention:
    return Convention(
        name=CONVENTION,
        ingester=ToyIngester,
        hooks=(
            HookSpec(
                name="validator",
                command=sdk_hook_command("tests.fixtures.hostile_hooks:validator"),
                memory=MemoryPolicy(base_mb=256, cap_mb=256),
                timeout_s=60,
            ),
        ),
    )


def folder(store: FileSystemStore, deposit: str) -> Path:
    return store.root / CONVENTION / deposit


def credentials(tmp_path: Path) -> Path:
    secrets = tmp_path / "home" / ".aws"
    secrets.mkdir(parents=True)
    (secrets / "credentials").write_text("aws_secret_access_key = not-for-depositors\n")
    return secrets


# name -> (what to put in files/ besides a good file, the reason expected)
HOSTILE_FILES: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "shadow": (
        lambda files, _: (files / "shadow").symlink_to("/etc/shadow"),
        "files/shadow is a symlink: deposit regular files only",
    ),
    "environ": (
        lambda files, _: (files / "environ").symlink_to("/proc/self/environ"),
        "files/environ is a symlink: deposit regular files only",
    ),
    "aws-folder": (
        lambda files, tmp: (files / "aws").symlink_to(credentials(tmp)),
        "files/aws is a symlink: deposit regular files only",
    ),
    "fifo": (
        lambda files, _: os.mkfifo(files / "pipe"),
        "files/pipe is a FIFO: deposit regular files only",
    ),
    "device": (
        lambda files, _: os.mknod(files / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3)),
        "files/null is a character device: deposit regular files only",
    ),
    "folder": (
        lambda files, _: (files / "sub").mkdir(),
        "files/sub is a folder: deposit regular files only",
    ),
}


@pytest.mark.parametrize("case", HOSTILE_FILES)
def test_a_file_that_is_not_a_regular_file_is_refused_unopened(
    store: FileSystemStore, tmp_path: Path, case: str
) -> None:
    make, reason = HOSTILE_FILES[case]
    write_deposit(store, CONVENTION, case, {"good.txt": b"deposited"})
    make(folder(store, case) / FILES_DIR, tmp_path)

    result = validate_deposit(convention(), store, case, LocalRunner())

    assert (result.status, result.reason) == (
        OutcomeStatus.REJECTED,
        f"malformed deposit: {reason}",
    )
    written = (folder(store, case) / RESULT_FILE).read_text()
    assert "not-for-depositors" not in written
    assert Path("/etc/shadow").read_text().splitlines()[0] not in written


def test_a_linked_files_folder_is_refused(store: FileSystemStore, tmp_path: Path) -> None:
    write_deposit(store, CONVENTION, "linked", {})
    (folder(store, "linked") / FILES_DIR).symlink_to(credentials(tmp_path))

    result = validate_deposit(convention(), store, "linked", LocalRunner())

    assert result.reason == "malformed deposit: files/ is a symlink: deposit the files themselves"
    assert "not-for-depositors" not in (folder(store, "linked") / RESULT_FILE).read_text()


def test_a_linked_deposit_json_is_refused(store: FileSystemStore, tmp_path: Path) -> None:
    elsewhere = tmp_path / "request.json"
    elsewhere.write_text(json.dumps({"source_id": "elsewhere"}))
    write_deposit(store, CONVENTION, "linked-request", {"good.txt": b"deposited"})
    (folder(store, "linked-request") / "deposit.json").unlink()
    (folder(store, "linked-request") / "deposit.json").symlink_to(elsewhere)

    result = validate_deposit(convention(), store, "linked-request", LocalRunner())

    assert result.reason == "malformed deposit: deposit.json is a symlink, not a regular file"


def test_a_huge_deposit_json_is_refused_unread(store: FileSystemStore) -> None:
    write_deposit(store, CONVENTION, "huge", {"good.txt": b"deposited"})
    os.truncate(folder(store, "huge") / "deposit.json", 400 * BYTES_PER_MB)  # sparse: no disk used

    with PeakGrowth() as growth:
        result = validate_deposit(convention(), store, "huge", LocalRunner())

    assert result.reason == (
        "malformed deposit: deposit.json is 400.0 MB, over the 4 MB it may be: put data in files/"
    )
    assert growth.mb < 50, f"the validator's memory grew by {growth.mb:.0f} MB"


def test_a_folder_the_sensor_cannot_take_gets_a_result_saying_why(
    store: FileSystemStore,
) -> None:
    names = ["with space", "ünïcødé", ".hidden", "-leading-dash"]
    for name in [*names, "honest"]:
        write_deposit(store, CONVENTION, name, {"good.txt": b"deposited"})

    assert refuse_misnamed_deposits(store, CONVENTION) == sorted(names)
    assert pending_deposits(store, CONVENTION) == ["honest"]
    for name in names:
        result = read_result(store, CONVENTION, name)
        assert result.status is OutcomeStatus.REJECTED
        assert result.reason is not None
        assert result.reason.startswith(f"malformed deposit: the folder name {name!r} cannot")
    # Refused once: a second tick finds nothing more to say.
    assert refuse_misnamed_deposits(store, CONVENTION) == []
    honest = validate_deposit(convention(), store, "honest", LocalRunner())
    assert honest.status is OutcomeStatus.PASSED, honest.reason
