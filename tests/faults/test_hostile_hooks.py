"""Hostile hooks, tried for real under each runner: the sandboxed local runner, the Docker
runner, and the local runner with OSA_HOOK_SANDBOX=off, which shows what is then possible.

One batch holds an honest validator's records (bad:* it rejects, good:1 it passes) and one
record per attack of tests/fixtures/hostile_hooks.py; the hostile hook runs after the
validator, over the real artifact-store layout, with the paths of everything it attacks.
The orchestrating part runs in a child process whose environment holds secrets (an AWS key,
a database password), as a real orchestrator's would. The test then checks the evidence:
the raw batch and the validator's checkpoint byte for byte, the published set, what the
features hold, the connections a listener of its own received, the processes still alive.
Two more batches replace the output folder's features.jsonl with a FIFO (then hang) and
with a symlink to forged outcomes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.engine.helpers import require_cgroups
from tests.fixtures import hostile_hooks
from tests.fixtures.hostile_hooks import ATTACKS, HONEST, OUTPUT_ATTACKS, REJECTED_BY_VALIDATOR
from tests.fixtures.services import unavailable

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
HOOK_MODULE = "tests.fixtures.hostile_hooks"
IMAGE_MODULE = "hostile_hooks"
HOSTILE_IMAGE = "osa-test-hostile:latest"
HOOK_TIMEOUT_S = 60.0
HOSTILE_MEMORY_MB = 128
# Every record the validator passes, but for the two the hostile hook must error itself.
PASSED_BY_HONEST_HOOKS = {*HONEST, *ATTACKS} - {"nan_feature", "raise_own_memory_limit"}


class Listener:
    """A TCP listener on 127.0.0.1 that counts the connections it accepts."""

    def __init__(self) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._socket.settimeout(0.2)
        self.port = self._socket.getsockname()[1]
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                connection, _ = self._socket.accept()
                self.accepted += 1
                connection.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._socket.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = Listener()
    yield server
    server.close()


def survivors(marker: str) -> list[int]:
    """The processes whose command line holds `marker`: the hostile grandchild, if alive."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
    return found


@pytest.fixture
def marker() -> Iterator[str]:
    """A token for the grandchild's command line; whatever holds it is killed at the end."""
    token = f"osa-hostile-survivor-{secrets.token_hex(6)}"
    yield token
    for pid in survivors(token):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def run_driver(root: Path, runner: str, listener: Listener, marker: str, image: str) -> dict:
    token = secrets.token_hex(12)
    home_secret = root / "home" / ".aws" / "credentials"
    home_secret.parent.mkdir(parents=True)
    home_secret.write_text(f"aws_secret_access_key = {token}-home\n")
    settings = {
        "root": str(root),
        "runner": runner,
        "image": image,
        "listener_port": listener.port,
        "marker": marker,
        "home_secret": str(home_secret),
    }
    env = {
        **os.environ,
        # This checkout's SDK, whatever osa_sdk the environment has installed.
        "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "sdk" / "src")]),
        "AWS_SECRET_ACCESS_KEY": token,
        "OSA_DATABASE_URL": f"postgresql://osa:{token}@db.invalid/osa",
        "OSA_HOOK_SANDBOX": "off" if runner == "unsandboxed" else "on",
    }
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, __file__, json.dumps(settings)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.splitlines()[-1])
    report["token"] = token
    report["seconds"] = time.monotonic() - started
    return report


def docker_socket() -> str:
    return os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock").removeprefix("unix://")


def require_sandbox() -> None:
    """The sandbox's tools and rights are here; else the test fails on CI, skips elsewhere."""
    from osa_dagster.engine.runners.sandbox import SandboxPolicy, SandboxUnavailable, find_sandbox

    try:
        find_sandbox(SandboxPolicy())
    except SandboxUnavailable as reason:
        unavailable(str(reason))


def features_of(report: dict, record_id: str) -> dict[str, Any]:
    [row] = report["hostile"]["outcomes"][record_id]["features"]
    return row


def shadow_head() -> str:
    """The first line of /etc/shadow, which only root can read."""
    return Path("/etc/shadow").read_text().splitlines()[0]


