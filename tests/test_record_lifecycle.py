"""The lifecycle of published records on both databases: a new upstream version revises a
record in place, a withdrawn record keeps its SRN and stops counting as published, a
reinstated one counts again, and every change leaves one event."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

from sqlalchemy import select

from osa_dagster.records import RecordsDatabase, RecordToPublish, publish_records
from osa_dagster.records.lifecycle import (
    ChangeExample,
    ChangeReport,
    reinstate_records,
    withdraw_records,
)
from osa_dagster.records.models import Record, RecordEvent
from osa_dagster.records.queries import count_published, count_withdrawn, published_records
from tests import test_publish

# The fixtures of an empty records database of each kind.
cluster = test_publish.cluster
db = test_publish.db
AT = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def _publish(db: RecordsDatabase, records: list[RecordToPublish], partition: str = "p1"):
    return publish_records(
        db, convention="pdb", domain="example.org", partition=partition, records=records
    )


def _events(db: RecordsDatabase) -> list[tuple[str, str, str | None, str | None]]:
    with db.session() as session:
        rows = session.execute(
            select(
                Record.source_id, RecordEvent.event, RecordEvent.record_version, RecordEvent.reason
            )
            .join(Record, Record.srn == RecordEvent.srn)
            .order_by(RecordEvent.id)
        )
        return [tuple(row) for row in rows]  # type: ignore[misc]


def _row(db: RecordsDatabase, source_id: str) -> Record:
    with db.session() as session:
        row = session.scalars(select(Record).where(Record.source_id == source_id)).one()
        session.expunge(row)
        return row


def test_a_new_upstream_version_revises_the_record_under_its_srn(db: RecordsDatabase):
    first = _publish(
        db,
        [
            RecordToPublish("1ABC", {"title": "old"}, "2024-01-01", {"source": "mirror"}),
            RecordToPublish("2DEF", {"title": "kept"}, "2024-01-01"),
        ],
    )
    assert first.newly_published == 2
    again = _publish(
        db,
        [
            RecordToPublish("1ABC", {"title": "new"}, "2025-06-01", {"source": "release"}),
            RecordToPublish("2DEF", {"title": "kept"}, "2024-01-01"),
        ],
        partition="p2",
    )
    assert (again.newly_published, again.revised, again.already_published) == (0, 1, 1)
    assert again.srns == first.srns
    revised = _row(db, "1ABC")
    assert revised.record_metadata == {"title": "new"}
    assert revised.record_version == "2025-06-01"
    assert revised.provenance == {"source": "release"}
    assert revised.partition == "p2"
    assert _row(db, "2DEF").partition == "p1"
    assert _events(db) == [
        ("1ABC", "superseded", "2024-01-01", "replaced by version 2025-06-01"),
        ("1ABC", "revised", "2025-06-01", "version 2025-06-01 replaces 2024-01-01"),
    ]
    # The same version again changes nothing, and neither does a record given no version.
    third = _publish(
        db,
        [RecordToPublish("1ABC", {"title": "new"}, "2025-06-01"), RecordToPublish("2DEF", {})],
    )
    assert (third.newly_published, third.revised, third.already_published) == (0, 0, 2)
    assert len(_events(db)) == 2


def test_rerunning_an_older_batch_does_not_put_back_a_superseded_version(db: RecordsDatabase):
    # Batch p1 holds the record at its first version, p2 at its revision; a backfill of
    # every partition publishes p1 again after p2.
    _publish(db, [RecordToPublish("1ABC", {"title": "old"}, "v1")], partition="p1")
    _publish(db, [RecordToPublish("1ABC", {"title": "new"}, "v2")], partition="p2")

    rerun = _publish(db, [RecordToPublish("1ABC", {"title": "old"}, "v1")], partition="p1")

    assert (rerun.newly_published, rerun.revised, rerun.already_published) == (0, 0, 1)
    row = _row(db, "1ABC")
    assert (row.record_version, row.record_metadata, row.partition) == (
        "v2",
        {"title": "new"},
        "p2",
    )
    # A version never held before still revises it.
    third = _publish(db, [RecordToPublish("1ABC", {"title": "newer"}, "v3")], partition="p3")
    assert third.revised == 1
    assert _row(db, "1ABC").record_version == "v3"


def test_withdrawn_records_keep_their_srn_and_stop_counting_until_reinstated(
    db: RecordsDatabase,
):
    published = _publish(db, [RecordToPublish(i, {}, "v1") for i in ("1ABC", "2DEF", "3GHI")])
    assert withdraw_records(db, "pdb", {"1ABC": "validate@v2: too few atoms"}, at=AT) == 1
    # Withdrawing again, or withdrawing what is not published, changes nothing.
    assert withdraw_records(db, "pdb", {"1ABC": "again", "9ZZZ": "unknown"}, at=AT) == 0
    assert count_published(db, "pdb") == 2
    assert count_withdrawn(db, "pdb") == 1
    withdrawn = _row(db, "1ABC")
    assert withdrawn.srn == published.srns["1ABC"]
    assert (withdrawn.status, withdrawn.status_reason) == (
        "withdrawn",
        "validate@v2: too few atoms",
    )
    assert withdrawn.status_changed_at is not None
    listed = {r.source_id: r for r in published_records(db, "pdb", 10, with_features=False)}
    assert listed["1ABC"].status == "withdrawn"
    assert listed["2DEF"].status == "published"
    # Re-publishing the same version does not bring it back: the hooks withdrew it.
    _publish(db, [RecordToPublish("1ABC", {}, "v1")])
    assert count_published(db, "pdb") == 2

    assert reinstate_records(db, "pdb", ["1ABC", "2DEF"], reason="validate@v1 passes it") == 1
    assert count_published(db, "pdb") == 3
    assert _row(db, "1ABC").status == "published"
    assert _events(db) == [
        ("1ABC", "withdrawn", "v1", "validate@v2: too few atoms"),
        ("1ABC", "reinstated", "v1", "validate@v1 passes it"),
    ]


def test_a_new_version_of_a_withdrawn_record_that_passed_is_published_again(
    db: RecordsDatabase,
):
    _publish(db, [RecordToPublish("1ABC", {}, "v1")])
    withdraw_records(db, "pdb", {"1ABC": "rejected"})
    assert _publish(db, [RecordToPublish("1ABC", {}, "v2")]).revised == 1
    assert _row(db, "1ABC").status == "published"
    assert count_published(db, "pdb") == 1


def test_a_change_report_counts_every_change_and_keeps_a_few_examples():
    report = ChangeReport(convention="pdb", scope="batch b1 re-judged", max_examples=2)
    for n in range(3):
        report.note("withdraw", ChangeExample(f"{n}ABC", f"urn:{n}", "validate@v2: bad"))
    other = ChangeReport(convention="pdb", scope="batch b2 re-judged", max_examples=2)
    other.note("reinstate", ChangeExample("9XYZ", "urn:9", "validate@v1 passes"))
    report.merge(other)
    shown = report.as_json()
    assert json.loads(json.dumps(shown)) == shown
    assert shown["dry_run"] is True
    assert {kind: c["count"] for kind, c in shown["changes"].items()} == {
        "add": 0,
        "revise": 0,
        "withdraw": 3,
        "reinstate": 1,
    }
    assert [e["source_id"] for e in shown["changes"]["withdraw"]["examples"]] == ["0ABC", "1ABC"]
    printed = report.format()
    assert re.search(r"would withdraw +3 records", printed)
    assert "... and 1 more" in printed
    assert ChangeReport("pdb", "nothing").format().endswith("would change no published record")
