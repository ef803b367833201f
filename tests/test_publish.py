"""publish_records and store_features on both databases: the bulk paths (COPY through a
staging table on PostgreSQL, one executemany on SQLite) keep every character, publish each
record once however batches overlap, and refuse what the database cannot hold."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from itertools import count
from pathlib import Path

import psycopg2
import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, OperationalError

from osa_dagster.local_postgres import PgCluster, pg_binary, throwaway_postgres
from osa_dagster.records import (
    Feature,
    FeatureRows,
    PublishResult,
    Record,
    RecordsDatabase,
    RecordToPublish,
    make_srns,
    publish_records,
    store_features,
)
from osa_dagster.records import publish as publish_module
from osa_dagster.records.publish import UnpublishableRecord
from tests.fixtures.services import unavailable

# What COPY's text and CSV formats and SQL quoting give a meaning to, and text beyond ASCII.
AWKWARD_IDS = [
    "tab\there",
    "new\nline",
    "carriage\rreturn",
    "back\\slash",
    "\\N",
    "\\.",
    "ends with backslash\\",
    'double "quoted"',
    "single 'quoted'",
    "comma, semicolon; pipe|",
    "",
    " leading and trailing spaces ",
    "unicode: é ß Ω 🧬 中文",
    "pdb:1ABC/v1@2024 chain A",
]
AWKWARD_METADATA = {
    "text": "tab\t newline\n cr\r backslash\\ quote\" apostrophe' NUL\x00 é 🧬",
    "nested": [{"\\key\t": None}, 1.5, True, ""],
    "unicode_key_é": "\\N",
}

_databases = count()


@pytest.fixture(scope="module")
def cluster() -> Iterator[PgCluster]:
    if pg_binary("initdb") is None:
        unavailable("PostgreSQL (initdb, pg_ctl) is not installed")
    with throwaway_postgres() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RecordsDatabase]:
    """An empty records database of each kind (PostgreSQL: a new database on one server)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'records.db'}"
    else:
        server: PgCluster = request.getfixturevalue("cluster")
        name = f"records_{next(_databases)}"
        server.create_database(name)
        url = server.database_url(name)
    database = RecordsDatabase(url)
    yield database
    database.engine.dispose()


def _publish(db: RecordsDatabase, records: list[RecordToPublish], partition: str = "p1"):
    return publish_records(
        db, convention="pdb", domain="example.org", partition=partition, records=records
    )


def _stored(db: RecordsDatabase) -> dict[str, tuple[str, dict]]:
    with db.session() as session:
        rows = session.execute(select(Record.source_id, Record.srn, Record.record_metadata))
        return {source_id: (srn, metadata) for source_id, srn, metadata in rows}


def test_awkward_ids_and_metadata_are_stored_as_given(db: RecordsDatabase):
    # One id published before, and one given twice: its first metadata is published.
    first = _publish(db, [RecordToPublish(AWKWARD_IDS[0], AWKWARD_METADATA)])
    records = [RecordToPublish(i, {**AWKWARD_METADATA, "id": i}) for i in AWKWARD_IDS]
    twice = RecordToPublish(AWKWARD_IDS[1], {"second": True})
    result = _publish(db, [*records, twice], partition="p2")

    assert (result.newly_published, result.already_published) == (len(AWKWARD_IDS) - 1, 2)
    assert result.srns[AWKWARD_IDS[0]] == first.srns[AWKWARD_IDS[0]]
    stored = _stored(db)
    assert sorted(stored) == sorted(AWKWARD_IDS)
    assert {i: srn for i, (srn, _) in stored.items()} == result.srns
    assert stored[AWKWARD_IDS[0]][1] == AWKWARD_METADATA  # the first publication stands
    for source_id in AWKWARD_IDS[1:]:
        assert stored[source_id][1] == {**AWKWARD_METADATA, "id": source_id}

    again = _publish(db, records, partition="p2")
    assert (again.newly_published, again.already_published) == (0, len(AWKWARD_IDS))
    assert again.srns == result.srns


def test_ids_another_run_published_meanwhile_keep_that_runs_srns(
    db: RecordsDatabase, monkeypatch: pytest.MonkeyPatch
):
    """Another run publishes some ids between this run's look-up and its insert: the insert
    skips them, and their SRNs are read back after it."""
    other_run = _publish(db, [RecordToPublish(i, {"run": 1}) for i in AWKWARD_IDS[::2]])
    calls: list[int] = []

    def look_up_before_the_other_run(session, convention: str, source_ids) -> dict:
        calls.append(len(source_ids))
        return {}

    monkeypatch.setattr(publish_module, "_published_versions", look_up_before_the_other_run)
    result = _publish(db, [RecordToPublish(i, {"run": 2}) for i in AWKWARD_IDS], "p2")

    assert calls[0] == len(AWKWARD_IDS)
    assert (result.newly_published, result.already_published) == (
        len(AWKWARD_IDS[1::2]),
        len(AWKWARD_IDS[::2]),
    )
    assert {i: result.srns[i] for i in AWKWARD_IDS[::2]} == other_run.srns
    stored = _stored(db)
    assert {i: (srn, metadata["run"]) for i, (srn, metadata) in stored.items()} == {
        i: (result.srns[i], 1 if n % 2 == 0 else 2) for n, i in enumerate(AWKWARD_IDS)
    }


