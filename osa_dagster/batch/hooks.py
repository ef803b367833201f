"""Running hooks: each hook over a batch through the engine, resuming from the store, and
many of them at once within the machine's capacity."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from osa_sdk.types import HookRecord

from osa_dagster.batch import BatchInputError
from osa_dagster.batch.fetch import read_raw_records
from osa_dagster.batch.stores import StoreCheckpointIO, StoreMemoryHistoryIO, UnreadableState
from osa_dagster.conventions.base import Convention
from osa_dagster.engine import (
    Checkpoint,
    HookBatch,
    HookCapacity,
    HookProgress,
    Runner,
    advance_hook,
)
from osa_dagster.engine.capacity import default_budget_mb, default_slots
from osa_dagster.engine.memory_history import MemoryHistory
from osa_dagster.settings import Settings
from osa_dagster.storage.layout import BatchLayout, memory_history_key
from osa_dagster.storage.store import ArtifactStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SetAside:
    """A checkpoint that could not be read, moved aside: where it went, and the warning."""

    key: str
    message: str


def set_aside_unreadable_checkpoint(
    convention: Convention, store: ArtifactStore, partition: str, hook_name: str
) -> SetAside | None:
    """Move the hook's checkpoint of the batch aside if it cannot be read, so that the hook
    runs the batch's records again (publishing is idempotent, so the result is the same).

    The file is kept beside the checkpoint for inspection, named in the warning returned."""
    checkpoints = StoreCheckpointIO(
        store, BatchLayout(convention.name, partition).checkpoint(hook_name)
    )
    try:
        checkpoints.load()
    except UnreadableState as error:
        aside = checkpoints.set_aside()
        message = (
            f"batch {partition!r} of convention {convention.name!r}: the checkpoint of hook "
            f"{hook_name!r} at {error.where} cannot be read ({error.cause}); set aside as "
            f"{store.describe(aside)}, the hook runs the batch's records again"
        )
        log.warning(message)
        return SetAside(key=aside, message=message)
    return None


def run_batch_hook(
    convention: Convention,
    hook_name: str,
    store: ArtifactStore,
    partition: str,
    runner: Runner,
    *,
    checkpoint_every_s: float = 1.0,
    checkpoint_every_records: int = 1,
    predict_memory: bool = True,
    capacity: HookCapacity | None = None,
    cancel: threading.Event | None = None,
    run_id: str | None = None,
) -> HookProgress:
    """Run one hook over the batch to its end, resuming from its checkpoint in the store (a
    checkpoint that cannot be read is set aside: see `set_aside_unreadable_checkpoint`).

    The checkpoint is saved to the store while the hook runs, after `checkpoint_every_records`
    new outcomes or `checkpoint_every_s` seconds (see osa_dagster.engine.hook_run). With
    `predict_memory`, the hook's memory history in the store (`memory_history_key`) starts
    a new batch's large records at the memory their size needed before, and learns from
    this batch's attempts; without it, the ladder starts every record at the base.
    `capacity`, `cancel` and `run_id` are the engine's (osa_dagster.engine.hook_run.advance_hook).
    """
    spec = convention.hook(hook_name)
    layout = BatchLayout(convention.name, partition)
    records = [HookRecord.from_ingested(r) for r in read_raw_records(store, layout, convention)]
    set_aside_unreadable_checkpoint(convention, store, partition, hook_name)
    checkpoints = StoreCheckpointIO(store, layout.checkpoint(hook_name))
    with (
        store.local_dir(layout.raw_files, writable=False) as files_root,
        store.local_dir(layout.hook_workdir(hook_name), writable=True) as workdir,
    ):
        return advance_hook(
            spec,
            HookBatch(records=records, files_root=files_root),
            runner,
            checkpoints,
            workdir,
            checkpoint_every_s=checkpoint_every_s,
            checkpoint_every_records=checkpoint_every_records,
            history=StoreMemoryHistoryIO(store, memory_history_key(convention.name, hook_name))
            if predict_memory
            else None,
            capacity=capacity,
            cancel=cancel,
            run_id=run_id,
        )


def load_hook_checkpoints(
    convention: Convention, store: ArtifactStore, partition: str
) -> dict[str, Checkpoint]:
    """Every hook's finished checkpoint; a hook that has not finished the batch is an error."""
    layout = BatchLayout(convention.name, partition)
    checkpoints: dict[str, Checkpoint] = {}
    for spec in convention.hooks:
        try:
            checkpoint = StoreCheckpointIO(store, layout.checkpoint(spec.name)).load()
        except UnreadableState as error:
            raise BatchInputError(
                f"batch {partition!r} of convention {convention.name!r}: the checkpoint of hook "
                f"{spec.name!r} at {error.where} cannot be read ({error.cause}); materialise "
                "its hook_outcomes again, which sets it aside and runs the hook again"
            ) from None
        if checkpoint is None or not checkpoint.complete:
            raise BatchInputError(
                f"batch {partition!r} of convention {convention.name!r}: hook {spec.name!r} "
                "has not finished it; materialise its hook_outcomes first"
            )
        checkpoints[spec.name] = checkpoint
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
    """Threads for `jobs` hook jobs: one more than the machine's slots, so that a job
    prepares its next attempt while the others run; without a capacity (a cluster packs
    the attempts), one per job."""
    return min(jobs, capacity.slots + 1) if capacity is not None else jobs


