"""`osa`: plan and run ingests through Dagster from a shell, and look at what was published.

Every run goes through the Dagster instance in $DAGSTER_HOME (the repo's dagster.yaml by
default), so what the CLI does is visible in the UI afterwards. The reading commands
(summary, records, rejections, dead-letters) only read: they work on a read-only data
folder and create nothing. A bad argument or setting ends with one line that names it;
--debug shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from osa_sdk.types import OutcomeStatus
from pydantic import BaseModel

if TYPE_CHECKING:
    # Imported where they are used, to keep `osa --help` fast.
    import dagster as dg
    from osa_sdk.types import RecordRef

    from osa_dagster.batch.plan import PlanResult
    from osa_dagster.conventions.base import Convention
    from osa_dagster.records import DeadLetterRow, RecordsDatabase
    from osa_dagster.records.lifecycle import ChangeReport
    from osa_dagster.settings import Settings

# Small batches so that the demo shows several partitions; the pdb convention's own
# memory ladder already makes the bundled ribosome (6ZU5) OOM at the base and pass above.
DEMO_BATCH_SIZE = 10
# In a shell, Dagster's step events are noise; the attempts and OOM retries log at INFO.
QUIET_RUN = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
DEFAULT_RECORDS_LIMIT = 50
# Exit statuses: 1 the work failed, 2 the command could not start (argparse's own for usage).
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT  # as a shell reports a command stopped by Ctrl-C


class CommandError(Exception):
    """Something the person running the command can fix; the message says what, in one line."""


def _instance() -> dg.DagsterInstance:
    import dagster as dg

    if not os.environ.get("DAGSTER_HOME"):
        if not Path("dagster.yaml").is_file():
            raise CommandError("DAGSTER_HOME is not set and there is no dagster.yaml here")
        os.environ["DAGSTER_HOME"] = str(Path.cwd())
    return dg.DagsterInstance.get()


def _conventions(configured: Settings) -> dict[str, Convention]:
    from osa_dagster.conventions.registry import load_conventions

    return load_conventions(configured)


def _convention(configured: Settings, name: str) -> Convention:
    conventions = _conventions(configured)
    if name not in conventions:
        raise CommandError(f"no convention {name!r}; known: {', '.join(sorted(conventions))}")
    return conventions[name]


class PlannedBatch(BaseModel):
    partition: str
    records: int
    new: bool
    """Frozen by this plan; otherwise planned before with the same records."""


class PlanTotals(BaseModel):
    batches: int
    new_batches: int
    records: int
    """Records in this plan's batches, new or not."""
    new_records: int
    """Records in its new batches."""
    already_planned: int
    """Records left out: a batch planned before holds them at the same version."""
    duplicates_dropped: int
    """Records that the source listed more than once, counted once."""


class Plan(BaseModel):
    """What `osa plan` froze: a listing of batches, like every listing of the CLI."""

    convention: str
    batches: list[PlannedBatch]
    truncated: bool = False
    """Always false: a plan lists every batch."""
    totals: PlanTotals


def plan(
    configured: Settings,
    convention_name: str,
    limit: int | None,
    since: str | None,
    batch_size: int | None,
    *,
    replan: bool = False,
    source: str | None = None,
    debug: bool = False,
) -> Plan:
    """Run the convention's plan job; the batches this plan froze, in order, marked new or not,
    with their record counts. Files of the source that discover skipped are told on stderr, a
    line each.

    The arguments are checked before anything is launched: a bad one records no run.
    """
    import dagster as dg

    from osa_dagster.definitions import defs
    from osa_dagster.defs.jobs import (
        PLANNED_BATCHES_METADATA,
        SKIPPED_METADATA,
        PlanConfig,
        plan_job_name,
    )

    convention = _convention(configured, convention_name)
    config = {
        "limit": limit,
        "since": since,
        "batch_size": batch_size,
        "replan": replan,
        "source": source,
    }
    op_config = {k: v for k, v in config.items() if v is not None}
    PlanConfig.model_validate(op_config)
    if source is not None:
        try:
            convention.choose_source(source)
        except ValueError as error:
            raise CommandError(f"--source: {error}") from None
    job = defs.resolve_job_def(plan_job_name(convention))
    op_name = f"{convention.name}_plan_batches"
    result = _run_in_process(job, run_config={"ops": {op_name: {"config": op_config}}}, debug=debug)
    if not result.success:
        why = "; ".join(_step_failures(result)) or "see the run in the UI"
        raise WorkFailed(f"planning {convention.name} failed (run {result.run_id}): {why}")
    [output] = [e for e in result.events_for_node(op_name) if e.is_successful_output]
    metadata = output.step_output_data.metadata
    planned = metadata[PLANNED_BATCHES_METADATA]
    assert isinstance(planned, dg.JsonMetadataValue)
    skipped = metadata[SKIPPED_METADATA]
    assert isinstance(skipped, dg.TableMetadataValue)
    for row in skipped.records:
        print(f"skipped {row.data['file']}: {row.data['reason']}", file=sys.stderr)
    data = planned.data
    assert isinstance(data, dict)
    new, records = set(data["new"]), data["records"]
    batches = [
        PlannedBatch(partition=key, records=records[key], new=key in new) for key in data["batches"]
    ]
    return Plan(
        convention=convention.name,
        batches=batches,
        totals=PlanTotals(
            batches=len(batches),
            new_batches=len(new),
            records=sum(batch.records for batch in batches),
            new_records=sum(batch.records for batch in batches if batch.new),
            already_planned=metadata["already_planned"].value,
            duplicates_dropped=metadata["duplicate_refs_dropped"].value,
        ),
    )


