"""Run one hook over one batch: attempts, memory escalation on OOM, and the checkpoint.

`run_hook` runs the hook until every record of the batch has an outcome, climbing the
memory ladder as far as it must in one call, so that an OOM holds back no other hook or
batch; `advance_hook` does the same and also tells which attempts the call made.

While an attempt runs, its output is read every POLL_S and the checkpoint is saved when
`checkpoint_every_records` new outcomes have arrived since the last save, or when
`checkpoint_every_s` has passed since the last save and some new outcome has arrived; it is
always saved when an attempt starts and ends. Outcomes not yet saved when the orchestrator
dies are redone by the next run wherever the hook's working files are lost with it (a
remote store): the two settings bound that loss, in records and in seconds of work.

The defaults (1 record, 1 s) save every outcome at the first poll that sees it, so at most
about POLL_S of hook work is redone after a crash, for at most 1 / POLL_S saves a second;
with records taking ~0.1 s to minutes that is one small PUT per record on S3. A hook that
settles many records a second over large batches (every save rewrites the whole
checkpoint) can raise both, e.g. 100 records or 10 s.

Every save rewrites the whole checkpoint, so its cost grows with the batch: at 5,000 records
a save is ~60 ms, and saving at every poll would cost a share of the orchestrator that grows
with the square of the batch size. So, whatever the two settings say, the next save while an
attempt runs waits at least SAVE_SPACING times as long as the last save took: saves take at
most about 1 / SAVE_SPACING of the watching thread's time, and the work a crash can redo grows
to SAVE_SPACING times a save (~1.2 s at 5,000 records), never more.

Poison records. Records run smallest first, so when an attempt at the top of the ladder (the
cap) is OOM-killed, the record it was on (`AttemptRecord.first_unfinished`) is the suspect.
The next attempt runs the suspect alone at the cap: if it runs out of memory alone it is
errored as poison ("poison: OOM alone at N MB", with its size and the peak seen), otherwise it
gets its real outcome; either way the records after it then go on at the cap, and the next
OOM there names the next suspect. Nothing settled runs twice. A poison outcome is reopened by
a later run whose ladder now goes above the limit it failed at (its cap was raised), starting
at the next rung above it.

Size-aware starting memory (lanes). Given a `MemoryHistoryIO`, a new batch's checkpoint
records, for each record whose size the hook's history (engine/memory_history.py) says needs
more than the base, the rung to start it at (`Checkpoint.lanes`). A record's level is then
the larger of the main ladder's limit (`next_memory_mb`) and its lane, and each attempt runs
the pending records of the lowest level (smallest records first, as before): the small
records from the base, then each group of large records in its own attempt at its predicted
rung (`AttemptRecord.lane == "large"`). An OOM raises the limit of the records that attempt
left (the main ladder's, or their lane's) to the next rung, and once the main ladder reaches a
lane's rung their records run together. Isolation at the cap is the same in every lane.
Since the lowest level runs first and a climb leaves nothing at the level it left, every
climb raises the lowest pending level: a batch still climbs at most len(ladder) - 1 times.
Without a history (or with an empty one) nothing is in a lane and the engine behaves as
plain doubling. The history learns from the whole checkpoint
at the end of every call (idempotently), so later batches start from what this one saw.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from osa_sdk.contract import (
    BYTES_PER_MB,
    CONFIG_FILE,
    ENV_FILES,
    ENV_HOOK_NAME,
    ENV_IN,
    ENV_MEMORY_LIMIT_MB,
    ENV_OUT,
    RECORDS_FILE,
)
from osa_sdk.types import HookRecord, OutcomeStatus

from osa_dagster.engine.capacity import AdmissionTurn, Cancelled, HookCapacity
from osa_dagster.engine.checkpoint import (
    Anomaly,
    AttemptRecord,
    Checkpoint,
    CheckpointIO,
    InFlightAttempt,
    RecordOutcome,
)
from osa_dagster.engine.memory_history import MemoryHistoryIO, update_history
from osa_dagster.engine.outputs import OutputReader, harvest
from osa_dagster.engine.runners.base import (
    AttemptExit,
    Invocation,
    Runner,
    RunningAttempt,
    read_tail,
)
from osa_dagster.engine.spec import HookSpec, hook_version

log = logging.getLogger(__name__)

_REASON_TAIL_CHARS = 500
# How often a running attempt's output is read: short, so that an outcome is saved soon after
# it appears. A read is a seek and a read per output file.
POLL_S = 0.1
# How much longer than a save lasts the next save during an attempt waits (see above).
SAVE_SPACING = 20
LARGE_LANE = "large"


@dataclass(frozen=True)
class HookBatch:
    records: list[HookRecord]
    files_root: Path
    ids: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        ids = frozenset(record.id for record in self.records)
        if len(ids) != len(self.records):
            raise ValueError("a batch lists some record id twice")
        object.__setattr__(self, "ids", ids)

    def digest(self) -> str:
        return batch_digest(self.records)


def batch_digest(records: Sequence[HookRecord]) -> str:
    """Identifies a batch's membership and files, whatever the order of its records."""
    identity = sorted((r.id, r.files_dir, r.size_mb) for r in records)
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()


