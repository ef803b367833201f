"""Resources: where artifacts live, where records are published, how hooks run.

Every field is typed and set from the settings (osa_dagster.settings) when the definitions
load, so the UI's Resources page shows the store, the database and the runner in use.
Values that are not secret are passed as values, which the UI shows; the database
password goes through `dg.EnvVar`, which the UI shows by the variable's name only: kept
in OSA_DATABASE_PASSWORD, the URL beside it is shown whole, and an OSA_DATABASE_URL that
carries a password is shown by name only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field
from sqlalchemy.engine import make_url

from osa_dagster.batch.hooks import machine_capacity
from osa_dagster.engine import HookCapacity, LocalRunner, MemoryLimitsUnavailable, Runner
from osa_dagster.engine.runners.docker import DockerRunner
from osa_dagster.engine.runners.local import require_promised_isolation
from osa_dagster.engine.runners.sandbox import SandboxMode, SandboxPolicy, SandboxUnavailable
from osa_dagster.records import (
    RecordsDatabase,
    database_to_look_at,
    open_database,
    shown_database_url,
)
from osa_dagster.settings import DEFAULT_DEPOSIT_MAX_MB, MemoryLimits, RunnerKind, Settings
from osa_dagster.storage import ArtifactStore
from osa_dagster.storage.store import s3_retry, store_at

PASSWORD_VARIABLE = "OSA_DATABASE_PASSWORD"
URL_VARIABLE = "OSA_DATABASE_URL"
# The metadata entry of what hooks produced that says how they were isolated.
ISOLATION_METADATA = "hook_isolation"


class S3AccessResource(dg.ConfigurableResource):
    """How a store on S3 is reached: the server and the patience of its retries."""

    s3_endpoint_url: str | None = Field(
        default=None, description="OSA_S3_ENDPOINT_URL: an S3-compatible server; None: AWS."
    )
    s3_retry_attempts: int = Field(default=8, description="OSA_S3_RETRY_ATTEMPTS.")
    s3_retry_max_wait_s: float = Field(default=8.0, description="OSA_S3_RETRY_MAX_WAIT_S.")

    def store(self, location: str) -> ArtifactStore:
        return store_at(
            location,
            endpoint_url=self.s3_endpoint_url,
            retry=s3_retry(self.s3_retry_attempts, self.s3_retry_max_wait_s),
        )


class ArtifactStoreResource(S3AccessResource):
    """Batch artifacts (OSA_STORAGE): a folder, or s3://bucket/prefix on the S3 server of
    OSA_S3_ENDPOINT_URL (AWS when unset)."""

    location: str = Field(description="A folder, or s3://bucket/prefix.")

    def get(self) -> ArtifactStore:
        return self.store(self.location)


class DepositsResource(S3AccessResource):
    """Where single records are deposited for validation (OSA_DEPOSITS): a folder or
    s3://bucket/prefix."""

    location: str = Field(description="A folder, or s3://bucket/prefix.")
    max_mb: float = Field(
        default=DEFAULT_DEPOSIT_MAX_MB,
        description="OSA_DEPOSIT_MAX_MB: MB that one deposit's files may add up to.",
    )

    def get(self) -> ArtifactStore:
        return self.store(self.location)


class RecordsDatabaseResource(dg.ConfigurableResource):
    """The records database (OSA_DATABASE_URL, any SQLAlchemy URL; SQLite in the data folder
    by default) and this archive's name in SRNs, urn:osa:<domain>:rec:<uuid> (OSA_DOMAIN)."""

    url: str = Field(description="SQLAlchemy URL of the records database.")
    password: str | None = Field(
        default=None, description=f"The database password ({PASSWORD_VARIABLE})."
    )
    domain: str = Field(default="localhost", description="This archive's name in SRNs.")

    def get(self) -> RecordsDatabase:
        return open_database(self._url())

    def to_look_at(self) -> RecordsDatabase | None:
        """Read only, for dry runs: see `database_to_look_at`."""
        return database_to_look_at(self._url())

    def _url(self) -> str:
        url = make_url(self.url)
        if self.password:
            url = url.set(password=self.password)
        return url.render_as_string(hide_password=False)

    def srn_domain(self) -> str:
        return self.domain


