"""The records database: published records and their features, keyed by SRN."""

from osa_dagster.records.database import (
    DatabaseNotReadable,
    RecordsDatabase,
    RecordsDatabaseUnusable,
    database_to_look_at,
    database_url,
    open_database,
    shown_database_url,
)
from osa_dagster.records.dead_letters import (
    DeadLetterRow,
    PoisonRecord,
    list_dead_letters,
    replace_dead_letters,
)
from osa_dagster.records.models import Base, DeadLetter, Feature, Record, RecordEvent
from osa_dagster.records.publish import (
    FeatureRows,
    PublishResult,
    RecordToPublish,
    find_srns,
    make_srns,
    publish_records,
    store_features,
)

__all__ = [
    "Base",
    "DatabaseNotReadable",
    "DeadLetter",
    "DeadLetterRow",
    "Feature",
    "FeatureRows",
    "PoisonRecord",
    "PublishResult",
    "Record",
    "RecordEvent",
    "RecordToPublish",
    "RecordsDatabase",
    "RecordsDatabaseUnusable",
    "database_to_look_at",
    "database_url",
    "find_srns",
    "list_dead_letters",
    "make_srns",
    "open_database",
    "publish_records",
    "replace_dead_letters",
    "shown_database_url",
    "store_features",
]
