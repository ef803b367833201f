"""Staging of hook attempts for remote runners, on the project's artifact store.

`StoreStaging` implements the engine's `Staging` protocol (osa_dagster.engine.runners.kubernetes)
over an `ArtifactStore`, so that the engine never imports the storage layer: the Dagster
layer builds a `StoreStaging` and hands it to the runner. Pods reach the staged objects by
their s3:// URLs, so the store must be an S3 one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

from osa_dagster.storage.store import ArtifactStore, check_key


class StoreStaging:
    """Stages attempts under `root` (a key prefix) in `store`.

    `pod_endpoint_url` and `pod_region` are how pods reach the store: the endpoint may be a
    different address inside the cluster than from the orchestrator (None: AWS's own).
    """

    def __init__(
        self,
        store: ArtifactStore,
        root: str = "staging",
        *,
        pod_endpoint_url: str | None = None,
        pod_region: str = "us-east-1",
    ) -> None:
        self.store = store
        self.root = check_key(root).strip("/")
        where = store.describe(self.root)
        if not where.startswith("s3://"):
            raise ValueError(
                f"staging for pods needs an S3 store (OSA_STORAGE=s3://...); {where} is not "
                "reachable from a pod"
            )
        self.pod_endpoint_url = pod_endpoint_url
        self.pod_region = pod_region

    def _key(self, key: str) -> str:
        return f"{self.root}/{check_key(key)}"

    def upload_dir(self, local: Path, prefix: str, names: Iterable[str] | None = None) -> int:
        """Copy the files under `local` (only its entries `names`, if given; missing ones are
        skipped) to `prefix`; returns how many files. Large files are streamed, not read
        into memory: the store's local folder is filled with links, else copies."""
        count = 0
        with self.store.local_dir(self._key(prefix), writable=True) as folder:
            entries = [local / name for name in names] if names is not None else local.iterdir()
            for entry in entries:
                if entry.is_dir():
                    for path in sorted(entry.rglob("*")):
                        if path.is_file():
                            _place(path, folder / path.relative_to(local))
                            count += 1
                elif entry.is_file():
                    _place(entry, folder / entry.relative_to(local))
                    count += 1
        return count

    def read_bytes(self, key: str) -> bytes | None:
        try:
            return self.store.read_bytes(self._key(key))
        except FileNotFoundError:
            return None

    def exists(self, key: str) -> bool:
        return self.store.exists(self._key(key))

    def delete_prefix(self, prefix: str) -> None:
        self.store.delete_prefix(self._key(prefix))

    def url(self, key: str) -> str:
        return self.store.describe(self._key(key))

    def pod_env(self) -> Mapping[str, str]:
        env = {"AWS_REGION": self.pod_region}
        if self.pod_endpoint_url:
            env["OSA_S3_ENDPOINT_URL"] = self.pod_endpoint_url
        return env


def _place(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another filesystem, or links not allowed: copy
        shutil.copyfile(source, target)
