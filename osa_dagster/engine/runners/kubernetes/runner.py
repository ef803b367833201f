"""The runner: one Job per attempt, polled until it ends, its outputs copied back."""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

import urllib3
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException
from osa_sdk.contract import (
    ENV_HOOK_NAME,
    OUTPUT_FILES,
    RECORDS_FILE,
)
from osa_sdk.types import HookRecord

from osa_dagster.atomic_files import write_atomically
from osa_dagster.engine.runners.base import (
    HOOK_LOG_HEAD_BYTES,
    HOOK_LOG_MAX_BYTES,
    HOOK_LOG_TAIL_BYTES,
    AttemptExit,
    AttemptMarker,
    Invocation,
    dropped_marker,
    read_tail,
)
from osa_dagster.engine.runners.kubernetes.classify import (
    DEADLINE_EXCEEDED,
    STAGE_IN_FAILED,
    STAGE_OUT_FAILED,
    Stuck,
    Verdict,
    classify,
)
from osa_dagster.engine.runners.kubernetes.config import (
    HOOK_CONTAINER,
    LABEL_ATTEMPT,
    RUNNER_NAME,
    STAGE_IN_CONTAINER,
    KubernetesRunnerConfig,
    StagedAttempt,
    Staging,
    attempt_name,
    kube_api_client,
)
from osa_dagster.engine.runners.kubernetes.manifest import (
    job_manifest,
    manifest_memory,
)
from osa_dagster.retrying import TRANSIENT_HTTP_STATUS

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = (5.0, 30.0)  # connect, read; no API call may hang an attempt
# The pod log API reads from the start (limitBytes) or takes the last lines (tailLines), never
# the last bytes: the end of a log over the cap is asked for as its last lines, at most the
# tail's bytes, which holds a traceback whole unless its lines are very long.
HOOK_LOG_TAIL_LINES = 2000
_LOG_READ_BYTES = 64 * 1024


def _transient(error: Exception) -> bool:
    if isinstance(error, ApiException):
        return error.status in TRANSIENT_HTTP_STATUS or not error.status
    return isinstance(error, urllib3.exceptions.HTTPError)


# --- the runner ------------------------------------------------------------------------------


class KubernetesRunner:
    """Runs each attempt as a Job in `config.namespace`; see the module doc."""

    def __init__(
        self,
        staging: Staging,
        config: KubernetesRunnerConfig | None = None,
        api_client: k8s.ApiClient | None = None,
    ) -> None:
        self.staging = staging
        self.config = config or KubernetesRunnerConfig()
        api_client = api_client or kube_api_client()
        self.core = k8s.CoreV1Api(api_client)
        self.batch = k8s.BatchV1Api(api_client)

    def start(self, inv: Invocation) -> KubernetesAttempt:
        name = attempt_name(inv.env.get(ENV_HOOK_NAME, "hook"))
        staged = StagedAttempt(f"{self.config.namespace}/{name}")
        manifest = job_manifest(name, inv, self.config, self.staging, staged)
        try:
            self.staging.upload_dir(inv.in_dir, staged.inputs)
            self.staging.upload_dir(inv.files_root, staged.files, _files_dirs(inv.in_dir))
            self.batch.create_namespaced_job(
                self.config.namespace, manifest, _request_timeout=REQUEST_TIMEOUT
            )
        except BaseException:
            self.staging.delete_prefix(staged.prefix)
            raise
        log.info("started Job %s (%s at %s)", staged.prefix, inv.image, manifest_memory(manifest))
        return KubernetesAttempt(self, name, staged, inv)

    def kill_leftovers(self, marker: AttemptMarker) -> None:
        if marker.runner != RUNNER_NAME or not marker.container:
            return
        namespace, _, name = marker.container.partition("/")
        if not name:
            log.warning("not touching %r: not a namespace/job-name", marker.container)
            return
        self.delete_attempt(namespace, name)
        self.staging.delete_prefix(marker.container)

    def delete_attempt(self, namespace: str, name: str) -> None:
        """Delete the attempt's Job and any pod of it (also one whose Job is gone); idempotent."""
        try:
            self.batch.delete_namespaced_job(
                name,
                namespace,
                body=k8s.V1DeleteOptions(propagation_policy="Background"),
                _request_timeout=REQUEST_TIMEOUT,
            )
        except ApiException as error:
            if error.status != 404:
                raise
        self.core.delete_collection_namespaced_pod(
            namespace,
            label_selector=f"{LABEL_ATTEMPT}={name}",
            grace_period_seconds=0,
            _request_timeout=REQUEST_TIMEOUT,
        )


