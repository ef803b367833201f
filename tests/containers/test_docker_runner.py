"""The Docker runner on a real Docker engine: sandbox, real OOM kills, kills that are not
OOMs, ids that are not folder names, and containers that never outlive their attempt."""

from __future__ import annotations

import re
import shutil
import socket
import threading
from pathlib import Path

import docker
import pytest
from osa_sdk.contract import files_dir_for
from osa_sdk.types import OutcomeStatus

from osa_dagster.engine import HookSpec, MemoryPolicy
from osa_dagster.engine.process_identity import ProcessIdentity
from osa_dagster.engine.runners.base import HOOK_LOG_MAX_BYTES, dropped_marker
from osa_dagster.engine.runners.docker import (
    ORCHESTRATOR_LABEL,
    RUNNER_LABEL,
    DockerRunner,
)
from osa_dagster.engine.spec import sdk_hook_command
from tests.engine.helpers import Harness, eventually, record
from tests.fixtures import flooding_hooks

pytestmark = pytest.mark.slow

PROBE = sdk_hook_command("sandbox_probe:probe")
FLOODING_IMAGE = "osa-test-flooding:latest"


def probe_spec(image: str, *, base_mb: int = 128, cap_mb: int = 512) -> HookSpec:
    return HookSpec(
        name="probe",
        command=PROBE,
        image=image,
        memory=MemoryPolicy(base_mb=base_mb, cap_mb=cap_mb),
        timeout_s=120,
    )


@pytest.fixture
def docker_harness(tmp_path: Path, docker_client: docker.DockerClient) -> Harness:
    return Harness(tmp_path, DockerRunner(docker_client))  # type: ignore[arg-type]


def add_file(harness: Harness, record_id: str, name: str, data: bytes) -> None:
    folder = harness.files_root / files_dir_for(record_id)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)


def test_ids_that_are_not_folder_names_keep_their_files(docker_harness, probe_image):
    ids = ["1abc:A", "user@host", "a/b/../c", "with space", "plain"]
    for number, record_id in enumerate(ids):
        add_file(docker_harness, record_id, "entry.cif", b"x" * (100 + number))
    checkpoint = docker_harness.run(probe_spec(probe_image), [record(i) for i in ids])
    for number, record_id in enumerate(ids):
        outcome = checkpoint.outcomes[record_id]
        assert outcome.status is OutcomeStatus.PASSED, (record_id, outcome)
        assert outcome.features[0]["files"] == {"entry.cif": 100 + number}
        assert outcome.features[0]["uid"] == 65534


def test_sandbox_refuses_network_and_writes_outside_tmp_and_outputs(docker_harness, probe_image):
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    try:
        records = [
            record("net", connect=f"127.0.0.1:{port}"),
            record("net_out", connect="1.1.1.1:53"),
            record("root_fs", write="/opt/osa/planted.py"),
            record("inputs", write="/osa/in/records.jsonl"),
            record("files", write=f"/osa/files/{files_dir_for('tmp')}/planted"),
            record("tmp", write="/tmp/scratch.txt"),
            record("outputs", write="/osa/out/scratch.txt"),
        ]
        add_file(docker_harness, "tmp", "entry.cif", b"data")
        checkpoint = docker_harness.run(probe_spec(probe_image), records)
        # The container's 127.0.0.1 is its own: the host's listener heard nothing.
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()
    finally:
        listener.close()
    status = {rid: o.status for rid, o in checkpoint.outcomes.items()}
    assert status == {
        "net": OutcomeStatus.ERRORED,
        "net_out": OutcomeStatus.ERRORED,
        "root_fs": OutcomeStatus.ERRORED,
        "inputs": OutcomeStatus.ERRORED,
        "files": OutcomeStatus.ERRORED,
        "tmp": OutcomeStatus.PASSED,
        "outputs": OutcomeStatus.PASSED,
    }
    assert "refused" in checkpoint.outcomes["net"].reason.lower()
    assert "unreachable" in checkpoint.outcomes["net_out"].reason.lower()
    assert "read-only file system" in checkpoint.outcomes["root_fs"].reason.lower()
    assert "read-only file system" in checkpoint.outcomes["inputs"].reason.lower()
    assert not (docker_harness.files_root / files_dir_for("tmp") / "planted").exists()


def test_a_real_oom_escalates_one_step_then_succeeds(docker_harness, probe_image):
    records = [record("small", size_mb=0.5), record("big", size_mb=2.0, alloc_mb=180)]
    checkpoint = docker_harness.run(probe_spec(probe_image, base_mb=128, cap_mb=512), records)
    assert [(a.memory_limit_mb, a.oom_killed) for a in checkpoint.attempts] == [
        (128, True),
        (256, False),
    ]
    assert checkpoint.attempts[0].limit_mode == "container"
    assert checkpoint.attempts[0].first_unfinished == "big"
    assert checkpoint.outcomes["big"].status is OutcomeStatus.PASSED
    assert checkpoint.outcomes["big"].features[0]["memory_limit_mb"] == 256
    # The small record finished in the first attempt and was not run again.
    assert checkpoint.outcomes["small"].features[0]["memory_limit_mb"] == 128