def plan_dry_run(
    configured: Settings,
    convention_name: str,
    limit: int | None,
    since: str | None,
    *,
    source: str | None = None,
) -> PlanResult:
    """What `osa plan` would change, said without changing anything: planned here, without
    a run, on a copy of the plan index, looking at the records database read only."""
    from datetime import datetime

    from osa_dagster.batch.plan import plan_ingest
    from osa_dagster.defs.jobs import PlanConfig
    from osa_dagster.records import database_to_look_at, database_url
    from osa_dagster.storage import artifact_store

    config = PlanConfig.model_validate(
        {k: v for k, v in {"limit": limit, "since": since}.items() if v is not None}
    )
    convention = _convention(configured, convention_name)
    if source is not None:
        try:
            convention = convention.choose_source(source)
        except ValueError as error:
            raise CommandError(f"--source: {error}") from None
    return plan_ingest(
        convention,
        artifact_store(configured),
        since=datetime.fromisoformat(config.since) if config.since else None,
        limit=config.limit,
        db=database_to_look_at(database_url(configured)),
        dry_run=True,
    )


def _partitions(configured: Settings, convention_name: str) -> list[str]:
    from osa_dagster.defs.assets import batch_partitions_name

    name = batch_partitions_name(_convention(configured, convention_name))
    return list(_instance().get_dynamic_partitions(name))


def _check_before_ingest(
    configured: Settings, convention_name: str, partitions: Sequence[str]
) -> None:
    """What every run of these partitions needs, looked at before the first is launched: the
    manifest of each, and the records database. Either unusable would fail runs, one after
    the other, in a wall of tracebacks."""
    from osa_dagster.batch.plan import load_manifest
    from osa_dagster.records import RecordsDatabase, database_url
    from osa_dagster.storage import BatchLayout, artifact_store

    if not partitions:
        return  # nothing will run: nothing to open, or to make
    store = artifact_store(configured)
    for partition in partitions:
        load_manifest(store, BatchLayout(convention_name, partition))
    RecordsDatabase(database_url(configured)).engine.dispose()


def materialize(
    configured: Settings, convention_name: str, partitions: Sequence[str], *, debug: bool = False
) -> list[str]:
    """Run the ingest job over the partitions, adjacent ones together (OSA_PARTITIONS_PER_RUN
    per run at most), OSA_RUNS_AT_ONCE runs at a time; return the partitions of the runs that
    failed. A run that fails for a reason the operator must fix (a setting, an unreadable
    input) ends the command in one line once the runs under way have ended; the runs
    before it stand, and no new one starts."""
    from osa_dagster.defs.assets import partitions_per_run
    from osa_dagster.defs.batch_sensors import contiguous_chunks
    from osa_dagster.defs.jobs import ingest_job_name

    convention = _convention(configured, convention_name)
    known = _partitions(configured, convention_name)
    unknown = sorted(set(partitions) - set(known))
    if unknown:
        raise CommandError(
            f"{convention_name} has no partition {', '.join(unknown)}: plan it first"
        )
    _check_before_ingest(configured, convention.name, partitions)
    job_name = ingest_job_name(convention)
    runs_at_once = configured.runs_at_once
    size = run_size(len(partitions), partitions_per_run(), runs_at_once)
    chunks = contiguous_chunks(known, set(known) - set(partitions), size)
    failed: list[str] = []
    done = 0
    for chunk, ended in _run_chunks(job_name, chunks, runs_at_once, debug):
        done += len(chunk)
        status = "ok" if ended.success else "interrupted" if ended.interrupted else "FAILED"
        what = chunk[0] if len(chunk) == 1 else f"{chunk[0]} .. {chunk[-1]} ({len(chunk)} batches)"
        print(f"[{done}/{len(partitions)}] {what}: {status} ({ended.elapsed_s:.1f} s)", flush=True)
        if not ended.success:
            failed += chunk
            for failure in [] if ended.interrupted else ended.failures:
                print(f"  {failure} (run {ended.run_id}; --debug shows the traceback)")
    return failed


