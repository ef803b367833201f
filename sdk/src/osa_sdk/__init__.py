"""osa-sdk: write hooks and ingesters for the OSA archive."""

from osa_sdk.authoring import FetchContext, Hook, Ingester, PendingFile, hook, ingester
from osa_sdk.contract import EXIT_CONTRACT_ERROR, EXIT_MEMORY_ERROR, bytes_to_mb, files_dir_for
from osa_sdk.runtime import ContractError, HookOutOfMemory, IngestError, run_hook, run_ingest
from osa_sdk.types import (
    ErrorLine,
    FailedRef,
    FeaturesLine,
    HookRecord,
    HookRecordId,
    HookSummary,
    IngesterFileRef,
    IngesterRecord,
    IngestReport,
    OutcomeStatus,
    RecordRef,
    Reject,
    RejectionLine,
    SkippedRecord,
)

__all__ = [
    "EXIT_CONTRACT_ERROR",
    "EXIT_MEMORY_ERROR",
    "ContractError",
    "ErrorLine",
    "FailedRef",
    "FeaturesLine",
    "FetchContext",
    "Hook",
    "HookOutOfMemory",
    "HookRecord",
    "HookRecordId",
    "HookSummary",
    "IngestError",
    "IngestReport",
    "Ingester",
    "IngesterFileRef",
    "IngesterRecord",
    "OutcomeStatus",
    "PendingFile",
    "RecordRef",
    "Reject",
    "RejectionLine",
    "SkippedRecord",
    "bytes_to_mb",
    "files_dir_for",
    "hook",
    "ingester",
    "run_hook",
    "run_ingest",
]
