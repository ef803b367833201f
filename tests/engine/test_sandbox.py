"""The local runner's sandbox: how OSA_HOOK_SANDBOX chooses it, and what an attempt inside
sees, as root and as an ordinary user (rootless: the last test runs this file again as
uid 65534). The attacks themselves are tried in tests/faults/test_hostile_hooks.py.

The tests marked `cgroup_kernel` run in the cgroup v2 lane too (`make test-cgroup2`): a
sandboxed attempt in its cgroup v2, as root and rootless in a delegated cgroup."""

from __future__ import annotations

import json
import logging
import os
import site
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from osa_dagster.engine import AttemptMarker, Invocation, LocalRunner, kill_leftovers
from osa_dagster.engine.cgroup import attempt_cgroups
from osa_dagster.engine.runners import local as local_module
from osa_dagster.engine.runners import sandbox as sandbox_module
from osa_dagster.engine.runners.sandbox import SandboxPolicy, SandboxUnavailable
from osa_dagster.settings import Settings, SettingsError

from .helpers import require_cgroups, require_sandbox

# What a sandboxed hook reports about itself, as JSON on stdout; argv: a port listening on
# the host, a private folder and the code folder; OTHER_BATCH: another batch's folder (not
# an argument: the sandbox shows the paths a command names).
INTROSPECT = """
import json, os, socket, sys
port = int(sys.argv[1])
def writes(folder):
    try:
        with open(os.path.join(folder, "written-by-the-hook"), "w") as f:
            f.write("x")
        return True
    except OSError:
        return False
try:
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    network = True
except OSError:
    network = False
print(json.dumps({
    "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
    "env": sorted(os.environ), "cwd": os.getcwd(), "network": network,
    "root": sorted(os.listdir("/")), "private": sorted(os.listdir(sys.argv[2])),
    "visible_processes": sum(1 for p in os.listdir("/proc") if p.isdigit()),
    "other_batch": os.path.exists(os.environ["OTHER_BATCH"]),
    "writable": sorted(
        folder for folder in (sys.argv[2], sys.argv[3], "/osa/in", "/osa/files", "/usr", "/etc",
        "/", "/dev", "/proc", "/osa/out", "/tmp") if writes(folder)
    ),
}))
"""


@pytest.fixture
def sandboxed() -> None:
    require_sandbox()


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    server = socket.create_server(("127.0.0.1", 0))
    yield server
    server.close()


@pytest.fixture
def no_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A PATH without bwrap and setpriv; the once-per-process probe and warning forgotten."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    sandbox_module._unavailable_reason.cache_clear()
    local_module._warn_unsandboxed.cache_clear()
    yield
    sandbox_module._unavailable_reason.cache_clear()
    local_module._warn_unsandboxed.cache_clear()


