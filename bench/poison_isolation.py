"""What poison-record isolation costs and saves, on one synthetic batch.

    .venv/bin/python bench/poison_isolation.py [--runs 1]

One batch of 100 records run by the engine under the local runner (a cgroup memory limit
when there is one, else RLIMIT_AS): 93 small records (20 MB each), 5 large ones that need
4x the base (400 MB at a 128 MB base) and 2 poison records that need more than the cap
(1500 MB at a 1024 MB cap). Records are sized so that the 2 poison records sit among the
large ones, as the biggest files of a batch do. The hook is the engine tests' contract-only
hook (tests/engine/hooks/behave.py), which allocates what each record's metadata says.

Reported per variant (isolation off, isolation on): attempts, attempts at the cap, records
with their real outcome, records errored, and memory-seconds (the limit of each attempt
times its duration, in GB*s: what a scheduler reserves for the hook).

Both variants run without a memory history (plain doubling from the base); what predicting
the starting memory from record size adds is measured by bench/memory_prediction.py.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from osa_sdk.contract import files_dir_for  # noqa: E402
from osa_sdk.types import HookRecord, HookRecordId  # noqa: E402

from osa_dagster.engine import (  # noqa: E402
    Checkpoint,
    FileCheckpointIO,
    HookBatch,
    HookSpec,
    LocalRunner,
    MemoryPolicy,
    run_hook,
)
from osa_dagster.settings import Settings  # noqa: E402

HOOK = (sys.executable, str(REPO / "tests" / "engine" / "hooks" / "behave.py"))
BASE_MB, CAP_MB = 128, 1024
SMALL_MB, LARGE_MB, POISON_MB = 20, 400, 1500


def batch_records() -> list[HookRecord]:
    def record(index: int, size_mb: float, alloc_mb: int) -> HookRecord:
        rid = f"rec{index:03d}"
        return HookRecord(
            id=HookRecordId(rid),
            files_dir=files_dir_for(rid),
            metadata={"alloc_mb": alloc_mb, "sleep_s": 0.01},
            size_mb=size_mb,
        )

    records = [record(i, 0.1 + i / 100, SMALL_MB) for i in range(93)]
    records += [record(93 + i, 50.0 + 10 * i, LARGE_MB) for i in range(5)]
    records += [record(98, 65.0, POISON_MB), record(99, 85.0, POISON_MB)]
    return records


def run_once(isolate: bool) -> Checkpoint:
    with tempfile.TemporaryDirectory(prefix="osa-bench-poison-") as tmp:
        root = Path(tmp)
        spec = HookSpec(
            name="bench_hook",
            command=HOOK,
            memory=MemoryPolicy(base_mb=BASE_MB, cap_mb=CAP_MB, isolate_poison=isolate),
            timeout_s=600,
            config={"ledger": str(root / "ledger.txt"), "once_file": str(root / "once")},
        )
        return run_hook(
            spec,
            HookBatch(records=batch_records(), files_root=root / "files"),
            # Unsandboxed: the hooks count their runs in a ledger file of ours (the sandbox's
            # cost is runner_overhead.py's to measure).
            LocalRunner.from_settings(Settings.from_env(), sandbox="off"),
            FileCheckpointIO(root / "checkpoint.json"),
            root / "work",
        )


def figures(checkpoint: Checkpoint) -> dict[str, float]:
    errored = [o for o in checkpoint.outcomes.values() if o.status.value == "errored"]
    return {
        "attempts": len(checkpoint.attempts),
        "attempts at the cap": sum(a.memory_limit_mb == CAP_MB for a in checkpoint.attempts),
        "real outcomes": len(checkpoint.outcomes) - len(errored),
        "errored (poison)": sum(o.poison for o in errored),
        "errored (other)": sum(not o.poison for o in errored),
        "memory GB*s": sum(a.memory_limit_mb * (a.duration_s or 0.0) for a in checkpoint.attempts)
        / 1024,
        "wall s": sum(a.duration_s or 0.0 for a in checkpoint.attempts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    ladder = MemoryPolicy(base_mb=BASE_MB, cap_mb=CAP_MB).ladder()
    print(
        f"memory limits: {LocalRunner.from_settings(Settings.from_env()).limit_mode}; "
        f"ladder {ladder} MB"
    )
    for isolate in (False, True):
        runs = [figures(run_once(isolate)) for _ in range(args.runs)]
        print(f"\nisolation {'on' if isolate else 'off'} ({args.runs} runs, median)")
        for name in runs[0]:
            value = statistics.median(r[name] for r in runs)
            print(f"  {name:22} {value:10.1f}")


if __name__ == "__main__":
    main()