@dataclass(frozen=True)
class HookProgress:
    checkpoint: Checkpoint  # complete: every record has an outcome
    attempts_this_call: list[AttemptRecord]
    """Attempts recorded by this call, so a caller can report each exactly once."""


@dataclass(frozen=True)
class AttemptOptions:
    """How a chain of attempts runs, whatever records it takes: set by the caller (a step,
    a deposit, a test) and passed down as one.

    `checkpoint_every_s` and `checkpoint_every_records` say when the checkpoint is saved
    while an attempt runs (see the module doc). With `capacity`, each attempt first waits
    for a slot and room for its memory limit in the machine's budget (engine/capacity.py)
    and holds them until its hook has exited; with a `turn` too, the chain's first attempt
    asks for them only after the chains before it in that order were admitted. Setting
    `cancel` (from another thread) kills the running hook and raises `Cancelled`; the
    checkpoint keeps what was done. `run_id` (the orchestrator's run) is recorded on each
    attempt (`AttemptRecord.run_id`).
    """

    checkpoint_every_s: float = 1.0
    checkpoint_every_records: int = 1
    capacity: HookCapacity | None = None
    cancel: threading.Event | None = None
    run_id: str | None = None
    turn: AdmissionTurn | None = None

    def __post_init__(self) -> None:
        if self.checkpoint_every_records < 1 or self.checkpoint_every_s <= 0:
            raise ValueError(
                "checkpoint_every_records must be at least 1 and checkpoint_every_s positive, "
                f"not {self.checkpoint_every_records} and {self.checkpoint_every_s}"
            )


# Frozen, so one object serves as every default.
ATTEMPT_DEFAULTS = AttemptOptions()


def run_hook(
    spec: HookSpec,
    batch: HookBatch,
    runner: Runner,
    checkpoints: CheckpointIO,
    workdir: Path,
    options: AttemptOptions = ATTEMPT_DEFAULTS,
    *,
    history: MemoryHistoryIO | None = None,
) -> Checkpoint:
    """Run the hook until every record of the batch has an outcome (see advance_hook)."""
    progress = advance_hook(spec, batch, runner, checkpoints, workdir, options, history=history)
    return progress.checkpoint


def advance_hook(
    spec: HookSpec,
    batch: HookBatch,
    runner: Runner,
    checkpoints: CheckpointIO,
    workdir: Path,
    options: AttemptOptions = ATTEMPT_DEFAULTS,
    *,
    history: MemoryHistoryIO | None = None,
    shard: int | None = None,
) -> HookProgress:
    """Run attempts of the hook, up its memory ladder, until every record of the batch has
    an outcome; the checkpoint, and the attempts of this call (resuming a checkpoint, the
    attempts of earlier calls are in it too).

    `options` are explained in AttemptOptions, and `history` in the module doc: starting
    large records at the memory their size is known to need. `shard`, the part of a split
    batch that `batch` is, is recorded on each attempt this call makes
    (`AttemptRecord.shard`).
    """
    run = _HookRun(spec, batch, runner, checkpoints, workdir, options, history, shard)
    known_attempts = len(run.checkpoint.attempts)

    if run.checkpoint.running is not None:
        run.recover_interrupted()
    while pending := run.pending():
        todo, memory, lane = run.next_records(pending)
        run.settle(todo, run.attempt(todo, memory, lane))
    run.checkpoint.complete = True
    checkpoints.save(run.checkpoint)
    if history is not None:
        update_history(history, spec.name, run.checkpoint.attempts)
    return HookProgress(run.checkpoint, run.checkpoint.attempts[known_attempts:])


