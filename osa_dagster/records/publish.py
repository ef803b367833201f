"""Publishing records and storing features: bulk, idempotent, in one transaction each."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Insert, delete, insert, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from osa_dagster.records.database import RecordsDatabase
from osa_dagster.records.models import Feature, Record

T = TypeVar("T")

# SQLite allows 32766 bound parameters per statement; stay well below for wide rows.
_CHUNK = 500


def make_srn(domain: str) -> str:
    return f"urn:osa:{domain}:rec:{uuid.uuid4()}"


@dataclass(frozen=True)
class RecordToPublish:
    source_id: str
    metadata: dict[str, Any]


@dataclass
class PublishResult:
    srns: dict[str, str] = field(default_factory=dict)
    """SRN of every record asked for, whether published now or before."""
    newly_published: int = 0
    already_published: int = 0


@dataclass(frozen=True)
class FeatureRows:
    record_srn: str
    rows: list[dict[str, Any]]


def _chunks(items: Sequence[T], size: int = _CHUNK) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _insert_ignoring_conflicts(session: Session, values: list[dict[str, Any]]) -> None:
    dialect = session.get_bind().dialect.name
    statement: Insert
    if dialect == "postgresql":
        statement = postgresql.insert(Record).on_conflict_do_nothing(
            index_elements=["convention", "source_id"]
        )
    elif dialect == "sqlite":
        statement = sqlite.insert(Record).on_conflict_do_nothing(
            index_elements=["convention", "source_id"]
        )
    else:
        raise ValueError(f"the records database must be PostgreSQL or SQLite, not {dialect}")
    session.execute(statement, values)


def _srns_in(session: Session, convention: str, source_ids: Sequence[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for chunk in _chunks(source_ids):
        rows = session.execute(
            select(Record.source_id, Record.srn).where(
                Record.convention == convention, Record.source_id.in_(chunk)
            )
        )
        found.update({source_id: srn for source_id, srn in rows})
    return found


def publish_records(
    db: RecordsDatabase,
    *,
    convention: str,
    domain: str,
    partition: str,
    records: Sequence[RecordToPublish],
) -> PublishResult:
    """Insert the records that are not yet published; return every record's SRN.

    Idempotent on (convention, source_id): re-running a partition, or meeting the same
    upstream record in a later batch, publishes nothing twice. The conflict clause makes
    this hold also when two runs publish the same records at once.
    """
    if not records:
        return PublishResult()
    source_ids = [r.source_id for r in records]
    published_at = datetime.now(UTC)
    with db.session() as session, session.begin():
        before = _srns_in(session, convention, source_ids)
        fresh: list[dict[str, Any]] = [
            {
                "srn": make_srn(domain),
                "convention": convention,
                "source_id": r.source_id,
                "partition": partition,
                "record_metadata": r.metadata,
                "published_at": published_at,
            }
            for r in records
            if r.source_id not in before
        ]
        for chunk in _chunks(fresh):
            _insert_ignoring_conflicts(session, list(chunk))
        srns = _srns_in(session, convention, source_ids)
    newly = sum(1 for r in fresh if srns.get(r["source_id"]) == r["srn"])
    return PublishResult(
        srns=srns, newly_published=newly, already_published=len(source_ids) - newly
    )


def store_features(db: RecordsDatabase, *, hook: str, features: Sequence[FeatureRows]) -> int:
    """Replace the hook's feature rows of these records; return the number of rows stored.

    Replacing (not appending) keeps a re-materialisation from duplicating rows.
    """
    srns = [f.record_srn for f in features]
    values = [
        {"record_srn": f.record_srn, "hook": hook, "row_index": index, "data": row}
        for f in features
        for index, row in enumerate(f.rows)
    ]
    with db.session() as session, session.begin():
        for chunk in _chunks(srns):
            session.execute(
                delete(Feature).where(Feature.hook == hook, Feature.record_srn.in_(chunk))
            )
        for rows in _chunks(values):
            session.execute(insert(Feature), list(rows))
    return len(values)


def find_srns(db: RecordsDatabase, convention: str, source_ids: Sequence[str]) -> dict[str, str]:
    """SRNs of those of these upstream ids that are published."""
    with db.session() as session:
        return _srns_in(session, convention, source_ids)
