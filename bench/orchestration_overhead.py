"""What Dagster adds per partition, against a bare Python loop over the same pipeline steps.

    .venv/bin/python bench/orchestration_overhead.py [--runs 3] [--records 2000] [--batch-size 100]
        [--variants "runs of 20" "stock log" ...]

The same work each way: N synthetic records (1 kB file each) planned into batches, each
batch fetched, checked by a trivial SDK hook under the local runner (a real process per
batch, under a cgroup memory limit when there is one), published into SQLite and its
features stored. Every run starts from an empty store, records database and Dagster
instance (SQLite, with the storage of the embedded default's dagster.yaml), and checks that
all N records were published with their features.

  dagster      the convention's `<conv>_ingest` asset job (in-process executor, as deployed),
               one execute_in_process run per partition (OSA_PARTITIONS_PER_RUN=1),
               including the asset checks
  runs of 20   the same job, one run per range of 20 adjacent partitions: the default
               (OSA_PARTITIONS_PER_RUN), as the new-batches sensor and `osa materialize` run it
  single run   the same job, one run over every partition (BackfillPolicy.single_run())
  stock log    "runs of 20" with Dagster's own SQLite event log in place of the embedded
               profile's (osa_dagster/defs/event_log.py), which keeps its databases open
  bare steps   plan_ingest, then over every batch fetch_raw_batch, the hooks (run_hook_jobs,
               as the Dagster step runs them), publish_batch, store_batch_features: the floor
  bare same    the bare steps plus what the Dagster assets compute besides them
               (count_published and every check's verdict per batch): the fair floor

Timed: from after planning to the last partition done (planning is the same for all).
Variants alternate within each round (no warm-up round: one-time costs are small
against a run of 20 partitions), so that drift of the machine hits all alike.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
os.environ["OSA_CONVENTIONS"] = "tests.fixtures.bench_convention"
os.environ.pop("OSA_STORAGE", None)
os.environ.pop("OSA_DATABASE_URL", None)

import dagster as dg  # noqa: E402
import yaml  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from osa_dagster.batch.fetch import fetch_raw_batch  # noqa: E402
from osa_dagster.batch.hooks import (  # noqa: E402
    HookJob,
    machine_capacity,
    run_hook_jobs,
)
from osa_dagster.batch.plan import plan_ingest  # noqa: E402
from osa_dagster.batch.publish import publish_batch, store_batch_features  # noqa: E402
from osa_dagster.conventions.base import Convention  # noqa: E402
from osa_dagster.defs.batch_sensors import contiguous_chunks  # noqa: E402
from osa_dagster.defs.checks import CHECKS, BatchFacts, judge  # noqa: E402
from osa_dagster.defs.dagster_private import partition_range_tags  # noqa: E402
from osa_dagster.engine import LocalRunner, memory_limit_mode  # noqa: E402
from osa_dagster.records import (  # noqa: E402
    Feature,
    Record,
    database_url,
    open_database,
)
from osa_dagster.records.queries import count_published  # noqa: E402
from osa_dagster.settings import Settings  # noqa: E402
from osa_dagster.storage import artifact_store  # noqa: E402

CONVENTION = "bench_overhead"
# The bare loop has no Dagster run: its attempts and verdicts are labelled with this one.
BARE_RUN = "bare-loop"
warnings.filterwarnings("ignore", category=dg.BetaWarning)
VARIANTS = ("dagster", "runs of 20", "single run", "stock log", "bare same", "bare steps")


def _convention() -> Convention:
    from osa_dagster.conventions.registry import load_conventions

    return load_conventions(Settings.from_env())[CONVENTION]


def _outputs_check(expected: int) -> None:
    """A benchmark of runs that went wrong measures nothing."""
    db = open_database(database_url(Settings.from_env()))
    with db.session() as session:
        records = session.scalar(select(func.count()).select_from(Record))
        features = session.scalar(select(func.count()).select_from(Feature))
    if (records, features) != (expected, expected):
        raise RuntimeError(
            f"expected {expected} records and feature rows, got {records}, {features}"
        )


STORAGE_KEYS = ("run_storage", "event_log_storage", "schedule_storage")


def embedded_storage(home: Path) -> dict[str, Any]:
    """The storage of the repository's dagster.yaml (the embedded default), under `home`."""
    profile = (REPO / "dagster.yaml").read_text().replace("base_dir: dagster", f"base_dir: {home}")
    config = yaml.safe_load(profile)
    return {key: config[key] for key in STORAGE_KEYS}


def bench_instance(
    home: Path, event_log: str = "embedded"
) -> AbstractContextManager[dg.DagsterInstance]:
    """A Dagster instance in `home` with the embedded profile's storage, or with its event
    log replaced by Dagster's own SQLite one (`event_log="dagster"`), for comparison."""
    storage = embedded_storage(home)
    if event_log == "dagster":
        storage["event_log_storage"] = {
            **storage["event_log_storage"],
            "module": "dagster._core.storage.event_log",
            "class": "SqliteEventLogStorage",
        }
    return dg.instance_for_test(temp_dir=str(home), overrides=storage)


