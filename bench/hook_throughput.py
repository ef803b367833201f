"""Records per second of each bundled convention's hooks on its bundled data, in process.

    .venv/bin/python bench/hook_throughput.py [--runs 3]

Each convention's records are planned and fetched from its bundled data into a scratch
store, as an ingest would, then every hook function is called on every record in this
process (no runner, no subprocess): what the parsers cost, not the engine. Rejections
count as done records; the median of the runs is reported with its range.
"""

import argparse
import contextlib
import importlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from osa_sdk.authoring import Hook  # noqa: E402
from osa_sdk.types import HookRecord, Reject  # noqa: E402

from osa_dagster.batch.fetch import fetch_raw_batch  # noqa: E402
from osa_dagster.batch.plan import plan_ingest  # noqa: E402
from osa_dagster.conventions.base import Convention  # noqa: E402
from osa_dagster.conventions.registry import load_conventions  # noqa: E402
from osa_dagster.engine.spec import HookSpec  # noqa: E402
from osa_dagster.settings import Settings  # noqa: E402
from osa_dagster.storage import BatchLayout, FileSystemStore  # noqa: E402


def hook_function(command: tuple[str, ...]) -> Hook:
    module, _, name = command[-1].partition(":")
    return getattr(importlib.import_module(module), name)


def fetched_records(
    convention: Convention, scratch: Path, limit: int | None = None
) -> list[HookRecord]:
    """The convention's first `limit` records (all: None), planned and fetched into a store
    in `scratch` as an ingest would, bound to their files."""
    store = FileSystemStore(scratch)
    plan = plan_ingest(convention, store, limit=limit, batch_size=1_000_000)
    (partition,) = plan.partitions
    files_root = scratch / BatchLayout(convention.name, partition).raw_files
    return [
        HookRecord.from_ingested(r).bind_files_root(files_root)
        for r in fetch_raw_batch(convention, store, partition).records
    ]


def hook_seconds(spec: HookSpec, records: list[HookRecord], runs: int) -> list[float]:
    """Seconds the hook's function takes over `records` in this process, once per run."""
    hook = hook_function(spec.command)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        for record in records:
            with contextlib.suppress(Reject):
                hook(record, **spec.config)
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    header = ("convention.hook", "records", "MB", "median s", "min-max s", "rec/s")
    print("{:<32}{:>8}{:>8}{:>10}{:>14}{:>9}".format(*header))
    for convention in load_conventions(Settings.from_env()).values():
        with tempfile.TemporaryDirectory(prefix="osa-bench-") as tmp:
            records = fetched_records(convention, Path(tmp))
            megabytes = sum(r.size_mb for r in records)
            for spec in convention.hooks:
                times = hook_seconds(spec, records, args.runs)
                median = statistics.median(times)
                print(
                    f"{convention.name + '.' + spec.name:<32}{len(records):>8}{megabytes:>8.1f}"
                    f"{median:>10.2f}{f'{min(times):.2f}-{max(times):.2f}':>14}"
                    f"{len(records) / median:>9.1f}"
                )
    print(f"{os.cpu_count()} CPUs; one process, hooks called directly")


if __name__ == "__main__":
    main()
