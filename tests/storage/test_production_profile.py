"""The production instance profile, loaded as shipped, against real PostgreSQL and S3."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import dagster as dg
import pytest

from osa_dagster.definitions import build_definitions
from tests.fixtures.pg_cluster import PgCluster

from .servers import S3Endpoint

REPO = Path(__file__).resolve().parents[2]
PROFILE = REPO / "deploy/production/dagster.yaml"


def test_the_production_profile_runs_an_ingest_on_postgres(
    seaweedfs: S3Endpoint,
    postgres: PgCluster,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    toy_conventions,
):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(PROFILE, home / "dagster.yaml")
    for name, value in {
        "DAGSTER_HOME": str(home),
        "OSA_DAGSTER_PG_HOST": "127.0.0.1",
        "OSA_DAGSTER_PG_PORT": str(postgres.port),
        "OSA_DAGSTER_PG_DB": "postgres",
        "OSA_DAGSTER_PG_USER": "postgres",
        "OSA_DAGSTER_PG_PASSWORD": "",
        "OSA_COMPUTE_LOG_BUCKET": seaweedfs.bucket,
        "OSA_COMPUTE_LOG_PREFIX": f"logs/{uuid.uuid4().hex}",
        "OSA_S3_ENDPOINT_URL": seaweedfs.url,
        "AWS_ACCESS_KEY_ID": seaweedfs.access_key,
        "AWS_SECRET_ACCESS_KEY": seaweedfs.secret_key,
        "OSA_DATABASE_URL": postgres.url,
    }.items():
        monkeypatch.setenv(name, value)

    with dg.DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert instance.run_retries_enabled
        defs = build_definitions()
        plan = defs.resolve_job_def("toy_plan").execute_in_process(
            run_config={"ops": {"toy_plan_batches": {"config": {"limit": 5}}}},
            instance=instance,
        )
        assert plan.success
        [key] = instance.get_dynamic_partitions("toy_batches")
        ingest = defs.resolve_job_def("toy_ingest").execute_in_process(
            partition_key=key, instance=instance
        )
        assert ingest.success
        assert instance.get_run_by_id(ingest.run_id).tags["osa/convention"] == "toy"
        stored = instance.get_materialized_partitions(dg.AssetKey(["toy", "features"]))
        assert stored == {key}