class _HookRun:
    def __init__(
        self,
        spec: HookSpec,
        batch: HookBatch,
        runner: Runner,
        checkpoints: CheckpointIO,
        workdir: Path,
        options: AttemptOptions,
        history: MemoryHistoryIO | None,
        shard: int | None,
    ) -> None:
        self.spec = spec
        self.options = options
        self.shard = shard
        # How the log names this run of the hook: its shard too, when the batch is split.
        self.label = spec.name if shard is None else f"{spec.name} (shard {shard})"
        self.batch = batch
        self.history = history
        self.sizes: dict[str, float] = {r.id: r.size_mb for r in batch.records}
        self.runner = runner
        self.checkpoints = checkpoints
        self.workdir = workdir
        self.poll_s = min(POLL_S, options.checkpoint_every_s)
        self.last_save_s = 0.0  # how long the latest save took
        self.checkpoint = self._open_checkpoint()
        self.refused: str | None = None  # why the last attempt's output was refused

    def _open_checkpoint(self) -> Checkpoint:
        """This batch's checkpoint, reopened for what a new run must do again; or a new one."""
        stored = self._stored_checkpoint()
        if stored is None:
            return Checkpoint(
                hook=self.spec.name,
                batch_digest=self.batch.digest(),
                hook_version=hook_version(self.spec),
                next_memory_mb=self.spec.memory.base_mb,
                lanes=self._plan_lanes(),
            )
        raised = self._poison_below_the_cap(stored)
        if stored.complete:
            self._reopen_finished(stored, raised)
        else:
            for record_id in raised:
                del stored.outcomes[record_id]
        return stored

    def _stored_checkpoint(self) -> Checkpoint | None:
        """The stored checkpoint if it is this version of this hook's over this very batch."""
        digest, version = self.batch.digest(), hook_version(self.spec)
        stored = self.checkpoints.load()
        if stored is not None and (stored.hook, stored.hook_version, stored.batch_digest) != (
            self.spec.name,
            version,
            digest,
        ):
            log.warning(
                "discarding the checkpoint of hook %s %s, batch %s: this is hook %s %s, batch %s",
                stored.hook,
                stored.hook_version,
                stored.batch_digest[:12],
                self.spec.name,
                version,
                digest[:12],
            )
            return None
        return stored

    def _poison_below_the_cap(self, stored: Checkpoint) -> dict[str, RecordOutcome]:
        """Poison records whose cap has since been raised: they get another chance."""
        policy = self.spec.memory
        raised = {
            record_id: outcome
            for record_id, outcome in stored.outcomes.items()
            if outcome.poison and policy.next_after(outcome.memory_limit_mb) is not None
        }
        if raised:
            log.info(
                "hook %s: the memory cap is now %d MB; reopening %d poison records",
                self.label,
                policy.cap_mb,
                len(raised),
            )
        return raised

    def _reopen_finished(self, stored: Checkpoint, raised: dict[str, RecordOutcome]) -> None:
        """A new run of a finished batch: transient failures get another chance from the
        bottom of the ladder, and reopened poison alone skips the rungs it is known to fail."""
        policy = self.spec.memory
        retried = {
            record_id
            for record_id, outcome in stored.outcomes.items()
            if outcome.status is OutcomeStatus.ERRORED and outcome.retryable
        }
        stored.outcomes = {
            record_id: outcome
            for record_id, outcome in stored.outcomes.items()
            if record_id not in retried and record_id not in raised
        }
        stored.next_memory_mb = (
            policy.base_mb
            if retried or not raised
            else min(policy.next_after(o.memory_limit_mb) or policy.cap_mb for o in raised.values())
        )
        stored.complete = False

    def _plan_lanes(self) -> dict[str, int]:
        """The records that the hook's history says to start above the base, and where."""
        history = self.history.load() if self.history is not None else None
        if history is None:
            return {}
        policy = self.spec.memory
        lanes: dict[str, int] = {
            r.id: start
            for r in self.batch.records
            if (start := history.predict(policy, r.size_mb)) > policy.base_mb
        }
        if lanes:
            log.info(
                "hook %s: %d records start above the base, at %s MB, from the memory history",
                self.label,
                len(lanes),
                sorted(set(lanes.values())),
            )
        return lanes

    def level(self, record: HookRecord) -> int:
        """The limit a pending record runs at next: the main ladder's, or its lane's."""
        return max(self.checkpoint.next_memory_mb, self.checkpoint.lanes.get(record.id, 0))

    def pending(self) -> list[HookRecord]:
        """Records without an outcome, smallest first, so an OOM costs as little as possible."""
        left = [r for r in self.batch.records if r.id not in self.checkpoint.outcomes]
        return sorted(left, key=lambda r: (r.size_mb, r.id))

    def next_records(self, pending: list[HookRecord]) -> tuple[list[HookRecord], int, str | None]:
        """What the next attempt runs, at which limit, in which lane: the suspect alone when
        there is one, else every pending record of the lowest level."""
        suspect = [r for r in pending if r.id == self.checkpoint.suspect]
        if not suspect:
            self.checkpoint.suspect = None  # settled meanwhile (an interrupted lone attempt)
        lowest = min(self.level(r) for r in suspect or pending)
        todo = suspect or [r for r in pending if self.level(r) == lowest]
        return todo, lowest, LARGE_LANE if lowest > self.checkpoint.next_memory_mb else None

    def _isolations_at(self, limit_mb: int) -> int:
        return sum(
            1 for a in self.checkpoint.attempts if a.isolation and a.memory_limit_mb == limit_mb
        )

    def _attempt_dir(self, number: int) -> Path:
        return self.workdir / f"attempt-{number}"

    def recover_interrupted(self) -> None:
        """Close the attempt that was running when the orchestrator died; keep its outcomes."""
        flight = self.checkpoint.running
        assert flight is not None
        log.warning(
            "hook %s: attempt %d was interrupted, harvesting its output",
            self.label,
            flight.number,
        )
        self.runner.kill_leftovers(flight.marker)
        attempt_dir = self._attempt_dir(flight.number)
        if (attempt_dir / "out").is_dir():
            self._harvest(self._reader(attempt_dir / "out", flight.offsets), flight)
        self._close_attempt(
            flight, None, read_tail(attempt_dir / "hook.log"), first_unfinished=None
        )
        self._save()

    def attempt(self, pending: list[HookRecord], memory: int, lane: str | None) -> AttemptExit:
        """One attempt over these records, checkpointing outcomes as they appear; with a
        capacity, once a slot and its memory are free."""
        capacity, turn = self.options.capacity, self.options.turn
        if capacity is None:
            return self._attempt(pending, memory, lane, queued_s=None)
        label = f"hook {self.label} attempt {len(self.checkpoint.attempts) + 1}"
        if turn is not None:
            turn.wait(self.options.cancel, label)
        with capacity.admit(memory, label, self.options.cancel) as admission:
            if turn is not None:
                turn.taken()
            return self._attempt(pending, memory, lane, queued_s=admission.queued_s)

    def _attempt(
        self, pending: list[HookRecord], memory: int, lane: str | None, queued_s: float | None
    ) -> AttemptExit:
        number = len(self.checkpoint.attempts) + 1
        invocation = self._prepare(number, pending, memory)
        log.info(
            "hook %s: attempt %d, %d records at %d MB%s",
            self.label,
            number,
            len(pending),
            memory,
            f" ({lane} lane)" if lane else "",
        )
        started_at, started = datetime.now(UTC), time.monotonic()
        running = self.runner.start(invocation)
        flight = InFlightAttempt(
            number=number,
            memory_limit_mb=memory,
            records_in=len(pending),
            started_at=started_at,
            marker=running.marker,
            isolation=self.checkpoint.suspect is not None,
            lane=lane,
            queued_s=queued_s,
            run_id=self.options.run_id,
            shard=self.shard,
        )
        self.checkpoint.running = flight
        # Saved before waiting: if we die now, the next run finds and kills the hook.
        self._save()
        exit_ = self._watch(running, flight, self._reader(invocation.out_dir, flight.offsets))
        first_unfinished = next(
            (r.id for r in pending if r.id not in self.checkpoint.outcomes), None
        )
        self._close_attempt(
            flight, exit_, exit_.stderr_tail, first_unfinished, time.monotonic() - started
        )
        return exit_

    def _prepare(self, number: int, pending: list[HookRecord], memory: int) -> Invocation:
        """The attempt's folders, its input files and how the runner starts it."""
        attempt_dir = self._attempt_dir(number)
        # Left over from a discarded checkpoint, whose attempts were numbered from 1 too.
        shutil.rmtree(attempt_dir, ignore_errors=True)
        in_dir, out_dir = attempt_dir / "in", attempt_dir / "out"
        in_dir.mkdir(parents=True)
        out_dir.mkdir()
        (in_dir / RECORDS_FILE).write_text("".join(r.model_dump_json() + "\n" for r in pending))
        (in_dir / CONFIG_FILE).write_text(json.dumps(self.spec.config))
        return Invocation(
            command=self.spec.command,
            env={
                ENV_IN: str(in_dir),
                ENV_OUT: str(out_dir),
                ENV_FILES: str(self.batch.files_root),
                ENV_HOOK_NAME: self.spec.name,
                ENV_MEMORY_LIMIT_MB: str(memory),
            },
            in_dir=in_dir,
            out_dir=out_dir,
            files_root=self.batch.files_root,
            memory_limit_mb=memory,
            timeout_s=self.spec.timeout_s,
            log_path=attempt_dir / "hook.log",
            image=self.spec.image,
            network=self.spec.network,
        )

    def _save(self) -> None:
        started = time.monotonic()
        self.checkpoints.save(self.checkpoint)
        self.last_save_s = time.monotonic() - started

    def _watch(
        self, running: RunningAttempt, flight: InFlightAttempt, reader: OutputReader
    ) -> AttemptExit:
        """Wait for the attempt's end, merging its outcomes and saving them on schedule."""
        saved_at, unsaved = time.monotonic(), 0
        try:
            while (exit_ := running.wait(self.poll_s)) is None:
                if self.options.cancel is not None and self.options.cancel.is_set():
                    raise Cancelled(f"hook {self.label}: attempt {flight.number} was cancelled")
                unsaved += self._harvest(reader, flight)
                if reader.refused is not None:
                    # The output cannot be trusted any further: nothing the hook does next counts.
                    running.kill()
                since_save_s = time.monotonic() - saved_at
                if (
                    unsaved
                    and since_save_s >= SAVE_SPACING * self.last_save_s
                    and (
                        unsaved >= self.options.checkpoint_every_records
                        or since_save_s >= self.options.checkpoint_every_s
                    )
                ):
                    self._save()
                    saved_at, unsaved = time.monotonic(), 0
        except BaseException:
            # Cancelled (KeyboardInterrupt, a run termination): the hook must not outlive us.
            running.kill()
            running.wait(self.poll_s)
            raise
        self._harvest(reader, flight)
        self.refused = reader.refused
        return exit_

    def _reader(self, out_dir: Path, offsets: dict[str, int]) -> OutputReader:
        held = [o.features for o in self.checkpoint.outcomes.values() if o.features]
        return OutputReader(
            out_dir,
            offsets,
            max_output_bytes=int(self.spec.max_output_mb * BYTES_PER_MB),
            held_features=(sum(map(len, held)), sum(len(json.dumps(rows)) for rows in held)),
        )

    def _harvest(self, reader: OutputReader, flight: InFlightAttempt) -> int:
        """Merge the attempt's new output; returns how many records it settled."""
        settled = len(self.checkpoint.outcomes)
        harvest(
            self.checkpoint,
            reader,
            self.batch.ids,
            attempt=flight.number,
            memory_limit_mb=flight.memory_limit_mb,
        )
        return len(self.checkpoint.outcomes) - settled

    def _close_attempt(
        self,
        flight: InFlightAttempt,
        exit_: AttemptExit | None,
        stderr_tail: str,
        first_unfinished: str | None,
        duration_s: float | None = None,
    ) -> None:
        """Log the attempt (`exit_` None: interrupted, its end unknown) and clear `running`."""
        settled = [rid for rid, o in self.checkpoint.outcomes.items() if o.attempt == flight.number]
        largest = max(settled, key=lambda rid: (self.sizes[rid], rid), default=None)
        oom = exit_ is not None and exit_.out_of_memory
        self.checkpoint.attempts.append(
            AttemptRecord(
                number=flight.number,
                memory_limit_mb=flight.memory_limit_mb,
                peak_memory_mb=exit_.peak_memory_mb if exit_ else None,
                returncode=exit_.returncode if exit_ else None,
                oom_killed=exit_.out_of_memory if exit_ else False,
                timed_out=exit_.timed_out if exit_ else False,
                interrupted=exit_ is None,
                records_in=flight.records_in,
                records_done=len(settled),
                first_unfinished=first_unfinished if oom else None,
                duration_s=duration_s,
                started_at=flight.started_at,
                stderr_tail=stderr_tail,
                limit_mode=flight.marker.limit_mode,
                isolation=flight.isolation,
                lane=flight.lane,
                queued_s=flight.queued_s,
                max_size_mb_done=None if largest is None else self.sizes[largest],
                largest_done=largest,
                first_unfinished_size_mb=(
                    self.sizes.get(first_unfinished) if oom and first_unfinished else None
                ),
                run_id=flight.run_id,
                shard=flight.shard,
            )
        )
        self.checkpoint.running = None

    def settle(self, todo: list[HookRecord], exit_: AttemptExit) -> None:
        """Decide what the records the attempt left unsettled become: after an OOM below the
        top of the ladder, the next rung's; save."""
        self.checkpoint.suspect = None  # a lone attempt, whatever its end, has had its say
        left = [r for r in todo if r.id not in self.checkpoint.outcomes]
        left_ids = [r.id for r in left]
        attempt = self.checkpoint.attempts[-1]
        limit = attempt.memory_limit_mb
        if self.refused is not None:
            self.checkpoint.note(Anomaly.REFUSED_OUTPUT)
            self._error(left_ids, f"output refused: {self.refused}", retryable=False)
        elif exit_.out_of_memory and left:
            next_memory = self.spec.memory.next_after(limit)
            if next_memory is not None:
                log.warning(
                    "hook %s: out of memory at %d MB on %s%s; %d records left for %d MB",
                    self.label,
                    limit,
                    left_ids[0],
                    f" ({attempt.lane} lane)" if attempt.lane else "",
                    len(left),
                    next_memory,
                )
                if attempt.lane is None:
                    self.checkpoint.next_memory_mb = next_memory
                else:
                    self.checkpoint.lanes.update(dict.fromkeys(left_ids, next_memory))
                self._save()
                return
            self._out_of_memory_at_cap(left)
        elif exit_.failure is not None:
            self._error(
                left_ids, f"{exit_.failure}: the platform ended the attempt", retryable=True
            )
        elif exit_.timed_out:
            self._error(left_ids, f"timed out after {self.spec.timeout_s:g} s", retryable=True)
        elif exit_.returncode < 0:
            self._error(
                left_ids,
                f"hook killed by {_signal_name(-exit_.returncode)} (not an OOM)",
                retryable=True,
            )
        elif exit_.returncode != 0:
            tail = exit_.stderr_tail.strip()[-_REASON_TAIL_CHARS:]
            self._error(
                left_ids, f"hook exited with code {exit_.returncode}: {tail}", retryable=False
            )
        elif left:
            self.checkpoint.note(Anomaly.NO_OUTCOME, len(left))
            self._error(
                left_ids, "no outcome: the hook exited 0 without writing one", retryable=False
            )
        self._save()

    def _out_of_memory_at_cap(self, left: list[HookRecord]) -> None:
        """An OOM at the top of the ladder: poison if alone, else isolate the suspect."""
        attempt = self.checkpoint.attempts[-1]
        limit = attempt.memory_limit_mb
        policy = self.spec.memory
        if policy.isolate_poison and attempt.records_in == 1:
            [record] = left
            log.warning(
                "hook %s: record %s is poison: out of memory alone at %d MB (%.1f MB of files)",
                self.label,
                record.id,
                limit,
                record.size_mb,
            )
            self.checkpoint.outcomes[record.id] = RecordOutcome(
                status=OutcomeStatus.ERRORED,
                reason=f"poison: OOM alone at {limit} MB",
                retryable=False,
                attempt=attempt.number,
                memory_limit_mb=limit,
                poison=True,
                size_mb=record.size_mb,
                peak_memory_mb=attempt.peak_memory_mb,
            )
        elif policy.isolate_poison and self._isolations_at(limit) < policy.max_isolation_attempts:
            self.checkpoint.suspect = attempt.first_unfinished
            log.warning(
                "hook %s: out of memory at the cap, %d MB, on %s: running it alone",
                self.label,
                limit,
                attempt.first_unfinished,
            )
        else:
            self._error([r.id for r in left], f"OOM at {limit} MB", retryable=False)

    def _error(self, record_ids: Sequence[str], reason: str, *, retryable: bool) -> None:
        attempt = self.checkpoint.attempts[-1]
        for record_id in record_ids:
            self.checkpoint.outcomes[record_id] = RecordOutcome(
                status=OutcomeStatus.ERRORED,
                reason=reason,
                retryable=retryable,
                attempt=attempt.number,
                memory_limit_mb=attempt.memory_limit_mb,
            )


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