def run_size(partitions: int, per_run: int, runs_at_once: int) -> int:
    """Partitions per run: at most `per_run`, and few enough that `runs_at_once` runs share
    the partitions, as a run's fetch, publish and features steps each keep one core busy
    while another run's hooks take the slots."""
    return max(1, min(per_run, -(-partitions // runs_at_once)))


@dataclass(frozen=True)
class RunEnded:
    success: bool
    run_id: str
    failures: list[str]  # each failed step's error in one line (none with --debug)
    elapsed_s: float
    interrupted: bool = False  # by SIGINT or SIGTERM: no further run starts


INTERRUPTED = (
    "interrupted: the runs under way were stopped and no other was started; their hooks' "
    "checkpoints keep what was done, and the same command resumes from them"
)


class Interrupted(Exception):
    """Ctrl-C (SIGINT) or SIGTERM stopped the command's runs; what they did is kept."""

    def __init__(self, message: str = INTERRUPTED) -> None:
        super().__init__(message)  # with its message, so that it pickles from a run worker


class _SignalsSeen:
    """Whether SIGINT or SIGTERM has reached this process.

    While a run executes, Dagster handles both itself and retries an interrupted step that
    has a retry policy, so a Ctrl-C can leave no trace in the run's result. Python writes the
    number of every signal it catches to the wakeup fd, whichever handler then runs: that is
    where the command looks."""

    def __init__(self) -> None:
        self._read, write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(write, False)
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        self._seen = False

    def interrupted(self) -> bool:
        while not self._seen:
            try:
                numbers = os.read(self._read, 64)
            except BlockingIOError:
                break
            self._seen = signal.SIGINT in numbers or signal.SIGTERM in numbers
        return self._seen


_signals: _SignalsSeen | None = None


def _signals_seen() -> _SignalsSeen:
    """The process's one watch, made in its main thread on first use."""
    global _signals
    if _signals is None:
        _signals = _SignalsSeen()
    return _signals


def _note_interrupts_between_runs() -> None:
    """A run worker's SIGINT handler while no run executes: noted, so that the worker starts
    no run after a Ctrl-C, without a KeyboardInterrupt that would break the worker pool."""
    _signals_seen()
    signal.signal(signal.SIGINT, lambda _signum, _frame: None)


def run_chunk(job_name: str, chunk: Sequence[str], debug: bool) -> RunEnded:
    """One run of the ingest job over the adjacent partitions `chunk`, in this process (the
    run's worker: named, so that run monitoring fails the run should the process die).
    Raises Interrupted, running nothing, once this process was interrupted."""
    from osa_dagster.definitions import defs
    from osa_dagster.defs.dagster_private import partition_range_tags
    from osa_dagster.defs.run_worker import worker_tags

    signals = _signals_seen()
    if signals.interrupted():
        raise Interrupted
    started = time.monotonic()
    result = _run_in_process(
        defs.resolve_job_def(job_name),
        tags={**partition_range_tags(chunk[0], chunk[-1]), **worker_tags()},
        debug=debug,
    )
    failures = [] if debug or result.success else _step_failures(result)
    return RunEnded(
        result.success,
        result.run_id,
        failures,
        time.monotonic() - started,
        interrupted=signals.interrupted(),
    )


def _run_chunks(
    job_name: str, chunks: list[list[str]], runs_at_once: int, debug: bool
) -> Iterator[tuple[list[str], RunEnded]]:
    """Each chunk's run, in this process one after another, or in `runs_at_once` worker
    processes of their own (each imports the definitions once and runs chunk after chunk),
    yielded as they end. A RunFailed or an interrupted run stops new runs from starting; the
    RunFailed, or Interrupted, is raised once the runs under way have ended and been
    yielded."""
    if runs_at_once == 1 or len(chunks) == 1:
        for chunk in chunks:
            ended = run_chunk(job_name, chunk, debug)
            yield chunk, ended
            if ended.interrupted:
                raise Interrupted
        return
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    stop: RunFailed | Interrupted | None = None
    pool = ProcessPoolExecutor(
        max_workers=min(runs_at_once, len(chunks)),
        # Not fork: this process may hold threads and open database connections.
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_note_interrupts_between_runs,
    )
    futures = {pool.submit(run_chunk, job_name, chunk, debug): chunk for chunk in chunks}
    # SIGTERM too stops the runs, as it does a run executing in this process (Dagster's).
    sigterm = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        under_way = set(futures)
        while under_way:
            try:
                ended_now, under_way = wait(under_way, return_when=FIRST_COMPLETED)
            except KeyboardInterrupt:
                # Ctrl-C reached the workers too; a signal sent to this process alone is
                # passed on, so that either way the runs under way stop now.
                stop = Interrupted()
                for worker in multiprocessing.active_children():
                    os.kill(worker.pid, signal.SIGINT)  # type: ignore[arg-type]
                ended_now = set()
            for future in ended_now:
                if future.cancelled():
                    continue
                try:
                    ended = future.result()
                except (RunFailed, Interrupted) as error:
                    stop = stop or error
                    continue
                if ended.interrupted:
                    stop = stop or Interrupted()
                yield futures[future], ended
            if stop is not None:
                for waiting in futures:
                    waiting.cancel()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        signal.signal(signal.SIGTERM, sigterm)
    if stop is not None:
        raise stop


class RunFailed(Exception):
    """A run failed for a reason the operator must fix; the message says which, in one line."""


class WorkFailed(Exception):
    """The work failed (not the command's input); the message says where to look."""


def _run_in_process(
    job: dg.JobDefinition,
    *,
    debug: bool,
    run_config: dict[str, Any] | None = None,
    tags: dict[str, str] | None = None,
) -> dg.ExecuteInProcessResult:
    """Run `job` in this process; errors logged in the run show on the console only with
    --debug (see _console_without_errors). A failure the operator must fix ends the command
    (RunFailed)."""
    if not debug:
        job = job.with_logger_defs({"console": _console_without_errors()})
    result = job.execute_in_process(
        run_config={**QUIET_RUN, **(run_config or {})},
        instance=_instance(),
        raise_on_error=False,
        tags=tags,
    )
    for _, error in _step_errors(result):
        refusal = _operator_error(error)
        if refusal is not None:
            raise RunFailed(refusal)
    return result


def _console_without_errors() -> dg.LoggerDefinition:
    """Dagster's console logger, less its errors: what hooks and steps tell (attempts, OOM
    retries, warnings) still shows, while each failure, traceback and all, stays on the
    run's page; the command says in one line what failed."""
    import logging

    import dagster as dg

    def below_error(record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR

    def console(init_context: dg.InitLoggerContext) -> logging.Logger:
        logger = dg.colored_console_logger.logger_fn(init_context)
        for handler in logger.handlers:
            handler.addFilter(below_error)
        return logger

    return dg.LoggerDefinition(console, config_schema=dg.colored_console_logger.config_schema)


def _step_errors(result: dg.ExecuteInProcessResult) -> Iterator[tuple[str, Any]]:
    """(step, its error as Dagster keeps it: a SerializableErrorInfo) of every failed step."""
    for event in result.all_events:
        if event.is_step_failure:
            yield str(event.step_key), event.step_failure_data.error


def _causes(error: Any) -> Iterator[Any]:
    while error is not None:
        yield error
        error = error.cause or error.context


def _operator_error(error: Any) -> str | None:
    """The one line of an error raised in a run that the operator must fix, if it is one."""
    for cause in _causes(error):
        message = cause.message.strip()
        qualified, _, text = message.partition(": ")
        if qualified.endswith(cause.cls_name):
            message = text
        line = _operator_message(cause.cls_name, message.splitlines()[0] if message else "")
        if line is not None:
            return line
    return None


def _step_failures(result: dg.ExecuteInProcessResult) -> list[str]:
    """A line per failed step: the step and its innermost error's first line."""
    failures = []
    for step, error in _step_errors(result):
        *_, innermost = _causes(error)
        what = innermost.message.strip().splitlines()
        failures.append(f"{step} failed: {what[0] if what else innermost.cls_name}")
    return failures


# --- reading commands: they open the store and the database read-only ---------------


def _check_data_dir(current: Settings) -> None:
    """The data folder must exist when a reading command looks in it: made by reading, an
    empty folder would look like an archive with nothing in it."""
    uses_data_dir = not (current.storage and current.database_url)
    if uses_data_dir and not current.data_dir.is_dir():
        raise CommandError(
            f"OSA_DATA_DIR: {current.data_dir} is not a folder (nothing was ingested there; "
            "`osa plan` and `osa materialize` make it)"
        )


def _reading_database(configured: Settings) -> RecordsDatabase | None:
    """The records database opened for reading, or None if there is none yet."""
    from osa_dagster.records import DatabaseNotReadable, RecordsDatabase, database_url

    _check_data_dir(configured)
    db = RecordsDatabase(database_url(configured), read_only=True)
    try:
        db.engine  # noqa: B018 - opening it here reports a missing or old database at once
    except DatabaseNotReadable as error:
        if not str(error).startswith("no records database"):
            raise CommandError(f"{_database_variable()}: {error}") from error
        return None
    return db


class BatchOutcome(BaseModel):
    """A record of a finished batch that did not pass every hook, and why."""

    partition: str
    source_id: str
    hook: str
    """The first hook that did not pass it."""
    status: OutcomeStatus
    reason: str


class ConventionSummary(BaseModel):
    """Counts per record, not per hook: a record rejected by two hooks counts once."""

    convention: str
    batches_planned: int = 0
    batches_done: int = 0
    records_skipped_oversize: int = 0
    records_not_fetched: int = 0
    records_passed: int = 0
    records_rejected: int = 0
    records_errored: int = 0
    oom_retries: int = 0
    records_in_archive: int = 0
    feature_rows: int = 0


SUMMARY_LABELS = {
    "batches_planned": "batches planned",
    "batches_done": "batches done",
    "records_skipped_oversize": "records skipped (oversize)",
    "records_not_fetched": "records not fetched",
    "records_passed": "records passed every hook",
    "records_rejected": "records rejected",
    "records_errored": "records errored",
    "oom_retries": "OOM retries",
    "records_in_archive": "records in the archive",
    "feature_rows": "feature rows",
}


def _finished_batches(
    configured: Settings, convention_name: str, partitions: Sequence[str] = ()
) -> Iterator[Any]:
    """(partition, verdicts, ingest report) of every batch whose hooks all finished, in
    planning order; `partitions` narrows them (an unknown one is an error)."""
    from osa_dagster.batch import BatchInputError
    from osa_dagster.batch.fetch import read_ingest_report
    from osa_dagster.batch.plan import planned_partitions
    from osa_dagster.batch.publish import batch_verdicts
    from osa_dagster.storage import BatchLayout, artifact_store

    convention = _convention(configured, convention_name)
    _check_data_dir(configured)
    store = artifact_store(configured)
    planned = planned_partitions(store, convention.name)
    unknown = sorted(set(partitions) - set(planned))
    if unknown:
        raise CommandError(f"{convention.name} has no planned batch {', '.join(unknown)}")
    for partition in planned:
        if partitions and partition not in partitions:
            continue
        try:
            verdicts = batch_verdicts(convention, store, partition)
            report = read_ingest_report(store, BatchLayout(convention.name, partition))
        except (BatchInputError, FileNotFoundError):
            yield partition, None, None
            continue
        yield partition, verdicts, report


def summary(configured: Settings, convention_name: str) -> ConventionSummary:
    """Counts per record, not per hook or batch: a record rejected by two hooks, or planned in
    two batches, counts once; a record that passed in any batch counts as passed."""
    from osa_dagster.records.queries import count_feature_rows, count_published

    totals = ConventionSummary(convention=convention_name)
    outcomes: dict[str, str] = {}  # record -> the ConventionSummary field it counts in

    def settle(record: str, outcome: str) -> None:
        if outcomes.get(record) != "records_passed":
            outcomes[record] = outcome

    for _, verdicts, report in _finished_batches(configured, convention_name):
        totals.batches_planned += 1
        if verdicts is None:
            continue
        totals.batches_done += 1
        for skipped in report.skipped_oversize:
            settle(skipped.source_id, "records_skipped_oversize")
        for failed in [*report.failed, *report.missing]:
            settle(failed.source_id, "records_not_fetched")
        for verdict in verdicts.failed:
            rejected = verdict.status is OutcomeStatus.REJECTED
            settle(verdict.source_id, "records_rejected" if rejected else "records_errored")
        for record in verdicts.passed:
            settle(record.source_id, "records_passed")
        totals.oom_retries += sum(
            len(checkpoint.oom_attempts()) for checkpoint in verdicts.checkpoints.values()
        )
    for field in outcomes.values():
        setattr(totals, field, getattr(totals, field) + 1)
    db = _reading_database(configured)
    if db is not None:
        totals.records_in_archive = count_published(db, convention_name)
        totals.feature_rows = count_feature_rows(db, convention_name)
    return totals


def print_summary(totals: ConventionSummary) -> None:
    for field, label in SUMMARY_LABELS.items():
        print(f"{label:32} {getattr(totals, field)}")


def not_passed(
    configured: Settings, convention_name: str, partitions: Sequence[str]
) -> list[BatchOutcome]:
    """The records of finished batches that were rejected or errored, with their reasons."""
    outcomes = []
    for partition, verdicts, _ in _finished_batches(configured, convention_name, partitions):
        outcomes += [
            BatchOutcome(partition=partition, **asdict(verdict))
            for verdict in (verdicts.failed if verdicts else [])
        ]
    return outcomes


def list_records(
    configured: Settings,
    convention_name: str | None,
    limit: int,
    with_features: bool,
    as_json: bool,
    *,
    with_provenance: bool = False,
) -> None:
    from osa_dagster.records.queries import count_published, published_records

    if convention_name is not None:
        _convention(configured, convention_name)
    db = _reading_database(configured)
    records = (
        []
        if db is None
        else list(published_records(db, convention_name, limit + 1, with_features=with_features))
    )
    truncated = len(records) > limit
    records = records[:limit]
    if as_json:
        listed = [
            {
                **asdict(record),
                # null: not asked for (--features), which is not the same as none.
                "features": [
                    {"hook": hook, "row": index, "values": values}
                    for hook, index, values in record.features
                ]
                if with_features
                else None,
            }
            for record in records
        ]
        _print_listing("records", listed, truncated=truncated)
    else:
        for record in records:
            withdrawn = (
                ""
                if record.status == "published"
                else f"  {record.status} {record.status_changed_at:%Y-%m-%d %H:%M}: "
                f"{record.status_reason}"
            )
            print(
                f"{record.srn}  {record.convention}  {record.source_id}  {record.partition}"
                f"{withdrawn}"
            )
            if with_provenance and record.provenance:
                print("\n".join(_describe_provenance(record.provenance)))
            for hook, index, row in record.features:
                print(f"    {hook}[{index}]: {json.dumps(row, sort_keys=True)}")
    if truncated:
        total = (
            "" if convention_name is None or db is None else count_published(db, convention_name)
        )
        of_total = f" of {total}" if total else ""
        print(
            f"osa records: showing the first {limit}{of_total} records; --limit N shows more",
            file=sys.stderr,
        )


def _describe_provenance(provenance: dict[str, Any]) -> list[str]:
    """A record's provenance in a few lines: source, files, and each hook's judgement."""
    source = provenance.get("source", {})
    lines = [
        f"    from {source.get('name')} {source.get('location') or ''} upstream version "
        f"{source.get('upstream_version') or '-'}, batch {provenance.get('batch')}"
    ]
    for file in provenance.get("files", []):
        lines.append(f"    file {file['name']} sha256:{file.get('sha256') or 'not recorded'}")
    for hook, judged in provenance.get("hooks", {}).items():
        lines.append(
            f"    {hook} {judged['version']}: {judged['outcome']} (attempt {judged['attempt']}, "
            f"{judged['memory_limit_mb']} MB)"
        )
    return lines


def stale_batches(configured: Settings, convention_name: str) -> list[str]:
    """The planned batches that some hook judged only with another version than its own."""
    from osa_dagster.batch.revalidate import stale_partitions
    from osa_dagster.storage import artifact_store

    convention = _convention(configured, convention_name)
    return stale_partitions(
        convention, artifact_store(configured), _partitions(configured, convention.name)
    )


def hook_versions(configured: Settings, convention_name: str, as_json: bool) -> None:
    """Each hook's current version and the batches it has (not) judged."""
    from osa_dagster.batch.revalidate import hook_judgements
    from osa_dagster.storage import artifact_store

    convention = _convention(configured, convention_name)
    partitions = _partitions(configured, convention.name)
    judgements = hook_judgements(convention, artifact_store(configured), partitions)
    if as_json:
        _print_listing("hooks", [asdict(j) for j in judgements], convention=convention.name)
        return
    for judged in judgements:
        print(
            f"{judged.hook} {judged.version}: judged {len(judged.judged)} of "
            f"{len(partitions)} batches; not judged {len(judged.not_judged)} "
            f"(judged by other versions); never run {len(judged.never_run)}"
        )
        for partition, versions in judged.not_judged.items():
            print(f"    {partition}  judged by {', '.join(versions)}")
    if any(j.not_judged for j in judgements):
        print(
            f"\nWhat re-judging them would change: {_osa_command()} materialize "
            f"{convention.name} --stale --dry-run; to re-judge them: {_osa_command()} "
            f"materialize {convention.name} --stale"
        )


def dry_run(configured: Settings, convention_name: str, partitions: Sequence[str]) -> ChangeReport:
    """What materialising these batches would change in the archive."""
    from osa_dagster.batch.revalidate import revalidation_dry_run
    from osa_dagster.defs.resources import Resources
    from osa_dagster.records import RecordsDatabase, database_url
    from osa_dagster.storage import artifact_store

    convention = _convention(configured, convention_name)
    _check_before_ingest(configured, convention.name, partitions)
    runner = Resources.of(configured).hook_runner
    return revalidation_dry_run(
        convention,
        artifact_store(configured),
        RecordsDatabase(database_url(configured)),
        runner.get(),
        partitions,
        capacity=runner.capacity(),
    )


def retry_overrides(
    configured: Settings, convention: Convention, letters: Sequence[DeadLetterRow]
) -> str:
    """OSA_HOOK_MEMORY for a retry of the dead letters: the overrides in force, with each
    poison hook's cap raised to at least twice the limit its records failed at. The base in
    force is kept, so the ladder the retry climbs is the one in force, up to the new cap."""
    overrides = {
        target: (override.base_mb, override.cap_mb)
        for target, override in configured.hook_memory.items()
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


def dead_letters(
    configured: Settings, convention_name: str, partitions_only: bool, as_json: bool
) -> None:
    """List the convention's poison records, and how to run them again with a higher cap.

    A poison outcome is reopened by the next run of its batch whose memory ladder goes above
    the limit it failed at, starting at that rung: raise the hook's cap with OSA_HOOK_MEMORY
    and re-materialise the batches listed. Everything else in those batches is kept.
    """
    from osa_dagster.records import list_dead_letters

    convention = _convention(configured, convention_name)
    db = _reading_database(configured)
    letters = [] if db is None else list_dead_letters(db, convention.name)
    partitions = list(dict.fromkeys(letter.partition for letter in letters))
    if as_json:
        _print_listing(
            "dead_letters", [asdict(letter) for letter in letters], convention=convention.name
        )
        return
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
    overrides = shlex.quote(retry_overrides(configured, convention, letters))
    print(
        f"\n{len(letters)} poison records in {len(partitions)} batches. To run them again with"
        f" a higher cap (only they run again):\n  OSA_HOOK_MEMORY={overrides}"
        f" {_osa_command()} materialize {convention.name} --dead-letters"
    )


def dead_letter_partitions(configured: Settings, convention_name: str) -> list[str]:
    """The batches holding the convention's dead letters, each once."""
    from osa_dagster.records import list_dead_letters

    db = _reading_database(configured)
    letters = [] if db is None else list_dead_letters(db, convention_name)
    return list(dict.fromkeys(letter.partition for letter in letters))


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=1, default=str))


def _print_listing(
    things: str, items: list[Any], *, truncated: bool = False, **context: Any
) -> None:
    """Every listing of the CLI has one JSON shape: {things: [...], "truncated": bool}, and
    what the listing is of (the convention...) beside them."""
    _print_json({**context, things: items, "truncated": truncated})


def database_schema(configured: Settings, action: str) -> int:
    """Upgrade the records database to the newest revision, or tell where it is."""
    from osa_dagster.records import RecordsDatabase, database_url
    from osa_dagster.records.schema import current_revision, head_revision, upgrade

    engine = RecordsDatabase(database_url(configured)).engine  # opening upgrades already
    if action == "upgrade":
        upgrade(engine)
    revision = current_revision(engine)
    print(f"records database at revision {revision} (newest: {head_revision()})")
    return 0 if revision == head_revision() else EXIT_FAILED


def demo(configured: Settings, fresh: bool, *, debug: bool = False) -> int:
    if fresh:
        shutil.rmtree(configured.data_dir, ignore_errors=True)
    started = time.monotonic()
    planned = plan(
        configured, "pdb", limit=None, since=None, batch_size=DEMO_BATCH_SIZE, debug=debug
    )
    print(f"planned {len(planned.batches)} batches of the bundled PDB mirror")
    failed = materialize(
        configured, "pdb", [batch.partition for batch in planned.batches], debug=debug
    )
    elapsed = time.monotonic() - started
    totals = summary(configured, "pdb")
    print("\nsummary of the pdb convention")
    for field, label in SUMMARY_LABELS.items():
        print(f"  {label:32} {getattr(totals, field)}")
    records_in = sum(1 for _ in _records_in_batches(configured, "pdb"))
    print(f"  {'wall time (s)':32} {elapsed:.1f}")
    print(f"  {'records per second':32} {records_in / elapsed:.2f}")
    print(
        "\nSee the runs, partitions and metadata in the UI:  make ui"
        "  (dagster dev -w workspace.yaml, http://127.0.0.1:3000)"
    )
    return EXIT_FAILED if failed else 0


def _records_in_batches(configured: Settings, convention_name: str) -> Iterator[RecordRef]:
    from osa_dagster.batch.plan import load_manifest, planned_partitions
    from osa_dagster.storage import BatchLayout, artifact_store

    store = artifact_store(configured)
    for partition in planned_partitions(store, convention_name):
        yield from load_manifest(store, BatchLayout(convention_name, partition)).refs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="osa", description=__doc__)
    # On every subcommand too, so that `osa plan ... --debug` works; SUPPRESS keeps a flag
    # given before the subcommand from being reset by the subcommand's default.
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the traceback of an error instead of one line",
    )
    parser.add_argument("--debug", action="store_true", help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help_text, description=help_text, parents=[debug])

    demo_cmd = command("demo", "ingest the bundled PDB mirror end to end")
    demo_cmd.add_argument("--keep", action="store_true", help="keep data of earlier runs")

    plan_cmd = command("plan", "freeze an ingest into batches (partitions); prints them")
    plan_cmd.add_argument("convention")
    plan_cmd.add_argument("--limit", type=int, help="exactly this many records (default: all)")
    plan_cmd.add_argument("--since", help="only records changed since, ISO date: 2024-01-31")
    plan_cmd.add_argument(
        "--batch-size", type=int, help="records per batch (default: the convention's)"
    )
    plan_cmd.add_argument(
        "--replan",
        action="store_true",
        help="batch again records already planned at the same version (left out otherwise)",
    )
    plan_cmd.add_argument("--json", action="store_true", help="print the batches as JSON")
    plan_cmd.add_argument(
        "--dry-run",
        action="store_true",
        help="print what this plan would add, revise, withdraw and reinstate; change nothing",
    )
    plan_cmd.add_argument(
        "--source",
        help="where to read, for this plan: a source's name, a folder or file, a URL, or "
        "NAME:LOCATION (default: OSA_SOURCES, else the convention's own)",
    )

    run_cmd = command("materialize", "run the ingest job for partitions")
    run_cmd.add_argument("convention")
    run_cmd.add_argument("partitions", nargs="*", help="partition keys (default: all planned)")
    run_cmd.add_argument(
        "--dead-letters",
        action="store_true",
        help="only the batches holding dead letters (none: nothing runs)",
    )
    run_cmd.add_argument(
        "--stale",
        action="store_true",
        help="only the batches a changed hook has not judged (see `osa versions`)",
    )
    run_cmd.add_argument(
        "--dry-run",
        action="store_true",
        help="judge with the hooks' current versions and say what would be added, withdrawn "
        "or reinstated, changing no record",
    )
    run_cmd.add_argument("--json", action="store_true", help="print the dry run as JSON")

    versions_cmd = command(
        "versions", "each hook's current version, and the batches it has not judged"
    )
    versions_cmd.add_argument("convention")
    versions_cmd.add_argument("--json", action="store_true", help="print them as JSON")

    summary_cmd = command("summary", "counts of a convention's ingest")
    summary_cmd.add_argument("convention")
    summary_cmd.add_argument("--json", action="store_true", help="print the counts as JSON")

    records_cmd = command("records", "list published records")
    records_cmd.add_argument("--convention")
    records_cmd.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_RECORDS_LIMIT,
        help="list at most this many, saying so when there are more (default: %(default)s)",
    )
    records_cmd.add_argument("--features", action="store_true", help="show feature rows too")
    records_cmd.add_argument(
        "--provenance",
        action="store_true",
        help="show where each record came from and which hook versions judged it",
    )
    records_cmd.add_argument("--json", action="store_true", help="print the records as JSON")

    rejected_cmd = command(
        "rejections", "list the records that were rejected or errored, with their reasons"
    )
    rejected_cmd.add_argument("convention")
    rejected_cmd.add_argument(
        "partitions", nargs="*", help="only these batches (default: every finished batch)"
    )
    rejected_cmd.add_argument("--json", action="store_true", help="print them as JSON")

    dead_cmd = command(
        "dead-letters", "list poison records: out of memory alone at their hook's cap"
    )
    dead_cmd.add_argument("convention")
    dead_cmd.add_argument(
        "--partitions", action="store_true", help="print only the batches to re-materialise"
    )
    dead_cmd.add_argument("--json", action="store_true", help="print them as JSON")

    db_cmd = command("db", "the records database's schema (migrations)")
    db_cmd.add_argument("action", choices=["upgrade", "current"])

    from osa_dagster.backfill import add_backfill_parser
    from osa_dagster.stack import add_stack_parser

    add_backfill_parser(commands, parents=[debug])
    add_stack_parser(commands, parents=[debug])
    return parser


