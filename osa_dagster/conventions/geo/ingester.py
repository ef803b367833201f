"""Ingest GEO records from a local folder of SOFT files.

Every ``*.soft``, ``*.soft.gz``, ``*.txt`` and ``*.txt.gz`` file under the folder (at any
depth, so a copy of GEO's FTP layout works as well as a flat folder) is one record: a
series family file (GSE..._family.soft.gz), a dataset (GDS....soft.gz), a sample in GEO's
text form (GSM....txt.gz) or a platform. Its identity is the accession its first entity
line names, not its file name. The project bundles three real records (data/, see
data/SOURCES.md).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime
from pathlib import Path

from osa_sdk.authoring import FetchContext, Ingester, ingester
from osa_sdk.contract import bytes_to_mb
from osa_sdk.types import IngesterRecord, RecordRef
from pydantic import BaseModel, ConfigDict

from osa_dagster.conventions.geo.soft import (
    ACCESSION_PREFIXES,
    SOFT_SUFFIXES,
    SoftFormatError,
    first_record_entity,
    is_accession,
    read_entities,
)
from osa_dagster.conventions.geo.summary import KIND_OF_ENTITY, RecordKind, SummaryBuilder
from osa_dagster.conventions.local_files import file_of_ref

log = logging.getLogger(__name__)

DEFAULT_FOLDER = Path(__file__).resolve().parent / "data"
MAX_FILE_MB = 2000
"""Compressed. The hooks read SOFT in constant memory, so the limit only guards the disk of a
batch; the largest family files of GEO (thousands of samples) stay well below it."""

_KIND_OF_PREFIX = {prefix: KIND_OF_ENTITY[kind] for kind, prefix in ACCESSION_PREFIXES.items()}


class GeoRecordMetadata(BaseModel):
    """What fetch records about a GEO record; None or empty where the file does not say."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    accession: str
    kind: RecordKind
    title: str | None
    platforms: list[str]
    organisms: list[str]
    submission_date: date | None
    """None for datasets (GDS), which only carry the date of their last update."""
    sample_count: int
    source: str
    """Where the file came from: its path relative to the local folder, or its URL."""
    source_modified_at: datetime | None = None
    """The local file's modification time (what `discover(since=...)` compares), or the
    server's Last-Modified for a download; None when the server does not say."""


def accession_sort_key(accession: str) -> tuple[str, int, str]:
    """GSE9 before GSE10: by prefix, then by number."""
    prefix, digits = accession[:3], accession[3:]
    return (prefix, int(digits) if digits.isdigit() else -1, accession)


def kind_of_accession(accession: str) -> RecordKind:
    kind = _KIND_OF_PREFIX.get(accession[:3])
    if kind is None:
        raise ValueError(
            f"{accession!r} is not a GEO record accession (GSE, GDS, GSM or GPL and a number)"
        )
    return kind


def record_metadata(
    path: Path, accession: str, source: str, modified_at: datetime | None = None
) -> GeoRecordMetadata:
    """The record's metadata, read by streaming the file and keeping only its header lines.

    A damaged file ends the read early and keeps what came before the damage: the hooks
    reject the record with the reason, and the metadata says as much as could be read.
    """
    builder = SummaryBuilder()
    try:
        for entity in read_entities(path):
            builder.add(entity)
    except SoftFormatError as error:
        log.warning("%s: read stopped early (%s); its metadata may be incomplete", path, error)
    summary = builder.summary()
    if summary is None or summary.accession != accession:
        return GeoRecordMetadata(
            accession=accession,
            kind=kind_of_accession(accession),
            title=None,
            platforms=[],
            organisms=[],
            submission_date=None,
            sample_count=0,
            source=source,
            source_modified_at=modified_at,
        )
    return GeoRecordMetadata(
        accession=summary.accession,
        kind=summary.kind,
        title=summary.title,
        platforms=summary.platforms,
        organisms=summary.organisms,
        submission_date=summary.submission_date,
        sample_count=len(summary.samples),
        source=source,
        source_modified_at=modified_at,
    )


