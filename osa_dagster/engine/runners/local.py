"""The local runner: a hook as a local process in its own session, under a real memory
limit (a cgroup of our own, v1 or v2: engine/cgroup.py), and sandboxed (runners/sandbox.py)
wherever that can run.

Memory limits fail closed: where no cgroup can be had, the runner refuses to start, in one
line naming what is missing, unless OSA_HOOK_MEMORY_LIMITS says otherwise ("rlimit": an
approximate RLIMIT_AS; "off": none), and then every attempt's `limit_mode` says so.

The runner reads no setting itself: the CLI and the Dagster layer pass them down
(`LocalRunner.from_settings`)."""

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

from osa_sdk.contract import BYTES_PER_MB, ENV_OUT

from osa_dagster.engine.cgroup import (
    NAME_PREFIX,
    AttemptCgroups,
    Cgroup,
    MemoryCgroup,
    MemoryLimitsUnavailable,
    PidsCgroup,
    UnifiedCgroup,
    attempt_cgroups,
)
from osa_dagster.engine.process_identity import ProcessIdentity
from osa_dagster.engine.runners.base import (
    AttemptExit,
    AttemptMarker,
    Invocation,
    LimitMode,
    PipeToHookLog,
    read_tail,
    readable_by_hooks,
    returncode_from_exit_code,
)
from osa_dagster.engine.runners.sandbox import (
    Sandbox,
    SandboxMode,
    SandboxPolicy,
    find_sandbox,
)
from osa_dagster.settings import MemoryLimits, Settings

log = logging.getLogger(__name__)

# What a local hook inherits from the orchestrator's environment: enough to find programs
# and a virtualenv, never the orchestrator's credentials.
INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "VIRTUAL_ENV", "PYTHONPATH")
_PR_SET_PDEATHSIG = 1
DEFAULT_SANDBOX_POLICY = SandboxPolicy()


_LIMIT_MODES: dict[MemoryLimits, LimitMode] = {
    "cgroup": "cgroup",
    "rlimit": "rlimit",
    "off": "none",
}


def memory_limit_mode(configured: Settings) -> LimitMode:
    """How LocalRunner limits hooks' memory under these settings, checked before any work:
    MemoryLimitsUnavailable, in one line, where OSA_HOOK_MEMORY_LIMITS asks for cgroups (the
    default) and none can be had."""
    if configured.hook_memory_limits == "cgroup":
        attempt_cgroups(configured.cgroup_parent)
    return _LIMIT_MODES[configured.hook_memory_limits]


@functools.cache
def _warn_limits_not_enforced(mode: MemoryLimits) -> None:
    # Cached so that the warning is logged once per process, not once per attempt.
    what = {
        "rlimit": "APPROXIMATE: RLIMIT_AS caps address space, not resident memory, and an "
        "over-limit hook gets MemoryError instead of an OOM kill",
        "off": "NOT ENFORCED: a hook may use all the memory of the machine",
    }[mode]
    log.warning("OSA_HOOK_MEMORY_LIMITS=%s: hook memory limits are %s.", mode, what)


@functools.cache
def _warn_unsandboxed() -> None:
    log.warning(
        "Hooks run UNSANDBOXED (OSA_HOOK_SANDBOX=off) and must be trusted: they run as this "
        "user, see the whole machine and reach the network."
    )


def choose_sandbox(mode: SandboxMode, policy: SandboxPolicy) -> Sandbox | None:
    """The sandbox for `mode`: "on" one, or SandboxUnavailable; "off" none, said once per
    process."""
    if mode == "on":
        return find_sandbox(policy)
    _warn_unsandboxed()
    return None


def configured_sandbox_policy(configured: Settings) -> SandboxPolicy:
    """The sandbox policy of the settings: their hook user, their data folders private."""
    uid, gid = configured.hook_sandbox_ids
    return SandboxPolicy(uid=uid, gid=gid, private=configured.local_data_folders)


def require_promised_isolation(configured: Settings) -> None:
    """Refuse, before any work, to run local hooks with less isolation than the settings
    promise: MemoryLimitsUnavailable or SandboxUnavailable, in one line naming what is
    missing and how to get it."""
    if configured.hook_runner != "local":
        return
    memory_limit_mode(configured)
    if configured.hook_sandbox == "on":
        find_sandbox(configured_sandbox_policy(configured))


