"""Reading how an attempt ended from its Job and pod, never from an exit code alone."""

from __future__ import annotations

import signal
from dataclasses import dataclass

from kubernetes import client as k8s

from osa_dagster.engine.runners.base import (
    returncode_from_exit_code,
)
from osa_dagster.engine.runners.kubernetes.config import (
    HOOK_CONTAINER,
    STAGE_IN_CONTAINER,
)

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
