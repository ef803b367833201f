"""Run hook attempts as Kubernetes Jobs, with the official `kubernetes` client.

One attempt is one Job (backoffLimit 0, so one pod) named ``osa-<hook>-<random>``; its
`AttemptMarker.container` is ``namespace/job-name``. The pod has three containers:

- ``stage-in`` (an init container) copies the attempt's inputs (records.jsonl, config.json, and
  the folders of exactly the records of this attempt) from S3 into emptyDirs;
- ``hook`` runs the hook image's command under the contract, with limits.memory =
  requests.memory = the attempt's limit (``1024Mi`` for 1024 MB: the engine's MB are MiB);
- ``stage-out`` (a native sidecar: an init container with restartPolicy Always, Kubernetes
  >= 1.29) uploads the outcome files while the hook runs and once more after it ends.

Both stagers run ``python3 -m osa_sdk.remote`` (see that module) from `stager_image`, by
default the hook's own image, which then needs ``osa-sdk[s3]``. Only they get the S3
credentials (`staging_secret`); the hook gets none, and no service account token.

Sandbox: non-root user, read-only root filesystem, every capability dropped, no privilege
escalation, the RuntimeDefault seccomp profile, no service links; /tmp and the out folder are
emptyDirs with size limits, the only places the hook can write. Kubernetes has no per-pod pid
limit (that is the kubelet's podPidsLimit, a node setting). Pods carry the label
``osa.archive/role=hook-attempt`` for the NetworkPolicy in deploy/kubernetes, which leaves
them only DNS and the S3 endpoint (the stagers need it; the hook has no credentials for it).

While the attempt runs, `wait` reads the Job and its pod every `poll_interval_s` and copies the
uploaded outcome files into the invocation's out folder, where the engine reads them. How it
ended, read from the pod (never from an exit code alone):

- the hook container terminated with reason ``OOMKilled``: an OOM, the only end that adds memory;
- the Job's or pod's ``DeadlineExceeded``: `failure` "DeadlineExceeded" (and timed out);
- the pod ``Evicted``, preempted, or its node lost (reason ``NodeLost``, or a DisruptionTarget
  condition): `failure` "Evicted", "Preempted" or "NodeLost";
- a container stuck in ``ImagePullBackOff`` / ``ErrImagePull`` (or another waiting reason that
  does not heal, see STUCK_REASONS) for `stuck_grace_s`: `failure` with that reason;
- the stage-in container failed: "StageInFailed"; the job or pod deleted by someone: "Deleted";
- otherwise the hook's exit code (128 + n from the runtime is reported as signal n).

Failures never add memory: the engine errors the records left as retryable. What an attempt
loses: outcomes the hook wrote after the sidecar's last upload, when the pod dies as a whole
(evicted, node lost); after an OOM kill the sidecar uploads everything. When a hook exits 0 but
the final upload did not finish, `failure` is "StageOutFailed", so its records are retried
instead of counting as "no outcome". The engine's checkpoint is the truth: a record without an
uploaded outcome is simply run again by the next attempt (at the next memory after an OOM).

Clean-up: the Job and its pods are deleted when the attempt ends or is killed, and by
`kill_leftovers` after an orchestrator died (found by name, and by label for stray pods); the
Job's ttlSecondsAfterFinished and activeDeadlineSeconds bound what is left if nobody comes back.
"""

from __future__ import annotations

import logging
import math
import re
import secrets
import signal
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from osa_sdk.contract import (
    ENV_FILES,
    ENV_HOOK_NAME,
    ENV_IN,
    ENV_MEMORY_LIMIT_MB,
    ENV_OUT,
    OUTPUT_FILES,
    RECORDS_FILE,
)
from osa_sdk.types import HookRecord
from pydantic import BaseModel, ConfigDict, Field

from osa_dagster.atomic_files import write_atomically
from osa_dagster.engine.runners.base import (
    AttemptExit,
    AttemptMarker,
    Invocation,
    image_command,
    read_tail,
    returncode_from_exit_code,
)

log = logging.getLogger(__name__)

RUNNER_NAME = "kubernetes"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "osa-dagster"
LABEL_ROLE = "osa.archive/role"
ROLE_HOOK_ATTEMPT = "hook-attempt"
LABEL_ATTEMPT = "osa.archive/attempt"
LABEL_HOOK = "osa.archive/hook"

