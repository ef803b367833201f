"""Validating one record deposited by a person, with a convention's hooks and the same engine.

A deposit is a folder in the deposits store (a drop folder by default, an S3 prefix in
production; see storage.store.deposits_store_from_env):

    <convention>/<deposit>/files/...       the record's files
    <convention>/<deposit>/deposit.json    written last: {"source_id": ..., "metadata": {...}}
    <convention>/<deposit>/result.json     written here: what the depositor reads

`deposit.json` marks the deposit complete, so a half-uploaded one is never picked up. The
record runs through every hook as a batch of one, with the same memory ladder and OOM
escalation as a batch. A malformed deposit gets a result that says what is wrong with it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from osa_sdk.contract import BYTES_PER_MB, bytes_to_mb, file_name_error, files_dir_for
from osa_sdk.types import HookRecord, HookRecordId, OutcomeStatus
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from osa_dagster.conventions.base import Convention
from osa_dagster.engine import FileCheckpointIO, HookBatch, HookCapacity, Runner, run_hook
from osa_dagster.regular_files import open_folder, open_regular
from osa_dagster.storage.store import ArtifactStore

DEPOSIT_FILE = "deposit.json"
RESULT_FILE = "result.json"
FILES_DIR = "files"
# deposit.json holds an id and metadata: anything larger is refused unread.
MAX_REQUEST_BYTES = 4 * BYTES_PER_MB
# Deposit names become Dagster partition keys and store keys: plain names only.
DEPOSIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class DepositRequest(BaseModel):
    """deposit.json: the record's id (default: the deposit's name) and its metadata."""

    model_config = ConfigDict(extra="forbid")

    source_id: str | None = Field(default=None, min_length=1)
    metadata: dict[str, Any] = Field(default_factory=dict)


class AttemptSummary(BaseModel):
    memory_limit_mb: int
    peak_memory_mb: float | None
    oom_killed: bool


class HookVerdict(BaseModel):
    hook: str
    status: OutcomeStatus
    reason: str | None = None
    features: list[dict[str, Any]] = Field(default_factory=list)
    attempts: list[AttemptSummary] = Field(default_factory=list)


class DepositResult(BaseModel):
    """result.json: passed (with features), rejected (with reasons) or errored."""

    deposit: str
    convention: str
    source_id: str | None
    status: OutcomeStatus
    reason: str | None = None
    hooks: list[HookVerdict] = Field(default_factory=list)
    validated_at: datetime


def deposit_prefix(convention: str, deposit: str) -> str:
    return f"{convention}/{deposit}"


def pending_deposits(store: ArtifactStore, convention: str) -> list[str]:
    """Complete deposits (deposit.json written) without a result yet, by name."""
    return [
        name for name in _complete_without_result(store, convention) if DEPOSIT_NAME.fullmatch(name)
    ]


def _complete_without_result(store: ArtifactStore, convention: str) -> list[str]:
    """The folders of the convention holding deposit.json and no result.json."""
    complete, done = set(), set()
    for key in store.list_keys(convention):
        parts = key.split("/")
        if len(parts) == 3:
            if parts[2] == DEPOSIT_FILE:
                complete.add(parts[1])
            elif parts[2] == RESULT_FILE:
                done.add(parts[1])
    return sorted(complete - done)


def refuse_misnamed_deposits(store: ArtifactStore, convention: str) -> list[str]:
    """Write a result.json, saying why, into each complete deposit whose folder name cannot
    be a deposit's (spaces, other alphabets, a leading dot...): no deposit is ignored in
    silence. The names refused."""
    refused = []
    for folder in _complete_without_result(store, convention):
        if DEPOSIT_NAME.fullmatch(folder):
            continue
        result = DepositResult(
            deposit=folder,
            convention=convention,
            source_id=None,
            status=OutcomeStatus.REJECTED,
            reason=(
                f"malformed deposit: the folder name {folder!r} cannot name a deposit: use up "
                "to 100 ASCII letters, digits, '.', '_' and '-', starting with a letter or digit, "
                "and deposit again under that name"
            ),
            validated_at=datetime.now(UTC),
        )
        key = f"{deposit_prefix(convention, folder)}/{RESULT_FILE}"
        store.write_bytes(key, result.model_dump_json(indent=1).encode())
        refused.append(folder)
    return refused


def read_result(store: ArtifactStore, convention: str, deposit: str) -> DepositResult:
    key = f"{deposit_prefix(convention, deposit)}/{RESULT_FILE}"
    return DepositResult.model_validate_json(store.read_bytes(key))


def validate_deposit(
    convention: Convention,
    store: ArtifactStore,
    deposit: str,
    runner: Runner,
    capacity: HookCapacity | None = None,
) -> DepositResult:
    """Run the deposit through the convention's hooks and write its result.json; each
    attempt within `capacity` (the machine's slots and memory budget) when given."""
    if not DEPOSIT_NAME.fullmatch(deposit):
        raise ValueError(f"{deposit!r} is not a deposit name (letters, digits, '.', '_', '-')")
    prefix = deposit_prefix(convention.name, deposit)
    with tempfile.TemporaryDirectory(prefix="osa-deposit-") as tmp:
        result = _validate(convention, store, prefix, deposit, runner, capacity, Path(tmp))
    store.write_bytes(f"{prefix}/{RESULT_FILE}", result.model_dump_json(indent=1).encode())
    return result


def _validate(
    convention: Convention,
    store: ArtifactStore,
    prefix: str,
    deposit: str,
    runner: Runner,
    capacity: HookCapacity | None,
    work: Path,
) -> DepositResult:
    def malformed(reason: str, source_id: str | None = None) -> DepositResult:
        return DepositResult(
            deposit=deposit,
            convention=convention.name,
            source_id=source_id,
            status=OutcomeStatus.REJECTED,
            reason=f"malformed deposit: {reason}",
            validated_at=datetime.now(UTC),
        )

    with store.local_dir(prefix, writable=False) as folder:
        opened = _open_deposit(folder)
        if isinstance(opened, str):
            return malformed(opened)
        try:
            request = _read_request(opened)
            if isinstance(request, str):
                return malformed(request)
            source_id = request.source_id or deposit
            files_root = work / "files"
            record_dir = files_root / files_dir_for(source_id)
            record_dir.mkdir(parents=True)
            copied = _copy_files(opened, record_dir)
        finally:
            os.close(opened)
    if isinstance(copied, str):
        return malformed(copied, source_id)
    size = copied
    if size == 0:
        return malformed(f"no files (or only empty ones) under {FILES_DIR}/", source_id)

    record = HookRecord(
        id=HookRecordId(source_id),
        files_dir=files_dir_for(source_id),
        metadata=request.metadata,
        size_mb=bytes_to_mb(size),
    )
    verdicts: list[HookVerdict] = []
    for spec in convention.hooks:
        checkpoint = run_hook(
            spec,
            HookBatch(records=[record], files_root=files_root),
            runner,
            FileCheckpointIO(work / f"{spec.name}.checkpoint.json"),
            work / spec.name,
            capacity=capacity,
        )
        outcome = checkpoint.outcomes[source_id]
        verdicts.append(
            HookVerdict(
                hook=spec.name,
                status=outcome.status,
                reason=outcome.reason,
                features=outcome.features,
                attempts=[
                    AttemptSummary(
                        memory_limit_mb=a.memory_limit_mb,
                        peak_memory_mb=a.peak_memory_mb,
                        oom_killed=a.oom_killed,
                    )
                    for a in checkpoint.attempts
                ],
            )
        )
        if outcome.status is not OutcomeStatus.PASSED:
            break  # a record failing one hook is not published: the rest would be wasted
    failed = next((v for v in verdicts if v.status is not OutcomeStatus.PASSED), None)
    return DepositResult(
        deposit=deposit,
        convention=convention.name,
        source_id=source_id,
        status=failed.status if failed else OutcomeStatus.PASSED,
        reason=f"{failed.hook}: {failed.reason}" if failed else None,
        hooks=verdicts,
        validated_at=datetime.now(UTC),
    )


def _open_deposit(folder: Path) -> int | str:
    """The deposit's folder, opened; or why it cannot be read."""
    opened = open_folder(folder)
    if opened is None:
        return "the deposit's folder is gone"
    if isinstance(opened, str):
        return f"the deposit's folder is {opened}: deposit a folder, not a link to one"
    return opened


def _read_request(folder: int) -> DepositRequest | str:
    """deposit.json, read only if it is a regular file no larger than the cap; or why not."""
    request = open_regular(folder, DEPOSIT_FILE)
    if request is None:
        return f"{DEPOSIT_FILE} is gone"
    if isinstance(request, str):
        return f"{DEPOSIT_FILE} is {request}, not a regular file"
    with request:
        size = os.fstat(request.fileno()).st_size
        if size > MAX_REQUEST_BYTES:
            return (
                f"{DEPOSIT_FILE} is {bytes_to_mb(size):.1f} MB, over the "
                f"{bytes_to_mb(MAX_REQUEST_BYTES):.0f} MB it may be: put data in {FILES_DIR}/"
            )
        text = request.read(MAX_REQUEST_BYTES + 1)
    try:
        return DepositRequest.model_validate_json(text)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'the file'}: {e['msg']}" for e in error.errors()
        )
        return f"{DEPOSIT_FILE} is not valid ({problems})"


