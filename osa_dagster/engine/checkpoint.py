"""The state of one hook over one batch: every outcome, every attempt, the next memory limit.

It is saved whenever it changes, so that neither an OOM kill of the hook nor a SIGKILL of the
orchestrator loses a finished record. The engine only talks to the `CheckpointIO` protocol,
so the checkpoint can live on a local disk or in an object store.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

from osa_sdk.types import OutcomeStatus
from pydantic import BaseModel, ConfigDict, Field

from osa_dagster.atomic_files import JsonModelFile
from osa_dagster.engine.runners.base import AttemptMarker, LimitMode


class Anomaly(StrEnum):
    """Ways in which a hook's output broke the contract; counted, never fatal."""

    MALFORMED_LINES = "malformed_lines"
    UNKNOWN_IDS = "unknown_ids"
    CONFLICTING_OUTCOMES = "conflicting_outcomes"
    DUPLICATE_OUTCOMES = "duplicate_outcomes"
    ALREADY_SETTLED = "already_settled"  # an outcome for a record settled by an earlier attempt
    NO_OUTCOME = "no_outcome"
    NON_FINITE_NUMBERS = "non_finite_numbers"  # NaN or an infinity in features: errored
    REFUSED_OUTPUT = "refused_output"  # not a regular file, or over a cap of the attempt
    OVER_CAP = "over_cap"  # a line or its feature rows over the per-record cap: errored


class RecordOutcome(BaseModel):
    model_config = ConfigDict(frozen=True)

    status: OutcomeStatus
    features: list[dict[str, Any]] = Field(default_factory=list)
    reason: str | None = None
    retryable: bool = False
    attempt: int  # the attempt that settled the record
    memory_limit_mb: int
    # Ran out of memory alone at the cap: kept apart (dead-lettered), and reopened when the
    # hook's cap is raised above `memory_limit_mb`.
    poison: bool = False
    size_mb: float | None = None  # of a poison record: what a curator needs to pick a new cap
    peak_memory_mb: float | None = None  # of a poison record's lone attempt, when measured

    def same_result(self, other: RecordOutcome) -> bool:
        return (self.status, self.features, self.reason, self.retryable) == (
            other.status,
            other.features,
            other.reason,
            other.retryable,
        )


class AttemptRecord(BaseModel):
    number: int
    memory_limit_mb: int
    peak_memory_mb: float | None
    returncode: int | None  # None when the orchestrator died and the exit was never seen
    oom_killed: bool  # ran out of memory: a kernel OOM kill or the hook's MemoryError exit
    timed_out: bool
    interrupted: bool  # the orchestrator died while the attempt ran
    records_in: int
    records_done: int  # records the hook itself settled
    first_unfinished: str | None  # after an OOM: the record the hook was most likely on
    duration_s: float | None
    started_at: datetime
    stderr_tail: str
    limit_mode: LimitMode
    isolation: bool = False  # one suspect record run alone at the cap
    # "large": records started above the main ladder's limit, at the level a memory history
    # predicted for their size (see hook_run); None: the main ladder.
    lane: str | None = None
    # Seconds the attempt waited for a slot and room in the machine's memory budget before it
    # started (engine/capacity.py); None when it ran without one.
    queued_s: float | None = None
    # What a memory history learns from (engine/memory_history.py): the largest record the
    # hook settled, and the size of the record it was on when OOM-killed.
    max_size_mb_done: float | None = None
    first_unfinished_size_mb: float | None = None
    largest_done: str | None = None  # the record of `max_size_mb_done`
    # The orchestrator's run that made the attempt, when it named one (`advance_hook`'s
    # `run_id`): a run that resumes a checkpoint tells its own attempts from earlier runs'.
    run_id: str | None = None
    # The shard of the batch the attempt worked on, when the batch's records are split for
    # the hook (`advance_hook`'s `shard`, see batch/shards.py): each shard has a checkpoint
    # and an attempt log of its own, numbered from 1.
    shard: int | None = None


class InFlightAttempt(BaseModel):
    """The attempt running while this checkpoint was saved."""

    number: int
    memory_limit_mb: int
    records_in: int
    started_at: datetime
    marker: AttemptMarker
    isolation: bool = False
    lane: str | None = None
    queued_s: float | None = None
    run_id: str | None = None
    shard: int | None = None
    # Bytes of each output file already merged into the outcomes, so that after a crash the
    # rest of the output is merged exactly once.
    offsets: dict[str, int] = Field(default_factory=dict)


UNRECORDED_VERSION_NAME = "unrecorded"


class Checkpoint(BaseModel):
    hook: str
    batch_digest: str
    hook_version: str | None = None
    """The version of the hook that judged these outcomes (see spec.hook_version); None:
    judged before hooks had versions, so by no version that can be current."""

    @property
    def version_name(self) -> str:
        """The version as curators read it."""
        return self.hook_version or UNRECORDED_VERSION_NAME

    outcomes: dict[str, RecordOutcome] = Field(default_factory=dict)
    attempts: list[AttemptRecord] = Field(default_factory=list)
    next_memory_mb: int
    complete: bool = False
    anomalies: dict[str, int] = Field(default_factory=dict)
    running: InFlightAttempt | None = None
    # The record to run alone at the cap next: the one an attempt at the cap was killed on.
    suspect: str | None = None
    # Records that start above `next_memory_mb`, at the limit a memory history predicted for
    # their size (raised when their lane is OOM-killed). Only those records are listed.
    lanes: dict[str, int] = Field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        counts = {status.value: 0 for status in OutcomeStatus}
        for outcome in self.outcomes.values():
            counts[outcome.status.value] += 1
        return counts

    def poison(self) -> dict[str, RecordOutcome]:
        return {rid: outcome for rid, outcome in self.outcomes.items() if outcome.poison}

    def oom_attempts(self) -> list[AttemptRecord]:
        return [attempt for attempt in self.attempts if attempt.oom_killed]

    def note(self, anomaly: Anomaly, count: int = 1) -> None:
        self.anomalies[anomaly.value] = self.anomalies.get(anomaly.value, 0) + count


class CheckpointIO(Protocol):
    def load(self) -> Checkpoint | None: ...

    def save(self, checkpoint: Checkpoint) -> None: ...


class FileCheckpointIO(JsonModelFile[Checkpoint]):
    """A checkpoint in one JSON file, replaced atomically: a crash leaves the old or the new."""

    model = Checkpoint
