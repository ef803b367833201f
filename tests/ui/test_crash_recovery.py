"""The orchestrator dies during an ingest of many batches and is restarted; nobody acts.

`dagster dev` runs a sensor-started ingest of 8 batches (2 per run) on the shipped instance
profiles: the embedded one (SQLite instance, files, SQLite records) and the production one
(PostgreSQL instance and records, artifacts and compute logs in SeaweedFS). Its whole
process group (webserver, daemon, code server, run workers, hooks) is SIGKILLed while hooks
work, then `dagster dev` starts again. Run monitoring must find the runs whose worker is
gone and fail them, run retries run them again, their steps take the dead
runs' batch leases over, and every batch end materialised with each of its checks passed
(no check left "planned"), each record in the archive exactly once, and no run left in
progress.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from sqlalchemy import func, select

from osa_dagster.definitions import build_definitions
from osa_dagster.defs.run_worker import WORKER_TAG
from osa_dagster.engine.process_identity import ProcessIdentity
from osa_dagster.records import Feature, RecordsDatabase
from osa_dagster.records.models import BatchLease
from tests.conftest import REPO, use_instance_profile
from tests.faults.conftest import ledger_counts, published
from tests.fixtures.fault_convention import record_ids
from tests.fixtures.services import unavailable
from tests.ui.conftest import DagsterSite, dagster_server, dagster_server_process, make_site

CONVENTION = "faults_ledger"
RECORDS, BATCH_SIZE, PARTITIONS_PER_RUN = 24, 3, 2
# A run is in progress in any of these; none may be left in one.
IN_PROGRESS = {
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
}
# Generous: on a loaded machine a restart takes a minute and monitoring polls every 20 s.
RECOVERY_TIMEOUT_S = 600.0


def _wait_for(what: str, predicate: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout_s:g} s: {what}")
        time.sleep(1.0)


def _site(
    storage: str, tmp_path: Path, request: pytest.FixtureRequest, mp: pytest.MonkeyPatch
) -> tuple[DagsterSite, str]:
    """A Dagster site on the shipped profile for `storage`, and its records database URL.
    The test process's environment is the site's, so that it reads the same instance."""
    mp.setenv("OSA_CONVENTIONS", "tests.fixtures.fault_convention")
    mp.setenv("OSA_FAULTS_LEDGER", str(tmp_path / "ledger.txt"))
    # The hooks count their records in the ledger, a file no sandboxed hook could write.
    mp.setenv("OSA_HOOK_SANDBOX", "off")
    mp.setenv("OSA_FAULTS_RECORDS", str(RECORDS))
    mp.setenv("OSA_FAULTS_SLEEP_S", "1.0")
    mp.setenv("OSA_PARTITIONS_PER_RUN", str(PARTITIONS_PER_RUN))
    if storage == "sqlite":
        profile = REPO / "dagster.yaml"
        mp.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
        records_url = f"sqlite:///{tmp_path / 'data' / 'records.db'}"
    else:
        from tests.storage.servers import SeaweedFS, SeaweedFSUnavailable

        postgres = request.getfixturevalue("postgres")
        profile = REPO / "deploy/production/dagster.yaml"
        use_instance_profile(profile, postgres, tmp_path, mp)
        try:
            s3 = SeaweedFS.start(tmp_path / "seaweedfs")
        except SeaweedFSUnavailable as error:
            unavailable(f"SeaweedFS unavailable: {error}")
        request.addfinalizer(s3.kill)
        endpoint = s3.endpoint
        records_url = postgres.url
        for name, value in {
            "OSA_STORAGE": f"s3://{endpoint.bucket}/crash-{uuid.uuid4().hex}",
            "OSA_S3_ENDPOINT_URL": endpoint.url,
            "AWS_ACCESS_KEY_ID": endpoint.access_key,
            "AWS_SECRET_ACCESS_KEY": endpoint.secret_key,
            "OSA_DATABASE_URL": postgres.url,
            "OSA_COMPUTE_LOG_BUCKET": endpoint.bucket,
            "OSA_COMPUTE_LOG_PREFIX": f"logs/{uuid.uuid4().hex}",
        }.items():
            mp.setenv(name, value)
    home = Path(os.environ["DAGSTER_HOME"])
    home.mkdir(exist_ok=True)
    site = make_site(tmp_path / "site")
    # make_site's own home and instance are replaced by the profile's.
    site.env.update({k: v for k, v in os.environ.items() if k.startswith(("OSA_", "AWS_"))})
    site.env["DAGSTER_HOME"] = str(home)
    site.env["OSA_DATA_DIR"] = str(tmp_path / "data")
    mp.setenv("OSA_DATA_DIR", str(tmp_path / "data"))
    shutil.copy(profile, home / "dagster.yaml")
    return DagsterSite(home=home, data=tmp_path / "data", logs=site.logs, env=site.env), records_url


def _runs(instance: dg.DagsterInstance) -> list[dg.DagsterRun]:
    return list(instance.get_runs(dg.RunsFilter(job_name=f"{CONVENTION}_ingest")))


def _all_executing(instance: dg.DagsterInstance) -> bool:
    """Every run the sensor requests has started and its worker recorded itself."""
    runs = _runs(instance)
    return len(runs) == len(range(0, RECORDS // BATCH_SIZE, PARTITIONS_PER_RUN)) and all(
        WORKER_TAG in run.tags for run in runs
    )


def _all_done(instance: dg.DagsterInstance, partitions: list[str]) -> bool:
    materialized = instance.get_materialized_partitions(dg.AssetKey([CONVENTION, "features"]))
    runs = _runs(instance)
    return materialized == set(partitions) and not any(r.status in IN_PROGRESS for r in runs)


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["sqlite", "postgresql"])
def test_after_the_orchestrator_is_killed_and_restarted_every_batch_ends_materialized(
    storage: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
):
    site, records_url = _site(storage, tmp_path, request, monkeypatch)
    ledger = tmp_path / "ledger.txt"
    planned = site.osa("plan", CONVENTION, "--batch-size", str(BATCH_SIZE))
    partitions = [line.split()[0] for line in planned.stdout.splitlines() if line.strip()]
    assert len(partitions) == RECORDS // BATCH_SIZE, planned.stdout

    dagster_dev = [sys.executable, "-m", "dagster", "dev"]
    with dg.DagsterInstance.from_config(str(site.home)) as instance:
        with dagster_server_process(site, dagster_dev, "dagster-dev-1") as (_, first):
            # The sensor requests the runs; kill once every run's worker executes it and
            # hooks are at work.
            _wait_for(
                "every run executing, hooks at work",
                lambda: _all_executing(instance) and len(ledger_counts(ledger)) >= 2,
                timeout_s=600,
            )
            started = [r for r in _runs(instance) if r.status == dg.DagsterRunStatus.STARTED]
            workers = [
                ProcessIdentity.model_validate_json(r.tags[WORKER_TAG])
                for r in started
                if WORKER_TAG in r.tags
            ]
            os.killpg(first.pid, signal.SIGKILL)  # its group: every process it started
        assert started and workers, "no run was at work when the orchestrator was killed"
        _wait_for(
            "the killed run workers to be gone",
            lambda: not any(w.alive() for w in workers),
            timeout_s=60,
        )
        done_when_killed = len(ledger_counts(ledger))
        assert done_when_killed < RECORDS, "the ingest ended before the kill"
        assert {r.run_id for r in started} <= {
            r.run_id for r in _runs(instance) if r.status == dg.DagsterRunStatus.STARTED
        }  # nobody has touched them yet

        with dagster_server(site, dagster_dev, "dagster-dev-2"):
            _wait_for(
                "every batch materialised and no run in progress",
                lambda: _all_done(instance, partitions),
                timeout_s=RECOVERY_TIMEOUT_S,
            )

        runs = {run.run_id: run for run in _runs(instance)}
        for run in started:
            failed = runs[run.run_id]
            assert failed.status == dg.DagsterRunStatus.FAILURE
            failure = instance.get_records_for_run(
                run.run_id, of_type=dg.DagsterEventType.RUN_FAILURE
            ).records
            assert any("is gone" in (r.event_log_entry.message or "") for r in failure)
        # Hooks were at work when killed, so some run had work left and was retried (a run
        # killed after its last check, before it could say so, has nothing to retry).
        killed = {run.run_id for run in started}
        assert any(run.parent_run_id in killed for run in runs.values()), "none retried"

        check_keys = [
            key
            for key in build_definitions().resolve_asset_graph().asset_check_keys
            if key.asset_key.path[0] == CONVENTION
        ]
        infos = instance.event_log_storage.get_asset_check_partition_info(check_keys)
        # Each partition's own verdict (a run over a range may also record one for the range).
        verdicts = {
            (i.check_key.name, i.partition_key): i.latest_execution_status
            for i in infos
            if i.partition_key is not None
        }
        assert len(check_keys) >= 4
        assert verdicts == {
            (key.name, partition): AssetCheckExecutionRecordStatus.SUCCEEDED
            for key in check_keys
            for partition in partitions
        }

    ids = record_ids(RECORDS)
    assert published(CONVENTION, records_url) == dict.fromkeys(ids, 1)
    db = RecordsDatabase(records_url)
    try:
        with db.session() as session:
            assert session.scalar(select(func.count()).select_from(Feature)) == RECORDS
            assert session.scalar(select(func.count()).select_from(BatchLease)) == 0
    finally:
        db.engine.dispose()