def _files_dirs(in_dir: Path) -> list[str]:
    """The record folders an attempt needs: only those of its records are staged."""
    path = in_dir / RECORDS_FILE
    folders = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                folders.append(HookRecord.model_validate_json(line).files_dir)
            except ValueError as error:
                raise ValueError(f"{path}, line {number}: not a hook record: {error}") from None
    return folders


class KubernetesAttempt:
    """One running Job; `wait` polls the cluster at most every `poll_interval_s`."""

    def __init__(
        self, runner: KubernetesRunner, name: str, staged: StagedAttempt, inv: Invocation
    ) -> None:
        self._runner = runner
        self._config = runner.config
        self._namespace = runner.config.namespace
        self._name = name
        self._staged = staged
        self._inv = inv
        self.marker = AttemptMarker(
            runner=RUNNER_NAME, limit_mode="container", container=staged.prefix
        )
        started = time.monotonic()
        self._next_poll = started
        # The cluster enforces the deadline; this catches a cluster that does not.
        self._backstop = (
            started
            + inv.timeout_s
            + self._config.staging_allowance_s
            + 2 * self._config.stage_out_grace_s
            + 60
        )
        self._stuck_since: float | None = None
        self._hook_finished_at: float | None = None
        self._exit: AttemptExit | None = None

    def wait(self, timeout: float) -> AttemptExit | None:
        if self._exit is not None:
            return self._exit
        end = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            if now >= self._next_poll:
                self._next_poll = now + self._config.poll_interval_s
                self._poll(now)
                now = time.monotonic()
            if self._exit is not None or now >= end:
                return self._exit
            time.sleep(max(0.0, min(end, self._next_poll) - now))

    def kill(self) -> None:
        if self._exit is not None:
            return
        self._runner.delete_attempt(self._namespace, self._name)
        self._runner.staging.delete_prefix(self._staged.prefix)
        self._exit = AttemptExit(
            returncode=-signal.SIGKILL,
            oom_killed=False,
            timed_out=False,
            peak_memory_mb=None,
            stderr_tail=read_tail(self._inv.log_path),
            limit_mode="container",
        )

    def _poll(self, now: float) -> None:
        try:
            job, pod = self._read()
            self._sync_outputs()
        except Exception as error:
            if not _transient(error):
                raise
            log.warning(
                "Job %s: the cluster or the store did not answer: %s", self.marker.container, error
            )
            self._check_backstop(now)
            return
        verdict = classify(job, pod)
        if isinstance(verdict, Stuck):
            if self._stuck_since is None:
                self._stuck_since = now
                log.warning("Job %s: %s", self.marker.container, verdict.message)
            if verdict.hopeless or now - self._stuck_since >= self._config.stuck_grace_s:
                self._finish(
                    Verdict(-signal.SIGKILL, failure=verdict.reason, detail=verdict.message), pod
                )
            return
        self._stuck_since = None
        if verdict is None:
            self._check_backstop(now)
            return
        if verdict.hook_finished and not self._stage_out_over(pod, now):
            return
        self._finish(verdict, pod)

    def _read(self) -> tuple[k8s.V1Job | None, k8s.V1Pod | None]:
        try:
            job = self._runner.batch.read_namespaced_job(
                self._name, self._namespace, _request_timeout=REQUEST_TIMEOUT
            )
        except ApiException as error:
            if error.status != 404:
                raise
            job = None
        pods = self._runner.core.list_namespaced_pod(
            self._namespace,
            label_selector=f"{LABEL_ATTEMPT}={self._name}",
            _request_timeout=REQUEST_TIMEOUT,
        ).items
        # backoffLimit 0 makes one pod; should there be more, the newest tells the story.
        pod = max(pods, key=lambda p: p.metadata.creation_timestamp or 0, default=None)
        return job, pod

    def _stage_out_over(self, pod: k8s.V1Pod | None, now: float) -> bool:
        """Whether the sidecar's last upload is done, or can no longer come."""
        if self._hook_finished_at is None:
            self._hook_finished_at = now
        phase = pod.status.phase if pod is not None and pod.status else None
        return (
            self._runner.staging.exists(self._staged.done)
            or phase in ("Succeeded", "Failed", None)
            or now - self._hook_finished_at >= self._config.stage_out_grace_s
        )

    def _check_backstop(self, now: float) -> None:
        if now >= self._backstop:
            log.warning("Job %s: past its deadline and still not ended; killing it", self._name)
            self._finish(
                Verdict(
                    -signal.SIGKILL,
                    timed_out=True,
                    failure=DEADLINE_EXCEEDED,
                    detail="the runner's own deadline passed",
                ),
                None,
            )

    def _finish(self, verdict: Verdict, pod: k8s.V1Pod | None) -> None:
        """Take the last outcomes and the log, then remove the Job and the staged objects."""
        failure = verdict.failure
        try:
            self._sync_outputs()
            uploaded = self._runner.staging.exists(self._staged.done)
        except Exception as error:
            if not _transient(error):
                raise
            log.warning("Job %s: could not take the last outcomes: %s", self._name, error)
            uploaded = False
        detail = verdict.detail
        if verdict.hook_finished and not uploaded and verdict.returncode == 0:
            failure = STAGE_OUT_FAILED
            detail = "the hook exited 0 but its outcomes were not all uploaded"
        container = STAGE_IN_CONTAINER if failure == STAGE_IN_FAILED else HOOK_CONTAINER
        self._save_log(pod, container)
        tail = read_tail(self._inv.log_path)
        if detail:
            tail = f"{tail}\n[kubernetes] {detail}" if tail else f"[kubernetes] {detail}"
        self._exit = AttemptExit(
            returncode=verdict.returncode,
            oom_killed=verdict.oom_killed,
            timed_out=verdict.timed_out,
            peak_memory_mb=None,  # the API has no peak; metrics-server samples are no proof
            stderr_tail=tail,
            limit_mode="container",
            failure=failure,
        )
        try:
            self._runner.delete_attempt(self._namespace, self._name)
            self._runner.staging.delete_prefix(self._staged.prefix)
        except Exception as error:  # the Job's TTL removes it later; the outcome stands
            log.warning("Job %s: clean-up failed: %s", self.marker.container, error)

    def _sync_outputs(self) -> None:
        """Copy the outcome files uploaded so far into the local out folder."""
        for name in OUTPUT_FILES:
            data = self._runner.staging.read_bytes(f"{self._staged.outputs}/{name}")
            if data is None:
                continue
            local = self._inv.out_dir / name
            known = local.read_bytes() if local.exists() else b""
            if len(data) <= len(known):
                continue
            if not data.startswith(known):
                log.warning("Job %s: %s was rewritten, not appended to; ignored", self._name, name)
                continue
            write_atomically(local, data)

    def _save_log(self, pod: k8s.V1Pod | None, container: str) -> None:
        """Write the container's log to the invocation's log file, kept to the hook log's cap:
        whole when within it, else its head, a marker and its last lines."""
        with self._inv.log_path.open("wb") as log_file:
            if pod is None:
                log_file.write(b"(no pod left to read the log from)\n")
                return
            try:
                # One byte over the cap tells a log that fits from one that does not.
                head = self._read_log(pod, container, limit_bytes=HOOK_LOG_MAX_BYTES + 1)
                if len(head) <= HOOK_LOG_MAX_BYTES:
                    log_file.write(head)
                    return
                log_file.write(head[:HOOK_LOG_HEAD_BYTES])
                log_file.write(dropped_marker(None, tail=f"last {HOOK_LOG_TAIL_LINES} lines"))
                log_file.write(
                    self._read_log(
                        pod,
                        container,
                        limit_bytes=HOOK_LOG_TAIL_BYTES,
                        tail_lines=HOOK_LOG_TAIL_LINES,
                    )
                )
            except (ApiException, urllib3.exceptions.HTTPError) as error:
                log_file.write(f"(the log of {container} could not be read: {error})\n".encode())

    def _read_log(
        self, pod: k8s.V1Pod, container: str, *, limit_bytes: int, tail_lines: int | None = None
    ) -> bytes:
        """At most `limit_bytes` of the container's log (of its last `tail_lines` lines)."""
        # Not preloaded: the client would decode the plain-text log as if it were JSON.
        response = self._runner.core.read_namespaced_pod_log(
            pod.metadata.name,
            self._namespace,
            container=container,
            limit_bytes=limit_bytes,
            tail_lines=tail_lines,
            _preload_content=False,
            _request_timeout=REQUEST_TIMEOUT,
        )
        read = bytearray()
        try:
            # Bounded here too: the cap holds whatever the API server sends.
            for chunk in response.stream(_LOG_READ_BYTES):
                read += chunk[: limit_bytes - len(read)]
                if len(read) >= limit_bytes:
                    break
        finally:
            response.release_conn()
        return bytes(read)
