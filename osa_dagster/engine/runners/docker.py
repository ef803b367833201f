"""Run each attempt of a hook in its own sandboxed Docker container.

Hooks are other people's code, so a container gets only what the contract gives it: its
input folder and the batch's files read-only, its output folder writable, a small /tmp,
and nothing else. No network, a read-only root filesystem, an unprivileged user, no
capabilities, no privilege escalation, a pids limit, and memory+swap both set to the
attempt's limit so that a hook over its limit is OOM-killed instead of swapping.

The hook's stdout and stderr are read as they come, from a socket attached before the
container starts, into its capped log (base.HookLog): read after the exit, a flood of output
would first have to be held whole by Docker. Docker's own copy is capped as well.

An OOM is what Docker records in `State.OOMKilled`. An exit code of 137 alone means
"killed by SIGKILL", which `docker kill`, a timeout or an operator may also cause: it
never adds memory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests.exceptions
from docker.models.containers import Container
from docker.types import LogConfig
from docker.utils.socket import frames_iter
from osa_sdk.contract import BYTES_PER_MB, ENV_FILES, ENV_IN, ENV_OUT

from osa_dagster.engine.process_identity import ProcessIdentity
from osa_dagster.engine.runners.base import (
    HOOK_LOG_MAX_BYTES,
    ISOLATED_FILES,
    ISOLATED_IN,
    ISOLATED_OUT,
    AttemptExit,
    AttemptMarker,
    HookLog,
    Invocation,
    image_command,
    read_tail,
    readable_by_hooks,
    returncode_from_exit_code,
)

log = logging.getLogger(__name__)

# Labels that find our containers again: every hook container carries RUNNER_LABEL, and
# ORCHESTRATOR_LABEL says which process started it, so a sweep can tell an orphan of a
# dead orchestrator from a container another live step is still using.
RUNNER_LABEL = "org.osa.hook-runner"
ORCHESTRATOR_LABEL = "org.osa.orchestrator"
HOOK_LABEL = "org.osa.hook"

# nobody:nogroup: the hook owns nothing it does not need to.
DEFAULT_USER = "65534:65534"
_POLL_S = 0.5
# Docker's own copy of a hook's output, which `docker logs` shows while the container lives:
# rotated, so that a flood cannot fill the Docker host's disk before the attempt ends.
_DOCKER_LOG = LogConfig(
    type=LogConfig.types.JSON,
    config={"max-size": str(HOOK_LOG_MAX_BYTES), "max-file": "2"},
)
# How long the attached output may go on after the container has stopped: Docker closes it
# once the last of the output is copied, which takes moments.
_LOG_END_S = 30.0


def orchestrator_id() -> str:
    """This process, told apart from a later one that reuses its pid: an ORCHESTRATOR_LABEL."""
    return ProcessIdentity.of_this_process().model_dump_json()


class DockerRunner:
    """Starts hook containers on a Docker engine (DOCKER_HOST, or the default socket).

    The engine's bind mounts name folders of the machine the engine runs on: when the
    engine itself runs in a container, the Docker engine must see the same paths (mount
    the data folder at the same path in the step's container).
    """

    def __init__(
        self,
        client: docker.DockerClient | None = None,
        *,
        user: str = DEFAULT_USER,
        pids_limit: int = 256,
        tmp_size_mb: int = 64,
    ) -> None:
        self.client = client or docker.from_env()
        self.user = user
        self.pids_limit = pids_limit
        self.tmp_size_mb = tmp_size_mb
        self._orchestrator = orchestrator_id()
        self.remove_orphans()

    def start(self, inv: Invocation) -> DockerAttempt:
        if inv.image is None:
            raise ValueError(
                f"hook {inv.env.get('OSA_HOOK_NAME', '?')} has no image: set HookSpec.image "
                "to run it with the Docker runner"
            )
        _writable_by(inv.out_dir, self.user)
        readable_by_hooks(inv.in_dir, inv.files_root)
        name = f"osa-hook-{secrets.token_hex(8)}"
        env = {
            **inv.env,
            ENV_IN: ISOLATED_IN,
            ENV_OUT: ISOLATED_OUT,
            ENV_FILES: ISOLATED_FILES,
            "HOME": "/tmp",
        }
        container = self.client.containers.create(
            inv.image,
            image_command(inv.command),
            name=name,
            environment=env,
            volumes={
                str(inv.in_dir): {"bind": ISOLATED_IN, "mode": "ro"},
                str(inv.out_dir): {"bind": ISOLATED_OUT, "mode": "rw"},
                str(inv.files_root): {"bind": ISOLATED_FILES, "mode": "ro"},
            },
            working_dir="/tmp",
            user=self.user,
            # A hook that opts in shares the host's network, never Docker's default bridge.
            network_mode="host" if inv.network else "none",
            read_only=True,
            tmpfs={"/tmp": f"rw,nosuid,nodev,size={self.tmp_size_mb}m"},
            cap_drop=["ALL"],
            security_opt=["no-new-privileges"],
            pids_limit=self.pids_limit,
            mem_limit=inv.memory_limit_mb * BYTES_PER_MB,
            memswap_limit=inv.memory_limit_mb * BYTES_PER_MB,
            labels={
                RUNNER_LABEL: "docker",
                ORCHESTRATOR_LABEL: self._orchestrator,
                HOOK_LABEL: inv.env.get("OSA_HOOK_NAME", ""),
            },
            log_config=_DOCKER_LOG,
        )
        hook_log: AttachedHookLog | None = None
        try:
            hook_log = AttachedHookLog(self.client, container, inv.log_path)
            container.start()
        except BaseException:
            _remove(container)
            if hook_log is not None:
                hook_log.finish()
            raise
        return DockerAttempt(self.client, container, inv, hook_log)

    def kill_leftovers(self, marker: AttemptMarker) -> None:
        if marker.runner != "docker" or marker.container is None:
            return
        with contextlib.suppress(docker.errors.NotFound):
            _remove(self.client.containers.get(marker.container))

    def remove_orphans(self) -> list[str]:
        """Remove hook containers whose orchestrator is gone; the names removed.

        A step that was SIGKILLed cannot clean up after itself, and its checkpoint may
        never be read again (the partition may not be re-run): this sweep, done whenever
        a runner is created, still removes what it left.
        """
        removed = []
        for container in self.client.containers.list(all=True, filters={"label": RUNNER_LABEL}):
            owner = container.labels.get(ORCHESTRATOR_LABEL, "")
            if owner != self._orchestrator and not _alive(owner):
                _remove(container)
                removed.append(container.name)
        if removed:
            log.warning("removed %d hook container(s) left by dead steps", len(removed))
        return removed


class AttachedHookLog:
    """A container's stdout and stderr, read from an attached socket by a thread into the
    attempt's capped log as fast as the hook writes them."""

    def __init__(self, client: docker.DockerClient, container: Container, path: Path) -> None:
        # Attached before the container starts, so that nothing it prints is missed.
        self._socket = client.api.attach_socket(
            container.id, params={"stdout": 1, "stderr": 1, "stream": 1}
        )
        self._log = HookLog(path)
        self._thread = threading.Thread(
            target=self._drain, name=f"hook-log-{container.name}", daemon=True
        )
        self._thread.start()

    def _drain(self) -> None:
        try:
            for _, data in frames_iter(self._socket, tty=False):
                self._log.write(data)
        except OSError:
            pass  # the socket was shut down by finish(): what was read is kept
        finally:
            self._log.close()

    def finish(self) -> None:
        """Wait for the end of the output (the container has stopped), then close."""
        self._thread.join(_LOG_END_S)
        if self._thread.is_alive():
            log.warning("the output of a hook container did not end; its log stops here")
            with contextlib.suppress(OSError):
                # The socket docker-py hands out wraps the connection's own socket.
                getattr(self._socket, "_sock", self._socket).shutdown(socket.SHUT_RDWR)
            self._thread.join()
        self._socket.close()


class DockerAttempt:
    def __init__(
        self,
        client: docker.DockerClient,
        container: Container,
        inv: Invocation,
        hook_log: AttachedHookLog,
    ) -> None:
        self._client = client
        self._container = container
        self._inv = inv
        self._hook_log = hook_log
        self._deadline = time.monotonic() + inv.timeout_s
        self._timed_out = False
        self._peak_mb: float | None = None
        self._exit: AttemptExit | None = None
        self.marker = AttemptMarker(
            runner="docker", limit_mode="container", container=container.name
        )

    def wait(self, timeout: float) -> AttemptExit | None:
        if self._exit is not None:
            return self._exit
        end = time.monotonic() + max(0.0, min(timeout, self._deadline - time.monotonic()))
        state = self._state()
        while state["Running"] and time.monotonic() < end:
            self._sample_peak()
            with contextlib.suppress(requests.exceptions.RequestException):
                self._client.api.wait(
                    self._container.id, timeout=max(0.05, min(_POLL_S, end - time.monotonic()))
                )
            state = self._state()
        if state["Running"]:
            if time.monotonic() < self._deadline:
                return None
            self._timed_out = True
            self._container.kill()
            self._client.api.wait(self._container.id)
            state = self._state()
        return self._finish(state)

    def kill(self) -> None:
        # Killed, not removed: the next wait() collects its end and its logs, then removes it.
        if self._exit is None:
            with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                self._container.kill()

    def _state(self) -> dict[str, Any]:
        return self._client.api.inspect_container(self._container.id)["State"]

    def _sample_peak(self) -> None:
        # Docker forgets a container's memory peak once it stops, so it is sampled while
        # it runs: exact for a hook that ran at least one poll, None for a shorter one.
        with contextlib.suppress(docker.errors.APIError, requests.exceptions.RequestException):
            stats = self._client.api.stats(self._container.id, stream=False, one_shot=True)
            peak = stats.get("memory_stats", {}).get("max_usage")
            if peak:
                self._peak_mb = max(self._peak_mb or 0.0, peak / BYTES_PER_MB)

    def _finish(self, state: Mapping[str, Any]) -> AttemptExit:
        oom_killed = bool(state.get("OOMKilled"))
        code = int(state.get("ExitCode", -1))
        try:
            self._hook_log.finish()
        finally:
            _remove(self._container)
        self._exit = AttemptExit(
            returncode=returncode_from_exit_code(code),
            oom_killed=oom_killed,
            timed_out=self._timed_out,
            peak_memory_mb=self._inv.memory_limit_mb if oom_killed else self._peak_mb,
            stderr_tail=read_tail(self._inv.log_path),
            limit_mode="container",
        )
        return self._exit


def _writable_by(folder: Path, user: str) -> None:
    """Let the container's user write its output folder, and nobody else's."""
    uid, _, gid = user.partition(":")
    if os.geteuid() == 0 and uid.isdigit():
        os.chown(folder, int(uid), int(gid) if gid.isdigit() else -1)
    else:
        folder.chmod(0o777)


def _remove(container: Container) -> None:
    with contextlib.suppress(docker.errors.NotFound):
        container.remove(force=True)


def _alive(orchestrator: str) -> bool:
    """Whether the process named by an ORCHESTRATOR_LABEL value may still run: only one
    seen dead from here is not (another host's or pid namespace's is not ours to judge)."""
    try:
        identity = ProcessIdentity.model_validate_json(orchestrator)
    except ValueError:
        return True  # not a label this runner wrote
    return identity.alive() is not False
