"""The hook jobs of a range (every hook over every batch) run at once, each on its own."""

from __future__ import annotations

from pathlib import Path

import pytest

from osa_dagster.batch import BatchInputError
from osa_dagster.batch.fetch import fetch_raw_batch
from osa_dagster.batch.hooks import (
    HookJob,
    checkpoint_key,
    hook_records,
    largest_first,
    machine_capacity,
    plan_shards,
    run_hook_jobs,
)
from osa_dagster.batch.plan import plan_ingest
from osa_dagster.batch.stores import StoreCheckpointIO
from osa_dagster.conventions.base import Convention
from osa_dagster.conventions.registry import load_conventions
from osa_dagster.engine import HookCapacity, LocalRunner
from osa_dagster.settings import Settings
from osa_dagster.storage import artifact_store
from tests.engine.helpers import alive, eventually

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def slow_hook(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The fault conventions, whose `ledger` hook sleeps OSA_FAULTS_SLEEP_S on each record;
    a test sets that, then loads them."""
    monkeypatch.setenv("OSA_CONVENTIONS", "tests.fixtures.fault_convention")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("OSA_FAULTS_RECORDS", "4")
    monkeypatch.setenv("OSA_FAULTS_LEDGER", str(tmp_path / "ledger.txt"))
    # The hook writes to the test's ledger, which no sandboxed hook may.
    monkeypatch.setenv("OSA_HOOK_SANDBOX", "off")


def _two_batches_one_fetched(convention: Convention) -> list[str]:
    """Two batches of two records; only the first is fetched, so the second's job fails."""
    keys = plan_ingest(convention, artifact_store(Settings.from_env()), batch_size=2).partitions
    fetch_raw_batch(convention, artifact_store(Settings.from_env()), keys[0])
    return keys


@pytest.mark.usefixtures("slow_hook")
def test_a_failed_job_stops_no_other(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OSA_FAULTS_SLEEP_S", "0")
    convention = load_conventions(Settings.from_env())["faults_ledger"]
    fetched, unfetched = _two_batches_one_fetched(convention)
    capacity = machine_capacity(Settings.from_env())
    jobs = [HookJob(unfetched, "ledger"), HookJob(fetched, "ledger")]
    results = {
        r.job.partition: r
        for r in run_hook_jobs(
            convention,
            artifact_store(Settings.from_env()),
            LocalRunner.from_settings(Settings.from_env()),
            jobs,
            capacity=capacity,
        )
    }
    done = results[fetched].progress
    assert done is not None and done.checkpoint.complete
    assert done.checkpoint.counts()["passed"] == 2
    assert isinstance(results[unfetched].error, BatchInputError)
    assert "no records.jsonl" in str(results[unfetched].error)
    assert capacity.read().entries == []


@pytest.mark.usefixtures("slow_hook")
def test_closing_the_jobs_early_kills_their_hooks(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("OSA_FAULTS_SLEEP_S", "600")
    convention = load_conventions(Settings.from_env())["faults_ledger"]
    fetched, unfetched = _two_batches_one_fetched(convention)
    store = artifact_store(Settings.from_env())
    capacity = HookCapacity(Settings.from_env().hook_ledger_path, slots=2, budget_mb=4096)
    jobs = run_hook_jobs(
        convention,
        store,
        LocalRunner.from_settings(Settings.from_env()),
        [HookJob(unfetched, "ledger"), HookJob(fetched, "ledger")],
        capacity=capacity,
    )
    first = next(jobs)  # the unfetched batch fails at once; the other's hook sleeps
    assert first.job.partition == unfetched and first.error is not None
    assert eventually(lambda: len(capacity.read().running()) == 1, timeout_s=60)
    checkpoints = StoreCheckpointIO(store, checkpoint_key(convention, fetched, "ledger"))
    assert eventually(lambda: (c := checkpoints.load()) is not None and c.running is not None)
    running = checkpoints.load().running
    assert running is not None and running.marker.pid is not None

    jobs.close()  # as when the run is terminated: returns once every thread has stopped

    assert not alive(running.marker.pid)
    assert capacity.read().entries == []


def test_the_shards_of_the_largest_batch_start_first():
    """Batches are planned smallest records first: started in that order, the largest batch
    would run last, alone."""
    convention = load_conventions(Settings.from_env())[
        "pdb"
    ]  # the bundled mirror: real entries, real sizes
    store = artifact_store(Settings.from_env())
    keys = plan_ingest(convention, store, batch_size=10).partitions
    for key in keys:
        fetch_raw_batch(convention, store, key)
    records = {key: hook_records(convention, store, key) for key in keys}
    megabytes = [sum(r.size_mb for r in records[key]) for key in keys]
    assert len(set(megabytes)) == len(keys) >= 3, "batches of distinct sizes"
    assert megabytes == sorted(megabytes), "planned smallest first"
    hooks = [hook.name for hook in convention.hooks]
    shards = [
        shard
        for key in keys
        for hook in hooks
        for shard in plan_shards(convention, store, key, hook, records[key], capacity=None)
    ]
    assert [s.job for s in largest_first(shards)] == [
        HookJob(key, hook) for key in reversed(keys) for hook in hooks
    ]
