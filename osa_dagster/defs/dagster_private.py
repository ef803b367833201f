"""The few private Dagster names the project relies on, imported in this one module: a
Dagster upgrade that moves them breaks here, and nowhere else."""

from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)
from dagster._core.definitions.metadata.metadata_set import UriMetadataSet
from dagster._core.events import DagsterEvent
from dagster._core.execution.context.system import PlanOrchestrationContext
from dagster._core.execution.plan.plan import ExecutionPlan
from dagster._core.execution.retries import RetryMode
from dagster._core.executor.base import Executor
from dagster._core.executor.step_delegating import StepDelegatingExecutor
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)
from dagster._serdes import ConfigurableClassData
from dagster_shared.serdes.utils import hash_str


def partition_range_tags(first: str, last: str) -> dict[str, str]:
    """The tags that make one run cover the partitions from `first` to `last`."""
    return {ASSET_PARTITION_RANGE_START_TAG: first, ASSET_PARTITION_RANGE_END_TAG: last}


__all__ = [
    "ASSET_PARTITION_RANGE_END_TAG",
    "ASSET_PARTITION_RANGE_START_TAG",
    "AssetCheckEvaluationTargetMaterializationData",
    "ConfigurableClassData",
    "DagsterEvent",
    "ExecutionPlan",
    "Executor",
    "PlanOrchestrationContext",
    "RetryMode",
    "StepDelegatingExecutor",
    "UriMetadataSet",
    "hash_str",
    "partition_range_tags",
]
