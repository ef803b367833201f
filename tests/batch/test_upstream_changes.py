"""Planning against what upstream lists now: a record gone or obsolete upstream is withdrawn,
one back is reinstated, a revised one planned at its new version, and a dry run says each of
these, record by record, before anything changes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
from osa_sdk.types import IngesterRecord, Obsolete, RecordRef
from sqlalchemy import select

from osa_dagster.batch.plan import PlanResult, load_manifest, plan_refs, planned_partitions
from osa_dagster.batch.plan_index import INDEX_FILE
from osa_dagster.batch.publish import BatchVerdicts, plan_revalidation
from osa_dagster.definitions import build_definitions
from osa_dagster.defs.assets import batch_partitions_name
from osa_dagster.defs.jobs import CHANGES_METADATA, plan_job_name
from osa_dagster.records import (
    Record,
    RecordsDatabase,
    RecordToPublish,
    database_to_look_at,
    database_url,
    publish_records,
)
from osa_dagster.records.lifecycle import withdraw_records
from osa_dagster.settings import Settings
from osa_dagster.storage import BatchLayout, FileSystemStore, artifact_store
from osa_dagster.storage.layout import plan_index_prefix
from tests.fixtures.toy_convention import CONVENTIONS, TOY_IDS

TOY = CONVENTIONS[0]


def ref(source_id: str, version: str = "1") -> RecordRef:
    return RecordRef(source_id=source_id, version=version)


def whole(_: object = None) -> None:
    """`incomplete` of a listing of the whole source: nothing against looking for the gone."""
    return None


@pytest.fixture
def store() -> FileSystemStore:
    store = artifact_store(Settings.from_env())
    assert isinstance(store, FileSystemStore)
    return store


@pytest.fixture
def db() -> Iterator[RecordsDatabase]:
    db = RecordsDatabase(database_url(Settings.from_env()))
    yield db
    db.engine.dispose()


def publish_planned(db: RecordsDatabase, store: FileSystemStore, result: PlanResult) -> None:
    """What the batches' publish step does when every record passes."""
    for partition in result.new_partitions:
        refs = load_manifest(store, BatchLayout(TOY.name, partition)).refs
        publish_records(
            db,
            convention=TOY.name,
            domain="test",
            partition=partition,
            records=[
                RecordToPublish(r.source_id, {"v": r.version}, record_version=r.version)
                for r in refs
            ],
        )


def rows(db: RecordsDatabase) -> dict[str, tuple[str, str, str | None, str | None]]:
    """source id -> (SRN, status, reason, version)."""
    with db.session() as session:
        found = session.execute(
            select(
                Record.source_id,
                Record.srn,
                Record.status,
                Record.status_reason,
                Record.record_version,
            ).where(Record.convention == TOY.name)
        )
        return {source_id: tuple(rest) for source_id, *rest in found}  # type: ignore[misc]


