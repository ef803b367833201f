"""The lifecycle of a published record after its first publication.

A record whose hooks no longer pass it is withdrawn, not deleted: it keeps its SRN and its
row, gains a status, a reason and when, and no longer counts as published; one that passes
again is reinstated. Every such change (and every revision to a new upstream version, see
publish.py) is one row of record_events, so a record's history can be told.

`ChangeReport` is what a dry run says before any of this happens: how many records a
re-validation or a new upstream release would add, revise, withdraw or reinstate, with
examples of each.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, insert, select, text, update

from osa_dagster.records.database import RecordsDatabase
from osa_dagster.records.models import PUBLISHED, RECORD_EVENTS, RECORDS, WITHDRAWN, Record
from osa_dagster.records.publish import one_of_json

# The longest reason the database holds (records.status_reason, record_events.reason).
MAX_REASON_CHARS = 1024


def _reason(text: str) -> str:
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"


def _change_status(
    db: RecordsDatabase,
    convention: str,
    reasons: Mapping[str, str],
    *,
    from_status: str,
    to_status: str,
    event: str,
    at: datetime | None,
) -> int:
    """Move those of these records (source id -> reason) now in `from_status` to
    `to_status`, with one `event` each; return how many moved. The rows are read and
    changed in one transaction, locked on PostgreSQL, so two callers cannot both move one."""
    if not reasons:
        return 0
    when = at or datetime.now(UTC)
    with db.session() as session, session.begin():
        dialect = session.get_bind().dialect.name
        query = (
            select(Record.source_id, Record.srn, Record.record_version, Record.partition)
            .where(
                Record.convention == convention,
                Record.status == from_status,
                text(one_of_json(dialect, "records.source_id", "source_ids")),
            )
            .order_by(Record.source_id)
        )
        if dialect == "postgresql":
            query = query.with_for_update()
        rows = session.execute(query, {"source_ids": json.dumps(list(reasons))}).all()
        if not rows:
            return 0
        records = RECORDS.c
        session.execute(
            update(RECORDS)
            .where(records.srn == bindparam("b_srn"))
            .values(
                {
                    records.status: to_status,
                    records.status_reason: bindparam("b_reason"),
                    records.status_changed_at: when,
                }
            ),
            [
                {"b_srn": srn, "b_reason": _reason(reasons[source_id])}
                for source_id, srn, *_ in rows
            ],
        )
        session.execute(
            insert(RECORD_EVENTS),
            [
                {
                    "srn": srn,
                    "event": event,
                    "record_version": version,
                    "reason": _reason(reasons[source_id]),
                    "partition": partition,
                    "at": when,
                }
                for source_id, srn, version, partition in rows
            ],
        )
    return len(rows)


def withdraw_records(
    db: RecordsDatabase,
    convention: str,
    reasons: Mapping[str, str],
    *,
    at: datetime | None = None,
) -> int:
    """Withdraw the published ones of these records (source id -> why); return how many.
    A withdrawn record keeps its SRN, metadata, features and provenance."""
    return _change_status(
        db,
        convention,
        reasons,
        from_status=PUBLISHED,
        to_status=WITHDRAWN,
        event="withdrawn",
        at=at,
    )


def reinstate_records(
    db: RecordsDatabase,
    convention: str,
    source_ids: Sequence[str],
    *,
    reason: str,
    at: datetime | None = None,
) -> int:
    """Publish again the withdrawn ones of these records; return how many."""
    return _change_status(
        db,
        convention,
        dict.fromkeys(source_ids, reason),
        from_status=WITHDRAWN,
        to_status=PUBLISHED,
        event="reinstated",
        at=at,
    )


def update_provenance(
    db: RecordsDatabase,
    convention: str,
    partition: str,
    provenance: Mapping[str, dict[str, Any]],
) -> int:
    """Give the records this partition holds (by source id) their provenance where it
    changed (a hook judged them again with another version); return how many changed."""
    if not provenance:
        return 0
    with db.session() as session, session.begin():
        dialect = session.get_bind().dialect.name
        stored = session.execute(
            select(Record.source_id, Record.srn, Record.provenance).where(
                Record.convention == convention,
                Record.partition == partition,
                text(one_of_json(dialect, "records.source_id", "source_ids")),
            ),
            {"source_ids": json.dumps(list(provenance))},
        ).all()
        changed = [
            {"b_srn": srn, "b_provenance": provenance[source_id]}
            for source_id, srn, held in stored
            if held != provenance[source_id]
        ]
        if changed:
            records = RECORDS.c
            session.execute(
                update(RECORDS)
                .where(records.srn == bindparam("b_srn"))
                .values({records.provenance: bindparam("b_provenance")}),
                changed,
            )
    return len(changed)


CHANGE_KINDS = ("add", "revise", "withdraw", "reinstate")


@dataclass(frozen=True)
class ChangeExample:
    source_id: str
    srn: str | None = None
    """None for a record not yet published (add)."""
    detail: str = ""
    """Why: the hook and version that rejects it, the upstream versions..."""


@dataclass
class ChangeCount:
    count: int = 0
    examples: list[ChangeExample] = field(default_factory=list)


@dataclass
class ChangeReport:
    """What a change would do to the published records, said before anything changes: how
    many records it would add, revise, withdraw and reinstate, and up to `max_examples` of
    each. One shape for every dry run (re-validation, planning a new upstream release)."""

    convention: str
    scope: str
    """What the dry run looked at, in a few words (a batch and the hooks re-judging it...)."""
    max_examples: int = 5
    changes: dict[str, ChangeCount] = field(
        default_factory=lambda: {kind: ChangeCount() for kind in CHANGE_KINDS}
    )

    def note(self, kind: str, example: ChangeExample) -> None:
        change = self.changes[kind]
        change.count += 1
        if len(change.examples) < self.max_examples:
            change.examples.append(example)

    def merge(self, other: ChangeReport) -> None:
        """Add another report's counts and examples (of another batch) to this one."""
        for kind, theirs in other.changes.items():
            ours = self.changes[kind]
            ours.count += theirs.count
            room = self.max_examples - len(ours.examples)
            ours.examples.extend(theirs.examples[: max(room, 0)])

    @property
    def changes_nothing(self) -> bool:
        return all(change.count == 0 for change in self.changes.values())

    def as_json(self) -> dict[str, Any]:
        """The --json form: {"convention", "scope", "dry_run": true, "changes": {kind:
        {"count", "examples": [{"source_id", "srn", "detail"}]}}}, every kind present."""
        return {
            "convention": self.convention,
            "scope": self.scope,
            "dry_run": True,
            "changes": {kind: asdict(change) for kind, change in self.changes.items()},
        }

    def format(self) -> str:
        """The printed form: one line per kind, its examples indented under it."""
        lines = [f"dry run, nothing changed: {self.convention}, {self.scope}"]
        if self.changes_nothing:
            lines.append("  would change no published record")
        for kind, change in self.changes.items():
            if not change.count:
                continue
            lines.append(f"  would {kind:<10} {change.count:>8} records")
            for example in change.examples:
                srn = f" {example.srn}" if example.srn else ""
                detail = f": {example.detail}" if example.detail else ""
                lines.append(f"      {example.source_id}{srn}{detail}")
            hidden = change.count - len(change.examples)
            if hidden:
                lines.append(f"      ... and {hidden} more")
        return "\n".join(lines)
