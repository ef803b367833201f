"""Bulk publish of 100,000 records through publish_records, against the floor of a raw insert.

    .venv/bin/python bench/publish_throughput.py [--runs 3] [--records 100000] [--no-postgres]

Into SQLite (a file, WAL, as the records database opens it) and into a throwaway
PostgreSQL 15 cluster (started and stopped here, on 127.0.0.1). Every run starts from empty
tables with the project's schema (primary keys, unique (convention, source_id), indexes,
the features' foreign key). Per backend:

  publish         publish_records(...) of all N records in one call, into the empty table:
                  SRNs made, metadata serialised, rows written, every SRN returned
  republish       the same call again on the full table (a re-run of the partition: nothing
                  new, the same SRNs returned)
  floor           the same rows (SRNs from the same maker, JSON made in the loop too) with
                  the bare driver in one transaction: sqlite3 executemany, or psycopg2 COPY
                  FROM STDIN; publish and republish are divided by this
  features        store_features(...) of one small feature row per published record
  features floor  the same feature rows with the bare driver, as the floor; features is
                  divided by this

Runs alternate between the variants; the figures are medians with min-max, and each ratio
is to its floor measured in the same runs.
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
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlalchemy import func, select  # noqa: E402

from osa_dagster.local_postgres import pg_binary, throwaway_postgres  # noqa: E402
from osa_dagster.records import (  # noqa: E402
    Base,
    FeatureRows,
    PublishResult,
    Record,
    RecordsDatabase,
    RecordToPublish,
    make_srns,
    publish_records,
    store_features,
)

CONVENTION = "bench"
COLUMNS = ("srn", "convention", "source_id", "partition", "metadata", "published_at")
FEATURE_COLUMNS = ("record_srn", "hook", "row_index", "data")
# Each variant's ratio is to the floor doing the same writes.
BASELINE = {
    "publish": "floor",
    "republish": "floor",
    "floor": "floor",
    "features": "features floor",
    "features floor": "features floor",
}
T = TypeVar("T")


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


def sqlite_connection(db: RecordsDatabase) -> sqlite3.Connection:
    db.engine.dispose()
    connection = sqlite3.connect(db.url.removeprefix("sqlite:///"))
    # As the records database opens it: the features' foreign key is checked too.
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA foreign_keys=ON")
    return connection


def floor_sqlite(db: RecordsDatabase, records: list[RecordToPublish]) -> list[str]:
    connection = sqlite_connection(db)
    try:
        with connection:
            values = [(*row[:5], row[5].isoformat(" ")) for row in rows(records)]
            connection.executemany(
                f"INSERT INTO records ({', '.join(COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?)", values
            )
    finally:
        connection.close()
    return [row[0] for row in values]


def copy_postgres(db: RecordsDatabase, table: str, columns: tuple[str, ...], lines: list) -> None:
    raw = db.engine.raw_connection()
    try:
        buffer = io.StringIO()
        for fields in lines:
            buffer.write("\t".join(str(f).replace("\\", "\\\\") for f in fields) + "\n")
        buffer.seek(0)
        with raw.cursor() as cursor:
            cursor.copy_expert(f"COPY {table} ({', '.join(columns)}) FROM STDIN", buffer)
        raw.commit()
    finally:
        raw.close()


def floor_postgres(db: RecordsDatabase, records: list[RecordToPublish]) -> list[str]:
    values = [(*row[:5], row[5].isoformat()) for row in rows(records)]
    copy_postgres(db, "records", COLUMNS, values)
    return [row[0] for row in values]


def feature_rows(srns: list[str]) -> list[FeatureRows]:
    """One small feature row per record, as a feature extractor makes them."""
    return [FeatureRows(srn, [{"atoms": n, "chains": n % 7}]) for n, srn in enumerate(srns)]


def feature_values(features: list[FeatureRows]) -> list[tuple]:
    return [
        (f.record_srn, "bench", index, json.dumps(row))
        for f in features
        for index, row in enumerate(f.rows)
    ]


def features_floor_sqlite(db: RecordsDatabase, features: list[FeatureRows]) -> None:
    connection = sqlite_connection(db)
    try:
        with connection:
            connection.executemany(
                f"INSERT INTO features ({', '.join(FEATURE_COLUMNS)}) VALUES (?, ?, ?, ?)",
                feature_values(features),
            )
    finally:
        connection.close()


def features_floor_postgres(db: RecordsDatabase, features: list[FeatureRows]) -> None:
    copy_postgres(db, "features", FEATURE_COLUMNS, feature_values(features))


def publish(db: RecordsDatabase, records: list[RecordToPublish]) -> PublishResult:
    return publish_records(
        db, convention=CONVENTION, domain="bench", partition="p0", records=records
    )


def timed(times: list[float], work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    started = time.perf_counter()
    result = work(*args, **kwargs)
    times.append(time.perf_counter() - started)
    return result


def bench_backend(
    db: RecordsDatabase,
    records: list[RecordToPublish],
    floors: tuple[Callable, Callable],
    runs: int,
) -> dict[str, list[float]]:
    floor, features_floor = floors
    times: dict[str, list[float]] = {variant: [] for variant in BASELINE}
    for _ in range(runs):
        fresh_tables(db)
        published = timed(times["publish"], publish, db, records)
        assert published.newly_published == len(records)
        republished = timed(times["republish"], publish, db, records)
        assert republished.newly_published == 0 and republished.srns == published.srns
        assert count(db) == len(records)
        features = feature_rows(list(published.srns.values()))
        stored = timed(times["features"], store_features, db, hook="bench", features=features)
        assert stored == len(records)

        fresh_tables(db)
        srns = timed(times["floor"], floor, db, records)
        assert count(db) == len(records)
        timed(times["features floor"], features_floor, db, feature_rows(srns))
    return times


def report(backend: str, floor_name: str, times: dict[str, list[float]], records: int) -> None:
    print(f"\n{backend} (floor: {floor_name})")
    print(f"{'variant':<15}{'median s':>10}{'min-max s':>14}{'rows/s':>12}{'/floor':>8}")
    for name, samples in times.items():
        median = statistics.median(samples)
        floor = statistics.median(times[BASELINE[name]])
        spread = f"{min(samples):.2f}-{max(samples):.2f}"
        print(
            f"{name:<15}{median:>10.2f}{spread:>14}{records / median:>12,.0f}{median / floor:>8.2f}"
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
        sqlite_times = bench_backend(db, records, (floor_sqlite, features_floor_sqlite), args.runs)
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
        pg_times = bench_backend(db, records, (floor_postgres, features_floor_postgres), args.runs)
        db.engine.dispose()
    name = "PostgreSQL " + ".".join(map(str, version or ()))
    report(f"{name} (local, fsync on)", "psycopg2 COPY FROM STDIN", pg_times, args.records)


if __name__ == "__main__":
    main()
