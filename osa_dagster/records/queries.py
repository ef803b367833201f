"""Reading the records database: counts for metadata and summaries, listings for people."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from osa_dagster.records.database import RecordsDatabase
from osa_dagster.records.models import PUBLISHED, Feature, Record


def count_published(db: RecordsDatabase, convention: str) -> int:
    """Records that count as published: not those withdrawn."""
    with db.session() as session:
        query = (
            select(func.count())
            .select_from(Record)
            .where(Record.convention == convention, Record.status == PUBLISHED)
        )
        return session.scalar(query) or 0


def count_withdrawn(db: RecordsDatabase, convention: str) -> int:
    with db.session() as session:
        query = (
            select(func.count())
            .select_from(Record)
            .where(Record.convention == convention, Record.status != PUBLISHED)
        )
        return session.scalar(query) or 0


def count_feature_rows(db: RecordsDatabase, convention: str) -> int:
    with db.session() as session:
        query = (
            select(func.count())
            .select_from(Feature)
            .join(Record, Record.srn == Feature.record_srn)
            .where(Record.convention == convention, Record.status == PUBLISHED)
        )
        return session.scalar(query) or 0


@dataclass(frozen=True)
class PublishedRecord:
    srn: str
    convention: str
    source_id: str
    partition: str
    status: str
    """published, or withdrawn (then `status_reason` says why and `status_changed_at` when)."""
    status_reason: str | None
    status_changed_at: datetime | None
    record_version: str | None
    provenance: dict[str, Any] | None
    features: list[tuple[str, int, dict[str, Any]]]
    """(hook, row index, row), empty unless asked for."""


def published_records(
    db: RecordsDatabase, convention: str | None, limit: int, *, with_features: bool
) -> Iterator[PublishedRecord]:
    """Records ever published, withdrawn ones too, in (convention, source id) order,
    optionally with their features."""
    query = select(Record).order_by(Record.convention, Record.source_id).limit(limit)
    if convention:
        query = query.where(Record.convention == convention)
    with db.session() as session:
        for record in session.scalars(query).all():
            features: list[tuple[str, int, dict[str, Any]]] = []
            if with_features:
                rows = session.scalars(
                    select(Feature)
                    .where(Feature.record_srn == record.srn)
                    .order_by(Feature.hook, Feature.row_index)
                )
                features = [(f.hook, f.row_index, f.data) for f in rows]
            yield PublishedRecord(
                srn=record.srn,
                convention=record.convention,
                source_id=record.source_id,
                partition=record.partition,
                status=record.status,
                status_reason=record.status_reason,
                status_changed_at=record.status_changed_at,
                record_version=record.record_version,
                provenance=record.provenance,
                features=features,
            )


def published_in_partition(db: RecordsDatabase, convention: str, partition: str) -> dict[str, str]:
    """source id -> SRN of the records this partition published (and not withdrawn)."""
    with db.session() as session:
        rows = session.execute(
            select(Record.source_id, Record.srn).where(
                Record.convention == convention,
                Record.partition == partition,
                Record.status == PUBLISHED,
            )
        )
        return {source_id: srn for source_id, srn in rows}


@dataclass(frozen=True)
class HeldRecord:
    """A record as a partition holds it: its SRN, status and provenance."""

    srn: str
    status: str
    provenance: dict[str, Any] | None


def records_of_partition_by_status(
    db: RecordsDatabase, convention: str, partition: str
) -> dict[str, HeldRecord]:
    """source id -> every record this partition holds, withdrawn too."""
    with db.session() as session:
        rows = session.execute(
            select(Record.source_id, Record.srn, Record.status, Record.provenance).where(
                Record.convention == convention, Record.partition == partition
            )
        )
        return {
            source_id: HeldRecord(srn, status, provenance)
            for source_id, srn, status, provenance in rows
        }


def publication_counts(
    db: RecordsDatabase, convention: str, source_ids: list[str]
) -> dict[str, int]:
    """How many records each of these upstream ids has in the archive (should be 0 or 1)."""
    counts: dict[str, int] = {}
    with db.session() as session:
        for start in range(0, len(source_ids), 500):
            chunk = source_ids[start : start + 500]
            rows = session.execute(
                select(Record.source_id, func.count())
                .where(Record.convention == convention, Record.source_id.in_(chunk))
                .group_by(Record.source_id)
            )
            counts.update({source_id: n for source_id, n in rows})
    return counts


def srns_with_features(db: RecordsDatabase, hook: str, srns: list[str]) -> set[str]:
    """Those of these SRNs that have at least one feature row from `hook`."""
    found: set[str] = set()
    with db.session() as session:
        for start in range(0, len(srns), 500):
            chunk = srns[start : start + 500]
            found.update(
                session.scalars(
                    select(Feature.record_srn)
                    .where(Feature.hook == hook, Feature.record_srn.in_(chunk))
                    .distinct()
                )
            )
    return found


@dataclass(frozen=True)
class RecordOfBatch:
    """A published record as a batch published it: its metadata and every hook's features."""

    srn: str
    source_id: str
    metadata: dict[str, Any]
    features: dict[str, list[dict[str, Any]]]
    """hook -> its feature rows in order; a hook without rows for the record is absent."""


def records_of_partition(
    db: RecordsDatabase, convention: str, partition: str, *, chunk: int = 500
) -> Iterator[RecordOfBatch]:
    """The records `partition` published and not withdrawn, by source id, read `chunk` at a
    time (with their features) as they are consumed, so memory stays that of one chunk."""
    query = (
        select(Record)
        .where(
            Record.convention == convention,
            Record.partition == partition,
            Record.status == PUBLISHED,
        )
        .order_by(Record.source_id)
        .execution_options(yield_per=chunk)
    )
    with db.session() as session:
        for records in session.scalars(query).partitions():
            features: dict[str, dict[str, list[dict[str, Any]]]] = {}
            rows = session.scalars(
                select(Feature)
                .where(Feature.record_srn.in_([r.srn for r in records]))
                .order_by(Feature.record_srn, Feature.hook, Feature.row_index)
            )
            for row in rows:
                features.setdefault(row.record_srn, {}).setdefault(row.hook, []).append(row.data)
            for record in records:
                yield RecordOfBatch(
                    srn=record.srn,
                    source_id=record.source_id,
                    metadata=record.record_metadata,
                    features=features.get(record.srn, {}),
                )
