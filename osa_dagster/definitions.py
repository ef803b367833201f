"""The Definitions object that workspace.yaml loads: one Definitions per convention (its
graph, checks, jobs, sensors and schedules), merged, with the shared resources and executor."""

from __future__ import annotations

import dagster as dg

from osa_dagster.conventions.base import Convention
from osa_dagster.conventions.registry import load_conventions
from osa_dagster.defs.assets import batch_partitions, convention_assets
from osa_dagster.defs.automation import convention_automation
from osa_dagster.defs.batch_sensors import batch_sensors
from osa_dagster.defs.beta_features import known_beta_features_quiet
from osa_dagster.defs.deposits import convention_deposits
from osa_dagster.defs.executors import ingest_executor
from osa_dagster.defs.io_manager import IO_MANAGER_KEY, BatchViewsIOManager
from osa_dagster.defs.jobs import ingest_job, plan_job
from osa_dagster.defs.resources import AssetKinds, Resources, asset_kinds
from osa_dagster.settings import Settings


def convention_definitions(
    convention: Convention, kinds: AssetKinds, settings: Settings
) -> dg.Definitions:
    """Everything one convention brings: its batch graph with its checks, planning and ingest
    jobs, sensors and schedules, and the validation of deposited records."""
    partitions = batch_partitions(convention)
    ingest = ingest_job(convention, settings)
    return dg.Definitions.merge(
        convention_assets(convention, partitions, kinds),
        dg.Definitions(jobs=[plan_job(convention), ingest]),
        batch_sensors(convention, partitions, ingest),
        convention_automation(convention, partitions, settings),
        convention_deposits(convention),
    )


def build_definitions() -> dg.Definitions:
    settings = Settings.from_env()
    resources = Resources.of(settings)
    views = BatchViewsIOManager(
        artifact_store=resources.artifact_store, records_db=resources.records_db
    )
    kinds = asset_kinds(settings)
    with known_beta_features_quiet():
        return dg.Definitions.merge(
            *(
                convention_definitions(c, kinds, settings)
                for c in load_conventions(settings).values()
            ),
            dg.Definitions(
                resources={**resources.by_key(), IO_MANAGER_KEY: views},
                # Also for the implicit asset job that asset backfills and UI materialisations
                # run: otherwise Dagster's default gives every step its own process.
                executor=ingest_executor(settings),
            ),
        )


defs = build_definitions()