def test_overlapping_batches_publish_each_record_once_and_keep_srns(db: RecordsDatabase):
    ids = [f"R{n:04d}" for n in range(900)]
    first = _publish(db, [RecordToPublish(i, {"batch": 1}) for i in ids[:600]])
    second = _publish(db, [RecordToPublish(i, {"batch": 2}) for i in ids[300:]], "p2")

    assert (first.newly_published, first.already_published) == (600, 0)
    assert (second.newly_published, second.already_published) == (300, 300)
    assert all(second.srns[i] == first.srns[i] for i in ids[300:600])
    stored = _stored(db)
    assert len(stored) == 900
    assert {i: stored[i][1]["batch"] for i in ids} == {
        i: 1 if n < 600 else 2 for n, i in enumerate(ids)
    }


def test_a_record_twice_in_one_call_is_published_once(db: RecordsDatabase):
    result = _publish(db, [RecordToPublish("1ABC", {"n": 1}), RecordToPublish("1ABC", {"n": 2})])
    assert (result.newly_published, result.already_published) == (1, 1)
    assert list(_stored(db)) == ["1ABC"]


@pytest.mark.parametrize(
    ("source_id", "problem"),
    [
        ("bad\x00id", "its id contains NUL, which a records database cannot hold"),
        ("lone \udc80 surrogate", "its id contains a lone surrogate escape"),
        ("x" * 513, "its id is 513 characters long, over the 512 allowed"),
    ],
)
def test_an_id_the_database_cannot_hold_is_refused_naming_it_and_nothing_is_written(
    db: RecordsDatabase, source_id: str, problem: str
):
    records = [RecordToPublish("good", {}), RecordToPublish(source_id, {})]
    with pytest.raises(UnpublishableRecord) as refused:
        _publish(db, records)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"record {source_id!r} of convention 'pdb' cannot be published")
    assert problem in message
    assert _stored(db) == {}


def test_publishers_of_overlapping_batches_in_opposite_orders_agree(db: RecordsDatabase):
    """Both insert the shared ids at once; in their own orders, two PostgreSQL transactions
    would each wait for a row the other holds (a deadlock, one of them failing)."""
    ids = [f"race:{n:05d}" for n in range(4000)]
    batches = [ids[:3000], list(reversed(ids[1000:]))]
    start = threading.Barrier(len(batches))
    results: list[PublishResult] = []
    errors: list[BaseException] = []

    def publisher(batch: list[str]) -> None:
        database = RecordsDatabase(db.url)
        database.engine.connect().close()  # connected before the start line
        start.wait()
        try:
            results.append(_publish(database, [RecordToPublish(i, {}) for i in batch]))
        except BaseException as error:
            errors.append(error)
        finally:
            database.engine.dispose()

    threads = [threading.Thread(target=publisher, args=(batch,)) for batch in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert sum(r.newly_published for r in results) == len(ids)
    shared = ids[1000:3000]
    assert [results[0].srns[i] for i in shared] == [results[1].srns[i] for i in shared]
    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(Record)) == len(ids)


def test_storing_features_replaces_the_hooks_rows_and_keeps_every_character(
    db: RecordsDatabase,
):
    srns = _publish(db, [RecordToPublish(i, {}) for i in ("1ABC", "2DEF")]).srns
    rows = [
        FeatureRows(srns["1ABC"], [AWKWARD_METADATA, {"atoms": 11}]),
        FeatureRows(srns["2DEF"], [{"atoms": 12}]),
    ]
    assert store_features(db, hook="features", features=rows) == 3
    assert store_features(db, hook="features", features=rows[:1]) == 2
    assert store_features(db, hook="other", features=[FeatureRows(srns["2DEF"], [{}])]) == 1
    assert store_features(db, hook="none", features=[]) == 0
    with db.session() as session:
        stored = session.execute(
            select(Feature.record_srn, Feature.hook, Feature.row_index, Feature.data).order_by(
                Feature.hook, Feature.record_srn, Feature.row_index
            )
        ).all()
    expected = [
        (srns["1ABC"], "features", 0, AWKWARD_METADATA),
        (srns["1ABC"], "features", 1, {"atoms": 11}),
        (srns["2DEF"], "features", 0, {"atoms": 12}),
        (srns["2DEF"], "other", 0, {}),
    ]
    assert sorted(stored) == sorted(expected)


