"""What every runner shares: an attempt's invocation and exit, the marker that finds its
processes again, the protocols the engine talks to, and the rules all runners apply alike.

The engine talks to `Runner` and `RunningAttempt` only. `local` runs a hook as a local
process, `docker` in a container, `kubernetes` as a Job.
"""

from __future__ import annotations

import os
import re
import select
import signal
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from osa_sdk.contract import EXIT_MEMORY_ERROR, bytes_to_mb
from pydantic import BaseModel, ConfigDict

from osa_dagster.engine.process_identity import ProcessIdentity

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
# What is kept of a hook's stdout and stderr (its hook.log), whatever it prints: the start,
# which says what the hook set out to do, and a larger end, which holds the traceback. The
# middle of a longer log is dropped, and a line in its place says how much.
HOOK_LOG_HEAD_BYTES = 256 * 1024
HOOK_LOG_TAIL_BYTES = 768 * 1024
HOOK_LOG_MAX_BYTES = HOOK_LOG_HEAD_BYTES + HOOK_LOG_TAIL_BYTES
_PIPE_READ_BYTES = 64 * 1024
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
    # Local attempts: the hook's process, the leader of its own process group, told apart
    # from a later process that reuses its pid.
    process: ProcessIdentity | None = None
    cgroup: str | None = None
    pids_cgroup: str | None = None
    # Container attempts: the container's or job's name, unique per attempt.
    container: str | None = None

    @property
    def pid(self) -> int | None:
        """A local attempt's hook process (in the orchestrator's pid namespace)."""
        return None if self.process is None else self.process.pid


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


def dropped_marker(
    dropped: int | None, tail: str = f"last {HOOK_LOG_TAIL_BYTES // 1024} KiB"
) -> bytes:
    """The line that stands for the middle of a hook log, `dropped` bytes (None: unknown)."""
    how_much = "" if dropped is None else f" {bytes_to_mb(dropped):.1f} MB of"
    return (
        f"\n[...{how_much} the hook's output dropped here: a hook log keeps its first "
        f"{HOOK_LOG_HEAD_BYTES // 1024} KiB and its {tail} ...]\n"
    ).encode()


class HookLog:
    """A hook's log file kept to HOOK_LOG_MAX_BYTES and a marker, however much is written:
    the head goes to the file as it comes (so the file shows progress while the hook runs),
    the tail is held in memory and written, after the marker, when the log is closed."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("wb")
        self._head_left = HOOK_LOG_HEAD_BYTES
        self._tail = bytearray()
        self._dropped = 0

    def write(self, data: bytes) -> None:
        if self._head_left:
            head = data[: self._head_left]
            self._file.write(head)
            self._file.flush()
            self._head_left -= len(head)
            data = data[len(head) :]
        self._tail += data
        # Trimmed in bulk rather than at every write: at most twice the tail is ever held.
        if len(self._tail) > 2 * HOOK_LOG_TAIL_BYTES:
            excess = len(self._tail) - HOOK_LOG_TAIL_BYTES
            del self._tail[:excess]
            self._dropped += excess

    def close(self) -> None:
        if self._file.closed:
            return
        excess = max(0, len(self._tail) - HOOK_LOG_TAIL_BYTES)
        self._dropped += excess
        if self._dropped:
            self._file.write(dropped_marker(self._dropped))
        self._file.write(self._tail[excess:])
        self._file.close()

    def __enter__(self) -> HookLog:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class PipeToHookLog:
    """Drains the read end of a hook's stdout+stderr pipe into a HookLog, from a thread.

    A pipe nobody reads blocks its writer, so the thread reads as fast as the hook writes,
    however much: the hook is never slowed beyond a copy, and what the cap drops is only
    counted. `finish` is called once the hook has exited: what it left in the pipe is taken,
    without waiting for an end of file that a leftover child holding the pipe could deny.
    """

    def __init__(self, read_fd: int, path: Path) -> None:
        self._fd = read_fd
        self._log = HookLog(path)
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._drain, name=f"hook-log-{path}", daemon=True)
        self._thread.start()

    def finish(self) -> None:
        if self._wake_w == -1:
            return
        os.write(self._wake_w, b"x")
        self._thread.join()
        # Closed here, not by the thread: a write to a descriptor closed, and reused, meanwhile
        # would land in someone else's file.
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._wake_r = self._wake_w = -1

    def _drain(self) -> None:
        try:
            while True:
                readable, _, _ = select.select([self._fd, self._wake_r], [], [])
                if self._fd not in readable:
                    self._take_what_is_left()
                    return
                data = os.read(self._fd, _PIPE_READ_BYTES)
                if not data:
                    return
                self._log.write(data)
        finally:
            self._log.close()
            os.close(self._fd)

    def _take_what_is_left(self) -> None:
        """What the pipe holds now, at most its capacity: a writer that survived the hook
        could otherwise keep this going for ever."""
        os.set_blocking(self._fd, False)
        left = HOOK_LOG_MAX_BYTES
        while left > 0:
            try:
                data = os.read(self._fd, min(_PIPE_READ_BYTES, left))
            except BlockingIOError:
                return
            if not data:
                return
            self._log.write(data)
            left -= len(data)


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
