"""Ctrl-C during `osa materialize`: the runs under way stop, and the same command resumes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from tests.engine.helpers import eventually
from tests.fixtures.fault_convention import record_ids

from .conftest import REPO, feature_rows, ledger_counts, plan, published

RECORDS = 30
BATCHES = 3
COMMAND = [sys.executable, "-m", "osa_dagster.cli", "materialize", "faults_ledger"]


@pytest.fixture
def shipped_instance(fault_env: Path) -> Iterator[dg.DagsterInstance]:
    """The instance of the repository's dagster.yaml, as `osa materialize` finds it on a
    fresh machine: its compute logs are the project's."""
    shutil.copy(REPO / "dagster.yaml", fault_env)
    with dg.DagsterInstance.get() as instance:
        yield instance


@pytest.mark.slow
@pytest.mark.parametrize("runs_at_once", [1, 2])
def test_ctrl_c_stops_the_runs_and_the_same_command_resumes_them(
    shipped_instance: dg.DagsterInstance,
    ledger: Path,
    monkeypatch: pytest.MonkeyPatch,
    runs_at_once: int,
):
    instance = shipped_instance
    monkeypatch.setenv("OSA_FAULTS_RECORDS", str(RECORDS))
    monkeypatch.setenv("OSA_FAULTS_SLEEP_S", "0.5")
    monkeypatch.setenv("OSA_RUNS_AT_ONCE", str(runs_at_once))
    monkeypatch.setenv("OSA_PARTITIONS_PER_RUN", "1")  # a run per batch, more than run at once
    assert len(plan(instance, "faults_ledger", batch_size=RECORDS // BATCHES)) == BATCHES

    # In a session of its own, as a terminal's foreground job: Ctrl-C sends SIGINT to every
    # process of the group (the run workers with it).
    run = subprocess.Popen(
        COMMAND,
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert eventually(lambda: len(ledger_counts(ledger)) >= 3, timeout_s=120)
        os.killpg(run.pid, signal.SIGINT)
        out, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()

    assert run.returncode == 128 + signal.SIGINT, (out, err)
    assert err.splitlines()[-1].startswith("osa materialize: interrupted: "), err
    # Nothing died of the Ctrl-C but the runs: Dagster's helpers that copy a step's output
    # to the console did, printing their tracebacks (defs/instance_storage.py).
    assert "Traceback" not in err, err
    assert ": interrupted (" in out and ": ok (" not in out, out
    # The hook step stopped for good: Dagster retries an interrupted step that has a retry
    # policy, which would have run the batch to its end.
    runs = instance.get_runs(filters=dg.RunsFilter(job_name="faults_ledger_ingest"))
    assert all(r.status == dg.DagsterRunStatus.FAILURE for r in runs)
    # No run started after the interrupt: the last batch's waited for a worker.
    assert 1 <= len(runs) <= runs_at_once
    retried = {dg.DagsterEventType.STEP_UP_FOR_RETRY, dg.DagsterEventType.STEP_RESTARTED}
    assert not [
        e for r in runs for e in instance.all_logs(r.run_id) if e.dagster_event_type in retried
    ]
    done_before = ledger_counts(ledger)
    assert 3 <= len(done_before) < RECORDS

    again = subprocess.run(COMMAND, cwd=REPO, capture_output=True, text=True, timeout=600)

    assert again.returncode == 0, again
    ids = record_ids(RECORDS)
    assert ledger_counts(ledger) == dict.fromkeys(ids, 1)  # what was done is not done again
    assert published("faults_ledger") == dict.fromkeys(ids, 1)
    assert feature_rows() == RECORDS
