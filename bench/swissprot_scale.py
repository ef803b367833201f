"""Swiss-Prot's size end to end: the uniprot convention over 573,661 entries, against its floor.

    .venv/bin/python bench/swissprot_scale.py [--entries 57366 | --full] [--batch-size 5000]
                                              [--no-snakemake] [--keep DIR]

A flat file of --entries entries is generated from the 100 bundled real entries
(tests/fixtures/swissprot_flatfile.py; cached in the system's temporary folder, as it takes
a while at full size) and the real uniprot convention reads it, configured without code:
`OSA_SOURCES=uniprot=FILE`. On the embedded default (a fresh SQLite Dagster instance and
records database, local files, hooks sandboxed under real cgroup memory limits) it runs, as
child processes, what a user runs for a whole database:

  plan         `osa plan uniprot --batch-size B`: discover and freeze the batches
  materialize  `osa materialize uniprot`: every batch through the whole asset graph, runs of
               OSA_PARTITIONS_PER_RUN adjacent batches (fetch, both hooks, publish,
               features, the checks)

and reports their wall time, records/s, the CPU time of their process trees (user + sys,
from getrusage(RUSAGE_CHILDREN): the orchestrator and every hook), the orchestrator's peak
RSS, the events the runs wrote to the instance's event log per record, and every record
checked published (`osa summary`). The floor is the same hooks' own compute: both hook
functions called in this process over the file's first --floor-sample records
(bench/hook_throughput.py), scaled to all records and divided by the CPUs.

Side by side, from the records the ingest staged (the raw batches in the artifact store),
Snakemake with `--cores` all CPUs runs one job per batch and hook: bench/hook_attempt.py,
the same hook command under the same sandbox and cgroup limit through the same local runner,
in one attempt (no checkpoints, no ladder). Snakemake is run from PATH, or installed into a
throwaway virtualenv beside the cached file; it is not a dependency of the project.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from hook_throughput import fetched_records, hook_seconds  # noqa: E402
from osa_sdk.types import HookRecord  # noqa: E402

from osa_dagster.conventions.uniprot import uniprot_convention  # noqa: E402
from osa_dagster.engine.spec import HookSpec  # noqa: E402
from osa_dagster.storage import BatchLayout  # noqa: E402
from tests.fixtures.swissprot_flatfile import SWISSPROT_ENTRIES, write_flat_file  # noqa: E402

TENTH = SWISSPROT_ENTRIES // 10
CACHE = Path(tempfile.gettempdir()) / "osa-bench-swissprot"
OSA = [sys.executable, "-m", "osa_dagster.cli"]
RSS_POLL_S = 0.5
CPUACCT = Path("/sys/fs/cgroup/cpuacct")
GROUP_EMPTY_WAIT_S = 30.0


@dataclass
class Measured:
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    load: tuple[float, float, float]
    cpu_how: str = "cgroup"


def cpus() -> int:
    return len(os.sched_getaffinity(0))


def flat_file(entries: int) -> Path:
    CACHE.mkdir(exist_ok=True)
    path = CACHE / f"swissprot-{entries}.dat"
    if not path.exists():
        started = time.perf_counter()
        partial = path.with_suffix(".partial")
        size = write_flat_file(partial, entries)
        partial.rename(path)
        took_s = time.perf_counter() - started
        print(f"generated {path.name}: {size / 1e9:.2f} GB in {took_s:.1f} s")
    return path


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _status_mb(pid: int, field: str) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def orchestrator_rss_mb(pid: int) -> float:
    """Peak resident memory (VmHWM) of the command, added to that of its run workers
    (OSA_RUNS_AT_ONCE) while they live: at most what they held at once."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    workers = []
    for child in children:
        try:
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                workers.append(int(child))
        except OSError:
            continue
    return sum(_status_mb(p, "VmHWM") or 0.0 for p in [pid, *workers])


class CpuAccount:
    """CPU seconds of a process tree: a cgroup v1 cpuacct group of its own where this process
    may make one (root), else getrusage(RUSAGE_CHILDREN), which misses what a sandboxed hook
    uses (bubblewrap's outer process does not wait for the hook's)."""

    def __init__(self, name: str) -> None:
        self.group: Path | None = CPUACCT / f"osa-bench-{os.getpid()}-{name}"
        try:
            self.group.mkdir()
        except OSError:
            self.group = None
        self.rusage_before = children_cpu_s()

    @property
    def how(self) -> str:
        return "cgroup" if self.group else "rusage"

    def join(self) -> None:
        """In the child, before it runs its command."""
        if self.group is not None:
            (self.group / "cgroup.procs").write_text(str(os.getpid()))

    def close(self) -> float:
        if self.group is None:
            return children_cpu_s() - self.rusage_before
        # Processes the command left behind (hooks of a killed orchestrator) are still
        # counted: wait for them to go before the group can be removed.
        deadline = time.monotonic() + GROUP_EMPTY_WAIT_S
        while (self.group / "cgroup.procs").read_text().strip():
            if time.monotonic() > deadline:
                print(f"{self.group} still holds processes; left in place", file=sys.stderr)
                return int((self.group / "cpuacct.usage").read_text()) / 1e9
            time.sleep(RSS_POLL_S)
        used_ns = int((self.group / "cpuacct.usage").read_text())
        self.group.rmdir()
        return used_ns / 1e9