# The commands that run hooks on this machine: in this process, or in the runs of the daemon
# that `stack` starts (`backfill` asks a webserver, perhaps another machine's, for runs).
RUNS_HOOKS_HERE = ("materialize", "demo", "stack")


def run_command(args: argparse.Namespace) -> int:
    from osa_dagster.settings import Settings

    # Parsed once, here, and passed down: every variable is checked before any work, and a
    # malformed one anywhere is named at once.
    configured = Settings.from_env()
    if args.command in RUNS_HOOKS_HERE:
        from osa_dagster.engine.runners.local import require_promised_isolation

        # Before anything is launched: never a run that fails for want of the sandbox or of
        # real memory limits.
        require_promised_isolation(configured)
    if args.command == "backfill":
        from osa_dagster.backfill import run_backfill_command

        return run_backfill_command(args, configured)
    if args.command == "stack":
        from osa_dagster.stack import run_stack_command

        return run_stack_command(args)
    if args.command == "db":
        return database_schema(configured, args.action)
    if args.command == "demo":
        return demo(configured, fresh=not args.keep, debug=args.debug)
    if args.command == "plan" and args.dry_run:
        if args.batch_size is not None or args.replan:
            raise CommandError(
                "--dry-run says what would change; it takes no --batch-size or --replan"
            )
        result = plan_dry_run(
            configured, args.convention, args.limit, args.since, source=args.source
        )
        assert result.changes is not None
        if args.json:
            _print_json({**result.changes.as_json(), "gone_check": result.gone_check})
        else:
            print(result.changes.format())
            print(result.gone_check)
        for skipped in result.skipped:
            print(f"skipped {skipped.where}: {skipped.reason}", file=sys.stderr)
        return 0
    if args.command == "plan":
        planned = plan(
            configured,
            args.convention,
            args.limit,
            args.since,
            args.batch_size,
            replan=args.replan,
            source=args.source,
            debug=args.debug,
        )
        if args.json:
            _print_json(planned.model_dump())
        else:
            for batch in planned.batches:
                print(f"{batch.partition}  {batch.records}{'  new' if batch.new else ''}")
            print(_plan_totals(planned.totals), file=sys.stderr)
        return 0
    if args.command == "materialize":
        if sum(map(bool, (args.partitions, args.dead_letters, args.stale))) > 1:
            raise CommandError("give one of partitions, --dead-letters or --stale")
        if args.json and not args.dry_run:
            raise CommandError("--json is for --dry-run")
        if args.dead_letters:
            keys = dead_letter_partitions(configured, _convention(configured, args.convention).name)
            if not keys:
                print(f"{args.convention} has no dead letters: nothing to run")
                return 0
        elif args.stale:
            keys = stale_batches(configured, args.convention)
            if not keys:
                print(f"every hook of {args.convention} has judged every batch: nothing to run")
                return 0
        else:
            keys = args.partitions or _partitions(configured, args.convention)
        if args.dry_run:
            report = dry_run(configured, args.convention, keys)
            if args.json:
                _print_json(report.as_json())
            else:
                print(report.format())
            return 0
        return (
            EXIT_FAILED if materialize(configured, args.convention, keys, debug=args.debug) else 0
        )
    if args.command == "summary":
        totals = summary(configured, args.convention)
        if args.json:
            _print_json(totals.model_dump())
        else:
            print_summary(totals)
        return 0
    if args.command == "rejections":
        outcomes = not_passed(configured, args.convention, args.partitions)
        if args.json:
            rejections = [outcome.model_dump() for outcome in outcomes]
            _print_listing("rejections", rejections, convention=args.convention)
        for outcome in [] if args.json else outcomes:
            print(
                f"{outcome.partition}  {outcome.source_id}  {outcome.hook}  "
                f"{outcome.status}: {outcome.reason}"
            )
        return 0
    if args.command == "dead-letters":
        dead_letters(configured, args.convention, args.partitions, args.json)
        return 0
    if args.command == "versions":
        hook_versions(configured, args.convention, args.json)
        return 0
    list_records(
        configured,
        args.convention,
        _positive(args.limit, "--limit"),
        args.features,
        args.json,
        with_provenance=args.provenance,
    )
    return 0


