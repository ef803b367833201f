"""What every runner shares: an attempt's invocation and exit, the marker that finds its
processes again, the protocols the engine talks to, and the rules all runners apply alike.

The engine talks to `Runner` and `RunningAttempt` only. `local` runs a hook as a local
process, `docker` in a container, `kubernetes` as a Job.
"""

from __future__ import annotations

import os
import re
import signal
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from osa_sdk.contract import EXIT_MEMORY_ERROR
from pydantic import BaseModel, ConfigDict

# How an attempt's memory limit was enforced: a cgroup of our own, RLIMIT_AS (approximate),
# the container platform (Docker, Kubernetes), which puts the container in a cgroup, or not
# at all ("none": OSA_HOOK_MEMORY_LIMITS=off).
LimitMode = Literal["cgroup", "rlimit", "container", "none"]

# Where the contract's folders appear to a hook that runs isolated: in a container, a pod or
# the local sandbox.
ISOLATED_IN = "/osa/in"
ISOLATED_OUT = "/osa/out"
ISOLATED_FILES = "/osa/files"

TAIL_BYTES = 4096
# Container runtimes report a process killed by signal N as exit code 128 + N.
_SIGNAL_EXIT_BASE = 128


@dataclass(frozen=True)
class Invocation:
    """One attempt of a hook: what to run, where its contract folders are, and its limits."""

    command: Sequence[str]
    env: Mapping[str, str]
    in_dir: Path
    out_dir: Path
    files_root: Path
    memory_limit_mb: int
    timeout_s: float
    log_path: Path  # the hook's stdout and stderr
    image: str | None = None  # the hook's container image, for container runners
    network: bool = False  # the hook's spec opts in to the network (sandboxed runners)


@dataclass(frozen=True)
class AttemptExit:
    returncode: int  # negative: killed by that signal
    oom_killed: bool  # the kernel OOM killer acted (an exit by SIGKILL alone proves nothing)
    timed_out: bool
    peak_memory_mb: float | None
    stderr_tail: str
    limit_mode: LimitMode
    # Why the platform ended the attempt when the hook itself did not ("Evicted",
    # "ImagePullBackOff", "DeadlineExceeded", "NodeLost"...). Never a reason to add memory.
    failure: str | None = None

    @property
    def out_of_memory(self) -> bool:
        """A kernel OOM kill, or a hook that met MemoryError (how RLIMIT_AS shows)."""
        return self.oom_killed or self.returncode == EXIT_MEMORY_ERROR


class AttemptMarker(BaseModel):
    """Enough to find an attempt's processes again after the orchestrator died."""

    model_config = ConfigDict(frozen=True)

    runner: str = "local"
    limit_mode: LimitMode
    # Local attempts: the hook's process and group.
    pid: int | None = None
    pgid: int | None = None
    # The kernel start time of `pid` and the boot it belongs to: tell our hook apart from a
    # later process that reused its pid.
    start_ticks: int | None = None
    boot_id: str | None = None
    cgroup: str | None = None
    pids_cgroup: str | None = None
    # Container attempts: the container's or job's name, unique per attempt.
    container: str | None = None


class RunningAttempt(Protocol):
    @property
    def marker(self) -> AttemptMarker: ...

    def wait(self, timeout: float) -> AttemptExit | None:
        """The exit, or None if the hook still runs after `timeout` seconds."""
        ...

    def kill(self) -> None: ...


class Runner(Protocol):
    def start(self, inv: Invocation) -> RunningAttempt: ...

    def kill_leftovers(self, marker: AttemptMarker) -> None:
        """Kill whatever is left of an attempt whose orchestrator died; safe to repeat."""
        ...


def readable_by_hooks(*folders: Path) -> None:
    """Let a hook that runs as another user (sandboxed, in a container) into its input
    folders: a staging copy is made private (0700) by default, and a bind mount keeps the
    permissions of the folder itself. What is inside is readable already."""
    for folder in folders:
        if folder.is_dir():
            mode = folder.stat().st_mode
            if mode & 0o005 != 0o005:
                folder.chmod(mode | 0o055)


def read_tail(path: Path, limit: int = TAIL_BYTES) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - limit))
            return f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def returncode_from_exit_code(exit_code: int) -> int:
    """A container's exit code as a local process's returncode: 128+N (the hook died of
    signal N) becomes -N, as `subprocess` reports it."""
    signal_number = exit_code - _SIGNAL_EXIT_BASE
    if 0 < signal_number < signal.NSIG:
        return -signal_number
    return exit_code


def image_command(command: Iterable[str]) -> list[str]:
    """The hook's command inside its image: the host's interpreter becomes the image's."""
    parts = list(command)
    if parts and (
        parts[0] == sys.executable or re.fullmatch(r"python[0-9.]*", Path(parts[0]).name)
    ):
        parts[0] = "python3"
    return parts


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from field 3 (the state) on, or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and ")": split after its last ")".
    return stat.rpartition(")")[2].split()


def process_start_ticks(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])  # field 22: the start time


def still_running(pid: int, start_ticks: int | None, boot: str | None) -> bool:
    """Whether the process that had this pid, kernel start time and boot still runs (a
    zombie, killed and not yet reaped, does not; a later process with its pid is another)."""
    if start_ticks is None or boot != boot_id():
        return False
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z" and int(fields[19]) == start_ticks


def boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None
