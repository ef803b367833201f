"""Who a process is, in a form another process can check later: is it still alive?

A batch lease names the process holding it, and a Dagster run names its worker, with a
`ProcessIdentity`. Another process on the same machine (same host name, same boot, same
pid namespace) can then tell for certain whether that process still runs: its pid exists
and started at the same kernel tick (a reused pid starts later). Elsewhere, nothing certain
can be said, and the caller falls back to a heartbeat. No Dagster here.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from osa_dagster.engine.runners.base import boot_id, process_start_ticks


def pid_namespace() -> str | None:
    """The pid namespace of this process (a container has its own): pids are only
    comparable within one."""
    try:
        return str(Path("/proc/self/ns/pid").readlink())
    except OSError:
        return None


def _zombie(pid: int) -> bool:
    """A process that has exited and waits for its parent to read its status."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] == "Z"


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
        """A process of this machine, by pid."""
        return cls(
            host=socket.gethostname(),
            boot_id=boot_id(),
            pid_namespace=pid_namespace(),
            pid=pid,
            start_ticks=process_start_ticks(pid),
        )

    def checkable_here(self) -> bool:
        """Whether this process can see that one's pid: same host, boot and pid namespace."""
        here = ProcessIdentity.of_this_process()
        return (
            self.boot_id is not None
            and self.pid_namespace is not None
            and self.start_ticks is not None
            and (self.host, self.boot_id, self.pid_namespace)
            == (here.host, here.boot_id, here.pid_namespace)
        )

    def alive(self) -> bool | None:
        """True or False when checkable here; None when only a heartbeat can tell."""
        if not self.checkable_here():
            return None
        return process_start_ticks(self.pid) == self.start_ticks and not _zombie(self.pid)

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}"
