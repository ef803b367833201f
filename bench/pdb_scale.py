"""PDB scale: 200,000 synthetic record references planned into 2,000 partitions.

    .venv/bin/python bench/pdb_scale.py [--runs 3] [--records 200000] [--batch-size 100]
                                        [--e2e-records 3000]

The synthetic convention (tests/fixtures/scale_convention.py) yields its references from a
counter, so that what is timed is the project's plan job, its store and the Dagster
instance. Each planning run starts from an empty filesystem store and a fresh SQLite
Dagster instance.

  plan           the convention's real `<conv>_plan` job (execute_in_process): discover,
                 freeze 2,000 manifests into the store, add 2,000 dynamic partitions
  plan again     the same job once more: every record is planned already, so it looks each
                 up in the plan index and writes nothing
  sensor tick    the `<conv>_new_batches` sensor evaluated with dg.build_sensor_context
                 over the 2,000 partitions: first tick (no cursor: 100 run requests over
                 ranges of 20) and
                 a steady tick (cursor at the end: nothing new)
  list keys      instance.get_dynamic_partitions over the 2,000 partitions
  end to end     --e2e-records planned and ingested through the project's `<conv>_ingest`
                 job, one execute_in_process run per partition (how the sensor and the CLI
                 run it), the trivial SDK hook under the local runner, SQLite records DB;
                 timed from after planning to the last partition done, all records checked
                 to be published with their features.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
os.environ["OSA_CONVENTIONS"] = "tests.fixtures.scale_convention"
os.environ.pop("OSA_STORAGE", None)
os.environ.pop("OSA_DATABASE_URL", None)

import dagster as dg  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from osa_dagster.defs.assets import partitions_per_run  # noqa: E402
from osa_dagster.engine import memory_limit_mode  # noqa: E402
from osa_dagster.records import Feature, Record, database_url, open_database  # noqa: E402
from osa_dagster.settings import Settings  # noqa: E402
from tests.fixtures.scale_convention import ENV_BATCH_SIZE, ENV_RECORDS, NAME  # noqa: E402

warnings.filterwarnings("ignore", category=dg.BetaWarning)
PARTITIONS = f"{NAME}_batches"


def spread(samples: list[float], unit: float = 1.0, digits: int = 3) -> str:
    return (
        f"{statistics.median(samples) * unit:>10.{digits}f}"
        f"{f'{min(samples) * unit:.{digits}f}-{max(samples) * unit:.{digits}f}':>22}"
    )


def plan_round(defs: dg.Definitions, scratch: Path, expected: int, ticks: int) -> dict:
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        os.environ["OSA_DATA_DIR"] = str(Path(tmp) / "data")
        (Path(tmp) / "dagster").mkdir()
        with dg.instance_for_test(temp_dir=str(Path(tmp) / "dagster")) as instance:
            started = time.perf_counter()
            result = defs.resolve_job_def(f"{NAME}_plan").execute_in_process(instance=instance)
            plan_s = time.perf_counter() - started
            assert result.success
            # Planned again, every record is planned already: each is looked up in the plan
            # index, and nothing is written.
            started = time.perf_counter()
            again = defs.resolve_job_def(f"{NAME}_plan").execute_in_process(instance=instance)
            plan_again_s = time.perf_counter() - started
            assert again.success
            figures: dict[str, list[float]] = {"first tick": [], "steady tick": [], "list": []}
            sensor = defs.get_sensor_def(f"{NAME}_new_batches")
            for _ in range(ticks):
                # The sensor requests runs over ranges of up to OSA_PARTITIONS_PER_RUN.
                first_requests = -(-expected // partitions_per_run())
                for name, cursor, want in (
                    ("first tick", None, first_requests),
                    ("steady tick", str(expected), 0),
                ):
                    context = dg.build_sensor_context(
                        instance=instance, definitions=defs, cursor=cursor
                    )
                    started = time.perf_counter()
                    tick = sensor(context)
                    figures[name].append(time.perf_counter() - started)
                    assert len(tick.run_requests) == want, (name, len(tick.run_requests))
                started = time.perf_counter()
                keys = instance.get_dynamic_partitions(PARTITIONS)
                figures["list"].append(time.perf_counter() - started)
                assert len(keys) == expected
    return {"plan": plan_s, "plan again": plan_again_s, **figures}


def end_to_end(defs: dg.Definitions, scratch: Path, records: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        os.environ["OSA_DATA_DIR"] = str(Path(tmp) / "data")
        (Path(tmp) / "dagster").mkdir()
        with dg.instance_for_test(temp_dir=str(Path(tmp) / "dagster")) as instance:
            defs.resolve_job_def(f"{NAME}_plan").execute_in_process(
                instance=instance,
                run_config={"ops": {f"{NAME}_plan_batches": {"config": {"limit": records}}}},
            )
            keys = instance.get_dynamic_partitions(PARTITIONS)
            job = defs.resolve_job_def(f"{NAME}_ingest")
            started = time.perf_counter()
            for key in keys:
                assert job.execute_in_process(partition_key=key, instance=instance).success
            elapsed = time.perf_counter() - started
        db = open_database(database_url(Settings.from_env()))
        with db.session() as session:
            published = session.scalar(select(func.count()).select_from(Record))
            features = session.scalar(select(func.count()).select_from(Feature))
        if (published, features) != (records, records):
            raise RuntimeError(f"expected {records} records+features, got {published}, {features}")
    return elapsed, len(keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--ticks", type=int, default=3, help="sensor ticks per planning run")
    parser.add_argument("--e2e-records", type=int, default=20_000)
    args = parser.parse_args()
    os.environ[ENV_RECORDS] = str(args.records)
    os.environ[ENV_BATCH_SIZE] = str(args.batch_size)
    partitions = -(-args.records // args.batch_size)

    from osa_dagster.definitions import build_definitions

    defs = build_definitions()
    rounds = []
    with tempfile.TemporaryDirectory(prefix="osa-bench-scale-") as tmp:
        for _ in range(args.runs):
            rounds.append(plan_round(defs, Path(tmp), partitions, args.ticks))
        e2e_s, e2e_partitions = end_to_end(defs, Path(tmp), args.e2e_records)

    print(
        f"{args.records:,} synthetic references in {partitions:,} partitions of {args.batch_size}; "
        f"{args.runs} planning runs (fresh filesystem store + SQLite Dagster instance each), "
        f"{args.ticks} sensor ticks and listings per run; {os.cpu_count()} CPUs"
    )
    print(f"{'measure':<40}{'median':>10}{'min-max':>22}")
    plans = [r["plan"] for r in rounds]
    print(f"{'plan job, s':<40}{spread(plans, digits=2)}")
    again = [r["plan again"] for r in rounds]
    print(f"{'plan job again (nothing new), s':<40}{spread(again, digits=2)}")
    print(
        f"{'plan job, records/s':<40}{args.records / statistics.median(plans):>10,.0f}"
        f"{f'{args.records / max(plans):,.0f}-{args.records / min(plans):,.0f}':>22}"
    )
    for name, label in (
        ("first tick", f"sensor first tick ({partitions:,} partitions), ms"),
        ("steady tick", "sensor steady tick (0 new), ms"),
        ("list", f"get_dynamic_partitions ({partitions:,}), ms"),
    ):
        samples = [s for r in rounds for s in r[name]]
        print(f"{label:<40}{spread(samples, unit=1000, digits=1)}")
    print(
        f"\nend to end: {args.e2e_records:,} records in {e2e_partitions} partitions, one "
        f"in-process `{NAME}_ingest` run per partition, trivial SDK hook under "
        f"LocalRunner({memory_limit_mode(Settings.from_env())}), SQLite records DB (1 run)"
    )
    print(
        f"  {e2e_s:.1f} s, {args.e2e_records / e2e_s:.1f} records/s, "
        f"{e2e_s / e2e_partitions:.2f} s per partition; at that rate {args.records:,} records "
        f"({partitions:,} partitions) would take {e2e_s / e2e_partitions * partitions / 3600:.1f} h"
    )


if __name__ == "__main__":
    main()