def test_srns_are_distinct_version_4_uuids_of_the_domain():
    srns = make_srns("example.org", 1000)
    assert len(set(srns)) == 1000
    for srn in srns:
        prefix, _, tail = srn.rpartition(":")
        assert prefix == "urn:osa:example.org:rec"
        parsed = uuid.UUID(tail)
        assert (parsed.version, parsed.variant, str(parsed)) == (4, uuid.RFC_4122, tail)


def test_a_refused_feature_row_fails_the_call_and_keeps_the_rows_stored_before(
    db: RecordsDatabase,
):
    srn = _publish(db, [RecordToPublish("1ABC", {})]).srns["1ABC"]
    store_features(db, hook="features", features=[FeatureRows(srn, [{"atoms": 10}])])
    unknown = "urn:osa:example.org:rec:00000000-0000-4000-8000-000000000000"
    rows = [FeatureRows(srn, [{"atoms": 99}]), FeatureRows(unknown, [{"atoms": 1}])]

    with pytest.raises(IntegrityError, match=r"(?i)foreign key"):
        store_features(db, hook="features", features=rows)

    with db.session() as session:
        assert session.scalars(select(Feature.data)).all() == [{"atoms": 10}]


def test_a_connection_lost_during_copy_is_reported_as_lost_and_the_next_call_works(
    cluster: PgCluster, monkeypatch: pytest.MonkeyPatch
):
    name = f"records_{next(_databases)}"
    cluster.create_database(name)
    db = RecordsDatabase(cluster.database_url(name))
    srn = _publish(db, [RecordToPublish("1ABC", {})]).srns["1ABC"]
    stored_form = publish_module._stored_form

    def server_ends_the_session_first(session, column):
        pid = session.connection().exec_driver_sql("SELECT pg_backend_pid()").scalar()
        with db.engine.connect() as other:
            other.exec_driver_sql(f"SELECT pg_terminate_backend({pid})")
        return stored_form(session, column)

    monkeypatch.setattr(publish_module, "_stored_form", server_ends_the_session_first)
    with pytest.raises(OperationalError) as lost:
        store_features(db, hook="features", features=[FeatureRows(srn, [{"atoms": 10}])])
    assert lost.value.connection_invalidated
    assert "COPY features" in str(lost.value)

    monkeypatch.undo()
    assert store_features(db, hook="features", features=[FeatureRows(srn, [{"atoms": 10}])]) == 1
    db.engine.dispose()


@pytest.mark.parametrize("other_run_ends_by", ["commit", "rollback"])
def test_a_record_another_run_is_publishing_waits_for_that_run(
    cluster: PgCluster, other_run_ends_by: str
):
    """The other run's row is uncommitted when this run's COPY meets it: the COPY waits.
    Committed, the record is that run's (this one's COPY is undone and its rows inserted
    past the conflict); rolled back, this run publishes every record by its COPY."""
    name = f"records_{next(_databases)}"
    cluster.create_database(name)
    db = RecordsDatabase(cluster.database_url(name))
    db.engine.connect().close()  # creates the schema
    ids = [f"R{n:04d}" for n in range(1000)]
    dsn = cluster.dsn().replace("dbname=postgres", f"dbname={name}")
    other_run = psycopg2.connect(dsn)
    with other_run.cursor() as cursor:
        cursor.execute(
            "INSERT INTO records (srn, convention, source_id, partition, metadata, published_at)"
            " VALUES ('urn:other', 'pdb', %s, 'other', '{}', now())",
            (ids[500],),
        )
    results: list[PublishResult] = []
    publisher = threading.Thread(
        target=lambda: results.append(_publish(db, [RecordToPublish(i, {}) for i in ids]))
    )
    publisher.start()
    # Each query of its own transaction: within one, pg_stat_activity keeps its first view.
    watch = psycopg2.connect(dsn)
    watch.autocommit = True
    waiting = 0
    with watch.cursor() as cursor:
        while not waiting and publisher.is_alive():
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND query LIKE 'COPY records%'"
            )
            waiting = cursor.fetchone()[0]
    watch.close()
    getattr(other_run, other_run_ends_by)()
    publisher.join()
    other_run.close()

    assert waiting == 1
    [result] = results
    stored = _stored(db)
    db.engine.dispose()
    assert {i: srn for i, (srn, _) in stored.items()} == result.srns
    assert len(result.srns) == len(ids)
    if other_run_ends_by == "commit":
        assert (result.newly_published, result.already_published) == (999, 1)
        assert result.srns[ids[500]] == "urn:other"
    else:
        assert (result.newly_published, result.already_published) == (1000, 0)