class HookRunnerResource(S3AccessResource):
    """Where hooks run (OSA_HOOK_RUNNER): "local" processes under cgroup limits, "docker"
    containers or "kubernetes" Jobs (each hook's image, sandboxed). Kubernetes stages
    inputs and outputs through the S3 artifact store under `staging/`."""

    kind: RunnerKind = Field(default="local", description="local, docker or kubernetes.")
    sandbox: SandboxMode = Field(
        default="on",
        description="OSA_HOOK_SANDBOX: local hooks sandboxed (on), or unsandboxed (off).",
    )
    sandbox_user: str = Field(
        default="65534:65534", description="OSA_HOOK_SANDBOX_USER: uid:gid of sandboxed hooks."
    )
    private_folders: list[str] = Field(
        default_factory=list,
        description="This machine's data folders, which no sandboxed hook sees.",
    )
    memory_limits: MemoryLimits = Field(
        default="cgroup",
        description="OSA_HOOK_MEMORY_LIMITS: cgroup (a real limit), rlimit or off.",
    )
    cgroup_parent: str | None = Field(
        default=None,
        description="OSA_CGROUP_PARENT: the cgroup that local hooks' cgroups are made in.",
    )
    k8s_namespace: str = Field(default="default", description="OSA_K8S_NAMESPACE.")
    k8s_staging_secret: str | None = Field(
        default=None,
        description="OSA_K8S_STAGING_SECRET: the Secret with the stagers' S3 credentials.",
    )
    k8s_s3_endpoint_url: str | None = Field(
        default=None, description="OSA_K8S_S3_ENDPOINT_URL: S3 as pods reach it."
    )
    staging_store: str = Field(
        default="", description="The artifact store that Kubernetes stages through."
    )

    def get(self) -> Runner:
        """The runner; a dg.Failure, before any hook runs, when local hooks cannot have the
        sandbox or the real memory limits that the settings promise."""
        if self.kind == "local":
            try:
                uid, _, gid = self.sandbox_user.partition(":")
                return LocalRunner(
                    self.memory_limits,
                    sandbox=self.sandbox,
                    sandbox_policy=SandboxPolicy(
                        uid=int(uid),
                        gid=int(gid),
                        private=tuple(Path(folder) for folder in self.private_folders),
                    ),
                    cgroup_parent=Path(self.cgroup_parent) if self.cgroup_parent else None,
                )
            except SandboxUnavailable as unavailable:
                raise dg.Failure(description=str(unavailable), allow_retries=False) from None
            except MemoryLimitsUnavailable as unavailable:
                raise dg.Failure(
                    description=f"hook memory limits: {unavailable}", allow_retries=False
                ) from None
        if self.kind == "docker":
            return DockerRunner()
        # Imported here: the kubernetes client takes ~0.65 s to import, which every run and
        # CLI command would pay otherwise.
        from osa_dagster.engine.runners.kubernetes import (
            KubernetesRunner,
            KubernetesRunnerConfig,
        )
        from osa_dagster.storage.staging import StoreStaging

        return KubernetesRunner(
            StoreStaging(
                self.store(self.staging_store),
                "staging",
                pod_endpoint_url=self.k8s_s3_endpoint_url,
            ),
            KubernetesRunnerConfig(
                namespace=self.k8s_namespace, staging_secret=self.k8s_staging_secret
            ),
        )

    def isolation(self) -> str:
        """How hooks are kept from the machine, for the metadata of what they produced."""
        if self.kind != "local":
            return f"{self.kind} container"
        if self.sandbox == "off":
            return "UNSANDBOXED (OSA_HOOK_SANDBOX=off): hooks ran as the orchestrator's user"
        how = "as root, dropping to" if os.geteuid() == 0 else "rootless: a user namespace maps"
        return f"sandboxed (bubblewrap, {how} the hook's user)"

    def capacity(self) -> HookCapacity | None:
        """The slots and memory budget that local and Docker attempts share machine-wide;
        None for Kubernetes, whose scheduler packs pods by their memory requests."""
        if self.kind == "kubernetes":
            return None
        return machine_capacity(Settings.from_env())