@pytest.fixture
def hostile_image(tmp_path: Path) -> str:
    """The pdb hook image with this checkout's osa_sdk and the hostile hooks module, built
    on the Docker engine of DOCKER_HOST (the pdb image by images/build.py when missing)."""
    import docker
    import docker.errors

    from osa_dagster.conventions.pdb import HOOK_IMAGE

    try:
        client = docker.from_env()
        client.ping()
    except docker.errors.DockerException as error:
        unavailable(f"no Docker engine at DOCKER_HOST={os.environ.get('DOCKER_HOST')}: {error}")
    try:
        client.images.get(HOOK_IMAGE.name)
    except docker.errors.ImageNotFound:
        subprocess.run([sys.executable, str(REPO / "images" / "build.py")], check=True)
    context = tmp_path / "image"
    shutil.copytree(REPO / "sdk" / "src" / "osa_sdk", context / "osa_sdk")
    shutil.copy(hostile_hooks.__file__, context / f"{IMAGE_MODULE}.py")
    site = "/opt/osa/lib/python3.11/site-packages"
    (context / "Dockerfile").write_text(
        f"FROM {HOOK_IMAGE.name}\nCOPY osa_sdk {site}/osa_sdk\nCOPY {IMAGE_MODULE}.py {site}/\n"
    )
    client.images.build(path=str(context), tag=HOSTILE_IMAGE, rm=True)
    return HOSTILE_IMAGE


ISOLATING_RUNNERS = ["sandboxed", "docker"]


@pytest.mark.parametrize("runner", ISOLATING_RUNNERS)
def test_every_attack_fails_and_only_what_honest_hooks_passed_is_published(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    listener: Listener,
    marker: str,
    runner: str,
) -> None:
    image = request.getfixturevalue("hostile_image") if runner == "docker" else ""
    if runner == "sandboxed":
        require_sandbox()
    report = run_driver(tmp_path, runner, listener, marker, image)
    hostile = report["hostile"]

    # The published set is exactly what the honest validator (and the hook's own errors) left.
    assert set(report["published"]) == PASSED_BY_HONEST_HOOKS
    # Nothing the hook could reach changed: raw batch, sibling checkpoint, the batch's files.
    assert report["raw_before"] == report["raw_after"]
    assert report["validator_checkpoint_before"] == report["validator_checkpoint_after"]
    # No secret and no host file reached a stored outcome, a feature row or a reason.
    stored = json.dumps(hostile) + json.dumps(report["feature_rows"])
    assert report["token"] not in stored
    assert shadow_head() not in stored
    assert features_of(report, "read_orchestrator_environment")["found"] == []
    for got in features_of(report, "read_host_files")["got"].values():
        assert got.startswith("refused:")
    written = features_of(report, "write_inputs")["written"]
    assert all(str(value).startswith("refused:") for value in written.values()), written
    assert features_of(report, "reach_docker_socket")["reply"].startswith("refused:")
    assert listener.accepted == 0
    assert features_of(report, "connect_to_listener")["connected"] != True  # noqa: E712
    assert features_of(report, "read_the_store")["store_entries"] == 0
    forged = features_of(report, "forge_sibling_checkpoint")["forged"]
    assert all(str(value).startswith("refused:") for value in forged.values()), forged
    # Limits hold: the process cap, the memory limit (the record is poison, alone at 128 MB).
    processes = features_of(report, "many_processes")
    assert processes["started"] < hostile_hooks.PROCESSES_TRIED, processes
    memory = hostile["outcomes"]["raise_own_memory_limit"]
    assert (memory["status"], memory["reason"]) == (
        "errored",
        f"poison: OOM alone at {HOSTILE_MEMORY_MB} MB",
    )
    nan = hostile["outcomes"]["nan_feature"]
    assert nan["status"] == "errored"
    assert "features[0].score is NaN" in nan["reason"]
    # Nothing outlived the run, and nothing hung.
    assert survivors(marker) == []
    assert not any(attempt["timed_out"] for attempt in hostile["attempts"])
    assert_output_attacks_refused(report)


