"""The local runner's sandbox: each hook attempt in its own namespaces, as an unprivileged user.

Hooks are other people's code running on the archive's machine. Wrapped by `Sandbox.wrap`,
an attempt runs under bubblewrap (`bwrap`):

- as uid:gid 65534 (nobody) by default, with no supplementary groups, no capabilities and
  no way to gain privileges (bubblewrap sets no-new-privs). As root, util-linux `setpriv`
  drops to that user inside the namespaces: a user namespace alone (bwrap --unshare-user)
  maps back to root outside, so the uid drop is what keeps the hook from root's files. As an
  ordinary user ("rootless"), bubblewrap makes an unprivileged user namespace that maps that
  uid onto the orchestrator's own: the hook then owns what the orchestrator owns, and only
  the mounts below keep it from them; it may make no user namespace of its own
  (--disable-userns);
- in new pid, ipc, uts, mount and network namespaces and its own session: it sees only its
  own processes in /proc and has no network (only a loopback device of its own) unless its
  HookSpec opts in;
- on a root made of only what running code needs, read-only: the system folders (/usr,
  /etc and the top-level links into /usr), the Python installation and the import path of
  the orchestrator, and the files its command names. Nothing else of the machine exists
  there: no /home, /root, /run (the Docker socket), /var, /sys, and not the orchestrator's
  data folders even when they sit inside a visible code folder (`private` paths are covered
  by empty, read-only folders);
- with its inputs read-only at /osa/in and /osa/files and its output folder, /osa/out, the
  only place it can write besides a private, size-capped /tmp;
- with a minimal environment (never the orchestrator's credentials);
- with at most `max_processes` processes. As root: a pids cgroup of its own where the cgroup
  v1 pids controller is usable, else RLIMIT_NPROC, which counts every process of the uid.
  Rootless: RLIMIT_NPROC set inside the user namespace (util-linux `prlimit`), where it
  counts the attempt's processes only, not the orchestrator's.

The memory cgroup is the runner's: the hook cannot write it (/sys is not even mounted), so
neither its limit nor its membership can change.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from osa_sdk.contract import BYTES_PER_MB, ENV_FILES, ENV_IN, ENV_OUT

from osa_dagster.engine.runners.base import ISOLATED_FILES, ISOLATED_IN, ISOLATED_OUT

log = logging.getLogger(__name__)

SandboxMode = Literal["on", "off"]

SANDBOX_TMP = "/tmp"

# Top-level folders of the machine that running code needs; links among them (/bin -> usr/bin
# on a merged-/usr system) are recreated as links.
SYSTEM_FOLDERS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc")
# What a sandboxed hook's environment holds besides the contract's variables.
SANDBOX_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "PYTHONPATH")


# Where the kernel says whether an ordinary user may make a user namespace: Debian's switch,
# the namespace count (0: none), and Ubuntu's AppArmor restriction (since 24.04).
USERNS_SWITCHES = (
    ("kernel.unprivileged_userns_clone", "0", "sysctl -w kernel.unprivileged_userns_clone=1"),
    ("user.max_user_namespaces", "0", "sysctl -w user.max_user_namespaces=10000"),
    (
        "kernel.apparmor_restrict_unprivileged_userns",
        "1",
        "an AppArmor profile for bwrap with `userns`, or sysctl -w "
        "kernel.apparmor_restrict_unprivileged_userns=0",
    ),
)


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot run on this machine; the message says why, in one line."""


@dataclass(frozen=True)
class SandboxPolicy:
    """What every sandboxed attempt gets."""

    uid: int = 65534
    gid: int = 65534
    tmp_size_mb: int = 64
    max_processes: int = 256
    # Folders the hook must never see although they may lie inside a visible code folder:
    # the artifact store, the records database, the deposits.
    private: tuple[Path, ...] = ()


