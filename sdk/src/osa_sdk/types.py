"""Records, file references and outcomes, as they cross the boundary between processes."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, NewType

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from osa_sdk.contract import files_dir_for

HookRecordId = NewType("HookRecordId", str)


class OutcomeStatus(StrEnum):
    PASSED = "passed"
    REJECTED = "rejected"
    ERRORED = "errored"


class Obsolete(BaseModel):
    """Upstream declares a record obsolete (PDB's obsolete list, a retired accession)."""

    model_config = ConfigDict(frozen=True)

    superseded_by: tuple[str, ...] = ()
    """The source ids that replace it, where upstream names them."""


class RecordRef(BaseModel):
    """A cheap reference that `discover` yields: enough for `fetch` to get the record later.

    A ref marked `obsolete` is never fetched: planning withdraws the published record, with
    its successors as the reason. An ingester yields one only for records upstream lists as
    obsolete; a record simply no longer listed needs no ref (a full plan sees it is gone).
    """

    model_config = ConfigDict(frozen=True)

    source_id: str = Field(min_length=1)
    size_hint_mb: float | None = None
    version: str | None = None
    """Changes whenever the record changes upstream (a file's mtime and size, a revision
    date): a watcher tells a revised record from one it already planned. None: unknown."""
    extra: dict[str, Any] = Field(default_factory=dict)
    obsolete: Obsolete | None = None


class IngesterFileRef(BaseModel):
    """A file of a record, relative to the record's files folder.

    `path` is relative to the record's folder ``files/<files_dir_for(source_id)>/``; the
    SDK writes it equal to `name`. `size_mb` is in decimal megabytes (bytes / 10^6), is
    required, and is computed by the SDK from the bytes written (FetchContext.add_file /
    add_bytes / open_file, and again by run_ingest from the file on disk), never typed
    by hand.
    """

    name: str = Field(min_length=1)
    path: str = Field(min_length=1)
    size_mb: float = Field(ge=0)
    sha256: str | None = None
    """The file's SHA-256 (hex), from the bytes on disk after fetch; None in raw batches
    fetched before digests were recorded."""


class IngesterRecord(BaseModel):
    """One fetched record: a line of the raw batch's records.jsonl."""

    source_id: str = Field(min_length=1)
    metadata: dict[str, Any] = Field(default_factory=dict)
    files: list[IngesterFileRef] = Field(default_factory=list)
    fetched_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @property
    def files_dir(self) -> str:
        return files_dir_for(self.source_id)

    @property
    def size_mb(self) -> float:
        return sum(f.size_mb for f in self.files)


class HookRecord(BaseModel):
    """One line of a hook's $OSA_IN/records.jsonl.

    `files_dir` names the record's folder under $OSA_FILES; hooks must use it rather
    than deriving a folder from `id` themselves.
    """

    id: HookRecordId = Field(min_length=1)
    files_dir: str = Field(min_length=1)
    metadata: dict[str, Any] = Field(default_factory=dict)
    size_mb: float = Field(default=0.0, ge=0)

    _files_root: Path | None = PrivateAttr(default=None)

    @classmethod
    def from_ingested(cls, record: IngesterRecord) -> HookRecord:
        return cls(
            id=HookRecordId(record.source_id),
            files_dir=record.files_dir,
            metadata=record.metadata,
            size_mb=record.size_mb,
        )

    def bind_files_root(self, files_root: Path) -> HookRecord:
        self._files_root = files_root
        return self

    @property
    def files_path(self) -> Path:
        """The record's files folder; set by the runtime from $OSA_FILES."""
        if self._files_root is None:
            raise RuntimeError(f"record {self.id!r}: files root not bound ($OSA_FILES unset?)")
        return self._files_root / self.files_dir

    def file(self, name: str) -> Path:
        return self.files_path / name

    def files(self) -> list[Path]:
        if not self.files_path.is_dir():
            return []
        return sorted(p for p in self.files_path.iterdir() if p.is_file())


# Output lines of the contract ($OSA_OUT/*.jsonl).


class FeaturesLine(BaseModel):
    id: HookRecordId
    features: list[dict[str, Any]]

    def non_finite(self) -> str | None:
        """Where the features hold NaN or an infinity, e.g. "features[0].rmsd is NaN"; None
        when they hold none. JSON has no such numbers: stored, they would become a silent null.
        """
        return _non_finite(self.features, "features")


def _non_finite(value: Any, where: str) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        word = "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        return f"{where} is {word}"
    if isinstance(value, dict):
        items = ((f"{where}.{key}", item) for key, item in value.items())
    elif isinstance(value, list | tuple):
        items = ((f"{where}[{index}]", item) for index, item in enumerate(value))
    else:
        return None
    return next((found for path, item in items if (found := _non_finite(item, path))), None)


class RejectionLine(BaseModel):
    id: HookRecordId
    reason: str


class ErrorLine(BaseModel):
    id: HookRecordId
    error: str
    retryable: bool = False


class Reject(Exception):
    """Raised by a hook to reject the record it was given, with a reason a curator reads."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# Reports of the runtime.


class HookSummary(BaseModel):
    """How many records of one hook run got each outcome."""

    passed: int = 0
    rejected: int = 0
    errored: int = 0


class SkippedRecord(BaseModel):
    """A fetched record left out of the batch because one of its files is over max_file_mb."""

    source_id: str
    file_name: str
    size_mb: float


class SkippedSource(BaseModel):
    """A part of a source that discover left out (a file it cannot read, a second file of
    one record), and why: planning goes on without it and shows it with its reason."""

    where: str
    """The file (and line) left out, as the source names it."""
    reason: str


class FailedRef(BaseModel):
    """A ref that produced no record, and why."""

    source_id: str
    error: str


class IngestReport(BaseModel):
    """What one ingest did with its refs; written to ingest_report.json after records.jsonl.

    Every ref ends up in exactly one place: a line of records.jsonl (counted in
    `records`), `skipped_oversize`, `failed` (the ingester called ctx.fail) or `missing`
    (fetch neither returned nor failed it).
    """

    records: int = 0
    max_file_mb: float | None = None
    skipped_oversize: list[SkippedRecord] = Field(default_factory=list)
    failed: list[FailedRef] = Field(default_factory=list)
    missing: list[FailedRef] = Field(default_factory=list)
