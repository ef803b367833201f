"""The cgroup v1 memory controller, as the local runner uses it: one child cgroup per attempt.

A cgroup gives what RLIMIT_AS cannot: a limit on resident memory of the whole process tree,
a kernel OOM kill that is told apart from any other SIGKILL (the `oom_kill` counter), the
peak usage, and a complete list of the attempt's processes even when they left its session.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Self

from osa_sdk.contract import BYTES_PER_MB

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
PIDS_ROOT = Path("/sys/fs/cgroup/pids")
# Every cgroup we create is named so; kill_leftovers refuses to touch any other one, since a
# checkpoint (maybe read from S3) must never be able to make us kill arbitrary processes.
NAME_PREFIX = "osa-"
_EMPTY_TIMEOUT_S = 5.0


def own_memory_cgroup() -> Path | None:
    """The v1 memory cgroup this process is in, or None when there is none."""
    return _own_cgroup("memory", CGROUP_ROOT, "memory.limit_in_bytes")


def _own_cgroup(controller: str, root: Path, control_file: str) -> Path | None:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            candidate = root / path.lstrip("/")
            return candidate if (candidate / control_file).is_file() else None
    return None


@functools.cache
def usable_parent() -> Path | None:
    """The cgroup under which attempt cgroups can be made, probed once per process.

    Probing by making a real child is the only reliable test: being root is not enough
    when /sys/fs/cgroup is mounted read-only, and old kernels lack the `oom_kill` counter.
    """
    parent = own_memory_cgroup()
    if parent is None:
        return None
    try:
        probe = MemoryCgroup.create(parent, f"{NAME_PREFIX}probe-{os.getpid()}", 64)
    except OSError:
        return None
    try:
        probe.oom_kills()
    except ValueError:
        return None
    finally:
        probe.remove()
    return parent


@functools.cache
def usable_pids_parent() -> Path | None:
    """The cgroup under which attempts' pids cgroups can be made (the cgroup v1 pids
    controller), probed once per process by making one; None when there is none."""
    parent = _own_cgroup("pids", PIDS_ROOT, "cgroup.procs")  # the root has no pids.max
    if parent is None:
        return None
    try:
        PidsCgroup.create(parent, f"{NAME_PREFIX}probe-{os.getpid()}", 1).remove()
    except OSError:
        return None
    return parent


class Cgroup:
    """One cgroup v1 folder of ours: its processes, killing them, removing it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def _made(cls, path: Path, settings: Iterable[tuple[str, str]]) -> Self:
        """A new cgroup at `path`, with each control file written in order; none on error."""
        group = cls(path)
        group.path.mkdir()
        try:
            for file_name, value in settings:
                (group.path / file_name).write_text(value)
        except OSError:
            group.remove()
            raise
        return group

    @property
    def procs_file(self) -> Path:
        return self.path / "cgroup.procs"

    def pids(self) -> list[int]:
        try:
            return [int(pid) for pid in self.procs_file.read_text().split()]
        except FileNotFoundError:
            return []

    def kill_all(self) -> None:
        """SIGKILL every process in the cgroup, again and again until none is left.

        Looping matters: a process may fork between our read of cgroup.procs and its kill.
        """
        deadline = time.monotonic() + _EMPTY_TIMEOUT_S
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.005)

    def remove(self) -> None:
        """Kill what is left in the cgroup and delete it."""
        self.kill_all()
        deadline = time.monotonic() + _EMPTY_TIMEOUT_S
        while True:
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as error:
                # EBUSY while the last killed processes are still exiting.
                if error.errno != errno.EBUSY or time.monotonic() > deadline:
                    log.warning("could not remove cgroup %s: %s", self.path, error)
                    return
                time.sleep(0.01)


class MemoryCgroup(Cgroup):
    @classmethod
    def create(cls, parent: Path, name: str, limit_mb: int) -> MemoryCgroup:
        limit = str(limit_mb * BYTES_PER_MB)
        settings = [("memory.limit_in_bytes", limit)]
        # With swap accounting, memory+swap must be capped too, or the kernel swaps the hook
        # out instead of OOM-killing it. It must be written after the plain limit (the kernel
        # rejects memsw < limit).
        if (parent / "memory.memsw.limit_in_bytes").exists():
            settings.append(("memory.memsw.limit_in_bytes", limit))
        return cls._made(parent / name, settings)

    def oom_kills(self) -> int:
        """How many processes of this cgroup the kernel OOM killer has killed."""
        for line in (self.path / "memory.oom_control").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        raise ValueError(f"{self.path}/memory.oom_control has no oom_kill counter (kernel < 4.13)")

    def peak_mb(self) -> float:
        """Peak usage; it counts page cache (files read and written), not only heap."""
        return int((self.path / "memory.max_usage_in_bytes").read_text()) / BYTES_PER_MB


class PidsCgroup(Cgroup):
    """A cap on how many processes an attempt may have at once: fork fails past it."""

    @classmethod
    def create(cls, parent: Path, name: str, max_pids: int) -> PidsCgroup:
        return cls._made(parent / name, [("pids.max", str(max_pids))])
