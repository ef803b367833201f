"""Runs whose worker died are found and failed, so that retries and queues move on.

When the orchestrator dies (a `kill -9` of `dagster dev`, a lost machine), its runs stay
STARTED for ever: Dagster's run monitoring asks the run launcher whether each run's worker
is alive, and the default launcher cannot tell. So every run worker records who it is
(host, boot, pid namespace, pid and process start) as the run tag `osa/worker` when it
starts executing, and `WorkerCheckingRunLauncher`, the default launcher plus that check,
answers the monitoring daemon: a worker on this machine whose process is gone has FAILED.
The daemon then reports the run failed through the instance, which frees its slot in the
run queue and lets the instance's run retries run it again (ingest runs retry ALL_STEPS;
steps resume from their checkpoints and take the dead worker's batch leases over at once).
A worker elsewhere (another host, a container) cannot be checked from here and counts as
running: such a run needs the launcher of its platform (Docker, Kubernetes), which checks
its own workers.

Runs launched through the instance record the tag from their executor (`recording_worker`),
runs executed in a process of our own (`osa materialize`) pass `worker_tags()` when they
are created.
"""

from __future__ import annotations

from collections.abc import Iterator

import dagster as dg
from pydantic import ValidationError

from osa_dagster.defs.dagster_private import (
    CheckRunHealthResult,
    ExecutionPlan,
    PlanOrchestrationContext,
    RetryMode,
    StepDependencyConfig,
    WorkerStatus,
)
from osa_dagster.engine.process_identity import ProcessIdentity

WORKER_TAG = "osa/worker"


def worker_tags() -> dict[str, str]:
    """The tag naming this process as the worker of a run it executes."""
    return {WORKER_TAG: ProcessIdentity.of_this_process().model_dump_json()}


class _WorkerRecordingExecutor(dg.Executor):
    """Records the run worker (the process that orchestrates the steps) on the run, then
    executes the plan with the executor it wraps."""

    def __init__(self, inner: dg.Executor) -> None:
        self._inner = inner

    def execute(
        self, plan_context: PlanOrchestrationContext, execution_plan: ExecutionPlan
    ) -> Iterator[dg.DagsterEvent]:
        plan_context.instance.add_run_tags(plan_context.run_id, worker_tags())
        return self._inner.execute(plan_context, execution_plan)

    @property
    def retries(self) -> RetryMode:
        return self._inner.retries

    @property
    def step_dependency_config(self) -> StepDependencyConfig:
        return self._inner.step_dependency_config


def recording_worker(executor_def: dg.ExecutorDefinition) -> dg.ExecutorDefinition:
    """`executor_def`, configured as it is, whose runs record their worker."""
    create = executor_def.executor_creation_fn
    if create is None:
        raise ValueError(f"executor {executor_def.name!r} cannot create an executor")

    def create_recording(init_context: dg.InitExecutorContext) -> dg.Executor:
        return _WorkerRecordingExecutor(create(init_context))

    return dg.ExecutorDefinition(
        name=executor_def.name,
        # A definition's schema is taken as it is, though the annotation names only the
        # user-facing forms (convert_user_facing_definition_config_schema).
        config_schema=executor_def.config_schema,  # type: ignore[arg-type]
        requirements=executor_def.get_requirements,
        executor_creation_fn=create_recording,
        description=executor_def.description,
    )


def worker_health(run: dg.DagsterRun, parent_worker: str | None = None) -> CheckRunHealthResult:
    """Whether the run's recorded worker still runs, as far as this machine can tell.
    `parent_worker`: the worker tag of the run this one retries, which Dagster copies into
    the retry with the other tags until the retry's own worker records itself."""
    recorded = run.tags.get(WORKER_TAG)
    if recorded is None or recorded == parent_worker:
        # Not recorded yet (between the run's start and its executor's), or a run from
        # an older version: nothing to judge it by.
        return CheckRunHealthResult(WorkerStatus.RUNNING, "no worker recorded yet")
    try:
        worker = ProcessIdentity.model_validate_json(recorded)
    except ValidationError:
        # Failing a run that may be alive is worse than leaving a dead one to the timeouts.
        return CheckRunHealthResult(WorkerStatus.RUNNING, f"unreadable {WORKER_TAG} tag")
    alive = worker.alive()
    if alive is False:
        return CheckRunHealthResult(
            WorkerStatus.FAILED, f"its worker, {worker.describe()}, is gone"
        )
    how = "alive" if alive else "on another machine or in a container; not checked"
    return CheckRunHealthResult(WorkerStatus.RUNNING, f"worker {worker.describe()}: {how}")


class WorkerCheckingRunLauncher(dg.DefaultRunLauncher):
    """Dagster's default launcher, which also tells run monitoring whether a run's worker
    is alive (see the module doc). Name it as the instance's `run_launcher`."""

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: dg.DagsterRun) -> CheckRunHealthResult:
        parent = self._instance.get_run_by_id(run.parent_run_id) if run.parent_run_id else None
        return worker_health(run, parent.tags.get(WORKER_TAG) if parent else None)
