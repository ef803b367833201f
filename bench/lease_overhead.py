"""What a batch lease costs a step: acquire, heartbeat thread, release, per batch.

    .venv/bin/python bench/lease_overhead.py [--cycles 200] [--runs 5] [--no-postgres]

Into SQLite (a file, WAL, as the records database opens it) and into a throwaway
PostgreSQL 15 cluster (started and stopped here, on 127.0.0.1). Per backend:

  lease      BatchLeases.hold(...) entered and left on `cycles` batches, one after another:
             INSERT ... ON CONFLICT DO NOTHING, a heartbeat thread started and joined, DELETE
  floor      the same two committed writes without the rest (an INSERT of one row, then its
             DELETE, through the same engine): what the lease's durability costs by itself

Runs alternate between the variants; the figures are medians of the per-cycle time over
`runs` runs, with min-max, and the ratio to the floor.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlalchemy import text  # noqa: E402

from osa_dagster.batch.lease import BatchLeases  # noqa: E402
from osa_dagster.local_postgres import pg_binary, throwaway_postgres  # noqa: E402
from osa_dagster.records import RecordsDatabase  # noqa: E402


def _lease_cycles(db: RecordsDatabase, cycles: int) -> float:
    leases = BatchLeases(db)
    started = time.perf_counter()
    for number in range(cycles):
        with leases.hold("bench", f"batch-{number}", step="bench", wait_s=0):
            pass
    return (time.perf_counter() - started) / cycles


def _floor_cycles(db: RecordsDatabase, cycles: int) -> float:
    started = time.perf_counter()
    for number in range(cycles):
        with db.session() as session, session.begin():
            session.execute(text("INSERT INTO bench_floor VALUES (:k)"), {"k": f"batch-{number}"})
        with db.session() as session, session.begin():
            session.execute(text("DELETE FROM bench_floor WHERE k = :k"), {"k": f"batch-{number}"})
    return (time.perf_counter() - started) / cycles


def _measure(name: str, url: str, cycles: int, runs: int) -> None:
    db = RecordsDatabase(url)
    variants: dict[str, Callable[[RecordsDatabase, int], float]] = {
        "lease": _lease_cycles,
        "floor": _floor_cycles,
    }
    times: dict[str, list[float]] = {variant: [] for variant in variants}
    with db.session() as session, session.begin():  # the schema, outside the timings
        session.execute(text("CREATE TABLE bench_floor (k VARCHAR(64) PRIMARY KEY)"))
    for _ in range(runs):
        for variant, cycle in variants.items():
            times[variant].append(cycle(db, cycles))
    db.engine.dispose()
    floor = statistics.median(times["floor"])
    print(f"\n{name}")
    print(f"{'variant':<8}{'median ms':>11}{'min-max ms':>16}{'/floor':>8}")
    for variant, values in times.items():
        median = statistics.median(values)
        print(
            f"{variant:<8}{median * 1000:>11.2f}"
            f"{f'{min(values) * 1000:.2f}-{max(values) * 1000:.2f}':>16}{median / floor:>8.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    print(f"{args.cycles} batches per run, {args.runs} runs per variant")
    with tempfile.TemporaryDirectory(prefix="osa-lease-bench-") as folder:
        _measure("SQLite", f"sqlite:///{folder}/records.db", args.cycles, args.runs)
    if args.no_postgres:
        return
    if pg_binary("initdb") is None:
        print("\nPostgreSQL: not measured, initdb is not installed")
        return
    with throwaway_postgres() as cluster:
        _measure("PostgreSQL", cluster.url, args.cycles, args.runs)


if __name__ == "__main__":
    main()
