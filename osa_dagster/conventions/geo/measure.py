"""Measure the geo hooks on every record of a folder: peak memory and records per second.

    python -m osa_dagster.conventions.geo.measure [--folder PATH] [--repeat 3]

Peak memory: each record runs alone through the real hook entrypoint (``python -m osa_sdk
hook ...``), the way the engine runs it, so it includes the interpreter and the imports;
the peak RSS comes from wait4(). Throughput: the hook function called in this process,
best of `--repeat` runs, so it is the parse alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from osa_sdk.authoring import Hook
from osa_sdk.contract import (
    BYTES_PER_MB,
    ENV_FILES,
    ENV_HOOK_NAME,
    ENV_IN,
    ENV_OUT,
    RECORDS_FILE,
    files_dir_for,
)
from osa_sdk.types import HookRecord, Reject

from osa_dagster.conventions.geo import hooks
from osa_dagster.conventions.geo.ingester import DEFAULT_FOLDER, soft_files
from osa_dagster.conventions.geo.soft import first_record_entity

HOOKS: dict[str, Hook] = {
    "validate_soft": hooks.validate_soft,
    "extract_features": hooks.extract_features,
}


def staged(files: Path, accession: str, source: Path) -> HookRecord:
    """A record of `accession` whose folder under `files` links to `source`."""
    folder = files / files_dir_for(accession)
    folder.mkdir(parents=True)
    (folder / source.name).symlink_to(source.resolve())
    return HookRecord(id=accession, files_dir=files_dir_for(accession)).bind_files_root(files)


def peak_rss_mb(hook: str, accession: str, source: Path) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "in").mkdir()
        record = staged(root / "files", accession, source)
        line = {"id": accession, "files_dir": record.files_dir}
        (root / "in" / RECORDS_FILE).write_text(json.dumps(line) + "\n")
        env = {
            **os.environ,
            ENV_IN: str(root / "in"),
            ENV_OUT: str(root / "out"),
            ENV_FILES: str(root / "files"),
            ENV_HOOK_NAME: hook,
        }
        target = f"osa_dagster.conventions.geo.hooks:{hook}"
        child = subprocess.Popen(
            [sys.executable, "-m", "osa_sdk", "hook", target], env=env, stderr=subprocess.DEVNULL
        )
        _, _, usage = os.wait4(child.pid, 0)
    return usage.ru_maxrss / 1024


def seconds_per_record(hook: Hook, accession: str, source: Path, repeat: int) -> tuple[float, str]:
    """Best time of `repeat` calls, and the outcome ("passed" or "rejected")."""
    with tempfile.TemporaryDirectory() as tmp:
        record = staged(Path(tmp), accession, source)
        best = float("inf")
        outcome = "passed"
        for _ in range(repeat):
            start = time.perf_counter()
            try:
                hook(record)
            except Reject:
                outcome = "rejected"
            best = min(best, time.perf_counter() - start)
    return best, outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=DEFAULT_FOLDER)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    records = sorted((first_record_entity(p)[1], p) for p in soft_files(args.folder))
    print("| hook | record | file MB | outcome | peak RSS MB | s per record | records/s |")
    print("|----|----|----:|----|----:|----:|----:|")
    for name, hook in HOOKS.items():
        for accession, path in records:
            seconds, outcome = seconds_per_record(hook, accession, path, args.repeat)
            rss = peak_rss_mb(name, accession, path)
            size = path.stat().st_size / BYTES_PER_MB
            print(
                f"| {name} | {accession} | {size:.2f} | {outcome} | {rss:.0f} | "
                f"{seconds:.3f} | {1 / seconds:.1f} |"
            )


if __name__ == "__main__":
    main()
