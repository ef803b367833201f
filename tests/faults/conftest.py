"""Shared pieces of the fault-injection tests: the fault conventions, a Dagster instance on
disk that other processes can share, and the records database as the tests read it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
from sqlalchemy import func, select

from osa_dagster.definitions import build_definitions
from osa_dagster.records import Feature, Record, RecordsDatabase, database_url
from osa_dagster.settings import Settings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    return tmp_path / "ledger.txt"


@pytest.fixture
def fault_env(tmp_path: Path, ledger: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fault conventions, and DAGSTER_HOME: a folder other processes can share."""
    home = tmp_path / "dagster"
    home.mkdir()
    monkeypatch.setenv("OSA_CONVENTIONS", "tests.fixtures.fault_convention")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("OSA_FAULTS_LEDGER", str(ledger))
    # The hooks count their runs in the ledger, a file of the test's that no sandboxed hook
    # could write: these tests are about faults, test_hostile_hooks.py about the sandbox.
    monkeypatch.setenv("OSA_HOOK_SANDBOX", "off")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


@pytest.fixture
def instance(fault_env: Path) -> Iterator[dg.DagsterInstance]:
    # Writes DAGSTER_HOME/dagster.yaml: processes started by the test use the same storage.
    with dg.instance_for_test(temp_dir=str(fault_env)) as instance:
        yield instance


def plan(instance: dg.DagsterInstance, convention: str, batch_size: int | None = None) -> list[str]:
    defs = build_definitions()
    config = {"batch_size": batch_size} if batch_size else {}
    result = defs.resolve_job_def(f"{convention}_plan").execute_in_process(
        run_config={"ops": {f"{convention}_plan_batches": {"config": config}}},
        instance=instance,
    )
    assert result.success
    return instance.get_dynamic_partitions(f"{convention}_batches")


def ingest(instance: dg.DagsterInstance, convention: str, key: str) -> dg.ExecuteInProcessResult:
    job = build_definitions().resolve_job_def(f"{convention}_ingest")
    return job.execute_in_process(partition_key=key, instance=instance, raise_on_error=False)


def failed_steps(result: dg.ExecuteInProcessResult) -> dict[str, str]:
    """step key -> the error of every step that failed: Dagster's message, then the causes'."""
    failures = {}
    for event in result.all_events:
        if event.event_type == dg.DagsterEventType.STEP_FAILURE:
            error, messages = event.step_failure_data.error, []
            while error is not None:
                messages.append(error.message.strip())
                error = error.cause
            failures[event.step_key] = "\n".join(messages)
    return failures


def check_results(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    return {
        e.asset_check_evaluation_data.check_name: e.asset_check_evaluation_data.passed
        for e in result.all_events
        if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION
    }


def published(convention: str, url: str | None = None) -> Counter[str]:
    """How many rows of the records table each source id of the convention has."""
    db = RecordsDatabase(url or database_url(Settings.from_env()))
    try:
        with db.session() as session:
            rows = session.execute(
                select(Record.source_id).where(Record.convention == convention)
            ).scalars()
            return Counter(rows)
    finally:
        db.engine.dispose()


def feature_rows(url: str | None = None) -> int:
    db = RecordsDatabase(url or database_url(Settings.from_env()))
    try:
        with db.session() as session:
            return session.scalar(select(func.count()).select_from(Feature)) or 0
    finally:
        db.engine.dispose()


def ledger_counts(ledger: Path) -> Counter[str]:
    return Counter(ledger.read_text().splitlines()) if ledger.exists() else Counter()
