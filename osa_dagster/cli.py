"""`osa`: plan and run ingests through Dagster from a shell, and look at what was published.

Every run goes through the Dagster instance in $DAGSTER_HOME (the repo's dagster.yaml by
default), so what the CLI does is visible in the UI afterwards.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

# Small batches so that the demo shows several partitions; the pdb convention's own
# memory ladder already makes the bundled ribosome (6ZU5) OOM at the base and pass above.
DEMO_BATCH_SIZE = 10
# In a shell, Dagster's step events are noise; the attempts and OOM retries log at INFO.
QUIET_RUN = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


def _instance():  # noqa: ANN202 - dagster's type, imported lazily to keep --help fast
    import dagster as dg

    if not os.environ.get("DAGSTER_HOME"):
        if not Path("dagster.yaml").is_file():
            sys.exit("DAGSTER_HOME is not set and there is no dagster.yaml here")
        os.environ["DAGSTER_HOME"] = str(Path.cwd())
    return dg.DagsterInstance.get()


def _conventions():  # noqa: ANN202
    from osa_dagster.conventions.registry import load_conventions

    return load_conventions()


def _convention(name: str):  # noqa: ANN202
    conventions = _conventions()
    if name not in conventions:
        sys.exit(f"no convention {name!r}; known: {', '.join(sorted(conventions))}")
    return conventions[name]


def plan(
    convention_name: str,
    limit: int | None,
    since: str | None,
    batch_size: int | None,
    *,
    replan: bool = False,
) -> list[str]:
    from osa_dagster.definitions import defs
    from osa_dagster.defs.planning import plan_job_name

    convention = _convention(convention_name)
    config = {"limit": limit, "since": since, "batch_size": batch_size, "replan": replan}
    op_config = {k: v for k, v in config.items() if v is not None}
    job = defs.resolve_job_def(plan_job_name(convention))
    result = job.execute_in_process(
        run_config={**QUIET_RUN, "ops": {f"{convention.name}_plan_batches": {"config": op_config}}},
        instance=_instance(),
    )
    if not result.success:
        sys.exit("planning failed; see the run in the UI")
    return _partitions(convention_name)


def _partitions(convention_name: str) -> list[str]:
    from osa_dagster.defs.assets import batch_partitions

    return _instance().get_dynamic_partitions(batch_partitions(_convention(convention_name)).name)


def materialize(convention_name: str, partitions: Sequence[str]) -> list[str]:
    """Run the ingest job over the partitions, adjacent ones together (OSA_PARTITIONS_PER_RUN
    per run at most); return the partitions of the runs that failed."""
    from osa_dagster.definitions import defs
    from osa_dagster.defs.assets import partitions_per_run
    from osa_dagster.defs.dagster_private import partition_range_tags
    from osa_dagster.defs.planning import contiguous_chunks, ingest_job_name

    convention = _convention(convention_name)
    known = _partitions(convention_name)
    unknown = sorted(set(partitions) - set(known))
    if unknown:
        sys.exit(f"{convention_name} has no partition {', '.join(unknown)}: plan it first")
    job = defs.resolve_job_def(ingest_job_name(convention))
    instance = _instance()
    failed: list[str] = []
    chunks = contiguous_chunks(known, set(known) - set(partitions), partitions_per_run())
    done = 0
    for chunk in chunks:
        run_range = partition_range_tags(chunk[0], chunk[-1])
        started = time.monotonic()
        result = job.execute_in_process(
            run_config=QUIET_RUN,
            instance=instance,
            raise_on_error=False,
            tags=run_range,
        )
        done += len(chunk)
        status = "ok" if result.success else "FAILED"
        what = chunk[0] if len(chunk) == 1 else f"{chunk[0]} .. {chunk[-1]} ({len(chunk)} batches)"
        elapsed = time.monotonic() - started
        print(f"[{done}/{len(partitions)}] {what}: {status} ({elapsed:.1f} s)")
        if not result.success:
            failed += chunk
    return failed


def summary(convention_name: str) -> dict[str, int]:
    """Counts per record, not per hook or batch: a record rejected by two hooks, or planned in
    two batches, counts once; a record that passed in any batch counts as passed."""
    from osa_dagster.batch import BatchInputError
    from osa_dagster.batch.fetch import read_ingest_report
    from osa_dagster.batch.plan import planned_partitions
    from osa_dagster.batch.publish import batch_verdicts
    from osa_dagster.records import database_url_from_env, open_database
    from osa_dagster.records.queries import count_feature_rows, count_published
    from osa_dagster.storage import BatchLayout, store_from_env

    passed = "records passed every hook"
    convention = _convention(convention_name)
    store = store_from_env()
    totals: Counter[str] = Counter()
    outcomes: dict[str, str] = {}  # record -> what became of it

    def settle(record: str, outcome: str) -> None:
        if outcomes.get(record) != passed:
            outcomes[record] = outcome

    for partition in planned_partitions(store, convention.name):
        totals["batches planned"] += 1
        layout = BatchLayout(convention.name, partition)
        try:
            verdicts = batch_verdicts(convention, store, partition)
            report = read_ingest_report(store, layout)
        except (BatchInputError, FileNotFoundError):
            continue
        totals["batches done"] += 1
        for skipped in report.skipped_oversize:
            settle(skipped.source_id, "records skipped (oversize)")
        for failed in [*report.failed, *report.missing]:
            settle(failed.source_id, "records not fetched")
        for verdict in verdicts.failed:
            settle(verdict.source_id, f"records {verdict.status}")
        for record in verdicts.passed:
            settle(record.source_id, passed)
        totals["OOM retries"] += sum(
            len(checkpoint.oom_attempts()) for checkpoint in verdicts.checkpoints.values()
        )
    totals.update(outcomes.values())
    for always_shown in (passed, "records skipped (oversize)", "records not fetched"):
        totals.setdefault(always_shown, 0)
    db = open_database(database_url_from_env())
    totals["records in the archive"] = count_published(db, convention.name)
    totals["feature rows"] = count_feature_rows(db, convention.name)
    return dict(totals)


def list_records(convention_name: str | None, limit: int, with_features: bool) -> None:
    from osa_dagster.records import database_url_from_env, open_database
    from osa_dagster.records.queries import published_records

    db = open_database(database_url_from_env())
    for record in published_records(db, convention_name, limit, with_features=with_features):
        print(f"{record.srn}  {record.convention}  {record.source_id}  {record.partition}")
        for hook, index, row in record.features:
            print(f"    {hook}[{index}]: {row}")


def dead_letter_partitions(convention_name: str) -> list[str]:
    """The batches holding the convention's dead letters, each once."""
    from osa_dagster.records import database_url_from_env, list_dead_letters, open_database

    letters = list_dead_letters(open_database(database_url_from_env()), convention_name)
    return list(dict.fromkeys(letter.partition for letter in letters))