HOOK_CONTAINER = "hook"
STAGE_IN_CONTAINER = "stage-in"
STAGE_OUT_CONTAINER = "stage-out"
POD_IN, POD_FILES, POD_OUT, POD_TMP = "/osa/in", "/osa/files", "/osa/out", "/tmp"
STAGE_OUT_DONE = "stage-out.done"

# `AttemptExit.failure` values: how the platform ended an attempt.
DEADLINE_EXCEEDED = "DeadlineExceeded"
EVICTED = "Evicted"
PREEMPTED = "Preempted"
NODE_LOST = "NodeLost"
DELETED = "Deleted"
STAGE_IN_FAILED = "StageInFailed"
STAGE_OUT_FAILED = "StageOutFailed"
POD_FAILED = "PodFailed"
# Waiting reasons that end an attempt once they have lasted `stuck_grace_s`; an image that
# cannot even be named, or that must not be pulled, ends it at once.
STUCK_REASONS = frozenset(
    {
        "ImagePullBackOff",
        "ErrImagePull",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)
HOPELESS_REASONS = frozenset({"InvalidImageName", "ErrImageNeverPull"})
# DisruptionTarget condition reasons (Kubernetes >= 1.26) -> our failure.
DISRUPTIONS = {
    "EvictionByEvictionAPI": EVICTED,
    "TerminationByKubelet": EVICTED,
    "PreemptionByScheduler": PREEMPTED,
    "PreemptionByKubeScheduler": PREEMPTED,
    "DeletionByTaintManager": NODE_LOST,
    "DeletionByPodGC": NODE_LOST,
}
TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
REQUEST_TIMEOUT = (5.0, 30.0)  # connect, read; no API call may hang an attempt
LOG_LIMIT_BYTES = 16 * 1024 * 1024
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
    """The engine's MB (MiB, as the local runners count them) as a Kubernetes quantity."""
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


def job_manifest(
    name: str,
    inv: Invocation,
    config: KubernetesRunnerConfig,
    staging: Staging,
    staged: StagedAttempt,
) -> dict[str, Any]:
    """The Job of one attempt (see the module doc for its containers and sandbox)."""
    if inv.image is None:
        raise ValueError(
            f"hook {inv.env.get(ENV_HOOK_NAME, '?')} has no image: the Kubernetes runner runs "
            "a hook from its container image (HookSpec.image)"
        )
    hook_name = inv.env.get(ENV_HOOK_NAME, "hook")
    labels = config.labels | {
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_ROLE: ROLE_HOOK_ATTEMPT,
        LABEL_ATTEMPT: name,
        LABEL_HOOK: hook_name[:63],
    }
    memory = memory_quantity(inv.memory_limit_mb)
    hook_resources: dict[str, dict[str, str]] = {
        "requests": {"memory": memory, "cpu": config.cpu_request},
        "limits": {"memory": memory},
    }
    if config.cpu_limit is not None:
        hook_resources["limits"]["cpu"] = config.cpu_limit
    stager_memory = memory_quantity(config.stager_memory_mb)
    stager_resources = {
        "requests": {"memory": stager_memory, "cpu": "100m"},
        "limits": {"memory": stager_memory},
    }
    stager_image = config.stager_image or inv.image
    stager_env = [{"name": k, "value": v} for k, v in sorted(staging.pod_env().items())]
    stager_env.append({"name": "HOME", "value": POD_TMP})
    stager_env_from = (
        [{"secretRef": {"name": config.staging_secret}}] if config.staging_secret else []
    )
    contract_env = {
        ENV_IN: POD_IN,
        ENV_OUT: POD_OUT,
        ENV_FILES: POD_FILES,
        ENV_HOOK_NAME: hook_name,
        ENV_MEMORY_LIMIT_MB: str(inv.memory_limit_mb),
    }
    hook_env = (
        {"HOME": POD_TMP, "TMPDIR": POD_TMP, "PYTHONDONTWRITEBYTECODE": "1"}
        | dict(inv.env)
        | contract_env
    )
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        # The sidecar's last upload happens after the hook ends, within this grace.
        "terminationGracePeriodSeconds": math.ceil(config.stage_out_grace_s),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": config.run_as_user,
            "runAsGroup": config.run_as_user,
            "fsGroup": config.run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "initContainers": [
            {
                "name": STAGE_IN_CONTAINER,
                "image": stager_image,
                "imagePullPolicy": config.image_pull_policy,
                "command": [
                    "python3",
                    "-m",
                    "osa_sdk.remote",
                    "stage-in",
                    f"{staging.url(staged.inputs)}={POD_IN}",
                    f"{staging.url(staged.files)}={POD_FILES}",
                ],
                "env": stager_env,
                "envFrom": stager_env_from,
                "resources": stager_resources,
                "securityContext": _container_security(),
                "volumeMounts": [
                    {"name": "in", "mountPath": POD_IN},
                    {"name": "files", "mountPath": POD_FILES},
                    {"name": "stage-tmp", "mountPath": POD_TMP},
                ],
            },
            {
                "name": STAGE_OUT_CONTAINER,
                "image": stager_image,
                "imagePullPolicy": config.image_pull_policy,
                "restartPolicy": "Always",  # a native sidecar: stopped after the hook ends
                "command": [
                    "python3",
                    "-m",
                    "osa_sdk.remote",
                    "stage-out",
                    POD_OUT,
                    staging.url(staged.outputs),
                    "--done",
                    staging.url(staged.done),
                    "--interval",
                    f"{config.sync_interval_s:g}",
                ],
                "env": stager_env,
                "envFrom": stager_env_from,
                "resources": stager_resources,
                "securityContext": _container_security(),
                "volumeMounts": [
                    {"name": "out", "mountPath": POD_OUT, "readOnly": True},
                    {"name": "stage-tmp", "mountPath": POD_TMP},
                ],
            },
        ],
        "containers": [
            {
                "name": HOOK_CONTAINER,
                "image": inv.image,
                "imagePullPolicy": config.image_pull_policy,
                "command": image_command(inv.command),
                "workingDir": POD_TMP,
                "env": [{"name": k, "value": v} for k, v in hook_env.items()],
                "resources": hook_resources,
                "securityContext": _container_security(),
                "volumeMounts": [
                    {"name": "in", "mountPath": POD_IN, "readOnly": True},
                    {"name": "files", "mountPath": POD_FILES, "readOnly": True},
                    {"name": "out", "mountPath": POD_OUT},
                    {"name": "tmp", "mountPath": POD_TMP},
                ],
            }
        ],
        "volumes": [
            {"name": "in", "emptyDir": {}},
            {"name": "files", "emptyDir": {}},
            {"name": "out", "emptyDir": {"sizeLimit": memory_quantity(config.out_size_mb)}},
            {"name": "tmp", "emptyDir": {"sizeLimit": memory_quantity(config.tmp_size_mb)}},
            {"name": "stage-tmp", "emptyDir": {"sizeLimit": "64Mi"}},
        ],
    }
    if config.service_account:
        spec["serviceAccountName"] = config.service_account
    if config.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": s} for s in config.image_pull_secrets]
    if config.node_selector:
        spec["nodeSelector"] = dict(config.node_selector)
    if config.tolerations:
        spec["tolerations"] = [dict(t) for t in config.tolerations]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": config.namespace, "labels": labels},
        "spec": {
            "backoffLimit": 0,  # a retry is the engine's decision, at the memory it chooses
            "activeDeadlineSeconds": math.ceil(inv.timeout_s + config.staging_allowance_s),
            "ttlSecondsAfterFinished": config.ttl_after_finished_s,
            "template": {"metadata": {"labels": labels}, "spec": spec},
        },
    }


