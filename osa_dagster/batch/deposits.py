"""Validating one record deposited by a person, with a convention's hooks and the same engine.

A deposit is a folder in the deposits store (a drop folder by default, an S3 prefix in
production; see storage.store.deposits_store):

    <convention>/<deposit>/files/...       the record's files
    <convention>/<deposit>/deposit.json    written last: {"source_id": ..., "metadata": {...}}
    <convention>/<deposit>/result.json     written here: what the depositor reads

`deposit.json` marks the deposit complete, so a half-uploaded one is never picked up. The
record runs through every hook as a batch of one, with the same memory ladder and OOM
escalation as a batch. A malformed deposit gets a result that says what is wrong with it.

A drop folder is written by depositors while the orchestrator (root, often) reads it, so
every read and write of a deposit goes through descriptors opened from the store's root
down without following a link: a deposit folder that is, or becomes, a symlink is never
read or written through. Its files are capped by their apparent size before anything is
copied, so a sparse file cannot turn into gigabytes of writes.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from osa_sdk.contract import BYTES_PER_MB, bytes_to_mb, file_name_error, files_dir_for
from osa_sdk.types import HookRecord, HookRecordId, OutcomeStatus
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from osa_dagster.atomic_files import write_atomically_at
from osa_dagster.conventions.base import Convention
from osa_dagster.engine import (
    AttemptOptions,
    FileCheckpointIO,
    HookBatch,
    HookCapacity,
    Runner,
    run_hook,
)
from osa_dagster.regular_files import copy_data, open_folder, open_folder_below, open_regular
from osa_dagster.settings import DEFAULT_DEPOSIT_MAX_MB
from osa_dagster.storage.store import ArtifactStore, FileSystemStore

DEPOSIT_FILE = "deposit.json"
RESULT_FILE = "result.json"
FILES_DIR = "files"
# deposit.json holds an id and metadata: anything larger is refused unread.
MAX_REQUEST_BYTES = 4 * BYTES_PER_MB
# A record's files are a few: past this many, a deposit is refused before its names are
# even all read (each file staged is an inode of the orchestrator's temporary folder).
MAX_DEPOSIT_FILES = 10_000
TOO_MANY_FILES = (
    f"{FILES_DIR}/ holds more than {MAX_DEPOSIT_FILES} files, the most a deposit may hold"
)
# Deposit names become Dagster partition keys and store keys: plain names only.
DEPOSIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
# The depositor reads result.json; the orchestrator may be root.
RESULT_MODE = 0o644


class ConventionFolderError(Exception):
    """A convention's folder in a drop folder that is not a folder (a symlink...): its
    deposits are not read, and the sensor says so on every tick rather than find none."""


class DepositRequest(BaseModel):
    """deposit.json: the record's id (default: the deposit's name) and its metadata."""

    model_config = ConfigDict(extra="forbid")

    source_id: str | None = Field(default=None, min_length=1)
    metadata: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class DepositCaps:
    """What a deposit's files may weigh, by their apparent size (st_size: a sparse file
    counts in full, since a hook reading it reads every byte): each at most `file_mb`,
    together at most `total_mb`."""

    file_mb: float
    total_mb: float

    @classmethod
    def of(cls, convention: Convention, total_mb: float) -> DepositCaps:
        """The convention's own cap on a file (its ingester's max_file_mb), within the
        deposit's."""
        per_file = convention.ingester.max_file_mb
        return cls(file_mb=min(per_file or total_mb, total_mb), total_mb=total_mb)

    def refusal(self, name: str, size: int, total: int) -> str | None:
        """Why a file of `size` bytes, bringing the deposit to `total`, is refused; None
        when it is within the caps."""
        if size > self.file_mb * BYTES_PER_MB:
            return (
                f"{FILES_DIR}/{name} is {bytes_to_mb(size):.1f} MB, over the {self.file_mb:g} MB "
                "a deposited file of this convention may be"
            )
        if total > self.total_mb * BYTES_PER_MB:
            return (
                f"the files reach {bytes_to_mb(total):.1f} MB with {FILES_DIR}/{name}, over the "
                f"{self.total_mb:g} MB a deposit may hold"
            )
        return None


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
    if isinstance(store, FileSystemStore):
        return _complete_in_folder(store, convention)
    complete, done = set(), set()
    for key in store.list_keys(convention):
        parts = key.split("/")
        if len(parts) == 3:
            if parts[2] == DEPOSIT_FILE:
                complete.add(parts[1])
            elif parts[2] == RESULT_FILE:
                done.add(parts[1])
    return sorted(complete - done)