def _positive(value: int, option: str) -> int:
    if value <= 0:
        raise CommandError(f"{option}: must be a positive number, not {value}")
    return value


def _plan_totals(totals: PlanTotals) -> str:
    left_out = [
        f"{totals.already_planned} left out, planned before" if totals.already_planned else "",
        f"{totals.duplicates_dropped} listed twice" if totals.duplicates_dropped else "",
    ]
    return (
        f"{totals.batches} batches of {totals.records} records, {totals.new_batches} of them "
        f"new ({totals.new_records} records)" + "".join(f"; {part}" for part in left_out if part)
    )


# Options of `osa plan` by the PlanConfig field they set, for naming them in errors.
PLAN_OPTIONS = {"limit": "--limit", "since": "--since", "batch_size": "--batch-size"}


def _database_variable() -> str:
    """Only the settings say where the records database is: its problems are theirs."""
    return "OSA_DATABASE_URL" if os.environ.get("OSA_DATABASE_URL") else "OSA_DATA_DIR"


def _operator_message(error_class: str, message: str) -> str | None:
    """The one line for an error of the class named `error_class` (raised here or in a run):
    what to fix and where; None for an error that is a bug. By name, since an error raised
    in a run comes back from Dagster as a class name and a message."""
    from osa_dagster.backfill import BackfillError
    from osa_dagster.batch import BatchInputError
    from osa_dagster.conventions.registry import ConventionError
    from osa_dagster.engine import MemoryLimitsUnavailable
    from osa_dagster.engine.runners.sandbox import SandboxUnavailable
    from osa_dagster.records import DatabaseNotReadable, RecordsDatabaseUnusable
    from osa_dagster.settings import SettingsError
    from osa_dagster.storage.s3 import StoreError

    said_in_full = (
        CommandError,
        RunFailed,
        BackfillError,
        ConventionError,
        SettingsError,
        BatchInputError,
        SandboxUnavailable,
    )
    if error_class in _class_names(*said_in_full):
        return message
    if error_class in _class_names(MemoryLimitsUnavailable):
        return f"hook memory limits: {message}"
    if error_class in _class_names(RecordsDatabaseUnusable, DatabaseNotReadable):
        return f"{_database_variable()}: {message}"
    if error_class in _class_names(StoreError):
        store = "OSA_S3_ENDPOINT_URL" if os.environ.get("OSA_S3_ENDPOINT_URL") else "OSA_STORAGE"
        return f"{store}: {message}"
    return None


