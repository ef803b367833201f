"""Two `osa materialize` of one convention at once, of the same batch or of overlapping
ranges, and one SIGKILLed: the batch lease makes the second wait for the first instead of
killing its hook, and the next run take a dead run's lease over at once."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from osa_dagster.batch.hooks import load_hook_checkpoints
from osa_dagster.batch.lease import BatchLeases
from osa_dagster.conventions.registry import load_conventions
from osa_dagster.records import RecordsDatabase, database_url
from osa_dagster.settings import Settings
from osa_dagster.storage import artifact_store
from tests.engine.helpers import eventually
from tests.fixtures.fault_convention import ENV_GATE, record_ids

from .conftest import REPO, feature_rows, ledger_counts, plan, published

CONVENTION = "faults_ledger"
HOOK_STEP = f"{CONVENTION}/hook_outcomes"
MATERIALIZE = [sys.executable, "-m", "osa_dagster.cli", "materialize", CONVENTION]


def _holder_step(key: str) -> str | None:
    db = RecordsDatabase(database_url(Settings.from_env()))
    try:
        holding = BatchLeases(db).current(CONVENTION, key)
        return holding.step if holding else None
    finally:
        db.engine.dispose()


def _attempts(key: str) -> list[tuple[int | None, bool]]:
    """(returncode, interrupted) of every attempt of the ledger hook on the batch."""
    convention = load_conventions(Settings.from_env())[CONVENTION]
    store = artifact_store(Settings.from_env())
    [checkpoint] = load_hook_checkpoints(convention, store, key).values()
    return [(a.returncode, a.interrupted) for a in checkpoint.attempts]


@pytest.mark.slow
def test_two_materializations_at_once_wait_for_each_other_and_kill_nothing(
    instance, ledger: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("OSA_FAULTS_RECORDS", "8")
    monkeypatch.setenv("OSA_FAULTS_SLEEP_S", "0.1")
    gate = tmp_path / "gate"
    monkeypatch.setenv(ENV_GATE, str(gate))
    [key] = plan(instance, CONVENTION)

    first_log = tmp_path / "first.log"
    with first_log.open("w") as log:
        first = subprocess.Popen(MATERIALIZE, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    # The first run's hook is at work on the batch (held at the gate) when the second starts.
    assert eventually(lambda: _holder_step(key) == HOOK_STEP, timeout_s=180)
    second = subprocess.Popen(
        MATERIALIZE, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert second.stdout is not None
    seen = []
    for line in second.stdout:
        seen.append(line)
        if "is being worked by run" in line:
            break
    else:
        pytest.fail("the second run did not wait for the first:\n" + "".join(seen))
    gate.touch()  # let the first run's hook go on

    rest, _ = second.communicate(timeout=300)
    assert first.wait(timeout=300) == 0, first_log.read_text()
    assert second.returncode == 0, "".join(seen) + rest
    print("second run:", "".join(seen) + rest)

    ids = record_ids(8)
    assert ledger_counts(ledger) == dict.fromkeys(ids, 1)  # no record ran twice
    assert _attempts(key) == [(0, False)]  # one attempt, never killed nor interrupted
    assert published(CONVENTION) == dict.fromkeys(ids, 1)
    assert feature_rows() == 8
    assert _holder_step(key) is None  # both runs released it


def _output_until(process: subprocess.Popen[str], text: str) -> list[str]:
    """The lines `process` printed, up to the first that holds `text`."""
    assert process.stdout is not None
    seen = []
    for line in process.stdout:
        seen.append(line)
        if text in line:
            return seen
    pytest.fail(f"never printed {text!r}:\n" + "".join(seen))


@pytest.mark.slow
def test_two_runs_over_overlapping_ranges_both_succeed_and_work_each_batch_once(
    instance, ledger: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("OSA_FAULTS_RECORDS", "8")
    monkeypatch.setenv("OSA_FAULTS_SLEEP_S", "0.05")
    gate = tmp_path / "gate"
    monkeypatch.setenv(ENV_GATE, str(gate))
    keys = plan(instance, CONVENTION, batch_size=2)
    assert len(keys) == 4

    first_log = tmp_path / "first.log"
    with first_log.open("w") as log:
        first = subprocess.Popen(
            [*MATERIALIZE, *keys[:3]], cwd=REPO, stdout=log, stderr=subprocess.STDOUT
        )
    # The first run's hook step holds batches 1-3 at once, its hooks held at the gate.
    assert eventually(
        lambda: [_holder_step(key) for key in keys[:3]] == [HOOK_STEP] * 3, timeout_s=180
    )
    second = subprocess.Popen(
        [*MATERIALIZE, *keys[1:]],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = _output_until(second, f"batch {keys[1]} is being worked by run")
    # It waits for batch 2 holding none of its batches, not even batch 4, which nobody has.
    assert _holder_step(keys[3]) is None
    gate.touch()  # let the first run's hooks go on

    rest, _ = second.communicate(timeout=600)
    assert first.wait(timeout=600) == 0, first_log.read_text()
    assert second.returncode == 0, "".join(seen) + rest

    ids = record_ids(8)
    assert ledger_counts(ledger) == dict.fromkeys(ids, 1)  # no record ran twice
    # The second run found batches 2 and 3 finished: its hook step attempted none again.
    assert {key: _attempts(key) for key in keys} == {key: [(0, False)] for key in keys}
    assert published(CONVENTION) == dict.fromkeys(ids, 1)
    assert feature_rows() == 8
    assert [_holder_step(key) for key in keys] == [None] * 4  # every lease released


@pytest.mark.slow
def test_the_next_run_takes_a_sigkilled_runs_lease_over(
    instance, ledger: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("OSA_FAULTS_RECORDS", "10")
    monkeypatch.setenv("OSA_FAULTS_SLEEP_S", "0.25")
    [key] = plan(instance, CONVENTION)

    killed = subprocess.Popen(MATERIALIZE, cwd=REPO)
    try:
        assert eventually(lambda: len(ledger_counts(ledger)) >= 3, timeout_s=180)
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    assert _holder_step(key) == HOOK_STEP  # the dead run still holds the batch

    # Its heartbeat is fresh, yet the next run does not wait for it: its process is gone.
    monkeypatch.setenv("OSA_LEASE_WAIT_S", "0")
    rerun = subprocess.run(
        MATERIALIZE, cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "took over the lease of run" in rerun.stderr
    assert "which is dead" in rerun.stderr

    ids = record_ids(10)
    assert ledger_counts(ledger) == dict.fromkeys(ids, 1)  # none redone, none lost
    assert published(CONVENTION) == dict.fromkeys(ids, 1)
    assert _holder_step(key) is None
