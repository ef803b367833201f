"""Shards: one batch's records split for one hook, each shard run as a chain of attempts of
its own.

A partition is sized for the database (a few thousand records, so that a whole database is
tens of thousands of partitions), an attempt chain for memory and for the slots of the
machine. Each shard has its own checkpoint, working folder, memory ladder and attempt log,
and all the shards of all the batches of a step draw from the machine's slots and memory
budget as separate jobs: an OOM in one shard climbs that shard's ladder and redoes nothing
in the others, and a lone partition keeps every slot busy.

How many shards: enough that none holds more than the convention's `shard_size` records,
and, while every shard keeps at least MIN_SHARD_RECORDS, at least one per slot. Which
records: largest first, each to the shard with the fewest megabytes so far among those with
room (shards differ by at most one record), so that the shards have similar total sizes
even when a few records are most of the batch (the bundled PDB mirror: one entry of 44 is
36 % of its megabytes). Contiguous chunks of the batch, planned smallest first, would put
every large record in the last shard; dealing records out in turn would still give the
shard of the largest record the largest of the others too.

The split is frozen in the store (`BatchLayout.shard_plan`) at the hook's first run on the
batch and read back by every later run, so that a resumed run (after a kill, an OOM, on a
machine with another number of slots) finds each record in the shard whose checkpoint
holds its outcome: nothing is lost or done twice. A batch whose hook began before batches
were split has a checkpoint but no plan; it is frozen as one shard, which keeps its paths.
"""

from __future__ import annotations

import heapq
import logging
from math import ceil

from osa_sdk.types import HookRecord
from pydantic import BaseModel, Field

from osa_dagster.batch.stores import StoreCheckpointIO, StoreModel, UnreadableState
from osa_dagster.engine import Checkpoint
from osa_dagster.engine.hook_run import batch_digest
from osa_dagster.storage.layout import BatchLayout
from osa_dagster.storage.store import ArtifactStore

log = logging.getLogger(__name__)

# The fewest records a shard is given to fill an idle slot: below that, starting one more
# attempt chain (a sandboxed process, ~0.3 s) costs more than sharing the work saves.
MIN_SHARD_RECORDS = 10


class ShardPlan(BaseModel):
    """How one batch's records are split for one hook: record ids, shard by shard."""

    hook: str
    batch_digest: str
    shards: list[list[str]] = Field(min_length=1)
    shard_size: int | None = None  # the convention's, when the plan was made
    slots: int = 1  # the machine's, when the plan was made

    def keys(self) -> list[int | None]:
        """Each shard's name in the layout: None for a batch in one shard (the paths of a
        batch before batches were split)."""
        return [None] if len(self.shards) == 1 else list(range(len(self.shards)))


class StoreShardPlanIO(StoreModel[ShardPlan]):
    model = ShardPlan