def _class_names(*classes: type) -> set[str]:
    """The names of `classes` and of their subclasses."""
    names = set()
    for cls in classes:
        names.add(cls.__name__)
        names |= _class_names(*cls.__subclasses__())
    return names


def one_line(error: BaseException) -> str | None:
    """The one line that tells a person what to fix, or None for an error that is a bug."""
    from pydantic import ValidationError
    from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

    if isinstance(error, ValidationError) and error.title == "PlanConfig":
        problems = []
        for problem in error.errors():
            option = PLAN_OPTIONS.get(str(problem["loc"][0]), str(problem["loc"][0]))
            message = problem["msg"].removeprefix("Value error, ")
            problems.append(f"{option}: {message}")
        return "; ".join(problems)
    if isinstance(error, ArgumentError | NoSuchModuleError):
        return f"{_database_variable()}: not a database URL this installation can open ({error})"
    if isinstance(error, DBAPIError):
        reason = str(error.orig).strip().splitlines()[0] if error.orig else type(error).__name__
        url = getattr(error, FAILED_DATABASE_ATTR, None)
        if url is None:
            return f"{_database_variable()} or DAGSTER_HOME: a database cannot be used: {reason}"
        if _records_database_file(url) == _records_database_file(None):
            return f"{_database_variable()}: the records database {url} cannot be used: {reason}"
        return f"DAGSTER_HOME: the Dagster instance's database {url} cannot be used: {reason}"
    return _operator_message(type(error).__name__, str(error))


