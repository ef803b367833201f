"""Run the Kubernetes hook runner against a real cluster and check how each attempt ends.

The unit tests (tests/engine/test_kubernetes_runner.py) fake the API server; this script
runs the same `KubernetesRunner` on a real one (kind or k3s, Kubernetes >= 1.29 for native
sidecars) and checks: a successful attempt, an OOM kill (and the engine raising the memory
after it), a hook's own exit code, ImagePullBackOff / ErrImagePull, DeadlineExceeded, and
that no Job is left behind. Evictions and node loss cannot be provoked safely; they are
covered by the fake API only.

What it needs:

1. A cluster and a kubeconfig (`kind create cluster`, or k3s's /etc/rancher/k3s/k3s.yaml).
2. An image with python3 and `osa-sdk[s3]` (the stagers run `python3 -m osa_sdk.remote`),
   loaded into the cluster, e.g. from this repository's root:

       printf 'FROM python:3.11-slim\\nCOPY sdk /sdk\\nRUN pip install "/sdk[s3]"\\n' \\
           | docker build -t osa-hooks:check -f - .
       kind load docker-image osa-hooks:check

3. An S3 endpoint that both this machine and the pods reach (MinIO or SeaweedFS in the
   cluster, with a port-forward for this machine), a bucket, and its credentials as a
   Secret in the namespace, for the stagers:

       kubectl -n osa-check create secret generic osa-staging-s3 \\
           --from-literal=AWS_ACCESS_KEY_ID=... --from-literal=AWS_SECRET_ACCESS_KEY=...

   This process reads the same credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.
4. Optionally the NetworkPolicy of deploy/kubernetes/networkpolicy.yaml, edited for your
   S3 endpoint (it needs a CNI that enforces policies: kind's default does not, k3s's does).

Then:

    python scripts/k8s_runner_check.py --image osa-hooks:check --namespace osa-check \\
        --s3 s3://osa-check/staging --endpoint-url http://127.0.0.1:9000 \\
        --pod-endpoint-url http://minio.osa-check.svc:9000 --staging-secret osa-staging-s3

It prints one line per case and exits 1 if any case ended otherwise than expected.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from osa_sdk.contract import (
    ENV_FILES,
    ENV_HOOK_NAME,
    ENV_IN,
    ENV_MEMORY_LIMIT_MB,
    ENV_OUT,
    FEATURES_FILE,
    files_dir_for,
)
from osa_sdk.types import HookRecord, HookRecordId, OutcomeStatus

from osa_dagster.engine import (
    AttemptExit,
    FileCheckpointIO,
    HookBatch,
    HookSpec,
    Invocation,
    MemoryPolicy,
    run_hook,
)
from osa_dagster.engine.runners.kubernetes import (
    DEADLINE_EXCEEDED,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    KubernetesRunner,
    KubernetesRunnerConfig,
    kube_api_client,
)
from osa_dagster.storage.s3 import RetryPolicy, S3Store, make_s3_client, parse_s3_url
from osa_dagster.storage.staging import StoreStaging

# A hook with only the contract: metadata says how much memory to touch, how long to sleep
# and how to exit. Passed as `python3 -c`, so any image with python3 runs it.
HOOK = """
import json, os, sys, time
out = os.environ["OSA_OUT"]
for line in open(os.path.join(os.environ["OSA_IN"], "records.jsonl")):
    record = json.loads(line)
    meta = record["metadata"]
    time.sleep(meta.get("sleep_s", 0))
    block = bytearray(meta.get("alloc_mb", 0) * 1024 * 1024)
    block[::4096] = b"\\x01" * len(range(0, len(block), 4096))
    del block
    if "exit" in meta:
        sys.exit(meta["exit"])
    with open(os.path.join(out, "features.jsonl"), "a") as f:
        f.write(json.dumps({"id": record["id"], "features": [
            {"memory_limit_mb": int(os.environ["OSA_MEMORY_LIMIT_MB"])}]}) + "\\n")
    print("done", record["id"], flush=True)
