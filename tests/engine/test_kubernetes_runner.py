"""The Kubernetes runner with the real `kubernetes` client against an API faked at the HTTP
boundary (fake_kube_api.py), and staging through a real S3 endpoint (moto).

No container runs here: where a pod would stage its inputs, run the hook and upload its
outcomes, the test does it (`PodPlayer`), with the SDK's own stage-in / stage-out programs
and the SDK's hook runtime, from what the Job manifest sent by the runner says.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from kubernetes import client as k8s
from osa_sdk import remote
from osa_sdk.contract import (
    ENV_FILES,
    ENV_HOOK_NAME,
    ENV_IN,
    ENV_MEMORY_LIMIT_MB,
    ENV_OUT,
    FEATURES_FILE,
    files_dir_for,
)
from osa_sdk.runtime import HookOutOfMemory, run_hook
from osa_sdk.types import HookRecord, HookRecordId, OutcomeStatus

from osa_dagster.engine import (
    AttemptExit,
    AttemptMarker,
    FileCheckpointIO,
    HookBatch,
    HookSpec,
    Invocation,
    MemoryPolicy,
    advance_hook,
)
from osa_dagster.engine.process_identity import ProcessIdentity
from osa_dagster.engine.runners.base import (
    HOOK_LOG_MAX_BYTES,
    HOOK_LOG_TAIL_BYTES,
    dropped_marker,
    image_command,
)
from osa_dagster.engine.runners.kubernetes import (
    DEADLINE_EXCEEDED,
    EVICTED,
    NODE_LOST,
    STAGE_IN_FAILED,
    STAGE_OUT_FAILED,
    KubernetesRunner,
    KubernetesRunnerConfig,
    Verdict,
    attempt_name,
    classify,
)
from osa_dagster.engine.runners.kubernetes.runner import HOOK_LOG_TAIL_LINES
from osa_dagster.storage.staging import StoreStaging
from osa_dagster.storage.store import FileSystemStore
from tests.storage.servers import S3Endpoint, moto_endpoint

from . import fake_kube_api as fake_api
from .fake_kube_api import FakeKubeApi

IMAGE = "registry.example/osa-hooks:1.4"
NAMESPACE = "osa"
HOOK_TARGET = "osa_hooks.structure:count_bytes"


@pytest.fixture(autouse=True)
def no_real_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Test credentials only; boto3 never asks an instance-metadata endpoint."""
    for name in ("AWS_PROFILE", "AWS_REGION", "AWS_DEFAULT_REGION", "OSA_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "osa-test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "osa-test-secret")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Endpoint]:
    with (
        mock.patch.dict(
            os.environ, {"AWS_ACCESS_KEY_ID": "osa-test-key", "AWS_SECRET_ACCESS_KEY": "x"}
        ),
        moto_endpoint() as endpoint,
    ):
        yield endpoint


@pytest.fixture
def staging(s3: S3Endpoint, tmp_path: Path) -> StoreStaging:
    store = s3.store(f"tests/{tmp_path.name}")
    return StoreStaging(store, "k8s-staging", pod_endpoint_url=s3.url)


@pytest.fixture
def fake() -> Iterator[FakeKubeApi]:
    api = FakeKubeApi()
    with api.running():
        yield api


CONFIG = KubernetesRunnerConfig(
    namespace=NAMESPACE,
    staging_secret="osa-staging-s3",
    poll_interval_s=0.02,
    stuck_grace_s=0.0,
    stage_out_grace_s=2.0,
    sync_interval_s=0.5,
)


def make_runner(fake: FakeKubeApi, staging: StoreStaging, **config: Any) -> KubernetesRunner:
    api = k8s.ApiClient(k8s.Configuration(host=fake.url))
    return KubernetesRunner(staging, CONFIG.model_copy(update=config), api)


def record(record_id: str, size_mb: float = 0.001, **metadata: Any) -> HookRecord:
    return HookRecord(
        id=HookRecordId(record_id),
        files_dir=files_dir_for(record_id),
        metadata=metadata,
        size_mb=size_mb,
    )


