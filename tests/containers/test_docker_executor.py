"""One partition through dagster_docker's executor: every step in a container of the step
image, every hook in a sibling hook container, the run launched from the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import docker
import pytest
from sqlalchemy import func, select

from osa_dagster.records import Record, RecordsDatabase, database_url
from osa_dagster.settings import Settings
from tests.conftest import use_instance_profile

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_a_partition_materialises_with_every_step_in_a_container(tmp_path, step_image):
    home, data = tmp_path / "home", Path(os.environ["OSA_DATA_DIR"])
    home.mkdir()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "OSA_DATA_DIR": str(data),
        "OSA_EXECUTOR": "docker",
        "OSA_HOOK_RUNNER": "docker",
    }
    cli = Path(sys.executable).parent
    subprocess.run([cli / "osa", "plan", "pdb", "--limit", "6"], env=env, check=True, cwd=tmp_path)
    instance = dg.DagsterInstance.from_config(str(home))
    (key,) = instance.get_dynamic_partitions("pdb_batches")
    execute = [cli / "dagster", "job", "execute", "-m", "osa_dagster.definitions"]
    subprocess.run(
        [*execute, "-j", "pdb_ingest", "--tags", json.dumps({"dagster/partition": key})],
        env=env,
        check=True,
        cwd=tmp_path,
    )
    (run,) = instance.get_run_records(dg.RunsFilter(job_name="pdb_ingest"))
    assert run.dagster_run.status == dg.DagsterRunStatus.SUCCESS
    launched = [
        e
        for e in instance.all_logs(run.dagster_run.run_id)
        if e.dagster_event is not None
        and e.dagster_event.event_type == dg.DagsterEventType.STEP_WORKER_STARTING
    ]
    # One container per step: raw_batch, the hooks, published_records and features (each
    # with its checks).
    assert len(launched) == 4
    assert all("Docker container" in (e.message or e.user_message) for e in launched)
    db = RecordsDatabase(database_url(Settings.from_env()))
    with db.session() as session:
        assert session.scalar(select(func.count()).select_from(Record)) >= 4


def test_the_docker_profile_loads_with_the_docker_run_launcher(
    tmp_path, monkeypatch, postgres, step_image
):
    from dagster_docker import DockerRunLauncher

    use_instance_profile(REPO / "deploy/docker/dagster.yaml", postgres, tmp_path, monkeypatch)
    monkeypatch.setenv("OSA_STEP_IMAGE", step_image)
    with dg.DagsterInstance.get() as instance:
        launcher = instance.run_launcher
        assert isinstance(launcher, DockerRunLauncher)
        assert launcher.image == step_image
        assert launcher.networks == ["host"]
        assert "DOCKER_HOST" in launcher.env_vars
        # A run whose container died is found and retried.
        assert instance.run_monitoring_enabled and launcher.supports_check_run_worker_health
        assert instance.run_retries_enabled and instance.run_retries_max_retries == 2


def test_the_docker_launcher_tells_run_monitoring_a_dead_runs_container_is_gone(
    tmp_path, monkeypatch, postgres, step_image, docker_client: docker.DockerClient
):
    """The check run monitoring makes of each STARTED run under the Docker profile: the
    launcher looks up the run's container on the engine."""
    from dagster._core.launcher import WorkerStatus
    from dagster_docker.docker_run_launcher import DOCKER_CONTAINER_ID_TAG

    use_instance_profile(REPO / "deploy/docker/dagster.yaml", postgres, tmp_path, monkeypatch)
    monkeypatch.setenv("OSA_STEP_IMAGE", step_image)
    container = docker_client.containers.run(
        step_image, ["sleep", "600"], detach=True, network_mode="host"
    )
    try:
        with dg.DagsterInstance.get() as instance:
            run = instance.create_run_for_job(
                dg.GraphDefinition("noop").to_job(),
                tags={DOCKER_CONTAINER_ID_TAG: container.id},
            )
            launcher = instance.run_launcher
            assert launcher.check_run_worker_health(run).status is WorkerStatus.RUNNING
            container.kill()
            container.wait()
            assert launcher.check_run_worker_health(run).status is WorkerStatus.FAILED
    finally:
        container.remove(force=True)
