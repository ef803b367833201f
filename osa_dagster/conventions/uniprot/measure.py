"""Measure the uniprot hooks on a flat file: throughput and peak memory per hook.

    python -m osa_dagster.conventions.uniprot.measure [--flat-file PATH] [--repeat 5]

The flat file's entries are fetched into one batch. Each hook then runs twice: in this
process, over every record `--repeat` times, for its throughput (records/s, median); and
once as one process over the whole batch through the real entrypoint
(the SDK's ``python -m osa_sdk hook ...``), the way the engine runs it, for its peak memory:
the high-water mark of its RSS (VmHWM, Linux) and, when a cgroup v1 memory controller is
usable (root on Linux), the cgroup's peak. This is how the memory ladder of the uniprot
convention was chosen.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from osa_sdk.authoring import Hook
from osa_sdk.contract import (
    ENV_FILES,
    ENV_HOOK_NAME,
    ENV_IN,
    ENV_OUT,
    FEATURES_FILE,
    FILES_DIR,
    RECORDS_FILE,
)
from osa_sdk.runtime import run_ingest
from osa_sdk.types import HookRecord, IngesterRecord

from osa_dagster.conventions.uniprot import hooks
from osa_dagster.conventions.uniprot.ingester import DEFAULT_FLAT_FILE, UniProtFlatFileIngester
from osa_dagster.engine.cgroup import NAME_PREFIX, MemoryCgroup, usable_parent

HOOKS = ("validate_sequence", "extract_features")
_UNLIMITED_MB = 8192

# Runs the SDK's hook entrypoint, then writes the process's own RSS high-water mark (kB).
# wait4()'s ru_maxrss would not do: Linux carries the peak of the process that spawned the
# child over its exec, so a hook started from a big process (pytest with Dagster loaded)
# would seem to need that process's memory. VmHWM belongs to the address space that exec
# created.
_REPORT_PEAK = """
import runpy, sys
from pathlib import Path
target, report = sys.argv[1:3]
sys.argv = ["osa_sdk", "hook", target]
try:
    runpy.run_module("osa_sdk", run_name="__main__", alter_sys=True)
finally:
    status = Path("/proc/self/status").read_text().splitlines()
    Path(report).write_text(next(x for x in status if x.startswith("VmHWM:")).split()[1])
"""


@dataclass(frozen=True)
class HookMeasurement:
    hook: str
    records: int
    passed: int
    """Records the hook process passed (its features.jsonl lines)."""
    records_per_s: float
    """In process, median over the repeats."""
    process_wall_s: float
    peak_rss_mb: float
    cgroup_peak_mb: float | None


def fetch_batch(flat_file: Path, root: Path) -> list[HookRecord]:
    """Every entry of `flat_file` as one batch under `root`, smallest first like the engine."""
    ingester = UniProtFlatFileIngester(flat_file)
    run_ingest(ingester, list(ingester.discover(None, None)), root)
    lines = (root / RECORDS_FILE).read_text().splitlines()
    records = [HookRecord.from_ingested(IngesterRecord.model_validate_json(x)) for x in lines]
    records.sort(key=lambda r: r.size_mb)
    for record in records:
        record.bind_files_root(root / FILES_DIR)
    return records


def in_process_rate(hook: Hook, records: list[HookRecord], repeat: int) -> float:
    durations = []
    for _ in range(repeat):
        started = time.perf_counter()
        for record in records:
            hook(record)
        durations.append(time.perf_counter() - started)
    return len(records) / statistics.median(durations)


def run_process(
    name: str, in_dir: Path, files_root: Path, out_dir: Path
) -> tuple[float, float, float | None]:
    """(wall s, peak RSS MB, cgroup peak MB or None) of one hook process over the batch."""
    parent = usable_parent()
    group = None
    if parent is not None:
        group = MemoryCgroup.create(
            parent, f"{NAME_PREFIX}uniprot-measure-{os.getpid()}", _UNLIMITED_MB
        )
    env = {
        **os.environ,
        ENV_IN: str(in_dir),
        ENV_OUT: str(out_dir),
        ENV_FILES: str(files_root),
        ENV_HOOK_NAME: name,
    }

    def enter_cgroup() -> None:
        # In the child before exec: every byte the hook allocates is counted.
        if group is not None:
            group.procs_file.write_text(str(os.getpid()))

    peak_report = out_dir.parent / f"{out_dir.name}.peak-kb"
    target = f"{hooks.__name__}:{name}"
    command = [sys.executable, "-c", _REPORT_PEAK, target, str(peak_report)]
    started = time.perf_counter()
    child = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL, preexec_fn=enter_cgroup)
    status = child.wait()
    wall = time.perf_counter() - started
    peak = None
    if group is not None:
        peak = group.peak_mb()
        group.remove()
    if status != 0:
        raise RuntimeError(f"hook {name} exited with status {status}")
    return wall, int(peak_report.read_text()) / 1024, peak


def measure(flat_file: Path = DEFAULT_FLAT_FILE, repeat: int = 5) -> list[HookMeasurement]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        batch = Path(tmp) / "batch"
        records = fetch_batch(flat_file, batch)
        in_dir = Path(tmp) / "in"
        in_dir.mkdir()
        (in_dir / RECORDS_FILE).write_text("".join(r.model_dump_json() + "\n" for r in records))
        for name in HOOKS:
            rate = in_process_rate(getattr(hooks, name), records, repeat)
            out_dir = Path(tmp) / f"out-{name}"
            wall, rss, peak = run_process(name, in_dir, batch / FILES_DIR, out_dir)
            features = out_dir / FEATURES_FILE
            passed = len(features.read_text().splitlines()) if features.exists() else 0
            results.append(HookMeasurement(name, len(records), passed, rate, wall, rss, peak))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flat-file", type=Path, default=DEFAULT_FLAT_FILE)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(
        "| hook | records | passed | in process, records/s | process wall s "
        "| peak RSS MB | cgroup peak MB |"
    )
    print("|----|----:|----:|----:|----:|----:|----:|")
    for m in measure(args.flat_file, args.repeat):
        cgroup = f"{m.cgroup_peak_mb:.0f}" if m.cgroup_peak_mb is not None else "-"
        print(
            f"| {m.hook} | {m.records} | {m.passed} | {m.records_per_s:.0f} | "
            f"{m.process_wall_s:.2f} | {m.peak_rss_mb:.0f} | {cgroup} |"
        )


if __name__ == "__main__":
    main()
