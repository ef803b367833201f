"""Hook checkpoints and memory histories kept in the artifact store, so a step resumes
wherever it runs next and a hook's history is shared by every worker."""

from __future__ import annotations

from osa_dagster.engine.checkpoint import Checkpoint
from osa_dagster.engine.memory_history import MemoryHistory
from osa_dagster.storage.store import ArtifactStore


class StoreCheckpointIO:
    """The engine's CheckpointIO over any artifact store; the store makes writes atomic."""

    def __init__(self, store: ArtifactStore, key: str) -> None:
        self.store = store
        self.key = key

    def load(self) -> Checkpoint | None:
        if not self.store.exists(self.key):
            return None
        return Checkpoint.model_validate_json(self.store.read_bytes(self.key))

    def save(self, checkpoint: Checkpoint) -> None:
        self.store.write_bytes(self.key, checkpoint.model_dump_json().encode())


class StoreMemoryHistoryIO:
    """The engine's MemoryHistoryIO over any artifact store (key: `memory_history_key`)."""

    def __init__(self, store: ArtifactStore, key: str) -> None:
        self.store = store
        self.key = key

    def load(self) -> MemoryHistory | None:
        if not self.store.exists(self.key):
            return None
        return MemoryHistory.model_validate_json(self.store.read_bytes(self.key))

    def save(self, history: MemoryHistory) -> None:
        self.store.write_bytes(self.key, history.model_dump_json().encode())
