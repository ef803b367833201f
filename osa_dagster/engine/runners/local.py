"""The local runner: a hook as a local process in its own session, under a real memory
limit (a cgroup v1 memory controller of our own, or RLIMIT_AS where there is none), and
sandboxed (runners/sandbox.py) wherever that can run."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import resource
import secrets
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

from osa_sdk.contract import BYTES_PER_MB, ENV_OUT

from osa_dagster.engine.cgroup import (
    CGROUP_ROOT,
    NAME_PREFIX,
    PIDS_ROOT,
    Cgroup,
    MemoryCgroup,
    PidsCgroup,
    usable_parent,
    usable_pids_parent,
)
from osa_dagster.engine.runners.base import (
    AttemptExit,
    AttemptMarker,
    Invocation,
    LimitMode,
    boot_id,
    process_start_ticks,
    read_tail,
    readable_by_hooks,
    returncode_from_exit_code,
)
from osa_dagster.engine.runners.sandbox import (
    Sandbox,
    SandboxMode,
    SandboxPolicy,
    SandboxUnavailable,
    find_sandbox,
)
from osa_dagster.settings import settings

log = logging.getLogger(__name__)

# What a local hook inherits from the orchestrator's environment: enough to find programs
# and a virtualenv, never the orchestrator's credentials.
INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "VIRTUAL_ENV", "PYTHONPATH")
_PR_SET_PDEATHSIG = 1


def memory_limit_mode() -> LimitMode:
    """How LocalRunner limits memory on this machine."""
    return "cgroup" if usable_parent() is not None else "rlimit"


@functools.cache
def _warn_limits_approximate() -> None:
    # Cached so that the warning is logged once per process, not once per attempt.
    log.warning(
        "No usable cgroup v1 memory controller (it needs root and /sys/fs/cgroup/memory): "
        "hook memory limits fall back to RLIMIT_AS and are APPROXIMATE. They cap address "
        "space, not resident memory, and an over-limit hook gets MemoryError instead of an "
        "OOM kill."
    )


@functools.cache
def _warn_unsandboxed(reason: str) -> None:
    log.warning(
        "Hooks run UNSANDBOXED and must be trusted: they run as this user, see the whole "
        "machine and reach the network (%s; OSA_HOOK_SANDBOX=on refuses to run this way).",
        reason,
    )


def choose_sandbox(mode: SandboxMode, policy: SandboxPolicy) -> Sandbox | None:
    """The sandbox for `mode`: "off" none; "on" one, or SandboxUnavailable; "auto" one where
    possible, else none and a warning, once per process."""
    if mode == "off":
        return None
    try:
        return find_sandbox(policy)
    except SandboxUnavailable as unavailable:
        if mode == "on":
            raise
        _warn_unsandboxed(str(unavailable))
        return None


class LocalRunner:
    """Runs a hook as a local process in its own session, under a real memory limit.

    `mode="auto"` uses a cgroup when it can and otherwise falls back to RLIMIT_AS, with a
    warning (once per process); "cgroup" and "rlimit" force a mode. `sandbox` ("auto", "on"
    or "off"; None: OSA_HOOK_SANDBOX, else "auto") runs each attempt sandboxed under
    `sandbox_policy` (None: its defaults, with OSA_HOOK_SANDBOX_USER). Start attempts from a
    thread that lives as long as they do: PR_SET_PDEATHSIG fires when the *thread* that
    forked the hook exits.
    """

    def __init__(
        self,
        mode: Literal["auto", "cgroup", "rlimit"] = "auto",
        inherit_env: Sequence[str] = INHERITED_ENV,
        sandbox: SandboxMode | None = None,
        sandbox_policy: SandboxPolicy | None = None,
    ) -> None:
        limit_mode: LimitMode = memory_limit_mode() if mode == "auto" else mode
        if mode == "auto" and limit_mode == "rlimit":
            _warn_limits_approximate()
        elif mode == "cgroup" and usable_parent() is None:
            raise RuntimeError(
                "cgroup memory limits requested, but no cgroup v1 memory controller is usable"
            )
        self.limit_mode = limit_mode
        self.inherit_env = tuple(inherit_env)
        self._cgroup_parent = usable_parent() if limit_mode == "cgroup" else None
        if sandbox is None or sandbox_policy is None:
            configured = settings()
            uid, gid = configured.hook_sandbox_ids
            sandbox = sandbox or configured.hook_sandbox
            sandbox_policy = sandbox_policy or SandboxPolicy(
                uid=uid, gid=gid, private=configured.local_data_folders
            )
        self.sandbox = choose_sandbox(sandbox, sandbox_policy)
        self._pids_parent = usable_pids_parent() if self.sandbox is not None else None

    def start(self, inv: Invocation) -> LocalAttempt:
        name = f"{NAME_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        cgroup = pids = None
        command = list(inv.command)
        env = {k: os.environ[k] for k in self.inherit_env if k in os.environ} | dict(inv.env)
        max_processes = None
        try:
            if self._cgroup_parent is not None:
                cgroup = MemoryCgroup.create(self._cgroup_parent, name, inv.memory_limit_mb)
            if self.sandbox is not None:
                policy = self.sandbox.policy
                if self._pids_parent is not None:
                    pids = PidsCgroup.create(self._pids_parent, name, policy.max_processes)
                else:
                    max_processes = policy.max_processes
                self.sandbox.prepare_output(inv.out_dir)
                readable_by_hooks(inv.in_dir, inv.files_root)
                command = self.sandbox.wrap(
                    inv.command,
                    in_dir=inv.in_dir,
                    out_dir=inv.out_dir,
                    files_root=inv.files_root,
                    network=inv.network,
                )
                env = self.sandbox.environment(inv.env)
            setup = _child_setup(
                cgroup_procs=[group.procs_file for group in (cgroup, pids) if group is not None],
                address_space=None if cgroup else inv.memory_limit_mb * BYTES_PER_MB,
                max_processes=max_processes,
                orchestrator=os.getpid(),
            )
            with inv.log_path.open("wb") as log_file:
                process = subprocess.Popen(
                    command,
                    env=env,
                    cwd=inv.log_path.parent,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=setup,
                )
        except BaseException:
            for group in (cgroup, pids):
                if group is not None:
                    group.remove()
            raise
        return LocalAttempt(process, inv, cgroup, pids, self.limit_mode, self.sandbox is not None)

    def kill_leftovers(self, marker: AttemptMarker) -> None:
        kill_leftovers(marker)


class LocalAttempt:
    def __init__(
        self,
        process: subprocess.Popen[bytes],
        inv: Invocation,
        cgroup: MemoryCgroup | None,
        pids: PidsCgroup | None,
        mode: LimitMode,
        sandboxed: bool,
    ) -> None:
        self._process = process
        self._inv = inv
        self._cgroup = cgroup
        self._pids = pids
        self._mode: LimitMode = mode
        self._sandboxed = sandboxed
        self._deadline = time.monotonic() + inv.timeout_s
        self._timed_out = False
        self._exit: AttemptExit | None = None
        self._pidfd = os.pidfd_open(process.pid) if hasattr(os, "pidfd_open") else None
        self.marker = AttemptMarker(
            limit_mode=mode,
            pid=process.pid,
            pgid=process.pid,  # start_new_session makes the hook its group's leader
            start_ticks=process_start_ticks(process.pid),
            boot_id=boot_id(),
            cgroup=str(cgroup.path) if cgroup else None,
            pids_cgroup=str(pids.path) if pids else None,
        )

    def wait(self, timeout: float) -> AttemptExit | None:
        if self._exit is not None:
            return self._exit
        remaining = self._deadline - time.monotonic()
        if not self._exited(max(0.0, min(timeout, remaining))):
            if time.monotonic() < self._deadline:
                return None
            self._timed_out = True
            self.kill()
            self._exited(None)
        return self._reap()

    def kill(self) -> None:
        # Once reaped, the pgid may name someone else's group: kill only what is ours.
        if self._exit is not None:
            return
        _killpg(self._process.pid)
        for group in (self._cgroup, self._pids):
            if group is not None:
                group.kill_all()

    def _exited(self, timeout: float | None) -> bool:
        """Whether the hook has exited; it stays a zombie, so its pid and pgid stay ours."""
        if self._pidfd is not None:
            readable, _, _ = select.select([self._pidfd], [], [], timeout)
            return bool(readable)
        deadline = None if timeout is None else time.monotonic() + timeout
        while os.waitid(os.P_PID, self._process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def _reap(self) -> AttemptExit:
        # Kill what the hook left running in its group while the zombie still holds the pgid.
        _killpg(self._process.pid)
        if self._cgroup is None and not self._sandboxed:
            # Without a cgroup, a child that left the group (setsid) is found by its environment.
            # A sandboxed one needs no search: its pid namespace ended with bubblewrap.
            _kill_marked(f"{ENV_OUT}={self._inv.out_dir}".encode())
        if self._pids is not None:
            self._pids.remove()
        _, status = os.waitpid(self._process.pid, 0)
        returncode = os.waitstatus_to_exitcode(status)
        if self._sandboxed:
            # bubblewrap reports a hook killed by signal N as exit code 128 + N.
            returncode = returncode_from_exit_code(returncode)
        self._process.returncode = returncode  # we reaped it: keep Popen from waiting again
        if self._pidfd is not None:
            os.close(self._pidfd)
        # Without a cgroup there is no peak to report: the child's ru_maxrss starts from the
        # copy of the orchestrator it was forked from, so it would show the orchestrator's size.
        oom_killed = False
        peak: float | None = None
        if self._cgroup is not None:
            oom_killed = self._cgroup.oom_kills() > 0
            peak = self._cgroup.peak_mb()
            self._cgroup.remove()
        self._exit = AttemptExit(
            returncode=returncode,
            oom_killed=oom_killed,
            timed_out=self._timed_out,
            peak_memory_mb=peak,
            stderr_tail=read_tail(self._inv.log_path),
            limit_mode=self._mode,
        )
        return self._exit


def kill_leftovers(marker: AttemptMarker) -> None:
    """Kill what is left of a local attempt whose orchestrator died, and remove its cgroup."""
    if marker.pid is None or marker.pgid is None or marker.boot_id != boot_id():
        return  # not a local attempt; or a reboot, which neither processes nor cgroups survive
    # A live leader with another start time means the pid was reused, which the kernel only
    # does once our whole group is gone; a vanished leader leaves the pgid to our group.
    if process_start_ticks(marker.pid) in (None, marker.start_ticks):
        _killpg(marker.pgid)
    for recorded, root in ((marker.cgroup, CGROUP_ROOT), (marker.pids_cgroup, PIDS_ROOT)):
        if recorded is None:
            continue
        path = Path(os.path.normpath(recorded))
        if path.parent.is_relative_to(root) and path.name.startswith(NAME_PREFIX):
            Cgroup(path).remove()
        else:
            log.warning("not touching %s: not a cgroup this runner creates", path)


def _child_setup(
    *,
    cgroup_procs: Sequence[Path],
    address_space: int | None,
    max_processes: int | None,
    orchestrator: int,
) -> Callable[[], None]:
    """What the forked child does before exec: nothing it allocates may escape the limits."""
    prctl = _prctl()

    def setup() -> None:
        for procs in cgroup_procs:
            fd = os.open(procs, os.O_WRONLY)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
        if address_space is not None:
            resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
        if max_processes is not None:
            # Root ignores it; it binds the hook once the sandbox has dropped to its user.
            # It counts every process of that user on the machine, not this attempt's only.
            resource.setrlimit(resource.RLIMIT_NPROC, (max_processes, max_processes))
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
            # The orchestrator may have died before the prctl above took effect.
            if os.getppid() != orchestrator:
                os._exit(1)

    return setup


@functools.cache
def _prctl() -> Callable[..., int] | None:
    # Loaded in the parent: the child between fork and exec should do as little as it can.
    if not sys.platform.startswith("linux"):
        return None
    return ctypes.CDLL(None, use_errno=True).prctl


def _kill_marked(variable: bytes) -> None:
    """SIGKILL every process whose environment holds `variable` (b"NAME=value"). Best effort: a
    process that cleared its environment is not found; only a cgroup finds everything."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if variable in environ.split(b"\0"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(entry.name), signal.SIGKILL)


def _killpg(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
