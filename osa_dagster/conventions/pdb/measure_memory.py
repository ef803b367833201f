"""Measure the memory a pdb hook needs on each entry of a mirror, one process per entry.

    python -m osa_dagster.conventions.pdb.measure_memory [--hook extract_features]
        [--limit-mb 192 --limit-mb 384] [--mirror PATH]

Each entry runs alone through the real hook entrypoint (``python -m osa_sdk hook ...``),
the way the engine runs it, so the figures include the interpreter and the imports. The
peak RSS comes from wait4(); when a cgroup v1 memory controller is usable (root on Linux),
each run also gets the cgroup peak, which counts page cache as the OOM killer does, and
every `--limit-mb` runs the entry again under that limit and reports whether the kernel
killed it. This is how the memory ladder of the pdb convention was chosen (README.md).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from osa_sdk.contract import (
    BYTES_PER_MB,
    ENV_FILES,
    ENV_HOOK_NAME,
    ENV_IN,
    ENV_OUT,
    ERRORS_FILE,
    FEATURES_FILE,
    RECORDS_FILE,
    REJECTIONS_FILE,
    files_dir_for,
)
from osa_sdk.types import OutcomeStatus

from osa_dagster.conventions.pdb.ingester import DEFAULT_MIRROR, mirror_entries
from osa_dagster.engine.cgroup import NAME_PREFIX, MemoryCgroup, usable_parent

_UNLIMITED_MB = 8192
_OUTCOMES = {
    FEATURES_FILE: OutcomeStatus.PASSED,
    REJECTIONS_FILE: OutcomeStatus.REJECTED,
    ERRORS_FILE: OutcomeStatus.ERRORED,
}


@dataclass
class Measurement:
    pdb_id: str
    uncompressed_mb: float | None
    peak_rss_mb: float
    cgroup_peak_mb: float | None
    outcome: str
    killed_at: dict[int, bool] = field(default_factory=dict)


def uncompressed_mb(path: Path) -> float | None:
    """Decimal MB of the decompressed file; None when the gzip stream is damaged."""
    size = 0
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(1 << 20):
                size += len(chunk)
    except (EOFError, OSError, zlib.error):
        return None
    return size / BYTES_PER_MB


def run_once(
    path: Path, pdb_id: str, hook: str, limit_mb: int | None
) -> tuple[float, str, MemoryCgroup | None]:
    """Run the hook on one entry: (peak RSS MB, outcome, its cgroup when there is one).

    The outcome is "passed", "rejected" or "errored", or "none" when the hook died first.
    """
    parent = usable_parent()
    group = None
    if parent is not None:
        name = f"{NAME_PREFIX}measure-{os.getpid()}"
        group = MemoryCgroup.create(parent, name, limit_mb or _UNLIMITED_MB)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        in_dir, out_dir, files = root / "in", root / "out", root / "files"
        in_dir.mkdir()
        record_dir = files / files_dir_for(pdb_id)
        record_dir.mkdir(parents=True)
        shutil.copy(path, record_dir / path.name)
        line = {"id": pdb_id, "files_dir": files_dir_for(pdb_id)}
        (in_dir / RECORDS_FILE).write_text(json.dumps(line) + "\n")
        env = {
            **os.environ,
            ENV_IN: str(in_dir),
            ENV_OUT: str(out_dir),
            ENV_FILES: str(files),
            ENV_HOOK_NAME: hook,
        }
        command = [
            sys.executable,
            "-m",
            "osa_sdk",
            "hook",
            f"osa_dagster.conventions.pdb.hooks:{hook}",
        ]

        def enter_cgroup() -> None:
            # In the child before exec: every byte the hook allocates is counted.
            if group is not None:
                group.procs_file.write_text(str(os.getpid()))

        child = subprocess.Popen(
            command, env=env, stderr=subprocess.DEVNULL, preexec_fn=enter_cgroup
        )
        _, _, usage = os.wait4(child.pid, 0)
        outcome = next(
            (
                status.value
                for name, status in _OUTCOMES.items()
                if (out_dir / name).is_file() and (out_dir / name).stat().st_size
            ),
            "none",
        )
    return usage.ru_maxrss / 1024, outcome, group


def measure(path: Path, pdb_id: str, hook: str, limits: list[int]) -> Measurement:
    rss, outcome, group = run_once(path, pdb_id, hook, None)
    peak = None
    if group is not None:
        peak = group.peak_mb()
        group.remove()
    result = Measurement(pdb_id, uncompressed_mb(path), rss, peak, outcome)
    for limit in limits:
        _, _, limited = run_once(path, pdb_id, hook, limit)
        if limited is not None:
            result.killed_at[limit] = limited.oom_kills() > 0
            limited.remove()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hook", default="extract_features")
    parser.add_argument("--mirror", type=Path, default=DEFAULT_MIRROR)
    parser.add_argument("--limit-mb", type=int, action="append", default=[])
    args = parser.parse_args()
    if args.limit_mb and usable_parent() is None:
        print("no usable cgroup v1 memory controller: --limit-mb is ignored", file=sys.stderr)
    rows = [
        measure(path, pdb_id, args.hook, args.limit_mb)
        for pdb_id, path in mirror_entries(args.mirror)
    ]
    rows.sort(key=lambda r: (r.uncompressed_mb is not None, r.uncompressed_mb or 0))
    limits = "".join(f" | OOM-killed at {limit} MB" for limit in args.limit_mb)
    print(f"| id | uncompressed MB | peak RSS MB | cgroup peak MB | outcome{limits} |")
    print("|----|----:|----:|----:|----" + "|----" * len(args.limit_mb) + "|")
    for row in rows:
        size = f"{row.uncompressed_mb:.3f}" if row.uncompressed_mb is not None else "damaged"
        cgroup = f"{row.cgroup_peak_mb:.0f}" if row.cgroup_peak_mb is not None else "-"
        kills = "".join(
            f" | {'killed' if row.killed_at.get(limit) else 'ok'}" for limit in args.limit_mb
        )
        rss = f"{row.peak_rss_mb:.0f}"
        print(f"| {row.pdb_id} | {size} | {rss} | {cgroup} | {row.outcome}{kills} |")


if __name__ == "__main__":
    main()
