"""Who a process is, in a form another process can check later: is it still alive?

The one answer to that question for the whole project: a batch lease names the process
holding it, a Dagster run its worker, a capacity ledger entry its holder and an attempt
marker its hook, each with a `ProcessIdentity`. Another process on the same machine (same
host name, same boot, same pid namespace) can tell for certain whether that process still
runs: its pid exists, is no zombie, and started at the same kernel tick (a reused pid starts
later). From anywhere else (another host, or another pid namespace: a step container of the
Docker executor has its own), nothing certain can be said: `alive()` is None and the caller
falls back to a heartbeat. A leaf module: nothing of the project below or above it.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pydantic import BaseModel, ConfigDict

_STATE = 0  # of the /proc/<pid>/stat fields after the command name: field 3, the state
_START_TICKS = 19  # field 22: when the process started, in clock ticks after boot


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/<pid>/stat from field 3 (the state) on, or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and ")": split after its last ")".
    return stat.rpartition(")")[2].split()


def process_start_ticks(pid: int) -> int | None:
    """When the process `pid` of this pid namespace started, or None when there is none."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[_START_TICKS])


def boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def pid_namespace() -> str | None:
    """The pid namespace of this process (a container has its own): pids are only
    comparable within one."""
    try:
        return str(Path("/proc/self/ns/pid").readlink())
    except OSError:
        return None


class ProcessIdentity(BaseModel):
    """A process, told apart from any later process that reuses its pid."""

    model_config = ConfigDict(frozen=True)

    host: str
    boot_id: str | None
    pid_namespace: str | None
    pid: int
    start_ticks: int | None

    @classmethod
    def of_this_process(cls) -> ProcessIdentity:
        return cls.of_pid(os.getpid())

    @classmethod
    def of_pid(cls, pid: int) -> ProcessIdentity:
        """The process `pid` of this pid namespace, as it is now."""
        return cls(
            host=socket.gethostname(),
            boot_id=boot_id(),
            pid_namespace=pid_namespace(),
            pid=pid,
            start_ticks=process_start_ticks(pid),
        )

    def checkable_here(self) -> bool:
        """Whether this process can see that one's pid: same host, boot and pid namespace."""
        return (
            self.boot_id is not None
            and self.pid_namespace is not None
            and self.start_ticks is not None
            and (self.host, self.boot_id, self.pid_namespace)
            == (socket.gethostname(), boot_id(), pid_namespace())
        )

    def alive(self) -> bool | None:
        """True or False when checkable here; None when only a heartbeat can tell."""
        if not self.checkable_here():
            return None
        fields = _stat_fields(self.pid)
        return (
            fields is not None
            and fields[_STATE] != "Z"
            and int(fields[_START_TICKS]) == self.start_ticks
        )

    def pid_reused(self) -> bool | None:
        """Whether another process now has this one's pid (so that the kernel has let its
        process group go too); None when not checkable here."""
        if not self.checkable_here():
            return None
        return process_start_ticks(self.pid) not in (None, self.start_ticks)

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}"
