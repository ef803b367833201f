"""Real Dagster processes for the UI and backfill tests: a throwaway Dagster home, the
`osa` and `dagster` commands run as subprocesses, and servers in their own process group
so that every process they start is stopped with them, whatever the test's outcome."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.conftest import REPO
from tests.fixtures.services import unavailable

# Loaded as a module, the code location is named after the module (in URLs, too).
CODE_LOCATION = "osa_dagster.definitions"
INSTANCE_YAML = """\
# A throwaway instance: SQLite storage under this folder, no telemetry, and no
# "join the community" dialog over the pages the browser test looks at.
telemetry:
  enabled: false
nux:
  enabled: false
"""
SERVER_START_TIMEOUT_S = 120.0
STOP_GRACE_S = 15.0
# Settings of the caller's shell that would point the processes at another store or database.
FOREIGN_SETTINGS = (
    "OSA_STORAGE",
    "OSA_DATABASE_URL",
    "OSA_HOOK_MEMORY",
    "OSA_CONVENTIONS",
    "OSA_EXECUTOR",
    "OSA_SOURCES",
)


@dataclass(frozen=True)
class DagsterSite:
    """A Dagster home and data folder, and the environment that points processes at them."""

    home: Path
    data: Path
    logs: Path
    env: dict[str, str]

    def run(self, *args: str, timeout_s: float = 300.0) -> subprocess.CompletedProcess[str]:
        """Run a command to completion in this site; a failure shows its output."""
        result = subprocess.run(
            args, env=self.env, cwd=self.home, capture_output=True, text=True, timeout=timeout_s
        )
        if result.returncode != 0:
            pytest.fail(
                f"{' '.join(args)} exited {result.returncode}\n"
                f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-4000:]}"
            )
        return result

    def osa(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(sys.executable, "-m", "osa_dagster.cli", *args)

    def plan(self, *args: str) -> list[str]:
        """`osa plan ARGS`: the partition keys of the batches it planned, in order."""
        planned = json.loads(self.osa("plan", *args, "--json").stdout)
        return [batch["partition"] for batch in planned["batches"]]

    def dagster(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(sys.executable, "-m", "dagster", *args)


def make_site(root: Path) -> DagsterSite:
    home, data, logs = root / "dagster_home", root / "data", root / "logs"
    for folder in (home, data, logs):
        folder.mkdir(parents=True)
    (home / "dagster.yaml").write_text(INSTANCE_YAML)
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN_SETTINGS}
    env |= {
        "DAGSTER_HOME": str(home),
        "OSA_DATA_DIR": str(data),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    }
    return DagsterSite(home=home, data=data, logs=logs, env=env)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group; SIGKILL whatever of it is left after a grace period."""
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with suppress(subprocess.TimeoutExpired):
        process.wait(timeout=STOP_GRACE_S)
    # The leader may be gone while its children (code server, daemon, run workers) are not.
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


def make_ui(port: int) -> list[str]:
    """`make ui PORT=...` in the repository: `dagster dev -w workspace.yaml`, as people start it."""
    return ["make", "--no-print-directory", "-C", str(REPO), "ui", f"PORT={port}"]


@contextmanager
def dagster_server(
    site: DagsterSite, command: list[str] | None, name: str, *, make_target: bool = False
) -> Iterator[str]:
    """Start a Dagster webserver command (`dagster dev` or `dagster-webserver` on the code
    location, or `make ui` if `make_target`) on a free port of 127.0.0.1; yield its URL once
    it answers; stop its whole process group."""
    with dagster_server_process(site, command, name, make_target=make_target) as (url, _):
        yield url


@contextmanager
def dagster_server_process(
    site: DagsterSite, command: list[str] | None, name: str, *, make_target: bool = False
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`dagster_server`, yielding its process too: the leader of its own process group."""
    port = free_port()
    log = site.logs / f"{name}.log"
    if make_target:
        argv = make_ui(port)
    else:
        assert command is not None
        argv = [*command, "-m", CODE_LOCATION, "-h", "127.0.0.1", "-p", str(port)]
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv,
            env=site.env,
            cwd=site.home,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"{name} exited {process.returncode} on start:\n{_tail(log)}")
            try:
                if requests.get(f"{url}/server_info", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"{name} did not answer within {SERVER_START_TIMEOUT_S} s:\n{_tail(log)}"
                )
            time.sleep(0.5)
        yield url, process
    finally:
        _stop_group(process)


def chromium_path() -> str:
    """Debian's chromium (OSA_CHROMIUM overrides); missing, the test fails on CI, else skips."""
    path = os.environ.get("OSA_CHROMIUM") or shutil.which("chromium")
    if path is None or not Path(path).is_file():
        unavailable(f"no chromium at {path} (apt-get install chromium, or set OSA_CHROMIUM)")
    return path


def artifacts_dir() -> Path:
    folder = Path(os.environ.get("OSA_TEST_ARTIFACTS", REPO / ".test-artifacts" / "ui"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder
