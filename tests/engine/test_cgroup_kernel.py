"""The local runner's cgroups against the real kernel: whichever hierarchy this machine has.

Marked `cgroup_kernel`: the cgroup v2 lane (`make test-cgroup2`) runs these inside a
virtual machine whose kernel mounts cgroup v2 only, as root and again as an unprivileged
user in a delegated cgroup; the main suite runs them on the host, which may be cgroup v1.

Hooks run sandboxed, as they do by default, in every test but those that watch the hook
from outside (its pids, files in the test's folder, the cgroup files it reads), which say
so with sandbox="off".
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from osa_dagster.engine import AttemptExit, LocalRunner
from osa_dagster.engine.capacity import DEFAULT_BUDGET_FRACTION
from osa_dagster.engine.cgroup import (
    CGROUP_ROOT,
    UNIFIED_ROOT,
    AttemptCgroups,
    MemoryLimitsUnavailable,
    attempt_cgroups,
    read_memberships,
)
from osa_dagster.engine.runners.local import LocalAttempt
from osa_dagster.engine.runners.sandbox import SandboxPolicy
from osa_dagster.settings import Settings

from .helpers import (
    Harness,
    alive,
    eventually,
    invocation,
    record,
    require_cgroups,
    require_sandbox,
    unavailable,
)

pytestmark = pytest.mark.cgroup_kernel

MB = 1024 * 1024
NOBODY = "65534"


@pytest.fixture
def cgroups() -> AttemptCgroups:
    require_cgroups()
    return attempt_cgroups()


def sandboxed() -> LocalRunner:
    require_sandbox()
    return LocalRunner.from_settings(Settings.from_env(), sandbox="on")


def python(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


def finish(attempt: LocalAttempt) -> AttemptExit:
    while (exit_ := attempt.wait(0.2)) is None:
        pass
    return exit_


def memory_cgroup_of(cgroups: AttemptCgroups, proc_cgroup: Path) -> Path:
    """The cgroup that limits the memory of a process, from a copy of its /proc/PID/cgroup."""
    memberships = read_memberships(proc_cgroup)
    if cgroups.version == 2:
        assert memberships.unified is not None
        return UNIFIED_ROOT / memberships.unified.lstrip("/")
    return CGROUP_ROOT / memberships.v1["memory"].lstrip("/")


def test_an_oom_killed_hook_climbs_its_ladder_and_resumes_from_its_checkpoint(
    cgroups: AttemptCgroups, tmp_path: Path
) -> None:
    # Unsandboxed: the test hook counts what it did in a ledger in the test's folder.
    harness = Harness(tmp_path, LocalRunner.from_settings(Settings.from_env(), sandbox="off"))
    records = [record("small", 1, alloc_mb=20), record("big", 2, alloc_mb=200), record("after", 3)]

    checkpoint = harness.run(harness.spec(base_mb=128, cap_mb=256), records)

    attempts = [(a.memory_limit_mb, a.oom_killed, a.limit_mode) for a in checkpoint.attempts]
    assert attempts == [(128, True, "cgroup"), (256, False, "cgroup")]
    # The kernel's peak of the killed attempt is its limit; the next one's fits in its own.
    killed, passed = (a.peak_memory_mb for a in checkpoint.attempts)
    assert killed == pytest.approx(128, abs=1)
    assert passed is not None and 200 <= passed <= 256
    assert {rid: o.status for rid, o in checkpoint.outcomes.items()} == dict.fromkeys(
        ["small", "big", "after"], "passed"
    )
    # Resumed from the checkpoint: what was done before the OOM was never done again.
    assert harness.ledger_counts() == {"small": 1, "big": 1, "after": 1}


def test_a_hook_within_its_limit_reports_its_peak(cgroups: AttemptCgroups, tmp_path: Path) -> None:
    code = "b = bytearray(100 * 2**20); b[::4096] = b'1' * len(b[::4096])"

    exit_ = finish(sandboxed().start(invocation(tmp_path, *python(code), memory_mb=256)))

    assert (exit_.returncode, exit_.oom_killed) == (0, False)
    assert exit_.peak_memory_mb is not None and 100 <= exit_.peak_memory_mb < 256


def test_a_timeout_and_a_cancel_are_not_oom_kills(cgroups: AttemptCgroups, tmp_path: Path) -> None:
    runner = sandboxed()
    timed_out = finish(runner.start(invocation(tmp_path, "sleep", "600", timeout_s=1)))
    cancelled = runner.start(invocation(tmp_path, "sleep", "600"))
    assert cancelled.wait(0.1) is None
    cancelled.kill()
    cancel = finish(cancelled)

    assert (timed_out.returncode, timed_out.timed_out, timed_out.oom_killed) == (-9, True, False)
    assert (cancel.returncode, cancel.timed_out, cancel.oom_killed) == (-9, False, False)
    assert not timed_out.out_of_memory and not cancel.out_of_memory


def test_a_detached_grandchild_neither_escapes_nor_outlives_its_attempt(
    cgroups: AttemptCgroups, tmp_path: Path
) -> None:
    # A new session, a double fork (re-parented to init): only the cgroup still holds it.
    script = (
        "setsid sh -c 'sleep 600 & echo $! > grandchild.pid' < /dev/null;"
        "cat /proc/$(cat grandchild.pid)/cgroup > grandchild.cgroup"
    )
    # Unsandboxed: the test follows the grandchild by its pid, which a sandbox's pid
    # namespace would renumber.
    attempt = LocalRunner.from_settings(Settings.from_env(), sandbox="off").start(
        invocation(tmp_path, "sh", "-c", script)
    )
    cgroup = attempt.marker.cgroup

    exit_ = finish(attempt)

    grandchild = int((tmp_path / "grandchild.pid").read_text())
    assert exit_.returncode == 0
    assert cgroup is not None
    assert memory_cgroup_of(cgroups, tmp_path / "grandchild.cgroup") == Path(cgroup)
    assert eventually(lambda: not alive(grandchild))
    assert not Path(cgroup).exists()


def test_the_process_limit_holds(cgroups: AttemptCgroups, tmp_path: Path) -> None:
    if cgroups.version == 1 and cgroups.pids_parent is None:
        unavailable("this cgroup v1 host has no pids controller")
    max_processes = 8
    code = (
        "import os, time\n"
        "started = 0\n"
        f"for _ in range({4 * max_processes}):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except BlockingIOError:\n"
        "        break\n"
        "    if pid == 0:\n"
        "        time.sleep(600)\n"
        "        os._exit(0)\n"
        "    started += 1\n"
        "print(started, flush=True)\n"
    )
    # cgroup v2 caps every attempt's processes; cgroup v1 a sandboxed attempt's only.
    runner = LocalRunner.from_settings(
        Settings.from_env(),
        sandbox="off" if cgroups.version == 2 else "on",
        sandbox_policy=SandboxPolicy(max_processes=max_processes),
    )

    exit_ = finish(runner.start(invocation(tmp_path, *python(code))))

    # The hook itself is one of them (and, sandboxed, bubblewrap's two processes above it);
    # its children, left sleeping, died with the attempt.
    assert exit_.returncode == 0
    above_the_hook = 0 if cgroups.version == 2 else 2
    assert int(exit_.stderr_tail.split()[-1]) == max_processes - 1 - above_the_hook


def test_the_budget_follows_the_cgroup_limit(cgroups: AttemptCgroups, tmp_path: Path) -> None:
    code = "from osa_dagster.engine.capacity import default_budget_mb; print(default_budget_mb())"
    limit_mb = 300

    # Unsandboxed: the hook reads its cgroup's limits in /sys, which a sandbox does not show.
    runner = LocalRunner.from_settings(Settings.from_env(), sandbox="off")

    exit_ = finish(runner.start(invocation(tmp_path, *python(code), memory_mb=limit_mb)))

    assert exit_.returncode == 0, exit_.stderr_tail
    assert int(exit_.stderr_tail.split()[-1]) == int(limit_mb * MB * DEFAULT_BUDGET_FRACTION) // MB


HOSTILE = """
import ctypes, errno, json, os, sys, tempfile
from pathlib import Path
top = Path(sys.argv[1])
line = [l for l in open("/proc/self/cgroup") if sys.argv[2] in l][0]
mine = top / line.rstrip("\\n").split(":", 2)[2].lstrip("/")
limit = mine / sys.argv[3]
tried = {}
for name, path, value in (
    ("raise_limit", limit, str(64 * 2**30)),
    ("leave_to_parent", mine.parent / "cgroup.procs", str(os.getpid())),
    ("leave_to_root", top / "cgroup.procs", str(os.getpid())),
):
    try:
        path.write_text(value)
        tried[name] = "done"
    except OSError as error:
        tried[name] = errno.errorcode[error.errno]
