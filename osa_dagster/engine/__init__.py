"""Run one hook over one batch of records: runners, memory escalation, checkpoint, outcomes.

Pure Python without Dagster, so that the engine can be tested, benchmarked and reused on its
own; the Dagster layer (osa_dagster.defs) runs it from a step, through osa_dagster.batch.

Its names are imported on first use (PEP 562): a hook run by the SDK imports its
convention's package, which names HookSpec (engine.spec); importing the whole engine there
would add its runners, checkpoint and capacity ledger to every attempt's start-up.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
        AttemptOptions,
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

_MODULES = {
    "Admission": "osa_dagster.engine.capacity",
    "AttemptOptions": "osa_dagster.engine.hook_run",
    "Cancelled": "osa_dagster.engine.capacity",
    "HookCapacity": "osa_dagster.engine.capacity",
    "Anomaly": "osa_dagster.engine.checkpoint",
    "AttemptRecord": "osa_dagster.engine.checkpoint",
    "Checkpoint": "osa_dagster.engine.checkpoint",
    "CheckpointIO": "osa_dagster.engine.checkpoint",
    "FileCheckpointIO": "osa_dagster.engine.checkpoint",
    "InFlightAttempt": "osa_dagster.engine.checkpoint",
    "RecordOutcome": "osa_dagster.engine.checkpoint",
    "LARGE_LANE": "osa_dagster.engine.hook_run",
    "HookBatch": "osa_dagster.engine.hook_run",
    "HookProgress": "osa_dagster.engine.hook_run",
    "advance_hook": "osa_dagster.engine.hook_run",
    "run_hook": "osa_dagster.engine.hook_run",
    "FileMemoryHistoryIO": "osa_dagster.engine.memory_history",
    "MemoryHistory": "osa_dagster.engine.memory_history",
    "MemoryHistoryIO": "osa_dagster.engine.memory_history",
    "update_history": "osa_dagster.engine.memory_history",
    "OutputReader": "osa_dagster.engine.outputs",
    "harvest": "osa_dagster.engine.outputs",
    "AttemptExit": "osa_dagster.engine.runners",
    "AttemptMarker": "osa_dagster.engine.runners",
    "Invocation": "osa_dagster.engine.runners",
    "LimitMode": "osa_dagster.engine.runners",
    "LocalRunner": "osa_dagster.engine.runners",
    "MemoryLimitsUnavailable": "osa_dagster.engine.runners",
    "Runner": "osa_dagster.engine.runners",
    "RunningAttempt": "osa_dagster.engine.runners",
    "kill_leftovers": "osa_dagster.engine.runners",
    "memory_limit_mode": "osa_dagster.engine.runners",
    "HookSpec": "osa_dagster.engine.spec",
    "MemoryPolicy": "osa_dagster.engine.spec",
}


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "LARGE_LANE",
    "Admission",
    "Anomaly",
    "AttemptExit",
    "AttemptMarker",
    "AttemptOptions",
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