def _container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


# --- reading how an attempt ended ------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """How the cluster says an attempt ended."""

    returncode: int
    oom_killed: bool = False
    timed_out: bool = False
    failure: str | None = None
    detail: str = ""  # the cluster's message, for the error of the records left
    hook_finished: bool = False  # the hook's own end: wait for the sidecar's last upload


@dataclass(frozen=True)
class Stuck:
    """A container waits for a reason that usually does not heal (a bad image, a bad secret)."""

    reason: str
    message: str
    hopeless: bool


def classify(job: k8s.V1Job | None, pod: k8s.V1Pod | None) -> Verdict | Stuck | None:
    """The end of an attempt from its Job and pod documents; None while it goes on."""
    hook = _terminated(pod, HOOK_CONTAINER)
    if hook is not None and hook.reason == "OOMKilled":
        return Verdict(returncode=_returncode(hook), oom_killed=True, hook_finished=True)
    killed = _returncode(hook) if hook is not None else -signal.SIGKILL
    deadline = _job_condition(job, "DeadlineExceeded")
    if (
        deadline is None
        and pod is not None
        and pod.status
        and pod.status.reason == DEADLINE_EXCEEDED
    ):
        deadline = pod.status.message or DEADLINE_EXCEEDED
    if deadline is not None:
        return Verdict(killed, timed_out=True, failure=DEADLINE_EXCEEDED, detail=deadline)
    if pod is None:
        if job is None:
            return Verdict(killed, failure=DELETED, detail="the attempt's Job was deleted")
        if _job_condition(job, "Complete", "SuccessCriteriaMet") is not None:
            return Verdict(0, hook_finished=True)
        failed = _job_condition(job, "Failed")
        if failed is not None:
            return Verdict(killed, failure=DELETED, detail=f"the pod is gone; the Job: {failed}")
        return None  # the Job controller has not made the pod yet
    status = pod.status or k8s.V1PodStatus()
    if status.reason in (EVICTED, NODE_LOST):
        return Verdict(killed, failure=status.reason, detail=status.message or "")
    for condition in status.conditions or []:
        if condition.type == "DisruptionTarget" and condition.status == "True":
            failure = DISRUPTIONS.get(condition.reason or "")
            if failure is not None:
                return Verdict(killed, failure=failure, detail=condition.message or "")
    stage_in = _terminated(pod, STAGE_IN_CONTAINER)
    if stage_in is not None and stage_in.exit_code != 0:
        return Verdict(
            killed,
            failure=STAGE_IN_FAILED,
            detail=f"stage-in ended with {stage_in.reason} (exit {stage_in.exit_code})",
        )
    if hook is not None:
        return Verdict(_returncode(hook), hook_finished=True)
    for container in (status.init_container_statuses or []) + (status.container_statuses or []):
        waiting = container.state.waiting if container.state else None
        if waiting is not None and waiting.reason in STUCK_REASONS | HOPELESS_REASONS:
            return Stuck(
                waiting.reason,
                f"{container.name}: {waiting.reason}: {waiting.message or ''}".strip(),
                hopeless=waiting.reason in HOPELESS_REASONS,
            )
    if status.phase == "Failed":
        return Verdict(killed, failure=status.reason or POD_FAILED, detail=status.message or "")
    return None


