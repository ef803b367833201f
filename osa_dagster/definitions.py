"""The Definitions object that workspace.yaml loads: one Definitions per convention (its
graph, checks, jobs, sensors and schedules), merged, with the shared resources and executor."""

from __future__ import annotations

import dagster as dg

from osa_dagster.conventions.base import Convention
from osa_dagster.conventions.registry import load_conventions
from osa_dagster.defs.assets import batch_partitions, convention_assets
from osa_dagster.defs.automation import convention_automation
from osa_dagster.defs.beta_features import known_beta_features_quiet
from osa_dagster.defs.checks import convention_checks
from osa_dagster.defs.deposits import convention_deposits
from osa_dagster.defs.planning import convention_jobs, ingest_executor
from osa_dagster.defs.resources import default_resources


def convention_definitions(convention: Convention) -> dg.Definitions:
    """Everything one convention brings: its batch graph and checks, planning and ingest
    jobs, sensors and schedules, and the validation of deposited records."""
    partitions = batch_partitions(convention)
    return dg.Definitions.merge(
        convention_assets(convention, partitions),
        convention_checks(convention, partitions),
        convention_jobs(convention, partitions),
        convention_automation(convention, partitions),
        convention_deposits(convention),
    )


def build_definitions() -> dg.Definitions:
    with known_beta_features_quiet():
        return dg.Definitions.merge(
            *(convention_definitions(c) for c in load_conventions().values()),
            dg.Definitions(
                resources=default_resources(),
                # Also for the implicit asset job that asset backfills and UI materialisations
                # run: otherwise Dagster's default gives every step its own process.
                executor=ingest_executor(),
            ),
        )


defs = build_definitions()
