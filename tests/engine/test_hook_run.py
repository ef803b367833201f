"""advance_hook / run_hook with real processes: escalation, failures that do not escalate."""

from __future__ import annotations

import logging

import pytest
from osa_sdk.types import HookRecord, OutcomeStatus

from osa_dagster.engine import LocalRunner
from osa_dagster.settings import Settings

from .helpers import SHELL_HOOK, Harness, record, require_cgroups

PASSED, REJECTED, ERRORED = OutcomeStatus.PASSED, OutcomeStatus.REJECTED, OutcomeStatus.ERRORED


def big_batch() -> list[HookRecord]:
    # Listed out of order on purpose: the engine sorts by size, so "big" comes third.
    return [
        record("d", 5),
        record("big", 3, alloc_mb=300),
        record("a", 1, alloc_mb=20),
        record("c", 4),
        record("b", 2),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["cgroup", "rlimit"])
def test_oom_escalates_memory_and_never_redoes_finished_records(
    harness: Harness, mode: str
) -> None:
    if mode == "cgroup":
        require_cgroups()
    harness.runner = LocalRunner.from_settings(Settings.from_env(), mode)
    spec = harness.spec(base_mb=128, cap_mb=512)

    checkpoint = harness.run(spec, big_batch())

    oom = checkpoint.attempts[0]
    assert (oom.memory_limit_mb, oom.oom_killed, oom.limit_mode) == (128, True, mode)
    assert (oom.records_in, oom.records_done, oom.first_unfinished) == (5, 2, "big")
    if mode == "cgroup":
        assert oom.returncode == -9
        assert oom.peak_memory_mb == pytest.approx(128, abs=1)
    else:
        assert oom.returncode == 99  # EXIT_MEMORY_ERROR: the hook met MemoryError

    log = [(a.memory_limit_mb, a.oom_killed, a.records_in) for a in checkpoint.attempts]
    assert log == [(128, True, 5), (256, True, 3), (512, False, 3)]
    assert [a.limit_mode for a in checkpoint.attempts] == [mode] * 3
    assert checkpoint.complete and checkpoint.running is None
    assert checkpoint.counts() == {"passed": 5, "rejected": 0, "errored": 0}
    assert len(checkpoint.oom_attempts()) == 2
    settled_by = {rid: (o.attempt, o.memory_limit_mb) for rid, o in checkpoint.outcomes.items()}
    assert settled_by == {
        "a": (1, 128),
        "b": (1, 128),
        "big": (3, 512),
        "c": (3, 512),
        "d": (3, 512),
    }
    assert checkpoint.outcomes["big"].features == [{"memory_limit_mb": 512, "allocated_mb": 300}]
    assert harness.ledger_counts() == dict.fromkeys(["a", "b", "big", "c", "d"], 1)


def test_one_call_climbs_the_ladder(harness: Harness) -> None:
    harness.runner = LocalRunner.from_settings(
        Settings.from_env(), "rlimit"
    )  # MemoryError exits: no cgroup needed

    progress = harness.advance(harness.spec(), big_batch())

    assert progress.checkpoint.complete
    assert [a.memory_limit_mb for a in progress.attempts_this_call] == [128, 256, 512]
    assert progress.checkpoint.counts()["passed"] == 5


@pytest.mark.slow
def test_without_isolation_oom_at_the_cap_errors_only_what_is_left(harness: Harness) -> None:
    require_cgroups()
    spec = harness.spec(base_mb=128, cap_mb=256, memory={"isolate_poison": False})

    checkpoint = harness.run(spec, big_batch())

    assert [(a.memory_limit_mb, a.oom_killed) for a in checkpoint.attempts] == [
        (128, True),
        (256, True),
    ]
    assert {rid: o.status for rid, o in checkpoint.outcomes.items()} == {
        "a": PASSED,
        "b": PASSED,
        "big": ERRORED,
        "c": ERRORED,
        "d": ERRORED,
    }
    for rid in ("big", "c", "d"):
        outcome = checkpoint.outcomes[rid]
        assert (outcome.reason, outcome.retryable, outcome.poison) == (
            "OOM at 256 MB",
            False,
            False,
        )
    assert checkpoint.complete
    assert harness.ledger_counts() == {"a": 1, "b": 1}