def _terminated(pod: k8s.V1Pod | None, container: str) -> k8s.V1ContainerStateTerminated | None:
    if pod is None or pod.status is None:
        return None
    statuses = (pod.status.init_container_statuses or []) + (pod.status.container_statuses or [])
    for status in statuses:
        if status.name == container and status.state is not None:
            return status.state.terminated
    return None


def _job_condition(job: k8s.V1Job | None, *types_or_reason: str) -> str | None:
    """The message of a true Job condition whose type or reason is one of these, else None."""
    if job is None or job.status is None:
        return None
    for condition in job.status.conditions or []:
        if condition.status == "True" and (
            condition.type in types_or_reason or condition.reason in types_or_reason
        ):
            return condition.message or condition.reason or condition.type
    return None


def _returncode(terminated: k8s.V1ContainerStateTerminated) -> int:
    """Negative for a signal, as the local runner reports it: runtimes say 128 + n."""
    if terminated.signal:
        return -terminated.signal
    return returncode_from_exit_code(terminated.exit_code)


def _transient(error: Exception) -> bool:
    if isinstance(error, ApiException):
        return error.status in TRANSIENT_STATUS or not error.status
    return isinstance(error, urllib3.exceptions.HTTPError)


# --- the runner ------------------------------------------------------------------------------


class KubernetesRunner:
    """Runs each attempt as a Job in `config.namespace`; see the module doc."""

    def __init__(
        self,
        staging: Staging,
        config: KubernetesRunnerConfig | None = None,
        api_client: k8s.ApiClient | None = None,
    ) -> None:
        self.staging = staging
        self.config = config or KubernetesRunnerConfig()
        api_client = api_client or kube_api_client()
        self.core = k8s.CoreV1Api(api_client)
        self.batch = k8s.BatchV1Api(api_client)

    def start(self, inv: Invocation) -> KubernetesAttempt:
        name = attempt_name(inv.env.get(ENV_HOOK_NAME, "hook"))
        staged = StagedAttempt(f"{self.config.namespace}/{name}")
        manifest = job_manifest(name, inv, self.config, self.staging, staged)
        try:
            self.staging.upload_dir(inv.in_dir, staged.inputs)
            self.staging.upload_dir(inv.files_root, staged.files, _files_dirs(inv.in_dir))
            self.batch.create_namespaced_job(
                self.config.namespace, manifest, _request_timeout=REQUEST_TIMEOUT
            )
        except BaseException:
            self.staging.delete_prefix(staged.prefix)
            raise
        log.info("started Job %s (%s at %s)", staged.prefix, inv.image, manifest_memory(manifest))
        return KubernetesAttempt(self, name, staged, inv)

    def kill_leftovers(self, marker: AttemptMarker) -> None:
        if marker.runner != RUNNER_NAME or not marker.container:
            return
        namespace, _, name = marker.container.partition("/")
        if not name:
            log.warning("not touching %r: not a namespace/job-name", marker.container)
            return
        self.delete_attempt(namespace, name)
        self.staging.delete_prefix(marker.container)

    def delete_attempt(self, namespace: str, name: str) -> None:
        """Delete the attempt's Job and any pod of it (also one whose Job is gone); idempotent."""
        try:
            self.batch.delete_namespaced_job(
                name,
                namespace,
                body=k8s.V1DeleteOptions(propagation_policy="Background"),
                _request_timeout=REQUEST_TIMEOUT,
            )
        except ApiException as error:
            if error.status != 404:
                raise
        self.core.delete_collection_namespaced_pod(
            namespace,
            label_selector=f"{LABEL_ATTEMPT}={name}",
            grace_period_seconds=0,
            _request_timeout=REQUEST_TIMEOUT,
        )


