"""Planning an ingest from Dagster: a job that freezes batches into partitions, and a
sensor that requests a run for every new partition."""

import os
from datetime import datetime

import dagster as dg
from dagster._core.definitions.unresolved_asset_job_definition import (
    UnresolvedAssetJobDefinition,
)
from pydantic import Field

from osa_dagster.conventions.base import Convention
from osa_dagster.conventions.pipeline import plan_ingest
from osa_dagster.defs.assets import features_key
from osa_dagster.defs.resources import ArtifactStoreResource

SENSOR_INTERVAL_S = 15
CONVENTION_TAG = "osa/convention"

# define_asset_job returns a job that Definitions resolves later; both kinds are jobs to us.
AnyJob = dg.JobDefinition | UnresolvedAssetJobDefinition


class PlanConfig(dg.Config):
    """What to ingest: records changed since a date (ISO 8601), at most `limit` of them."""

    limit: int | None = Field(default=None, description="Exact number of records; all if unset.")
    since: str | None = Field(default=None, description="ISO date or datetime, e.g. 2024-01-31.")
    batch_size: int | None = Field(default=None, description="Records per batch (partition).")


def ingest_executor() -> dg.ExecutorDefinition:
    """In-process by default: hooks already run in their own processes or containers, and a
    process per step costs seconds per partition. OSA_EXECUTOR=multiprocess isolates steps."""
    choice = os.environ.get("OSA_EXECUTOR", "in_process")
    executors = {"in_process": dg.in_process_executor, "multiprocess": dg.multiprocess_executor}
    if choice not in executors:
        raise ValueError(f"OSA_EXECUTOR={choice!r}: choose one of {sorted(executors)}")
    return executors[choice]


def plan_job_name(convention: Convention) -> str:
    return f"{convention.name}_plan"


def ingest_job_name(convention: Convention) -> str:
    return f"{convention.name}_ingest"


def convention_jobs_and_sensors(
    convention: Convention, partitions: dg.DynamicPartitionsDefinition
) -> tuple[list[AnyJob], list[dg.SensorDefinition]]:
    @dg.op(name=f"{convention.name}_plan_batches")
    def plan_batches(
        context: dg.OpExecutionContext, config: PlanConfig, artifact_store: ArtifactStoreResource
    ) -> None:
        since = datetime.fromisoformat(config.since) if config.since else None
        result = plan_ingest(
            convention,
            artifact_store.get(),
            since=since,
            limit=config.limit,
            batch_size=config.batch_size,
        )
        # Re-adding known keys is harmless: the instance ignores keys it already has.
        context.instance.add_dynamic_partitions(partitions.name, result.partitions)
        context.log.info(
            f"planned {result.records} records in {len(result.partitions)} batches, "
            f"{len(result.new_partitions)} of them new"
        )
        context.add_output_metadata(
            {
                "records": result.records,
                "batches": len(result.partitions),
                "new_batches": len(result.new_partitions),
                "duplicate_refs_dropped": result.duplicate_refs,
            }
        )

    @dg.job(
        name=plan_job_name(convention),
        description=f"Discover {convention.name} records and freeze them into batches.",
        executor_def=dg.in_process_executor,
    )
    def plan_job() -> None:
        plan_batches()

    ingest_job = dg.define_asset_job(
        name=ingest_job_name(convention),
        selection=dg.AssetSelection.assets(features_key(convention)).upstream(),
        executor_def=ingest_executor(),
        description=f"Fetch, check, publish and store features of one {convention.name} batch.",
        # The production profile limits concurrent runs per convention on this tag.
        tags={CONVENTION_TAG: convention.name},
    )

    @dg.sensor(
        name=f"{convention.name}_new_batches",
        job=ingest_job,
        minimum_interval_seconds=SENSOR_INTERVAL_S,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Requests one ingest run per newly planned batch.",
    )
    def new_batches(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        keys = context.instance.get_dynamic_partitions(partitions.name)
        # Keys come back in the order they were added, so the cursor is a count; the run
        # key makes a repeated request a no-op should the cursor ever lag.
        seen = int(context.cursor or 0)
        # Batches ingested outside this sensor (the CLI, a backfill) need no run.
        done = context.instance.get_materialized_partitions(features_key(convention))
        requests = [
            dg.RunRequest(run_key=key, partition_key=key) for key in keys[seen:] if key not in done
        ]
        return dg.SensorResult(run_requests=requests, cursor=str(len(keys)))

    return [plan_job, ingest_job], [new_batches]
