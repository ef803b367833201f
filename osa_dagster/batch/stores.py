"""The engine's ports over the artifact store: hook checkpoints and memory histories kept
there, so a step resumes wherever it runs next and a hook's history is shared by every
worker."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import ClassVar, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from osa_dagster.batch import BatchInputError
from osa_dagster.engine.checkpoint import Checkpoint
from osa_dagster.engine.memory_history import MemoryHistory
from osa_dagster.storage.store import ArtifactStore

M = TypeVar("M", bound=BaseModel)
log = logging.getLogger(__name__)


class UnreadableState(BatchInputError):
    """A stored file that cannot be parsed (truncated, corrupted): names the file and why."""

    def __init__(self, where: str, cause: str) -> None:
        super().__init__(f"{where} cannot be read ({cause})")
        self.where = where
        self.cause = cause


def parse_stored(model: type[M], store: ArtifactStore, key: str) -> M:
    """`model` from the JSON at `key`; a file that is not one raises UnreadableState."""
    try:
        return model.model_validate_json(store.read_bytes(key))
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(map(str, first["loc"]))
        cause = f"{where}: {first['msg']}" if where else first["msg"]
        raise UnreadableState(store.describe(key), cause) from None


class StoreModel(Generic[M]):
    """One model as JSON at one store key; the store makes writes atomic."""

    model: ClassVar[type[BaseModel]]

    def __init__(self, store: ArtifactStore, key: str) -> None:
        self.store = store
        self.key = key

    def load(self) -> M | None:
        if not self.store.exists(self.key):
            return None
        return parse_stored(self.model, self.store, self.key)  # type: ignore[return-value]

    def set_aside(self) -> str:
        """Move what is stored beside itself, kept for inspection; returns its new key."""
        aside = f"{self.key}.unreadable-{datetime.now(UTC):%Y%m%dT%H%M%S.%fZ}"
        self.store.write_bytes(aside, self.store.read_bytes(self.key))
        self.store.delete_prefix(self.key)
        return aside

    def save(self, value: M) -> None:
        self.store.write_bytes(self.key, value.model_dump_json().encode())


class StoreCheckpointIO(StoreModel[Checkpoint]):
    """The engine's CheckpointIO over any artifact store."""

    model = Checkpoint


class StoreMemoryHistoryIO(StoreModel[MemoryHistory]):
    """The engine's MemoryHistoryIO over any artifact store (key: `memory_history_key`).

    A history only predicts where large records start, so one that cannot be read is set
    aside with a warning and learnt again, rather than stopping every batch of its hook."""

    model = MemoryHistory

    def load(self) -> MemoryHistory | None:
        try:
            return super().load()
        except UnreadableState as error:
            aside = self.set_aside()
            log.warning(
                "%s; set aside as %s, the hook's memory history starts again",
                error,
                self.store.describe(aside),
            )
            return None
