"""Runners start one attempt of a hook under a memory limit and report how it ended.

`base` holds what they share; `local` runs a hook as a local process, `docker` in a
container, `kubernetes` as a Job. The Docker and Kubernetes clients are imported only by
their runner's module, so the engine loads neither unless it is chosen.
"""

from osa_dagster.engine.cgroup import MemoryLimitsUnavailable
from osa_dagster.engine.runners.base import (
    AttemptExit,
    AttemptMarker,
    Invocation,
    LimitMode,
    Runner,
    RunningAttempt,
    read_tail,
)
from osa_dagster.engine.runners.local import LocalRunner, kill_leftovers, memory_limit_mode

__all__ = [
    "AttemptExit",
    "AttemptMarker",
    "Invocation",
    "LimitMode",
    "LocalRunner",
    "MemoryLimitsUnavailable",
    "Runner",
    "RunningAttempt",
    "kill_leftovers",
    "memory_limit_mode",
    "read_tail",
]