def soft_files(folder: Path) -> list[Path]:
    """SOFT files under `folder` in path order, hidden ones left out (partial downloads,
    rsync temporaries): the order decides which of two files of one accession is kept."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder of GEO SOFT files")
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [
            Path(root) / name
            for name in files
            if not name.startswith(".") and name.lower().endswith(SOFT_SUFFIXES)
        ]
    return sorted(found)


def _modified_at(path: Path) -> datetime:
    return datetime.fromtimestamp(path.stat().st_mtime, UTC)


@ingester(name="geo_folder", max_file_mb=MAX_FILE_MB)
class GeoFolderIngester(Ingester):
    """Records of a local folder of GEO SOFT files; `source_id` is the accession ("GSE781").

    `discover(since=...)` selects files by modification time, as the PDB mirror ingester
    does: a copy kept with ``rsync -t`` or ``wget -N`` carries GEO's own times, and GEO
    rewrites a record's SOFT file whenever the record changes. Each ref carries the file's
    path relative to the folder, so fetch needs no second walk.
    """

    def __init__(self, folder: str | Path = DEFAULT_FOLDER) -> None:
        super().__init__(folder=str(folder))
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"{self.folder} is not a folder of GEO SOFT files")

    def discover(self, since: datetime | None, limit: int | None) -> Iterator[RecordRef]:
        """Records in accession order whose file changed after `since` (naive means UTC).

        Files that are not SOFT records are skipped with their reason, and so is a file
        naming an accession that a file earlier in path order names too: the plan goes on
        with the rest.
        """
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be a number of records >= 0, not {limit}")
        if since is not None and since.tzinfo is None:
            since = since.replace(tzinfo=UTC)
        found: dict[str, tuple[Path, os.stat_result]] = {}
        for path in soft_files(self.folder):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue  # removed by a running sync since it was listed
            if since is not None and datetime.fromtimestamp(stat.st_mtime, UTC) <= since:
                continue
            where = path.relative_to(self.folder).as_posix()
            try:
                kind, accession = first_record_entity(path)
            except (SoftFormatError, OSError) as error:
                self.skip(where, f"not a readable GEO SOFT record: {error}")
                continue
            if not is_accession(kind, accession):
                self.skip(where, f"^{kind} = {accession} is not a GEO record")
                continue
            if accession in found:
                first = found[accession][0].relative_to(self.folder).as_posix()
                self.skip(where, f"{accession} is in {first} already, which is kept")
                continue
            found[accession] = (path, stat)
        for count, accession in enumerate(sorted(found, key=accession_sort_key)):
            if limit is not None and count >= limit:
                return
            path, stat = found[accession]
            yield RecordRef(
                source_id=accession,
                size_hint_mb=bytes_to_mb(stat.st_size),
                version=f"{stat.st_mtime_ns}:{stat.st_size}",
                extra={"path": path.relative_to(self.folder).as_posix()},
            )

    def fetch(self, refs: Sequence[RecordRef], ctx: FetchContext) -> Iterator[IngesterRecord]:
        """Copy each record's file as it is, and record its header as metadata."""
        root = self.folder.resolve()
        for ref in refs:
            accession = ref.source_id
            try:
                path = file_of_ref(root, ref)
            except ValueError as error:
                ctx.fail(accession, str(error))
                continue
            relative = str(ref.extra["path"])
            try:
                kind, found = first_record_entity(path)
            except FileNotFoundError:
                ctx.fail(accession, f"{accession}: {path} no longer exists")
                continue
            except SoftFormatError as error:
                ctx.fail(accession, f"{accession}: {path} is no longer a SOFT record ({error})")
                continue
            if found != accession:
                ctx.fail(accession, f"{path} now holds ^{kind} = {found}, not {accession}")
                continue
            metadata = record_metadata(path, accession, relative, _modified_at(path))
            file_ref = ctx.add_file(accession, path)
            yield IngesterRecord(
                source_id=accession, metadata=metadata.model_dump(mode="json"), files=[file_ref]
            )
