"""What a hook's records needed in memory, by size, learnt from its attempts: the starting
memory of the next batch's large records.

Two kinds of evidence come out of every attempt (see `AttemptRecord`):

- a fit: the largest record the hook settled (`record`) ran within `need_mb` (the attempt's
  measured peak when it ended without an OOM, else its limit). Records are assumed to need
  no less memory when they are larger, so every record of that size or smaller fits too.
- an OOM: the attempt was killed while on a record (`record`) of `size_mb` at `limit_mb`,
  so that record and every larger one need more than `limit_mb`.

For a record of size s, `predict` starts at the rung above the largest limit at which a record
of size <= s was OOM-killed (the base without such an OOM), unless a record of size >= s is
known to have fitted lower: the smallest rung holding that fit wins. A fit is hard evidence,
while an OOM is charged to the record the hook was on, which a leaking hook can make wrong;
so when they disagree the lower start wins, and a start too low costs an OOM and one climb of
the ladder, as without a history. Never above the cap; with no evidence, the base.

Each kind is kept as a Pareto frontier (a fit of a larger record in less memory makes a
smaller, hungrier fit useless), so the history stays small and learning the same attempt
twice changes nothing: a caller may learn from a whole checkpoint after every step.
"""

from __future__ import annotations

import math
import threading
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from osa_dagster.atomic_files import JsonModelFile
from osa_dagster.engine.checkpoint import AttemptRecord, Checkpoint
from osa_dagster.engine.spec import MemoryPolicy

# Threads of one process (a step running many batches of a hook at once) learn one at a
# time, so that none loses another's evidence; separate processes can still race (below).
_LEARNING = threading.Lock()
# The frontiers are bounded by the distinct limits and peaks seen; this bounds them for good.
MAX_ENTRIES = 256


class Fit(BaseModel):
    model_config = ConfigDict(frozen=True)

    size_mb: float
    need_mb: float
    record: str | None = None  # the record of that size (None in older histories)


class Oom(BaseModel):
    model_config = ConfigDict(frozen=True)

    size_mb: float
    limit_mb: int
    # The record the hook was on when it was killed (None in histories from before it was
    # kept): the one a curator looks at.
    record: str | None = None


class MemoryHistory(BaseModel):
    """Memory against record size for one hook, across batches."""

    hook: str
    fits: list[Fit] = Field(default_factory=list)
    ooms: list[Oom] = Field(default_factory=list)

    def learn(self, attempts: list[AttemptRecord]) -> bool:
        """Add the evidence of these attempts; True when anything changed."""
        fits, ooms = list(self.fits), list(self.ooms)
        for attempt in attempts:
            if attempt.max_size_mb_done is not None:
                measured = (
                    attempt.peak_memory_mb
                    if not attempt.oom_killed
                    and not attempt.interrupted
                    and attempt.peak_memory_mb is not None
                    else None
                )
                need = attempt.memory_limit_mb if measured is None else measured
                fits.append(
                    Fit(
                        size_mb=attempt.max_size_mb_done,
                        need_mb=round(need, 1),
                        record=attempt.largest_done,
                    )
                )
            if attempt.oom_killed and attempt.first_unfinished_size_mb is not None:
                ooms.append(
                    Oom(
                        size_mb=attempt.first_unfinished_size_mb,
                        limit_mb=attempt.memory_limit_mb,
                        record=attempt.first_unfinished,
                    )
                )
        fits = _fit_frontier(fits)
        ooms = _oom_frontier(ooms)
        changed = (fits, ooms) != (self.fits, self.ooms)
        self.fits, self.ooms = fits, ooms
        return changed

    def learn_checkpoint(self, checkpoint: Checkpoint) -> bool:
        return self.learn(checkpoint.attempts)

    def predict(self, policy: MemoryPolicy, size_mb: float) -> int:
        """The limit to start a record of this size at: a rung of the policy's ladder."""
        ladder = policy.ladder()
        oom_limits = [o.limit_mb for o in self.ooms if o.size_mb <= size_mb]
        start = ladder[0]
        if oom_limits:
            start = policy.next_after(max(oom_limits)) or ladder[-1]
        needs = [f.need_mb for f in self.fits if f.size_mb >= size_mb]
        if needs:
            fitted = next((m for m in ladder if m >= math.ceil(min(needs))), ladder[-1])
            start = min(start, fitted)
        return min(start, ladder[-1])


def _fit_frontier(fits: list[Fit]) -> list[Fit]:
    """Fits not dominated by a fit of a record at least as large in no more memory."""
    kept: list[Fit] = []
    # Largest first, and for equal sizes the smallest need first (then one naming its record,
    # as for OOMs): keep each fit that needs less than every larger one kept so far.
    ranked = sorted(
        set(fits), key=lambda f: (-f.size_mb, f.need_mb, f.record is None, f.record or "")
    )
    for fit in ranked:
        if not kept or fit.need_mb < kept[-1].need_mb:
            kept.append(fit)
    return sorted(kept, key=lambda f: f.size_mb)[-MAX_ENTRIES:]


def _oom_frontier(ooms: list[Oom]) -> list[Oom]:
    """OOMs not dominated by an OOM of a record at most as large at no lower limit."""
    kept: list[Oom] = []
    # Of equal ones, the one that names its record (then the first record by name) is kept,
    # so that learning an attempt again changes nothing.
    ranked = sorted(
        set(ooms), key=lambda o: (o.size_mb, -o.limit_mb, o.record is None, o.record or "")
    )
    for oom in ranked:
        if not kept or oom.limit_mb > kept[-1].limit_mb:
            kept.append(oom)
    return kept[:MAX_ENTRIES]


class MemoryHistoryIO(Protocol):
    """Where a hook's history lives (a file, an artifact store); like `CheckpointIO`."""

    def load(self) -> MemoryHistory | None: ...

    def save(self, history: MemoryHistory) -> None: ...


class FileMemoryHistoryIO(JsonModelFile[MemoryHistory]):
    """A history in one JSON file, replaced atomically."""

    model = MemoryHistory


def update_history(io: MemoryHistoryIO, hook: str, attempts: list[AttemptRecord]) -> None:
    """Load, learn, save when changed. Two batches of a hook learning at the same moment may
    lose one's evidence (the last save wins); learning is idempotent, so the next step of
    that batch, which learns from its whole checkpoint, puts it back."""
    with _LEARNING:
        history = io.load() or MemoryHistory(hook=hook)
        if history.learn(attempts):
            io.save(history)
