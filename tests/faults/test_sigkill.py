"""The whole run process is SIGKILLed mid-batch, then the partition is run again."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.engine.helpers import eventually
from tests.fixtures.fault_convention import record_ids

from .conftest import REPO, check_results, feature_rows, ingest, ledger_counts, plan, published


@pytest.mark.slow
def test_sigkill_of_the_run_process_loses_nothing_and_repeats_nothing(
    instance, ledger: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("OSA_FAULTS_RECORDS", "10")
    monkeypatch.setenv("OSA_FAULTS_SLEEP_S", "0.25")
    [key] = plan(instance, "faults_ledger")
    ids = record_ids(10)

    run = subprocess.Popen(
        [sys.executable, "-m", "tests.faults.materialize", "faults_ledger", key], cwd=REPO
    )
    try:
        assert eventually(lambda: len(ledger_counts(ledger)) >= 3, timeout_s=60)
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait()
    assert run.returncode == -signal.SIGKILL

    # The hook dies with its orchestrator (PR_SET_PDEATHSIG): the ledger stops growing.
    time.sleep(1.0)
    done_before = ledger_counts(ledger)
    time.sleep(0.6)
    assert ledger_counts(ledger) == done_before
    assert 3 <= len(done_before) < 10
    assert published("faults_ledger") == {}  # killed in the hook step, before publishing

    result = ingest(instance, "faults_ledger", key)

    assert result.success
    assert ledger_counts(ledger) == dict.fromkeys(ids, 1)  # none processed twice
    assert published("faults_ledger") == dict.fromkeys(ids, 1)  # none lost, none twice
    assert feature_rows() == 10
    assert all(check_results(result).values()), check_results(result)