# A database error carries no word of which database failed, and a command may use two:
# the Dagster instance's and the records database. This attribute, set on every such error
# as it is raised, names the database by its URL (password hidden).
FAILED_DATABASE_ATTR = "osa_failed_database"


def _name_the_failed_database(context: Any) -> None:  # sqlalchemy's ExceptionContext
    if context.engine is not None and context.sqlalchemy_exception is not None:
        url = context.engine.url.render_as_string(hide_password=True)
        setattr(context.sqlalchemy_exception, FAILED_DATABASE_ATTR, url)


def _records_database_file(url: str | None) -> str:
    """The records database's URL (None: the one the settings name) without what opening it
    adds: SQLite's read-only URI form (file:...?mode=ro) or a password."""
    from sqlalchemy.engine import make_url

    from osa_dagster.records import database_url
    from osa_dagster.settings import Settings

    parsed = make_url(url or database_url(Settings.from_env()))
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        return str(Path(parsed.database.removeprefix("file:")).resolve())
    return parsed.render_as_string(hide_password=True)


def main(argv: Sequence[str] | None = None) -> int:
    from sqlalchemy import Engine, event

    args = build_parser().parse_args(argv)
    event.listen(Engine, "handle_error", _name_the_failed_database)
    try:
        return run_command(args)
    except (Interrupted, KeyboardInterrupt) as stopped:
        if args.debug and isinstance(stopped, KeyboardInterrupt):
            raise
        said = str(stopped) if isinstance(stopped, Interrupted) else "interrupted"
        print(f"osa {args.command}: {said}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except WorkFailed as failed:
        if args.debug:
            raise
        print(f"osa {args.command}: {failed}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as error:
        message = one_line(error)
        if message is None or args.debug:
            raise
        print(f"osa {args.command}: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        event.remove(Engine, "handle_error", _name_the_failed_database)


if __name__ == "__main__":
    sys.exit(main())