def test_plain_sigkill_is_retried_later_without_escalation(harness: Harness) -> None:
    spec = harness.spec()
    records = [record("a", 1), record("b", 2, sigkill=True), record("c", 3)]

    first = harness.advance(spec, records)

    assert first.checkpoint.complete
    checkpoint = first.checkpoint
    killed = checkpoint.attempts[0]
    assert (killed.returncode, killed.oom_killed) == (-9, False)
    assert checkpoint.next_memory_mb == 128
    assert checkpoint.outcomes["a"].status is PASSED
    for rid in ("b", "c"):
        outcome = checkpoint.outcomes[rid]
        assert outcome.status is ERRORED and outcome.retryable
        assert outcome.reason == "hook killed by SIGKILL (not an OOM)"

    # A new run of the batch retries the retryable errors, and only them.
    checkpoint = harness.run(spec, records)

    assert [(a.memory_limit_mb, a.records_in) for a in checkpoint.attempts] == [(128, 3), (128, 2)]
    assert checkpoint.counts() == {"passed": 3, "rejected": 0, "errored": 0}
    assert harness.ledger_counts() == {"a": 1, "b": 1, "c": 1}


def test_a_finished_batch_runs_nothing_again(harness: Harness) -> None:
    spec = harness.spec()
    records = [record("a", outcome="rejected"), record("b", outcome="errored")]
    harness.run(spec, records)

    again = harness.advance(spec, records)

    assert again.checkpoint.complete and len(again.checkpoint.attempts) == 1
    assert again.checkpoint.counts() == {"passed": 0, "rejected": 1, "errored": 1}
    assert harness.ledger_counts() == {"a": 1, "b": 1}


def test_timeout_errors_the_rest_as_retryable(harness: Harness) -> None:
    spec = harness.spec(timeout_s=1.0)
    records = [record("a", 1), record("slow", 2, sleep_s=60), record("c", 3)]

    checkpoint = harness.run(spec, records)

    assert checkpoint.attempts[0].timed_out and not checkpoint.attempts[0].oom_killed
    assert checkpoint.outcomes["a"].status is PASSED
    for rid in ("slow", "c"):
        outcome = checkpoint.outcomes[rid]
        assert (outcome.status, outcome.reason, outcome.retryable) == (
            ERRORED,
            "timed out after 1 s",
            True,
        )


def test_shell_hook_without_sdk_finds_files_of_awkward_ids(harness: Harness) -> None:
    ids = ["pdb:1abc", "GSE/12 x@v2", "no-files"]
    for rid in ids[:2]:
        folder = harness.files_root / record(rid).files_dir
        folder.mkdir(parents=True)
        (folder / "data.txt").write_text(rid * 3)

    checkpoint = harness.run(harness.spec(SHELL_HOOK), [record(rid) for rid in ids])

    assert checkpoint.outcomes["pdb:1abc"].features == [{"bytes": 24}]
    assert checkpoint.outcomes["GSE/12 x@v2"].features == [{"bytes": 33}]
    assert (checkpoint.outcomes["no-files"].status, checkpoint.outcomes["no-files"].reason) == (
        REJECTED,
        "no data.txt",
    )
    assert checkpoint.anomalies == {}


def test_a_checkpoint_of_another_batch_is_discarded(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    spec = harness.spec()
    harness.run(spec, [record("a"), record("b")])

    with caplog.at_level(logging.WARNING):
        checkpoint = harness.run(spec, [record("a"), record("b", size_mb=2)])

    assert "discarding the checkpoint" in caplog.text
    assert len(checkpoint.attempts) == 1
    assert harness.ledger_counts() == {"a": 2, "b": 2}
