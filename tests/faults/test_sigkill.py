"""The whole run process is SIGKILLed mid-batch, then the partition is run again."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.engine.helpers import alive, eventually
from tests.fixtures.fault_convention import record_ids

from .conftest import REPO, check_results, feature_rows, ingest, ledger_counts, plan, published


def descendants(pid: int) -> set[int]:
    """Every living process below `pid` (children of each of its threads, recursively)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except FileNotFoundError:
            continue
        for child in map(int, children):
            found |= {child, *descendants(child)}
    return found


def is_hook(pid: int) -> bool:
    try:
        return b"osa_sdk\x00hook" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False


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
        hook_processes = {pid for pid in descendants(run.pid) if is_hook(pid)}
    finally:
        run.send_signal(signal.SIGKILL)
        run.wait()
    assert run.returncode == -signal.SIGKILL

    # The hook dies with its orchestrator (PR_SET_PDEATHSIG): once it is gone, nothing adds
    # to the ledger, which holds some of the batch but not all of it.
    assert hook_processes
    assert eventually(lambda: not any(alive(pid) for pid in hook_processes), timeout_s=30)
    done_before = ledger_counts(ledger)
    assert 3 <= len(done_before) < 10
    assert published("faults_ledger") == {}  # killed in the hook step, before publishing

    result = ingest(instance, "faults_ledger", key)

    assert result.success
    assert ledger_counts(ledger) == dict.fromkeys(ids, 1)  # none processed twice
    assert published("faults_ledger") == dict.fromkeys(ids, 1)  # none lost, none twice
    assert feature_rows() == 10
    assert all(check_results(result).values()), check_results(result)