# In the engine's order (smallest first): the middle one runs out of memory below 2048 MB.
RECORDS = [
    record("pdb:1UBI", 0.001),
    record("pdb:1AKE", 0.002, oom=True),
    record("uniprot:P69905 / β", 0.003),
]


def write_files(files_root: Path, records: list[HookRecord]) -> None:
    for item in records:
        folder = files_root / item.files_dir
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "entry.cif").write_text(f"data_{item.id}\n" * 10)
    # A record folder that is not in the batch: it must never be staged.
    (files_root / "not-in-batch").mkdir(exist_ok=True)
    (files_root / "not-in-batch" / "big.cif").write_text("x" * 1000)


def invocation(root: Path, records: list[HookRecord], memory_mb: int = 1024) -> Invocation:
    in_dir, out_dir, files_root = root / "in", root / "out", root / "files"
    in_dir.mkdir(parents=True)
    out_dir.mkdir()
    write_files(files_root, records)
    (in_dir / "records.jsonl").write_text("".join(r.model_dump_json() + "\n" for r in records))
    (in_dir / "config.json").write_text('{"unit": "bytes"}')
    env = {
        ENV_IN: str(in_dir),
        ENV_OUT: str(out_dir),
        ENV_FILES: str(files_root),
        ENV_HOOK_NAME: "structure_bytes",
        ENV_MEMORY_LIMIT_MB: str(memory_mb),
    }
    return Invocation(
        command=(sys.executable, "-m", "osa_sdk", "hook", HOOK_TARGET),
        env=env,
        in_dir=in_dir,
        out_dir=out_dir,
        files_root=files_root,
        memory_limit_mb=memory_mb,
        timeout_s=300,
        log_path=root / "hook.log",
        image=IMAGE,
    )


def count_bytes(record: HookRecord, config: dict[str, Any]) -> dict[str, Any]:
    """The hook the pod runs: fails with MemoryError on records marked `oom`."""
    if record.metadata.get("oom"):
        raise MemoryError
    return {config["unit"]: sum(p.stat().st_size for p in record.files())}


@dataclass
class PodPlayer:
    """Does what the pod of a Job manifest would do, with the SDK's programs."""

    workdir: Path
    hook: Callable[..., Any] = count_bytes
    staged_ids: list[list[str]] | None = None

    def __post_init__(self) -> None:
        self.staged_ids = []

    def stage_in(self, manifest: dict[str, Any]) -> Path:
        pod = self.workdir / manifest["metadata"]["name"]
        stage_in, _ = manifest["spec"]["template"]["spec"]["initContainers"]
        command = stage_in["command"]
        assert command[:4] == ["python3", "-m", "osa_sdk.remote", "stage-in"]
        pairs = [pair.replace("=/osa/", f"={pod}/") for pair in command[4:]]
        with self._stager_env(stage_in):
            assert remote.main(["stage-in", *pairs]) == 0
        assert self.staged_ids is not None
        lines = (pod / "in" / "records.jsonl").read_text().splitlines()
        self.staged_ids.append([json.loads(line)["id"] for line in lines])
        return pod

    def run_hook(self, pod: Path) -> None:
        # HookOutOfMemory plays the kernel's OOM kill: what the hook wrote stays in the emptyDir.
        with contextlib.suppress(HookOutOfMemory):
            run_hook(self.hook, pod / "in", pod / "out", pod / "files", "structure_bytes")

    def stage_out(self, manifest: dict[str, Any], pod: Path, *, final: bool = True) -> None:
        _, sidecar = manifest["spec"]["template"]["spec"]["initContainers"]
        command = sidecar["command"]
        assert command[:5] == ["python3", "-m", "osa_sdk.remote", "stage-out", "/osa/out"]
        url, done = command[5], command[7]
        with self._stager_env(sidecar):
            client = remote.s3_client()
            if final:  # SIGTERM after the hook ended: the last upload, then `done`
                remote.stage_out(client, pod / "out", url, done, _stopped())
            else:  # the pod died with the sidecar: only its periodic upload happened
                remote.OutcomeUploader(client, pod / "out", url).sync()

    def play(self, *, final: bool = True) -> Callable[[dict[str, Any]], None]:
        def action(manifest: dict[str, Any]) -> None:
            pod = self.stage_in(manifest)
            self.run_hook(pod)
            self.stage_out(manifest, pod, final=final)

        return action

    @staticmethod
    def _stager_env(container: dict[str, Any]) -> Any:
        return mock.patch.dict(os.environ, {e["name"]: e["value"] for e in container["env"]})


