"""Size-aware starting memory: a hook's history starts large records in their own lane."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from osa_sdk.types import HookRecord

from osa_dagster.batch.stores import StoreMemoryHistoryIO
from osa_dagster.engine import (
    LARGE_LANE,
    AttemptRecord,
    FileMemoryHistoryIO,
    LocalRunner,
    MemoryHistory,
    MemoryPolicy,
)
from osa_dagster.engine.memory_history import Oom
from osa_dagster.settings import Settings
from osa_dagster.storage import FileSystemStore
from osa_dagster.storage.layout import memory_history_key

from .helpers import Harness, record, require_cgroups

# Base 128 MB, cap 1024 MB: the ladder is 128 -> 256 -> 512 -> 1024.
POLICY = {"base_mb": 128, "cap_mb": 1024}
LARGE_ALLOC_MB = 400  # needs 4x the base: 512 MB


def batch(prefix: str, large_sizes: tuple[float, ...], large_alloc_mb: int) -> list[HookRecord]:
    small = [record(f"{prefix}s{i}", 0.1 * (i + 1), alloc_mb=10) for i in range(4)]
    large = [
        record(f"{prefix}L{i}", size, alloc_mb=large_alloc_mb) for i, size in enumerate(large_sizes)
    ]
    return small + large


def attempt(
    number: int,
    limit: int,
    *,
    oom: bool = False,
    peak: float | None = None,
    done_size: float | None = None,
    oom_size: float | None = None,
) -> AttemptRecord:
    return AttemptRecord(
        number=number,
        memory_limit_mb=limit,
        peak_memory_mb=limit if oom else peak,
        returncode=-9 if oom else 0,
        oom_killed=oom,
        timed_out=False,
        interrupted=False,
        records_in=1,
        records_done=0 if done_size is None else 1,
        first_unfinished="x" if oom else None,
        duration_s=1.0,
        started_at=datetime.now(UTC),
        stderr_tail="",
        limit_mode="cgroup",
        max_size_mb_done=done_size,
        first_unfinished_size_mb=oom_size,
        largest_done=None if done_size is None else f"size-{done_size:g}",
    )


def log(attempts: list[AttemptRecord]) -> list[tuple[int, bool, str | None, int]]:
    return [(a.memory_limit_mb, a.oom_killed, a.lane, a.records_in) for a in attempts]


# --- the model, without a hook ---------------------------------------------------------


def learnt_four_times_base() -> MemoryHistory:
    """Small records fit at the base; size 50 OOMed at 128 and 256, fitted in 410 MB."""
    history = MemoryHistory(hook="h")
    history.learn(
        [
            attempt(1, 128, oom=True, done_size=1.0, oom_size=50.0),
            attempt(2, 256, oom=True, oom_size=50.0),
            attempt(3, 512, peak=410.0, done_size=60.0),
        ]
    )
    return history


def test_prediction_follows_the_evidence() -> None:
    history = learnt_four_times_base()
    policy = MemoryPolicy(**POLICY)
    assert [history.predict(policy, s) for s in (0.5, 1.0, 20.0, 50.0, 60.0, 200.0)] == [
        128,  # a fit at the base
        128,
        # Between the evidence: no OOM of a record this small, so from the base.
        128,
        512,  # OOMed at 256: the rung above it, where a larger record fitted
        512,
        512,  # larger than anything seen: above the largest OOM of a smaller record
    ]


def test_prediction_never_exceeds_the_cap_and_is_the_base_without_history() -> None:
    history = learnt_four_times_base()
    history.learn([attempt(4, 2048, oom=True, oom_size=70.0)])  # learnt under a higher cap
    assert history.predict(MemoryPolicy(**POLICY), 80.0) == 1024
    assert history.predict(MemoryPolicy(base_mb=128, cap_mb=256), 80.0) == 256
    assert MemoryHistory(hook="h").predict(MemoryPolicy(**POLICY), 80.0) == 128


def test_a_fit_lower_than_an_oom_wins() -> None:
    """An OOM is charged to the record the hook was on; a leak can make that wrong."""
    history = MemoryHistory(hook="h")
    history.learn(
        [
            attempt(1, 128, oom=True, done_size=2.0, oom_size=3.0),  # a leak, not record size
            attempt(2, 128, peak=60.0, done_size=9.0),
        ]
    )
    assert history.predict(MemoryPolicy(**POLICY), 5.0) == 128
    assert history.predict(MemoryPolicy(**POLICY), 10.0) == 256


def test_learning_is_idempotent_and_the_history_stays_small(tmp_path: Path) -> None:
    history = learnt_four_times_base()
    before = history.model_copy(deep=True)
    assert not history.learn([attempt(3, 512, peak=410.0, done_size=60.0)])
    # Dominated: a smaller record that needed more than a larger one.
    assert not history.learn([attempt(5, 1024, peak=500.0, done_size=55.0)])
    assert history == before
    assert len(history.fits) == 2 and len(history.ooms) == 1

    io = StoreMemoryHistoryIO(FileSystemStore(tmp_path), memory_history_key("pdb", "h"))
    assert io.load() is None
    io.save(history)
    assert io.load() == history
    assert (tmp_path / "history" / "pdb" / "h.json").is_file()


def test_an_oom_names_the_record_it_was_on_and_names_stay_stable() -> None:
    history = learnt_four_times_base()
    assert [(o.record, o.size_mb, o.limit_mb) for o in history.ooms] == [("x", 50.0, 256)]
    assert [(f.record, f.size_mb) for f in history.fits] == [("size-1", 1.0), ("size-60", 60.0)]
    # A history kept before records were named: learning the same attempt names its record,
    # and learning it again changes nothing.
    unnamed = MemoryHistory(hook="h", ooms=[Oom(size_mb=50.0, limit_mb=256)])
    assert unnamed.learn([attempt(2, 256, oom=True, oom_size=50.0)])
    assert [o.record for o in unnamed.ooms] == ["x"]
    assert not unnamed.learn([attempt(2, 256, oom=True, oom_size=50.0)])


# --- with a hook, real cgroup OOM kills -------------------------------------------------


@pytest.fixture
def history(tmp_path: Path) -> FileMemoryHistoryIO:
    return FileMemoryHistoryIO(tmp_path / "history.json")


def harness_for(tmp_path: Path, name: str) -> Harness:
    return Harness(tmp_path / name, LocalRunner.from_settings(Settings.from_env()))


@pytest.mark.slow
def test_large_records_start_at_the_predicted_level(
    tmp_path: Path, history: FileMemoryHistoryIO
) -> None:
    require_cgroups()
    first = harness_for(tmp_path, "first")
    spec = first.spec(**POLICY)

    learnt = first.run(spec, batch("a-", (50.0, 60.0), LARGE_ALLOC_MB), history=history)

    # Nothing known yet: plain doubling, the large records OOM twice on the way up.
    assert log(learnt.attempts) == [
        (128, True, None, 6),
        (256, True, None, 2),
        (512, False, None, 2),
    ]
    assert learnt.lanes == {}

    # Another batch, other records of similar sizes: one call, no OOM at all.
    second = harness_for(tmp_path, "second")
    records = batch("b-", (55.0, 65.0), LARGE_ALLOC_MB)
    progress = second.advance(second.spec(**POLICY), records, history=history)

    assert progress.checkpoint.complete
    assert log(progress.checkpoint.attempts) == [
        (128, False, None, 4),  # the small ones, from the base
        (512, False, LARGE_LANE, 2),  # the large ones, in their own attempt at 4x the base
    ]
    assert progress.checkpoint.lanes == {"b-L0": 512, "b-L1": 512}
    outcomes = progress.checkpoint.outcomes
    assert {rid: o.memory_limit_mb for rid, o in outcomes.items() if "L" in rid} == {
        "b-L0": 512,
        "b-L1": 512,
    }
    assert progress.checkpoint.counts() == {"passed": 6, "rejected": 0, "errored": 0}
    assert second.ledger_counts() == {r.id: 1 for r in records}


@pytest.mark.slow
def test_without_history_the_ladder_is_plain_doubling(
    tmp_path: Path, history: FileMemoryHistoryIO
) -> None:
    require_cgroups()
    records = batch("a-", (50.0, 60.0), LARGE_ALLOC_MB)
    attempts = []
    # No history at all, then an empty one: the same attempts as before lanes.
    for name, io in (("none", None), ("empty", history)):
        harness = harness_for(tmp_path, name)
        progress = harness.advance(harness.spec(**POLICY), records, history=io)
        assert progress.checkpoint.lanes == {}
        attempts.append(log(progress.attempts_this_call))
    assert (
        attempts[0]
        == attempts[1]
        == [(128, True, None, 6), (256, True, None, 2), (512, False, None, 2)]
    )


@pytest.mark.slow
def test_a_prediction_never_starts_above_the_cap(
    tmp_path: Path, history: FileMemoryHistoryIO
) -> None:
    """Learnt under a 1024 MB cap; the hook's cap is now 256 MB."""
    require_cgroups()
    first = harness_for(tmp_path, "first")
    first.run(first.spec(**POLICY), batch("a-", (50.0,), LARGE_ALLOC_MB), history=history)

    second = harness_for(tmp_path, "second")
    spec = second.spec(base_mb=128, cap_mb=256)
    checkpoint = second.run(spec, batch("b-", (55.0,), LARGE_ALLOC_MB), history=history)

    assert checkpoint.lanes == {"b-L0": 256}
    assert max(a.memory_limit_mb for a in checkpoint.attempts) == 256
    # At the cap, poison as ever: alone in its lane and OOM-killed at the cap, it is poison.
    assert log(checkpoint.attempts) == [(128, False, None, 4), (256, True, LARGE_LANE, 1)]
    assert set(checkpoint.poison()) == {"b-L0"}
    assert checkpoint.counts() == {"passed": 4, "rejected": 0, "errored": 1}


