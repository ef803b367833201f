"""Publishers racing on the same records: each record is published once. (Two runs of one
batch at once: test_batch_lease.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import func, select

from osa_dagster.records import Record, RecordsDatabase

from .conftest import REPO

RACE = """
import json, sys, time
from osa_dagster.records import RecordsDatabase, RecordToPublish, publish_records
url, start_at, count = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
db = RecordsDatabase(url)
db.engine  # connect and create the schema before the start line
records = [RecordToPublish(f"race:{n:05d}", {"n": n}) for n in range(count)]
time.sleep(max(0.0, start_at - time.time()))
result = publish_records(db, convention="race", domain="t", partition="p", records=records)
print(json.dumps({"new": result.newly_published, "srns": result.srns}))
"""


def _race(url: str, processes: int, count: int, *, schema_first: bool = True) -> list[dict]:
    if schema_first:
        # Concurrent first opens of an empty database race on CREATE TABLE: a core bug
        # of its own (test_first_opens_at_once_create_the_schema_once), kept out of this race.
        RecordsDatabase(url).engine.dispose()
    start_at = time.time() + 3.0  # all start the publish at the same instant
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, url, str(start_at), str(count)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    outputs = [racer.communicate(timeout=120)[0] for racer in racers]
    assert [racer.returncode for racer in racers] == [0] * processes
    return [json.loads(out) for out in outputs]


def _assert_published_once(url: str, results: list[dict], count: int) -> None:
    assert sum(r["new"] for r in results) == count  # each record new for exactly one racer
    assert all(r["srns"] == results[0]["srns"] for r in results)  # and all agree on its SRN
    db = RecordsDatabase(url)
    with db.session() as session:
        rows = session.scalar(select(func.count()).select_from(Record))
        distinct = session.scalar(select(func.count(func.distinct(Record.source_id))))
    db.engine.dispose()
    assert rows == distinct == count


def test_racing_publishers_publish_each_record_once_sqlite(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'records.db'}"
    _assert_published_once(url, _race(url, processes=4, count=3000), 3000)


def test_racing_publishers_publish_each_record_once_postgres(postgres):
    _assert_published_once(postgres.url, _race(postgres.url, processes=4, count=3000), 3000)


def test_first_opens_at_once_create_the_schema_once(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'records.db'}"
    for _ in range(3):
        _assert_published_once(url, _race(url, processes=4, count=10, schema_first=False), 10)
        url = f"sqlite:///{tmp_path / f'records-{_}.db'}"
