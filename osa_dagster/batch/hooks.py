"""Running hooks: each hook over a batch through the engine, resuming from the store, and
many of them at once within the machine's capacity."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace

from osa_sdk.types import HookRecord

from osa_dagster.batch import BatchInputError
from osa_dagster.batch.fetch import read_raw_records
from osa_dagster.batch.shards import frozen_shard_plan, merge_shards, shard_checkpoints
from osa_dagster.batch.stores import StoreCheckpointIO, StoreMemoryHistoryIO, UnreadableState
from osa_dagster.conventions.base import Convention
from osa_dagster.engine import (
    AttemptOptions,
    Checkpoint,
    HookBatch,
    HookCapacity,
    HookProgress,
    Runner,
    advance_hook,
)
from osa_dagster.engine.capacity import AdmissionTurn, default_budget_mb, default_slots
from osa_dagster.engine.hook_run import ATTEMPT_DEFAULTS
from osa_dagster.engine.memory_history import MemoryHistory
from osa_dagster.engine.spec import hook_version
from osa_dagster.settings import Settings
from osa_dagster.storage.layout import BatchLayout, memory_history_key
from osa_dagster.storage.store import ArtifactStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SetAside:
    """A checkpoint that could not be read, moved aside: where it went, and the warning."""

    key: str
    message: str


def checkpoint_key(
    convention: Convention, partition: str, hook_name: str, shard: int | None = None
) -> str:
    """Where the hook's current version keeps its checkpoint of the batch (or of a shard)."""
    return BatchLayout(convention.name, partition).checkpoint(
        hook_name, hook_version(convention.hook(hook_name)), shard
    )


def set_aside_unreadable_checkpoint(
    convention: Convention,
    store: ArtifactStore,
    partition: str,
    hook_name: str,
    shard: int | None = None,
) -> SetAside | None:
    """Move the hook's checkpoint of the batch (or of one of its shards) aside if it cannot
    be read, so that the hook runs those records again (publishing is idempotent, so the
    result is the same).

    The file is kept beside the checkpoint for inspection, named in the warning returned."""
    checkpoints = StoreCheckpointIO(store, checkpoint_key(convention, partition, hook_name, shard))
    try:
        checkpoints.load()
    except UnreadableState as error:
        aside = checkpoints.set_aside()
        message = (
            f"batch {partition!r} of convention {convention.name!r}: the checkpoint of hook "
            f"{hook_name!r}{'' if shard is None else f' shard {shard}'} at {error.where} "
            f"cannot be read ({error.cause}); set aside as {store.describe(aside)}, the hook "
            "runs its records again"
        )
        log.warning(message)
        return SetAside(key=aside, message=message)
    return None


def hook_records(convention: Convention, store: ArtifactStore, partition: str) -> list[HookRecord]:
    layout = BatchLayout(convention.name, partition)
    return [HookRecord.from_ingested(r) for r in read_raw_records(store, layout, convention)]


class RecentBatches:
    """The hook records of the last few batches whose shards started, so that a batch's
    shards, which largest_first mostly starts side by side, read its records.jsonl once
    between them. Only `held` batches are kept: a step does not hold its whole range."""

    def __init__(self, convention: Convention, store: ArtifactStore, held: int = 4) -> None:
        self.convention, self.store, self.held = convention, store, held
        self._lock = threading.Lock()
        self._records: OrderedDict[str, list[HookRecord]] = OrderedDict()

    def records(self, partition: str) -> list[HookRecord]:
        with self._lock:
            if partition in self._records:
                self._records.move_to_end(partition)
                return self._records[partition]
        read = hook_records(self.convention, self.store, partition)
        with self._lock:
            self._records[partition] = read
            while len(self._records) > self.held:
                self._records.popitem(last=False)
        return read


