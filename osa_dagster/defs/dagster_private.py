"""The few private Dagster names the project relies on, imported in this one module: a
Dagster upgrade that moves them breaks here, and nowhere else."""

import dagster as dg
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)
from dagster._core.definitions.metadata.metadata_set import UriMetadataSet
from dagster._core.definitions.unresolved_asset_job_definition import UnresolvedAssetJobDefinition
from dagster._core.errors import DagsterExecutionInterruptedError
from dagster._core.event_api import EventHandlerFn
from dagster._core.events import DagsterEvent, JobFailureData, RunFailureReason
from dagster._core.execution.backfill import BULK_ACTION_TERMINAL_STATUSES
from dagster._core.execution.context.system import PlanOrchestrationContext
from dagster._core.execution.plan.plan import ExecutionPlan
from dagster._core.execution.plan.resume_retry import ReexecutionStrategy
from dagster._core.execution.retries import RetryMode, auto_reexecution_should_retry_run
from dagster._core.execution.step_dependency_config import StepDependencyConfig
from dagster._core.executor.base import Executor
from dagster._core.executor.step_delegating import StepDelegatingExecutor
from dagster._core.launcher.base import CheckRunHealthResult, WorkerStatus
from dagster._core.storage.compute_log_manager import CapturedLogContext
from dagster._core.storage.event_log.sqlite.sqlite_event_log import (
    INDEX_SHARD_NAME,
    SqliteEventLogStorage,
    SqliteEventLogStorageWatchdog,
)
from dagster._core.storage.local_compute_log_manager import LocalComputeLogManager
from dagster._core.storage.root import LocalArtifactStorage
from dagster._core.storage.runs import SqliteRunStorage
from dagster._core.storage.schedules import SqliteScheduleStorage
from dagster._core.storage.sqlite import SQLITE_BUSY_TIMEOUT_SECONDS
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    BACKFILL_ID_TAG,
    PARTITION_NAME_TAG,
    RETRY_STRATEGY_TAG,
    WILL_RETRY_TAG,
)
from dagster._serdes import ConfigurableClassData
from dagster_shared.serdes.utils import hash_str


def partition_range_tags(first: str, last: str) -> dict[str, str]:
    """The tags that make one run cover the partitions from `first` to `last`."""
    return {ASSET_PARTITION_RANGE_START_TAG: first, ASSET_PARTITION_RANGE_END_TAG: last}


def retry_all_steps_tags() -> dict[str, str]:
    """The tag that makes a run's retries re-execute every step of it. Dagster's default
    (FROM_FAILURE) plans every check of the run again but runs only unfinished steps, so the
    checks of finished steps stay "planned" for ever; FROM_ASSET_FAILURE skips a check that
    evaluated some partitions before the crash, leaving the others "planned". Every step is
    safe to repeat: hooks resume from their checkpoints and publishing is idempotent."""
    return {RETRY_STRATEGY_TAG: ReexecutionStrategy.ALL_STEPS.value}


def run_failure_reason(failure: DagsterEvent) -> RunFailureReason:
    """Why a run failed, as its failure event says: run monitoring fails a run whose worker
    died without naming a reason (UNKNOWN), a step that raised gives STEP_FAILURE."""
    data = failure.event_specific_data
    if isinstance(data, JobFailureData) and data.failure_reason is not None:
        return data.failure_reason
    return RunFailureReason.UNKNOWN


def will_be_retried(
    instance: dg.DagsterInstance, run: dg.DagsterRun, reason: RunFailureReason
) -> bool:
    """Whether the instance's run retries will run the failed `run` again, as its
    `dagster/will_retry` tag says. The instance writes that tag just after it stores the
    failure, so a sensor may see the failure first: it is then worked out as the instance
    does."""
    tag = run.tags.get(WILL_RETRY_TAG)
    if tag is not None:
        return tag == "true"
    return instance.run_retries_enabled and auto_reexecution_should_retry_run(
        instance, run.with_status(dg.DagsterRunStatus.FAILURE), reason
    )


def ended_backfill(instance: dg.DagsterInstance, run: dg.DagsterRun) -> str | None:
    """The id of the backfill that launched `run`, if that backfill has ended (completed,
    failed, canceled) or is gone: Dagster's run retries leave such a run alone."""
    backfill_id = run.tags.get(BACKFILL_ID_TAG)
    if backfill_id is None:
        return None
    backfill = instance.get_backfill(backfill_id)
    if backfill is None or backfill.status in BULK_ACTION_TERMINAL_STATUSES:
        return backfill_id
    return None


__all__ = [
    "ASSET_PARTITION_RANGE_END_TAG",
    "ASSET_PARTITION_RANGE_START_TAG",
    "INDEX_SHARD_NAME",
    "PARTITION_NAME_TAG",
    "SQLITE_BUSY_TIMEOUT_SECONDS",
    "AssetCheckEvaluationTargetMaterializationData",
    "CapturedLogContext",
    "CheckRunHealthResult",
    "ConfigurableClassData",
    "DagsterEvent",
    "DagsterExecutionInterruptedError",
    "EventHandlerFn",
    "ExecutionPlan",
    "Executor",
    "LocalArtifactStorage",
    "LocalComputeLogManager",
    "PlanOrchestrationContext",
    "RetryMode",
    "RunFailureReason",
    "SqliteEventLogStorage",
    "SqliteEventLogStorageWatchdog",
    "SqliteRunStorage",
    "SqliteScheduleStorage",
    "StepDelegatingExecutor",
    "StepDependencyConfig",
    "UnresolvedAssetJobDefinition",
    "UriMetadataSet",
    "WorkerStatus",
    "ended_backfill",
    "hash_str",
    "partition_range_tags",
    "retry_all_steps_tags",
    "run_failure_reason",
    "will_be_retried",
]
