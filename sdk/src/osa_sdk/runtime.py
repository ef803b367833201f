"""Run a hook over a batch folder, or an ingester over a list of refs, under the contract.

`python -m osa_sdk` (see __main__.py) is the command-line face of these two functions.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from osa_sdk.authoring import FetchContext, Hook, HookFunction, HookResult, Ingester
from osa_sdk.contract import (
    CONFIG_FILE,
    ERRORS_FILE,
    EXIT_MEMORY_ERROR,
    FEATURES_FILE,
    FILES_DIR,
    INGEST_REPORT_FILE,
    MAX_FEATURE_ROWS_PER_RECORD,
    MAX_OUTCOME_LINE_BYTES,
    RECORDS_FILE,
    REJECTIONS_FILE,
    bytes_to_mb,
    file_name_error,
    files_dir_for,
)
from osa_sdk.types import (
    ErrorLine,
    FailedRef,
    FeaturesLine,
    HookRecord,
    HookSummary,
    IngesterFileRef,
    IngesterRecord,
    IngestReport,
    OutcomeStatus,
    RecordRef,
    Reject,
    RejectionLine,
    SkippedRecord,
)

log = logging.getLogger("osa_sdk")

_OUTCOME_FILES = {
    OutcomeStatus.PASSED: FEATURES_FILE,
    OutcomeStatus.REJECTED: REJECTIONS_FILE,
    OutcomeStatus.ERRORED: ERRORS_FILE,
}


class ContractError(ValueError):
    """The input or the environment breaks the contract; nothing was processed."""


class IngestError(RuntimeError):
    """An ingester broke the rules of fetch; the batch it produced must not be used."""


class HookOutOfMemory(SystemExit):
    """A hook ran out of memory on `record_id`.

    A SystemExit, so that left uncaught it ends the process with EXIT_MEMORY_ERROR and the
    engine retries the records without an outcome with more memory.
    """

    def __init__(self, record_id: str) -> None:
        super().__init__(EXIT_MEMORY_ERROR)
        self.record_id = record_id


# Hooks


def run_hook(
    fn: Hook | HookFunction, in_dir: Path, out_dir: Path, files_root: Path, hook_name: str
) -> HookSummary:
    """Run a hook over every record of ``in_dir/records.jsonl``, in file order.

    Each record gets exactly one line in features.jsonl, rejections.jsonl or errors.jsonl
    of `out_dir`, written before the next record starts, so a kill loses at most the
    record in progress. An exception fails only its record. A MemoryError writes nothing
    for its record and raises HookOutOfMemory. The whole input is validated first: a bad
    line raises ContractError before any record is processed.
    """
    hook = fn if isinstance(fn, Hook) else Hook(fn, hook_name)
    records = read_jsonl(in_dir / RECORDS_FILE, HookRecord)
    _check_unique((r.id for r in records), in_dir / RECORDS_FILE)
    config = _read_config(in_dir / CONFIG_FILE)
    for record in records:
        record.bind_files_root(files_root)
    out_dir.mkdir(parents=True, exist_ok=True)

    counts = dict.fromkeys(OutcomeStatus, 0)
    # What is alive now (imported modules, the records) stays alive until the end. Frozen,
    # the collector skips it, so the full collection after each record costs what the
    # hook allocated rather than the whole interpreter (measured: 14 ms -> 0.01 ms).
    gc.collect()
    gc.freeze()
    try:
        with _OutcomeWriter(out_dir) as writer:
            for record in records:
                outcome = _run_one(hook, record, config)
                if outcome is None:
                    log.error(
                        "hook %s: out of memory on record %r; exiting with %d so that the "
                        "records left are retried with more memory",
                        hook_name,
                        record.id,
                        EXIT_MEMORY_ERROR,
                    )
                    raise HookOutOfMemory(record.id)
                status, line = outcome
                writer.write(status, line)
                counts[status] += 1
                # A hook's garbage (parsed structures, often in reference cycles) must not
                # add up to the peak memory of the next record.
                gc.collect()
    finally:
        gc.unfreeze()

    summary = HookSummary(
        passed=counts[OutcomeStatus.PASSED],
        rejected=counts[OutcomeStatus.REJECTED],
        errored=counts[OutcomeStatus.ERRORED],
    )
    log.info(
        "hook %s: %d passed, %d rejected, %d errored",
        hook_name,
        summary.passed,
        summary.rejected,
        summary.errored,
    )
    return summary


def _run_one(
    hook: Hook, record: HookRecord, config: dict[str, Any]
) -> tuple[OutcomeStatus, bytes] | None:
    """The outcome of one record as a status and a serialised line; None when out of memory."""
    try:
        result = hook(record, config=config) if hook.accepts_config else hook(record)
        line = FeaturesLine(id=record.id, features=_feature_rows(result))
        if (non_finite := line.non_finite()) is not None:
            raise ValueError(f"{non_finite}: JSON has no NaN or Infinity; use None or a string")
        return OutcomeStatus.PASSED, _within_caps(_serialise(line), len(line.features))
    except Reject as rejection:
        reason = RejectionLine(id=record.id, reason=_as_curators_read(rejection.reason, record))
        return OutcomeStatus.REJECTED, _serialise(reason)
    except MemoryError:
        pass
    except Exception as exc:
        log.warning("hook %s: record %r errored", hook.name, record.id, exc_info=True)
        text = _as_curators_read(f"{type(exc).__name__}: {exc}", record)
        error = ErrorLine(id=record.id, error=text, retryable=False)
        return OutcomeStatus.ERRORED, _serialise(error)
    # Only a MemoryError gets here. Returning outside its except block drops the traceback,
    # and with it the frames that hold the hook's memory, before anything else runs.
    return None


def _as_curators_read(reason: object, record: HookRecord) -> str:
    """A reason with the record's files named as the record names them: a parser's message
    often holds the path where this attempt found the file, which says nothing to a curator
    and tells where the archive keeps its data."""
    folder = str(record.files_path)
    return str(reason).replace(folder + os.sep, "").replace(folder, ".")


def _feature_rows(result: HookResult) -> list[dict[str, Any]]:
    if result is None:
        return []
    if isinstance(result, dict):
        return [result]
    if isinstance(result, list) and all(isinstance(row, dict) for row in result):
        return result
    raise TypeError(f"a hook returns None, a dict or a list of dicts, not {type(result).__name__}")


def _within_caps(serialised: bytes, rows: int) -> bytes:
    """A features line the engine will take, or ValueError naming the cap it is over: said
    here, with the hook's own traceback, rather than as a refusal by the engine."""
    if rows > MAX_FEATURE_ROWS_PER_RECORD:
        raise ValueError(
            f"{rows} feature rows: the engine takes at most {MAX_FEATURE_ROWS_PER_RECORD} per "
            "record; write larger results to a file"
        )
    if len(serialised) > MAX_OUTCOME_LINE_BYTES:
        raise ValueError(
            f"features of {bytes_to_mb(len(serialised)):.1f} MB as JSON: the engine takes at "
            f"most {bytes_to_mb(MAX_OUTCOME_LINE_BYTES):.1f} MB per record; write larger "
            "results to a file"
        )
    return serialised


