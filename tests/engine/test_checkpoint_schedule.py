"""When the checkpoint is saved while a hook runs: after N new outcomes, or T seconds after
the last save once some outcome is new, and always when an attempt starts and ends.

The hook does not race the engine's polling: a record that must come after a save waits
for it (`wait_for` a file that each save of n outcomes creates), so what each save holds
does not depend on how busy the machine is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import pytest

from osa_dagster.engine import AttemptOptions, Checkpoint, CheckpointIO, run_hook
from osa_dagster.engine.hook_run import SAVE_SPACING

from .helpers import Harness, record


@dataclass(frozen=True)
class Save:
    at: float  # time.monotonic() when the engine asked for the save
    outcomes: int
    in_flight: bool  # saved while an attempt was running


@dataclass
class RecordingCheckpointIO:
    """A CheckpointIO that records every save before passing it on."""

    inner: CheckpointIO
    signals: Path
    saves: list[Save] = field(default_factory=list)

    def load(self) -> Checkpoint | None:
        return self.inner.load()

    def save(self, checkpoint: Checkpoint) -> None:
        self.saves.append(
            Save(time.monotonic(), len(checkpoint.outcomes), checkpoint.running is not None)
        )
        self.inner.save(checkpoint)
        saved(self.signals, len(checkpoint.outcomes)).touch()

    def while_running(self) -> list[Save]:
        """The saves during the attempt, after the one made as it started (no outcomes)."""
        in_flight = [s for s in self.saves if s.in_flight]
        assert in_flight[0].outcomes == 0
        return in_flight[1:]


def saved(signals: Path, outcomes: int) -> Path:
    """The file that a save holding `outcomes` outcomes creates."""
    return signals / f"saved-{outcomes}"


def after_a_save_of(harness: Harness, *outcomes: int) -> dict[str, list[str]]:
    """Record metadata: hold the record back until a save held one of these many outcomes."""
    return {"wait_for": [str(saved(harness.root, n)) for n in outcomes]}


def run(
    harness: Harness,
    records: int,
    sleep_s: float,
    waits: dict[int, dict[str, list[str]]] | None = None,
    **schedule: float,
) -> RecordingCheckpointIO:
    recording = RecordingCheckpointIO(harness.checkpoints, harness.root)
    waits = waits or {}
    checkpoint = run_hook(
        harness.spec(sleep_s=sleep_s),
        harness.batch([record(f"r{i}", size_mb=i, **waits.get(i, {})) for i in range(records)]),
        harness.runner,
        recording,
        harness.workdir,
        AttemptOptions(**schedule),
    )
    assert checkpoint.complete and checkpoint.counts()["passed"] == records
    # Always saved at the end of the attempt, with every outcome.
    assert (recording.saves[-1].outcomes, recording.saves[-1].in_flight) == (records, False)
    return recording


def test_by_default_every_new_outcome_is_saved_at_once(harness: Harness) -> None:
    # Each record waits for the save of the one before: saved one by one, or never done.
    waits = {i: after_a_save_of(harness, i) for i in range(1, 4)}
    recording = run(harness, records=4, sleep_s=0.0, waits=waits)

    assert [s.outcomes for s in recording.while_running()][:3] == [1, 2, 3]


def test_count_trigger_saves_after_every_n_new_outcomes(harness: Harness) -> None:
    # The time trigger is out of reach: only the count can cause a save while the hook runs.
    # Records 4 and 7 wait for the saves of 3 and 6 outcomes.
    waits = {3: after_a_save_of(harness, 3), 6: after_a_save_of(harness, 6)}
    recording = run(
        harness,
        records=9,
        sleep_s=0.0,
        waits=waits,
        checkpoint_every_records=3,
        checkpoint_every_s=60,
    )

    counts = [0] + [s.outcomes for s in recording.while_running()]
    assert counts[:3] == [0, 3, 6], counts
    assert all(later - earlier >= 3 for earlier, later in pairwise(counts)), counts


def test_time_trigger_saves_new_outcomes_at_most_every_t_seconds(harness: Harness) -> None:
    # The count trigger out of reach: saves come from the clock. Record 5 waits for a save
    # of the first four outcomes at most, record 8 for one of the next three at most.
    waits = {4: after_a_save_of(harness, 1, 2, 3, 4), 7: after_a_save_of(harness, 5, 6, 7)}
    recording = run(
        harness,
        records=8,
        sleep_s=0.1,
        waits=waits,
        checkpoint_every_records=100,
        checkpoint_every_s=0.5,
    )

    running = recording.while_running()
    assert len(running) >= 2, running
    starts = [s.at for s in recording.saves if s.in_flight]
    assert all(later - earlier >= 0.5 for earlier, later in pairwise(starts)), starts
    assert all(0 < s.outcomes < 8 for s in running[:2])


def test_time_trigger_does_not_save_without_a_new_outcome(harness: Harness) -> None:
    recording = RecordingCheckpointIO(harness.checkpoints, harness.root)
    # "slow" starts once "a" is saved and then gives the clock 12 chances to fire while
    # nothing new arrives; "b" starts once "slow" is saved.
    records = [
        record("a", 1),
        record("slow", 2, sleep_s=1.2, **after_a_save_of(harness, 1)),
        record("b", 3, **after_a_save_of(harness, 2)),
    ]

    run_hook(
        harness.spec(),
        harness.batch(records),
        harness.runner,
        recording,
        harness.workdir,
        AttemptOptions(checkpoint_every_records=100, checkpoint_every_s=0.1),
    )

    # Every save while the hook ran held a new outcome: 1, 2, and 3 if the poll saw "b"
    # before the hook's exit (either is right, depending on the machine's load).
    counts = [s.outcomes for s in recording.while_running()]
    assert counts in ([1, 2], [1, 2, 3]), counts
    assert recording.saves[-1].outcomes == 3


@pytest.mark.parametrize(("records", "seconds"), [(0, 1.0), (1, 0.0), (1, -1.0)])
def test_a_schedule_that_cannot_work_is_refused(
    harness: Harness, records: int, seconds: float
) -> None:
    with pytest.raises(ValueError, match="checkpoint_every_records must be at least 1"):
        run_hook(
            harness.spec(),
            harness.batch([record("a")]),
            harness.runner,
            harness.checkpoints,
            harness.workdir,
            AttemptOptions(checkpoint_every_records=records, checkpoint_every_s=seconds),
        )
    assert harness.checkpoints.load() is None  # refused before anything ran


@dataclass
class SlowCheckpointIO(RecordingCheckpointIO):
    """Saves that take `save_s` each, as a large checkpoint's do, with when each ended."""

    save_s: float = 0.05
    started: list[float] = field(default_factory=list)
    ended: list[float] = field(default_factory=list)

    def save(self, checkpoint: Checkpoint) -> None:
        self.started.append(time.monotonic())
        time.sleep(self.save_s)
        super().save(checkpoint)
        self.ended.append(time.monotonic())


