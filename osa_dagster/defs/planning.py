"""Planning an ingest from Dagster: a job that freezes batches into partitions, a sensor
that requests a run for every new partition, and one that requests again the batches of a
run that died for reasons outside its work once Dagster's run retries are used up."""

import os
import sys
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass
from datetime import datetime

import dagster as dg
from osa_sdk.types import SkippedSource
from pydantic import Field, field_validator

from osa_dagster import __version__
from osa_dagster.batch.plan import plan_ingest
from osa_dagster.conventions.base import Convention
from osa_dagster.conventions.registry import load_conventions
from osa_dagster.defs.assets import check_keys, features_key, partitions_per_run
from osa_dagster.defs.dagster_private import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    PARTITION_NAME_TAG,
    RunFailureReason,
    ended_backfill,
    partition_range_tags,
    retry_all_steps_tags,
    run_failure_reason,
    will_be_retried,
)
from osa_dagster.defs.resources import ArtifactStoreResource, hooks_refusal
from osa_dagster.defs.run_worker import recording_worker
from osa_dagster.settings import Settings, data_dir

SENSOR_INTERVAL_S = 15
SKIPPED_METADATA = "skipped_files"
CONVENTION_TAG = "osa/convention"
PLANNED_BATCHES_METADATA = "planned_batches"
# How many times over the batches of a run that keeps dying are requested again, each time
# with Dagster's own run retries: a batch that kills every worker needs a person.
MAX_RESUMES = 3
RESUMES_TAG = "osa/resumes"
RESUMED_FROM_TAG = "osa/resumed-from"
# A run in one of these may still work its batches.
LIVE_RUN_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


