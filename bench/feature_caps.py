"""What the feature caps bound: the records database's write of one batch's features.

    .venv/bin/python bench/feature_caps.py [--rows 100000] [--records 10] [--runs 3]

A batch's feature rows are stored in one transaction (records/publish.py, store_features),
which holds SQLite's write lock for as long as it runs: a lease renewal waiting behind it
fails after the busy timeout (30 s). With the caps, a hook brings at most
MAX_FEATURE_ROWS_PER_BATCH rows to a batch. This stores `rows` empty rows over `records`
records into a fresh SQLite records database (a file, WAL) and reports how long the
transaction took, and what the database file and its WAL grew by; the probe's 3,000,000 rows
can be given as `--rows 3000000 --records 1` for comparison.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from osa_sdk.contract import MAX_FEATURE_ROWS_PER_BATCH  # noqa: E402

from osa_dagster.records import RecordsDatabase  # noqa: E402
from osa_dagster.records.publish import (  # noqa: E402
    FeatureRows,
    RecordToPublish,
    publish_records,
    store_features,
)


def one_run(rows: int, records: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "records.db"
        db = RecordsDatabase(f"sqlite:///{path}")
        try:
            published = publish_records(
                db,
                convention="bench",
                domain="bench",
                partition="p",
                records=[RecordToPublish(source_id=f"r{n}", metadata={}) for n in range(records)],
            )
            per_record = rows // records
            features = [FeatureRows(srn, [{}] * per_record) for srn in published.srns.values()]
            started = time.perf_counter()
            store_features(db, hook="bench", features=features)
            seconds = time.perf_counter() - started
            size = sum(p.stat().st_size for p in Path(folder).iterdir())
        finally:
            db.engine.dispose()
    return seconds, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=MAX_FEATURE_ROWS_PER_BATCH)
    parser.add_argument("--records", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    results = [one_run(args.rows, args.records) for _ in range(args.runs)]
    seconds = [s for s, _ in results]
    print(
        f"{args.rows} feature rows over {args.records} records, one store_features "
        f"transaction into SQLite, {args.runs} runs"
    )
    print(
        f"transaction s: median {statistics.median(seconds):.2f}, "
        f"min-max {min(seconds):.2f}-{max(seconds):.2f}; "
        f"database + WAL: {max(size for _, size in results) / 2**20:.0f} MB"
    )


if __name__ == "__main__":
    main()