def measured(command: Sequence[str], env: dict[str, str], log: Path) -> Measured:
    """Run `command` to its end, its output to `log`; fails loudly if it fails."""
    load = os.getloadavg()
    account = CpuAccount(log.stem)
    started = time.perf_counter()
    with log.open("ab") as out:
        process = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=account.join
        )
        peak = 0.0
        while process.poll() is None:
            peak = max(peak, orchestrator_rss_mb(process.pid))
            time.sleep(RSS_POLL_S)
    wall_s = time.perf_counter() - started
    cpu_s = account.close()
    if process.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({process.returncode}); see {log}")
    return Measured(wall_s, cpu_s, peak, load, account.how)


def event_log(history: Path) -> tuple[int, dict[str, float]]:
    """Events of every run in the instance's event log, and the seconds each step took,
    summed over the runs."""
    events, step_s = 0, dict[str, float]()
    for db in sorted((history / "runs").glob("*.db")):
        if db.name == "index.db":
            continue
        with sqlite3.connect(db) as connection:
            events += connection.execute("SELECT count(*) FROM event_logs").fetchone()[0]
            rows = connection.execute(
                "SELECT step_key, dagster_event_type, julianday(timestamp) * 86400 "
                "FROM event_logs WHERE dagster_event_type IN ('STEP_START', 'STEP_SUCCESS') "
                "ORDER BY id"
            ).fetchall()
        started: dict[str, float] = {}
        for step, kind, at in rows:
            if kind == "STEP_START":
                started[step] = at
            elif step in started:
                name = step.rpartition("__")[2]
                step_s[name] = step_s.get(name, 0.0) + at - started.pop(step)
    return events, step_s


def snakemake_command() -> list[str]:
    found = shutil.which("snakemake")
    if found:
        return [found]
    venv = CACHE / "snakemake-venv"
    if not (venv / "bin" / "snakemake").exists():
        print(f"installing Snakemake into {venv}")
        with (CACHE / "snakemake-install.log").open("wb") as log:
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            pip = [str(venv / "bin" / "pip"), "install", "--quiet", "snakemake"]
            subprocess.run(pip, check=True, stdout=log, stderr=subprocess.STDOUT)
    return [str(venv / "bin" / "snakemake")]


SNAKEFILE = """\
BATCHES = {batches!r}
HOOKS = {hooks!r}

rule all:
    input: expand("done/{{batch}}.{{hook}}", batch=BATCHES, hook=HOOKS)

rule hook:
    output: "done/{{batch}}.{{hook}}"
    shell:
        "{python} {script} uniprot {{wildcards.hook}} {artifacts}/{raw} "
        "work/{{wildcards.batch}}/{{wildcards.hook}} && touch {{output}}"
"""


def run_snakemake(
    scratch: Path, artifacts: Path, partitions: list[str], hooks: list[str], env: dict[str, str]
) -> Measured:
    folder = scratch / "snakemake"
    folder.mkdir()
    raw = BatchLayout("uniprot", "{wildcards.batch}").raw
    (folder / "Snakefile").write_text(
        SNAKEFILE.format(
            batches=partitions,
            hooks=hooks,
            python=sys.executable,
            script=REPO / "bench" / "hook_attempt.py",
            artifacts=artifacts,
            raw=raw,
        )
    )
    command = [*snakemake_command(), "--cores", str(cpus()), "--directory", str(folder)]
    command += ["--snakefile", str(folder / "Snakefile")]
    return measured(command, env, scratch / "snakemake.log")


_FLOOR_WORK: tuple[list[HookSpec], list[HookRecord]] = ([], [])


def _both_hooks_once(_: int) -> float:
    specs, records = _FLOOR_WORK
    return sum(hook_seconds(spec, records, 1)[0] for spec in specs)


def floor_s(path: Path, entries: int, sample: int, runs: int, scratch: Path) -> tuple[float, str]:
    """The hooks' own compute over all entries, divided by the CPUs; and how it was got.

    One process per CPU, all at once, calls both hook functions over the file's first
    `sample` records, so that the floor meets the machine as the ingest does (its other
    users included); the median of `runs` such rounds, in seconds per record per CPU, is
    scaled to all entries."""
    global _FLOOR_WORK
    convention = uniprot_convention().with_source("flatfile", str(path))
    records = fetched_records(convention, scratch, limit=min(sample, entries))
    _FLOOR_WORK = (list(convention.hooks), records)
    rounds = []
    with multiprocessing.get_context("fork").Pool(cpus()) as pool:
        for _ in range(runs):
            started = time.perf_counter()
            pool.map(_both_hooks_once, range(cpus()))
            rounds.append(time.perf_counter() - started)
    per_record_s = statistics.median(rounds) / len(records)
    how = (
        f"{cpus()} processes x {len(records):,} records x both hooks: "
        f"{1 / per_record_s:.0f} records/s per CPU, median of {runs}"
    )
    return per_record_s * entries / cpus(), how


