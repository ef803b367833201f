"""Upstream changes: what a plan's listing means for the records published before.

A plan compares what the source lists now with what was planned before (the plan index)
and with what is published (the records database), chunk by chunk as the listing streams:

- add: listed, never planned. Planned into a new batch.
- revise: listed at a version never planned, planned before at another. Planned into a new
  batch; when that batch publishes, the published record takes the new version under its
  SRN (publish_records revises it in place).
- withdraw: published, and upstream marks it obsolete (a ref with `obsolete`), or, in a
  plan that lists the whole source, planned from that source and not listed any more.
  Withdrawn at once, with the reason.
- reinstate: withdrawn because upstream had removed it or marked it obsolete, and listed
  again. Reinstated at once: the reason it was withdrawn no longer holds, and what is
  published passed the hooks. Had it changed meanwhile it is a revision too, and its new
  version replaces the published one when it passes, as for any record revised upstream.
  A record withdrawn for another reason (by a curator, by a hook's new version) is not.

Only a listing of the whole source can tell that a record is gone: a plan of what changed
since a date (a watch, the weekly plan), or of at most `limit` records, lists a part. And
only records planned from the same source (name and location) are looked for: a plan of
another folder into the same convention does not withdraw what the mirror holds.

A dry run does all of this but write: the report says what the plan would change.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import NamedTuple

from osa_sdk.types import RecordRef
from sqlalchemy import text

from osa_dagster.batch.plan_index import LOOKUP_CHUNK, chunked
from osa_dagster.records import RecordsDatabase
from osa_dagster.records.lifecycle import (
    ChangeExample,
    ChangeReport,
    reinstate_records,
    withdraw_records,
)
from osa_dagster.records.models import PUBLISHED, WITHDRAWN
from osa_dagster.records.publish import one_of_json
from osa_dagster.storage.layout import SourceChoice

# How the reasons of withdrawals for upstream's sake begin: reinstating looks for them.
REMOVED_UPSTREAM = "removed upstream"
OBSOLETE_UPSTREAM = "obsolete upstream"
UPSTREAM_REASONS = (REMOVED_UPSTREAM, OBSOLETE_UPSTREAM)
REINSTATED_REASON = "listed again upstream"

__all__ = [
    "ChangeReport",
    "UpstreamChanges",
    "obsolete_reason",
    "source_label",
    "withdrawn_upstream",
]


def source_label(source: SourceChoice) -> str:
    """The source as reasons name it: "source pdb at /data/pdb"."""
    where = f" at {source.location}" if source.location else ""
    return f"source {source.name}{where}"


def obsolete_reason(ref: RecordRef) -> str:
    successors = ref.obsolete.superseded_by if ref.obsolete else ()
    if not successors:
        return OBSOLETE_UPSTREAM
    return f"{OBSOLETE_UPSTREAM}, superseded by {', '.join(successors)}"


class UpstreamChanges:
    """The changes of one plan, made as its listing streams by (unless a dry run) and
    counted in `report`. Without a records database, only additions and revisions."""

    def __init__(
        self,
        convention: str,
        source: SourceChoice,
        db: RecordsDatabase | None,
        *,
        scope: str,
        dry_run: bool,
        at: datetime | None = None,
    ) -> None:
        self.convention = convention
        self.source_label = source_label(source)
        self.db = db
        self.dry_run = dry_run
        self.at = at or datetime.now(UTC)
        self.report = ChangeReport(convention=convention, scope=f"{scope} of {self.source_label}")

    def listed(
        self,
        listed: Sequence[RecordRef],
        unplanned: Sequence[RecordRef],
        planned: Mapping[str, object],
    ) -> None:
        """A chunk of the listing: `unplanned` those of `listed` not planned at their
        version, `planned` the ids planned before at some version."""
        revised = [r for r in unplanned if r.source_id in planned]
        held = self._held(r.source_id for r in revised) if self.db else {}
        for ref in unplanned:
            row = held.get(ref.source_id)
            if ref.source_id not in planned:
                self.report.note("add", ChangeExample(ref.source_id, detail=_version(ref)))
                continue
            was = f"published at version {row.record_version}; " if row else ""
            example = ChangeExample(
                ref.source_id, row.srn if row else None, f"{was}upstream now {_version(ref)}"
            )
            self.report.note("revise", example)
        # Only withdrawn rows are read for all the listing: few, where published ones are all.
        withdrawn = self._held((r.source_id for r in listed), status=WITHDRAWN) if self.db else {}
        back = {
            source_id: row
            for source_id, row in withdrawn.items()
            if (row.reason or "").startswith(UPSTREAM_REASONS)
        }
        if back and self.db is not None and not self.dry_run:
            reinstate_records(
                self.db, self.convention, list(back), reason=REINSTATED_REASON, at=self.at
            )
        for source_id, row in back.items():
            self.report.note(
                "reinstate", ChangeExample(source_id, row.srn, f"withdrawn as {row.reason}")
            )

    def obsolete(self, refs: Sequence[RecordRef]) -> None:
        """Refs that upstream marks obsolete: their published records are withdrawn."""
        self._withdraw({ref.source_id: obsolete_reason(ref) for ref in refs})

    def gone(self, source_ids: Iterable[str]) -> None:
        """Records that a listing of the whole source no longer has, streamed."""
        reason = (
            f"{REMOVED_UPSTREAM} (not listed by {self.source_label} "
            f"on {self.at.date().isoformat()})"
        )
        for chunk in chunked(source_ids, LOOKUP_CHUNK):
            self._withdraw(dict.fromkeys(chunk, reason))

    def _withdraw(self, reasons: Mapping[str, str]) -> None:
        if self.db is None or not reasons:
            return
        published = {
            source_id: row for source_id, row in self._held(reasons, status=PUBLISHED).items()
        }
        if published and not self.dry_run:
            withdraw_records(
                self.db, self.convention, {i: reasons[i] for i in published}, at=self.at
            )
        for source_id, row in published.items():
            self.report.note("withdraw", ChangeExample(source_id, row.srn, reasons[source_id]))

    def _held(self, source_ids: Iterable[str], *, status: str | None = None) -> dict[str, _Held]:
        assert self.db is not None
        return _held(self.db, self.convention, source_ids, status=status)


class _Held(NamedTuple):
    srn: str
    status: str
    reason: str | None
    record_version: str | None


def _held(
    db: RecordsDatabase, convention: str, source_ids: Iterable[str], *, status: str | None = None
) -> dict[str, _Held]:
    """The rows of the records database of those of `source_ids` it holds (in `status`).
    The ids go as one JSON parameter: binding a thousand took SQLAlchemy longer than the
    look-up took the database."""
    held: dict[str, _Held] = {}
    with db.session() as session:
        query = text(
            "SELECT source_id, srn, status, status_reason, record_version FROM records"
            " WHERE convention = :convention AND "
            + one_of_json(session.get_bind().dialect.name, "source_id", "source_ids")
            + ("" if status is None else " AND status = :status")
        )
        for chunk in chunked(source_ids, LOOKUP_CHUNK):
            rows = session.execute(
                query, {"convention": convention, "source_ids": json.dumps(chunk), "status": status}
            )
            held.update((row[0], _Held(*row[1:])) for row in rows)
    return held


def withdrawn_upstream(db: RecordsDatabase, convention: str, source_ids: Iterable[str]) -> set[str]:
    """Those of `source_ids` withdrawn because upstream removed them or made them obsolete:
    passing the hooks again does not reinstate them, being listed upstream again does."""
    return {
        source_id
        for source_id, row in _held(db, convention, source_ids, status=WITHDRAWN).items()
        if (row.reason or "").startswith(UPSTREAM_REASONS)
    }


def _version(ref: RecordRef) -> str:
    return f"version {ref.version}" if ref.version else "no version"