def test_docker_kill_is_not_an_oom(docker_harness, probe_image, docker_client):
    records = [record("slow", sleep_s=60), record("after")]
    result = {}

    def run() -> None:
        result["checkpoint"] = docker_harness.run(probe_spec(probe_image), records)

    thread = threading.Thread(target=run)
    thread.start()

    def running() -> list:
        return docker_client.containers.list(filters={"label": RUNNER_LABEL, "status": "running"})

    assert eventually(lambda: bool(running()), timeout_s=30)
    running()[0].kill()  # SIGKILL from outside, exit code 137: not the kernel OOM killer
    thread.join(timeout=60)
    checkpoint = result["checkpoint"]
    assert len(checkpoint.attempts) == 1
    attempt = checkpoint.attempts[0]
    assert (attempt.returncode, attempt.oom_killed, attempt.memory_limit_mb) == (-9, False, 128)
    # "after" may have been done before the kill came (the runner's order is its own); "slow",
    # which sleeps a minute, cannot have been.
    unfinished = [i for i in ("slow", "after") if checkpoint.outcomes[i].status.value != "passed"]
    assert "slow" in unfinished
    for record_id in unfinished:
        outcome = checkpoint.outcomes[record_id]
        assert outcome.status is OutcomeStatus.ERRORED and outcome.retryable
        assert "SIGKILL" in outcome.reason and "not an OOM" in outcome.reason


def test_a_timeout_removes_the_container(docker_harness, probe_image):
    spec = probe_spec(probe_image).model_copy(update={"timeout_s": 3.0})
    checkpoint = docker_harness.run(spec, [record("stuck", sleep_s=60)])
    assert checkpoint.attempts[0].timed_out
    assert checkpoint.outcomes["stuck"].retryable


def dead_here() -> str:
    """The label of an orchestrator of this machine that has exited: pid 1 of this pid
    namespace started at tick 0, which no process ever does."""
    return ProcessIdentity.of_pid(1).model_copy(update={"start_ticks": 0}).model_dump_json()


def elsewhere() -> str:
    return ProcessIdentity.of_pid(1).model_copy(update={"host": "another-host"}).model_dump_json()


def test_containers_of_dead_orchestrators_are_swept(docker_client, probe_image):
    runner = DockerRunner(docker_client)
    orphan = docker_client.containers.run(
        probe_image,
        ["sleep", "300"],
        detach=True,
        network_mode="none",
        labels={RUNNER_LABEL: "docker", ORCHESTRATOR_LABEL: dead_here()},
    )
    alive_elsewhere = docker_client.containers.run(
        probe_image,
        ["sleep", "300"],
        detach=True,
        network_mode="none",
        labels={RUNNER_LABEL: "docker", ORCHESTRATOR_LABEL: elsewhere()},
    )
    try:
        removed = runner.remove_orphans()
        assert orphan.name in removed
        assert alive_elsewhere.name not in removed
        with pytest.raises(docker.errors.NotFound):
            orphan.reload()
        # A new runner sweeps too: a step that starts after a crash cleans up at once.
        second_orphan = docker_client.containers.run(
            probe_image,
            ["sleep", "300"],
            detach=True,
            network_mode="none",
            labels={RUNNER_LABEL: "docker", ORCHESTRATOR_LABEL: dead_here()},
        )
        DockerRunner(docker_client)
        with pytest.raises(docker.errors.NotFound):
            second_orphan.reload()
    finally:
        alive_elsewhere.remove(force=True)


@pytest.fixture
def flooding_image(docker_client: docker.DockerClient, pdb_hook_image: str, tmp_path: Path) -> str:
    """The pdb hook image plus tests/fixtures/flooding_hooks.py."""
    shutil.copy(flooding_hooks.__file__, tmp_path / "flooding_hooks.py")
    (tmp_path / "Dockerfile").write_text(
        f"FROM {pdb_hook_image}\nCOPY flooding_hooks.py /opt/osa/flooding_hooks.py\n"
    )
    docker_client.images.build(path=str(tmp_path), tag=FLOODING_IMAGE, rm=True)
    return FLOODING_IMAGE


def test_a_flood_of_stderr_is_kept_to_the_log_cap_with_its_traceback(
    docker_harness, flooding_image
):
    """100 times the log cap on stderr, then a crash: the log is the cap and a marker, and the
    records left get the traceback at the end of the flood."""
    flood_mb = 100 * HOOK_LOG_MAX_BYTES // (1024 * 1024)
    spec = HookSpec(
        name="flood",
        command=("python3", "/opt/osa/flooding_hooks.py"),
        image=flooding_image,
        memory=MemoryPolicy(base_mb=128, cap_mb=128),
        timeout_s=300,
        config={"stop_at": "crash", "stderr_mb": flood_mb, "exit": 1},
    )

    checkpoint = docker_harness.run(spec, [record("ok", 1), record("crash", 2)])

    assert checkpoint.outcomes["ok"].status is OutcomeStatus.PASSED
    crashed = checkpoint.outcomes["crash"]
    assert crashed.status is OutcomeStatus.ERRORED
    assert crashed.reason.startswith("hook exited with code 1: ")
    assert crashed.reason.endswith(flooding_hooks.TAIL_ERROR)
    assert not checkpoint.attempts[0].timed_out
    log = (docker_harness.workdir / "attempt-1" / "hook.log").read_bytes()
    assert len(log) <= HOOK_LOG_MAX_BYTES + len(dropped_marker(10**12))
    assert log.startswith(flooding_hooks.HEAD_LINE.encode())
    assert log.endswith(f"{flooding_hooks.TAIL_ERROR}\n".encode())
    [dropped] = re.findall(rb"\[\.\.\. ([0-9.]+) MB of the hook's output dropped here", log)
    assert float(dropped) >= flood_mb - 1