"""
COMMAND = ("python3", "-c", HOOK)


@dataclass(frozen=True)
class Case:
    name: str
    records: list[HookRecord]
    memory_mb: int
    check: Callable[[AttemptExit, list[str]], bool]
    image: str | None = None  # None: the --image
    timeout_s: float = 300


def record(record_id: str, size_mb: float = 1.0, **metadata: object) -> HookRecord:
    return HookRecord(
        id=HookRecordId(record_id),
        files_dir=files_dir_for(record_id),
        metadata=metadata,
        size_mb=size_mb,
    )


CASES = [
    Case(
        "success",
        [record("check:a"), record("check:b / β")],
        256,
        lambda e, ids: e.returncode == 0 and e.failure is None and len(ids) == 2,
    ),
    Case(
        "OOMKilled",
        [record("check:small", alloc_mb=10), record("check:big", alloc_mb=400)],
        128,
        lambda e, ids: e.oom_killed and e.failure is None and ids == ["check:small"],
    ),
    Case(
        "exit code",
        [record("check:broken", exit=3)],
        128,
        lambda e, ids: e.returncode == 3 and not e.oom_killed and e.failure is None,
    ),
    Case(
        "ImagePullBackOff",
        [record("check:a")],
        128,
        lambda e, ids: e.failure in ("ImagePullBackOff", "ErrImagePull") and not e.oom_killed,
        image="registry.invalid/osa/does-not-exist:0",
    ),
    Case(
        "DeadlineExceeded",
        [record("check:slow", sleep_s=600)],
        128,
        lambda e, ids: e.failure == DEADLINE_EXCEEDED and e.timed_out and not e.oom_killed,
        timeout_s=10,
    ),
]


def invocation(root: Path, case: Case, image: str) -> Invocation:
    in_dir, out_dir, files_root = root / "in", root / "out", root / "files"
    for folder in (in_dir, out_dir, files_root):
        folder.mkdir(parents=True)
    (in_dir / "records.jsonl").write_text("".join(r.model_dump_json() + "\n" for r in case.records))
    (in_dir / "config.json").write_text("{}")
    for item in case.records:
        (files_root / item.files_dir).mkdir()
        (files_root / item.files_dir / "entry.txt").write_text(item.id)
    return Invocation(
        command=COMMAND,
        env={
            ENV_IN: str(in_dir),
            ENV_OUT: str(out_dir),
            ENV_FILES: str(files_root),
            ENV_HOOK_NAME: "k8s_check",
            ENV_MEMORY_LIMIT_MB: str(case.memory_mb),
        },
        in_dir=in_dir,
        out_dir=out_dir,
        files_root=files_root,
        memory_limit_mb=case.memory_mb,
        timeout_s=case.timeout_s,
        log_path=root / "hook.log",
        image=case.image or image,
    )


def run_case(runner: KubernetesRunner, case: Case, image: str, workdir: Path) -> bool:
    inv = invocation(workdir / case.name.replace(" ", "-"), case, image)
    started = time.monotonic()
    attempt = runner.start(inv)
    while (exit_ := attempt.wait(1.0)) is None:
        pass
    features = inv.out_dir / FEATURES_FILE
    lines = features.read_text().splitlines() if features.exists() else []
    ids = [json.loads(line)["id"] for line in lines]
    ok = case.check(exit_, ids)
    print(
        f"{'ok  ' if ok else 'FAIL'} {case.name:<17} {time.monotonic() - started:6.1f} s  "
        f"rc={exit_.returncode} oom={exit_.oom_killed} failure={exit_.failure} "
        f"timed_out={exit_.timed_out} outcomes={ids}"
    )
    if not ok:
        print("     " + exit_.stderr_tail.strip().replace("\n", "\n     "))
    return ok


def run_escalation(runner: KubernetesRunner, image: str, workdir: Path) -> bool:
    """The engine on the cluster: an OOM at 128 MiB, the rest done at 256 MiB."""
    records = [record("ladder:small", 1.0, alloc_mb=10), record("ladder:big", 2.0, alloc_mb=180)]
    files_root = workdir / "ladder-files"
    for item in records:
        (files_root / item.files_dir).mkdir(parents=True)
    spec = HookSpec(
        name="k8s_check",
        command=COMMAND,
        image=image,
        memory=MemoryPolicy(base_mb=128, cap_mb=512),
        timeout_s=300,
    )
    checkpoint = run_hook(
        spec,
        HookBatch(records=records, files_root=files_root),
        runner,
        FileCheckpointIO(workdir / "ladder-checkpoint.json"),
        workdir / "ladder",
    )
    limits = {rid: o.memory_limit_mb for rid, o in checkpoint.outcomes.items()}
    ok = all(o.status is OutcomeStatus.PASSED for o in checkpoint.outcomes.values()) and limits == {
        "ladder:small": 128,
        "ladder:big": 256,
    }
    print(f"{'ok  ' if ok else 'FAIL'} engine ladder      outcomes at {limits}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", required=True, help="an image with python3 and osa-sdk[s3]")
    parser.add_argument("--namespace", default="osa-check")
    parser.add_argument("--s3", required=True, help="s3://bucket/prefix for the staging")
    parser.add_argument("--endpoint-url", help="the S3 endpoint as this machine reaches it")
    parser.add_argument("--pod-endpoint-url", help="the S3 endpoint as the pods reach it")
    parser.add_argument("--region", default=os.environ.get("AWS_REGION", "us-east-1"))
    parser.add_argument("--staging-secret", help="Secret with the stagers' S3 credentials")
    parser.add_argument("--kubeconfig")
    parser.add_argument("--context")
    args = parser.parse_args()

    bucket, prefix = parse_s3_url(args.s3)
    client = make_s3_client(endpoint_url=args.endpoint_url, region=args.region)
    store = S3Store(bucket, prefix, client, retry=RetryPolicy())
    staging = StoreStaging(
        store, "k8s-check", pod_endpoint_url=args.pod_endpoint_url, pod_region=args.region
    )
    config = KubernetesRunnerConfig(
        namespace=args.namespace,
        staging_secret=args.staging_secret,
        poll_interval_s=1.0,
        stuck_grace_s=30.0,
        staging_allowance_s=20.0,
        cpu_request="100m",
    )
    api = kube_api_client(args.kubeconfig, args.context)
    runner = KubernetesRunner(staging, config, api)
    with tempfile.TemporaryDirectory(prefix="osa-k8s-check-") as tmp:
        results = [run_case(runner, case, args.image, Path(tmp)) for case in CASES]
        results.append(run_escalation(runner, args.image, Path(tmp)))
    left = runner.batch.list_namespaced_job(
        args.namespace, label_selector=f"{LABEL_MANAGED_BY}={MANAGED_BY}"
    ).items
    print(f"{'ok  ' if not left else 'FAIL'} clean-up           Jobs left: {len(left)}")
    results.append(not left)
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