def _serialise(line: FeaturesLine | RejectionLine | ErrorLine) -> bytes:
    # Inside the record's try block: features that are not JSON make the record errored.
    return (line.model_dump_json() + "\n").encode("utf-8")


class _OutcomeWriter:
    """Appends outcome lines to the three output files.

    Each line goes to the kernel in one unbuffered write() before the next record starts:
    the page cache survives the death of this process (SIGKILL, OOM kill), so no flush
    can be forgotten and a line is either whole or absent. No fsync: it only protects
    against a crash of the whole machine, after which the engine reruns the records
    without an outcome anyway.
    """

    def __init__(self, out_dir: Path) -> None:
        self._fds: dict[OutcomeStatus, int] = {}
        for status, name in _OUTCOME_FILES.items():
            path = out_dir / name
            _drop_torn_tail(path)
            self._fds[status] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, status: OutcomeStatus, line: bytes) -> None:
        view = memoryview(line)
        while view:
            written = os.write(self._fds[status], view)
            view = view[written:]

    def __enter__(self) -> _OutcomeWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for fd in self._fds.values():
            os.close(fd)


def _drop_torn_tail(path: Path) -> None:
    """Cut a last line that has no newline: a write cut short by a kill, with no outcome."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        f.truncate(f.read().rfind(b"\n") + 1)


def _read_config(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ContractError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ContractError(f"{path} must hold a JSON object, not {type(config).__name__}")
    return config


# Ingesters


def run_ingest(ingester: Ingester, refs: Sequence[RecordRef], out_dir: Path) -> IngestReport:
    """Fetch `refs` into `out_dir`: records.jsonl, files/<files_dir>/..., ingest_report.json.

    Every ref ends up in exactly one place of the report (see IngestReport), and
    ``files/`` holds exactly the files listed in records.jsonl: records with a file over
    the ingester's max_file_mb are dropped with their files, as are the files of refs
    that failed or went missing. An ingester that returns a record it was not asked for,
    returns one twice, or lists a file it did not write raises IngestError; the report
    is written last, so a folder without one holds no usable batch.
    """
    ids = [ref.source_id for ref in refs]
    _check_unique(ids, "the refs")
    records_path, files_root, report_path = (
        out_dir / RECORDS_FILE,
        out_dir / FILES_DIR,
        out_dir / INGEST_REPORT_FILE,
    )
    leftovers = [p.name for p in (records_path, files_root, report_path) if p.exists()]
    if leftovers:
        raise IngestError(
            f"{out_dir} already holds an ingest ({', '.join(leftovers)}); "
            "give every ingest an empty folder"
        )
    out_dir.mkdir(parents=True, exist_ok=True)

    max_mb = ingester.max_file_mb
    ctx = FetchContext(files_root, max_mb, ids)
    report = IngestReport(max_file_mb=max_mb)
    expected, returned = set(ids), set[str]()
    kept: dict[str, set[str]] = {}  # files_dir -> file paths of every record written
    with records_path.open("w", encoding="utf-8") as out:
        for fetched in ingester.fetch(refs, ctx):
            record = _checked(fetched, expected, returned, files_root)
            returned.add(record.source_id)
            biggest = max(record.files, key=lambda f: f.size_mb, default=None)
            if max_mb is not None and biggest is not None and biggest.size_mb > max_mb:
                shutil.rmtree(files_root / record.files_dir)
                report.skipped_oversize.append(
                    SkippedRecord(
                        source_id=record.source_id,
                        file_name=biggest.name,
                        size_mb=biggest.size_mb,
                    )
                )
                log.warning(
                    "record %r skipped: file %r is %s MB, over max_file_mb %s",
                    record.source_id,
                    biggest.name,
                    biggest.size_mb,
                    max_mb,
                )
                continue
            out.write(record.model_dump_json() + "\n")
            out.flush()
            kept[record.files_dir] = {f.path for f in record.files}

    failures = ctx.failures
    both = [sid for sid in ids if sid in failures and sid in returned]
    if both:
        raise IngestError(
            f"record {both[0]!r} was returned by fetch and also reported failed with ctx.fail"
        )
    report.records = len(kept)
    report.failed = [FailedRef(source_id=s, error=failures[s]) for s in ids if s in failures]
    report.missing = [
        FailedRef(source_id=s, error="not returned by fetch")
        for s in ids
        if s not in returned and s not in failures
    ]
    for lost in (*report.failed, *report.missing):
        shutil.rmtree(files_root / files_dir_for(lost.source_id), ignore_errors=True)
    _check_no_stray_files(files_root, kept)

    partial = report_path.with_name(f".{report_path.name}.partial")
    partial.write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")
    partial.replace(report_path)
    return report


def _checked(
    record: object, expected: set[str], returned: set[str], files_root: Path
) -> IngesterRecord:
    """The record with sizes measured on disk, or IngestError naming what is wrong with it."""
    if not isinstance(record, IngesterRecord):
        raise IngestError(f"fetch must yield IngesterRecord objects, not {type(record).__name__}")
    sid = record.source_id
    if sid not in expected:
        raise IngestError(f"fetch returned record {sid!r}, which is not one of its refs")
    if sid in returned:
        raise IngestError(f"fetch returned record {sid!r} twice")
    measured: list[IngesterFileRef] = []
    for file in record.files:
        problem = file_name_error(file.path)
        if problem is not None:
            raise IngestError(f"record {sid!r}: file path {file.path!r} {problem}")
        if any(m.path == file.path for m in measured):
            raise IngestError(f"record {sid!r} lists the file {file.path!r} twice")
        on_disk = files_root / record.files_dir / file.path
        if not on_disk.is_file():
            raise IngestError(
                f"record {sid!r}: file {file.name!r} does not exist at {on_disk}; "
                "write files with ctx.add_file, add_bytes or open_file"
            )
        # Sizes decide what is skipped: trust the bytes on disk, not the declaration. The
        # digest is the file's provenance: what every judgement of the record was made on.
        with on_disk.open("rb") as content:
            sha256 = hashlib.file_digest(content, "sha256").hexdigest()
        measured.append(
            file.model_copy(
                update={"size_mb": bytes_to_mb(on_disk.stat().st_size), "sha256": sha256}
            )
        )
    return record.model_copy(update={"files": measured})


def _check_no_stray_files(files_root: Path, kept: dict[str, set[str]]) -> None:
    # Hooks see whole record folders: a file nobody listed would reach them unmeasured.
    if not files_root.exists():
        return
    for folder in sorted(files_root.iterdir()):
        allowed = kept.get(folder.name)
        if allowed is None:
            raise IngestError(
                f"{folder} belongs to no record of records.jsonl; write files only with "
                "the FetchContext, for records that fetch returns"
            )
        stray = sorted(p.name for p in folder.iterdir() if p.name not in allowed)
        if stray:
            raise IngestError(
                f"{folder} holds files that its record does not list: {', '.join(stray)}"
            )


# Shared


_Model = TypeVar("_Model", bound=BaseModel)


def read_jsonl(path: Path, model: type[_Model]) -> list[_Model]:
    """Every line of a JSON-lines file as `model`; ContractError naming the first bad line."""
    if not path.is_file():
        raise ContractError(f"{path} does not exist")
    items: list[_Model] = []
    with path.open("rb") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                items.append(model.model_validate_json(line))
            except ValidationError as exc:
                raise ContractError(
                    f"{path} line {number} is not a valid {model.__name__}: {exc}"
                ) from None
    return items


def _check_unique(ids: Iterable[str], where: object) -> None:
    seen: set[str] = set()
    for source_id in ids:
        if source_id in seen:
            raise ContractError(f"{where}: record id {source_id!r} appears twice")
        seen.add(source_id)