class PlanConfig(dg.Config):
    """What to ingest: records changed since a date (ISO 8601), at most `limit` of them.

    Validated here, so a bad value fails the same way in the launchpad and in `osa plan`
    (which builds this before it launches anything).
    """

    limit: int | None = Field(default=None, description="Exact number of records; all if unset.")
    since: str | None = Field(default=None, description="ISO date or datetime, e.g. 2024-01-31.")
    batch_size: int | None = Field(default=None, description="Records per batch (partition).")
    replan: bool = Field(
        default=False,
        description="Batch again records already planned at the same version (left out otherwise).",
    )
    source: str | None = Field(
        default=None,
        description="Where to read, for this plan only: a source's name, a folder or file, a "
        "URL, or NAME:LOCATION (as in OSA_SOURCES). The batches keep reading there.",
    )

    @field_validator("limit", "batch_size")
    @classmethod
    def _a_countable_number(cls, value: int | None) -> int | None:
        if value is None:
            return None
        if value <= 0:
            raise ValueError(f"must be a positive number of records, not {value}")
        # Larger than any list can hold here: the discovery would fail after minutes.
        if value > sys.maxsize:
            raise ValueError(
                f"{value} is more records than this machine can count (at most {sys.maxsize})"
            )
        return value

    @field_validator("since")
    @classmethod
    def _an_iso_date(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                datetime.fromisoformat(value)
            except ValueError:
                raise ValueError(
                    f"{value!r} is not an ISO date or datetime (e.g. 2024-01-31)"
                ) from None
        return value


# What a step container needs from the orchestrator's environment, besides every OSA_*
# variable (all of them: a step loads the same definitions and settings).
STEP_ENV_VARS = (
    "DAGSTER_HOME",
    "DOCKER_HOST",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
)


def ingest_executor() -> dg.ExecutorDefinition:
    """In-process by default: hooks already run in their own processes or containers, and a
    process per step costs seconds per partition. OSA_EXECUTOR=multiprocess isolates steps
    in processes, OSA_EXECUTOR=docker in containers (see docker_step_executor)."""
    choice = Settings.from_env().executor
    if choice == "docker":
        return recording_worker(docker_step_executor())
    executors = {"in_process": dg.in_process_executor, "multiprocess": dg.multiprocess_executor}
    return recording_worker(executors[choice])


def docker_step_executor() -> dg.ExecutorDefinition:
    """dagster_docker's executor: every step in its own container of OSA_STEP_IMAGE, removed
    when the step ends (see step_containers).

    Steps use the host's network, so they reach services on 127.0.0.1 (S3, PostgreSQL). The
    Dagster home, the data folder and a unix DOCKER_HOST socket are mounted at the same paths
    as on the host, so a step sees the files the orchestrator sees and the Docker runner's
    bind mounts name paths that the Docker engine can find; the folders and files of
    OSA_SOURCES are mounted read-only, so that raw_batch reads them where they were planned.
    """
    from osa_dagster.defs.step_containers import STEP_LABEL, removing_docker_executor

    settings = Settings.from_env()
    mounts = {path: "rw" for path in (os.environ.get("DAGSTER_HOME", ""), str(data_dir())) if path}
    docker_host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if docker_host.startswith("unix://"):
        mounts[docker_host.removeprefix("unix://")] = "rw"
    for convention in load_conventions().values():
        if convention.location and convention.location.startswith("/"):
            mounts.setdefault(convention.location, "ro")
    volumes = {path: {"bind": path, "mode": mode} for path, mode in mounts.items()}
    return removing_docker_executor.configured(
        {
            "image": settings.step_image or f"osa-dagster-step:{__version__}",
            "network": "host",
            "env_vars": [
                name for name in os.environ if name in STEP_ENV_VARS or name.startswith("OSA_")
            ],
            "container_kwargs": {"volumes": volumes, "labels": {STEP_LABEL: str(data_dir())}},
        },
        name="docker",
    )


def contiguous_chunks(keys: Sequence[str], skip: Set[str], size: int) -> list[list[str]]:
    """`keys` without `skip`, cut into runs of at most `size` keys that were adjacent in
    `keys`: a run over a partition range must not cover a partition it should skip."""
    chunks: list[list[str]] = [[]]
    for key in keys:
        if key in skip:
            chunks.append([])
        else:
            if len(chunks[-1]) == size:
                chunks.append([])
            chunks[-1].append(key)
    return [chunk for chunk in chunks if chunk]


def partition_range_request(
    chunk: Sequence[str], key_prefix: str = "", tags: Mapping[str, str] | None = None
) -> dg.RunRequest:
    """One run over the partitions `chunk[0]`..`chunk[-1]` (adjacent in the definition),
    whose run key names them after `key_prefix`."""
    if len(chunk) == 1:
        return dg.RunRequest(run_key=key_prefix + chunk[0], partition_key=chunk[0], tags=tags)
    first, last = chunk[0], chunk[-1]
    return dg.RunRequest(
        run_key=f"{key_prefix}{first}...{last}",
        tags={**(tags or {}), **partition_range_tags(first, last)},
    )


@dataclass(frozen=True)
class BatchOrder:
    """A convention's batches in planning order: the order that a run's range follows."""

    keys: Sequence[str]
    position: Mapping[str, int]

    @classmethod
    def of(
        cls, instance: dg.DagsterInstance, partitions: dg.DynamicPartitionsDefinition
    ) -> "BatchOrder":
        keys = instance.get_dynamic_partitions(partitions.name)
        return cls(keys=keys, position={key: n for n, key in enumerate(keys)})

    def covered_by(self, run: dg.DagsterRun) -> list[str]:
        """The batches `run` works: its partition, or every one of its range."""
        if PARTITION_NAME_TAG in run.tags:
            return [run.tags[PARTITION_NAME_TAG]]
        first = self.position.get(run.tags.get(ASSET_PARTITION_RANGE_START_TAG, ""))
        last = self.position.get(run.tags.get(ASSET_PARTITION_RANGE_END_TAG, ""))
        if first is None or last is None:
            return []
        return list(self.keys[first : last + 1])


def finished_partitions(
    instance: dg.DagsterInstance, run_ids: Sequence[str], convention: Convention
) -> set[str]:
    """The batches that the runs `run_ids`, together, materialised `features` of and gave a
    verdict of every check on: what a run that died before its end need not do again."""
    features = features_key(convention)
    checks = set(check_keys(convention))
    materialized: set[str] = set()
    evaluated: dict[str, set[dg.AssetCheckKey]] = {}
    kinds = {dg.DagsterEventType.ASSET_MATERIALIZATION, dg.DagsterEventType.ASSET_CHECK_EVALUATION}
    for run_id in run_ids:
        for record in instance.get_records_for_run(run_id, of_type=kinds).records:
            event = record.event_log_entry.dagster_event
            if event is None:
                continue
            if event.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION:
                if event.asset_key == features and event.partition is not None:
                    materialized.add(event.partition)
            else:
                verdict = event.asset_check_evaluation_data
                if verdict.partition is not None:
                    evaluated.setdefault(verdict.partition, set()).add(verdict.asset_check_key)
    return {key for key in materialized if evaluated.get(key, set()) >= checks}


def _why_not_resumed(
    context: dg.RunFailureSensorContext, convention: Convention, reason: RunFailureReason
) -> str | None:
    """Why the failed run's batches are not for this sensor to request again, if they are not."""
    instance, run = context.instance, context.dagster_run
    backfill = ended_backfill(instance, run)
    if backfill is not None:
        return f"run {run.run_id} belongs to backfill {backfill}, which has ended"
    if will_be_retried(instance, run, reason):
        return f"run {run.run_id} will be retried by Dagster"
    if reason == RunFailureReason.STEP_FAILURE:
        steps = sorted({e.step_key for e in context.get_step_failure_events() if e.step_key})
        # Running the batch again would fail again until the cause (bad input, a bug) is fixed.
        return (
            f"run {run.run_id} failed in step {', '.join(steps) or '(unknown)'}: its own "
            f"failure, not re-requested (`osa backfill {convention.name} --failed` runs its "
            "batches again once the cause is fixed)"
        )
    return None


def _finished_since(
    instance: dg.DagsterInstance, run: dg.DagsterRun, convention: Convention, order: BatchOrder
) -> set[str]:
    """The batches of `run` that it, Dagster's retries of it (the same root run) or a later
    successful run over some of them (an operator's, say) finished."""
    covered = set(order.covered_by(run))
    group = instance.get_run_group(run.run_id)
    run_ids = [r.run_id for r in group[1]] if group else [run.run_id]
    root = instance.get_run_record_by_id(run.root_run_id or run.run_id)
    if root is not None:
        later = instance.get_runs(
            dg.RunsFilter(
                tags={CONVENTION_TAG: convention.name},
                statuses=[dg.DagsterRunStatus.SUCCESS],
                created_after=root.create_timestamp,
            )
        )
        run_ids += [r.run_id for r in later if covered.intersection(order.covered_by(r))]
    return finished_partitions(instance, run_ids, convention)


def _in_live_runs(
    instance: dg.DagsterInstance, failed: dg.DagsterRun, convention: Convention, order: BatchOrder
) -> set[str]:
    """The batches that a queued or running run other than `failed` may still work (the
    instance stores a run's failure a moment before its status: it may still read STARTED).
    The ingest job's runs and those of `osa backfill` carry the convention's tag."""
    live = instance.get_runs(
        dg.RunsFilter(tags={CONVENTION_TAG: convention.name}, statuses=LIVE_RUN_STATUSES)
    )
    return {key for run in live if run.run_id != failed.run_id for key in order.covered_by(run)}


def unfinished_batches_request(
    context: dg.RunFailureSensorContext,
    convention: Convention,
    partitions: dg.DynamicPartitionsDefinition,
) -> dg.SensorResult | dg.SkipReason:
    """The runs that work again the batches the failed run of the ingest job left unfinished,
    or why there are none. Only a run that died for reasons outside its work (its worker
    gone, an exception in the run, a start timeout) is resumed, once Dagster will not retry
    it, and at most MAX_RESUMES times over."""
    run = context.dagster_run
    reason = run_failure_reason(context.failure_event)
    why_not = _why_not_resumed(context, convention, reason)
    if why_not is not None:
        return dg.SkipReason(why_not)
    order = BatchOrder.of(context.instance, partitions)
    covered = order.covered_by(run)
    skip = _finished_since(context.instance, run, convention, order) | _in_live_runs(
        context.instance, run, convention, order
    )
    left = [key for key in covered if key not in skip]
    died = f"run {run.run_id} died ({reason.value})"
    if not left:
        return dg.SkipReason(f"{died}, but each of its batches is finished or in a live run")
    resumes = int(run.tags.get(RESUMES_TAG, "0"))
    if resumes >= MAX_RESUMES:
        return dg.SkipReason(
            f"{died} after {resumes} resumes, the most this sensor requests; batches left: "
            f"{', '.join(left)}. Run them with `osa materialize {convention.name} "
            f"{' '.join(left)}`"
        )
    tags = {RESUMES_TAG: str(resumes + 1), RESUMED_FROM_TAG: run.run_id}
    # The run key names the failed run and the chunk: a failure evaluated twice requests
    # nothing new.
    requests = [
        partition_range_request(chunk, key_prefix=f"{run.run_id}:", tags=tags)
        for chunk in contiguous_chunks(covered, skip, partitions_per_run())
    ]
    context.log.info(
        f"{died} and will not be retried: requesting {len(left)} of its batches again, in "
        f"{len(requests)} runs"
    )
    return dg.SensorResult(run_requests=requests)


def skipped_table(skipped: Sequence[SkippedSource]) -> dg.TableMetadataValue:
    """What discover left out, as a table the UI shows and `osa plan` prints."""
    return dg.MetadataValue.table(
        records=[dg.TableRecord({"file": s.where, "reason": s.reason}) for s in skipped],
        schema=dg.TableSchema(
            columns=[dg.TableColumn("file", "string"), dg.TableColumn("reason", "string")]
        ),
    )


def plan_job_name(convention: Convention) -> str:
    return f"{convention.name}_plan"


def ingest_job_name(convention: Convention) -> str:
    return f"{convention.name}_ingest"


def convention_jobs(
    convention: Convention, partitions: dg.DynamicPartitionsDefinition
) -> dg.Definitions:
    """The plan job, the ingest job, the sensor that runs newly planned batches and the one
    that runs again the batches of runs that died."""

    @dg.op(name=f"{convention.name}_plan_batches")
    def plan_batches(
        context: dg.OpExecutionContext, config: PlanConfig, artifact_store: ArtifactStoreResource
    ) -> None:
        since = datetime.fromisoformat(config.since) if config.since else None
        try:
            source = convention.choose_source(config.source) if config.source else convention
        except ValueError as error:
            raise dg.Failure(description=f"source: {error}", allow_retries=False) from None
        result = plan_ingest(
            source,
            artifact_store.get(),
            since=since,
            limit=config.limit,
            batch_size=config.batch_size,
            replan=config.replan,
        )
        # Re-adding known keys is harmless: the instance ignores keys it already has.
        context.instance.add_dynamic_partitions(partitions.name, result.partitions)
        context.log.info(
            f"planned {result.records} records in {len(result.partitions)} batches, "
            f"{len(result.new_partitions)} of them new; {result.already_planned} records "
            "left out, planned before at the same version"
        )
        for skipped in result.skipped:
            context.log.warning(f"skipped {skipped.where}: {skipped.reason}")
        context.add_output_metadata(
            {
                "source": source.location or source.source,
                "records": result.records,
                "batches": len(result.partitions),
                "new_batches": len(result.new_partitions),
                "duplicate_refs_dropped": result.duplicate_refs,
                "already_planned": result.already_planned,
                # Which batches, in planning order, and which of them are new: `osa plan`
                # prints them from here, and the run's page shows them.
                PLANNED_BATCHES_METADATA: dg.MetadataValue.json(
                    {
                        "batches": result.partitions,
                        "new": result.new_partitions,
                        "records": result.records_per_batch,
                    }
                ),
                "skipped": len(result.skipped),
                SKIPPED_METADATA: skipped_table(result.skipped),
            }
        )

    @dg.job(
        name=plan_job_name(convention),
        description=f"Discover {convention.name} records and freeze them into batches.",
        executor_def=recording_worker(dg.in_process_executor),
    )
    def plan_job() -> None:
        plan_batches()

    ingest_job = dg.define_asset_job(
        name=ingest_job_name(convention),
        selection=dg.AssetSelection.assets(features_key(convention)).upstream(),
        executor_def=ingest_executor(),
        description=f"Fetch, check, publish and store features of one {convention.name} batch.",
        # The production profile limits concurrent runs per convention on this tag. A retry
        # (of a run whose worker died) runs every step again: finished ones cost a re-fetch
        # and a look at complete checkpoints, and every check gets its verdict.
        tags={CONVENTION_TAG: convention.name, **retry_all_steps_tags()},
    )

    @dg.sensor(
        name=f"{convention.name}_new_batches",
        job=ingest_job,
        minimum_interval_seconds=SENSOR_INTERVAL_S,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Requests ingest runs for newly planned batches, up to "
        "OSA_PARTITIONS_PER_RUN adjacent ones per run.",
    )
    def new_batches(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        refusal = hooks_refusal()
        if refusal is not None:
            return dg.SkipReason(refusal)  # the cursor stays: the batches run once hooks can
        keys = context.instance.get_dynamic_partitions(partitions.name)
        # Keys come back in the order they were added, so the cursor is a count; the run
        # key makes a repeated request a no-op should the cursor ever lag.
        seen = int(context.cursor or 0)
        # Batches ingested outside this sensor (the CLI, a backfill) need no run.
        done = context.instance.get_materialized_partitions(features_key(convention))
        requests = [
            partition_range_request(chunk)
            for chunk in contiguous_chunks(keys[seen:], done, partitions_per_run())
        ]
        return dg.SensorResult(run_requests=requests, cursor=str(len(keys)))

    @dg.run_failure_sensor(
        name=f"{convention.name}_unfinished_batches",
        monitored_jobs=[ingest_job],
        request_job=ingest_job,
        minimum_interval_seconds=SENSOR_INTERVAL_S,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="When an ingest run died for reasons outside its work (its worker gone, "
        "say) and Dagster's run retries are used up, requests its unfinished batches again, "
        f"at most {MAX_RESUMES} times over.",
    )
    def unfinished_batches(context: dg.RunFailureSensorContext) -> dg.SensorResult | dg.SkipReason:
        return unfinished_batches_request(context, convention, partitions)

    return dg.Definitions(jobs=[plan_job, ingest_job], sensors=[new_batches, unfinished_batches])
