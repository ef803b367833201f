"""The toy conventions' whole asset graph with every artifact in a real S3 server."""

from __future__ import annotations

import uuid
from pathlib import Path

import dagster as dg
import pytest
from sqlalchemy import func, select

from osa_dagster.definitions import build_definitions
from osa_dagster.records import Feature, Record, RecordsDatabase, database_url
from osa_dagster.settings import Settings
from osa_dagster.storage import artifact_store
from osa_dagster.storage.s3 import S3Store

from .servers import S3Endpoint


@pytest.fixture
def on_seaweedfs(seaweedfs: S3Endpoint, monkeypatch: pytest.MonkeyPatch, toy_conventions) -> str:
    prefix = f"graph/{uuid.uuid4().hex}"
    monkeypatch.setenv("OSA_STORAGE", f"s3://{seaweedfs.bucket}/{prefix}")
    monkeypatch.setenv("OSA_S3_ENDPOINT_URL", seaweedfs.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweedfs.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweedfs.secret_key)
    return prefix


def _run_all(convention: str, tmp_path: Path, **plan_config) -> list[dg.ExecuteInProcessResult]:
    defs = build_definitions()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        planned = defs.resolve_job_def(f"{convention}_plan").execute_in_process(
            run_config={"ops": {f"{convention}_plan_batches": {"config": plan_config}}},
            instance=instance,
        )
        assert planned.success
        job = defs.resolve_job_def(f"{convention}_ingest")
        return [
            job.execute_in_process(partition_key=key, instance=instance)
            for key in instance.get_dynamic_partitions(f"{convention}_batches")
        ]


def test_graph_runs_with_every_artifact_in_s3(on_seaweedfs, tmp_path, isolated_data_dir):
    (tmp_path / "dagster").mkdir()
    results = _run_all("toy", tmp_path, limit=10, batch_size=5)
    assert all(r.success for r in results)
    with RecordsDatabase(database_url(Settings.from_env())).session() as session:
        assert session.scalar(select(func.count()).select_from(Record)) == 8
        assert session.scalar(select(func.count()).select_from(Feature)) == 8

    store = artifact_store(Settings.from_env())
    assert isinstance(store, S3Store)
    assert len(list(store.list_keys("manifests/toy"))) == 2
    keys = list(store.list_keys("batches/toy"))
    # One checkpoint per batch, under the hook's current version.
    assert sum("/hooks/check_size/v/" in k and k.endswith("/checkpoint.json") for k in keys) == 2
    assert sum(k.endswith("/data.txt") for k in keys) == 10
    # Nothing fell back to local files: the data folder holds the records database only.
    assert not (isolated_data_dir / "artifacts").exists()


def test_an_oom_climb_resumes_from_a_checkpoint_in_s3(on_seaweedfs, tmp_path):
    (tmp_path / "dagster").mkdir()
    [result] = _run_all("toy_oom", tmp_path)
    assert result.success
    limits = [
        (o.metadata["memory_limit_mb"].value, o.metadata["records_in"].value)
        for e in result.all_events
        if e.event_type == dg.DagsterEventType.ASSET_OBSERVATION
        and (o := e.asset_observation_data.asset_observation)
    ]
    # The second attempt, one rung up, ran only what the checkpoint in S3 did not hold.
    assert [mb for mb, _ in limits] == [128, 256] and limits[1][1] < limits[0][1]
    with RecordsDatabase(database_url(Settings.from_env())).session() as session:
        assert session.scalar(select(func.count()).select_from(Record)) == 6


@pytest.mark.slow
def test_every_partition_of_the_pdb_mirror_on_s3(seaweedfs: S3Endpoint, monkeypatch, tmp_path):
    from osa_dagster.conventions.pdb.ingester import mirror_entries
    from tests.test_pdb_end_to_end import MIRROR, expected_publishable

    monkeypatch.setenv("OSA_STORAGE", f"s3://{seaweedfs.bucket}/pdb-{uuid.uuid4().hex}")
    monkeypatch.setenv("OSA_S3_ENDPOINT_URL", seaweedfs.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweedfs.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweedfs.secret_key)
    (tmp_path / "dagster").mkdir()
    results = _run_all("pdb", tmp_path, batch_size=10)
    entries = mirror_entries(MIRROR)
    assert len(results) == -(-len(entries) // 10)
    assert all(r.success for r in results)
    expected = {pdb_id for pdb_id, path in entries if expected_publishable(path)}
    with RecordsDatabase(database_url(Settings.from_env())).session() as session:
        published = set(session.scalars(select(Record.source_id)))
    assert published == expected
