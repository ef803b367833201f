"""Hook attempts in parallel: wall time and CPU use with every slot against one slot, and
Dagster's cost per batch in range runs.

    .venv/bin/python bench/parallel_hooks.py [--runs 3] [--cpu-ms 10] [--no-overhead]
        [--cases pdb/10 pdb/100 pdb/100-1 cpu]

Side by side in one invocation, each case from an empty store, records database, capacity
ledger and Dagster instance (SQLite), hooks under the local runner:

  pdb/10, pdb/100  the bundled PDB mirror (44 real entries, two hooks, one OOM climb) planned
                   in batches of 10 and of 100 and ingested through `pdb_ingest` in range runs
                   (OSA_PARTITIONS_PER_RUN, as `make demo` and `osa materialize` run it):
                   wall time of the whole graph (plan to features), and the CPU used while
                   the hook step ran; in batches of 100 the mirror is one partition, which
                   only its shards (batch/shards.py) spread over the slots
  pdb/100-1        the same with every batch in one shard per hook (as before shards)
  cpu              2,000 synthetic records in 20 batches, on each of which the `burn` hook
                   spends --cpu-ms of CPU time: the same two figures
  overhead         the range run of bench/orchestration_overhead.py against its bare loops
                   (same hooks, same parallelism): Dagster's own cost per batch

Each case runs with the default slots (the CPUs this process may use) and with
OSA_HOOK_SLOTS=1, alternating within a round so that drift of the machine hits both alike.
CPU use = CPU time of this process and everything it started, hooks included (a cgroup v1
`cpuacct` group of the benchmark's own, which sandboxed hooks stay in), while the hook step
ran, over that time and the CPUs. Without one it is "n/a": a sandboxed hook is not this
process's child, so RUSAGE_CHILDREN would miss it. Other load on the machine lowers it, so
the load average is printed beside it, and so is what other load does not change: hook
attempts running at once (their durations added up, over the hook step's time).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import threading
import time
import warnings
from bisect import bisect_left
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import dagster as dg  # noqa: E402

# Puts the repository on the path and names the bench conventions, before osa_dagster loads.
import orchestration_overhead as overhead  # noqa: E402
from dagster._core.storage.tags import (  # noqa: E402
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from osa_dagster.batch.shards import shard_count  # noqa: E402
from osa_dagster.defs.batch_sensors import contiguous_chunks  # noqa: E402
from osa_dagster.engine.capacity import default_slots  # noqa: E402
from osa_dagster.settings import Settings  # noqa: E402

warnings.filterwarnings("ignore", category=dg.BetaWarning)
warnings.filterwarnings("ignore", category=dg.PreviewWarning)
QUIET_RUN = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
SAMPLE_S = 0.05
# Case -> (convention, batch size, hooks split batches into shards).
CASES = {
    "pdb/10": ("pdb", 10, True),
    "pdb/100": ("pdb", 100, True),
    "pdb/100-1": ("pdb", 100, False),
    "cpu": ("bench_cpu", 100, True),
}


CPUACCT = Path("/sys/fs/cgroup/cpuacct")


class CpuAccount:
    """CPU time of this process and of every process it starts from now on: a cpuacct
    cgroup of its own (children, and the sandbox's grandchildren, inherit it)."""

    def __init__(self) -> None:
        self.group = CPUACCT / f"osa-bench-{os.getpid()}"

    def __enter__(self) -> CpuAccount | None:
        try:
            self.group.mkdir()
            (self.group / "cgroup.procs").write_text(str(os.getpid()))
        except OSError:
            return None
        return self

    def __exit__(self, *_: object) -> None:
        if self.group.is_dir():
            (CPUACCT / "cgroup.procs").write_text(str(os.getpid()))
            self.group.rmdir()

    def seconds(self) -> float:
        return int((self.group / "cpuacct.usage").read_text()) / 1e9


class CpuSampler:
    """CPU time sampled against the wall clock, so that any interval can be read back."""

    def __init__(self, account: CpuAccount) -> None:
        self.account = account
        self.times: list[float] = []
        self.cpu: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CpuSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> None:
        self.times.append(time.time())
        self.cpu.append(self.account.seconds())

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            self._sample()

    def at(self, moment: float) -> float:
        """CPU seconds at `moment`, interpolated between the samples around it."""
        i = min(max(bisect_left(self.times, moment), 1), len(self.times) - 1)
        t0, t1, c0, c1 = self.times[i - 1], self.times[i], self.cpu[i - 1], self.cpu[i]
        return c0 if t1 == t0 else c0 + (c1 - c0) * (moment - t0) / (t1 - t0)


@dataclass
class Measurement:
    wall_s: float
    hook_step_s: float
    hook_cpu_s: float | None
    partitions: int
    attempt_s: float  # every hook attempt's duration, added up

    @property
    def attempts_at_once(self) -> float:
        """Hook attempts running at once on average while the hook step ran: slots in use,
        whatever else loads the machine."""
        return self.attempt_s / self.hook_step_s

    @property
    def cpu_share(self) -> float | None:
        """CPU used while the hook step ran, as a share of every CPU the process may use."""
        if self.hook_cpu_s is None:
            return None
        return self.hook_cpu_s / self.hook_step_s / default_slots()


def _hook_step_spans(instance: dg.DagsterInstance, run_id: str, step: str) -> list[float]:
    """[start, end] of the hook step in a run, from its event log."""
    spans = [
        entry.timestamp
        for entry in instance.all_logs(run_id)
        if entry.dagster_event is not None
        and entry.dagster_event.step_key == step
        and entry.dagster_event.event_type
        in (dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS)
    ]
    assert len(spans) == 2, f"the hook step {step} did not run once and succeed: {spans}"
    return spans


def _one_shard(records: int, shard_size: int | None, slots: int) -> int:
    return 1


def ingest(
    convention: str,
    batch_size: int,
    slots: int | None,
    scratch: Path,
    account: CpuAccount | None,
    split: bool,
) -> Measurement:
    """Plan and ingest every batch of a convention through Dagster, from nothing; unless
    `split`, each hook runs each batch in one shard, as before batches were split."""
    from osa_dagster.batch import shards
    from osa_dagster.definitions import build_definitions

    shards.shard_count = shard_count if split else _one_shard  # type: ignore[assignment]

    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        os.environ["OSA_DATA_DIR"] = str(Path(tmp) / "data")
        if slots is None:
            os.environ.pop("OSA_HOOK_SLOTS", None)
        else:
            os.environ["OSA_HOOK_SLOTS"] = str(slots)
        (Path(tmp) / "dagster").mkdir()
        defs = build_definitions()
        plan = defs.resolve_job_def(f"{convention}_plan")
        job = defs.resolve_job_def(f"{convention}_ingest")
        step_s, step_cpu = 0.0, 0.0 if account is not None else None
        with (
            overhead.bench_instance(Path(tmp) / "dagster") as instance,
            CpuSampler(account) if account is not None else contextlib.nullcontext() as cpu,
        ):
            started = time.perf_counter()
            config = {"ops": {f"{convention}_plan_batches": {"config": {"batch_size": batch_size}}}}
            assert plan.execute_in_process(
                run_config={**QUIET_RUN, **config}, instance=instance
            ).success
            keys = instance.get_dynamic_partitions(f"{convention}_batches")
            per_run = Settings.from_env().partitions_per_run
            for chunk in contiguous_chunks(keys, set(), per_run):
                result = job.execute_in_process(
                    run_config=QUIET_RUN,
                    instance=instance,
                    tags={
                        ASSET_PARTITION_RANGE_START_TAG: chunk[0],
                        ASSET_PARTITION_RANGE_END_TAG: chunk[-1],
                    },
                )
                assert result.success
                start, end = _hook_step_spans(
                    instance, result.run_id, f"{convention}__hook_outcomes"
                )
                step_s += end - start
                if cpu is not None and step_cpu is not None:
                    step_cpu += cpu.at(end) - cpu.at(start)
            wall = time.perf_counter() - started
            done = instance.get_materialized_partitions(dg.AssetKey([convention, "features"]))
            assert done == set(keys), "not every partition was ingested"
            attempt_s = _attempt_seconds(convention, keys)
        return Measurement(wall, step_s, step_cpu, len(keys), attempt_s)


def _attempt_seconds(convention: str, keys: list[str]) -> float:
    from osa_dagster.batch.hooks import load_hook_checkpoints
    from osa_dagster.conventions.registry import load_conventions
    from osa_dagster.storage import artifact_store

    settings = Settings.from_env()
    loaded, store = load_conventions(settings)[convention], artifact_store(settings)
    return sum(
        attempt.duration_s or 0.0
        for key in keys
        for checkpoint in load_hook_checkpoints(loaded, store, key).values()
        for attempt in checkpoint.attempts
    )


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cpu-ms", type=float, default=10.0)
    parser.add_argument("--no-overhead", action="store_true", help="skip the overhead case")
    parser.add_argument(
        "--cases", nargs="+", choices=sorted(CASES), default=list(CASES), help="which to run"
    )
    args = parser.parse_args()
    os.environ["OSA_BENCH_RECORDS"] = "2000"
    os.environ["OSA_BENCH_BATCH_SIZE"] = "100"
    os.environ["OSA_BENCH_CPU_MS"] = str(args.cpu_ms)
    os.environ.pop("OSA_HOOK_MEMORY_BUDGET", None)
    os.environ.pop("OSA_HOOK_LEDGER", None)  # each case's own, in its data folder

    cases = {name: CASES[name] for name in args.cases}
    slot_choices = {"default": None, "one": 1}
    measured: dict[tuple[str, str], list[Measurement]] = {}
    loads: list[str] = []
    overheads: dict[str, list[float]] = {"runs of 20": [], "bare same": [], "bare steps": []}
    variants = {
        "runs of 20": lambda home: overhead.run_dagster(home, 20),
        "bare same": lambda home: overhead.run_bare(same_work=True),
        "bare steps": lambda home: overhead.run_bare(same_work=False),
    }
    with tempfile.TemporaryDirectory(prefix="osa-bench-") as tmp, CpuAccount() as account:
        scratch = Path(tmp)
        for _ in range(args.runs):
            loads.append(_load())
            for case, (convention, batch_size, split) in cases.items():
                for choice, slots in slot_choices.items():
                    run = ingest(convention, batch_size, slots, scratch, account, split)
                    measured.setdefault((case, choice), []).append(run)
            if not args.no_overhead:
                os.environ.pop("OSA_HOOK_SLOTS", None)
                for name, seconds in overhead.one_round(variants, scratch, 2000).items():
                    overheads[name].append(seconds)
        loads.append(_load())

    print(
        f"{default_slots()} CPUs, "
        f"local runner ({overhead.memory_limit_mode(Settings.from_env())}), SQLite; "
        f"median of {args.runs} runs; load average (1, 5, 15 min) at each round and at the "
        f"end: {' | '.join(loads)}"
    )
    print(
        f"{'case':<10}{'slots':>7}{'batches':>9}{'wall s':>9}{'hook step s':>13}"
        f"{'CPU in hook step':>18}{'attempts at once':>18}"
    )
    medians: dict[tuple[str, str], tuple[float, float]] = {}
    for (case, choice), runs in measured.items():
        wall = statistics.median(r.wall_s for r in runs)
        step = statistics.median(r.hook_step_s for r in runs)
        shares = [r.cpu_share for r in runs if r.cpu_share is not None]
        share = f"{statistics.median(shares):.0%}" if shares else "n/a"
        at_once = statistics.median(r.attempts_at_once for r in runs)
        medians[case, choice] = (wall, step)
        slots = default_slots() if choice == "default" else 1
        print(
            f"{case:<10}{slots:>7}{runs[0].partitions:>9}{wall:>9.2f}{step:>13.2f}{share:>17}"
            f"{at_once:>18.2f}"
        )
    print("default slots against one slot (wall time ratio; hook step speedup):")
    for case in cases:
        (wall, step), (wall_one, step_one) = medians[case, "default"], medians[case, "one"]
        print(f"  {case:<9} wall x{wall / wall_one:.2f}   hook step speedup x{step_one / step:.2f}")
    if not args.no_overhead:
        median = {name: statistics.median(times) for name, times in overheads.items()}
        partitions = 20
        print(
            "Dagster's cost per batch, range runs of 20 over 2,000 records (trivial hook): "
            f"{(median['runs of 20'] - median['bare same']) / partitions:.3f} s against the "
            f"bare loop doing the same work ({median['runs of 20']:.2f} s vs "
            f"{median['bare same']:.2f} s, x{median['runs of 20'] / median['bare same']:.2f}); "
            f"{(median['runs of 20'] - median['bare steps']) / partitions:.3f} s against the "
            f"bare steps ({median['bare steps']:.2f} s)"
        )


if __name__ == "__main__":
    main()
