"""Ingests that start themselves: a weekly incremental plan per convention, and a watch of
the upstream that plans each change as it appears.

Both only plan (add partitions); the `<convention>_new_batches` sensor (defs/batch_sensors.py)
then requests the ingest runs of every new partition, so no partition gets two.
"""

from datetime import UTC, datetime, timedelta

import dagster as dg

from osa_dagster.batch.plan import WatchCursor, watch_upstream
from osa_dagster.conventions.base import Convention
from osa_dagster.defs.jobs import plan_job_name
from osa_dagster.defs.resources import ArtifactStoreResource, RecordsDatabaseResource
from osa_dagster.settings import Settings

DEFAULT_PLAN_CRON = "0 3 * * 1"  # Mondays at 03:00 UTC: PDB releases on Wednesdays


def plan_cron(convention: Convention, settings: Settings) -> str:
    """OSA_PLAN_CRON_<CONVENTION> (e.g. OSA_PLAN_CRON_PDB="0 3 * * 3"), else weekly."""
    return settings.plan_cron.get(convention.name, DEFAULT_PLAN_CRON)


def last_successful_plan_start(instance: dg.DagsterInstance, job_name: str) -> datetime | None:
    """When the newest successful plan run of `job_name` started: what it saw is planned."""
    records = instance.get_run_records(
        dg.RunsFilter(job_name=job_name, statuses=[dg.DagsterRunStatus.SUCCESS]),
        limit=1,
        order_by="create_timestamp",
        ascending=False,
    )
    if not records or records[0].start_time is None:
        return None
    return datetime.fromtimestamp(records[0].start_time, UTC)


def convention_automation(
    convention: Convention, partitions: dg.DynamicPartitionsDefinition, settings: Settings
) -> dg.Definitions:
    plan_job = plan_job_name(convention)

    @dg.schedule(
        name=f"{convention.name}_weekly_plan",
        cron_schedule=plan_cron(convention, settings),
        job_name=plan_job,
        execution_timezone="UTC",
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=(
            f"Plans the {convention.name} records changed since the last successful plan "
            "(everything the first time); the new batches are then ingested."
        ),
    )
    def weekly_plan(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
        since = last_successful_plan_start(context.instance, plan_job)
        config = {"since": since.isoformat()} if since else {}
        return dg.RunRequest(
            run_config={"ops": {f"{convention.name}_plan_batches": {"config": config}}},
            tags={"osa/plan-since": since.isoformat() if since else "everything"},
        )

    @dg.sensor(
        name=f"{convention.name}_upstream_changes",
        minimum_interval_seconds=settings.watch_interval_s,
        default_status=dg.DefaultSensorStatus.STOPPED,
        description=(
            f"Watches the {convention.name} upstream and plans every new or changed record "
            "once (OSA_WATCH_OVERLAP_H: how late a change may become visible upstream)."
        ),
    )
    def upstream_changes(
        context: dg.SensorEvaluationContext,
        artifact_store: ArtifactStoreResource,
        records_db: RecordsDatabaseResource,
    ) -> dg.SensorResult:
        cursor = WatchCursor.model_validate_json(context.cursor) if context.cursor else None
        overlap = timedelta(hours=settings.watch_overlap_h)
        # The partitions of this look's batches, and those of manifests the plan index had
        # not read (a plan stopped midway): Dagster adds them once the tick returns.
        to_register: list[str] = []
        result, cursor = watch_upstream(
            convention,
            artifact_store.get(),
            cursor,
            now=datetime.now(UTC),
            overlap=overlap,
            register=to_register.extend,
            db=records_db.get(),
        )
        if not result.new_partitions and not result.manifests_indexed:
            return dg.SensorResult(
                skip_reason=f"nothing new upstream since {cursor.looked_at:%Y-%m-%d %H:%M} UTC",
                cursor=cursor.model_dump_json(),
            )
        return dg.SensorResult(
            dynamic_partitions_requests=[partitions.build_add_request(to_register)],
            cursor=cursor.model_dump_json(),
        )

    return dg.Definitions(schedules=[weekly_plan], sensors=[upstream_changes])