@dataclass(frozen=True)
class HookJob:
    """One hook over one batch: the unit that runs concurrently with others."""

    partition: str
    hook: str


@dataclass(frozen=True)
class HookJobResult:
    job: HookJob
    progress: HookProgress | None
    error: Exception | None  # what the job raised instead of ending
    set_aside: SetAside | None = None  # the unreadable checkpoint it set aside first


def _run_job(
    convention: Convention,
    store: ArtifactStore,
    runner: Runner,
    job: HookJob,
    capacity: HookCapacity | None,
    cancel: threading.Event,
    run_id: str | None,
) -> HookJobResult:
    set_aside = set_aside_unreadable_checkpoint(convention, store, job.partition, job.hook)
    try:
        progress = run_batch_hook(
            convention,
            job.hook,
            store,
            job.partition,
            runner,
            capacity=capacity,
            cancel=cancel,
            run_id=run_id,
        )
    except Exception as error:  # the job's end, reported beside the others'
        return HookJobResult(job, None, error, set_aside)
    return HookJobResult(job, progress, None, set_aside)


def largest_first(
    convention: Convention, store: ArtifactStore, jobs: Iterable[HookJob]
) -> list[HookJob]:
    """The jobs of the largest batches (in megabytes of records) first, each batch's hooks in
    their order. Batches are planned smallest records first, so in planning order a range's
    largest batch, the longest to work, would start last and then run alone while the other
    slots idle; started first, it runs beside the others."""
    jobs = list(jobs)
    sizes: dict[str, float] = {}
    for partition in dict.fromkeys(job.partition for job in jobs):
        try:
            records = read_raw_records(store, BatchLayout(convention.name, partition))
        except BatchInputError:
            records = []  # the job itself will say what is wrong with the batch
        sizes[partition] = sum(record.size_mb for record in records)
    return sorted(jobs, key=lambda job: -sizes[job.partition])


def run_hook_jobs(
    convention: Convention,
    store: ArtifactStore,
    runner: Runner,
    jobs: Iterable[HookJob],
    *,
    workers: int,
    capacity: HookCapacity | None,
    run_id: str | None = None,
) -> Iterator[HookJobResult]:
    """Run every job to its end (the whole memory ladder) in `workers` threads, yielding
    each result as it ends. The hooks of a batch depend only on its raw records, and the
    batches of a range on nothing of each other, so any order is right; attempts start
    when `capacity` has room (without one, as the workers allow: a cluster packs them).

    Threads suffice: each waits on a hook process or container. Each job keeps its own
    checkpoint and attempt log, so what it leaves is the same whatever ran beside it. A
    job that fails does not stop the others. A checkpoint that cannot be read is set aside
    first (`set_aside_unreadable_checkpoint`), as a lone run of the hook does. Closing the
    iterator early (the run was terminated) cancels the jobs: running hooks are killed,
    their checkpoints keep what they did, and it returns when every thread has stopped.
    Jobs start largest batch first (`largest_first`). Their attempts record `run_id`.
    """
    cancel = threading.Event()
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="osa-hooks")
    try:
        futures = [
            pool.submit(_run_job, convention, store, runner, job, capacity, cancel, run_id)
            for job in largest_first(convention, store, jobs)
        ]
        for future in as_completed(futures):
            yield future.result()  # a job's exception is in its result; others end the step
    finally:
        cancel.set()
        pool.shutdown(wait=True, cancel_futures=True)