def shard_count(records: int, shard_size: int | None, slots: int) -> int:
    """Shards for a batch of `records`: at most `shard_size` records each, and one per slot
    while each keeps MIN_SHARD_RECORDS."""
    by_size = ceil(records / shard_size) if shard_size else 1
    by_slots = min(slots, records // MIN_SHARD_RECORDS)
    return max(1, by_size, by_slots)


def split_records(records: list[HookRecord], count: int) -> list[list[str]]:
    """The ids of `records` in `count` shards of similar megabytes and at most one record
    apart in number, each shard's smallest first."""
    room = ceil(len(records) / count)
    shards: list[list[HookRecord]] = [[] for _ in range(count)]
    open_shards = [(0.0, i) for i in range(count)]  # (megabytes so far, shard)
    for record in sorted(records, key=lambda r: (-r.size_mb, r.id)):
        size_mb, i = heapq.heappop(open_shards)
        shards[i].append(record)
        if len(shards[i]) < room:
            heapq.heappush(open_shards, (size_mb + record.size_mb, i))
    return [[r.id for r in sorted(s, key=lambda r: (r.size_mb, r.id))] for s in shards]


def load_shard_plan(
    store: ArtifactStore, layout: BatchLayout, hook: str, version: str | None
) -> ShardPlan | None:
    """The hook version's frozen plan, or None when it has not run on the batch since
    batches were split (there is at most the one checkpoint of the whole batch)."""
    return StoreShardPlanIO(store, layout.shard_plan(hook, version)).load()


def hook_state_key(
    store: ArtifactStore, layout: BatchLayout, hook: str, version: str | None
) -> str:
    """Where the hook version's state over the batch is: its checkpoint, or the folder of
    its shards' checkpoints when the batch is split."""
    plan = load_shard_plan(store, layout, hook, version)
    if plan is None or len(plan.shards) == 1:
        return layout.checkpoint(hook, version)
    return layout.hook_version(hook, version)


def shard_checkpoints(
    store: ArtifactStore, layout: BatchLayout, hook: str, version: str | None
) -> tuple[ShardPlan | None, list[Checkpoint | None]]:
    """The hook's plan of the batch and each shard's checkpoint of this version (None: not
    begun); raises UnreadableState when either cannot be read."""
    plan = load_shard_plan(store, layout, hook, version)
    keys = plan.keys() if plan is not None else [None]
    return plan, [
        StoreCheckpointIO(store, layout.checkpoint(hook, version, key)).load() for key in keys
    ]


def frozen_shard_plan(
    store: ArtifactStore,
    layout: BatchLayout,
    hook: str,
    version: str | None,
    records: list[HookRecord],
    *,
    shard_size: int | None,
    slots: int,
) -> ShardPlan:
    """The batch's plan for the hook version: the stored one, or, at the hook's first run on the
    batch, a new one, saved before any shard starts.

    A plan that cannot be read is set aside (with a warning) and made again, and so is one
    of other records (the batch was fetched again and differs): a shard whose records are
    the same as before keeps its checkpoint, the engine discards any other."""
    plans = StoreShardPlanIO(store, layout.shard_plan(hook, version))
    digest = batch_digest(records)
    try:
        stored = plans.load()
    except UnreadableState as error:
        aside = plans.set_aside()
        log.warning("%s; set aside as %s, the batch is split again", error, store.describe(aside))
        stored = None
    if stored is not None and stored.batch_digest == digest:
        return stored
    if stored is not None:
        log.warning(
            "batch %s, hook %s: its records changed since they were split; splitting again",
            layout.partition,
            hook,
        )
        count = shard_count(len(records), shard_size, slots)
    elif store.exists(layout.checkpoint(hook, version)):
        count = 1  # begun before batches were split: its checkpoint goes on as one shard
    else:
        count = shard_count(len(records), shard_size, slots)
    plan = ShardPlan(
        hook=hook,
        batch_digest=digest,
        shards=split_records(records, count),
        shard_size=shard_size,
        slots=slots,
    )
    plans.save(plan)
    return plan


def merge_shards(checkpoints: list[Checkpoint], digest: str) -> Checkpoint:
    """The hook's checkpoint over the whole batch: its shards' outcomes and attempts (each
    attempt names its shard), anomalies added up; complete when every shard is."""
    if len(checkpoints) == 1:
        return checkpoints[0]
    anomalies: dict[str, int] = {}
    for checkpoint in checkpoints:
        for name, count in checkpoint.anomalies.items():
            anomalies[name] = anomalies.get(name, 0) + count
    return Checkpoint(
        hook=checkpoints[0].hook,
        batch_digest=digest,
        hook_version=checkpoints[0].hook_version,
        outcomes={k: v for c in checkpoints for k, v in c.outcomes.items()},
        attempts=[a for c in checkpoints for a in c.attempts],
        next_memory_mb=max(c.next_memory_mb for c in checkpoints),
        complete=all(c.complete for c in checkpoints),
        anomalies=anomalies,
        lanes={k: v for c in checkpoints for k, v in c.lanes.items()},
    )
