"""Cgroups as the local runner uses them: one child cgroup per attempt, on cgroup v1 or v2.

A cgroup gives what RLIMIT_AS cannot: a limit on resident memory of the whole process tree,
a kernel OOM kill that is told apart from any other SIGKILL (the `oom_kill` counter), the
peak usage, and a complete list of the attempt's processes even when they left its session.

Which hierarchy: the one the memory controller is bound to (`attempt_cgroups`, decided once
per process and logged in one line). A hybrid host mounts cgroup v2 beside v1 but leaves
the memory controller to v1, so v1 is used there.

- cgroup v1: a memory cgroup (`memory.limit_in_bytes`, and `memory.memsw.limit_in_bytes`
  with swap accounting) and a pids cgroup per attempt, under the orchestrator's own cgroups
  of those controllers. That needs root.
- cgroup v2: one cgroup per attempt with `memory.max`, `memory.swap.max=0` (or the kernel
  swaps the hook out instead of killing it), `memory.oom.group=1` (an OOM kills the whole
  attempt, not one process of it) and `pids.max`; the kernel's `memory.events` says whether
  it OOM-killed, `memory.peak` the peak (sampled `memory.current` on kernels before 5.19),
  and `cgroup.kill` kills all of it at once. The attempts' parent is OSA_CGROUP_PARENT when
  set, else the orchestrator's own cgroup (`0::/path` of /proc/self/cgroup), which must be
  the root or delegated to this user (writable `cgroup.procs` and `cgroup.subtree_control`,
  as systemd's `Delegate=yes` hands them over).

  cgroup v2 lets no cgroup but the root both hold processes and hand controllers to its
  children. When the orchestrator's own cgroup holds processes, every process in it is
  moved into a leaf child, `orchestrator`, and the attempts become that leaf's siblings:
  systemd's delegation rules ask exactly this of a delegated payload, and it needs no write
  access above the delegated subtree (a sibling of the orchestrator's cgroup would). A
  later orchestrator started from that leaf finds its parent already prepared and uses it
  too. The leaf's name lacks NAME_PREFIX, so no attempt marker can make us kill it. A cgroup
  named by OSA_CGROUP_PARENT is never emptied that way: it must hold no processes itself.

A hook joins its cgroup before it runs any code of its own: the forked child writes its pid
into `cgroup.procs` between fork and exec (the runner's `preexec_fn`), so whatever it execs,
and every process that starts, is charged and counted from its first instruction. The kernel
offers the same in one step, `clone3(CLONE_INTO_CGROUP)` (5.7+), but Python has no wrapper:
a raw clone3 through ctypes would run Python in a child that skipped the interpreter's
fork handlers, which is not safe in a threaded orchestrator, for nothing that the write
before exec does not already give.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Self

from osa_sdk.contract import BYTES_PER_MB

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup/memory")
PIDS_ROOT = Path("/sys/fs/cgroup/pids")
# Where the cgroup v2 hierarchy is mounted when it is the only one (a hybrid host mounts it
# at /sys/fs/cgroup/unified, without the memory controller).
UNIFIED_ROOT = Path("/sys/fs/cgroup")
# Every cgroup we create is named so; kill_leftovers refuses to touch any other one, since a
# checkpoint (maybe read from S3) must never be able to make us kill arbitrary processes.
NAME_PREFIX = "osa-"
# The leaf that an orchestrator's delegated cgroup v2 moves its processes into (see above).
ORCHESTRATOR_LEAF = "orchestrator"
_V2_CONTROLLERS = ("memory", "pids")
_EMPTY_TIMEOUT_S = 5.0
_HOW_TO_GET_ONE = (
    "run as root, or in a delegated cgroup (systemd-run --user --scope -p Delegate=yes "
    "osa ...), or set OSA_CGROUP_PARENT to a cgroup v2 delegated to this user (or opt out "
    "of real limits with OSA_HOOK_MEMORY_LIMITS=rlimit or off)"
)


class MemoryLimitsUnavailable(RuntimeError):
    """No real memory limit can be had for hooks here; the message says why and what to do,
    in one line."""


@dataclass(frozen=True)
class AttemptCgroups:
    """Where this process makes its attempts' cgroups, and why there."""

    version: Literal[1, 2]
    parent: Path
    """v1: the memory cgroup to make attempts' memory cgroups in; v2: the attempts' parent."""
    pids_parent: Path | None
    """v1 only: where attempts' pids cgroups go, when the pids controller is usable."""
    reason: str

    def create(
        self, name: str, limit_mb: int, max_processes: int, *, v1_pids: bool
    ) -> tuple[MemoryCgroup | UnifiedCgroup, PidsCgroup | None]:
        """The cgroups of one attempt, which its process must join: on v2 one cgroup limits
        both memory and processes; on v1 a memory cgroup and, when `v1_pids` and the pids
        controller is usable, a pids cgroup of its own."""
        if self.version == 2:
            return UnifiedCgroup.create(self.parent, name, limit_mb, max_processes), None
        memory = MemoryCgroup.create(self.parent, name, limit_mb)
        if self.pids_parent is None or not v1_pids:
            return memory, None
        try:
            return memory, PidsCgroup.create(self.pids_parent, name, max_processes)
        except BaseException:
            memory.remove()
            raise

    def owns(self, path: Path) -> bool:
        """Whether `path` names an attempt cgroup this runner may have made (by its name
        and place only: the path may come from a checkpoint that anyone could have edited)."""
        if not path.name.startswith(NAME_PREFIX):
            return False
        if self.version == 2:
            return path.parent == self.parent
        return path.parent.is_relative_to(CGROUP_ROOT) or path.parent.is_relative_to(PIDS_ROOT)


