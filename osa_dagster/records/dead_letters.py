"""Dead letters: records a hook cannot process within its memory cap, kept per convention so
that a curator can see them and re-run their batches once the cap is raised."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Insert, delete, select
from sqlalchemy.dialects import postgresql, sqlite

from osa_dagster.records.database import RecordsDatabase
from osa_dagster.records.models import DeadLetter

_KEY = ["convention", "source_id", "hook"]
_UPDATED = ("partition", "size_mb", "limit_mb", "peak_mb", "reason", "recorded_at")


@dataclass(frozen=True)
class PoisonRecord:
    source_id: str
    hook: str
    size_mb: float | None
    limit_mb: int
    peak_mb: float | None
    reason: str


@dataclass(frozen=True)
class DeadLetterRow:
    convention: str
    source_id: str
    hook: str
    partition: str
    size_mb: float | None
    limit_mb: int
    peak_mb: float | None
    reason: str
    recorded_at: datetime


def _upsert(dialect: str) -> Insert:
    if dialect == "postgresql":
        pg = postgresql.insert(DeadLetter)
        return pg.on_conflict_do_update(
            index_elements=_KEY, set_={c: pg.excluded[c] for c in _UPDATED}
        )
    if dialect == "sqlite":
        lite = sqlite.insert(DeadLetter)
        return lite.on_conflict_do_update(
            index_elements=_KEY, set_={c: lite.excluded[c] for c in _UPDATED}
        )
    raise ValueError(f"the records database must be PostgreSQL or SQLite, not {dialect}")


def replace_dead_letters(
    db: RecordsDatabase, *, convention: str, partition: str, poison: Sequence[PoisonRecord]
) -> None:
    """Make the partition's dead letters exactly `poison`, in one transaction.

    Idempotent: a re-run writes the same rows; a record no longer poison (its cap was raised
    and it passed) loses its row; a record met again in another batch keeps one row, naming
    the latest batch.
    """
    recorded_at = datetime.now(UTC)
    values: list[dict[str, Any]] = [
        {
            "convention": convention,
            "source_id": p.source_id,
            "hook": p.hook,
            "partition": partition,
            "size_mb": p.size_mb,
            "limit_mb": p.limit_mb,
            "peak_mb": p.peak_mb,
            "reason": p.reason,
            "recorded_at": recorded_at,
        }
        for p in poison
    ]
    with db.session() as session, session.begin():
        session.execute(
            delete(DeadLetter).where(
                DeadLetter.convention == convention, DeadLetter.partition == partition
            )
        )
        if values:
            session.execute(_upsert(session.get_bind().dialect.name), values)


def list_dead_letters(
    db: RecordsDatabase, convention: str, *, partition: str | None = None
) -> list[DeadLetterRow]:
    """The convention's dead letters (or one batch's), by batch, then record, then hook."""
    query = (
        select(DeadLetter)
        .where(DeadLetter.convention == convention)
        .order_by(DeadLetter.partition, DeadLetter.source_id, DeadLetter.hook)
    )
    if partition is not None:
        query = query.where(DeadLetter.partition == partition)
    with db.session() as session:
        return [
            DeadLetterRow(
                convention=d.convention,
                source_id=d.source_id,
                hook=d.hook,
                partition=d.partition,
                size_mb=d.size_mb,
                limit_mb=d.limit_mb,
                peak_mb=d.peak_mb,
                reason=d.reason,
                recorded_at=d.recorded_at,
            )
            for d in session.scalars(query)
        ]