def _copy_files(folder: int, record_dir: Path) -> int | str:
    """Copy the regular files of `files/` into `record_dir`; their total size, or why the
    deposit is refused. Nothing is followed or opened that is not a regular file in files/
    itself: a symlink (to /etc/shadow, ~/.aws), a FIFO, a device, a linked files/."""
    files = open_folder(FILES_DIR, dir_fd=folder)
    if files is None:
        return 0
    if isinstance(files, str):
        return f"{FILES_DIR}/ is {files}: deposit the files themselves"
    size = 0
    try:
        for name in sorted(os.listdir(files)):  # noqa: PTH208 (a descriptor, not a path)
            if problem := file_name_error(name):
                return f"file name {name!r} {problem}"
            source = open_regular(files, name)
            if isinstance(source, str):
                return f"{FILES_DIR}/{name} is {source}: deposit regular files only"
            if source is None:
                continue  # removed while we read
            with source, (record_dir / name).open("wb") as target:
                shutil.copyfileobj(source, target)
                size += target.tell()
    finally:
        os.close(files)
    return size


def write_deposit(
    store: ArtifactStore,
    convention: str,
    deposit: str,
    files: dict[str, bytes],
    request: dict[str, Any] | str | None = None,
) -> None:
    """Deposit a record (what a depositor's upload does): files first, deposit.json last."""
    prefix = deposit_prefix(convention, deposit)
    for name, data in files.items():
        store.write_bytes(f"{prefix}/{FILES_DIR}/{name}", data)
    text = request if isinstance(request, str) else json.dumps(request or {})
    store.write_bytes(f"{prefix}/{DEPOSIT_FILE}", text.encode())
