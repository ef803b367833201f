"""The records database: published records and their features, keyed by SRN."""

from osa_dagster.records.database import RecordsDatabase, database_url_from_env, open_database
from osa_dagster.records.models import Base, Feature, Record
from osa_dagster.records.publish import (
    FeatureRows,
    PublishResult,
    RecordToPublish,
    find_srns,
    make_srn,
    publish_records,
    store_features,
)

__all__ = [
    "Base",
    "Feature",
    "FeatureRows",
    "PublishResult",
    "Record",
    "RecordToPublish",
    "RecordsDatabase",
    "database_url_from_env",
    "find_srns",
    "make_srn",
    "open_database",
    "publish_records",
    "store_features",
]