def attempt_cgroups(configured_parent: Path | None = None) -> AttemptCgroups:
    """This process's place for attempt cgroups, or MemoryLimitsUnavailable saying why none;
    found once per process (per OSA_CGROUP_PARENT) and logged once."""
    found = _attempt_cgroups(configured_parent)
    if isinstance(found, str):
        raise MemoryLimitsUnavailable(found)
    return found


@functools.cache
def _attempt_cgroups(configured_parent: Path | None) -> AttemptCgroups | str:
    """The place, or why there is none (a message, so that each caller raises afresh)."""
    try:
        found = _find_attempt_cgroups(configured_parent)
    except MemoryLimitsUnavailable as unavailable:
        log.info("hook memory limits: none can be had: %s", unavailable)
        return str(unavailable)
    log.info(
        "hook memory limits: cgroup v%d under %s (%s)", found.version, found.parent, found.reason
    )
    return found


def _find_attempt_cgroups(configured_parent: Path | None) -> AttemptCgroups:
    found = memory_hierarchy()
    if found.version == 1:
        ignored = "; OSA_CGROUP_PARENT is for cgroup v2 and ignored" if configured_parent else ""
        parent = usable_parent()
        if parent is None:
            raise MemoryLimitsUnavailable(
                f"cgroup v1 memory controller at {CGROUP_ROOT}, but this process cannot make "
                f"cgroups in it (it needs root and a writable /sys/fs/cgroup): {_HOW_TO_GET_ONE}"
            )
        return AttemptCgroups(1, parent, usable_pids_parent(), found.reason + ignored)
    if found.version == 2:
        if configured_parent is not None:
            parent = _named_parent(UNIFIED_ROOT, configured_parent)
            reason = f"{found.reason}; the attempts' parent is OSA_CGROUP_PARENT"
        else:
            parent = _delegated_parent(UNIFIED_ROOT, found.group)
            reason = f"{found.reason}; the attempts' parent is this process's own cgroup"
        _probe_unified(parent)
        return AttemptCgroups(2, parent, None, reason)
    raise MemoryLimitsUnavailable(f"{found.reason}: {_HOW_TO_GET_ONE}")


