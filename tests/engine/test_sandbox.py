"""The local runner's sandbox: how OSA_HOOK_SANDBOX chooses it, and what an attempt inside
sees. The attacks themselves are tried in tests/faults/test_hostile_hooks.py."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from osa_dagster.engine import AttemptMarker, Invocation, LocalRunner, kill_leftovers
from osa_dagster.engine.runners import local as local_module
from osa_dagster.engine.runners import sandbox as sandbox_module
from osa_dagster.engine.runners.sandbox import SandboxPolicy, SandboxUnavailable, find_sandbox
from osa_dagster.settings import Settings, SettingsError
from tests.fixtures.services import unavailable

from .helpers import require_cgroups

# What a sandboxed hook reports about itself, as JSON on stdout.
INTROSPECT = """
import json, os, socket, sys
port = int(sys.argv[1])
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
}))
"""


@pytest.fixture
def sandboxed() -> None:
    try:
        find_sandbox(SandboxPolicy())
    except SandboxUnavailable as reason:
        unavailable(str(reason))


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
    folders = {name: tmp_path / name for name in ("in", "out", "files")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    attempt = runner.start(
        Invocation(
            command=(sys.executable, "-c", INTROSPECT, str(port), str(private)),
            env={"OSA_HOOK_NAME": "introspect"},
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
    runner = LocalRunner(sandbox="on", sandbox_policy=SandboxPolicy(private=(private,)))

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


def test_a_hook_that_opts_in_reaches_the_network(
    sandboxed: None, tmp_path: Path, listener: socket.socket
) -> None:
    runner = LocalRunner(sandbox="on")
    seen = run_introspection(
        tmp_path, runner, listener.getsockname()[1], Path("/tmp"), network=True
    )
    assert seen["network"] is True


def test_on_refuses_to_run_without_the_sandbox_in_one_line(no_tools: None) -> None:
    with pytest.raises(SandboxUnavailable) as refused:
        LocalRunner(sandbox="on")
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("bwrap and setpriv not found: install the Debian packages")


def test_auto_runs_unsandboxed_and_says_so_once(
    no_tools: None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        runners = [LocalRunner(sandbox="auto"), LocalRunner(sandbox="auto")]
    assert [r.sandbox for r in runners] == [None, None]
    warnings = [r.message for r in caplog.records if "UNSANDBOXED" in r.message]
    assert len(warnings) == 1
    assert "bwrap and setpriv not found" in warnings[0]


def test_off_never_looks_for_the_sandbox(no_tools: None) -> None:
    assert LocalRunner(sandbox="off").sandbox is None


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OSA_HOOK_SANDBOX", "maybe"),
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
root = Path(sys.argv[1])
attempt = LocalRunner("cgroup", sandbox="on").start(Invocation(
    command=("sleep", "600"), env={}, in_dir=root / "in", out_dir=root / "out",
    files_root=root / "files", memory_limit_mb=128, timeout_s=600, log_path=root / "hook.log",
))
print(attempt.marker.model_dump_json(), flush=True)
time.sleep(600)
"""


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
    assert marker.cgroup is not None and marker.pids_cgroup is not None
    assert Path(marker.pids_cgroup, "cgroup.procs").read_text().split()  # the hook is in it
    orchestrator.kill()
    orchestrator.wait()

    kill_leftovers(marker)  # what the next run does with the checkpoint's marker

    assert not Path(marker.cgroup).exists()
    assert not Path(marker.pids_cgroup).exists()


def test_inputs_staged_in_a_private_folder_are_readable_by_the_hook(
    sandboxed: None, tmp_path: Path
) -> None:
    # The S3 store stages a batch's files in a folder only its owner may enter (0700).
    for name in ("in", "out", "files"):
        (tmp_path / name).mkdir(mode=0o700)
    (tmp_path / "files" / "data.txt").write_text("staged\n")
    attempt = LocalRunner(sandbox="on").start(
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