def files(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def dry_run(store: FileSystemStore, listing: list[RecordRef]) -> dict[str, set[str]]:
    """The dry run's report, by kind: the source ids, as planning with this listing would."""
    looking = database_to_look_at(database_url(Settings.from_env()))
    try:
        result = plan_refs(TOY, store, listing, db=looking, dry_run=True, incomplete=whole)
    finally:
        if looking is not None:
            looking.engine.dispose()
    assert result.changes is not None
    return {
        kind: {e.source_id for e in change.examples}
        for kind, change in result.changes.changes.items()
        if change.count
    }


def test_the_dry_run_predicts_exactly_what_planning_then_does(
    store: FileSystemStore, db: RecordsDatabase
) -> None:
    first = plan_refs(TOY, store, [ref("a"), ref("b"), ref("c"), ref("d")], db=db, incomplete=whole)
    publish_planned(db, store, first)
    before = rows(db)
    db.engine.dispose()  # the WAL checkpointed: the file holds every row
    listing = [
        ref("a"),
        ref("b", "2"),
        ref("e"),
        RecordRef(source_id="d", obsolete=Obsolete(superseded_by=("E",))),
    ]
    data = Path(Settings.from_env().data_dir)
    untouched = files(data)

    predicted = dry_run(store, listing)

    assert files(data) == untouched  # no manifest, no index, no record changed
    assert predicted == {"add": {"e"}, "revise": {"b"}, "withdraw": {"c", "d"}}

    again = plan_refs(TOY, store, listing, db=db, incomplete=whole)
    assert again.changes is not None
    after = rows(db)
    assert {s for s, row in after.items() if row[1] == "withdrawn"} == predicted["withdraw"]
    assert after["c"][2] is not None and after["c"][2].startswith(
        "removed upstream (not listed by source local on "
    )
    assert after["d"][2] == "obsolete upstream, superseded by E"
    planned = {
        (r.source_id, r.version)
        for partition in again.new_partitions
        for r in load_manifest(store, BatchLayout(TOY.name, partition)).refs
    }
    assert planned == {("b", "2"), ("e", "1")}  # the obsolete d is never fetched

    # Its batch published, the revision keeps the SRN of the record it revises.
    publish_planned(db, store, again)
    revised = rows(db)
    assert revised["b"][0] == before["b"][0]
    assert revised["b"][3] == "2"
    assert set(revised) == {"a", "b", "c", "d", "e"}  # nothing duplicated


def test_a_record_listed_again_is_reinstated_and_the_dry_run_says_so(
    store: FileSystemStore, db: RecordsDatabase
) -> None:
    publish_planned(db, store, plan_refs(TOY, store, [ref("a"), ref("b")], db=db, incomplete=whole))
    plan_refs(TOY, store, [ref("a")], db=db, incomplete=whole)
    assert rows(db)["b"][1] == "withdrawn"
    db.engine.dispose()

    assert dry_run(store, [ref("a"), ref("b")]) == {"reinstate": {"b"}}
    back = plan_refs(TOY, store, [ref("a"), ref("b")], db=db, incomplete=whole)
    assert back.new_partitions == []  # planned before at this version: nothing to fetch
    assert rows(db)["b"][1:3] == ("published", "listed again upstream")


def test_only_a_whole_listing_of_the_same_source_withdraws_what_it_no_longer_lists(
    store: FileSystemStore, db: RecordsDatabase
) -> None:
    publish_planned(db, store, plan_refs(TOY, store, [ref("a"), ref("b")], db=db, incomplete=whole))
    # A part of the listing (a watch, a limit) cannot say a record is gone.
    partial = plan_refs(TOY, store, [ref("a")], db=db)
    assert "not looked for" in partial.gone_check
    # Nor can a listing of another folder planned into the same convention.
    elsewhere = TOY.model_copy(update={"location": "/another/folder"})
    plan_refs(elsewhere, store, [ref("z")], db=db, incomplete=whole)
    assert {s: row[1] for s, row in rows(db).items()} == {"a": "published", "b": "published"}


def test_the_plan_jobs_dry_run_registers_and_writes_nothing(
    toy_conventions: None, tmp_path: Path, store: FileSystemStore
) -> None:
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        result = (
            build_definitions()
            .resolve_job_def(plan_job_name(TOY))
            .execute_in_process(
                run_config={"ops": {f"{TOY.name}_plan_batches": {"config": {"dry_run": True}}}},
                instance=instance,
            )
        )
        assert result.success
        assert instance.get_dynamic_partitions(batch_partitions_name(TOY)) == []
    [output] = [e for e in result.all_events if e.event_type_value == "STEP_OUTPUT"]
    report = output.event_specific_data.metadata[CHANGES_METADATA].data
    assert report["dry_run"] is True
    assert report["changes"]["add"]["count"] == len(TOY_IDS)
    assert planned_partitions(store, TOY.name) == []
    assert not store.exists(f"{plan_index_prefix(TOY.name)}/{INDEX_FILE}")


def test_passing_the_hooks_again_does_not_reinstate_what_upstream_removed(
    store: FileSystemStore, db: RecordsDatabase
) -> None:
    first = plan_refs(TOY, store, [ref("a"), ref("b"), ref("c")], db=db, incomplete=whole)
    publish_planned(db, store, first)
    [partition] = first.new_partitions
    plan_refs(TOY, store, [ref("a"), ref("c")], db=db, incomplete=whole)  # b gone upstream
    withdraw_records(db, TOY.name, {"c": "rejected by check_size 1: too big"})

    every_hook_passes = BatchVerdicts(
        passed=[IngesterRecord(source_id=i) for i in ("a", "b", "c")], failed=[], checkpoints={}
    )
    plan = plan_revalidation(TOY, db, partition, every_hook_passes)
    assert set(plan.reinstate) == {"c"}
