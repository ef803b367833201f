"""Tables of the records database (SQLAlchemy 2, declarative with typed mappings)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Table,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# The longest upstream id a record may have (records.source_id).
MAX_SOURCE_ID_CHARS = 512


def source_id_error(source_id: str) -> str | None:
    """Why a record with this id cannot be published, or None if it can. The same rule for
    every database: PostgreSQL text holds no NUL, both store UTF-8 (which a lone surrogate
    escape is not), and the column has a length."""
    if "\x00" in source_id:
        return "contains NUL, which a records database cannot hold"
    if len(source_id) > MAX_SOURCE_ID_CHARS:
        return f"is {len(source_id)} characters long, over the {MAX_SOURCE_ID_CHARS} allowed"
    if not source_id.isascii():
        try:
            source_id.encode("utf-8")
        except UnicodeEncodeError:
            return "contains a lone surrogate escape, which is not Unicode text"
    return None


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON}


# records.status: a withdrawn record keeps its SRN and row but no longer counts as published.
PUBLISHED = "published"
WITHDRAWN = "withdrawn"


class Record(Base):
    """A published record. (convention, source_id) is unique: an upstream record is
    published once, whichever batch or ingest meets it first; a new upstream version of it
    revises the row in place (same SRN), and a hook that no longer passes it withdraws it."""

    __tablename__ = "records"
    __table_args__ = (UniqueConstraint("convention", "source_id", name="uq_records_source"),)

    srn: Mapped[str] = mapped_column(String(96), primary_key=True)
    convention: Mapped[str] = mapped_column(String(64), index=True)
    source_id: Mapped[str] = mapped_column(String(MAX_SOURCE_ID_CHARS))
    partition: Mapped[str] = mapped_column(String(255), index=True)
    record_metadata: Mapped[dict[str, Any]] = mapped_column("metadata")
    published_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    status: Mapped[str] = mapped_column(String(16), index=True, server_default=PUBLISHED)
    status_reason: Mapped[str | None] = mapped_column(String(1024))
    status_changed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    record_version: Mapped[str | None] = mapped_column(String(255))
    """The upstream version the row holds (a release, a revision date), if the source has one."""
    provenance: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    """Where the record came from and what judged it: see osa_dagster/records/lifecycle.py."""


class RecordEvent(Base):
    """One change of a published record: revised (a new upstream version), withdrawn or
    reinstated (a hook's verdict changed), superseded (upstream replaced it). The first
    publication is the record's own row (published_at, partition, provenance)."""

    __tablename__ = "record_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    srn: Mapped[str] = mapped_column(ForeignKey("records.srn"), index=True)
    event: Mapped[str] = mapped_column(String(16))
    record_version: Mapped[str | None] = mapped_column(String(255))
    reason: Mapped[str | None] = mapped_column(String(1024))
    partition: Mapped[str | None] = mapped_column(String(255))
    provenance: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


# The tables as Core statements take them (a mapped class's __table__ is typed a FromClause).
RECORDS = cast(Table, Record.__table__)
RECORD_EVENTS = cast(Table, RecordEvent.__table__)


class Feature(Base):
    """One feature row a hook produced for a published record, stored against its SRN."""

    __tablename__ = "features"
    __table_args__ = (UniqueConstraint("record_srn", "hook", "row_index", name="uq_features_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    record_srn: Mapped[str] = mapped_column(ForeignKey("records.srn"), index=True)
    hook: Mapped[str] = mapped_column(String(64))
    row_index: Mapped[int] = mapped_column(Integer)
    data: Mapped[dict[str, Any]]


class DeadLetter(Base):
    """A poison record: a hook ran out of memory on it alone at its cap. One row per record
    and hook, naming the batch to re-materialise once the hook's cap is raised."""

    __tablename__ = "dead_letters"
    __table_args__ = (
        UniqueConstraint("convention", "source_id", "hook", name="uq_dead_letters_record_hook"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    convention: Mapped[str] = mapped_column(String(64), index=True)
    source_id: Mapped[str] = mapped_column(String(MAX_SOURCE_ID_CHARS))
    hook: Mapped[str] = mapped_column(String(64))
    partition: Mapped[str] = mapped_column(String(255), index=True)
    size_mb: Mapped[float | None]
    limit_mb: Mapped[int]
    peak_mb: Mapped[float | None]
    reason: Mapped[str] = mapped_column(String(1024))
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class BatchLease(Base):
    """Which process works a batch now (osa_dagster/batch/lease.py). A row exists while a
    step holds the batch; taking it from a dead holder is an UPDATE conditional on the
    holder's token, so two takers cannot both win. Times are seconds since the epoch on
    the database's clock (PostgreSQL's, or this machine's for a SQLite file)."""

    __tablename__ = "batch_leases"

    convention: Mapped[str] = mapped_column(String(64), primary_key=True)
    batch: Mapped[str] = mapped_column(String(255), primary_key=True)
    token: Mapped[str] = mapped_column(String(32))
    run_id: Mapped[str | None] = mapped_column(String(64))
    step: Mapped[str] = mapped_column(String(255))
    holder: Mapped[dict[str, Any]]
    """The holding process: a ProcessIdentity (host, boot id, pid namespace, pid, start)."""
    acquired_at: Mapped[float] = mapped_column(Float)
    heartbeat_at: Mapped[float] = mapped_column(Float)