def run_dagster(home: Path, per_run: int | None, event_log: str = "embedded") -> float:
    """The ingest job over every partition, `per_run` adjacent partitions per run (None: all).

    The definitions are built here, after the round set OSA_DATA_DIR: their resources take
    the store and the records database from the settings when they are built."""
    from osa_dagster.definitions import build_definitions

    defs = build_definitions()
    with bench_instance(home, event_log) as instance:
        defs.resolve_job_def(f"{CONVENTION}_plan").execute_in_process(instance=instance)
        keys = instance.get_dynamic_partitions(f"{CONVENTION}_batches")
        job = defs.resolve_job_def(f"{CONVENTION}_ingest")
        started = time.perf_counter()
        for chunk in contiguous_chunks(keys, set(), per_run or len(keys)):
            result = job.execute_in_process(
                instance=instance,
                tags=partition_range_tags(chunk[0], chunk[-1]),
            )
            assert result.success
        elapsed = time.perf_counter() - started
        checks = [
            e
            for e in result.all_events
            if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION
        ]
        assert len(checks) == len(CHECKS) * len(chunk), "a check did not judge every partition"
        materialized = instance.get_materialized_partitions(dg.AssetKey([CONVENTION, "features"]))
        assert materialized == set(keys), "not every partition was materialised"
    return elapsed


def run_bare(same_work: bool) -> float:
    """The steps over every partition in the order one range run takes them, the hooks run
    as the Dagster step runs them (run_hook_jobs, within the same machine capacity)."""
    convention = _convention()
    store = artifact_store(Settings.from_env())
    db = open_database(database_url(Settings.from_env()))
    keys = plan_ingest(convention, store).partitions
    runner = LocalRunner.from_settings(Settings.from_env())
    capacity = machine_capacity(Settings.from_env())
    started = time.perf_counter()
    for key in keys:
        fetch_raw_batch(convention, store, key)
    jobs = [HookJob(key, spec.name) for key in keys for spec in convention.hooks]
    for result in run_hook_jobs(
        convention, store, runner, jobs, capacity=capacity, run_id=BARE_RUN
    ):
        assert result.progress is not None, result.error
    # With same_work, what the assets compute besides the steps: the archive's count for the
    # metadata, and their checks' verdicts (one audit of the batch per asset).
    for key in keys:
        publish_batch(convention, store, db, key, domain="bench")
        if same_work:
            count_published(db, convention.name)
            judge("published", BatchFacts(convention, store, db, key, BARE_RUN))
    for key in keys:
        store_batch_features(convention, store, db, key)
        if same_work:
            judge("features", BatchFacts(convention, store, db, key, BARE_RUN))
    return time.perf_counter() - started


def one_round(
    variants: dict[str, Callable[[Path], float]], scratch: Path, records: int
) -> dict[str, float]:
    times = {}
    for name, run in variants.items():
        with tempfile.TemporaryDirectory(dir=scratch) as tmp:
            os.environ["OSA_DATA_DIR"] = str(Path(tmp) / "data")
            (Path(tmp) / "dagster").mkdir()
            times[name] = run(Path(tmp) / "dagster")
            _outputs_check(records)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=VARIANTS,
        default=list(VARIANTS),
        help="which to run; the bare loops always run (they are the floor)",
    )
    args = parser.parse_args()
    chosen = [name for name in VARIANTS if name in args.variants or name.startswith("bare")]
    os.environ["OSA_BENCH_RECORDS"] = str(args.records)
    os.environ["OSA_BENCH_BATCH_SIZE"] = str(args.batch_size)
    partitions = -(-args.records // args.batch_size)

    variants: dict[str, Callable[[Path], float]] = {
        "dagster": lambda home: run_dagster(home, 1),
        "runs of 20": lambda home: run_dagster(home, 20),
        "stock log": lambda home: run_dagster(home, 20, event_log="dagster"),
        "single run": lambda home: run_dagster(home, None),
        "bare same": lambda home: run_bare(same_work=True),
        "bare steps": lambda home: run_bare(same_work=False),
    }
    variants = {name: variants[name] for name in chosen}
    times: dict[str, list[float]] = {name: [] for name in chosen}
    with tempfile.TemporaryDirectory(prefix="osa-bench-") as tmp:
        for _ in range(args.runs):
            for name, seconds in one_round(variants, Path(tmp), args.records).items():
                times[name].append(seconds)

    print(
        f"{args.records} records in {partitions} partitions, trivial SDK hook under "
        f"LocalRunner({memory_limit_mode(Settings.from_env())}), "
        "SQLite records DB and Dagster instance; "
        f"{args.runs} runs per variant (no warm-up: one-time imports are < 1% of a run), "
        f"{os.cpu_count()} CPUs"
    )
    floor = statistics.median(times["bare same"])
    steps = statistics.median(times["bare steps"])
    print(
        f"{'variant':<12}{'median s':>10}{'min-max s':>16}{'/bare same':>11}{'/bare steps':>12}"
        f"{'overhead s/partition':>22}"
    )
    for name in chosen:
        samples = times[name]
        median = statistics.median(samples)
        spread = f"{min(samples):.2f}-{max(samples):.2f}"
        overhead = (median - floor) / partitions
        print(
            f"{name:<12}{median:>10.2f}{spread:>16}{median / floor:>11.2f}{median / steps:>12.2f}"
            f"{overhead:>22.3f}"
        )
    print("overhead s/partition = (median - median of 'bare same') / partitions")


if __name__ == "__main__":
    main()
