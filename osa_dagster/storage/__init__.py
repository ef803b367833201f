"""Where batch artifacts live: one store interface, a filesystem store, the batch layout."""

from osa_dagster.storage.layout import BatchLayout, Manifest
from osa_dagster.storage.store import ArtifactStore, FileSystemStore, store_from_env

__all__ = ["ArtifactStore", "BatchLayout", "FileSystemStore", "Manifest", "store_from_env"]