def plan_shards(
    convention: Convention,
    store: ArtifactStore,
    partition: str,
    hook_name: str,
    records: list[HookRecord],
    capacity: HookCapacity | None,
) -> list[ShardJob]:
    """The hook's shards of the batch (frozen at its first run: batch/shards.py), as jobs.
    Without a capacity (a cluster packs the attempts) only `shard_size` splits a batch."""
    plan = frozen_shard_plan(
        store,
        BatchLayout(convention.name, partition),
        hook_name,
        hook_version(convention.hook(hook_name)),
        records,
        shard_size=convention.shard_size,
        slots=capacity.slots if capacity is not None else 1,
    )
    sizes: dict[str, float] = {r.id: r.size_mb for r in records}
    job = HookJob(partition, hook_name)
    return [
        ShardJob(
            job,
            key,
            frozenset(ids),
            size_mb=sum(sizes[i] for i in ids),
            # A batch whose every record was skipped at fetch is one empty shard.
            largest_mb=max((sizes[i] for i in ids), default=0.0),
            batch_digest=plan.batch_digest,
        )
        for key, ids in zip(plan.keys(), plan.shards, strict=True)
    ]


def run_shard(
    convention: Convention,
    store: ArtifactStore,
    shard: ShardJob,
    runner: Runner,
    options: AttemptOptions = ATTEMPT_DEFAULTS,
    batch_records: list[HookRecord] | None = None,
) -> HookProgress:
    """Run the hook over one shard of the batch to its end, resuming from the shard's
    checkpoint in the store (see `run_batch_hook`). `batch_records`: the whole batch's, when
    read already (`hook_records`)."""
    hook_name, partition = shard.job.hook, shard.job.partition
    spec = convention.hook(hook_name)
    version = hook_version(spec)
    layout = BatchLayout(convention.name, partition)
    if batch_records is None:
        batch_records = hook_records(convention, store, partition)
    records = [r for r in batch_records if r.id in shard.record_ids]
    checkpoints = StoreCheckpointIO(store, layout.checkpoint(hook_name, version, shard.shard))
    with (
        store.local_dir(
            layout.raw_files, writable=False, only={r.files_dir for r in records}
        ) as files_root,
        store.local_dir(
            layout.hook_workdir(hook_name, version, shard.shard), writable=True
        ) as workdir,
    ):
        return advance_hook(
            spec,
            HookBatch(records=records, files_root=files_root),
            runner,
            checkpoints,
            workdir,
            options,
            history=StoreMemoryHistoryIO(store, memory_history_key(convention.name, hook_name)),
            shard=shard.shard,
        )


def merge_progress(progresses: list[HookProgress], digest: str) -> HookProgress:
    """The progress of a hook over a whole batch from that of each of its shards."""
    return HookProgress(
        checkpoint=merge_shards([p.checkpoint for p in progresses], digest),
        attempts_this_call=[a for p in progresses for a in p.attempts_this_call],
    )


def run_batch_hook(
    convention: Convention,
    hook_name: str,
    store: ArtifactStore,
    partition: str,
    runner: Runner,
    options: AttemptOptions = ATTEMPT_DEFAULTS,
) -> HookProgress:
    """Run one hook over the batch to its end, shard after shard (batch/shards.py; run_hook_jobs
    runs them at once), each resuming from its checkpoint in the store (a checkpoint that
    cannot be read is set aside: see `set_aside_unreadable_checkpoint`).

    `options` are the engine's (osa_dagster.engine.hook_run.AttemptOptions): when the
    checkpoint is saved to the store while the hook runs, the machine's capacity, the
    cancel event and the run. The hook's memory history in the store
    (`memory_history_key`) starts a new batch's large records at the memory their size
    needed before, and learns from this batch's attempts.
    """
    records = hook_records(convention, store, partition)
    shards = plan_shards(convention, store, partition, hook_name, records, options.capacity)
    progresses = []
    for shard in shards:
        set_aside_unreadable_checkpoint(convention, store, partition, hook_name, shard.shard)
        progresses.append(run_shard(convention, store, shard, runner, options, records))
    return merge_progress(progresses, shards[0].batch_digest)