@dataclass(frozen=True)
class MemoryHierarchy:
    """The cgroup hierarchy that holds the memory controller for a process, and why."""

    version: Literal[1, 2] | None
    top: Path
    """That hierarchy's root folder (under `root` of `memory_hierarchy`)."""
    group: Path
    """The process's own cgroup in it."""
    reason: str


def memory_hierarchy(root: Path = Path("/")) -> MemoryHierarchy:
    """Whose memory controller limits this process: cgroup v1's when it is bound there
    (always so on a hybrid host, where cgroup v2 is mounted beside v1 without it), else cgroup
    v2's when its root offers it. `root` is where /proc and /sys are found (tests give a
    made-up tree)."""
    memberships = read_memberships(root / "proc/self/cgroup")
    unified_top = root / UNIFIED_ROOT.relative_to("/")
    v1_top = root / CGROUP_ROOT.relative_to("/")
    v1_memory = memberships.v1.get("memory")
    if v1_memory is not None and v1_top.is_dir():
        hybrid = " (hybrid: cgroup v2 is mounted beside it)" if memberships.unified else ""
        reason = f"the memory controller is bound to cgroup v1{hybrid}"
        return MemoryHierarchy(1, v1_top, v1_top / v1_memory.lstrip("/"), reason)
    if memberships.unified is not None:
        group = unified_top / memberships.unified.lstrip("/")
        if "memory" in _words(unified_top / "cgroup.controllers"):
            return MemoryHierarchy(2, unified_top, group, "cgroup v2 with the memory controller")
        reason = f"cgroup v2 without the memory controller ({unified_top}/cgroup.controllers)"
        return MemoryHierarchy(None, unified_top, group, reason)
    reason = "no cgroup memory controller: /proc/self/cgroup names no cgroup that has one"
    return MemoryHierarchy(None, unified_top, unified_top, reason)


@dataclass(frozen=True)
class Memberships:
    """A process's cgroups as /proc/<pid>/cgroup lists them."""

    v1: dict[str, str]
    """Controller -> the process's cgroup path in that controller's v1 hierarchy."""
    unified: str | None
    """Its cgroup v2 path (the `0::/path` line), when cgroup v2 is mounted."""


def read_memberships(proc_cgroup: Path) -> Memberships:
    v1: dict[str, str] = {}
    unified = None
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and not controllers:
            unified = path
        for controller in filter(None, controllers.split(",")):
            v1[controller] = path
    return Memberships(v1, unified)


def memory_limit_bytes(root: Path = Path("/")) -> int | None:
    """The memory limit that applies to this process through its cgroups: the smallest of
    its cgroup's and every one's above it, or None when none is set. `root` is where /proc
    and /sys are found (tests give a made-up tree)."""
    found = memory_hierarchy(root)
    if found.version is None:
        return None
    file_name = "memory.max" if found.version == 2 else "memory.limit_in_bytes"
    limits = []
    for folder in (found.group, *found.group.parents):
        if not folder.is_relative_to(found.top):
            break
        with contextlib.suppress(OSError, ValueError):
            # "max" (v2) is no limit; v1 writes "no limit" as a huge number, which min() drops.
            limits.append(int((folder / file_name).read_text()))
    return min(limits, default=None)


def own_memory_cgroup() -> Path | None:
    """The v1 memory cgroup this process is in, or None when there is none."""
    return _own_cgroup("memory", CGROUP_ROOT, "memory.limit_in_bytes")


def _own_cgroup(controller: str, root: Path, control_file: str) -> Path | None:
    path = read_memberships(Path("/proc/self/cgroup")).v1.get(controller)
    if path is None:
        return None
    candidate = root / path.lstrip("/")
    return candidate if (candidate / control_file).is_file() else None


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


