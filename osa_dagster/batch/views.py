"""What one batch holds, as typed views that read nothing until they are iterated.

For people looking at a batch (a notebook, a script, `defs.load_asset_value`): its raw
records, a hook's outcomes (the checkpoint the engine persisted) and the records it
published. Raw records are streamed from the store line by line and published records
from the database a chunk at a time, so a view of a large batch costs the memory of one
record (a hook's checkpoint is one document, read whole when asked for).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from osa_sdk.types import IngesterRecord, OutcomeStatus

from osa_dagster.batch.shards import hook_state_key, merge_shards, shard_checkpoints
from osa_dagster.engine.checkpoint import Checkpoint, RecordOutcome
from osa_dagster.records import RecordsDatabase
from osa_dagster.records.queries import RecordOfBatch, records_of_partition
from osa_dagster.storage.layout import BatchLayout
from osa_dagster.storage.store import ArtifactStore


@dataclass(frozen=True)
class RawRecords:
    """The batch's records.jsonl, one IngesterRecord at a time."""

    store: ArtifactStore
    layout: BatchLayout

    @property
    def location(self) -> str:
        return self.store.describe(self.layout.raw_records)

    def __iter__(self) -> Iterator[IngesterRecord]:
        for line in self.store.iter_lines(self.layout.raw_records):
            if line.strip():
                yield IngesterRecord.model_validate_json(line)


@dataclass(frozen=True)
class HookOutcomes:
    """One version of one hook's outcomes over the batch: its checkpoint (its shards'
    together, see batch/shards.py), read when first asked for."""

    store: ArtifactStore
    layout: BatchLayout
    hook: str
    version: str | None
    """None: the outcomes judged before hooks had versions."""

    @property
    def location(self) -> str:
        return self.store.describe(hook_state_key(self.store, self.layout, self.hook, self.version))

    def checkpoint(self) -> Checkpoint:
        plan, shards = shard_checkpoints(self.store, self.layout, self.hook, self.version)
        found = [checkpoint for checkpoint in shards if checkpoint is not None]
        if not found:
            raise FileNotFoundError(
                f"hook {self.hook!r} version {self.version or 'unrecorded'} has no checkpoint "
                f"at {self.location}"
            )
        return merge_shards(found, plan.batch_digest if plan else found[0].batch_digest)

    def __iter__(self) -> Iterator[tuple[str, RecordOutcome]]:
        """(record id, outcome) in record id order."""
        yield from sorted(self.checkpoint().outcomes.items())

    def with_status(self, status: OutcomeStatus) -> dict[str, RecordOutcome]:
        return {record_id: outcome for record_id, outcome in self if outcome.status is status}


@dataclass(frozen=True)
class PublishedRecords:
    """The records the batch published, by source id, with their features."""

    db: RecordsDatabase
    convention: str
    partition: str

    def __iter__(self) -> Iterator[RecordOfBatch]:
        return records_of_partition(self.db, self.convention, self.partition)
