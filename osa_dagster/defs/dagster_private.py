"""The few private Dagster names the project relies on, imported in this one module: a
Dagster upgrade that moves them breaks here, and nowhere else."""

from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)
from dagster._core.definitions.metadata.metadata_set import UriMetadataSet
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)
from dagster._serdes import ConfigurableClassData


def partition_range_tags(first: str, last: str) -> dict[str, str]:
    """The tags that make one run cover the partitions from `first` to `last`."""
    return {ASSET_PARTITION_RANGE_START_TAG: first, ASSET_PARTITION_RANGE_END_TAG: last}


__all__ = [
    "ASSET_PARTITION_RANGE_END_TAG",
    "ASSET_PARTITION_RANGE_START_TAG",
    "AssetCheckEvaluationTargetMaterializationData",
    "ConfigurableClassData",
    "UriMetadataSet",
    "partition_range_tags",
]