def retry_overrides(convention, letters) -> str:  # noqa: ANN001 - Convention, DeadLetterRow
    """OSA_HOOK_MEMORY for a retry of the dead letters: the overrides in force, with each
    poison hook's cap raised to at least twice the limit its records failed at. The base in
    force is kept, so the ladder the retry climbs is the one in force, up to the new cap."""
    from osa_dagster.settings import Settings

    overrides = {
        target: (override.base_mb, override.cap_mb)
        for target, override in Settings.from_env().hook_memory.items()
    }
    policies = {spec.name: spec.memory for spec in convention.hooks}
    caps: dict[str, int] = {}
    for letter in letters:
        if letter.hook in policies:
            cap = caps.get(letter.hook, policies[letter.hook].cap_mb)
            caps[letter.hook] = max(cap, 2 * letter.limit_mb)
    for hook, cap in caps.items():
        overrides[f"{convention.name}.{hook}"] = (policies[hook].base_mb, cap)
    return ",".join(
        f"{target}={base}" + (f":{cap}" if cap else "") for target, (base, cap) in overrides.items()
    )


def _osa_command() -> str:
    """How this `osa` was invoked, so that a printed command runs as printed."""
    invoked = sys.argv[0] if sys.argv else ""
    return shlex.quote(invoked) if Path(invoked).name == "osa" else "osa"


def dead_letters(convention_name: str, partitions_only: bool) -> None:
    """List the convention's poison records, and how to run them again with a higher cap.

    A poison outcome is reopened by the next run of its batch whose memory ladder goes above
    the limit it failed at, starting at that rung: raise the hook's cap with OSA_HOOK_MEMORY
    and re-materialise the batches listed. Everything else in those batches is kept.
    """
    from osa_dagster.records import database_url_from_env, list_dead_letters, open_database

    convention = _convention(convention_name)
    letters = list_dead_letters(open_database(database_url_from_env()), convention.name)
    partitions = list(dict.fromkeys(letter.partition for letter in letters))
    if partitions_only:
        print("\n".join(partitions))
        return
    if not letters:
        print(f"{convention.name} has no dead letters")
        return
    print(f"{'record':32} {'hook':20} {'size MB':>8} {'limit MB':>8} {'peak MB':>8}  partition")
    for letter in letters:
        size = "-" if letter.size_mb is None else f"{letter.size_mb:.1f}"
        peak = "-" if letter.peak_mb is None else f"{letter.peak_mb:.0f}"
        print(
            f"{letter.source_id:32} {letter.hook:20} {size:>8} {letter.limit_mb:>8} "
            f"{peak:>8}  {letter.partition}"
        )
    overrides = shlex.quote(retry_overrides(convention, letters))
    print(
        f"\n{len(letters)} poison records in {len(partitions)} batches. To run them again with"
        f" a higher cap (only they run again):\n  OSA_HOOK_MEMORY={overrides}"
        f" {_osa_command()} materialize {convention.name} --dead-letters"
    )


def database_schema(action: str) -> int:
    """Upgrade the records database to the newest revision, or tell where it is."""
    from osa_dagster.records import RecordsDatabase, database_url_from_env
    from osa_dagster.records.schema import current_revision, head_revision, upgrade

    engine = RecordsDatabase(database_url_from_env()).engine  # opening upgrades already
    if action == "upgrade":
        upgrade(engine)
    revision = current_revision(engine)
    print(f"records database at revision {revision} (newest: {head_revision()})")
    return 0 if revision == head_revision() else 1