def test_without_the_sandbox_a_hostile_hook_can_do_all_of_it(
    tmp_path: Path, listener: Listener, marker: str
) -> None:
    """OSA_HOOK_SANDBOX=off: what the README says a hook can then do, shown for real."""
    require_cgroups()  # raising its own limit is shown on a cgroup of its own
    report = run_driver(tmp_path, "unsandboxed", listener, marker, "")
    hostile = report["hostile"]

    # The forged checkpoint publishes what the validator rejected, with forged metadata.
    assert set(REJECTED_BY_VALIDATOR) <= set(report["published"])
    assert report["validator_checkpoint_before"] != report["validator_checkpoint_after"]
    assert report["raw_before"] != report["raw_after"]
    # The orchestrator's secrets and root's files end up in stored features.
    assert report["token"] in json.dumps(report["feature_rows"])
    assert shadow_head() in json.dumps(report["feature_rows"])
    assert features_of(report, "write_inputs")["written"]["new_file"] is True
    if Path(docker_socket()).exists():
        assert features_of(report, "reach_docker_socket")["reply"].startswith("HTTP/")
    assert listener.accepted == 1
    assert features_of(report, "read_the_store")["store_entries"] > 0
    # It raised its own memory limit and passed over it; its grandchild left the cgroup.
    memory = features_of(report, "raise_own_memory_limit")
    assert memory["allocated_mb"] == hostile_hooks.ALLOCATE_MB
    assert features_of(report, "many_processes")["started"] == hostile_hooks.PROCESSES_TRIED
    assert survivors(marker) != []
    # What the engine itself guards holds with or without the sandbox.
    nan = hostile["outcomes"]["nan_feature"]
    assert nan["status"] == "errored"
    assert not any(attempt["timed_out"] for attempt in hostile["attempts"])
    assert_output_attacks_refused(report)


def assert_output_attacks_refused(report: dict) -> None:
    kinds = {"output:fifo": "a FIFO", "output:symlink": "a symlink"}
    for record_id, kind in kinds.items():
        outcome = report["output_attacks"][record_id]
        assert outcome["status"] == "errored"
        assert outcome["reason"] == (
            f"output refused: features.jsonl in the output folder is {kind}, not a regular file"
        )
        # Stopped as soon as the output was refused, long before the hook's timeout.
        assert not outcome["timed_out"]
        assert outcome["seconds"] < HOOK_TIMEOUT_S


# The driver, run in a child process with secrets in its environment.


