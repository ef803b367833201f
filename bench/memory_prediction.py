"""What size-aware starting memory saves, on the poison-isolation batch.

    .venv/bin/python bench/memory_prediction.py [--runs 3]

The batch of bench/poison_isolation.py: 100 records, 93 small (20 MB), 5 large that need 4x
the base (400 MB at a 128 MB base) and 2 poison that need more than the 1024 MB cap (1500 MB),
run by the engine under the local runner with poison isolation on. A first batch is run with
an empty memory history, which learns from it; then a second batch (other record ids, every
size 3% larger, so nothing is matched by id or exact size) is measured twice: prediction off
(plain doubling from the base, as before) and prediction on (the history of the first batch).

Reported per variant: attempts, OOM kills, OOM kills while on a large (non-poison) record,
attempts in the large lane, attempts at the cap, records with their real outcome, poison
records, memory-seconds (the limit of each attempt times its duration, GB*s: what a scheduler
reserves for the hook) and the hooks' wall time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from osa_sdk.types import HookRecord  # noqa: E402
from poison_isolation import BASE_MB, CAP_MB, HOOK, LARGE_MB, batch_records  # noqa: E402

from osa_dagster.engine import (  # noqa: E402
    LARGE_LANE,
    Checkpoint,
    FileCheckpointIO,
    FileMemoryHistoryIO,
    HookBatch,
    HookSpec,
    LocalRunner,
    MemoryHistoryIO,
    MemoryPolicy,
    run_hook,
)
from osa_dagster.settings import Settings  # noqa: E402

SIZE_SHIFT = 1.03


def second_batch() -> list[HookRecord]:
    return [
        r.model_copy(update={"id": f"b2-{r.id}", "size_mb": round(r.size_mb * SIZE_SHIFT, 3)})
        for r in batch_records()
    ]


def run_batch(root: Path, records: list[HookRecord], history: MemoryHistoryIO | None) -> Checkpoint:
    root.mkdir(parents=True)
    spec = HookSpec(
        name="bench_hook",
        command=HOOK,
        memory=MemoryPolicy(base_mb=BASE_MB, cap_mb=CAP_MB),
        timeout_s=600,
        config={"ledger": str(root / "ledger.txt"), "once_file": str(root / "once")},
    )
    return run_hook(
        spec,
        HookBatch(records=records, files_root=root / "files"),
        # Unsandboxed: the hooks count their runs in a ledger file of ours (the sandbox's
        # cost is runner_overhead.py's to measure).
        LocalRunner.from_settings(Settings.from_env(), sandbox="off"),
        FileCheckpointIO(root / "checkpoint.json"),
        root / "work",
        history=history,
    )


def figures(checkpoint: Checkpoint, records: list[HookRecord]) -> dict[str, float]:
    large = {r.id for r in records if r.metadata["alloc_mb"] == LARGE_MB}
    errored = [o for o in checkpoint.outcomes.values() if o.status.value == "errored"]
    attempts = checkpoint.attempts
    return {
        "attempts": len(attempts),
        "OOM kills": sum(a.oom_killed for a in attempts),
        "OOM kills on large": sum(a.oom_killed and a.first_unfinished in large for a in attempts),
        "large-lane attempts": sum(a.lane == LARGE_LANE for a in attempts),
        "attempts at the cap": sum(a.memory_limit_mb == CAP_MB for a in attempts),
        "real outcomes": len(checkpoint.outcomes) - len(errored),
        "errored (poison)": sum(o.poison for o in errored),
        "memory GB*s": sum(a.memory_limit_mb * (a.duration_s or 0.0) for a in attempts) / 1024,
        "wall s": sum(a.duration_s or 0.0 for a in attempts),
    }


def run_once(tmp: Path) -> dict[str, dict[str, float]]:
    history = FileMemoryHistoryIO(tmp / "history.json")
    first = run_batch(tmp / "first", batch_records(), history)
    second = second_batch()
    return {
        "first batch (learning)": figures(first, batch_records()),
        "second batch, prediction off": figures(run_batch(tmp / "off", second, None), second),
        "second batch, prediction on": figures(run_batch(tmp / "on", second, history), second),
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
    runs = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory(prefix="osa-bench-predict-") as tmp:
            runs.append(run_once(Path(tmp)))
    for variant in runs[0]:
        print(f"\n{variant} ({args.runs} runs, median)")
        for name in runs[0][variant]:
            value = statistics.median(r[variant][name] for r in runs)
            print(f"  {name:22} {value:10.1f}")


if __name__ == "__main__":
    main()
