"""Resources: where artifacts live, where records are published, how hooks run.

Each reads its environment variable when left empty, so the same definitions serve the
embedded default and a production deployment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

import dagster as dg

from osa_dagster.batch.hooks import machine_capacity
from osa_dagster.engine import HookCapacity, LocalRunner, Runner
from osa_dagster.engine.runners.docker import DockerRunner
from osa_dagster.records import RecordsDatabase, database_url_from_env, open_database
from osa_dagster.settings import Settings
from osa_dagster.storage import ArtifactStore, FileSystemStore, store_from_env
from osa_dagster.storage.store import deposits_store_from_env


class ArtifactStoreResource(dg.ConfigurableResource):
    """Batch artifacts: a folder, or OSA_STORAGE, or <data dir>/artifacts."""

    location: str = ""

    def get(self) -> ArtifactStore:
        if self.location:
            return FileSystemStore(Path(self.location))
        return store_from_env()


class DepositsResource(dg.ConfigurableResource):
    """Where single records are deposited for validation: a folder, or OSA_DEPOSITS (a
    folder or s3://...), or <data dir>/deposits."""

    location: str = ""

    def get(self) -> ArtifactStore:
        if self.location:
            return FileSystemStore(Path(self.location))
        return deposits_store_from_env()


class RecordsDatabaseResource(dg.ConfigurableResource):
    """The records database (any SQLAlchemy URL; OSA_DATABASE_URL; SQLite by default).

    `domain` names this archive in SRNs (urn:osa:<domain>:rec:<uuid>); OSA_DOMAIN.
    """

    url: str = ""
    domain: str = ""

    def get(self) -> RecordsDatabase:
        return open_database(self.url or database_url_from_env())

    def srn_domain(self) -> str:
        return self.domain or Settings.from_env().domain


RunnerKind = Literal["local", "docker", "kubernetes"]


class HookRunnerResource(dg.ConfigurableResource):
    """Where hooks run: "local" processes under cgroup limits, "docker" containers or
    "kubernetes" Jobs (each hook's image, sandboxed). Empty means OSA_HOOK_RUNNER, else
    "local". Kubernetes stages inputs and outputs through the S3 artifact store
    (OSA_STORAGE) under `staging/`; OSA_K8S_NAMESPACE, OSA_K8S_STAGING_SECRET (a Secret
    with the stagers' S3 credentials) and OSA_K8S_S3_ENDPOINT_URL (S3 as pods reach it)
    configure it."""

    kind: str = ""

    def get(self) -> Runner:
        settings = Settings.from_env()
        kind = self.kind or settings.hook_runner
        if kind == "local":
            return LocalRunner()
        if kind == "docker":
            return DockerRunner()
        if kind == "kubernetes":
            # Imported here: the kubernetes client takes ~0.65 s to import, which every
            # run and CLI command would pay otherwise.
            from osa_dagster.engine.runners.kubernetes import (
                KubernetesRunner,
                KubernetesRunnerConfig,
            )
            from osa_dagster.storage.staging import StoreStaging

            return KubernetesRunner(
                StoreStaging(
                    store_from_env(),
                    "staging",
                    pod_endpoint_url=settings.k8s_s3_endpoint_url,
                ),
                KubernetesRunnerConfig(
                    namespace=settings.k8s_namespace,
                    staging_secret=settings.k8s_staging_secret,
                ),
            )
        raise ValueError(f"unknown hook runner {kind!r}: choose one of {get_args(RunnerKind)}")

    def capacity(self) -> HookCapacity | None:
        """The slots and memory budget that local and Docker attempts share machine-wide;
        None for Kubernetes, whose scheduler packs pods by their memory requests."""
        settings = Settings.from_env()
        if (self.kind or settings.hook_runner) == "kubernetes":
            return None
        return machine_capacity(settings)


def default_resources() -> dict[str, dg.ConfigurableResource]:
    return {
        "artifact_store": ArtifactStoreResource(),
        "records_db": RecordsDatabaseResource(),
        "hook_runner": HookRunnerResource(),
        "deposits": DepositsResource(),
    }
