"""LocalRunner with real processes and real cgroups."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from osa_dagster.engine import AttemptMarker, LocalRunner, kill_leftovers
from osa_dagster.engine.cgroup import AttemptCgroups, MemoryLimitsUnavailable
from osa_dagster.engine.process_identity import ProcessIdentity
from osa_dagster.engine.runners import local as runners_module
from osa_dagster.settings import Settings

from .helpers import alive, eventually, invocation, require_cgroups, require_sandbox


def read_pid(path: Path) -> int:
    assert eventually(lambda: path.exists() and path.read_text().strip() != "")
    return int(path.read_text())


@pytest.fixture(params=["cgroup", "rlimit"])
def runner(request: pytest.FixtureRequest) -> LocalRunner:
    if request.param == "cgroup":
        require_cgroups()
    return LocalRunner.from_settings(Settings.from_env(), request.param)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(["sleep", "30"], start_new_session=True)
    yield process
    process.kill()
    process.wait()


@pytest.mark.cgroup_kernel
def test_kernel_oom_kill_is_reported_with_its_peak(tmp_path: Path) -> None:
    require_cgroups()
    require_sandbox()
    command = (sys.executable, "-c", "bytearray(300 * 2**20)")

    exit_ = (
        LocalRunner.from_settings(Settings.from_env(), "cgroup", sandbox="on")
        .start(invocation(tmp_path, *command))
        .wait(30)
    )

    assert exit_ is not None
    assert (exit_.returncode, exit_.oom_killed, exit_.out_of_memory) == (-9, True, True)
    assert exit_.peak_memory_mb == pytest.approx(128, abs=1)
    assert exit_.limit_mode == "cgroup"


def test_plain_sigkill_is_not_an_oom(tmp_path: Path, runner: LocalRunner) -> None:
    attempt = runner.start(invocation(tmp_path, "sleep", "30"))
    assert attempt.wait(0.1) is None

    subprocess.run(["kill", "-9", str(attempt.marker.pid)], check=True)
    exit_ = attempt.wait(5)

    assert exit_ is not None
    assert (exit_.returncode, exit_.oom_killed, exit_.out_of_memory, exit_.timed_out) == (
        -9,
        False,
        False,
        False,
    )


def test_timeout_kills_the_whole_process_group(tmp_path: Path, runner: LocalRunner) -> None:
    script = "sleep 30 & echo $! > child.pid; wait"
    attempt = runner.start(invocation(tmp_path, "sh", "-c", script, timeout_s=0.5))
    child = read_pid(tmp_path / "child.pid")

    while (exit_ := attempt.wait(0.1)) is None:
        pass

    # Killed at its timeout, not ended by the 30 s sleep: SIGKILL and timed_out say so.
    assert (exit_.returncode, exit_.timed_out, exit_.oom_killed) == (-9, True, False)
    assert eventually(lambda: not alive(child))


@pytest.mark.cgroup_kernel
def test_processes_that_left_the_session_die_with_the_cgroup(tmp_path: Path) -> None:
    require_cgroups()
    script = "setsid sleep 30 & echo $! > child.pid"
    # Unsandboxed: the test follows the child by its pid, which a sandbox would renumber.
    runner = LocalRunner.from_settings(Settings.from_env(), "cgroup", sandbox="off")
    attempt = runner.start(invocation(tmp_path, "sh", "-c", script))

    exit_ = attempt.wait(5)

    assert exit_ is not None and exit_.returncode == 0
    assert eventually(lambda: not alive(read_pid(tmp_path / "child.pid")))


def test_hook_gets_its_contract_env_and_not_our_secrets(
    tmp_path: Path, runner: LocalRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2")
    script = "env; echo boom >&2; exit 3"

    exit_ = runner.start(invocation(tmp_path, "sh", "-c", script)).wait(5)

    assert exit_ is not None and exit_.returncode == 3
    assert exit_.stderr_tail.endswith("boom\n")
    assert f"OSA_IN={tmp_path}\n" in exit_.stderr_tail
    assert "hunter2" not in exit_.stderr_tail


def test_without_cgroups_the_runner_refuses_unless_told_not_to_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def none_here(_parent: Path | None = None) -> AttemptCgroups:
        raise MemoryLimitsUnavailable("no cgroup memory controller: run as root")

    monkeypatch.setattr(runners_module, "attempt_cgroups", none_here)
    with pytest.raises(MemoryLimitsUnavailable, match="no cgroup memory controller"):
        LocalRunner.from_settings(Settings.from_env())

    monkeypatch.setenv("OSA_HOOK_MEMORY_LIMITS", "off")
    runners_module._warn_limits_not_enforced.cache_clear()
    runners = [
        LocalRunner.from_settings(Settings.from_env()),
        LocalRunner.from_settings(Settings.from_env()),
    ]
    # Twice its limit, and nothing stops it: the attempt says that nothing was enforced.
    exit_ = (
        runners[0]
        .start(invocation(tmp_path, sys.executable, "-c", "bytearray(256 * 2**20)", memory_mb=128))
        .wait(30)
    )

    assert [r.limit_mode for r in runners] == ["none", "none"]
    assert exit_ is not None
    assert (exit_.returncode, exit_.oom_killed, exit_.limit_mode) == (0, False, "none")
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "NOT ENFORCED" in caplog.text


ORCHESTRATOR = """
import sys, time
from pathlib import Path
from osa_dagster.engine import Invocation, LocalRunner
from osa_dagster.settings import Settings
root = Path(sys.argv[1])
# Unsandboxed: the test follows the escaped child by its pid, which a sandbox would renumber.
attempt = LocalRunner.from_settings(Settings.from_env(), "cgroup", sandbox="off").start(Invocation(
    command=("sh", "-c", "setsid sleep 30 & echo $! > child.pid; sleep 30"), env={},
    in_dir=root, out_dir=root, files_root=root, memory_limit_mb=64, timeout_s=60,
    log_path=root / "hook.log"))