def manifest_memory(manifest: Mapping[str, Any]) -> str:
    [hook] = manifest["spec"]["template"]["spec"]["containers"]
    return str(hook["resources"]["limits"]["memory"])


def _files_dirs(in_dir: Path) -> list[str]:
    """The record folders an attempt needs: only those of its records are staged."""
    path = in_dir / RECORDS_FILE
    folders = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                folders.append(HookRecord.model_validate_json(line).files_dir)
            except ValueError as error:
                raise ValueError(f"{path}, line {number}: not a hook record: {error}") from None
    return folders


class KubernetesAttempt:
    """One running Job; `wait` polls the cluster at most every `poll_interval_s`."""

    def __init__(
        self, runner: KubernetesRunner, name: str, staged: StagedAttempt, inv: Invocation
    ) -> None:
        self._runner = runner
        self._config = runner.config
        self._namespace = runner.config.namespace
        self._name = name
        self._staged = staged
        self._inv = inv
        self.marker = AttemptMarker(
            runner=RUNNER_NAME, limit_mode="container", container=staged.prefix
        )
        started = time.monotonic()
        self._next_poll = started
        # The cluster enforces the deadline; this catches a cluster that does not.
        self._backstop = (
            started
            + inv.timeout_s
            + self._config.staging_allowance_s
            + 2 * self._config.stage_out_grace_s
            + 60
        )
        self._stuck_since: float | None = None
        self._hook_finished_at: float | None = None
        self._exit: AttemptExit | None = None

    def wait(self, timeout: float) -> AttemptExit | None:
        if self._exit is not None:
            return self._exit
        end = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            if now >= self._next_poll:
                self._next_poll = now + self._config.poll_interval_s
                self._poll(now)
                now = time.monotonic()
            if self._exit is not None or now >= end:
                return self._exit
            time.sleep(max(0.0, min(end, self._next_poll) - now))

    def kill(self) -> None:
        if self._exit is not None:
            return
        self._runner.delete_attempt(self._namespace, self._name)
        self._runner.staging.delete_prefix(self._staged.prefix)
        self._exit = AttemptExit(
            returncode=-signal.SIGKILL,
            oom_killed=False,
            timed_out=False,
            peak_memory_mb=None,
            stderr_tail=read_tail(self._inv.log_path),
            limit_mode="container",
        )

    def _poll(self, now: float) -> None:
        try:
            job, pod = self._read()
            self._sync_outputs()
        except Exception as error:
            if not _transient(error):
                raise
            log.warning(
                "Job %s: the cluster or the store did not answer: %s", self.marker.container, error
            )
            self._check_backstop(now)
            return
        verdict = classify(job, pod)
        if isinstance(verdict, Stuck):
            if self._stuck_since is None:
                self._stuck_since = now
                log.warning("Job %s: %s", self.marker.container, verdict.message)
            if verdict.hopeless or now - self._stuck_since >= self._config.stuck_grace_s:
                self._finish(
                    Verdict(-signal.SIGKILL, failure=verdict.reason, detail=verdict.message), pod
                )
            return
        self._stuck_since = None
        if verdict is None:
            self._check_backstop(now)
            return
        if verdict.hook_finished and not self._stage_out_over(pod, now):
            return
        self._finish(verdict, pod)

    def _read(self) -> tuple[k8s.V1Job | None, k8s.V1Pod | None]:
        try:
            job = self._runner.batch.read_namespaced_job(
                self._name, self._namespace, _request_timeout=REQUEST_TIMEOUT
            )
        except ApiException as error:
            if error.status != 404:
                raise
            job = None
        pods = self._runner.core.list_namespaced_pod(
            self._namespace,
            label_selector=f"{LABEL_ATTEMPT}={self._name}",
            _request_timeout=REQUEST_TIMEOUT,
        ).items
        # backoffLimit 0 makes one pod; should there be more, the newest tells the story.
        pod = max(pods, key=lambda p: p.metadata.creation_timestamp or 0, default=None)
        return job, pod

    def _stage_out_over(self, pod: k8s.V1Pod | None, now: float) -> bool:
        """Whether the sidecar's last upload is done, or can no longer come."""
        if self._hook_finished_at is None:
            self._hook_finished_at = now
        phase = pod.status.phase if pod is not None and pod.status else None
        return (
            self._runner.staging.exists(self._staged.done)
            or phase in ("Succeeded", "Failed", None)
            or now - self._hook_finished_at >= self._config.stage_out_grace_s
        )

    def _check_backstop(self, now: float) -> None:
        if now >= self._backstop:
            log.warning("Job %s: past its deadline and still not ended; killing it", self._name)
            self._finish(
                Verdict(
                    -signal.SIGKILL,
                    timed_out=True,
                    failure=DEADLINE_EXCEEDED,
                    detail="the runner's own deadline passed",
                ),
                None,
            )

    def _finish(self, verdict: Verdict, pod: k8s.V1Pod | None) -> None:
        """Take the last outcomes and the log, then remove the Job and the staged objects."""
        failure = verdict.failure
        try:
            self._sync_outputs()
            uploaded = self._runner.staging.exists(self._staged.done)
        except Exception as error:
            if not _transient(error):
                raise
            log.warning("Job %s: could not take the last outcomes: %s", self._name, error)
            uploaded = False
        detail = verdict.detail
        if verdict.hook_finished and not uploaded and verdict.returncode == 0:
            failure = STAGE_OUT_FAILED
            detail = "the hook exited 0 but its outcomes were not all uploaded"
        container = STAGE_IN_CONTAINER if failure == STAGE_IN_FAILED else HOOK_CONTAINER
        self._save_log(pod, container)
        tail = read_tail(self._inv.log_path)
        if detail:
            tail = f"{tail}\n[kubernetes] {detail}" if tail else f"[kubernetes] {detail}"
        self._exit = AttemptExit(
            returncode=verdict.returncode,
            oom_killed=verdict.oom_killed,
            timed_out=verdict.timed_out,
            peak_memory_mb=None,  # the API has no peak; metrics-server samples are no proof
            stderr_tail=tail,
            limit_mode="container",
            failure=failure,
        )
        try:
            self._runner.delete_attempt(self._namespace, self._name)
            self._runner.staging.delete_prefix(self._staged.prefix)
        except Exception as error:  # the Job's TTL removes it later; the outcome stands
            log.warning("Job %s: clean-up failed: %s", self.marker.container, error)

    def _sync_outputs(self) -> None:
        """Copy the outcome files uploaded so far into the local out folder."""
        for name in OUTPUT_FILES:
            data = self._runner.staging.read_bytes(f"{self._staged.outputs}/{name}")
            if data is None:
                continue
            local = self._inv.out_dir / name
            known = local.read_bytes() if local.exists() else b""
            if len(data) <= len(known):
                continue
            if not data.startswith(known):
                log.warning("Job %s: %s was rewritten, not appended to; ignored", self._name, name)
                continue
            write_atomically(local, data)

    def _save_log(self, pod: k8s.V1Pod | None, container: str) -> None:
        """Write the container's log to the invocation's log file (raw bytes, streamed)."""
        with self._inv.log_path.open("wb") as log_file:
            if pod is None:
                log_file.write(b"(no pod left to read the log from)\n")
                return
            try:
                # Not preloaded: the client would decode the plain-text log as if it were JSON.
                response = self._runner.core.read_namespaced_pod_log(
                    pod.metadata.name,
                    self._namespace,
                    container=container,
                    limit_bytes=LOG_LIMIT_BYTES,
                    _preload_content=False,
                    _request_timeout=REQUEST_TIMEOUT,
                )
                try:
                    for chunk in response.stream(64 * 1024):
                        log_file.write(chunk)
                finally:
                    response.release_conn()
            except (ApiException, urllib3.exceptions.HTTPError) as error:
                log_file.write(f"(the log of {container} could not be read: {error})\n".encode())