def run_introspection(
    tmp_path: Path, runner: LocalRunner, port: int, private: Path, *, network: bool
) -> dict:
    folders = {name: tmp_path / name for name in ("in", "out", "files", "other-batch")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    code = os.environ.get("PYTHONPATH", "/").split(os.pathsep)[0]
    other_batch = folders["other-batch"]
    attempt = runner.start(
        Invocation(
            command=(
                sys.executable,
                "-c",
                INTROSPECT,
                str(port),
                str(private),
                code,
            ),
            env={"OSA_HOOK_NAME": "introspect", "OTHER_BATCH": str(other_batch)},
            in_dir=folders["in"],
            out_dir=folders["out"],
            files_root=folders["files"],
            memory_limit_mb=256,
            timeout_s=60,
            log_path=tmp_path / "hook.log",
            network=network,
        )
    )
    exit_ = attempt.wait(60)
    assert exit_ is not None and exit_.returncode == 0, (tmp_path / "hook.log").read_text()
    return json.loads((tmp_path / "hook.log").read_text().splitlines()[-1])


@pytest.mark.cgroup_kernel
def test_a_sandboxed_hook_is_nobody_with_no_network_and_sees_no_private_folder(
    sandboxed: None, tmp_path: Path, listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A code folder on PYTHONPATH holding a data folder, as the repository holds .data/.
    code = tmp_path / "code"
    private = code / "data"
    private.mkdir(parents=True)
    (private / "records.db").write_text("the records database")
    monkeypatch.setenv("PYTHONPATH", str(code))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-for-hooks")
    runner = LocalRunner.from_settings(
        Settings.from_env(), sandbox="on", sandbox_policy=SandboxPolicy(private=(private,))
    )

    seen = run_introspection(
        tmp_path / "a", runner, listener.getsockname()[1], private, network=False
    )

    assert (seen["uid"], seen["gid"], seen["groups"]) == (65534, 65534, [])
    assert seen["network"] is False
    assert seen["private"] == []  # there, but empty
    assert seen["cwd"] == "/tmp"
    assert "AWS_SECRET_ACCESS_KEY" not in seen["env"]
    assert {"OSA_IN", "OSA_OUT", "OSA_FILES", "OSA_HOOK_NAME"} <= set(seen["env"])
    assert not {"run", "home", "var", "sys"} & set(seen["root"])
    assert seen["visible_processes"] <= 3  # bubblewrap's init, the hook (and a zombie)
    assert seen["other_batch"] is False
    assert seen["writable"] == ["/osa/out", "/tmp"]
    assert not (private / "written-by-the-hook").exists()
    assert (tmp_path / "a" / "out" / "written-by-the-hook").exists()


def test_a_hook_that_opts_in_reaches_the_network(
    sandboxed: None, tmp_path: Path, listener: socket.socket
) -> None:
    runner = LocalRunner.from_settings(Settings.from_env(), sandbox="on")
    seen = run_introspection(
        tmp_path, runner, listener.getsockname()[1], Path("/tmp"), network=True
    )
    assert seen["network"] is True


def test_on_refuses_to_run_without_the_sandbox_in_one_line(no_tools: None) -> None:
    with pytest.raises(SandboxUnavailable) as refused:
        LocalRunner.from_settings(Settings.from_env(), sandbox="on")
    message = str(refused.value)
    assert "\n" not in message
    drop = "prlimit" if os.geteuid() else "setpriv"
    assert f"bwrap and {drop} not found: install the Debian packages" in message
    assert message.endswith(
        "or set OSA_HOOK_SANDBOX=off to run them unsandboxed, as this user, seeing the machine"
    )


def test_the_sandbox_is_on_unless_turned_off() -> None:
    assert Settings.from_env({}).hook_sandbox == "on"


def test_off_never_looks_for_the_sandbox_and_says_so_once(
    no_tools: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        runners = [
            LocalRunner.from_settings(Settings.from_env(), sandbox="off"),
            LocalRunner.from_settings(Settings.from_env(), sandbox="off"),
        ]
    assert [r.sandbox for r in runners] == [None, None]
    assert len([r for r in caplog.records if "UNSANDBOXED" in r.message]) == 1


@pytest.mark.parametrize(
    ("switch", "value", "named"),
    [
        ("kernel/unprivileged_userns_clone", "0", "kernel.unprivileged_userns_clone=0"),
        ("user/max_user_namespaces", "0", "user.max_user_namespaces=0"),
        (
            "kernel/apparmor_restrict_unprivileged_userns",
            "1",
            "kernel.apparmor_restrict_unprivileged_userns=1",
        ),
    ],
)
def test_a_kernel_closed_to_user_namespaces_is_named(
    tmp_path: Path, switch: str, value: str, named: str
) -> None:
    # A copy of the switches as the kernel shows them under /proc/sys, one of them closed.
    for name, open_value in (
        ("kernel/unprivileged_userns_clone", "1"),
        ("user/max_user_namespaces", "1000"),
        ("kernel/apparmor_restrict_unprivileged_userns", "0"),
    ):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{value if name == switch else open_value}\n")
    reason = sandbox_module._user_namespaces_closed(tmp_path)
    assert reason is not None and named in reason and "\n" not in reason
    (tmp_path / switch).write_text("1\n" if value == "0" else "0\n")
    assert sandbox_module._user_namespaces_closed(tmp_path) is None


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OSA_HOOK_SANDBOX", "maybe"),
        ("OSA_HOOK_SANDBOX", "auto"),
        ("OSA_HOOK_SANDBOX_USER", "0:0"),
        ("OSA_HOOK_SANDBOX_USER", "nobody"),
    ],
)
def test_a_bad_sandbox_setting_is_one_error_naming_it(variable: str, value: str) -> None:
    with pytest.raises(SettingsError, match=f"^{variable}={value!r}: "):
        Settings.from_env({variable: value})


def test_the_sandbox_user_is_configurable() -> None:
    settings = Settings.from_env({"OSA_HOOK_SANDBOX_USER": "1000:1000", "OSA_HOOK_SANDBOX": "on"})
    assert (settings.hook_sandbox, settings.hook_sandbox_ids) == ("on", (1000, 1000))


ORCHESTRATOR = """
import json, sys, time
from pathlib import Path
from osa_dagster.engine import Invocation, LocalRunner
from osa_dagster.settings import Settings
root = Path(sys.argv[1])
attempt = LocalRunner.from_settings(Settings.from_env(), "cgroup", sandbox="on").start(Invocation(
    command=("sleep", "600"), env={}, in_dir=root / "in", out_dir=root / "out",
    files_root=root / "files", memory_limit_mb=128, timeout_s=600, log_path=root / "hook.log",
))
print(attempt.marker.model_dump_json(), flush=True)
time.sleep(600)
"""


@pytest.mark.cgroup_kernel
def test_a_dead_orchestrators_sandboxed_attempt_leaves_no_cgroup_behind(
    sandboxed: None, tmp_path: Path
) -> None:
    require_cgroups()
    for name in ("in", "out", "files"):
        (tmp_path / name).mkdir()
    orchestrator = subprocess.Popen(
        [sys.executable, "-c", ORCHESTRATOR, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert orchestrator.stdout is not None
    marker = AttemptMarker.model_validate_json(orchestrator.stdout.readline())
    # cgroup v1 caps a sandboxed attempt's processes in a pids cgroup of its own; v2 in the
    # attempt's one cgroup.
    cgroups = [Path(c) for c in (marker.cgroup, marker.pids_cgroup) if c is not None]
    assert marker.cgroup is not None and (marker.pids_cgroup is None) == (
        attempt_cgroups().version == 2
    )
    assert all((c / "cgroup.procs").read_text().split() for c in cgroups)  # the hook is in them
    orchestrator.kill()
    orchestrator.wait()

    kill_leftovers(marker)  # what the next run does with the checkpoint's marker

    assert not any(c.exists() for c in cgroups)


def test_inputs_staged_in_a_private_folder_are_readable_by_the_hook(
    sandboxed: None, tmp_path: Path
) -> None:
    # The S3 store stages a batch's files in a folder only its owner may enter (0700).
    for name in ("in", "out", "files"):
        (tmp_path / name).mkdir(mode=0o700)
    (tmp_path / "files" / "data.txt").write_text("staged\n")
    attempt = LocalRunner.from_settings(Settings.from_env(), sandbox="on").start(
        Invocation(
            command=("cat", "/osa/files/data.txt"),
            env={},
            in_dir=tmp_path / "in",
            out_dir=tmp_path / "out",
            files_root=tmp_path / "files",
            memory_limit_mb=128,
            timeout_s=60,
            log_path=tmp_path / "hook.log",
        )
    )
    exit_ = attempt.wait(60)
    assert exit_ is not None and exit_.returncode == 0, (tmp_path / "hook.log").read_text()
    assert (tmp_path / "hook.log").read_text() == "staged\n"


NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
# The tests start hooks with sys.executable, which the ordinary user must reach too.
CAN_RUN_HOOKS = "import os, sys, pydantic; os.stat(sys.executable)"


def _interpreter_for_nobody(env: dict[str, str]) -> list[str]:
    """A Python that uid 65534 may run with this one's packages: this interpreter, or the
    system's of the same version when this one lies in a folder only root may enter."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    on_path = [Path(folder, version) for folder in os.environ["PATH"].split(os.pathsep)]
    for candidate in [sys.executable, *(str(path) for path in on_path if path.exists())]:
        usable = [*NOBODY, candidate, "-c", CAN_RUN_HOOKS]
        if subprocess.run(usable, env=env, check=False).returncode == 0:
            return [candidate]
    raise AssertionError(f"no {version} that uid 65534 may run with this project's packages")


@pytest.fixture
def nobodys_folder() -> Iterator[Path]:
    """A folder of uid 65534's, outside the tests' own (which only root may enter)."""
    with tempfile.TemporaryDirectory(prefix="osa-rootless-") as folder:
        os.chown(folder, 65534, 65534)
        yield Path(folder)


@pytest.mark.cgroup_kernel
def test_the_sandbox_holds_for_an_ordinary_user_too(nobodys_folder: Path) -> None:
    """This file again, as uid 65534: the rootless sandbox (an unprivileged user namespace)
    must pass every test that does not need root's cgroups."""
    if os.geteuid() != 0:
        pytest.skip("this run is an ordinary user's already")
    repo = Path(__file__).resolve().parents[2]
    work, empty = nobodys_folder, nobodys_folder / "empty"
    empty.mkdir()
    packages = [*site.getsitepackages(), str(repo), str(repo / "sdk" / "src")]
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(work),
        # Started by root, in root's cgroup, this user has no cgroup of its own (cgroup v1 is
        # never delegated; on v2 nothing is delegated to it here): its attempts are limited by
        # rlimits. The rootless sandbox in a delegated cgroup v2 is the lane's second run.
        "OSA_HOOK_MEMORY_LIMITS": "rlimit",
        "PYTHONPATH": os.pathsep.join([str(repo), str(repo / "sdk" / "src"), *packages]),
    }
    result = subprocess.run(
        [
            *NOBODY,
            *_interpreter_for_nobody(env),
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            "-rs",
            f"--basetemp={work / 'pytest'}",
            "-k",
            "not ordinary_user",
            __file__,
        ],
        env=env,
        # An empty folder: `python -m` puts the current folder on the import path, which the
        # sandbox shows its hooks, and the tests' folders must not be in it.
        cwd=empty,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    skipped = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
    # Only the cgroup test may be left out: an ordinary user has no cgroup v1 controller.
    assert all("cgroup" in line for line in skipped), skipped
    assert "passed" in result.stdout.splitlines()[-1]
