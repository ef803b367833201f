"""The few private Dagster names the project relies on, imported in this one module: a
Dagster upgrade that moves them breaks here, and nowhere else."""

from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)
from dagster._core.definitions.metadata.metadata_set import UriMetadataSet
from dagster._core.event_api import EventHandlerFn
from dagster._core.events import DagsterEvent
from dagster._core.execution.context.system import PlanOrchestrationContext
from dagster._core.execution.plan.plan import ExecutionPlan
from dagster._core.execution.plan.resume_retry import ReexecutionStrategy
from dagster._core.execution.retries import RetryMode
from dagster._core.execution.step_dependency_config import StepDependencyConfig
from dagster._core.executor.base import Executor
from dagster._core.executor.step_delegating import StepDelegatingExecutor
from dagster._core.launcher.base import CheckRunHealthResult, WorkerStatus
from dagster._core.storage.event_log.sqlite.sqlite_event_log import (
    INDEX_SHARD_NAME,
    SqliteEventLogStorage,
    SqliteEventLogStorageWatchdog,
)
from dagster._core.storage.sqlite import SQLITE_BUSY_TIMEOUT_SECONDS
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    RETRY_STRATEGY_TAG,
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


__all__ = [
    "ASSET_PARTITION_RANGE_END_TAG",
    "ASSET_PARTITION_RANGE_START_TAG",
    "INDEX_SHARD_NAME",
    "SQLITE_BUSY_TIMEOUT_SECONDS",
    "AssetCheckEvaluationTargetMaterializationData",
    "CheckRunHealthResult",
    "ConfigurableClassData",
    "DagsterEvent",
    "EventHandlerFn",
    "ExecutionPlan",
    "Executor",
    "PlanOrchestrationContext",
    "RetryMode",
    "SqliteEventLogStorage",
    "SqliteEventLogStorageWatchdog",
    "StepDelegatingExecutor",
    "StepDependencyConfig",
    "UriMetadataSet",
    "WorkerStatus",
    "hash_str",
    "partition_range_tags",
    "retry_all_steps_tags",
]