def _words(path: Path) -> set[str]:
    try:
        return set(path.read_text().split())
    except OSError:
        return set()


def _named_parent(root: Path, configured: Path) -> Path:
    """OSA_CGROUP_PARENT, made if missing, with memory and pids handed to its children."""
    parent = Path(os.path.normpath(configured))
    if not parent.is_relative_to(root) or parent == root:
        raise MemoryLimitsUnavailable(
            f"OSA_CGROUP_PARENT={configured}: not a cgroup below the cgroup v2 mount {root}"
        )
    try:
        parent.mkdir(exist_ok=True)
    except OSError as error:
        raise MemoryLimitsUnavailable(
            f"OSA_CGROUP_PARENT={configured}: cannot make it ({error.strerror}): {_HOW_TO_GET_ONE}"
        ) from None
    if (parent / "cgroup.procs").read_text().strip():
        raise MemoryLimitsUnavailable(
            f"OSA_CGROUP_PARENT={configured} holds processes, and cgroup v2 gives no "
            "controllers to the children of a cgroup that does: name an empty cgroup"
        )
    _enable_controllers(parent)
    return parent


def _delegated_parent(root: Path, own: Path) -> Path:
    """The orchestrator's own cgroup, readied to hold attempt cgroups (see the module's
    docstring): controllers handed down, and its processes moved into a leaf if need be."""
    above = own.parent
    if (
        own.name == ORCHESTRATOR_LEAF
        and own != root
        and set(_V2_CONTROLLERS) <= _words(above / "cgroup.subtree_control")
        and os.access(above / "cgroup.procs", os.W_OK)
    ):
        return above  # an earlier orchestrator readied it and moved its processes here
    try:
        _enable_controllers(own)
    except OSError as error:
        # EBUSY: the no-internal-processes rule (the root is exempt from it).
        if error.errno != errno.EBUSY or own == root:
            raise _unwritable(own, error) from None
        _move_processes_into(own / ORCHESTRATOR_LEAF)
        try:
            _enable_controllers(own)
        except OSError as again:
            raise _unwritable(own, again) from None
    return own


def _enable_controllers(group: Path) -> None:
    missing = set(_V2_CONTROLLERS) - _words(group / "cgroup.controllers")
    if missing:
        raise MemoryLimitsUnavailable(
            f"{group} has no {' and '.join(sorted(missing))} controller (the cgroup above it "
            f"does not hand it down): {_HOW_TO_GET_ONE}"
        )
    if set(_V2_CONTROLLERS) <= _words(group / "cgroup.subtree_control"):
        return
    (group / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in _V2_CONTROLLERS))


def _move_processes_into(leaf: Path) -> None:
    """Every process of the leaf's parent into the leaf; looped, since one may fork meanwhile."""
    try:
        leaf.mkdir(exist_ok=True)
        deadline = time.monotonic() + _EMPTY_TIMEOUT_S
        while pids := (leaf.parent / "cgroup.procs").read_text().split():
            if time.monotonic() > deadline:
                raise MemoryLimitsUnavailable(f"{leaf.parent} did not empty into {leaf}")
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    (leaf / "cgroup.procs").write_text(pid)
    except OSError as error:
        raise _unwritable(leaf.parent, error) from None


def _unwritable(group: Path, error: OSError) -> MemoryLimitsUnavailable:
    return MemoryLimitsUnavailable(
        f"cgroup v2, but this process cannot make attempt cgroups in its own cgroup {group} "
        f"({error.strerror}): {_HOW_TO_GET_ONE}"
    )