def _stopped() -> threading.Event:
    event = threading.Event()
    event.set()
    return event


def wait_for_exit(runner: KubernetesRunner, inv: Invocation, timeout_s: float = 20) -> AttemptExit:
    attempt = runner.start(inv)
    deadline = time.monotonic() + timeout_s
    while (exit_ := attempt.wait(0.1)) is None:
        assert time.monotonic() < deadline, "the attempt never ended"
    return exit_


def staged_keys(staging: StoreStaging) -> list[str]:
    return list(staging.store.list_keys(staging.root))


def outcome_ids(out_dir: Path, name: str = FEATURES_FILE) -> list[str]:
    path = out_dir / name
    return (
        [json.loads(line)["id"] for line in path.read_text().splitlines()] if path.exists() else []
    )


# --- the manifest ---------------------------------------------------------------------------


def test_manifest_limits_memory_and_sandboxes_the_hook(
    fake: FakeKubeApi, staging: StoreStaging, tmp_path: Path
) -> None:
    player = PodPlayer(tmp_path / "pod")
    fake.queue(fake_api.success(player.play()))
    inv = invocation(tmp_path / "attempt", RECORDS[:1], memory_mb=2048)
    wait_for_exit(make_runner(fake, staging), inv)

    [job] = fake.created
    assert fake.calls("POST", f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs")
    spec = job["spec"]
    assert spec["backoffLimit"] == 0
    assert spec["activeDeadlineSeconds"] == 300 + 600
    assert spec["ttlSecondsAfterFinished"] == 3600
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert labels["osa.archive/role"] == "hook-attempt"
    assert labels["osa.archive/attempt"] == job["metadata"]["name"]
    assert labels["osa.archive/hook"] == "structure_bytes"
    assert pod["restartPolicy"] == "Never"
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}

    [hook] = pod["containers"]
    stage_in, stage_out = pod["initContainers"]
    assert hook["resources"]["limits"]["memory"] == "2048Mi"
    assert hook["resources"]["requests"]["memory"] == "2048Mi"
    assert hook["image"] == IMAGE
    assert hook["command"] == ["python3", "-m", "osa_sdk", "hook", HOOK_TARGET]
    for container in (hook, stage_in, stage_out):
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert (
            container["resources"]["limits"]["memory"]
            == container["resources"]["requests"]["memory"]
        )
    assert stage_out["restartPolicy"] == "Always"  # a native sidecar
    assert stage_in["image"] == stage_out["image"] == IMAGE

    env = {e["name"]: e["value"] for e in hook["env"]}
    assert {k: env[k] for k in (ENV_IN, ENV_OUT, ENV_FILES, ENV_MEMORY_LIMIT_MB)} == {
        ENV_IN: "/osa/in",
        ENV_OUT: "/osa/out",
        ENV_FILES: "/osa/files",
        ENV_MEMORY_LIMIT_MB: "2048",
    }
    # The hook gets no credentials and no way to the store; only the stagers do.
    assert "envFrom" not in hook and not any(k.startswith(("AWS_", "OSA_S3")) for k in env)
    assert stage_in["envFrom"] == [{"secretRef": {"name": "osa-staging-s3"}}]
    mounts = {m["mountPath"]: m for m in hook["volumeMounts"]}
    assert mounts["/osa/in"]["readOnly"] and mounts["/osa/files"]["readOnly"]
    assert "readOnly" not in mounts["/tmp"] and "readOnly" not in mounts["/osa/out"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/tmp"]["name"]]["emptyDir"]["sizeLimit"] == "1024Mi"
    assert volumes[mounts["/osa/out"]["name"]]["emptyDir"]["sizeLimit"] == "256Mi"


def _round_trip(document: dict[str, Any], model: str) -> Any:
    """Through the client's models and back: a misspelt or unknown field would be dropped."""
    api = k8s.ApiClient()
    response = mock.Mock(data=json.dumps(document))
    return api.sanitize_for_serialization(api.deserialize(response, model))


def test_manifests_use_only_fields_of_the_kubernetes_schema(
    fake: FakeKubeApi, staging: StoreStaging, tmp_path: Path
) -> None:
    fake.queue(fake_api.success(PodPlayer(tmp_path / "pod").play()))
    wait_for_exit(make_runner(fake, staging), invocation(tmp_path / "a", RECORDS[:1]))
    [job] = fake.created
    assert _round_trip(job, "V1Job") == job
    deploy = Path(__file__).parents[2] / "deploy" / "kubernetes"
    policy, network = yaml.safe_load_all((deploy / "networkpolicy.yaml").read_text())
    for document in (policy, network):
        assert _round_trip(document, "V1NetworkPolicy") == document
    assert policy["spec"]["podSelector"]["matchLabels"] == {"osa.archive/role": "hook-attempt"}
    assert network["spec"]["podSelector"]["matchLabels"] == {
        "osa.archive/role": "hook-attempt",
        "osa.archive/network": "allowed",
    }


@pytest.mark.parametrize("network", [False, True])
def test_only_a_hook_that_opts_in_gets_the_network_label(
    fake: FakeKubeApi, staging: StoreStaging, tmp_path: Path, network: bool
) -> None:
    fake.queue(fake_api.success(PodPlayer(tmp_path / "pod").play()))
    inv = invocation(tmp_path / "a", RECORDS[:1])
    wait_for_exit(make_runner(fake, staging), Invocation(**{**inv.__dict__, "network": network}))
    [job] = fake.created
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert labels.get("osa.archive/network") == ("allowed" if network else None)


def test_image_is_required(fake: FakeKubeApi, staging: StoreStaging, tmp_path: Path) -> None:
    inv = invocation(tmp_path, RECORDS[:1])
    inv = Invocation(**{**inv.__dict__, "image": None})
    with pytest.raises(ValueError, match="structure_bytes has no image"):
        make_runner(fake, staging).start(inv)
    assert fake.created == [] and staged_keys(staging) == []


# --- outcomes -------------------------------------------------------------------------------


def test_success_stages_only_the_batch_and_brings_outcomes_back(
    fake: FakeKubeApi, staging: StoreStaging, tmp_path: Path
) -> None:
    records = [RECORDS[0], RECORDS[2]]
    player = PodPlayer(tmp_path / "pod")
    fake.queue(fake_api.success(player.play()))
    inv = invocation(tmp_path / "attempt", records)
    exit_ = wait_for_exit(make_runner(fake, staging), inv)

    assert (exit_.returncode, exit_.oom_killed, exit_.failure) == (0, False, None)
    assert exit_.limit_mode == "container"
    assert player.staged_ids == [[r.id for r in records]]
    staged = sorted(p.name for p in (tmp_path / "pod").glob("*/files/*"))
    assert staged == sorted(r.files_dir for r in records)  # not "not-in-batch"
    lines = [json.loads(line) for line in (inv.out_dir / FEATURES_FILE).read_text().splitlines()]
    assert [line["id"] for line in lines] == [r.id for r in records]
    assert lines[0]["features"] == [{"bytes": len(f"data_{records[0].id}\n") * 10}]
    assert inv.log_path.read_text() == "osa_sdk: hook ran\n"
    # Cleaned up: the Job with its pods, and every staged object.
    [delete] = fake.calls("DELETE", "/jobs/")
    assert delete.body["propagationPolicy"] == "Background"
    assert fake.calls("DELETE", f"/namespaces/{NAMESPACE}/pods")
    assert staged_keys(staging) == []


def test_oom_killed_is_an_oom_and_keeps_what_was_uploaded(
    fake: FakeKubeApi, staging: StoreStaging, tmp_path: Path
) -> None:
    player = PodPlayer(tmp_path / "pod")
    fake.queue(fake_api.oom_killed(player.play()))
    inv = invocation(tmp_path / "attempt", RECORDS)
    exit_ = wait_for_exit(make_runner(fake, staging), inv)

    assert exit_.oom_killed and exit_.out_of_memory
    assert exit_.failure is None and not exit_.timed_out
    assert outcome_ids(inv.out_dir) == ["pdb:1UBI"]  # what the hook finished before the kill
    assert "parsing a large structure" in exit_.stderr_tail


def test_exit_137_without_oomkilled_is_not_an_oom() -> None:
    pod = k8s.V1Pod(
        status=k8s.V1PodStatus(
            phase="Failed",
            container_statuses=[
                k8s.V1ContainerStatus(
                    name="hook",
                    image=IMAGE,
                    image_id="",
                    ready=False,
                    restart_count=0,
                    state=k8s.V1ContainerState(
                        terminated=k8s.V1ContainerStateTerminated(exit_code=137, reason="Error")
                    ),
                )
            ],
        )
    )
    assert classify(None, pod) == Verdict(returncode=-9, hook_finished=True)


def test_hook_error_exit_reports_its_code_and_log(
    fake: FakeKubeApi, staging: StoreStaging, tmp_path: Path
) -> None:
    player = PodPlayer(tmp_path / "pod")
    fake.queue(fake_api.exited(3, player.play()))
    exit_ = wait_for_exit(make_runner(fake, staging), invocation(tmp_path / "a", RECORDS[:1]))
    assert (exit_.returncode, exit_.oom_killed, exit_.failure) == (3, False, None)
    assert "ValueError: broken hook" in exit_.stderr_tail


def test_a_flood_of_log_is_kept_to_the_cap_with_its_traceback(
    fake: FakeKubeApi, staging: StoreStaging, tmp_path: Path
) -> None:
    """A log 20 times the cap: read with limitBytes, its start and its last lines kept."""
    player = PodPlayer(tmp_path / "pod")
    lifecycle = fake_api.exited(1, player.play())
    noise = b"noise: nothing worth keeping\n" * (20 * HOOK_LOG_MAX_BYTES // 29)
    end = "Traceback (most recent call last):\nValueError: the end of a flood\n"
    lifecycle.logs[fake_api.HOOK] = "starting\n" + noise.decode() + end
    fake.queue(lifecycle)
    inv = invocation(tmp_path / "a", RECORDS[:1])

    exit_ = wait_for_exit(make_runner(fake, staging), inv)

    assert exit_.returncode == 1
    assert exit_.stderr_tail.endswith(end)
    log = inv.log_path.read_bytes()
    marker = dropped_marker(None, tail=f"last {HOOK_LOG_TAIL_LINES} lines")
    assert len(log) <= HOOK_LOG_MAX_BYTES + len(marker)
    assert log.startswith(b"starting\nnoise")
    assert marker in log
    assert log.endswith(end.encode())
    reads = [
        (r.query.get("limitBytes"), r.query.get("tailLines")) for r in fake.calls("GET", "/log")
    ]
    assert reads == [
        ([str(HOOK_LOG_MAX_BYTES + 1)], None),
        ([str(HOOK_LOG_TAIL_BYTES)], [str(HOOK_LOG_TAIL_LINES)]),
    ]


def test_a_log_within_the_cap_is_read_once_and_kept_whole(
    fake: FakeKubeApi, staging: StoreStaging, tmp_path: Path
) -> None:
    player = PodPlayer(tmp_path / "pod")
    lifecycle = fake_api.exited(1, player.play())
    text = "x" * (HOOK_LOG_MAX_BYTES - 1) + "\n"
    lifecycle.logs[fake_api.HOOK] = text
    fake.queue(lifecycle)
    inv = invocation(tmp_path / "a", RECORDS[:1])

    wait_for_exit(make_runner(fake, staging), inv)

    assert inv.log_path.read_text() == text
    assert len(fake.calls("GET", "/log")) == 1


@pytest.mark.parametrize(
    ("lifecycle", "failure", "timed_out"),
    [
        (fake_api.evicted, EVICTED, False),
        (fake_api.deadline_exceeded, DEADLINE_EXCEEDED, True),
        (fake_api.node_lost, NODE_LOST, False),
    ],
)
def test_platform_failures_are_not_oom(
    fake: FakeKubeApi,
    staging: StoreStaging,
    tmp_path: Path,
    lifecycle: Callable[..., fake_api.Lifecycle],
    failure: str,
    timed_out: bool,
) -> None:
    player = PodPlayer(tmp_path / "pod")
    # The pod dies as a whole: only the sidecar's periodic upload made it.
    fake.queue(lifecycle(player.play(final=False)))
    inv = invocation(tmp_path / "attempt", RECORDS)
    exit_ = wait_for_exit(make_runner(fake, staging), inv)
    assert exit_.failure == failure
    assert not exit_.out_of_memory
    assert exit_.timed_out is timed_out
    assert outcome_ids(inv.out_dir) == ["pdb:1UBI"]
    assert staged_keys(staging) == []


def test_evicted_message_reaches_the_error(
    fake: FakeKubeApi, staging: StoreStaging, tmp_path: Path
) -> None:
    fake.queue(fake_api.evicted(PodPlayer(tmp_path / "pod").play(final=False)))
    exit_ = wait_for_exit(make_runner(fake, staging), invocation(tmp_path / "a", RECORDS[:1]))
    assert "The node was low on resource: memory" in exit_.stderr_tail


@pytest.mark.parametrize(("grace_s", "failure"), [(0.0, "ErrImagePull"), (0.2, "ImagePullBackOff")])
def test_image_pull_failure_ends_the_attempt_after_the_grace(
    fake: FakeKubeApi, staging: StoreStaging, tmp_path: Path, grace_s: float, failure: str
) -> None:
    fake.queue(fake_api.image_pull_backoff(IMAGE))
    runner = make_runner(fake, staging, stuck_grace_s=grace_s)
    started = time.monotonic()
    exit_ = wait_for_exit(runner, invocation(tmp_path / "a", RECORDS[:1]))
    assert time.monotonic() - started >= grace_s
    assert exit_.failure == failure and not exit_.out_of_memory
    assert IMAGE in exit_.stderr_tail
    assert not fake.job_exists(NAMESPACE, fake.created[0]["metadata"]["name"])


def test_stage_in_failure(fake: FakeKubeApi, staging: StoreStaging, tmp_path: Path) -> None:
    fake.queue(fake_api.stage_in_failed())
    exit_ = wait_for_exit(make_runner(fake, staging), invocation(tmp_path / "a", RECORDS[:1]))
    assert exit_.failure == STAGE_IN_FAILED and not exit_.out_of_memory
    assert "this image lacks" in exit_.stderr_tail  # the stage-in container's log


def test_success_without_the_final_upload_is_retryable(
    fake: FakeKubeApi, staging: StoreStaging, tmp_path: Path
) -> None:
    player = PodPlayer(tmp_path / "pod")
    fake.queue(fake_api.success(player.play(final=False)))
    exit_ = wait_for_exit(make_runner(fake, staging), invocation(tmp_path / "a", RECORDS[:1]))
    assert exit_.returncode == 0 and exit_.failure == STAGE_OUT_FAILED


# --- kill and leftovers ---------------------------------------------------------------------


def test_kill_deletes_the_job_and_its_staging(
    fake: FakeKubeApi, staging: StoreStaging, tmp_path: Path
) -> None:
    fake.queue(fake_api.Lifecycle([fake_api.Step(fake_api.RUNNING)]))
    attempt = make_runner(fake, staging).start(invocation(tmp_path / "a", RECORDS[:1]))
    assert attempt.wait(0.05) is None
    assert staged_keys(staging) != []
    attempt.kill()
    namespace, name = attempt.marker.container.split("/")  # type: ignore[union-attr]
    assert not fake.job_exists(namespace, name) and not fake.pod_exists(namespace, name)
    assert staged_keys(staging) == []
    exit_ = attempt.wait(0.05)
    assert exit_ is not None and exit_.returncode == -9 and not exit_.out_of_memory


def test_kill_leftovers_finds_the_job_by_name_and_pods_by_label(
    fake: FakeKubeApi, staging: StoreStaging, tmp_path: Path
) -> None:
    name = attempt_name("structure_bytes")
    fake.add_job(NAMESPACE, name, fake_api.Lifecycle([fake_api.Step(fake_api.RUNNING)]))
    source = tmp_path / "left"
    source.mkdir()
    (source / "records.jsonl").write_text("{}\n")
    staging.upload_dir(source, f"{NAMESPACE}/{name}/in")
    runner = make_runner(fake, staging)

    runner.kill_leftovers(
        AttemptMarker(runner="local", limit_mode="cgroup", process=ProcessIdentity.of_pid(1))
    )
    assert fake.requests == []  # not ours
    marker = AttemptMarker(
        runner="kubernetes", limit_mode="container", container=f"{NAMESPACE}/{name}"
    )
    runner.kill_leftovers(marker)
    assert not fake.job_exists(NAMESPACE, name) and not fake.pod_exists(NAMESPACE, name)
    [pods] = fake.calls("DELETE", f"/namespaces/{NAMESPACE}/pods")
    assert pods.query["labelSelector"] == [f"osa.archive/attempt={name}"]
    assert staged_keys(staging) == []
    runner.kill_leftovers(marker)  # safe to repeat: the Job's 404 is no error


# --- the engine on top ----------------------------------------------------------------------


def engine_run(fake: FakeKubeApi, staging: StoreStaging, tmp_path: Path) -> Any:
    files_root = tmp_path / "batch-files"
    write_files(files_root, RECORDS)
    spec = HookSpec(
        name="structure_bytes",
        command=(sys.executable, "-m", "osa_sdk", "hook", HOOK_TARGET),
        image=IMAGE,
        memory=MemoryPolicy(base_mb=1024, cap_mb=4096),
        timeout_s=300,
        config={"unit": "bytes"},
    )
    return advance_hook(
        spec,
        HookBatch(records=RECORDS, files_root=files_root),
        make_runner(fake, staging),
        FileCheckpointIO(tmp_path / "checkpoint.json"),
        tmp_path / "work",
    )


def test_engine_escalates_memory_on_oomkilled_only(
    fake: FakeKubeApi, staging: StoreStaging, tmp_path: Path
) -> None:
    player = PodPlayer(tmp_path / "pod")
    survives = PodPlayer(tmp_path / "pod2", hook=lambda record: {"n": 1})
    fake.queue(fake_api.oom_killed(player.play()), fake_api.success(survives.play()))
    progress = engine_run(fake, staging, tmp_path)

    assert progress.checkpoint.complete
    memory = [job["spec"]["template"]["spec"]["containers"][0]["resources"] for job in fake.created]
    assert [m["limits"]["memory"] for m in memory] == ["1024Mi", "2048Mi"]
    # Records run smallest first; the second attempt got only those without an outcome.
    assert survives.staged_ids == [["pdb:1AKE", "uniprot:P69905 / β"]]
    outcomes = progress.checkpoint.outcomes
    assert {rid: o.status for rid, o in outcomes.items()} == dict.fromkeys(
        [r.id for r in RECORDS], OutcomeStatus.PASSED
    )
    assert outcomes["pdb:1UBI"].memory_limit_mb == 1024
    assert outcomes["pdb:1AKE"].memory_limit_mb == 2048
    assert [a.oom_killed for a in progress.checkpoint.attempts] == [True, False]


def test_engine_never_escalates_on_eviction(
    fake: FakeKubeApi, staging: StoreStaging, tmp_path: Path
) -> None:
    fake.queue(fake_api.evicted(PodPlayer(tmp_path / "pod").play(final=False)))
    progress = engine_run(fake, staging, tmp_path)

    assert progress.checkpoint.complete and len(fake.created) == 1
    assert progress.checkpoint.next_memory_mb == 1024
    outcomes = progress.checkpoint.outcomes
    assert outcomes["pdb:1UBI"].status is OutcomeStatus.PASSED
    for record_id in ("pdb:1AKE", "uniprot:P69905 / β"):
        assert outcomes[record_id].status is OutcomeStatus.ERRORED
        assert outcomes[record_id].retryable
        assert outcomes[record_id].reason.startswith("Evicted")


# --- small pieces ---------------------------------------------------------------------------


def test_image_command_runs_the_image_python() -> None:
    assert image_command([sys.executable, "-m", "osa_sdk", "hook", "m:f"])[0] == "python3"
    assert image_command(["/usr/bin/python3.11", "-m", "x"])[0] == "python3"
    assert image_command(["sh", "/hooks/run.sh"]) == ["sh", "/hooks/run.sh"]


def test_attempt_names_are_short_unique_dns_labels() -> None:
    names = {attempt_name("a_very_long_hook_name_" * 5) for _ in range(50)}
    assert len(names) == 50
    for name in names:
        assert len(name) <= 52 and name.startswith("osa-a-very-long-hook-name")
        assert all(c.isalnum() or c == "-" for c in name) and name == name.lower()


def test_staging_needs_an_s3_store(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs an S3 store"):
        StoreStaging(FileSystemStore(tmp_path))


# --- the stage-in and stage-out programs on real S3 -----------------------------------------


def test_stage_in_copies_nested_files_and_refuses_escaping_keys(
    s3: S3Endpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OSA_S3_ENDPOINT_URL", s3.url)
    client = remote.s3_client()
    base = f"stage-in/{tmp_path.name}"
    client.put_object(Bucket=s3.bucket, Key=f"{base}/ok/pdb_3a1UBI/entry.cif", Body=b"data")
    client.put_object(Bucket=s3.bucket, Key=f"{base}/ok/records.jsonl", Body=b"{}\n")
    url = f"s3://{s3.bucket}/{base}/ok"
    assert remote.main(["stage-in", f"{url}={tmp_path / 'in'}"]) == 0
    assert (tmp_path / "in/pdb_3a1UBI/entry.cif").read_bytes() == b"data"
    assert (tmp_path / "in/records.jsonl").read_bytes() == b"{}\n"

    client.put_object(Bucket=s3.bucket, Key=f"{base}/bad/../../escape", Body=b"x")
    with pytest.raises(remote.StagingError, match="refusing a key outside"):
        remote.download_prefix(client, f"s3://{s3.bucket}/{base}/bad", tmp_path / "bad")
    assert not (tmp_path / "escape").exists()
    assert remote.main(["stage-in", "not-a-url=/x"]) == 2


def test_stage_out_uploads_while_running_and_marks_the_last_upload(
    s3: S3Endpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OSA_S3_ENDPOINT_URL", s3.url)
    client = remote.s3_client()
    out = tmp_path / "out"
    out.mkdir()
    url = f"s3://{s3.bucket}/stage-out/{tmp_path.name}/out"
    done = f"s3://{s3.bucket}/stage-out/{tmp_path.name}/stage-out.done"
    key = f"stage-out/{tmp_path.name}/out/{FEATURES_FILE}"
    stop = threading.Event()
    sidecar = threading.Thread(target=remote.stage_out, args=(client, out, url, done, stop, 0.05))
    sidecar.start()
    try:
        (out / FEATURES_FILE).write_text('{"id": "a", "features": []}\n')
        (out / "scratch.tmp").write_text("not an outcome file")

        def uploaded() -> bytes:
            try:
                return client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
            except client.exceptions.NoSuchKey:
                return b""

        deadline = time.monotonic() + 5
        while uploaded() != b'{"id": "a", "features": []}\n':
            assert time.monotonic() < deadline, "no periodic upload"
            time.sleep(0.05)
        with (out / FEATURES_FILE).open("a") as f:
            f.write('{"id": "b", "features": []}\n')
        stop.set()  # SIGTERM: the hook ended
    finally:
        stop.set()
        sidecar.join(10)
    assert uploaded().count(b"\n") == 2  # the last upload has everything
    listed = client.list_objects_v2(Bucket=s3.bucket, Prefix=f"stage-out/{tmp_path.name}/")
    assert sorted(o["Key"].rsplit("/", 1)[1] for o in listed["Contents"]) == [
        FEATURES_FILE,
        "stage-out.done",
    ]
