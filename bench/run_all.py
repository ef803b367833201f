"""Run every benchmark and write bench/RESULTS.md: the machine, the date, each script's table.

    .venv/bin/python bench/run_all.py [--quick]

Each script prints medians and min-max over its repeated runs; this collects them. The
scripts run one after another (never at once: they would slow each other down). --quick
runs fewer repetitions, to check that everything still runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent

# (script, arguments, arguments with --quick)
SCRIPTS = [
    ("orchestration_overhead.py", ["--runs", "3"], ["--runs", "1", "--records", "400"]),
    (
        "parallel_hooks.py",
        ["--runs", "3"],
        ["--runs", "1", "--cpu-ms", "1", "--no-overhead"],
    ),
    ("publish_throughput.py", ["--runs", "3"], ["--runs", "1", "--records", "10000"]),
    ("runner_overhead.py", ["--runs", "30"], ["--runs", "5"]),
    ("store_transfer.py", ["--runs", "5"], ["--runs", "1"]),
    (
        "pdb_scale.py",
        ["--runs", "3"],
        ["--runs", "1", "--records", "20000", "--e2e-records", "300"],
    ),
    (
        "plan_scale.py",
        [],
        ["--records", "2000", "20000", "--batch-sizes", "500"],
    ),
    (
        "orchestrator_memory.py",
        [],
        ["--partitions", "2", "4", "--big-records", "2", "--big-file-mb", "5"],
    ),
    ("oom_recovery.py", ["--runs", "3"], ["--runs", "1", "--records", "10", "--position", "5"]),
    ("lease_overhead.py", ["--runs", "5"], ["--runs", "1", "--cycles", "20"]),
    ("feature_caps.py", ["--runs", "3"], ["--runs", "1", "--rows", "10000"]),
]


def machine() -> str:
    cpu = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = ""
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        kb = int(meminfo.read_text().split()[1])
        memory = f", {kb / 1024**2:.0f} GB RAM"
    return (
        f"{cpu}, {os.cpu_count()} CPUs{memory}; {platform.system()} {platform.release()}; "
        f"Python {platform.python_version()}; dagster {version('dagster')}, "
        f"SQLAlchemy {version('sqlalchemy')}"
    )


HAND_WRITTEN = "## Reading the figures"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", type=Path, default=BENCH / "RESULTS.md")
    args = parser.parse_args()
    sections = []
    for script, full, quick in SCRIPTS:
        arguments = quick if args.quick else full
        command = [sys.executable, str(BENCH / script), *arguments]
        print(f"running {script} {' '.join(arguments)}", flush=True)
        started = time.perf_counter()
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - started
        output = done.stdout.strip()
        if done.returncode != 0:
            output += f"\n\nFAILED (exit {done.returncode}):\n{done.stderr.strip()[-3000:]}"
        print(output, flush=True)
        sections.append(
            f"## {script}\n\n`.venv/bin/python bench/{script} {' '.join(arguments)}` "
            f"({seconds:.0f} s)\n\n```\n{output}\n```\n"
        )
    header = (
        "# Benchmark results\n\n"
        f"Written by `bench/run_all.py{' --quick' if args.quick else ''}` on "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC.\n\nMachine: {machine()}\n\n"
    )
    # The hand-written reading of the figures, at the end of the file, survives a rewrite.
    kept = ""
    if args.output.exists():
        previous = args.output.read_text()
        kept = previous[previous.find(HAND_WRITTEN) :] if HAND_WRITTEN in previous else ""
    args.output.write_text(header + "\n".join(sections) + ("\n" + kept if kept else ""))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
