"""The engine's ports over the artifact store: hook checkpoints and memory histories kept
there, so a step resumes wherever it runs next and a hook's history is shared by every
worker."""

from __future__ import annotations

from typing import ClassVar, Generic, TypeVar

from pydantic import BaseModel

from osa_dagster.engine.checkpoint import Checkpoint
from osa_dagster.engine.memory_history import MemoryHistory
from osa_dagster.storage.store import ArtifactStore

M = TypeVar("M", bound=BaseModel)


class StoreModel(Generic[M]):
    """One model as JSON at one store key; the store makes writes atomic."""

    model: ClassVar[type[BaseModel]]

    def __init__(self, store: ArtifactStore, key: str) -> None:
        self.store = store
        self.key = key

    def load(self) -> M | None:
        if not self.store.exists(self.key):
            return None
        return self.model.model_validate_json(self.store.read_bytes(self.key))  # type: ignore[return-value]

    def save(self, value: M) -> None:
        self.store.write_bytes(self.key, value.model_dump_json().encode())


class StoreCheckpointIO(StoreModel[Checkpoint]):
    """The engine's CheckpointIO over any artifact store."""

    model = Checkpoint


class StoreMemoryHistoryIO(StoreModel[MemoryHistory]):
    """The engine's MemoryHistoryIO over any artifact store (key: `memory_history_key`)."""

    model = MemoryHistory