@pytest.mark.slow
def test_a_prediction_too_low_still_escalates_on_oom(
    tmp_path: Path, history: FileMemoryHistoryIO
) -> None:
    require_cgroups()
    # Learnt on records of size 50 that needed 150 MB: 256 MB.
    first = harness_for(tmp_path, "first")
    first.run(first.spec(**POLICY), batch("a-", (50.0,), 150), history=history)

    # These need 400 MB: the lane starts at 256, is OOM-killed and climbs alone.
    second = harness_for(tmp_path, "second")
    records = batch("b-", (55.0, 60.0), LARGE_ALLOC_MB)
    progress = second.advance(second.spec(**POLICY), records, history=history)

    assert log(progress.attempts_this_call) == [
        (128, False, None, 4),
        (256, True, LARGE_LANE, 2),
        (512, False, LARGE_LANE, 2),
    ]
    assert progress.checkpoint.lanes == {"b-L0": 512, "b-L1": 512}
    assert progress.checkpoint.next_memory_mb == 128  # the main ladder did not climb
    assert progress.checkpoint.counts()["passed"] == 6
    # The history learnt the OOM: the next batch's records of this size start at 512 MB.
    learnt = history.load()
    assert learnt is not None
    assert learnt.predict(MemoryPolicy(**POLICY), 55.0) == 512
