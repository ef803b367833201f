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

import dagster as dg
from pydantic import Field
from sqlalchemy.engine import make_url

from osa_dagster.batch.hooks import machine_capacity
from osa_dagster.engine import HookCapacity, LocalRunner, MemoryLimitsUnavailable, Runner
from osa_dagster.engine.runners.docker import DockerRunner
from osa_dagster.engine.runners.local import require_promised_isolation
from osa_dagster.engine.runners.sandbox import SandboxMode, SandboxUnavailable
from osa_dagster.records import RecordsDatabase, open_database
from osa_dagster.settings import RunnerKind, Settings
from osa_dagster.storage import ArtifactStore
from osa_dagster.storage.store import store_at

PASSWORD_VARIABLE = "OSA_DATABASE_PASSWORD"
URL_VARIABLE = "OSA_DATABASE_URL"
# The metadata entry of what hooks produced that says how they were isolated.
ISOLATION_METADATA = "hook_isolation"


class ArtifactStoreResource(dg.ConfigurableResource):
    """Batch artifacts (OSA_STORAGE): a folder, or s3://bucket/prefix on the S3 server of
    OSA_S3_ENDPOINT_URL (AWS when unset)."""

    location: str = Field(description="A folder, or s3://bucket/prefix.")

    def get(self) -> ArtifactStore:
        return store_at(self.location)


class DepositsResource(dg.ConfigurableResource):
    """Where single records are deposited for validation (OSA_DEPOSITS): a folder or
    s3://bucket/prefix."""

    location: str = Field(description="A folder, or s3://bucket/prefix.")

    def get(self) -> ArtifactStore:
        return store_at(self.location)


class RecordsDatabaseResource(dg.ConfigurableResource):
    """The records database (OSA_DATABASE_URL, any SQLAlchemy URL; SQLite in the data folder
    by default) and this archive's name in SRNs, urn:osa:<domain>:rec:<uuid> (OSA_DOMAIN)."""

    url: str = Field(description="SQLAlchemy URL of the records database.")
    password: str | None = Field(
        default=None, description=f"The database password ({PASSWORD_VARIABLE})."
    )
    domain: str = Field(default="localhost", description="This archive's name in SRNs.")

    def get(self) -> RecordsDatabase:
        url = make_url(self.url)
        if self.password:
            url = url.set(password=self.password)
        return open_database(url.render_as_string(hide_password=False))

    def srn_domain(self) -> str:
        return self.domain


class HookRunnerResource(dg.ConfigurableResource):
    """Where hooks run (OSA_HOOK_RUNNER): "local" processes under cgroup limits, "docker"
    containers or "kubernetes" Jobs (each hook's image, sandboxed). Kubernetes stages
    inputs and outputs through the S3 artifact store under `staging/`."""

    kind: RunnerKind = Field(default="local", description="local, docker or kubernetes.")
    sandbox: SandboxMode = Field(
        default="on",
        description="OSA_HOOK_SANDBOX: local hooks sandboxed (on), or unsandboxed (off).",
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
                return LocalRunner(sandbox=self.sandbox)
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
                store_at(self.staging_store),
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


def database_url(settings: Settings) -> str:
    """OSA_DATABASE_URL, or the SQLite file in the data folder (not created here)."""
    return settings.database_url or f"sqlite:///{settings.data_dir / 'records.db'}"


def asset_kinds(settings: Settings) -> AssetKinds:
    backend = make_url(database_url(settings)).get_backend_name()
    return AssetKinds(
        database="postgres" if backend == "postgresql" else backend,
        store="s3" if settings.artifacts_location.lower().startswith("s3:") else None,
        runner="python" if settings.hook_runner == "local" else settings.hook_runner,
    )


def _records_database(settings: Settings) -> RecordsDatabaseResource:
    url = database_url(settings)
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
        return cls(
            artifact_store=ArtifactStoreResource(location=settings.artifacts_location),
            records_db=_records_database(settings),
            hook_runner=HookRunnerResource(
                kind=settings.hook_runner,
                sandbox=settings.hook_sandbox,
                k8s_namespace=settings.k8s_namespace,
                k8s_staging_secret=settings.k8s_staging_secret,
                k8s_s3_endpoint_url=settings.k8s_s3_endpoint_url,
                staging_store=settings.artifacts_location,
            ),
            deposits=DepositsResource(location=settings.deposits_location),
        )

    def by_key(self) -> dict[str, dg.ConfigurableResource]:
        return dict(vars(self))


def default_resources() -> dict[str, dg.ConfigurableResource]:
    """The resources of this process's settings."""
    return Resources.of(Settings.from_env()).by_key()
