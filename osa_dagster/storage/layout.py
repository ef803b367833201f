"""Where each artifact of a batch lives in the store, and the frozen batch manifest."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from osa_sdk.types import RecordRef
from pydantic import BaseModel, Field


class SourceChoice(BaseModel):
    """The source a batch was planned from: its name and, if one was chosen, its location."""

    name: str
    location: str | None = None


class Manifest(BaseModel):
    """The frozen membership of one batch: what raw_batch fetches for its partition."""

    convention: str
    partition: str
    refs: list[RecordRef] = Field(min_length=1)
    planned_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    since: datetime | None = None
    source: SourceChoice | None = None
    """Where the refs came from; fetch reads there whatever the settings say by then, as
    the refs (offsets, relative paths) mean something only there. None: before sources
    could be chosen, the convention's source as loaded."""


@dataclass(frozen=True)
class BatchLayout:
    """Keys of one batch's artifacts. The only place that spells these paths."""

    convention: str
    partition: str

    @property
    def manifest(self) -> str:
        return f"manifests/{self.convention}/{self.partition}.json"

    @property
    def _batch(self) -> str:
        return f"batches/{self.convention}/{self.partition}"

    @property
    def raw(self) -> str:
        """Folder the ingester writes: records.jsonl, ingest_report.json, files/."""
        return f"{self._batch}/raw"

    @property
    def raw_records(self) -> str:
        return f"{self.raw}/records.jsonl"

    @property
    def ingest_report(self) -> str:
        return f"{self.raw}/ingest_report.json"

    @property
    def raw_files(self) -> str:
        return f"{self.raw}/files"

    def hook(self, hook_name: str) -> str:
        return f"{self._batch}/hooks/{hook_name}"

    def shard_plan(self, hook_name: str, version: str | None) -> str:
        """How the batch's records are split for the hook version, frozen at its first run."""
        return f"{self.hook_version(hook_name, version)}/shards.json"

    def hook_version(self, hook_name: str, version: str | None) -> str:
        """The folder of one version's outcomes. Outcomes judged before hooks had versions
        (version None) keep their paths."""
        if version is None:
            return self.hook(hook_name)
        return f"{self.hook(hook_name)}/v/{version}"

    def _shard(self, hook_name: str, version: str | None, shard: int | None) -> str:
        # A batch in one shard keeps the paths it had before batches were split, so that a
        # store written then reads the same.
        if shard is None:
            return self.hook_version(hook_name, version)
        return f"{self.hook_version(hook_name, version)}/shards/{shard}"

    def checkpoint(self, hook_name: str, version: str | None, shard: int | None = None) -> str:
        """The hook version's checkpoint over the batch, or over one shard of a split batch."""
        return f"{self._shard(hook_name, version, shard)}/checkpoint.json"

    def hook_workdir(self, hook_name: str, version: str | None, shard: int | None = None) -> str:
        return f"{self._shard(hook_name, version, shard)}/work"


def memory_history_key(convention: str, hook_name: str) -> str:
    """A hook's memory-vs-size history, shared by every batch of the convention."""
    return f"history/{convention}/{hook_name}.json"


def manifests_prefix(convention: str) -> str:
    return f"manifests/{convention}"


def plan_index_prefix(convention: str) -> str:
    """The folder of a convention's plan index: what its manifests hold, for looking up."""
    return f"plan_index/{convention}"
