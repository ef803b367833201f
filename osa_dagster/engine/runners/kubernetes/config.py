"""The Kubernetes runner's vocabulary and configuration: labels, container names and
paths of the attempt's pod, where attempts are staged, and how to reach the cluster."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from pydantic import BaseModel, ConfigDict, Field

from osa_dagster.engine.runners.base import ISOLATED_FILES, ISOLATED_IN, ISOLATED_OUT

RUNNER_NAME = "kubernetes"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "osa-dagster"
LABEL_ROLE = "osa.archive/role"
ROLE_HOOK_ATTEMPT = "hook-attempt"
LABEL_ATTEMPT = "osa.archive/attempt"
LABEL_HOOK = "osa.archive/hook"
# On the pods of a hook whose HookSpec opts in to the network: the NetworkPolicy
# osa-hook-network (deploy/kubernetes/networkpolicy.yaml) lets them out.
LABEL_NETWORK = "osa.archive/network"
NETWORK_ALLOWED = "allowed"

HOOK_CONTAINER = "hook"
STAGE_IN_CONTAINER = "stage-in"
STAGE_OUT_CONTAINER = "stage-out"
POD_IN, POD_FILES, POD_OUT, POD_TMP = ISOLATED_IN, ISOLATED_FILES, ISOLATED_OUT, "/tmp"
STAGE_OUT_DONE = "stage-out.done"

_NAME_PART = re.compile(r"[^a-z0-9-]+")


class Staging(Protocol):
    """Where attempts are staged for pods: keys are "/"-separated, relative to a root."""

    def upload_dir(self, local: Path, prefix: str, names: Iterable[str] | None = None) -> int:
        """Copy the files under `local` (only its entries `names` if given) to `prefix`."""
        ...

    def read_bytes(self, key: str) -> bytes | None:
        """The object's content, or None if there is none."""
        ...

    def exists(self, key: str) -> bool: ...

    def delete_prefix(self, prefix: str) -> None: ...

    def url(self, key: str) -> str:
        """The s3:// URL of a key, as a pod's stagers reach it."""
        ...

    def pod_env(self) -> Mapping[str, str]:
        """The environment the stagers need to reach the store (endpoint, region)."""
        ...


class KubernetesRunnerConfig(BaseModel):
    """How attempts run on the cluster; the defaults suit a small cluster."""

    model_config = ConfigDict(frozen=True)

    namespace: str = "default"
    stager_image: str | None = None  # None: the hook's image (it needs osa-sdk[s3] then)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: tuple[str, ...] = ()
    # A Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, given to the stagers only.
    staging_secret: str | None = None
    # For a cloud identity of the stagers (IRSA and the like); its token is not mounted.
    service_account: str | None = None
    cpu_request: str = "1"
    cpu_limit: str | None = None
    stager_memory_mb: int = Field(default=256, gt=0)
    tmp_size_mb: int = Field(default=1024, gt=0)
    out_size_mb: int = Field(default=256, gt=0)
    run_as_user: int = Field(default=65532, gt=0)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: tuple[dict[str, Any], ...] = ()
    labels: dict[str, str] = Field(default_factory=dict)
    # Added to the hook's timeout for the Job's activeDeadlineSeconds: image pull and staging.
    staging_allowance_s: float = Field(default=600.0, ge=0)
    ttl_after_finished_s: int = Field(default=3600, ge=0)
    poll_interval_s: float = Field(default=2.0, gt=0)
    stuck_grace_s: float = Field(default=120.0, ge=0)
    stage_out_grace_s: float = Field(default=60.0, gt=0)
    sync_interval_s: float = Field(default=2.0, gt=0)


def kube_api_client(kubeconfig: str | None = None, context: str | None = None) -> k8s.ApiClient:
    """A client for the cluster this process runs in, else for the kubeconfig's context."""
    configuration = k8s.Configuration()
    if kubeconfig is None and context is None:
        try:
            k8s_config.load_incluster_config(client_configuration=configuration)
            return k8s.ApiClient(configuration)
        except k8s_config.ConfigException:
            pass
    k8s_config.load_kube_config(
        config_file=kubeconfig, context=context, client_configuration=configuration
    )
    return k8s.ApiClient(configuration)


def memory_quantity(mb: int) -> str:
    """MB (2^20 bytes, osa_sdk.contract.BYTES_PER_MB) as a Kubernetes quantity."""
    return f"{mb}Mi"


def attempt_name(hook_name: str) -> str:
    """A Job name unique per attempt: a DNS label short enough for the pod names after it."""
    readable = _NAME_PART.sub("-", hook_name.lower()).strip("-")[:38].strip("-") or "hook"
    return f"osa-{readable}-{secrets.token_hex(4)}"


@dataclass(frozen=True)
class StagedAttempt:
    """Where one attempt's folders live in the staging store."""

    prefix: str  # namespace/job-name

    @property
    def inputs(self) -> str:
        return f"{self.prefix}/in"

    @property
    def files(self) -> str:
        return f"{self.prefix}/files"

    @property
    def outputs(self) -> str:
        return f"{self.prefix}/out"

    @property
    def done(self) -> str:
        return f"{self.prefix}/{STAGE_OUT_DONE}"