def _probe_unified(parent: Path) -> None:
    """Make and remove one attempt-like cgroup: only doing it proves that we may."""
    try:
        probe = UnifiedCgroup.create(parent, f"{NAME_PREFIX}probe-{os.getpid()}", 64, 1)
    except OSError as error:
        raise MemoryLimitsUnavailable(
            f"cgroup v2: cannot make a cgroup with limits in {parent} ({error.strerror}): "
            f"{_HOW_TO_GET_ONE}"
        ) from None
    try:
        probe.oom_kills()
    finally:
        probe.remove()
    # Moving a hook into its cgroup takes write access to the cgroup.procs of the closest
    # cgroup above both where it starts (ours) and where it goes.
    own = read_memberships(Path("/proc/self/cgroup")).unified or "/"
    common = Path(os.path.commonpath([parent, UNIFIED_ROOT / own.lstrip("/")]))
    if not os.access(common / "cgroup.procs", os.W_OK):
        raise MemoryLimitsUnavailable(
            f"cgroup v2: hooks could not be moved from this process's cgroup into {parent} "
            f"({common}/cgroup.procs is not writable): {_HOW_TO_GET_ONE}"
        )


class Cgroup:
    """One cgroup v1 folder of ours: its processes, killing them, removing it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def _made(
        cls, path: Path, settings: Iterable[tuple[str, str]], if_present: Iterable[str] = ()
    ) -> Self:
        """A new cgroup at `path`, with each control file written in order; none on error.
        The files named in `if_present` are written only where the kernel has them."""
        group = cls(path)
        group.path.mkdir()
        optional = set(if_present)
        try:
            for file_name, value in settings:
                if file_name in optional and not (group.path / file_name).exists():
                    continue
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

    def sample_usage(self) -> None:
        """Nothing to sample: cgroup v1 keeps the peak itself (max_usage_in_bytes)."""


class PidsCgroup(Cgroup):
    """A cap on how many processes an attempt may have at once: fork fails past it."""

    @classmethod
    def create(cls, parent: Path, name: str, max_pids: int) -> PidsCgroup:
        return cls._made(parent / name, [("pids.max", str(max_pids))])


class UnifiedCgroup(Cgroup):
    """One attempt's cgroup v2: memory, swap and process limits in one place."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._sampled_peak = 0

    @classmethod
    def create(cls, parent: Path, name: str, limit_mb: int, max_pids: int) -> UnifiedCgroup:
        settings = [
            ("memory.max", str(limit_mb * BYTES_PER_MB)),
            # Without swap accounting (no such file) swap is not charged here at all.
            ("memory.swap.max", "0"),
            ("memory.oom.group", "1"),
            ("pids.max", str(max_pids)),
        ]
        return cls._made(parent / name, settings, if_present=["memory.swap.max"])

    def oom_kills(self) -> int:
        """How many processes of this cgroup the kernel OOM killer has killed (a group kill
        of N processes counts N)."""
        for line in (self.path / "memory.events").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        raise ValueError(f"{self.path}/memory.events has no oom_kill counter")

    def sample_usage(self) -> None:
        """Remember the usage now, for kernels without memory.peak (before 5.19)."""
        with contextlib.suppress(OSError, ValueError):
            current = int((self.path / "memory.current").read_text())
            self._sampled_peak = max(self._sampled_peak, current)

    def peak_mb(self) -> float:
        """The kernel's peak when it keeps one, else the highest usage sampled."""
        try:
            peak = int((self.path / "memory.peak").read_text())
        except FileNotFoundError:
            peak = self._sampled_peak
        return peak / BYTES_PER_MB

    def kill_all(self) -> None:
        """SIGKILL every process of the cgroup at once (cgroup.kill, 5.14+), then wait until
        it is empty; without cgroup.kill, kill them one by one as on cgroup v1."""
        try:
            (self.path / "cgroup.kill").write_text("1")
        except FileNotFoundError:
            if self.path.is_dir():
                super().kill_all()
            return
        deadline = time.monotonic() + _EMPTY_TIMEOUT_S
        while "populated 1" in self._events() and time.monotonic() < deadline:
            time.sleep(0.005)

    def _events(self) -> str:
        try:
            return (self.path / "cgroup.events").read_text()
        except FileNotFoundError:
            return ""