def test_saves_during_an_attempt_are_spaced_by_how_long_a_save_takes(harness: Harness) -> None:
    # Every outcome asks for a save at once (1 record, 1 s), and each record waits for the
    # save of the one before, so saving at every poll would leave ~0.1 s between saves.
    slow = SlowCheckpointIO(harness.checkpoints, harness.root)
    waits = {i: after_a_save_of(harness, i) for i in range(1, 4)}
    checkpoint = run_hook(
        harness.spec(),
        harness.batch([record(f"r{i}", size_mb=i, **waits.get(i, {})) for i in range(4)]),
        harness.runner,
        slow,
        harness.workdir,
    )

    assert checkpoint.complete
    in_flight = [i for i, s in enumerate(slow.saves) if s.in_flight]
    assert len(in_flight) >= 3, slow.saves
    # Saving took a small share of the time between the first save and the last (at every
    # poll it would be about a third), and each gap followed from the save before it.
    took_s = [slow.ended[i] - slow.started[i] for i in in_flight]
    span_s = slow.ended[in_flight[-1]] - slow.started[in_flight[0]]
    assert sum(took_s) <= span_s / 10, (took_s, span_s)
    for earlier, later in pairwise(in_flight):
        gap_s = slow.started[later] - slow.ended[earlier]
        assert gap_s >= SAVE_SPACING * (slow.ended[earlier] - slow.started[earlier])