def hooks_refusal(settings: Settings | None = None) -> str | None:
    """Why hooks cannot run here as the settings (None: this process's) promise, in one
    line; None when they can."""
    try:
        require_promised_isolation(settings or Settings.from_env())
    except SandboxUnavailable as unavailable:
        return str(unavailable)
    except MemoryLimitsUnavailable as unavailable:
        return f"hook memory limits: {unavailable}"
    return None


@dataclass(frozen=True)
class AssetKinds:
    """The technologies the asset graph names on its assets (Dagster's kinds)."""

    database: str
    """The records database as Dagster spells it: "sqlite", "postgres"."""
    store: str | None
    """"s3" when the artifacts are in S3; None for a folder."""
    runner: str
    """Where hooks run: "python" (local processes), "docker" or "kubernetes"."""


def asset_kinds(settings: Settings) -> AssetKinds:
    backend = make_url(shown_database_url(settings)).get_backend_name()
    return AssetKinds(
        database="postgres" if backend == "postgresql" else backend,
        store="s3" if settings.artifacts_location.lower().startswith("s3:") else None,
        runner="python" if settings.hook_runner == "local" else settings.hook_runner,
    )


def _records_database(settings: Settings) -> RecordsDatabaseResource:
    url = shown_database_url(settings)
    password = dg.EnvVar(PASSWORD_VARIABLE) if settings.database_password else None
    if make_url(url).password is not None:
        return RecordsDatabaseResource(url=dg.EnvVar(URL_VARIABLE), domain=settings.domain)
    return RecordsDatabaseResource(url=url, password=password, domain=settings.domain)


@dataclass(frozen=True)
class Resources:
    """The resources of one set of settings, typed (Definitions takes them as a dict)."""

    artifact_store: ArtifactStoreResource
    records_db: RecordsDatabaseResource
    hook_runner: HookRunnerResource
    deposits: DepositsResource

    @classmethod
    def of(cls, settings: Settings) -> Resources:
        s3_access: dict[str, Any] = {
            "s3_endpoint_url": settings.s3_endpoint_url,
            "s3_retry_attempts": settings.s3_retry_attempts,
            "s3_retry_max_wait_s": settings.s3_retry_max_wait_s,
        }
        return cls(
            artifact_store=ArtifactStoreResource(location=settings.artifacts_location, **s3_access),
            records_db=_records_database(settings),
            hook_runner=HookRunnerResource(
                kind=settings.hook_runner,
                sandbox=settings.hook_sandbox,
                sandbox_user=settings.hook_sandbox_user,
                private_folders=[str(folder) for folder in settings.local_data_folders],
                memory_limits=settings.hook_memory_limits,
                cgroup_parent=str(settings.cgroup_parent) if settings.cgroup_parent else None,
                k8s_namespace=settings.k8s_namespace,
                k8s_staging_secret=settings.k8s_staging_secret,
                k8s_s3_endpoint_url=settings.k8s_s3_endpoint_url,
                staging_store=settings.artifacts_location,
                **s3_access,
            ),
            deposits=DepositsResource(
                location=settings.deposits_location, max_mb=settings.deposit_max_mb, **s3_access
            ),
        )

    def by_key(self) -> dict[str, dg.ConfigurableResource]:
        return dict(vars(self))


def default_resources() -> dict[str, dg.ConfigurableResource]:
    """The resources of this process's settings."""
    return Resources.of(Settings.from_env()).by_key()
