"""Peak memory of the orchestrating process: does it stay flat with partitions and file size?

    .venv/bin/python bench/orchestrator_memory.py [--partitions 20 200] [--batch-size 10]
                                                  [--big-records 10] [--big-file-mb 100]

Each measurement runs in a child process of its own (this script with --child), which
builds the project's Definitions, plans, then ingests every partition through the project's
`<conv>_ingest` job in process (one execute_in_process run per range of adjacent
partitions, as the sensor and the CLI run them), against a fresh filesystem store, SQLite
records DB and SQLite Dagster instance. The child reports
resource.getrusage(RUSAGE_SELF).ru_maxrss (peak RSS of the orchestrating process only:
hooks and their containers are other processes) once after setup and planning, and once
after the last partition.

  N partitions   the synthetic convention of tests/fixtures/scale_convention.py, batches of
                 --batch-size records of 100 bytes, the trivial SDK hook
  big batch      one batch of --big-records generated files of --big-file-mb MB each (the
                 `file_size` hook of tests/fixtures/big_files_convention.py, a stat)
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def child(kind: str, partitions: int, batch_size: int, big_records: int, big_mb: float) -> None:
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")])
    )
    os.environ["OSA_CONVENTIONS"] = "tests.fixtures.scale_convention"
    os.environ.pop("OSA_STORAGE", None)
    os.environ.pop("OSA_DATABASE_URL", None)
    from tests.fixtures import scale_convention as sc

    os.environ[sc.ENV_RECORDS] = str(partitions * batch_size)
    os.environ[sc.ENV_BATCH_SIZE] = str(batch_size)
    os.environ[sc.ENV_BIG_RECORDS] = str(big_records)
    os.environ[sc.ENV_BIG_FILE_MB] = str(big_mb)
    import warnings

    import dagster as dg

    from osa_dagster.definitions import build_definitions
    from osa_dagster.defs.assets import partitions_per_run
    from osa_dagster.defs.batch_sensors import contiguous_chunks
    from osa_dagster.defs.dagster_private import partition_range_tags

    warnings.filterwarnings("ignore", category=dg.BetaWarning)
    name = sc.NAME if kind == "partitions" else sc.BIG_NAME
    defs = build_definitions()
    with tempfile.TemporaryDirectory(prefix="osa-bench-mem-") as tmp:
        os.environ["OSA_DATA_DIR"] = str(Path(tmp) / "data")
        (Path(tmp) / "dagster").mkdir()
        with dg.instance_for_test(temp_dir=str(Path(tmp) / "dagster")) as instance:
            defs.resolve_job_def(f"{name}_plan").execute_in_process(instance=instance)
            keys = instance.get_dynamic_partitions(f"{name}_batches")
            job = defs.resolve_job_def(f"{name}_ingest")
            setup = _rss_mb()
            started = time.perf_counter()
            # As the new-batches sensor and `osa materialize` run them: adjacent partitions
            # together, OSA_PARTITIONS_PER_RUN (20) per run.
            for chunk in contiguous_chunks(keys, set(), partitions_per_run()):
                run_range = partition_range_tags(chunk[0], chunk[-1])
                assert job.execute_in_process(tags=run_range, instance=instance).success
            seconds = time.perf_counter() - started
            data_mb = (
                sum(f.stat().st_size for f in (Path(tmp) / "data").rglob("*") if f.is_file()) / 1e6
            )
    print(
        json.dumps(
            {
                "partitions": len(keys),
                "setup_mb": setup,
                "peak_mb": _rss_mb(),
                "seconds": seconds,
                "data_mb": data_mb,
            }
        )
    )


def measure(args: argparse.Namespace, kind: str, partitions: int = 1) -> dict:
    command = [
        sys.executable,
        __file__,
        "--child",
        kind,
        str(partitions),
        "--batch-size",
        str(args.batch_size),
        "--big-records",
        str(args.big_records),
        "--big-file-mb",
        str(args.big_file_mb),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--partitions", type=int, nargs="+", default=[20, 200])
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--big-records", type=int, default=10)
    parser.add_argument("--big-file-mb", type=float, default=100)
    parser.add_argument("--child", nargs=2, metavar=("KIND", "PARTITIONS"))
    args = parser.parse_args()
    if args.child:
        child(
            args.child[0], int(args.child[1]), args.batch_size, args.big_records, args.big_file_mb
        )
        return
    rows = [
        (f"{n} partitions x {args.batch_size} records", measure(args, "partitions", n))
        for n in args.partitions
    ]
    big_gb = args.big_records * args.big_file_mb / 1000
    rows.append(
        (
            f"1 batch, {args.big_records} x {args.big_file_mb:g} MB files ({big_gb:g} GB)",
            measure(args, "big"),
        )
    )
    print(
        "peak RSS of the orchestrating process (ru_maxrss, RUSAGE_SELF), one child process per "
        "row, in-process ingest runs of adjacent partitions, filesystem store, SQLite; "
        f"{os.cpu_count()} CPUs; 1 run per row"
    )
    print(
        f"{'workload':<42}{'after setup MB':>15}{'peak MB':>10}{'growth MB':>11}{'ingest s':>10}"
        f"{'data MB':>10}"
    )
    for label, r in rows:
        print(
            f"{label:<42}{r['setup_mb']:>15.0f}{r['peak_mb']:>10.0f}"
            f"{r['peak_mb'] - r['setup_mb']:>11.0f}{r['seconds']:>10.1f}{r['data_mb']:>10.0f}"
        )
    small, large = rows[0][1], rows[len(args.partitions) - 1][1]
    per = (large["peak_mb"] - small["peak_mb"]) / max(1, large["partitions"] - small["partitions"])
    print(
        f"peak growth from {small['partitions']} to {large['partitions']} partitions: "
        f"{large['peak_mb'] - small['peak_mb']:+.0f} MB ({per * 1000:+.0f} kB per partition)"
    )


if __name__ == "__main__":
    main()