@dataclass(frozen=True)
class Sandbox:
    """Turns a hook command into the command that runs it sandboxed.

    As root, `helper` is util-linux `setpriv`, which drops to the policy's user inside the
    namespaces. Rootless, a user namespace maps that user onto this one, and `helper` is
    util-linux `prlimit`, which bounds the attempt's processes inside it."""

    bwrap: str
    helper: str
    rootless: bool
    policy: SandboxPolicy = field(default_factory=SandboxPolicy)

    def wrap(
        self,
        command: Sequence[str],
        *,
        in_dir: Path,
        out_dir: Path,
        files_root: Path,
        network: bool,
    ) -> list[str]:
        """The full command line: bwrap's mounts and namespaces, the drop to the hook's
        user or its process limit, then the hook."""
        policy = self.policy
        args = [self.bwrap, "--die-with-parent", "--new-session"]
        if self.rootless:
            args += [
                "--unshare-user",
                "--uid",
                str(policy.uid),
                "--gid",
                str(policy.gid),
                "--disable-userns",
            ]
        args += [
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--hostname",
            "osa-hook",
        ]
        if not network:
            args.append("--unshare-net")
        args += _system_mounts(Path("/"))
        # Scratch space before the code: code (a test's, a user's) may live under /tmp.
        args += ["--dev", "/dev", "--proc", "/proc"]
        args += _scratch(SANDBOX_TMP, policy.tmp_size_mb) + _scratch("/dev/shm", policy.tmp_size_mb)
        code = _code_paths(command)
        # The folders above them, made here, must let the hook's user through (bwrap would
        # make them root's alone).
        for folder in sorted({a for path in code for a in path.parents if a != Path("/")}):
            args += ["--perms", "0755", "--dir", str(folder)]
        for path in code:
            args += ["--ro-bind", str(path), str(path)]
        for path in _visible(policy.private, code):
            # An empty read-only folder over it: the hook sees that it exists, nothing more.
            args += ["--perms", "0555", "--tmpfs", str(path), "--remount-ro", str(path)]
        args += [
            "--perms",
            "0555",
            "--dir",
            str(Path(ISOLATED_IN).parent),
            "--ro-bind",
            str(in_dir),
            ISOLATED_IN,
            # A batch whose records have no files may have no files folder: an empty one.
            *(["--ro-bind", str(files_root)] if files_root.is_dir() else ["--dir"]),
            ISOLATED_FILES,
            "--bind",
            str(out_dir),
            ISOLATED_OUT,
            # The root and /dev are bubblewrap's own tmpfs, which a rootless hook would own:
            # read-only once every mount point is made.
            "--remount-ro",
            "/dev",
            "--remount-ro",
            "/",
            "--chdir",
            SANDBOX_TMP,
            "--",
            *self._drop(),
            *command,
        ]
        return args

    def _drop(self) -> list[str]:
        """What runs between bubblewrap and the hook."""
        policy = self.policy
        if self.rootless:
            limit = policy.max_processes
            return [self.helper, f"--nproc={limit}:{limit}", "--"]
        return [
            self.helper,
            f"--reuid={policy.uid}",
            f"--regid={policy.gid}",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--no-new-privs",
            "--",
        ]

    def environment(self, contract_env: Mapping[str, str]) -> dict[str, str]:
        """The hook's whole environment: a few harmless variables and the contract's, with
        its folders as the hook sees them."""
        env = {name: os.environ[name] for name in SANDBOX_ENV if name in os.environ}
        return env | {
            **contract_env,
            ENV_IN: ISOLATED_IN,
            ENV_OUT: ISOLATED_OUT,
            ENV_FILES: ISOLATED_FILES,
            "HOME": SANDBOX_TMP,
            "TMPDIR": SANDBOX_TMP,
        }

    def prepare_output(self, out_dir: Path) -> None:
        """Let the sandbox's user write the attempt's output folder, and nobody else's.
        Rootless, that user is this one outside: the folder is ours already."""
        if not self.rootless:
            os.chown(out_dir, self.policy.uid, self.policy.gid)
        out_dir.chmod(0o700)


def find_sandbox(policy: SandboxPolicy) -> Sandbox:
    """A sandbox that was seen to work here, or SandboxUnavailable saying why not and how to
    get it, or to do without it, in one line."""
    reason = _unavailable_reason(policy.uid, policy.gid)
    if reason is not None:
        raise SandboxUnavailable(
            f"OSA_HOOK_SANDBOX=on, but hooks cannot be sandboxed here: {reason}; or set "
            "OSA_HOOK_SANDBOX=off to run them unsandboxed, as this user, seeing the machine"
        )
    return _tools(rootless=os.geteuid() != 0, policy=policy)


def _tools(*, rootless: bool, policy: SandboxPolicy) -> Sandbox:
    """The sandbox made of this machine's tools, which _unavailable_reason has found."""
    bwrap, helper = shutil.which("bwrap"), shutil.which(_helper(rootless))
    assert bwrap is not None and helper is not None
    return Sandbox(bwrap, helper, rootless, policy)


def _helper(rootless: bool) -> str:
    return "prlimit" if rootless else "setpriv"


