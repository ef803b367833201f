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

The hook's log is read once it ended, kept to the hook log's cap (runners/base.py): whole when
it fits, else its start (``limitBytes``) and its last lines (``tailLines``, ``limitBytes``).

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

from osa_dagster.engine.runners.kubernetes.classify import (
    DEADLINE_EXCEEDED,
    DELETED,
    EVICTED,
    NODE_LOST,
    PREEMPTED,
    STAGE_IN_FAILED,
    STAGE_OUT_FAILED,
    Stuck,
    Verdict,
    classify,
)
from osa_dagster.engine.runners.kubernetes.config import (
    LABEL_ATTEMPT,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    KubernetesRunnerConfig,
    StagedAttempt,
    Staging,
    attempt_name,
    kube_api_client,
    memory_quantity,
)
from osa_dagster.engine.runners.kubernetes.manifest import job_manifest
from osa_dagster.engine.runners.kubernetes.runner import KubernetesAttempt, KubernetesRunner

__all__ = [
    "DEADLINE_EXCEEDED",
    "DELETED",
    "EVICTED",
    "LABEL_ATTEMPT",
    "LABEL_MANAGED_BY",
    "MANAGED_BY",
    "NODE_LOST",
    "PREEMPTED",
    "STAGE_IN_FAILED",
    "STAGE_OUT_FAILED",
    "KubernetesAttempt",
    "KubernetesRunner",
    "KubernetesRunnerConfig",
    "StagedAttempt",
    "Staging",
    "Stuck",
    "Verdict",
    "attempt_name",
    "classify",
    "job_manifest",
    "kube_api_client",
    "memory_quantity",
]
