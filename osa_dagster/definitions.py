"""The Definitions object that workspace.yaml loads: every convention's graph, jobs, sensors
and schedules."""

from __future__ import annotations

import dagster as dg

from osa_dagster.conventions.registry import load_conventions
from osa_dagster.defs.assets import batch_partitions, convention_assets
from osa_dagster.defs.automation import convention_automation
from osa_dagster.defs.checks import convention_checks
from osa_dagster.defs.deposits import convention_deposits
from osa_dagster.defs.planning import AnyJob, convention_jobs_and_sensors, ingest_executor
from osa_dagster.defs.resources import default_resources


def build_definitions() -> dg.Definitions:
    assets: list[dg.AssetsDefinition] = []
    checks: list[dg.AssetChecksDefinition] = []
    jobs: list[AnyJob] = []
    sensors: list[dg.SensorDefinition] = []
    schedules: list[dg.ScheduleDefinition] = []
    for convention in load_conventions().values():
        partitions = batch_partitions(convention)
        assets += convention_assets(convention, partitions)
        checks += convention_checks(convention, partitions)
        convention_jobs, convention_sensors = convention_jobs_and_sensors(convention, partitions)
        convention_schedules, watch_sensors = convention_automation(convention, partitions)
        deposit_asset, deposit_job, deposit_sensor = convention_deposits(convention)
        assets.append(deposit_asset)
        jobs += [*convention_jobs, deposit_job]
        sensors += [*convention_sensors, *watch_sensors, deposit_sensor]
        schedules += convention_schedules
    return dg.Definitions(
        assets=assets,
        asset_checks=checks,
        jobs=jobs,
        sensors=sensors,
        schedules=schedules,
        resources=default_resources(),
        # Also for the implicit asset job that asset backfills and UI materialisations
        # run: otherwise Dagster's default gives every step its own process.
        executor=ingest_executor(),
    )


defs = build_definitions()