@functools.cache
def _unavailable_reason(uid: int, gid: int) -> str | None:
    """Why hooks cannot be sandboxed on this machine, or None; probed once per process."""
    if not sys.platform.startswith("linux"):
        return f"hook sandboxing needs Linux namespaces, and this is {sys.platform}"
    rootless = os.geteuid() != 0
    missing = [name for name in ("bwrap", _helper(rootless)) if shutil.which(name) is None]
    if missing:
        return (
            f"{' and '.join(missing)} not found: install the Debian packages bubblewrap and "
            "util-linux (make sandbox-tools)"
        )
    if rootless:
        closed = _user_namespaces_closed()
        if closed is not None:
            return closed
    probe = _tools(rootless=rootless, policy=SandboxPolicy(uid=uid, gid=gid))
    with tempfile.TemporaryDirectory(prefix="osa-sandbox-probe-") as tmp:
        folders = {name: Path(tmp, name) for name in ("in", "out", "files")}
        for folder in folders.values():
            folder.mkdir()
        probe.prepare_output(folders["out"])
        command = probe.wrap(
            ["sh", "-c", f"touch {ISOLATED_OUT}/probe"],
            in_dir=folders["in"],
            out_dir=folders["out"],
            files_root=folders["files"],
            network=False,
        )
        try:
            result = subprocess.run(command, capture_output=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"a trial run of bubblewrap failed: {error}"
    if result.returncode != 0:
        detail = result.stderr.decode(errors="replace").strip().splitlines()
        how = (
            " (an ordinary user's sandbox needs unprivileged user namespaces; or run as root)"
            if rootless
            else ""
        )
        return (
            f"a trial run of bubblewrap failed: {detail[-1] if detail else result.returncode}{how}"
        )
    return None


def _user_namespaces_closed(proc_sys: Path = Path("/proc/sys")) -> str | None:
    """Which kernel setting keeps an ordinary user from making a user namespace, and how to
    open it; None when none does."""
    for name, closed, remedy in USERNS_SWITCHES:
        try:
            value = (proc_sys / name.replace(".", "/")).read_text().strip()
        except OSError:
            continue  # this kernel has no such switch
        if value == closed:
            return (
                f"the kernel forbids ordinary users user namespaces ({name}={value}; allow them "
                f"with {remedy}, or run the orchestrator as root)"
            )
    return None


def _scratch(path: str, size_mb: int) -> list[str]:
    """A private tmpfs at `path`, of at most `size_mb`, that anyone may write (sticky)."""
    return ["--size", str(size_mb * BYTES_PER_MB), "--perms", "1777", "--tmpfs", path]


def _system_mounts(root: Path) -> list[str]:
    """Read-only binds of the system folders that exist, and their top-level links."""
    args: list[str] = []
    for name in SYSTEM_FOLDERS:
        path = root / name
        if path.is_symlink():
            args += ["--symlink", str(path.readlink()), f"/{name}"]
        elif path.is_dir():
            args += ["--ro-bind", str(path), f"/{name}"]
    return args


def _code_paths(command: Sequence[str]) -> list[Path]:
    """What the hook's code may need to read: the Python installation and import path of
    this interpreter (hooks run with it or its like), PYTHONPATH, the folders of this
    project's packages (an editable install maps them from outside the import path) and every
    existing absolute path the command names (a script, another interpreter). Nested paths are
    left to the outermost one."""
    import osa_sdk

    import osa_dagster

    candidates: list[str] = [
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        sys.base_exec_prefix,
        *sys.path,
        *os.environ.get("PYTHONPATH", "").split(os.pathsep),
        str(Path(osa_sdk.__file__).parent),
        str(Path(osa_dagster.__file__).parent),
        *command,
    ]
    paths = {
        Path(candidate).resolve()
        for candidate in candidates
        if Path(candidate).is_absolute() and _reachable(Path(candidate))
    }
    paths = {path for path in paths if not _is_system(path) and path != Path("/")}
    return sorted(p for p in paths if not any(p != o and p.is_relative_to(o) for o in paths))


def _reachable(path: Path) -> bool:
    """Whether `path` exists and this user may reach it (an ordinary user's environment
    may name folders only root may enter)."""
    try:
        return path.exists()
    except PermissionError:
        return False


def _is_system(path: Path) -> bool:
    return len(path.parts) > 1 and path.parts[1] in SYSTEM_FOLDERS


def _visible(private: Iterable[Path], code: Sequence[Path]) -> list[Path]:
    """The private folders that would be visible: those inside a code folder. One inside
    another is covered with it (and bwrap could not make its mount point in the empty,
    read-only folder over the outer one: the default .data/artifacts in a code folder)."""
    resolved = {path.resolve() for path in private}
    visible = [
        path
        for path in resolved
        if path.is_dir() and any(path.is_relative_to(folder) for folder in code)
    ]
    return sorted(
        path
        for path in visible
        if not any(path != outer and path.is_relative_to(outer) for outer in visible)
    )
