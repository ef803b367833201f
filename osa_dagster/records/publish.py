"""Publishing records and storing features: bulk, idempotent, in one transaction each.

Both writes send the driver rows built as plain tuples, under SQLAlchemy's transaction:
per-row work in Python (ORM objects, bound-parameter processing, a statement per 500 rows)
cost PostgreSQL publishing eight times a raw COPY of the same rows. PostgreSQL gets the
rows by COPY, SQLite by one prepared executemany; bench/publish_throughput.py measures
both against those floors."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import itemgetter
from typing import Any

from sqlalchemy import ColumnElement, Connection, bindparam, func, insert, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import Session

from osa_dagster.records.database import RecordsDatabase
from osa_dagster.records.models import (
    PUBLISHED,
    RECORD_EVENTS,
    RECORDS,
    Feature,
    Record,
    source_id_error,
)

_COLUMNS = (
    "srn, convention, source_id, partition, metadata, published_at, record_version, provenance"
)
# PostgreSQL's SQLSTATE of a unique violation.
_UNIQUE_VIOLATION = "23505"


class UnpublishableRecord(ValueError):
    """A record the records database cannot hold; the one-line message names it and why."""


def make_srns(domain: str, count: int) -> list[str]:
    """`count` fresh SRNs, `urn:osa:<domain>:rec:<random version-4 UUID>`.

    The UUIDs are cut from one read of the system's random source: uuid.uuid4() reads it
    once per call, four times as slow, the largest part of a publish's time in Python.
    """
    digits = os.urandom(16 * count).hex()
    srns = []
    for start in range(0, 32 * count, 32):
        h = digits[start : start + 32]
        # Version 4 in the 13th digit, the RFC 4122 variant (10xx) in the 17th.
        variant = "89ab"[int(h[16], 16) & 3]
        srns.append(
            f"urn:osa:{domain}:rec:{h[:8]}-{h[8:12]}-4{h[13:16]}-{variant}{h[17:20]}-{h[20:]}"
        )
    return srns


@dataclass(frozen=True)
class RecordToPublish:
    source_id: str
    metadata: dict[str, Any]
    record_version: str | None = None
    """The upstream version (release, revision date); a record published at another one is
    revised in place. None claims no version: a published record is then left as it is."""
    provenance: dict[str, Any] | None = None


@dataclass
class PublishResult:
    srns: dict[str, str] = field(default_factory=dict)
    """SRN of every record asked for, whether published now or before."""
    newly_published: int = 0
    already_published: int = 0
    """Published before at the same version (or with none given): left as they were."""
    revised: int = 0
    """Published before at another version: now hold this one, under the same SRN."""


@dataclass(frozen=True)
class FeatureRows:
    record_srn: str
    rows: list[dict[str, Any]]


def _stored_form(session: Session, column: ColumnElement[Any]) -> Callable[[Any], Any]:
    """What SQLAlchemy would send the driver for a value of this column (for JSON, the
    engine's serializer; for a SQLite time, its text form)."""
    dialect = session.get_bind().dialect
    processor = column.type.dialect_impl(dialect).bind_processor(dialect)
    return processor or (lambda value: value)


def _copy_csv(
    connection: Connection,
    table: str,
    columns: str,
    rows: list[tuple[Any, ...]],
    *,
    nullable: str = "",
) -> None:
    """COPY the rows into the table as CSV, which Python's csv module writes in C. Every
    field is quoted: then a tab, newline, carriage return, quote or backslash is plain data,
    and an empty string is not read as NULL (an unquoted empty field is), except in the
    `nullable` columns, where None (written as an empty field) is NULL.

    COPY is the one call made on the driver's own cursor. Its errors are made what
    SQLAlchemy makes of any other: a DBAPIError, and a lost connection invalidated (rolling
    back on it would fail, and that error would hide the cause).
    """
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n", quoting=csv.QUOTE_ALL).writerows(rows)
    buffer.seek(0)
    force_null = f", FORCE_NULL ({nullable})" if nullable else ""
    statement = f"COPY {table} ({columns}) FROM STDIN WITH (FORMAT csv{force_null})"
    dialect = connection.dialect
    driver_connection = connection.connection.dbapi_connection
    try:
        with driver_connection.cursor() as cursor:  # type: ignore[union-attr]
            cursor.copy_expert(statement, buffer)
    except dialect.loaded_dbapi.Error as error:
        lost = dialect.is_disconnect(error, driver_connection, None)
        if lost:
            connection.invalidate(error)
        raise DBAPIError.instance(
            statement,
            None,
            error,
            dialect.loaded_dbapi.Error,
            connection_invalidated=lost,
            dialect=dialect,
        ) from error


def one_of_json(dialect: str, column: str, parameter: str) -> str:
    """SQL: `column` is one of the JSON list of strings bound to `parameter`. One statement
    and one parameter, whatever the number of values (SQLite binds at most 32766, and a
    PostgreSQL array of 100,000 strings took six times as long to send as their JSON)."""
    if dialect == "postgresql":
        return f"{column} IN (SELECT json_array_elements_text(CAST(:{parameter} AS json)))"
    return f"{column} IN (SELECT value FROM json_each(:{parameter}))"


def _srns_in(session: Session, convention: str, source_ids: Sequence[str]) -> dict[str, str]:
    dialect = session.get_bind().dialect.name
    rows = session.execute(
        text(
            "SELECT source_id, srn FROM records WHERE convention = :convention AND "
            + one_of_json(dialect, "source_id", "source_ids")
        ),
        {"convention": convention, "source_ids": json.dumps(list(source_ids))},
    )
    return {source_id: srn for source_id, srn in rows}


def _published_versions(
    session: Session, convention: str, source_ids: Sequence[str]
) -> dict[str, tuple[str, str | None]]:
    """source id -> (SRN, upstream version held) of those of these ids that are published."""
    dialect = session.get_bind().dialect.name
    rows = session.execute(
        text(
            "SELECT source_id, srn, record_version FROM records WHERE convention = :convention"
            " AND " + one_of_json(dialect, "source_id", "source_ids")
        ),
        {"convention": convention, "source_ids": json.dumps(list(source_ids))},
    )
    return {source_id: (srn, version) for source_id, srn, version in rows}


def _check_publishable(convention: str, records: Sequence[RecordToPublish]) -> None:
    for record in records:
        if (problem := source_id_error(record.source_id)) is not None:
            raise UnpublishableRecord(
                f"record {record.source_id!r} of convention {convention!r} cannot be "
                f"published: its id {problem}"
            )


# (srn, source_id, metadata JSON, record_version, provenance JSON) as sent to the driver.
_Row = tuple[str, str, str, str | None, str | None]


def _insert_postgresql(
    session: Session,
    convention: str,
    partition: str,
    published_at: datetime,
    rows: list[_Row],
) -> dict[str, str] | None:
    """Insert (srn, source_id, metadata, record_version, provenance) rows whose source id
    was not published when looked up; return every row's SRN, or None when all were
    inserted (each keeps its own SRN).

    The rows go by COPY straight into records, the fastest way PostgreSQL has. Should
    another run have published one of them since the look-up (a unique violation, after
    waiting for that run to end), the COPY is undone to a savepoint and the rows go by COPY
    into a temporary table (not WAL-logged, dropped at commit), then in one INSERT ...
    SELECT whose ON CONFLICT skips those ids. Both ways insert in the byte order of the
    source ids (Python's order of str, and PostgreSQL's "C" collation): every publisher
    then locks the ids it shares with another in the same order, so two overlapping
    batches cannot deadlock.
    """
    rows.sort(key=itemgetter(1))
    at = published_at.isoformat()
    try:
        with session.begin_nested():
            _copy_csv(
                session.connection(),
                "records",
                _COLUMNS,
                [
                    (srn, convention, source_id, partition, metadata, at, version, provenance)
                    for srn, source_id, metadata, version, provenance in rows
                ],
                nullable="record_version, provenance",
            )
        return None
    except IntegrityError as error:
        if getattr(error.orig, "pgcode", None) != _UNIQUE_VIOLATION:
            raise
    connection = session.connection()
    connection.exec_driver_sql(
        "CREATE TEMPORARY TABLE publish_staging (srn text, source_id text, metadata json,"
        " record_version text, provenance json) ON COMMIT DROP"
    )
    _copy_csv(
        connection,
        "publish_staging",
        "srn, source_id, metadata, record_version, provenance",
        rows,
        nullable="record_version, provenance",
    )
    connection.exec_driver_sql(
        f"INSERT INTO records ({_COLUMNS}) SELECT srn, %(convention)s, source_id,"
        " %(partition)s, metadata, %(published_at)s, record_version, provenance"
        ' FROM publish_staging ORDER BY source_id COLLATE "C"'
        " ON CONFLICT (convention, source_id) DO NOTHING",
        {"convention": convention, "partition": partition, "published_at": published_at},
    )
    stored = connection.exec_driver_sql(
        "SELECT r.source_id, r.srn FROM publish_staging s JOIN records r"
        " ON r.convention = %(convention)s AND r.source_id = s.source_id",
        {"convention": convention},
    )
    return {source_id: srn for source_id, srn in stored}


def _insert_sqlite(
    session: Session,
    convention: str,
    partition: str,
    published_at: datetime,
    rows: list[_Row],
) -> dict[str, str] | None:
    """As `_insert_postgresql`, by one prepared INSERT run over all rows. SQLite has one
    writer at a time: the insert takes the write lock (waiting up to the busy timeout), so
    no order of rows matters."""
    at = _stored_form(session, Record.__table__.c.published_at)(published_at)
    inserted = session.connection().exec_driver_sql(
        f"INSERT INTO records ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (convention, source_id) DO NOTHING",
        [
            (srn, convention, source_id, partition, metadata, at, version, provenance)
            for srn, source_id, metadata, version, provenance in rows
        ],
    )
    if inserted.rowcount == len(rows):
        return None
    return _srns_in(session, convention, [row[1] for row in rows])


def _superseded_versions(session: Session, srns: Sequence[str]) -> dict[str, set[str | None]]:
    """SRN -> the versions each of these records held and had replaced by a later one."""
    if not srns:
        return {}
    dialect = session.get_bind().dialect.name
    rows = session.execute(
        text(
            "SELECT srn, record_version FROM record_events WHERE event = 'superseded' AND "
            + one_of_json(dialect, "srn", "srns")
        ),
        {"srns": json.dumps(list(srns))},
    )
    superseded: dict[str, set[str | None]] = {}
    for srn, version in rows:
        superseded.setdefault(srn, set()).add(version)
    return superseded


def _revise(
    session: Session,
    partition: str,
    at: datetime,
    revisions: Sequence[tuple[str, str | None, RecordToPublish]],
) -> int:
    """Give published records, as (SRN, version held, record), the record's version,
    metadata and provenance under the same SRN, each with a 'superseded' event for the
    version it held and a 'revised' one for the new; return how many changed. A record
    withdrawn by a hook is published again: the new version passed the hooks. A row another
    publisher revised meanwhile (it no longer holds the version read) is left to that one.

    A version the record held before and was superseded is never put back: re-running an
    old batch (a backfill of every partition) must not undo a revision that a later batch
    published. Revisions are few next to first publications: one UPDATE each, whose row
    count tells whether it applied."""
    superseded = _superseded_versions(session, [srn for srn, _, _ in revisions])
    revisions = [
        revision
        for revision in revisions
        if revision[2].record_version not in superseded.get(revision[0], ())
    ]
    records = RECORDS.c
    revise = (
        update(RECORDS)
        .where(
            records.srn == bindparam("b_srn"),
            func.coalesce(records.record_version, "") == bindparam("b_held"),
        )
        .values(
            {
                records.metadata: bindparam("b_metadata"),
                records.record_version: bindparam("b_version"),
                records.provenance: bindparam("b_provenance"),
                records.partition: partition,
                records.status: PUBLISHED,
                records.status_reason: None,
                records.status_changed_at: at,
            }
        )
    )
    events: list[dict[str, Any]] = []
    revised = 0
    for srn, held, record in revisions:
        changed = (
            session.connection()
            .execute(
                revise,
                {
                    "b_srn": srn,
                    "b_held": held or "",
                    "b_metadata": record.metadata,
                    "b_version": record.record_version,
                    "b_provenance": record.provenance,
                },
            )
            .rowcount
        )
        if changed:
            revised += 1
            events.append(
                {
                    "srn": srn,
                    "event": "superseded",
                    "record_version": held,
                    "reason": f"replaced by version {record.record_version}",
                    "partition": partition,
                    "provenance": None,
                    "at": at,
                }
            )
            events.append(
                {
                    "srn": srn,
                    "event": "revised",
                    "record_version": record.record_version,
                    "reason": f"version {record.record_version} replaces {held or 'unrecorded'}",
                    "partition": partition,
                    "provenance": record.provenance,
                    "at": at,
                }
            )
    if events:
        session.execute(insert(RECORD_EVENTS), events)
    return revised


def publish_records(
    db: RecordsDatabase,
    *,
    convention: str,
    domain: str,
    partition: str,
    records: Sequence[RecordToPublish],
) -> PublishResult:
    """Insert the records that are not yet published, revise those published at another
    upstream version; return every record's SRN.

    Idempotent on (convention, source_id, record_version): re-running a partition, or
    meeting the same upstream record in a later batch, publishes nothing twice. The unique
    constraint, and the conflict clause of the insert that follows a collision, make this
    hold also when two runs publish the same records at once. A record
    given with a version other than the one its published row holds is revised in place
    (same SRN; see `_revise`): the caller gives the newest version it knows. A record whose
    id the database cannot hold (see `source_id_error`) fails the call before anything is
    written.
    """
    if not records:
        return PublishResult()
    _check_publishable(convention, records)
    published_at = datetime.now(UTC)
    with db.session() as session, session.begin():
        dialect = session.get_bind().dialect.name
        if dialect == "postgresql":
            insert_rows = _insert_postgresql
        elif dialect == "sqlite":
            insert_rows = _insert_sqlite
        else:
            raise ValueError(f"the records database must be PostgreSQL or SQLite, not {dialect}")
        # Those published before are looked up first: a re-run then only reads (on SQLite
        # it takes no write lock), and SRNs and JSON are made only for the others.
        published = _published_versions(
            session, convention, [record.source_id for record in records]
        )
        srns = {source_id: srn for source_id, (srn, _) in published.items()}
        # An id given twice is published with its first metadata.
        unpublished: dict[str, RecordToPublish] = {}
        to_revise: dict[str, tuple[str, str | None, RecordToPublish]] = {}
        for record in records:
            if record.source_id not in published:
                unpublished.setdefault(record.source_id, record)
                continue
            srn, held = published[record.source_id]
            if record.record_version is not None and record.record_version != held:
                to_revise.setdefault(record.source_id, (srn, held, record))
        revised = _revise(session, partition, published_at, list(to_revise.values()))
        missing = list(unpublished.values())
        if not missing:
            return PublishResult(
                srns=srns, already_published=len(records) - revised, revised=revised
            )
        to_json = _stored_form(session, Record.__table__.c.metadata)
        ours = make_srns(domain, len(missing))
        rows = [
            (
                srn,
                record.source_id,
                to_json(record.metadata),
                record.record_version,
                None if record.provenance is None else to_json(record.provenance),
            )
            for srn, record in zip(ours, missing, strict=True)
        ]
        stored = insert_rows(session, convention, partition, published_at, rows)
    if stored is None:  # every row inserted, each with its own SRN
        newly = len(rows)
        srns.update((row[1], row[0]) for row in rows)
    else:  # another publisher was first for some
        newly = sum(1 for row in rows if stored.get(row[1]) == row[0])
        srns.update(stored)
    return PublishResult(
        srns=srns,
        newly_published=newly,
        already_published=len(records) - newly - revised,
        revised=revised,
    )


def store_features(db: RecordsDatabase, *, hook: str, features: Sequence[FeatureRows]) -> int:
    """Replace the hook's feature rows of these records; return the number of rows stored.

    Replacing (not appending) keeps a re-materialisation from duplicating rows. The rows
    are written as publish_records writes records: COPY on PostgreSQL, one executemany on
    SQLite.
    """
    srns = [f.record_srn for f in features]
    with db.session() as session, session.begin():
        dialect = session.get_bind().dialect.name
        session.execute(
            text(
                "DELETE FROM features WHERE hook = :hook AND "
                + one_of_json(dialect, "record_srn", "srns")
            ),
            {"hook": hook, "srns": json.dumps(srns)},
        )
        to_json = _stored_form(session, Feature.__table__.c.data)
        rows = [
            (f.record_srn, hook, index, to_json(row))
            for f in features
            for index, row in enumerate(f.rows)
        ]
        if not rows:
            return 0
        if dialect == "postgresql":
            _copy_csv(session.connection(), "features", "record_srn, hook, row_index, data", rows)
        else:
            session.connection().exec_driver_sql(
                "INSERT INTO features (record_srn, hook, row_index, data) VALUES (?, ?, ?, ?)",
                rows,
            )
    return len(rows)


def find_srns(db: RecordsDatabase, convention: str, source_ids: Sequence[str]) -> dict[str, str]:
    """SRNs of those of these upstream ids that are published."""
    with db.session() as session:
        return _srns_in(session, convention, source_ids)