def demo(fresh: bool) -> int:
    if fresh:
        from osa_dagster.settings import data_dir

        shutil.rmtree(data_dir(), ignore_errors=True)
    started = time.monotonic()
    partitions = plan("pdb", limit=None, since=None, batch_size=DEMO_BATCH_SIZE)
    print(f"planned {len(partitions)} batches of the bundled PDB mirror")
    failed = materialize("pdb", partitions)
    elapsed = time.monotonic() - started
    totals = summary("pdb")
    print("\nsummary of the pdb convention")
    for name, value in sorted(totals.items()):
        print(f"  {name:32} {value}")
    records_in = sum(1 for _ in _records_in_batches("pdb"))
    print(f"  {'wall time (s)':32} {elapsed:.1f}")
    print(f"  {'records per second':32} {records_in / elapsed:.2f}")
    print(
        "\nSee the runs, partitions and metadata in the UI:  make ui"
        "  (dagster dev -w workspace.yaml, http://127.0.0.1:3000)"
    )
    return 1 if failed else 0


def _records_in_batches(convention_name: str):  # noqa: ANN202
    from osa_dagster.batch.plan import load_manifest, planned_partitions
    from osa_dagster.storage import BatchLayout, store_from_env

    store = store_from_env()
    for partition in planned_partitions(store, convention_name):
        yield from load_manifest(store, BatchLayout(convention_name, partition)).refs


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="osa", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show an error's traceback")
    commands = parser.add_subparsers(dest="command", required=True)

    demo_cmd = commands.add_parser("demo", help="ingest the bundled PDB mirror end to end")
    demo_cmd.add_argument("--keep", action="store_true", help="keep data of earlier runs")

    plan_cmd = commands.add_parser("plan", help="freeze an ingest into batches (partitions)")
    plan_cmd.add_argument("convention")
    plan_cmd.add_argument("--limit", type=int)
    plan_cmd.add_argument("--since", help="ISO date, e.g. 2024-01-31")
    plan_cmd.add_argument("--batch-size", type=int)
    plan_cmd.add_argument(
        "--replan",
        action="store_true",
        help="batch again records already planned at the same version (left out otherwise)",
    )

    run_cmd = commands.add_parser("materialize", help="run the ingest job for partitions")
    run_cmd.add_argument("convention")
    run_cmd.add_argument("partitions", nargs="*", help="partition keys (default: all planned)")
    run_cmd.add_argument(
        "--dead-letters",
        action="store_true",
        help="only the batches holding dead letters (none: nothing runs)",
    )

    summary_cmd = commands.add_parser("summary", help="counts of a convention's ingest")
    summary_cmd.add_argument("convention")

    records_cmd = commands.add_parser("records", help="list published records")
    records_cmd.add_argument("--convention")
    records_cmd.add_argument("--limit", type=int, default=50)
    records_cmd.add_argument("--features", action="store_true", help="show feature rows too")

    dead_cmd = commands.add_parser(
        "dead-letters", help="list poison records: out of memory alone at their hook's cap"
    )
    dead_cmd.add_argument("convention")
    dead_cmd.add_argument(
        "--partitions", action="store_true", help="print only the batches to re-materialise"
    )

    db_cmd = commands.add_parser("db", help="the records database's schema (migrations)")
    db_cmd.add_argument("action", choices=["upgrade", "current"])

    from osa_dagster.backfill import add_backfill_parser

    add_backfill_parser(commands)

    args = parser.parse_args(argv)
    from osa_dagster.conventions.registry import ConventionError
    from osa_dagster.settings import SettingsError

    try:
        return _run(parser, args)
    except (ConventionError, SettingsError) as error:
        # A setting or a convention module that cannot be used: one line says which.
        if args.debug:
            raise
        print(f"osa: {error}", file=sys.stderr)
        return 2


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from osa_dagster.backfill import run_backfill_command

    if args.command == "backfill":
        return run_backfill_command(args)
    if args.command == "db":
        return database_schema(args.action)
    if args.command == "demo":
        return demo(fresh=not args.keep)
    if args.command == "plan":
        keys = plan(args.convention, args.limit, args.since, args.batch_size, replan=args.replan)
        print("\n".join(keys))
        return 0
    if args.command == "materialize":
        if args.dead_letters:
            if args.partitions:
                parser.error("give either partitions or --dead-letters, not both")
            keys = dead_letter_partitions(_convention(args.convention).name)
            if not keys:
                print(f"{args.convention} has no dead letters: nothing to run")
                return 0
        else:
            keys = args.partitions or _partitions(args.convention)
        return 1 if materialize(args.convention, keys) else 0
    if args.command == "summary":
        for name, value in sorted(summary(args.convention).items()):
            print(f"{name:32} {value}")
        return 0
    if args.command == "dead-letters":
        dead_letters(args.convention, args.partitions)
        return 0
    list_records(args.convention, args.limit, args.features)
    return 0


if __name__ == "__main__":
    sys.exit(main())
