"""OOM recovery: what one record that runs out of memory at the base limit costs a batch.

    .venv/bin/python bench/oom_recovery.py [--runs 3] [--records 100] [--position 50]

One batch of --records records run by the engine directly under the local runner (a cgroup
memory limit when there is one, else RLIMIT_AS), with the engine tests' contract-only hook
(tests/engine/hooks/behave.py): every record allocates 20 MB and sleeps 20 ms; in the OOM
batch the record at --position (records are run smallest first; its size_mb puts it there)
allocates 200 MB, more than the 128 MB base and less than the next step (256 MB). The hook
appends the id of every record it finished to a ledger: records reprocessed = ledger lines
minus distinct ids.

  no OOM         the batch without the OOM record (all 20 MB): the floor
  checkpoints    the engine as shipped: OOM at 128 MB, then the same hook at 256 MB on the
                 records not yet done (outcomes checkpointed as they appear)
  no checkpoints a naive retry: the first attempt at 128 MB (memory ladder capped there, so
                 it stops at the OOM), then the whole batch again at 256 MB with a fresh
                 checkpoint, as a step retry that only raised the memory would do

extra s = median wall time - median of 'no OOM'.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from osa_sdk.contract import files_dir_for  # noqa: E402
from osa_sdk.types import HookRecord, HookRecordId  # noqa: E402

from osa_dagster.engine import (  # noqa: E402
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
SMALL_MB, OOM_MB, SLEEP_S = 20, 200, 0.02
VARIANTS = ("no OOM", "checkpoints", "no checkpoints")


def batch(records: int, oom_at: int | None) -> list[HookRecord]:
    def record(index: int) -> HookRecord:
        rid = f"pdb:{index:04d}/v1"
        alloc = OOM_MB if index == oom_at else SMALL_MB
        return HookRecord(
            id=HookRecordId(rid),
            files_dir=files_dir_for(rid),
            metadata={"alloc_mb": alloc, "sleep_s": SLEEP_S},
            size_mb=1.0 + index / 100,  # smallest first = index order
        )

    return [record(i) for i in range(records)]


def run(records: list[HookRecord], root: Path, policy: MemoryPolicy, checkpoint: str):
    spec = HookSpec(
        name="bench_hook",
        command=HOOK,
        memory=policy,
        timeout_s=600,
        config={"ledger": str(root / "ledger.txt"), "once_file": str(root / "once")},
    )
    return run_hook(
        spec,
        HookBatch(records=records, files_root=root / "files"),
        # Unsandboxed: the hooks count their runs in a ledger file of ours (the sandbox's
        # cost is runner_overhead.py's to measure).
        LocalRunner.from_settings(Settings.from_env(), sandbox="off"),
        FileCheckpointIO(root / checkpoint),
        root / f"work-{checkpoint}",
    )


def one(variant: str, records: int, position: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="osa-bench-oom-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        if variant == "no OOM":
            final = run(
                batch(records, None),
                root,
                MemoryPolicy(base_mb=BASE_MB, cap_mb=CAP_MB),
                "checkpoint.json",
            )
        elif variant == "checkpoints":
            final = run(
                batch(records, position),
                root,
                MemoryPolicy(base_mb=BASE_MB, cap_mb=CAP_MB),
                "checkpoint.json",
            )
        else:
            first = run(
                batch(records, position),
                root,
                MemoryPolicy(base_mb=BASE_MB, cap_mb=BASE_MB, isolate_poison=False),
                "checkpoint-1.json",
            )
            assert first.oom_attempts(), "the naive first attempt did not run out of memory"
            final = run(
                batch(records, position),
                root,
                MemoryPolicy(base_mb=BASE_MB * 2, cap_mb=CAP_MB),
                "checkpoint-2.json",
            )
        wall = time.perf_counter() - started
        ledger = (root / "ledger.txt").read_text().split()
    counts = final.counts()
    if counts.get("passed") != records or len(set(ledger)) != records:
        raise RuntimeError(f"{variant}: {counts}, {len(set(ledger))} distinct in the ledger")
    return {
        "wall": wall,
        "reprocessed": sum(n - 1 for n in Counter(ledger).values()),
        "attempts": len(final.attempts) + (1 if variant == "no checkpoints" else 0),
        "ooms": len(final.oom_attempts()) + (1 if variant == "no checkpoints" else 0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--records", type=int, default=100)
    parser.add_argument("--position", type=int, default=50, help="0-based; run order")
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    for _ in range(args.runs):  # alternate, so that drift of the machine hits all alike
        for variant in VARIANTS:
            results[variant].append(one(variant, args.records, args.position))
    print(
        f"1 batch of {args.records} records (each {SMALL_MB} MB, {SLEEP_S * 1000:.0f} ms), "
        f"record #{args.position} in run order needs {OOM_MB} MB; base {BASE_MB} MB, "
        f"LocalRunner({LocalRunner.from_settings(Settings.from_env()).limit_mode}); "
        f"{args.runs} runs per variant, "
        f"{os.cpu_count()} CPUs"
    )
    floor = statistics.median(r["wall"] for r in results["no OOM"])
    print(
        f"{'variant':<16}{'median s':>10}{'min-max s':>14}{'extra s':>9}{'attempts':>10}"
        f"{'OOMs':>6}{'reprocessed':>13}"
    )
    for variant in VARIANTS:
        walls = [r["wall"] for r in results[variant]]
        median = statistics.median(walls)
        attempts = statistics.median(r["attempts"] for r in results[variant])
        ooms = statistics.median(r["ooms"] for r in results[variant])
        again = [int(r["reprocessed"]) for r in results[variant]]
        again_text = str(again[0]) if len(set(again)) == 1 else f"{min(again)}-{max(again)}"
        print(
            f"{variant:<16}{median:>10.2f}{f'{min(walls):.2f}-{max(walls):.2f}':>14}"
            f"{median - floor:>9.2f}{attempts:>10.0f}{ooms:>6.0f}{again_text:>13}"
        )
    print(
        "reprocessed = records the hook finished more than once (ledger); must be 0 "
        "with checkpoints"
    )


if __name__ == "__main__":
    main()
