"""The Job of one attempt: a stage-in init container, the hook, a stage-out sidecar."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from osa_sdk.contract import (
    ENV_FILES,
    ENV_HOOK_NAME,
    ENV_IN,
    ENV_MEMORY_LIMIT_MB,
    ENV_OUT,
)

from osa_dagster.engine.runners.base import (
    Invocation,
    image_command,
)
from osa_dagster.engine.runners.kubernetes.config import (
    HOOK_CONTAINER,
    LABEL_ATTEMPT,
    LABEL_HOOK,
    LABEL_MANAGED_BY,
    LABEL_NETWORK,
    LABEL_ROLE,
    MANAGED_BY,
    NETWORK_ALLOWED,
    POD_FILES,
    POD_IN,
    POD_OUT,
    POD_TMP,
    ROLE_HOOK_ATTEMPT,
    STAGE_IN_CONTAINER,
    STAGE_OUT_CONTAINER,
    KubernetesRunnerConfig,
    StagedAttempt,
    Staging,
    memory_quantity,
)


def job_manifest(
    name: str,
    inv: Invocation,
    config: KubernetesRunnerConfig,
    staging: Staging,
    staged: StagedAttempt,
) -> dict[str, Any]:
    """The Job of one attempt (see the package doc for its containers and sandbox)."""
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
    if inv.network:
        labels[LABEL_NETWORK] = NETWORK_ALLOWED
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": config.namespace, "labels": labels},
        "spec": {
            "backoffLimit": 0,  # a retry is the engine's decision, at the memory it chooses
            "activeDeadlineSeconds": math.ceil(inv.timeout_s + config.staging_allowance_s),
            "ttlSecondsAfterFinished": config.ttl_after_finished_s,
            "template": {
                "metadata": {"labels": labels},
                "spec": _pod_spec(inv, config, staging, staged),
            },
        },
    }


def _pod_spec(
    inv: Invocation, config: KubernetesRunnerConfig, staging: Staging, staged: StagedAttempt
) -> dict[str, Any]:
    """The pod: its sandbox, the two stagers, the hook, and the volumes they share."""
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
        "initContainers": _stager_containers(inv, config, staging, staged),
        "containers": [_hook_container(inv, config)],
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
    return spec


def _hook_container(inv: Invocation, config: KubernetesRunnerConfig) -> dict[str, Any]:
    """The hook under the contract: inputs read-only, the out folder and /tmp its only
    writable places, memory request = limit = the attempt's limit."""
    memory = memory_quantity(inv.memory_limit_mb)
    resources: dict[str, dict[str, str]] = {
        "requests": {"memory": memory, "cpu": config.cpu_request},
        "limits": {"memory": memory},
    }
    if config.cpu_limit is not None:
        resources["limits"]["cpu"] = config.cpu_limit
    contract_env = {
        ENV_IN: POD_IN,
        ENV_OUT: POD_OUT,
        ENV_FILES: POD_FILES,
        ENV_HOOK_NAME: inv.env.get(ENV_HOOK_NAME, "hook"),
        ENV_MEMORY_LIMIT_MB: str(inv.memory_limit_mb),
    }
    env = (
        {"HOME": POD_TMP, "TMPDIR": POD_TMP, "PYTHONDONTWRITEBYTECODE": "1"}
        | dict(inv.env)
        | contract_env
    )
    return {
        "name": HOOK_CONTAINER,
        "image": inv.image,
        "imagePullPolicy": config.image_pull_policy,
        "command": image_command(inv.command),
        "workingDir": POD_TMP,
        "env": [{"name": k, "value": v} for k, v in env.items()],
        "resources": resources,
        "securityContext": _container_security(),
        "volumeMounts": [
            {"name": "in", "mountPath": POD_IN, "readOnly": True},
            {"name": "files", "mountPath": POD_FILES, "readOnly": True},
            {"name": "out", "mountPath": POD_OUT},
            {"name": "tmp", "mountPath": POD_TMP},
        ],
    }


def _stager_containers(
    inv: Invocation, config: KubernetesRunnerConfig, staging: Staging, staged: StagedAttempt
) -> list[dict[str, Any]]:
    """stage-in (an init container) and stage-out (a native sidecar): the only containers
    with the staging credentials."""
    memory = memory_quantity(config.stager_memory_mb)
    env = [{"name": k, "value": v} for k, v in sorted(staging.pod_env().items())]
    env.append({"name": "HOME", "value": POD_TMP})
    common: dict[str, Any] = {
        "image": config.stager_image or inv.image,
        "imagePullPolicy": config.image_pull_policy,
        "env": env,
        "envFrom": [{"secretRef": {"name": config.staging_secret}}]
        if config.staging_secret
        else [],
        "resources": {
            "requests": {"memory": memory, "cpu": "100m"},
            "limits": {"memory": memory},
        },
        "securityContext": _container_security(),
    }
    stage_in = {
        "name": STAGE_IN_CONTAINER,
        **common,
        "command": [
            "python3",
            "-m",
            "osa_sdk.remote",
            "stage-in",
            f"{staging.url(staged.inputs)}={POD_IN}",
            f"{staging.url(staged.files)}={POD_FILES}",
        ],
        "volumeMounts": [
            {"name": "in", "mountPath": POD_IN},
            {"name": "files", "mountPath": POD_FILES},
            {"name": "stage-tmp", "mountPath": POD_TMP},
        ],
    }
    stage_out = {
        "name": STAGE_OUT_CONTAINER,
        **common,
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
        "volumeMounts": [
            {"name": "out", "mountPath": POD_OUT, "readOnly": True},
            {"name": "stage-tmp", "mountPath": POD_TMP},
        ],
    }
    return [stage_in, stage_out]


def _container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def manifest_memory(manifest: Mapping[str, Any]) -> str:
    [hook] = manifest["spec"]["template"]["spec"]["containers"]
    return str(hook["resources"]["limits"]["memory"])