def _complete_in_folder(store: FileSystemStore, convention: str) -> list[str]:
    """`_complete_without_result` in a drop folder, which is read one level down only: what
    a deposit holds besides (a million files, folders nested thousands deep) costs the
    sensor nothing and cannot make it fail. A linked deposit folder is not one; a
    deposit.json that is not a regular file is, to be refused with the reason."""
    convention_folder = _open_in_store(store, convention)
    if convention_folder is None:
        return []
    if isinstance(convention_folder, str):
        raise ConventionFolderError(
            f"{store.root}/{convention_folder}: deposits are read from a folder, never through "
            "a link; make it a folder"
        )
    pending = []
    try:
        for name in sorted(os.listdir(convention_folder)):  # noqa: PTH208 (a descriptor)
            deposit = open_folder(name, dir_fd=convention_folder)
            if not isinstance(deposit, int):
                continue
            try:
                if _entry_kind(deposit, DEPOSIT_FILE) not in (None, stat.S_IFDIR) and (
                    _entry_kind(deposit, RESULT_FILE) is None
                ):
                    pending.append(name)
            finally:
                os.close(deposit)
    finally:
        os.close(convention_folder)
    return pending


def _entry_kind(folder: int, name: str) -> int | None:
    """What `name` in `folder` is (stat.S_IFREG...), not following a link; None if nothing."""
    try:
        return stat.S_IFMT(os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return None


def refuse_misnamed_deposits(store: ArtifactStore, convention: str) -> list[str]:
    """Write a result.json, saying why, into each complete deposit whose folder name cannot
    be a deposit's (spaces, other alphabets, bytes that are not UTF-8, a leading dot...): no
    deposit is ignored in silence. The names refused."""
    refused = []
    for folder in _complete_without_result(store, convention):
        if DEPOSIT_NAME.fullmatch(folder):
            continue
        result = DepositResult(
            deposit=_escaped(folder),
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
        _write_result(store, convention, folder, result, validated=None)
        refused.append(folder)
    return refused


def _escaped(name: str) -> str:
    """A name read from a folder listing, its bytes that are not UTF-8 (which the listing
    decoded as surrogate escapes) shown as \\xNN: JSON cannot hold them."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def read_result(store: ArtifactStore, convention: str, deposit: str) -> DepositResult:
    key = f"{deposit_prefix(convention, deposit)}/{RESULT_FILE}"
    return DepositResult.model_validate_json(store.read_bytes(key))


def validate_deposit(
    convention: Convention,
    store: ArtifactStore,
    deposit: str,
    runner: Runner,
    capacity: HookCapacity | None = None,
    max_mb: float = DEFAULT_DEPOSIT_MAX_MB,
) -> DepositResult:
    """Run the deposit through the convention's hooks and write its result.json; each
    attempt within `capacity` (the machine's slots and memory budget) when given. The
    deposit's files may add up to `max_mb` (OSA_DEPOSIT_MAX_MB). The result is
    returned as written; a deposit whose folder was replaced while it was validated gets
    an errored one saying so, and none at all if a link now stands in its place."""
    if not DEPOSIT_NAME.fullmatch(deposit):
        raise ValueError(f"{deposit!r} is not a deposit name (letters, digits, '.', '_', '-')")
    caps = DepositCaps.of(convention, max_mb)
    prefix = deposit_prefix(convention.name, deposit)
    with tempfile.TemporaryDirectory(prefix="osa-deposit-") as tmp:
        work = Path(tmp)
        with _deposit_folder(store, prefix, caps) as folder:
            validated = _identity(folder) if isinstance(folder, int) else None
            staged = _stage(convention.name, deposit, folder, work / "files", caps)
        if isinstance(staged, DepositResult):
            result = staged
        else:
            result = _run_hooks(convention, deposit, staged, runner, capacity, work)
    return _write_result(store, convention.name, deposit, result, validated)


@contextmanager
def _deposit_folder(store: ArtifactStore, prefix: str, caps: DepositCaps) -> Iterator[int | str]:
    """The deposit's folder as a descriptor, or why it cannot be read. In a folder store it
    is opened step by step from the store's root without following a link; another store
    (S3, which has no links) stages a copy first, once the sizes it lists are within the
    caps."""
    with ExitStack() as stack:
        if isinstance(store, FileSystemStore):
            opened = _open_in_store(store, prefix)
        elif refusal := _listed_refusal(store.sizes(prefix), caps):
            yield refusal
            return
        else:
            opened = open_folder(stack.enter_context(store.local_dir(prefix, writable=False)))
        if isinstance(opened, int):
            stack.callback(os.close, opened)
            yield opened
        elif opened is None:
            yield "the deposit's folder is gone"
        else:
            yield f"{opened}: deposit a folder, not a link to one"


def _listed_refusal(sizes: dict[str, int], caps: DepositCaps) -> str | None:
    """Why a deposit is refused by the sizes its store lists, before anything is staged;
    None when nothing is too large. What is staged is held to the same caps again, should
    an object have grown in between."""
    request = sizes.get(DEPOSIT_FILE, 0)
    if request > MAX_REQUEST_BYTES:
        return _request_too_large(request)
    files = sorted(path for path in sizes if path.startswith(f"{FILES_DIR}/"))
    if len(files) > MAX_DEPOSIT_FILES:
        return TOO_MANY_FILES
    total = 0
    for path in files:
        total += sizes[path]
        if refusal := caps.refusal(path.removeprefix(f"{FILES_DIR}/"), sizes[path], total):
            return refusal
    return None


def _request_too_large(size: int) -> str:
    return (
        f"{DEPOSIT_FILE} is {bytes_to_mb(size):.1f} MB, over the "
        f"{bytes_to_mb(MAX_REQUEST_BYTES):.0f} MB it may be: put data in {FILES_DIR}/"
    )


def _open_in_store(store: FileSystemStore, prefix: str) -> int | str | None:
    # The store's root is the operator's to choose, a link included; below it, every folder
    # may be a depositor's.
    root = os.open(store.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return open_folder_below(root, prefix.split("/"))
    finally:
        os.close(root)


def _identity(folder: int) -> tuple[int, int]:
    info = os.fstat(folder)
    return info.st_dev, info.st_ino


def _write_result(
    store: ArtifactStore,
    convention: str,
    folder_name: str,
    result: DepositResult,
    validated: tuple[int, int] | None,
) -> DepositResult:
    """Write `result` as the deposit's result.json and return what was written. In a folder
    store the deposit's folder is opened again from the root without following a link: a
    folder that is not there as a folder (a symlink, gone) gets nothing, and the result
    returned says so if the folder was read (`validated`: which one) and changed since; one
    swapped for another folder gets a result saying so."""
    prefix = deposit_prefix(convention, folder_name)
    if not isinstance(store, FileSystemStore):
        store.write_bytes(f"{prefix}/{RESULT_FILE}", result.model_dump_json(indent=1).encode())
        return result
    folder = _open_in_store(store, prefix)
    if not isinstance(folder, int):
        if validated is None:
            return result  # never opened: its result already says why, and has no place
        now = "gone" if folder is None else folder
        reason = f"the deposit's folder changed while it was validated ({now}): no {RESULT_FILE}"
        return _errored(result, f"{reason} was written")
    try:
        if validated is not None and _identity(folder) != validated:
            result = _errored(
                result,
                "the deposit's folder was replaced by another while it was validated: "
                "deposit again under a new name",
            )
        write_atomically_at(
            folder, RESULT_FILE, result.model_dump_json(indent=1).encode(), mode=RESULT_MODE
        )
    finally:
        os.close(folder)
    return result


def _errored(result: DepositResult, reason: str) -> DepositResult:
    return result.model_copy(
        update={"status": OutcomeStatus.ERRORED, "reason": reason, "hooks": []}
    )


@dataclass(frozen=True)
class _StagedRecord:
    record: HookRecord
    files_root: Path


def _stage(
    convention: str, deposit: str, folder: int | str, files_root: Path, caps: DepositCaps
) -> _StagedRecord | DepositResult:
    """The deposit's record with its files copied under `files_root`; or the result that
    refuses it."""

    def malformed(reason: str, source_id: str | None = None) -> DepositResult:
        return DepositResult(
            deposit=deposit,
            convention=convention,
            source_id=source_id,
            status=OutcomeStatus.REJECTED,
            reason=f"malformed deposit: {reason}",
            validated_at=datetime.now(UTC),
        )

    if isinstance(folder, str):
        return malformed(folder)
    request = _read_request(folder)
    if isinstance(request, str):
        return malformed(request)
    source_id = request.source_id or deposit
    record_dir = files_root / files_dir_for(source_id)
    record_dir.mkdir(parents=True)
    size = _copy_files(folder, record_dir, caps)
    if isinstance(size, str):
        return malformed(size, source_id)
    if size == 0:
        return malformed(f"no files (or only empty ones) under {FILES_DIR}/", source_id)
    record = HookRecord(
        id=HookRecordId(source_id),
        files_dir=files_dir_for(source_id),
        metadata=request.metadata,
        size_mb=bytes_to_mb(size),
    )
    return _StagedRecord(record=record, files_root=files_root)


def _run_hooks(
    convention: Convention,
    deposit: str,
    staged: _StagedRecord,
    runner: Runner,
    capacity: HookCapacity | None,
    work: Path,
) -> DepositResult:
    source_id = staged.record.id
    verdicts: list[HookVerdict] = []
    for spec in convention.hooks:
        checkpoint = run_hook(
            spec,
            HookBatch(records=[staged.record], files_root=staged.files_root),
            runner,
            FileCheckpointIO(work / f"{spec.name}.checkpoint.json"),
            work / spec.name,
            AttemptOptions(capacity=capacity),
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


def _read_request(folder: int) -> DepositRequest | str:
    """deposit.json, read only if it is a regular file no larger than the cap and strict
    JSON (no NaN, no Infinity, no number too large for a float); or why not."""
    request = open_regular(folder, DEPOSIT_FILE)
    if request is None:
        return f"{DEPOSIT_FILE} is gone"
    if isinstance(request, str):
        return f"{DEPOSIT_FILE} is {request}, not a regular file"
    with request:
        size = os.fstat(request.fileno()).st_size
        if size > MAX_REQUEST_BYTES:
            return _request_too_large(size)
        text = request.read(MAX_REQUEST_BYTES + 1)
    try:
        loaded = json.loads(text.decode(), parse_constant=_NotJson, parse_float=_finite_float)
    except (ValueError, RecursionError) as error:  # UnicodeDecodeError is a ValueError
        return f"{DEPOSIT_FILE} is not valid JSON ({error})"
    if found := _first_not_json(loaded):
        where, what = found
        return f"{DEPOSIT_FILE} is not strict JSON: {what} at {where}"
    try:
        return DepositRequest.model_validate(loaded)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'the file'}: {e['msg']}" for e in error.errors()
        )
        return f"{DEPOSIT_FILE} is not valid ({problems})"


class _NotJson:
    """What Python's parser accepts and strict JSON does not: NaN, Infinity, a number that
    overflows a float; found by `_first_not_json`."""

    def __init__(self, text: str) -> None:
        self.text = text


def _finite_float(text: str) -> float | _NotJson:
    value = float(text)
    return value if math.isfinite(value) else _NotJson(text)


def _first_not_json(loaded: Any) -> tuple[str, str] | None:
    """The first value that strict JSON or Unicode text cannot hold: where it is
    ("metadata.resolution", "metadata.sizes[2]") and what it is; None if there is none."""
    pending: list[tuple[str, Any]] = [("", loaded)]
    while pending:
        where, value = pending.pop()
        if isinstance(value, _NotJson):
            return where or "the top level", f"{value.text} (not a finite number)"
        if isinstance(value, str) and not _is_unicode(value):
            return where or "the top level", "a lone surrogate escape (not Unicode text)"
        if isinstance(value, dict):
            if any(not _is_unicode(key) for key in value):
                return where or "the top level", "a key with a lone surrogate escape"
            pending.extend(
                (f"{where}.{key}" if where else key, item) for key, item in reversed(value.items())
            )
        elif isinstance(value, list):
            pending.extend((f"{where}[{i}]", item) for i, item in reversed(list(enumerate(value))))
    return None


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _copy_files(folder: int, record_dir: Path, caps: DepositCaps) -> int | str:
    """Copy the regular files of `files/` into `record_dir`; their total size, or why the
    deposit is refused. Nothing is followed or opened that is not a regular file in files/
    itself: a symlink (to /etc/shadow, ~/.aws), a FIFO, a device, a linked files/. Each
    file's size is held to `caps` before it is copied, and its holes stay holes."""
    files = open_folder(FILES_DIR, dir_fd=folder)
    if files is None:
        return 0
    if isinstance(files, str):
        return f"{FILES_DIR}/ is {files}: deposit the files themselves"
    total = 0
    try:
        names = _names(files)
        if names is None:
            return TOO_MANY_FILES
        for name in names:
            if problem := file_name_error(name):
                return f"file name {name!r} {problem}"
            source = open_regular(files, name)
            if isinstance(source, str):
                return f"{FILES_DIR}/{name} is {source}: deposit regular files only"
            if source is None:
                continue  # removed while we read
            with source:
                size = os.fstat(source.fileno()).st_size
                total += size
                if refusal := caps.refusal(name, size, total):
                    return refusal
                if not _copy_file(source.fileno(), size, record_dir / name):
                    return (
                        f"{FILES_DIR}/{name} changed while it was read: write every file "
                        f"before {DEPOSIT_FILE}, and leave them be"
                    )
    finally:
        os.close(files)
    return total


def _names(folder: int) -> list[str] | None:
    """The names in `folder`, sorted; None past MAX_DEPOSIT_FILES."""
    names: list[str] = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if len(names) == MAX_DEPOSIT_FILES:
                return None
            names.append(entry.name)
    return sorted(names)


def _copy_file(source: int, size: int, target: Path) -> bool:
    """Copy `size` bytes of `source` to `target`; False if the source's size changed."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        copied = copy_data(source, fd, size)
    finally:
        os.close(fd)
    return copied and os.fstat(source).st_size == size


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