class LocalRunner:
    """Runs a hook as a local process in its own session, under a real memory limit.

    `memory_limits` is "cgroup" (a cgroup for each attempt, made under `cgroup_parent`; None:
    the orchestrator's own cgroup), or MemoryLimitsUnavailable where there is none; "rlimit"
    and "off" are the opt-outs, each with a warning (once per process) and said in every
    attempt's `limit_mode`. `sandbox` "on" runs each attempt sandboxed under
    `sandbox_policy`. Start attempts from a thread that lives as long as they do:
    PR_SET_PDEATHSIG fires when the *thread* that forked the hook exits.
    """

    def __init__(
        self,
        memory_limits: MemoryLimits = "cgroup",
        inherit_env: Sequence[str] = INHERITED_ENV,
        sandbox: SandboxMode = "on",
        sandbox_policy: SandboxPolicy = DEFAULT_SANDBOX_POLICY,
        cgroup_parent: Path | None = None,
    ) -> None:
        self.limit_mode: LimitMode = _LIMIT_MODES[memory_limits]
        self._cgroup_parent = cgroup_parent
        self._cgroups: AttemptCgroups | None = None
        if memory_limits == "cgroup":
            self._cgroups = attempt_cgroups(cgroup_parent)
        else:
            _warn_limits_not_enforced(memory_limits)
        self.inherit_env = tuple(inherit_env)
        self.sandbox = choose_sandbox(sandbox, sandbox_policy)
        self._max_processes = sandbox_policy.max_processes

    @classmethod
    def from_settings(
        cls,
        configured: Settings,
        memory_limits: MemoryLimits | None = None,
        *,
        sandbox: SandboxMode | None = None,
        sandbox_policy: SandboxPolicy | None = None,
    ) -> LocalRunner:
        """The runner the settings describe, but for what the arguments set otherwise."""
        return cls(
            memory_limits or configured.hook_memory_limits,
            sandbox=sandbox or configured.hook_sandbox,
            sandbox_policy=sandbox_policy or configured_sandbox_policy(configured),
            cgroup_parent=configured.cgroup_parent,
        )

    def start(self, inv: Invocation) -> LocalAttempt:
        name = f"{NAME_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        cgroup: MemoryCgroup | UnifiedCgroup | None = None
        pids: PidsCgroup | None = None
        command = list(inv.command)
        env = {k: os.environ[k] for k in self.inherit_env if k in os.environ} | dict(inv.env)
        try:
            if self._cgroups is not None:
                # On cgroup v1 only a sandboxed attempt has its processes capped, as ever: a
                # separate pids cgroup each; on v2 the one cgroup caps them at no extra cost.
                cgroup, pids = self._cgroups.create(
                    name,
                    inv.memory_limit_mb,
                    self._max_processes,
                    v1_pids=self.sandbox is not None,
                )
            limits_processes = isinstance(cgroup, UnifiedCgroup) or pids is not None
            if self.sandbox is not None:
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
                address_space=(
                    inv.memory_limit_mb * BYTES_PER_MB if self.limit_mode == "rlimit" else None
                ),
                # Without a cgroup to count them, a sandboxed hook's processes are capped by
                # RLIMIT_NPROC, which binds once the sandbox has dropped to its user.
                # A rootless sandbox caps them inside its own user namespace instead.
                max_processes=(
                    self._max_processes
                    if self.sandbox is not None
                    and not self.sandbox.rootless
                    and not limits_processes
                    else None
                ),
                orchestrator=os.getpid(),
            )
            process, hook_log = _start_logged(command, env, inv.log_path, setup)
        except BaseException:
            for group in (cgroup, pids):
                if group is not None:
                    group.remove()
            raise
        return LocalAttempt(
            process, hook_log, inv, cgroup, pids, self.limit_mode, self.sandbox is not None
        )

    def kill_leftovers(self, marker: AttemptMarker) -> None:
        kill_leftovers(marker, self._cgroup_parent)


class LocalAttempt:
    def __init__(
        self,
        process: subprocess.Popen[bytes],
        hook_log: PipeToHookLog,
        inv: Invocation,
        cgroup: MemoryCgroup | UnifiedCgroup | None,
        pids: PidsCgroup | None,
        mode: LimitMode,
        sandboxed: bool,
    ) -> None:
        self._process = process
        self._hook_log = hook_log
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
            # start_new_session makes the hook its group's leader
            process=ProcessIdentity.of_pid(process.pid),
            cgroup=str(cgroup.path) if cgroup else None,
            pids_cgroup=str(pids.path) if pids else None,
        )

    def wait(self, timeout: float) -> AttemptExit | None:
        if self._exit is not None:
            return self._exit
        if self._cgroup is not None:
            self._cgroup.sample_usage()
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
        self._hook_log.finish()
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


def kill_leftovers(marker: AttemptMarker, cgroup_parent: Path | None = None) -> None:
    """Kill what is left of a local attempt whose orchestrator died, and remove its cgroup
    if it lies under the cgroups that a runner with `cgroup_parent` makes."""
    if marker.process is None or not marker.process.checkable_here():
        # Not a local attempt; or a reboot, which neither processes nor cgroups survive; or
        # another host's or pid namespace's, whose pids name other processes here.
        return
    # A reused pid means the kernel let our whole group go first; a vanished leader leaves
    # the pgid to what is left of our group.
    if not marker.process.pid_reused():
        _killpg(marker.process.pid)
    recorded = [path for path in (marker.cgroup, marker.pids_cgroup) if path is not None]
    if not recorded:
        return
    try:
        cgroups: AttemptCgroups | None = attempt_cgroups(cgroup_parent)
    except MemoryLimitsUnavailable:
        cgroups = None
    for path in (Path(os.path.normpath(entry)) for entry in recorded):
        if cgroups is not None and cgroups.owns(path):
            (UnifiedCgroup if cgroups.version == 2 else Cgroup)(path).remove()
        else:
            log.warning("not touching %s: not a cgroup this runner creates", path)


def _start_logged(
    command: Sequence[str], env: dict[str, str], log_path: Path, setup: Callable[[], None]
) -> tuple[subprocess.Popen[bytes], PipeToHookLog]:
    """Start the hook with its stdout and stderr on a pipe drained into its capped log: a file
    would take whatever the hook prints, and RLIMIT_FSIZE would cap its outputs too."""
    read_end, write_end = os.pipe()
    try:
        process = subprocess.Popen(
            command,
            env=env,
            cwd=log_path.parent,
            stdin=subprocess.DEVNULL,
            stdout=write_end,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=setup,
        )
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    return process, PipeToHookLog(read_end, log_path)


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
