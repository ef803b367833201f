"""osa-sdk: write hooks and ingesters for the OSA archive."""

from osa_sdk.contract import files_dir_for
from osa_sdk.types import (
    ErrorLine,
    FeaturesLine,
    HookRecord,
    HookRecordId,
    IngesterFileRef,
    IngesterRecord,
    OutcomeStatus,
    RecordRef,
    Reject,
    RejectionLine,
)

__all__ = [
    "ErrorLine",
    "FeaturesLine",
    "HookRecord",
    "HookRecordId",
    "IngesterFileRef",
    "IngesterRecord",
    "OutcomeStatus",
    "RecordRef",
    "Reject",
    "RejectionLine",
    "files_dir_for",
]
