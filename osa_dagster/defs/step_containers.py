"""dagster_docker's executor, with every step container removed when its step ends.

dagster_docker creates one container per step (per attempt) and never removes it: each run
of one partition left about ten exited containers behind. This executor runs the same step
handler and, as soon as the event log says a step succeeded, failed or is up for a retry,
waits for that step's container to exit (it may still be uploading its compute logs) and
removes it; whatever is left when the run ends (an interrupted run) is removed then.
Step containers carry STEP_LABEL (the data folder they work on), so a test or an operator
finds them again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import dagster as dg
import docker
import docker.errors
from dagster_docker import docker_executor

from osa_dagster.defs.dagster_private import (
    DagsterEvent,
    ExecutionPlan,
    Executor,
    PlanOrchestrationContext,
    RetryMode,
    StepDelegatingExecutor,
    hash_str,
)

log = logging.getLogger(__name__)

STEP_LABEL = "org.osa.dagster-step"
# How long a step's process may take to exit after its last event (compute log upload).
EXIT_WAIT_S = 120


def container_name(run_id: str, step_key: str) -> str:
    """The name dagster_docker gives a step's container; retries append "-<attempt>"."""
    return f"dagster-step-{hash_str(run_id + step_key)}"


def remove_step_containers(client: docker.DockerClient, name: str, *, wait: bool) -> None:
    """Remove the containers of one step (every attempt), after they exit if `wait`."""
    for container in client.containers.list(all=True, filters={"name": name}):
        if container.name != name and not container.name.startswith(f"{name}-"):
            continue
        try:
            if wait:
                container.wait(timeout=EXIT_WAIT_S)
            container.remove(force=True)
        except docker.errors.NotFound:
            pass  # removed meanwhile
        except Exception as error:
            log.warning("Step container %s could not be removed: %s.", container.name, error)


class StepContainersRemoved(Executor):
    """`inner` (dagster_docker's step-delegating executor), removing step containers."""

    def __init__(self, inner: StepDelegatingExecutor) -> None:
        self.inner = inner

    @property
    def retries(self) -> RetryMode:
        return self.inner.retries

    def execute(
        self, plan_context: PlanOrchestrationContext, execution_plan: ExecutionPlan
    ) -> Iterator[DagsterEvent]:
        client = docker.from_env()
        names = {
            key: container_name(plan_context.run_id, key)
            for key in execution_plan.step_keys_to_execute
        }
        try:
            for event in self.inner.execute(plan_context, execution_plan):
                yield event
                ended = event.is_step_success or event.is_step_failure or event.is_step_up_for_retry
                if ended and event.step_key in names:
                    remove_step_containers(client, names[event.step_key], wait=True)
        finally:
            for name in names.values():
                remove_step_containers(client, name, wait=False)


@dg.executor(
    name="docker",
    config_schema=docker_executor.config_schema.as_field(),
    requirements=docker_executor.get_requirements,
)
def removing_docker_executor(init_context: dg.InitExecutorContext) -> Executor:
    inner: Any = docker_executor.executor_creation_fn(init_context)  # type: ignore[misc]
    return StepContainersRemoved(inner)
