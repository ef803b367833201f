"""Planning a whole database: wall time and peak memory of the plan job as references grow.

    .venv/bin/python bench/plan_scale.py [--records 200000 2000000] [--batch-sizes 5000 100]
                                         [--runs 1]

Each measurement runs in a fresh child process (this script with --child) against an empty
filesystem store and a fresh SQLite Dagster instance: the convention's real `<conv>_plan`
job (execute_in_process) over the synthetic convention of tests/fixtures/scale_convention.py,
which yields its references from a counter, so what is timed is discovery consumed as a
stream, the plan index, the manifests and the registration of the dynamic partitions. The
child then plans again a source that lists 1% fewer references (nothing new: every record
is looked up in the index and the records database; being a whole listing, the plan then
sweeps the index for the 1% gone upstream, see osa_dagster/batch/upstream.py).
It reports its wall and CPU seconds (CPU seconds tell less of what else the machine runs)
and its peak RSS (resource.getrusage(RUSAGE_SELF).ru_maxrss,
the orchestrating process only) after the first plan and after the second.

The peaks of the largest and the smallest record count are compared per batch size, and the
partition count UniProtKB's 199,000,000 entries would get at the uniprot convention's batch
size is printed.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

UNIPROTKB_ENTRIES = 199_000_000  # release 2025_04
DAGSTER_PARTITIONS_ADVISED = 100_000


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child(records: int, batch_size: int, scratch: str) -> None:
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")])
    )
    os.environ["OSA_CONVENTIONS"] = "tests.fixtures.scale_convention"
    os.environ["OSA_DATA_DIR"] = str(Path(scratch) / "data")
    os.environ.pop("OSA_STORAGE", None)
    os.environ.pop("OSA_DATABASE_URL", None)
    from tests.fixtures import scale_convention as sc

    os.environ[sc.ENV_RECORDS] = str(records)
    os.environ[sc.ENV_BATCH_SIZE] = str(batch_size)
    import warnings

    import dagster as dg

    from osa_dagster.definitions import build_definitions

    warnings.filterwarnings("ignore", category=dg.BetaWarning)
    defs = build_definitions()
    job = defs.resolve_job_def(f"{sc.NAME}_plan")
    (Path(scratch) / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(Path(scratch) / "dagster")) as instance:
        setup_mb = _peak_mb()
        started, cpu = time.perf_counter(), _cpu_s()
        assert job.execute_in_process(instance=instance).success
        plan_s, plan_cpu_s = time.perf_counter() - started, _cpu_s() - cpu
        plan_mb = _peak_mb()
        os.environ[sc.ENV_RECORDS] = str(records - records // 100)
        again = build_definitions().resolve_job_def(f"{sc.NAME}_plan")
        started = time.perf_counter()
        assert again.execute_in_process(instance=instance).success
        again_s = time.perf_counter() - started
        partitions = len(instance.get_dynamic_partitions(f"{sc.NAME}_batches"))
    print(
        json.dumps(
            {
                "setup_mb": setup_mb,
                "plan_s": plan_s,
                "plan_cpu_s": plan_cpu_s,
                "plan_mb": plan_mb,
                "again_s": again_s,
                "peak_mb": _peak_mb(),
                "partitions": partitions,
            }
        )
    )


def measure(records: int, batch_size: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="osa-bench-plan-") as scratch:
        done = subprocess.run(
            [sys.executable, __file__, "--child", str(records), str(batch_size), scratch],
            check=True,
            capture_output=True,
            text=True,
        )
    figures: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    expected = -(-records // batch_size)
    if figures["partitions"] != expected:
        raise RuntimeError(f"{figures['partitions']} partitions registered, not {expected}")
    return figures


def uniprot_batch_size() -> int:
    from osa_dagster.conventions.registry import load_conventions
    from osa_dagster.settings import Settings

    return load_conventions(Settings.from_env(), extra_modules=())["uniprot"].batch_size


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, nargs="+", default=[200_000, 2_000_000])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[5000, 100])
    parser.add_argument("--runs", type=int, default=1, help="fresh children per row")
    args = parser.parse_args()

    print(
        "the synthetic convention's `plan` job in a fresh process per run: empty filesystem "
        f"store, fresh SQLite Dagster instance; {args.runs} run(s) per row (median), "
        f"{os.cpu_count()} CPUs"
    )
    print(
        f"{'references':>12}{'batch':>7}{'partitions':>12}{'plan s':>9}{'CPU s':>8}{'refs/s':>10}"
        f"{'peak MB':>9}{'again s':>9}{'peak MB':>9}{'setup MB':>10}"
    )
    peaks: dict[int, dict[int, float]] = {}
    plan_s: dict[int, dict[int, float]] = {}
    for batch_size in args.batch_sizes:
        for records in args.records:
            runs = [measure(records, batch_size) for _ in range(args.runs)]

            def median(name: str, runs: list[dict[str, float]] = runs) -> float:
                return statistics.median(run[name] for run in runs)

            peaks.setdefault(batch_size, {})[records] = median("plan_mb")
            plan_s.setdefault(records, {})[batch_size] = median("plan_s")
            print(
                f"{records:>12,}{batch_size:>7,}{-(-records // batch_size):>12,}"
                f"{median('plan_s'):>9.1f}{median('plan_cpu_s'):>8.1f}"
                f"{records / median('plan_s'):>10,.0f}"
                f"{median('plan_mb'):>9.0f}{median('again_s'):>9.1f}{median('peak_mb'):>9.0f}"
                f"{median('setup_mb'):>10.0f}",
                flush=True,
            )
    print(
        "plan s / CPU s: wall and CPU (user + system) seconds of the first plan; peak MB: "
        "ru_maxrss after it, then after planning again a whole listing with 1% gone "
        "(nothing new)"
    )
    for batch_size, by_records in peaks.items():
        low, high = min(by_records), max(by_records)
        if low != high:
            print(
                f"batch {batch_size:,}: peak at {high:,} / peak at {low:,} references = "
                f"{by_records[high] / by_records[low]:.2f}"
            )
    for records, by_size in plan_s.items():
        small, large = min(by_size), max(by_size)
        if small != large:
            extra = -(-records // small) - -(-records // large)
            print(
                f"{records:,} references: each partition more costs "
                f"{(by_size[small] - by_size[large]) / extra * 1000:.1f} ms "
                f"(batches of {small:,} against {large:,})"
            )
    size = uniprot_batch_size()
    count = -(-UNIPROTKB_ENTRIES // size)
    verdict = "under" if count < DAGSTER_PARTITIONS_ADVISED else "OVER"
    print(
        f"UniProtKB, {UNIPROTKB_ENTRIES:,} entries at the uniprot convention's batch size "
        f"{size:,}: {count:,} partitions, {verdict} Dagster's advised "
        f"{DAGSTER_PARTITIONS_ADVISED:,} (at 5,000 records per partition: "
        f"{-(-UNIPROTKB_ENTRIES // 5000):,})"
    )


if __name__ == "__main__":
    main()
