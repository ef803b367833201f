"""Where batch artifacts live: one store interface, a filesystem store, the batch layout."""

from osa_dagster.storage.layout import BatchLayout, Manifest
from osa_dagster.storage.store import ArtifactStore, FileSystemStore, artifact_store

__all__ = ["ArtifactStore", "BatchLayout", "FileSystemStore", "Manifest", "artifact_store"]
