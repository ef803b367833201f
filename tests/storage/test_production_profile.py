"""The production instance profile, loaded as shipped, against real PostgreSQL and S3."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
from sqlalchemy import select

from osa_dagster.conventions.pdb.ingester import mirror_entries
from osa_dagster.definitions import build_definitions
from osa_dagster.local_postgres import PgCluster
from osa_dagster.records import Record, RecordsDatabase, database_url
from osa_dagster.settings import Settings
from tests.conftest import use_instance_profile
from tests.test_pdb_end_to_end import MIRROR, expected_publishable

from .servers import S3Endpoint

REPO = Path(__file__).resolve().parents[2]
PROFILE = REPO / "deploy/production/dagster.yaml"


@pytest.fixture
def production(
    seaweedfs: S3Endpoint, postgres: PgCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The production profile in DAGSTER_HOME, on a throwaway PostgreSQL and SeaweedFS."""
    use_instance_profile(PROFILE, postgres, tmp_path, monkeypatch)
    monkeypatch.delenv("OSA_COMPUTE_LOG_PREFIX", raising=False)
    for name, value in {
        "OSA_COMPUTE_LOG_BUCKET": seaweedfs.bucket,
        "OSA_S3_ENDPOINT_URL": seaweedfs.url,
        "AWS_ACCESS_KEY_ID": seaweedfs.access_key,
        "AWS_SECRET_ACCESS_KEY": seaweedfs.secret_key,
        "OSA_DATABASE_URL": postgres.url,
    }.items():
        monkeypatch.setenv(name, value)


def test_the_production_profile_runs_an_ingest_on_postgres(
    production, toy_conventions, seaweedfs: S3Endpoint, monkeypatch: pytest.MonkeyPatch
):
    # The compute logs' own credentials are used, not the AWS_* ones (made wrong here), and
    # their prefix has a default.
    monkeypatch.setenv("OSA_COMPUTE_LOG_ACCESS_KEY_ID", seaweedfs.access_key)
    monkeypatch.setenv("OSA_COMPUTE_LOG_SECRET_ACCESS_KEY", seaweedfs.secret_key)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-a-key")
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
    logs = seaweedfs.store("compute-logs")
    assert any(ingest.run_id in log_key for log_key in logs.list_keys("storage"))


@pytest.mark.slow
def test_the_bundled_mirror_ingests_with_instance_and_records_on_postgres(production):
    with dg.DagsterInstance.get() as instance:
        defs = build_definitions()
        plan = defs.resolve_job_def("pdb_plan").execute_in_process(
            run_config={"ops": {"pdb_plan_batches": {"config": {"batch_size": 10}}}},
            instance=instance,
        )
        assert plan.success
        keys = instance.get_dynamic_partitions("pdb_batches")
        ingest = defs.resolve_job_def("pdb_ingest").execute_in_process(
            instance=instance,
            tags={
                "dagster/asset_partition_range_start": keys[0],
                "dagster/asset_partition_range_end": keys[-1],
            },
        )
        assert ingest.success
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        stored = instance.get_materialized_partitions(dg.AssetKey(["pdb", "features"]))
        assert stored == set(keys)
    db = RecordsDatabase(database_url(Settings.from_env()))
    assert db.engine.dialect.name == "postgresql"
    expected = {pdb_id for pdb_id, path in mirror_entries(MIRROR) if expected_publishable(path)}
    with db.session() as session:
        assert set(session.scalars(select(Record.source_id))) == expected