def _digest_tree(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "missing"


def _drive(settings: dict[str, Any]) -> dict[str, Any]:
    from osa_sdk.authoring import FetchContext, Ingester, ingester
    from osa_sdk.types import IngesterRecord, RecordRef
    from sqlalchemy import select

    from osa_dagster.batch.fetch import fetch_raw_batch
    from osa_dagster.batch.hooks import checkpoint_key, run_batch_hook
    from osa_dagster.batch.plan import plan_ingest
    from osa_dagster.batch.publish import publish_batch, store_batch_features
    from osa_dagster.conventions.base import Convention
    from osa_dagster.engine import Checkpoint, LocalRunner, Runner
    from osa_dagster.engine.spec import HookSpec, MemoryPolicy, sdk_hook_command
    from osa_dagster.records import Feature, RecordsDatabase
    from osa_dagster.settings import Settings
    from osa_dagster.storage.layout import BatchLayout
    from osa_dagster.storage.store import FileSystemStore

    root = Path(settings["root"])
    store = FileSystemStore(root / "store")
    docker = settings["runner"] == "docker"

    @ingester(name="hostile_hooks")
    class Records(Ingester):
        def discover(self, since: Any, limit: int | None) -> list[RecordRef]:
            return [RecordRef(source_id=i) for i in self.config["ids"]]

        def fetch(self, refs: Any, ctx: FetchContext) -> Iterator[IngesterRecord]:
            # Growing sizes: the records run in the order of ATTACKS, memory attack last.
            for n, ref in enumerate(refs):
                data = ctx.add_bytes(ref.source_id, "data.txt", b"x" * 100 * (n + 1))
                yield IngesterRecord(source_id=ref.source_id, metadata={}, files=[data])

    def command(function: str) -> tuple[str, ...]:
        if docker:
            return ("python3", "-m", "osa_sdk", "hook", f"{IMAGE_MODULE}:{function}")
        return sdk_hook_command(f"{HOOK_MODULE}:{function}")

    def convention(name: str, ids: list[str], targets: dict[str, Any]) -> Convention:
        def spec(function: str, memory_mb: int, config: dict[str, Any]) -> HookSpec:
            return HookSpec(
                name=function,
                command=command(function),
                image=settings["image"] or None,
                memory=MemoryPolicy(base_mb=memory_mb, cap_mb=memory_mb),
                timeout_s=HOOK_TIMEOUT_S,
                config=config,
                emits_features=True,
            )

        return Convention(
            name=name,
            ingester=Records,
            ingester_config={"ids": ids},
            # The validator takes no targets: its version, and so where its checkpoint is
            # (one of the targets), does not depend on them.
            hooks=(
                spec("validator", 256, {}),
                spec("hostile", HOSTILE_MEMORY_MB, {"targets": targets}),
            ),
            batch_size=len(ids) if name == "hostile_hooks" else 1,
        )

    runner: Runner
    if docker:
        from osa_dagster.engine.runners.docker import DockerRunner

        runner = DockerRunner()
    else:
        runner = LocalRunner.from_settings(Settings.from_env())

    def run(conv: Convention, hook_name: str, partition: str) -> tuple[Checkpoint, float]:
        started = time.monotonic()
        progress = run_batch_hook(conv, hook_name, store, partition, runner)
        return progress.checkpoint, time.monotonic() - started

    ids = [*REJECTED_BY_VALIDATOR, *HONEST, *ATTACKS]
    [partition] = plan_ingest(convention("hostile_hooks", ids, {}), store).partitions
    layout = BatchLayout("hostile_hooks", partition)
    validator_checkpoint = store.root / checkpoint_key(
        convention("hostile_hooks", ids, {}), partition, "validator"
    )
    forged = root / "forged.jsonl"
    forged.write_text("".join(json.dumps({"id": i, "features": []}) + "\n" for i in OUTPUT_ATTACKS))
    targets = {
        "store": str(store.root),
        "validator_checkpoint": str(validator_checkpoint),
        "raw_records": str(store.root / layout.raw_records),
        "docker_socket": docker_socket(),
        "listener_port": settings["listener_port"],
        "marker": settings["marker"],
        "home_secret": settings["home_secret"],
        "forged_outcomes": str(forged),
    }
    conv = convention("hostile_hooks", ids, targets)
    fetch_raw_batch(conv, store, partition)
    run(conv, "validator", partition)
    before = {
        "raw": _digest_tree(store.root / layout.raw),
        "checkpoint": _digest(validator_checkpoint),
    }
    checkpoint, _ = run(conv, "hostile", partition)
    report: dict[str, Any] = {
        "raw_before": before["raw"],
        "raw_after": _digest_tree(store.root / layout.raw),
        "validator_checkpoint_before": before["checkpoint"],
        "validator_checkpoint_after": _digest(validator_checkpoint),
        "hostile": {
            "outcomes": {i: o.model_dump(mode="json") for i, o in checkpoint.outcomes.items()},
            "attempts": [a.model_dump(mode="json") for a in checkpoint.attempts],
        },
    }
    db = RecordsDatabase(f"sqlite:///{root / 'records.db'}")
    try:
        summary = publish_batch(conv, store, db, partition, domain="hostile-test")
        store_batch_features(conv, store, db, partition)
        with db.session() as session:
            rows = session.execute(select(Feature.data)).scalars().all()
    finally:
        db.engine.dispose()
    report["published"] = summary.passed_all
    report["feature_rows"] = [json.loads(json.dumps(row, default=str)) for row in rows]

    output = convention("hostile_output", list(OUTPUT_ATTACKS), targets)
    report["output_attacks"] = {}
    for key in plan_ingest(output, store).partitions:
        fetch_raw_batch(output, store, key)
        sabotaged, seconds = run(output, "hostile", key)
        for record_id, outcome in sabotaged.outcomes.items():
            report["output_attacks"][record_id] = {
                "status": outcome.status.value,
                "reason": outcome.reason,
                "timed_out": any(a.timed_out for a in sabotaged.attempts),
                "seconds": seconds,
            }
    return report


if __name__ == "__main__":
    print(json.dumps(_drive(json.loads(sys.argv[1]))))