def load_hook_checkpoints(
    convention: Convention, store: ArtifactStore, partition: str
) -> dict[str, Checkpoint]:
    """Every hook's finished checkpoint over the batch by its current version, its shards'
    merged (`merge_shards`); a hook whose current version has not finished the batch is an
    error."""
    layout = BatchLayout(convention.name, partition)
    checkpoints: dict[str, Checkpoint] = {}
    for spec in convention.hooks:
        version = hook_version(spec)
        try:
            plan, shards = shard_checkpoints(store, layout, spec.name, version)
        except UnreadableState as error:
            raise BatchInputError(
                f"batch {partition!r} of convention {convention.name!r}: the state of hook "
                f"{spec.name!r} at {error.where} cannot be read ({error.cause}); materialise "
                "its hook_outcomes again, which sets it aside and runs the hook again"
            ) from None
        finished = [c for c in shards if c is not None and c.complete]
        if len(finished) < len(shards):
            raise BatchInputError(
                f"batch {partition!r} of convention {convention.name!r}: hook {spec.name!r} "
                f"version {version} has not finished it ({len(finished)} of {len(shards)} "
                "shards done); materialise its hook_outcomes first"
            )
        digest = plan.batch_digest if plan is not None else finished[0].batch_digest
        checkpoints[spec.name] = merge_shards(finished, digest)
    return checkpoints


def load_memory_history(
    convention: Convention, store: ArtifactStore, hook_name: str
) -> MemoryHistory | None:
    """The memory-vs-size history that predicts where a hook's large records start."""
    return StoreMemoryHistoryIO(store, memory_history_key(convention.name, hook_name)).load()


def machine_capacity(settings: Settings) -> HookCapacity:
    """The slots and memory budget that every hook attempt on this machine shares."""
    return HookCapacity(
        settings.hook_ledger_path,
        slots=settings.hook_slots or default_slots(),
        budget_mb=settings.hook_memory_budget_mb or default_budget_mb(),
    )


def hook_workers(capacity: HookCapacity | None, jobs: int) -> int:
    """Threads for `jobs` shards of hook jobs: one more than the machine's slots, so that one
    prepares its next attempt while the others run; without a capacity (a cluster packs
    the attempts), one per shard."""
    return min(jobs, capacity.slots + 1) if capacity is not None else jobs


@dataclass(frozen=True)
class HookJob:
    """One hook over one batch: what a step asks for, and what it reports on."""

    partition: str
    hook: str


@dataclass(frozen=True)
class ShardJob:
    """One hook over one shard of a batch: the unit that runs concurrently with others."""

    job: HookJob
    shard: int | None  # its name in the layout (ShardPlan.keys)
    # Ids, not records: a step holds the shards of its whole range until they run, and each
    # reads its records when it starts.
    record_ids: frozenset[str]
    size_mb: float
    largest_mb: float  # its largest record's size
    batch_digest: str  # of the whole batch


@dataclass(frozen=True)
class HookJobResult:
    """A job's end: the progress of the hook over the whole batch once every shard ended."""

    job: HookJob
    progress: HookProgress | None
    error: Exception | None  # what a shard (or reading the batch) raised instead of ending
    set_aside: tuple[SetAside, ...] = ()  # unreadable checkpoints set aside first


@dataclass(frozen=True)
class _ShardEnd:
    shard: ShardJob
    progress: HookProgress | None
    error: Exception | None
    set_aside: SetAside | None


def _run_shard_job(
    convention: Convention,
    store: ArtifactStore,
    runner: Runner,
    shard: ShardJob,
    options: AttemptOptions,
    recent: RecentBatches,
) -> _ShardEnd:
    job = shard.job
    try:
        set_aside = set_aside_unreadable_checkpoint(
            convention, store, job.partition, job.hook, shard.shard
        )
        try:
            records = recent.records(job.partition)
            progress = run_shard(convention, store, shard, runner, options, records)
        except Exception as error:  # the shard's end, reported beside the others'
            return _ShardEnd(shard, None, error, set_aside)
        return _ShardEnd(shard, progress, None, set_aside)
    finally:
        if options.turn is not None:
            options.turn.taken()  # ended, maybe without asking for room: the next may ask


def largest_first(shards: Iterable[ShardJob]) -> list[ShardJob]:
    """The shards of the largest records first, then of the most megabytes, otherwise in
    the order given. A shard lasts at least as long as its largest record (and that
    record's OOM climb), the longest pole of a step; batches are planned smallest records
    first, so in planning order a range's largest batch would start last and then run
    alone while the other slots idle; started first, it runs beside the others."""
    return sorted(shards, key=lambda shard: (-shard.largest_mb, -shard.size_mb))


