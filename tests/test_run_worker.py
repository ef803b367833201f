"""The run launcher's worker check, as Dagster's run monitoring uses it: a STARTED run whose
recorded worker process is gone is failed; a live one, or one that cannot be checked from
here, is left alone."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.launcher.base import WorkerStatus
from dagster._daemon.monitoring.run_monitoring import monitor_started_run

from osa_dagster.defs.run_worker import WORKER_TAG, WorkerCheckingRunLauncher, worker_health
from osa_dagster.engine.process_identity import ProcessIdentity

REPO = Path(__file__).resolve().parents[1]
IDENTIFY = (
    "import sys\n"
    "from osa_dagster.engine.process_identity import ProcessIdentity\n"
    "print(ProcessIdentity.of_this_process().model_dump_json(), flush=True)\n"
    "sys.stdin.read()\n"
)


@pytest.fixture
def worker() -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A process standing for a run worker, and the tag it would record."""
    process = subprocess.Popen(
        [sys.executable, "-c", IDENTIFY],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    yield process, process.stdout.readline().strip()
    process.kill()
    process.wait()


@pytest.fixture
def instance(tmp_path: Path) -> Iterator[dg.DagsterInstance]:
    overrides = {
        "run_launcher": {
            "module": "osa_dagster.defs.run_worker",
            "class": "WorkerCheckingRunLauncher",
        },
        "run_monitoring": {"enabled": True, "poll_interval_seconds": 20},
    }
    with dg.instance_for_test(temp_dir=str(tmp_path), overrides=overrides) as instance:
        yield instance


def _started_run(
    instance: dg.DagsterInstance, tags: dict[str, str], **lineage: str
) -> dg.DagsterRun:
    run = instance.create_run_for_job(dg.GraphDefinition("noop").to_job(), tags=tags, **lineage)
    instance.handle_run_event(
        run.run_id,
        dg.DagsterEvent(
            event_type_value=dg.DagsterEventType.RUN_START.value, job_name=run.job_name
        ),
    )
    started = instance.get_run_by_id(run.run_id)
    assert started is not None and started.status == dg.DagsterRunStatus.STARTED
    return started


def test_a_started_run_whose_worker_died_is_failed_by_run_monitoring(
    instance: dg.DagsterInstance, worker: tuple[subprocess.Popen[str], str]
):
    assert isinstance(instance.run_launcher, WorkerCheckingRunLauncher)
    process, tag = worker
    run = _started_run(instance, {WORKER_TAG: tag})
    logger = logging.getLogger("test")

    monitor_started_run(instance, None, instance.get_run_record_by_id(run.run_id), logger)
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED

    process.kill()
    process.wait()
    monitor_started_run(instance, None, instance.get_run_record_by_id(run.run_id), logger)
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
    [failure] = instance.get_records_for_run(
        run.run_id, of_type=dg.DagsterEventType.RUN_FAILURE
    ).records
    assert f"its worker, pid {process.pid} on " in failure.event_log_entry.message
    assert "is gone" in failure.event_log_entry.message


def test_a_retry_is_not_judged_by_the_dead_worker_of_the_run_it_retries(
    instance: dg.DagsterInstance, worker: tuple[subprocess.Popen[str], str]
):
    """Dagster's run retries copy the failed run's tags, its dead worker's among them: until
    the retry's own worker records itself, run monitoring must not fail the retry."""
    process, tag = worker
    process.kill()
    process.wait()
    logger = logging.getLogger("test")
    failed = _started_run(instance, {WORKER_TAG: tag})
    monitor_started_run(instance, None, instance.get_run_record_by_id(failed.run_id), logger)
    assert instance.get_run_by_id(failed.run_id).status == dg.DagsterRunStatus.FAILURE

    retry = _started_run(
        instance, {WORKER_TAG: tag}, parent_run_id=failed.run_id, root_run_id=failed.run_id
    )
    monitor_started_run(instance, None, instance.get_run_record_by_id(retry.run_id), logger)
    assert instance.get_run_by_id(retry.run_id).status == dg.DagsterRunStatus.STARTED
    # Once the retry's worker recorded itself, it is judged by it: here one that died too.
    dead = ProcessIdentity.model_validate_json(tag).model_copy(
        update={"start_ticks": (ProcessIdentity.model_validate_json(tag).start_ticks or 0) + 1}
    )
    instance.add_run_tags(retry.run_id, {WORKER_TAG: dead.model_dump_json()})
    monitor_started_run(instance, None, instance.get_run_record_by_id(retry.run_id), logger)
    assert instance.get_run_by_id(retry.run_id).status == dg.DagsterRunStatus.FAILURE


def test_a_worker_that_cannot_be_checked_here_counts_as_running(
    worker: tuple[subprocess.Popen[str], str],
):
    _, tag = worker
    here = ProcessIdentity.model_validate_json(tag)
    elsewhere = here.model_copy(update={"host": "another-host"})
    in_a_container = here.model_copy(update={"pid_namespace": "pid:[1]"})
    for identity in (elsewhere, in_a_container):
        run = dg.DagsterRun(job_name="j", tags={WORKER_TAG: identity.model_dump_json()})
        assert worker_health(run).status is WorkerStatus.RUNNING
    # Not recorded yet (the run's executor has not started), or not readable.
    for tags in ({}, {WORKER_TAG: "{not json"}):
        assert worker_health(dg.DagsterRun(job_name="j", tags=tags)).status is WorkerStatus.RUNNING


def test_a_reused_pid_is_not_taken_for_the_worker(worker: tuple[subprocess.Popen[str], str]):
    _, tag = worker
    identity = ProcessIdentity.model_validate_json(tag)
    assert identity.alive() is True
    # The same pid, started at another tick: another process.
    reused = identity.model_copy(update={"start_ticks": (identity.start_ticks or 0) + 1})
    assert reused.alive() is False
    run = dg.DagsterRun(job_name="j", tags={WORKER_TAG: reused.model_dump_json()})
    assert worker_health(run).status is WorkerStatus.FAILED


def test_osa_materialize_names_its_process_as_the_runs_worker(
    toy_conventions, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    osa = [sys.executable, "-m", "osa_dagster.cli"]
    planned = subprocess.run([*osa, "plan", "toy", "--limit", "3"], cwd=home, env=env, check=False)
    assert planned.returncode == 0
    materialize = subprocess.Popen([*osa, "materialize", "toy"], cwd=home, env=env)
    assert materialize.wait(timeout=300) == 0
    monkeypatch.chdir(home)  # the embedded profile's paths are relative to it
    with dg.DagsterInstance.from_config(str(home)) as instance:
        [run] = instance.get_runs(dg.RunsFilter(job_name="toy_ingest"))
    worker = ProcessIdentity.model_validate_json(run.tags[WORKER_TAG])
    assert worker.pid == materialize.pid
    assert worker.checkable_here() and worker.alive() is False  # it has exited