print(attempt.marker.model_dump_json(), flush=True)
time.sleep(60)
"""


@pytest.mark.slow
@pytest.mark.cgroup_kernel
def test_leftovers_of_a_dead_orchestrator_are_killed(tmp_path: Path) -> None:
    require_cgroups()
    orchestrator = subprocess.Popen(
        [sys.executable, "-c", ORCHESTRATOR, str(tmp_path)], stdout=subprocess.PIPE
    )
    assert orchestrator.stdout is not None
    marker = AttemptMarker.model_validate_json(orchestrator.stdout.readline())
    escaped = read_pid(tmp_path / "child.pid")

    orchestrator.kill()
    orchestrator.wait()

    # PR_SET_PDEATHSIG took the hook with the orchestrator; what left its session did not die.
    assert eventually(lambda: not alive(marker.pid))
    assert alive(escaped)
    assert marker.cgroup is not None and Path(marker.cgroup).is_dir()

    kill_leftovers(marker)

    assert eventually(lambda: not alive(escaped))
    assert not Path(marker.cgroup).exists()
    kill_leftovers(marker)  # a second call finds nothing and does nothing


def reused_pid(pid: int) -> ProcessIdentity:
    """A process that had `pid` before the process that has it now."""
    now = ProcessIdentity.of_pid(pid)
    return now.model_copy(update={"start_ticks": (now.start_ticks or 0) + 1})


def test_kill_leftovers_spares_a_process_that_reused_the_pid(
    sleeper: subprocess.Popen[bytes],
) -> None:
    marker = AttemptMarker(
        limit_mode="rlimit",
        process=reused_pid(sleeper.pid),
        cgroup=None,
    )

    kill_leftovers(marker)

    assert alive(sleeper.pid)


@pytest.mark.cgroup_kernel
def test_kill_leftovers_touches_no_cgroup_it_did_not_make(
    tmp_path: Path, sleeper: subprocess.Popen[bytes], caplog: pytest.LogCaptureFixture
) -> None:
    fake = tmp_path / "osa-fake"
    fake.mkdir()
    (fake / "cgroup.procs").write_text(f"{sleeper.pid}\n")
    marker = AttemptMarker(
        limit_mode="cgroup",
        process=reused_pid(sleeper.pid),
        cgroup=str(fake),
    )

    kill_leftovers(marker)

    assert alive(sleeper.pid) and fake.is_dir()
    assert "not a cgroup this runner creates" in caplog.text
