"""Poison-record isolation at the memory cap, with real cgroup OOM kills."""

from __future__ import annotations

import pytest
from osa_sdk.types import HookRecord, OutcomeStatus

from .helpers import Harness, record, require_cgroups

PASSED, REJECTED, ERRORED = OutcomeStatus.PASSED, OutcomeStatus.REJECTED, OutcomeStatus.ERRORED
POISON_MB = 400  # above the 256 MB cap of these tests


def poisoned_batch() -> list[HookRecord]:
    """Two poison records, a record that needs the cap between them, and records after them."""
    return [
        record("a", 1),
        record("b", 2, outcome="rejected"),
        record("p1", 3, alloc_mb=POISON_MB),
        record("mid", 4, alloc_mb=150),  # fits the 256 MB cap, not the 128 MB base
        record("p2", 5, alloc_mb=POISON_MB),
        record("d", 6, outcome="errored"),
        record("e", 7),
    ]


REAL_OUTCOMES = {"a": PASSED, "b": REJECTED, "mid": PASSED, "d": ERRORED, "e": PASSED}


@pytest.mark.slow
def test_only_the_poison_records_are_errored_as_poison(harness: Harness) -> None:
    require_cgroups()
    spec = harness.spec(base_mb=128, cap_mb=256)

    progress = harness.advance(spec, poisoned_batch())

    checkpoint = progress.checkpoint
    assert checkpoint.complete
    log = [
        (a.memory_limit_mb, a.oom_killed, a.isolation, a.records_in, a.first_unfinished)
        for a in checkpoint.attempts
    ]
    assert log == [
        (128, True, False, 7, "p1"),
        (256, True, False, 5, "p1"),  # at the cap, killed on p1: the suspect
        (256, True, True, 1, "p1"),  # alone, still OOM: poison
        (256, True, False, 4, "p2"),  # the rest go on; mid passes, p2 is the next suspect
        (256, True, True, 1, "p2"),
        (256, False, False, 2, None),
    ]
    assert [a.number for a in progress.attempts_this_call] == [1, 2, 3, 4, 5, 6]
    statuses = {rid: o.status for rid, o in checkpoint.outcomes.items()}
    assert statuses == {**REAL_OUTCOMES, "p1": ERRORED, "p2": ERRORED}
    assert set(checkpoint.poison()) == {"p1", "p2"}
    for rid, size in (("p1", 3), ("p2", 5)):
        poison = checkpoint.outcomes[rid]
        assert poison.reason == "poison: OOM alone at 256 MB"
        assert (poison.retryable, poison.memory_limit_mb, poison.size_mb) == (False, 256, size)
        assert poison.peak_memory_mb == pytest.approx(256, abs=1)
    assert not any(o.poison for rid, o in checkpoint.outcomes.items() if rid not in {"p1", "p2"})
    assert checkpoint.outcomes["mid"].memory_limit_mb == 256
    assert checkpoint.complete and checkpoint.suspect is None
    # Every record the hook finished, it finished once; the poison never finished.
    assert harness.ledger_counts() == dict.fromkeys(REAL_OUTCOMES, 1)


@pytest.mark.slow
def test_a_suspect_that_passes_alone_gets_its_real_outcome(harness: Harness) -> None:
    """The hook leaks: three records fit the cap one by one, not all in one process."""
    require_cgroups()
    spec = harness.spec(base_mb=256, cap_mb=256)
    records = [record(f"leak{i}", i, keep_mb=100) for i in range(1, 4)]

    checkpoint = harness.run(spec, records)

    log = [(a.oom_killed, a.isolation, a.records_in) for a in checkpoint.attempts]
    assert log == [(True, False, 3), (False, True, 1)]
    assert checkpoint.counts() == {"passed": 3, "rejected": 0, "errored": 0}
    assert checkpoint.poison() == {}
    assert harness.ledger_counts() == {"leak1": 1, "leak2": 1, "leak3": 1}


@pytest.mark.slow
def test_isolation_attempts_are_bounded(harness: Harness) -> None:
    require_cgroups()
    spec = harness.spec(base_mb=256, cap_mb=256, memory={"max_isolation_attempts": 1})

    checkpoint = harness.run(spec, poisoned_batch())

    assert sum(a.isolation for a in checkpoint.attempts) == 1
    assert set(checkpoint.poison()) == {"p1"}
    for rid in ("p2", "d", "e"):
        outcome = checkpoint.outcomes[rid]
        assert (outcome.status, outcome.reason, outcome.poison) == (
            ERRORED,
            "OOM at 256 MB",
            False,
        )
    assert checkpoint.outcomes["mid"].status is PASSED


@pytest.mark.slow
def test_a_raised_cap_reopens_only_the_poison_records(harness: Harness) -> None:
    require_cgroups()
    harness.run(harness.spec(base_mb=128, cap_mb=256), poisoned_batch())

    # The same cap again: poison is final there, nothing runs.
    again = harness.advance(harness.spec(base_mb=128, cap_mb=256), poisoned_batch())
    assert again.checkpoint.complete and again.attempts_this_call == []

    raised = harness.advance(harness.spec(base_mb=128, cap_mb=1024), poisoned_batch())

    assert raised.checkpoint.complete
    # Straight to the rung above the old cap, not from the base again.
    assert [(a.memory_limit_mb, a.records_in) for a in raised.attempts_this_call] == [(512, 2)]
    checkpoint = raised.checkpoint
    assert checkpoint.poison() == {}
    assert checkpoint.outcomes["p1"].status is PASSED
    assert checkpoint.outcomes["p2"].features == [{"memory_limit_mb": 512, "allocated_mb": 400}]
    assert harness.ledger_counts() == dict.fromkeys([*REAL_OUTCOMES, "p1", "p2"], 1)
