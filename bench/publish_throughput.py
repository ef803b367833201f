"""Bulk publish of 100,000 records through publish_records, against the floor of a raw insert.

    .venv/bin/python bench/publish_throughput.py [--runs 3] [--records 100000] [--no-postgres]

Into SQLite (a file, WAL, as the records database opens it) and into a throwaway
PostgreSQL 15 cluster (started and stopped here, on 127.0.0.1). Every run starts from an
empty `records` table with the project's schema (primary key, unique (convention,
source_id), indexes). Per backend:

  publish      publish_records(...) of all N records in one call: one transaction, SRNs
               made, the idempotence look-ups before and after, chunked INSERT ... ON
               CONFLICT DO NOTHING
  republish    the same call again on the full table (a re-run of the partition: nothing new)
  floor        the same rows (SRN and JSON made in the loop too) with the bare driver in one
               transaction: sqlite3 executemany, or psycopg2 COPY FROM STDIN

Runs alternate between the variants; the figures are medians with min-max.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlalchemy import func, select  # noqa: E402

from osa_dagster.local_postgres import pg_binary, throwaway_postgres  # noqa: E402
from osa_dagster.records import (  # noqa: E402
    Base,
    Record,
    RecordsDatabase,
    RecordToPublish,
    make_srns,
    publish_records,
)

CONVENTION = "bench"
COLUMNS = ("srn", "convention", "source_id", "partition", "metadata", "published_at")


def make_records(count: int) -> list[RecordToPublish]:
    return [
        RecordToPublish(
            f"bench:{n:06d}/v1",
            {"n": n, "title": f"synthetic entry {n}", "resolution": 1.5 + n % 30 / 10},
        )
        for n in range(count)
    ]


def fresh_tables(db: RecordsDatabase) -> None:
    Base.metadata.drop_all(db.engine)
    Base.metadata.create_all(db.engine)


def count(db: RecordsDatabase) -> int:
    with db.session() as session:
        return session.scalar(select(func.count()).select_from(Record)) or 0


def rows(records: list[RecordToPublish]) -> list[tuple]:
    now = datetime.now(UTC)
    srns = make_srns("bench", len(records))
    return [
        (srn, CONVENTION, r.source_id, "p0", json.dumps(r.metadata), now)
        for srn, r in zip(srns, records, strict=True)
    ]


def floor_sqlite(db: RecordsDatabase, records: list[RecordToPublish]) -> None:
    path = db.url.removeprefix("sqlite:///")
    db.engine.dispose()
    connection = sqlite3.connect(path)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        with connection:
            values = [(*row[:5], row[5].isoformat(" ")) for row in rows(records)]
            connection.executemany(
                f"INSERT INTO records ({', '.join(COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?)", values
            )
    finally:
        connection.close()


def floor_postgres(db: RecordsDatabase, records: list[RecordToPublish]) -> None:
    raw = db.engine.raw_connection()
    try:
        buffer = io.StringIO()
        for srn, convention, source_id, partition, metadata, published_at in rows(records):
            fields = (srn, convention, source_id, partition, metadata, published_at.isoformat())
            buffer.write("\t".join(f.replace("\\", "\\\\") for f in fields) + "\n")
        buffer.seek(0)
        with raw.cursor() as cursor:
            cursor.copy_expert(f"COPY records ({', '.join(COLUMNS)}) FROM STDIN", buffer)
        raw.commit()
    finally:
        raw.close()


def publish(db: RecordsDatabase, records: list[RecordToPublish]) -> int:
    result = publish_records(
        db, convention=CONVENTION, domain="bench", partition="p0", records=records
    )
    return result.newly_published


def bench_backend(
    db: RecordsDatabase, records: list[RecordToPublish], floor: Callable, runs: int
) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"publish": [], "republish": [], "floor": []}
    for _ in range(runs):
        fresh_tables(db)
        started = time.perf_counter()
        assert publish(db, records) == len(records)
        times["publish"].append(time.perf_counter() - started)
        started = time.perf_counter()
        assert publish(db, records) == 0
        times["republish"].append(time.perf_counter() - started)
        assert count(db) == len(records)

        fresh_tables(db)
        started = time.perf_counter()
        floor(db, records)
        times["floor"].append(time.perf_counter() - started)
        assert count(db) == len(records)
    return times


def report(backend: str, floor_name: str, times: dict[str, list[float]], records: int) -> None:
    floor = statistics.median(times["floor"])
    print(f"\n{backend} (floor: {floor_name})")
    print(f"{'variant':<11}{'median s':>10}{'min-max s':>14}{'records/s':>12}{'/floor':>8}")
    for name, samples in times.items():
        median = statistics.median(samples)
        spread = f"{min(samples):.2f}-{max(samples):.2f}"
        print(
            f"{name:<11}{median:>10.2f}{spread:>14}{records / median:>12,.0f}{median / floor:>8.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    records = make_records(args.records)
    print(f"{args.records:,} records, {args.runs} runs per variant, {os.cpu_count()} CPUs")

    with tempfile.TemporaryDirectory(prefix="osa-bench-") as tmp:
        db = RecordsDatabase(f"sqlite:///{Path(tmp) / 'records.db'}")
        sqlite_times = bench_backend(db, records, floor_sqlite, args.runs)
        db.engine.dispose()
    report(f"SQLite {sqlite3.sqlite_version}", "sqlite3 executemany", sqlite_times, args.records)

    if args.no_postgres:
        return
    if pg_binary("initdb") is None:
        print("\nPostgreSQL: not measured, initdb is not installed")
        return
    with throwaway_postgres() as cluster:
        db = RecordsDatabase(cluster.url)
        version = db.engine.dialect.server_version_info
        pg_times = bench_backend(db, records, floor_postgres, args.runs)
        db.engine.dispose()
    name = "PostgreSQL " + ".".join(map(str, version or ()))
    report(f"{name} (local, fsync on)", "psycopg2 COPY FROM STDIN", pg_times, args.records)


if __name__ == "__main__":
    main()
