"""Planning an ingest from Dagster: a job that freezes batches into partitions, and a
sensor that requests a run for every new partition."""

import os
import sys
from collections.abc import Sequence, Set
from datetime import datetime

import dagster as dg
from osa_sdk.types import SkippedSource
from pydantic import Field, field_validator

from osa_dagster import __version__
from osa_dagster.batch.plan import plan_ingest
from osa_dagster.conventions.base import Convention
from osa_dagster.conventions.registry import load_conventions
from osa_dagster.defs.assets import features_key, partitions_per_run
from osa_dagster.defs.dagster_private import partition_range_tags, retry_all_steps_tags
from osa_dagster.defs.resources import ArtifactStoreResource
from osa_dagster.defs.run_worker import recording_worker
from osa_dagster.settings import Settings, data_dir

SENSOR_INTERVAL_S = 15
SKIPPED_METADATA = "skipped_files"
CONVENTION_TAG = "osa/convention"
PLANNED_BATCHES_METADATA = "planned_batches"


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


def partition_range_request(chunk: Sequence[str]) -> dg.RunRequest:
    """One run over the partitions `chunk[0]`..`chunk[-1]` (adjacent in the definition)."""
    if len(chunk) == 1:
        return dg.RunRequest(run_key=chunk[0], partition_key=chunk[0])
    first, last = chunk[0], chunk[-1]
    return dg.RunRequest(
        run_key=f"{first}...{last}",
        tags=partition_range_tags(first, last),
    )


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
    """The plan job, the ingest job and the sensor that runs newly planned batches."""

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
                    {"batches": result.partitions, "new": result.new_partitions}
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
    def new_batches(context: dg.SensorEvaluationContext) -> dg.SensorResult:
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

    return dg.Definitions(jobs=[plan_job, ingest_job], sensors=[new_batches])
