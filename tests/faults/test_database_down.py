"""The records database goes away in the middle of a publish, then comes back."""

from __future__ import annotations

import threading
import time

import psycopg2
import pytest

from osa_dagster.records import RecordsDatabase
from tests.fixtures.fault_convention import record_ids

from .conftest import check_results, failed_steps, feature_rows, ingest, plan, published

RECORDS = 1200  # the blocked record (700) comes after hundreds the insert has already written


def _stop_when_publisher_waits(postgres, stopped: threading.Event) -> None:
    """Stop the server (immediate: as a crash) once the publisher waits on a row lock,
    that is, in the middle of its insert with the records before the blocked one written."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not stopped.is_set():
        with psycopg2.connect(postgres.dsn()) as watch, watch.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE 'INSERT INTO records%'"
            )
            waiting = cursor.fetchone()[0]
        watch.close()
        if waiting:
            postgres.stop("immediate")
            stopped.set()
            return
        time.sleep(0.05)


@pytest.mark.slow
def test_database_down_mid_publish_publishes_nothing_then_rerun_completes(
    instance, postgres, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("OSA_DATABASE_URL", postgres.url)
    monkeypatch.setenv("OSA_FAULTS_RECORDS", str(RECORDS))
    ids = record_ids(RECORDS)
    RecordsDatabase(postgres.url).engine.dispose()  # the schema, for the blocker below
    [key] = plan(instance, "faults_wide")

    # Another transaction holds record 700, uncommitted: the publisher's insert (in id
    # order) waits for it, half done, until the server goes away.
    blocker = psycopg2.connect(postgres.dsn())
    with blocker.cursor() as cursor:
        cursor.execute(
            "INSERT INTO records (srn, convention, source_id, partition, metadata, published_at)"
            " VALUES ('urn:blocker', 'faults_wide', %s, 'x', '{}', now())",
            (ids[699],),
        )
    stopped = threading.Event()
    watcher = threading.Thread(target=_stop_when_publisher_waits, args=(postgres, stopped))
    watcher.start()
    try:
        result = ingest(instance, "faults_wide", key)
    finally:
        stopped.set()
        watcher.join()
    blocker.close()

    assert not result.success
    failures = failed_steps(result)
    assert list(failures) == ["faults_wide__published_records"], failures
    message = failures["faults_wide__published_records"]
    # The cause a curator reads says that the database connection was lost.
    assert "OperationalError" in message, message[:1000]
    assert "server closed the connection" in message, message[:1000]

    postgres.start()
    assert published("faults_wide", postgres.url) == {}  # nothing half-published

    result = ingest(instance, "faults_wide", key)
    assert result.success, failed_steps(result)
    assert published("faults_wide", postgres.url) == dict.fromkeys(ids, 1)
    assert feature_rows(postgres.url) == RECORDS
    assert all(check_results(result).values()), check_results(result)


@pytest.mark.slow
def test_database_down_before_the_run_fails_its_first_step_then_rerun_completes(
    instance, postgres, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("OSA_DATABASE_URL", postgres.url)
    monkeypatch.setenv("OSA_FAULTS_RECORDS", "30")
    ids = record_ids(30)
    [key] = plan(instance, "faults_wide")
    postgres.stop()

    result = ingest(instance, "faults_wide", key)

    # Every step holds its batch's lease, kept in the records database: the first step
    # already needs it, and fails naming the lost connection.
    assert not result.success
    failures = failed_steps(result)
    assert list(failures) == ["faults_wide__raw_batch"], failures
    assert "connection" in failures["faults_wide__raw_batch"].lower()
    postgres.start()
    assert published("faults_wide", postgres.url) == {}
    result = ingest(instance, "faults_wide", key)
    assert result.success, failed_steps(result)
    assert published("faults_wide", postgres.url) == dict.fromkeys(ids, 1)