def fmt(what: str, m: Measured, records: int, floor: float | None = None) -> str:
    ratio = f"  x{m.wall_s / floor:.2f} floor" if floor else ""
    return (
        f"{what:<22}{m.wall_s:>9.1f} s{records / m.wall_s:>10.0f} rec/s"
        f"{m.cpu_s:>9.0f} s CPU ({m.cpu_how}){m.peak_rss_mb:>8.0f} MB peak RSS"
        f"   load {m.load[0]:.2f}{ratio}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--entries", type=int, default=TENTH, help=f"default {TENTH:,}")
    size.add_argument("--full", action="store_true", help=f"{SWISSPROT_ENTRIES:,} entries")
    parser.add_argument("--batch-size", type=int, default=5_000)
    parser.add_argument(
        "--runs-at-once", type=int, default=2, help="OSA_RUNS_AT_ONCE of `osa materialize`"
    )
    parser.add_argument("--floor-sample", type=int, default=1_000, help="entries timed in process")
    parser.add_argument("--floor-runs", type=int, default=3)
    parser.add_argument("--no-snakemake", action="store_true")
    parser.add_argument("--keep", type=Path, help="run in this (new) folder and keep it")
    args = parser.parse_args()
    entries = SWISSPROT_ENTRIES if args.full else args.entries
    path = flat_file(entries)

    if args.keep is None:
        scratch = Path(tempfile.mkdtemp(prefix="osa-swissprot-"))
    else:
        scratch = args.keep
        scratch.mkdir(parents=True)
    try:
        home, data = scratch / "home", scratch / "data"
        home.mkdir()
        shutil.copy(REPO / "dagster.yaml", home)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("OSA_")},
            "DAGSTER_HOME": str(home),
            "OSA_DATA_DIR": str(data),
            "OSA_SOURCES": f"uniprot={path}",
            "OSA_RUNS_AT_ONCE": str(args.runs_at_once),
            "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "sdk" / "src")]),
        }
        print(
            f"{entries:,} entries, {path.stat().st_size / 1e9:.2f} GB, batches of "
            f"{args.batch_size:,}; {args.runs_at_once} runs at once; {cpus()} CPUs"
        )
        floors: list[float] = []

        def measure_floor() -> float:
            """The floor now; each system is held to the mean of the floors measured just
            before and just after it, as the machine's other users come and go."""
            floor, how = floor_s(
                path, entries, args.floor_sample, args.floor_runs, scratch / f"floor{len(floors)}"
            )
            floors.append(floor)
            print(f"{'floor':<22}{floor:>9.1f} s ({how})   load {os.getloadavg()[0]:.2f}")
            return floor

        floor_before = measure_floor()
        plan = measured(
            [*OSA, "plan", "uniprot", "--batch-size", str(args.batch_size), "--json"],
            env,
            scratch / "plan.log",
        )
        ingest = measured([*OSA, "materialize", "uniprot"], env, scratch / "materialize.log")
        summary = json.loads(
            subprocess.run(
                [*OSA, "summary", "uniprot", "--json"], env=env, capture_output=True, check=True
            ).stdout
        )
        if summary["records_passed"] != entries:
            sys.exit(f"{summary['records_passed']} of {entries} records published: {summary}")
        events, step_s = event_log(data / "dagster" / "storage" / "history")
        floor = (floor_before + measure_floor()) / 2
        whole = Measured(
            plan.wall_s + ingest.wall_s,
            plan.cpu_s + ingest.cpu_s,
            max(plan.peak_rss_mb, ingest.peak_rss_mb),
            plan.load,
            ingest.cpu_how,
        )
        print(f"{'floor, mean':<22}{floor:>9.1f} s")
        print(fmt("plan", plan, entries))
        print(fmt("materialize", ingest, entries, floor))
        print(fmt("Dagster, end to end", whole, entries, floor))
        steps = ", ".join(f"{name} {seconds:.1f}" for name, seconds in step_s.items())
        print(f"{'':<22}steps (s): {steps}")
        hook_step_s = step_s.get("hook_outcomes", 0.0)
        print(
            f"{'':<22}{events:,} events ({events / entries:.4f} per record); hook step "
            f"x{hook_step_s / floor:.2f} floor"
        )
        if not args.no_snakemake:
            artifacts = data / "artifacts"
            partitions = sorted(
                p.name for p in (artifacts / BatchLayout("uniprot", "x").raw).parents[1].iterdir()
            )
            hooks = [h.name for h in uniprot_convention().hooks]
            snake = run_snakemake(scratch, artifacts, partitions, hooks, env)
            snake_floor = (floors[-1] + measure_floor()) / 2
            print(fmt(f"Snakemake --cores {cpus()}", snake, entries, snake_floor) + " (hooks only)")
    finally:
        if args.keep is None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
