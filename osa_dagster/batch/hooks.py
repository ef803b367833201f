"""Running hooks: each hook over a batch through the engine, resuming from the store."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from osa_sdk.types import HookRecord

from osa_dagster.batch import BatchInputError
from osa_dagster.batch.fetch import read_raw_records
from osa_dagster.batch.stores import StoreCheckpointIO, StoreMemoryHistoryIO, UnreadableState
from osa_dagster.conventions.base import Convention
from osa_dagster.engine import Checkpoint, HookBatch, HookProgress, Runner, advance_hook
from osa_dagster.engine.memory_history import MemoryHistory
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
    stop_after_oom: bool = True,
    checkpoint_every_s: float = 1.0,
    checkpoint_every_records: int = 1,
    predict_memory: bool = True,
) -> HookProgress:
    """Advance one hook over the batch, resuming from its checkpoint in the store (a
    checkpoint that cannot be read is set aside: see `set_aside_unreadable_checkpoint`).

    The checkpoint is saved to the store while the hook runs, after `checkpoint_every_records`
    new outcomes or `checkpoint_every_s` seconds (see osa_dagster.engine.hook_run). With
    `predict_memory`, the hook's memory history in the store (`memory_history_key`) starts
    a new batch's large records at the memory their size needed before, and learns from
    this batch's attempts; without it, the ladder starts every record at the base.
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
            stop_after_oom=stop_after_oom,
            history=StoreMemoryHistoryIO(store, memory_history_key(convention.name, hook_name))
            if predict_memory
            else None,
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
