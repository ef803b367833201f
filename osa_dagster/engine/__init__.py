"""Run one hook over one batch of records: runners, memory escalation, checkpoint, outcomes.

Pure Python without Dagster, so that the engine can be tested, benchmarked and reused on its
own; the Dagster layer (osa_dagster.defs) runs it from a step, through osa_dagster.batch.
"""

from osa_dagster.engine.capacity import Admission, Cancelled, HookCapacity
from osa_dagster.engine.checkpoint import (
    Anomaly,
    AttemptRecord,
    Checkpoint,
    CheckpointIO,
    FileCheckpointIO,
    InFlightAttempt,
    RecordOutcome,
)
from osa_dagster.engine.hook_run import (
    LARGE_LANE,
    HookBatch,
    HookProgress,
    advance_hook,
    run_hook,
)
from osa_dagster.engine.memory_history import (
    FileMemoryHistoryIO,
    MemoryHistory,
    MemoryHistoryIO,
    update_history,
)
from osa_dagster.engine.outputs import OutputReader, harvest
from osa_dagster.engine.runners import (
    AttemptExit,
    AttemptMarker,
    Invocation,
    LimitMode,
    LocalRunner,
    MemoryLimitsUnavailable,
    Runner,
    RunningAttempt,
    kill_leftovers,
    memory_limit_mode,
)
from osa_dagster.engine.spec import HookSpec, MemoryPolicy

__all__ = [
    "LARGE_LANE",
    "Admission",
    "Anomaly",
    "AttemptExit",
    "AttemptMarker",
    "AttemptRecord",
    "Cancelled",
    "Checkpoint",
    "CheckpointIO",
    "FileCheckpointIO",
    "FileMemoryHistoryIO",
    "HookBatch",
    "HookCapacity",
    "HookProgress",
    "HookSpec",
    "InFlightAttempt",
    "Invocation",
    "LimitMode",
    "LocalRunner",
    "MemoryHistory",
    "MemoryHistoryIO",
    "MemoryLimitsUnavailable",
    "MemoryPolicy",
    "OutputReader",
    "RecordOutcome",
    "Runner",
    "RunningAttempt",
    "advance_hook",
    "harvest",
    "kill_leftovers",
    "memory_limit_mode",
    "run_hook",
    "update_history",
]