# A cgroup file system of its own to write through, where the sandbox shows none.
libc = ctypes.CDLL(None, use_errno=True)
for fstype in ("cgroup2", "sysfs"):
    mounted = libc.mount(b"none", tempfile.mkdtemp().encode(), fstype.encode(), 0, None) == 0
    tried[f"mount_{fstype}"] = "done" if mounted else errno.errorcode[ctypes.get_errno()]
print(json.dumps(tried), flush=True)
bytearray(512 * 2**20)
"""


def test_a_hook_can_neither_raise_its_limit_nor_leave_its_cgroup(
    cgroups: AttemptCgroups, tmp_path: Path
) -> None:
    if cgroups.version == 2:
        where = (str(UNIFIED_ROOT), "0::", "memory.max")
    else:
        where = (str(CGROUP_ROOT), ":memory:", "memory.limit_in_bytes")
    if os.geteuid() == 0:
        # Unsandboxed, as another user: the cgroup files' own permissions hold the hook.
        setpriv = shutil.which("setpriv")
        assert setpriv is not None
        as_nobody = (setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
        runner, command = (
            LocalRunner.from_settings(Settings.from_env(), sandbox="off"),
            (*as_nobody, *python(HOSTILE), *where),
        )
        refusals = {"EACCES", "EPERM", "EROFS"}
    else:
        # Rootless, the sandbox's user is this one outside, which owns the delegated cgroup's
        # files: only the sandbox holds the hook. It shows the hierarchy because the command
        # names it, read-only (EROFS; ENOENT where it shows none), and lets it mount nothing.
        runner, command = sandboxed(), (*python(HOSTILE), *where)
        refusals = {"EROFS", "ENOENT", "EPERM"}

    exit_ = finish(runner.start(invocation(tmp_path, *command, memory_mb=128)))

    refused = json.loads(exit_.stderr_tail.splitlines()[0])
    assert len(refused) == 5 and set(refused.values()) <= refusals, refused
    # Still in its cgroup, under its limit: killed by the kernel past 128 MB.
    assert (exit_.returncode, exit_.oom_killed) == (-9, True)


def test_memory_error_is_not_an_oom_kill(cgroups: AttemptCgroups, tmp_path: Path) -> None:
    # The allocation is refused (RLIMIT_AS, set by the hook itself) well inside the cgroup's
    # limit: the hook dies of MemoryError, which no kernel counter saw.
    code = (
        "import resource\n"
        "resource.setrlimit(resource.RLIMIT_AS, (256 * 2**20, 256 * 2**20))\n"
        "bytearray(400 * 2**20)\n"
    )

    exit_ = finish(sandboxed().start(invocation(tmp_path, *python(code), memory_mb=1024)))

    assert "MemoryError" in exit_.stderr_tail
    assert (exit_.returncode, exit_.oom_killed, exit_.out_of_memory) == (1, False, False)


def test_an_attempt_cgroup_has_its_limits_in_the_kernel(
    cgroups: AttemptCgroups, tmp_path: Path
) -> None:
    attempt = sandboxed().start(invocation(tmp_path, "sleep", "600", memory_mb=96))
    assert attempt.marker.cgroup is not None
    group = Path(attempt.marker.cgroup)
    try:
        if cgroups.version == 2:
            limits = {
                name: (group / name).read_text().strip()
                for name in ("memory.max", "memory.swap.max", "memory.oom.group", "pids.max")
            }
            assert limits == {
                "memory.max": str(96 * MB),
                "memory.swap.max": "0",
                "memory.oom.group": "1",
                "pids.max": str(SandboxPolicy().max_processes),
            }
        else:
            assert (group / "memory.limit_in_bytes").read_text().strip() == str(96 * MB)
        assert str(attempt.marker.pid) in (group / "cgroup.procs").read_text().split()
    finally:
        attempt.kill()
        finish(attempt)


def test_without_a_cgroup_of_its_own_the_cli_refuses_before_any_work(
    cgroups: AttemptCgroups, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        # The lane's root run (and `make test` on a root host) runs it.
        pytest.skip("needs root to start a process as a user with no delegated cgroup")
    setpriv = shutil.which("setpriv")
    assert setpriv is not None
    data = tmp_path / "data"
    as_nobody = (setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")

    result = subprocess.run(
        [*as_nobody, sys.executable, "-m", "osa_dagster.cli", "materialize", "pdb"],
        capture_output=True,
        text=True,
        env={**os.environ, "OSA_DATA_DIR": str(data), "OSA_HOOK_RUNNER": "local"},
        cwd="/",
    )

    assert result.returncode == 2
    assert result.stderr.startswith("osa materialize: hook memory limits: ")
    assert len(result.stderr.splitlines()) == 1
    assert "OSA_CGROUP_PARENT" in result.stderr
    assert not data.exists()


def test_cgroup_v2_attempts_go_where_osa_cgroup_parent_says(
    cgroups: AttemptCgroups, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if cgroups.version == 1:
        # `make test-cgroup2` runs it on a cgroup v2 kernel, as root and as a delegated user.
        pytest.skip("OSA_CGROUP_PARENT is for cgroup v2; this host's memory controller is v1")
    named = cgroups.parent / f"named-parent-{os.getpid()}"
    monkeypatch.setenv("OSA_CGROUP_PARENT", str(named))
    try:
        attempt = sandboxed().start(invocation(tmp_path, "true"))
        assert attempt.marker.cgroup is not None
        assert Path(attempt.marker.cgroup).parent == named
        assert finish(attempt).returncode == 0
        assert {"memory", "pids"} <= set((named / "cgroup.subtree_control").read_text().split())
    finally:
        named.rmdir()

    monkeypatch.setenv("OSA_CGROUP_PARENT", str(tmp_path))
    with pytest.raises(MemoryLimitsUnavailable, match="not a cgroup below the cgroup v2 mount"):
        LocalRunner.from_settings(Settings.from_env())