def _plan_jobs(
    convention: Convention,
    store: ArtifactStore,
    jobs: list[HookJob],
    capacity: HookCapacity | None,
) -> tuple[dict[HookJob, list[ShardJob]], list[HookJobResult]]:
    """Each job's shards, and the jobs whose batch cannot be read (their results). One batch's
    records are read once for all its hooks, and only one batch's at a time."""
    shards: dict[HookJob, list[ShardJob]] = {}
    failed: list[HookJobResult] = []
    for partition in dict.fromkeys(job.partition for job in jobs):
        of_batch = [job for job in jobs if job.partition == partition]
        try:
            records = hook_records(convention, store, partition)
        except BatchInputError as error:
            failed += [HookJobResult(job, None, error) for job in of_batch]
            continue
        for job in of_batch:
            shards[job] = plan_shards(convention, store, partition, job.hook, records, capacity)
    return shards, failed


def run_hook_jobs(
    convention: Convention,
    store: ArtifactStore,
    runner: Runner,
    jobs: Iterable[HookJob],
    *,
    capacity: HookCapacity | None,
    run_id: str | None = None,
) -> Iterator[HookJobResult]:
    """Run every job to its end (the whole memory ladder of each of its shards) in threads
    (`hook_workers`), yielding each job's result once all its shards have ended (a job whose batch
    cannot be read, at once). The hooks of a batch depend only on its raw records, the
    batches of a range on nothing of each other, and a batch's shards on nothing of each
    other, so any order is right; attempts start when `capacity` has room (without one, as
    the workers allow: a cluster packs them).

    Threads suffice: each waits on a hook process or container. Each shard keeps its own
    checkpoint and attempt log, so what it leaves is the same whatever ran beside it. A
    shard that fails stops no other (its job's result carries its error). A checkpoint that
    cannot be read is set aside first (`set_aside_unreadable_checkpoint`), as a lone run of
    the hook does. Closing the iterator early (the run was terminated) cancels the jobs:
    running hooks are killed, their checkpoints keep what they did, and it returns when
    every thread has stopped. Shards start largest first (`largest_first`): with a capacity,
    each shard's first attempt asks for room only after the shards before it were admitted
    (`AdmissionTurn`), whichever thread is quicker to ask. Their attempts record `run_id`.
    """
    shards, failed = _plan_jobs(convention, store, list(jobs), capacity)
    todo = largest_first(s for job_shards in shards.values() for s in job_shards)
    cancel = threading.Event()
    options = AttemptOptions(capacity=capacity, cancel=cancel, run_id=run_id)
    turns = AdmissionTurn.in_order(len(todo)) if capacity is not None else [None] * len(todo)
    pool = ThreadPoolExecutor(
        max_workers=max(1, hook_workers(capacity, len(todo))), thread_name_prefix="osa-hooks"
    )
    ended: dict[HookJob, list[_ShardEnd]] = {job: [] for job in shards}
    recent = RecentBatches(convention, store)
    try:
        futures = [
            pool.submit(
                _run_shard_job, convention, store, runner, s, replace(options, turn=turn), recent
            )
            for s, turn in zip(todo, turns, strict=True)
        ]
        yield from failed  # the others run meanwhile
        for future in as_completed(futures):
            end = future.result()  # a shard's exception is in its result; others end the step
            job = end.shard.job
            ended[job].append(end)
            if len(ended[job]) == len(shards[job]):
                yield _job_result(job, sorted(ended.pop(job), key=lambda e: e.shard.shard or 0))
    finally:
        cancel.set()
        pool.shutdown(wait=True, cancel_futures=True)


def _job_result(job: HookJob, ends: list[_ShardEnd]) -> HookJobResult:
    set_aside = tuple(e.set_aside for e in ends if e.set_aside is not None)
    errors = [e.error for e in ends if e.error is not None]
    if errors:
        return HookJobResult(job, None, errors[0], set_aside)
    progresses = [e.progress for e in ends if e.progress is not None]
    return HookJobResult(
        job, merge_progress(progresses, ends[0].shard.batch_digest), None, set_aside
    )
