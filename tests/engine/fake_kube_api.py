"""A Kubernetes API server faked at the HTTP boundary, for the Kubernetes runner's tests.

It serves the few endpoints the runner calls (create, read and delete a Job; list and delete
pods by label; read a pod's log) on 127.0.0.1, with documents shaped as a real cluster's
(v1.30, containerd) sends them: the runner is tested with the real `kubernetes` client,
which deserialises these documents into its models and refuses a malformed one.

Nothing runs containers: each created Job gets the next `Lifecycle` the test queued, a list
of `Step`s. Every read of the Job moves its attempt one step on (and stays at the last), so
the runner sees the pod go Pending -> Running -> its end. A step's `action` runs when the
step is reached, with the Job manifest the runner sent: there the test plays the pod (reads
the staged inputs, writes outcomes to S3 as the sidecar would).
"""

from __future__ import annotations

import contextlib
import copy
import json
import secrets
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

Document = dict[str, Any]
NODE = "worker-1"
HOST_IP = "198.51.100.7"  # a documentation address: nothing is ever sent to it


def _now(offset_s: float = 0.0) -> str:
    return (datetime.now(UTC) + timedelta(seconds=offset_s)).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- container states, as the kubelet reports them ---------------------------------------


def waiting(reason: str, message: str | None = None) -> Document:
    state: Document = {"reason": reason}
    if message is not None:
        state["message"] = message
    return {"waiting": state}


def running() -> Document:
    return {"running": {"startedAt": _now(-5)}}


def terminated(reason: str, exit_code: int, message: str | None = None) -> Document:
    state: Document = {
        "exitCode": exit_code,
        "reason": reason,
        "startedAt": _now(-5),
        "finishedAt": _now(),
        "containerID": f"containerd://{secrets.token_hex(32)}",
    }
    if message is not None:
        state["message"] = message
    return {"terminated": state}


@dataclass
class PodState:
    """What the kubelet reports of the pod at one step; states by container name."""

    phase: str
    init: dict[str, Document]
    containers: dict[str, Document]
    reason: str | None = None
    message: str | None = None
    conditions: list[Document] = field(default_factory=list)  # besides the usual five
    deleting: bool = False  # deletionTimestamp set: the pod is terminating


@dataclass
class Step:
    pod: PodState | None  # None: no pod (not yet made, or deleted)
    job_conditions: list[Document] = field(default_factory=list)
    action: Callable[[Document], None] | None = None  # runs once, with the Job manifest


@dataclass
class Lifecycle:
    steps: list[Step]
    logs: dict[str, str] = field(default_factory=dict)  # container -> log text


def job_condition(kind: str, reason: str, message: str) -> Document:
    return {
        "type": kind,
        "status": "True",
        "reason": reason,
        "message": message,
        "lastProbeTime": _now(),
        "lastTransitionTime": _now(),
    }


def disruption(reason: str, message: str) -> Document:
    return {
        "type": "DisruptionTarget",
        "status": "True",
        "reason": reason,
        "message": message,
        "lastProbeTime": None,
        "lastTransitionTime": _now(),
    }


# --- lifecycles of the outcomes the runner must tell apart --------------------------------

STAGE_IN, STAGE_OUT, HOOK = "stage-in", "stage-out", "hook"
INITIALIZING = PodState(
    "Pending",
    {STAGE_IN: running(), STAGE_OUT: waiting("PodInitializing")},
    {HOOK: waiting("PodInitializing")},
)
RUNNING = PodState(
    "Running", {STAGE_IN: terminated("Completed", 0), STAGE_OUT: running()}, {HOOK: running()}
)


def _ended(hook: Document, phase: str) -> PodState:
    return PodState(
        phase,
        {STAGE_IN: terminated("Completed", 0), STAGE_OUT: terminated("Completed", 0)},
        {HOOK: hook},
    )


def success(action: Callable[[Document], None] | None = None) -> Lifecycle:
    return Lifecycle(
        [
            Step(None),
            Step(INITIALIZING),
            Step(RUNNING, action=action),
            Step(
                _ended(terminated("Completed", 0), "Succeeded"),
                [
                    job_condition(
                        "SuccessCriteriaMet",
                        "CompletionsReached",
                        "Reached expected number of succeeded pods",
                    ),
                    job_condition(
                        "Complete",
                        "CompletionsReached",
                        "Reached expected number of succeeded pods",
                    ),
                ],
            ),
        ],
        logs={HOOK: "osa_sdk: hook ran\n"},
    )


BACKOFF = [
    job_condition(
        "FailureTarget", "BackoffLimitExceeded", "Job has reached the specified backoff limit"
    ),
    job_condition("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit"),
]


def oom_killed(action: Callable[[Document], None] | None = None) -> Lifecycle:
    return Lifecycle(
        [
            Step(INITIALIZING),
            Step(RUNNING, action=action),
            Step(_ended(terminated("OOMKilled", 137), "Failed"), BACKOFF),
        ],
        logs={HOOK: "osa_sdk: parsing a large structure\n"},
    )


def exited(code: int, action: Callable[[Document], None] | None = None) -> Lifecycle:
    return Lifecycle(
        [
            Step(INITIALIZING),
            Step(RUNNING, action=action),
            Step(_ended(terminated("Error", code), "Failed"), BACKOFF),
        ],
        logs={HOOK: "Traceback (most recent call last):\nValueError: broken hook\n"},
    )


def evicted(action: Callable[[Document], None] | None = None) -> Lifecycle:
    message = (
        "The node was low on resource: memory. Threshold quantity: 100Mi, available: 91212Ki. "
        "Container hook was using 1002348Ki, request is 1Gi, has larger consumption of memory. "
    )
    pod = PodState(
        "Failed",
        {STAGE_IN: terminated("Completed", 0), STAGE_OUT: terminated("Error", 137)},
        {HOOK: terminated("Error", 137)},
        reason="Evicted",
        message=message,
        conditions=[disruption("TerminationByKubelet", message)],
    )
    return Lifecycle([Step(INITIALIZING), Step(RUNNING, action=action), Step(pod, BACKOFF)])


def image_pull_backoff(image: str) -> Lifecycle:
    pulling = f'Back-off pulling image "{image}"'
    failed = (
        f'failed to pull and unpack image "{image}": failed to resolve reference "{image}": '
        f"{image}: not found"
    )
    return Lifecycle(
        [
            Step(None),
            Step(
                PodState(
                    "Pending",
                    {
                        STAGE_IN: waiting("ErrImagePull", failed),
                        STAGE_OUT: waiting("PodInitializing"),
                    },
                    {HOOK: waiting("PodInitializing")},
                )
            ),
            Step(
                PodState(
                    "Pending",
                    {
                        STAGE_IN: waiting("ImagePullBackOff", pulling),
                        STAGE_OUT: waiting("PodInitializing"),
                    },
                    {HOOK: waiting("PodInitializing")},
                )
            ),
        ]
    )


def deadline_exceeded(action: Callable[[Document], None] | None = None) -> Lifecycle:
    """The Job's activeDeadlineSeconds: the Job controller fails the Job and deletes the pod."""
    message = "Job was active longer than specified deadline"
    terminating = PodState(
        "Running",
        {STAGE_IN: terminated("Completed", 0), STAGE_OUT: running()},
        {HOOK: terminated("Error", 143)},
        deleting=True,
    )
    return Lifecycle(
        [
            Step(INITIALIZING),
            Step(RUNNING, action=action),
            Step(terminating, [job_condition("FailureTarget", "DeadlineExceeded", message)]),
            Step(
                None,
                [
                    job_condition("FailureTarget", "DeadlineExceeded", message),
                    job_condition("Failed", "DeadlineExceeded", message),
                ],
            ),
        ]
    )


def node_lost(action: Callable[[Document], None] | None = None) -> Lifecycle:
    """The node stopped answering: the taint manager deletes the pod, whose status is stale."""
    gone = PodState(
        "Running",
        {STAGE_IN: terminated("Completed", 0), STAGE_OUT: running()},
        {HOOK: running()},
        deleting=True,
        conditions=[
            disruption("DeletionByTaintManager", "Taint manager: deleting due to NoExecute taint")
        ],
    )
    return Lifecycle([Step(INITIALIZING), Step(RUNNING, action=action), Step(gone)])


def stage_in_failed() -> Lifecycle:
    pod = PodState(
        "Failed",
        {STAGE_IN: terminated("Error", 2), STAGE_OUT: waiting("PodInitializing")},
        {HOOK: waiting("PodInitializing")},
    )
    return Lifecycle(
        [Step(INITIALIZING), Step(pod, BACKOFF)],
        logs={STAGE_IN: "osa_sdk: staging needs boto3, which this image lacks\n"},
    )


# --- the server ----------------------------------------------------------------------------


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any


@dataclass
class _Attempt:
    job: Document
    lifecycle: Lifecycle
    pod_name: str
    step: int = -1
    pod_deleted: bool = False
    job_deleted: bool = False

    def advance(self) -> None:
        if self.step + 1 < len(self.lifecycle.steps):
            self.step += 1
            action = self.lifecycle.steps[self.step].action
            if action is not None:
                action(self.job)

    @property
    def current(self) -> Step:
        return self.lifecycle.steps[max(self.step, 0)]


class FakeKubeApi:
    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.created: list[Document] = []  # the Job manifests as the runner sent them
        self._queue: deque[Lifecycle] = deque()
        self._attempts: dict[tuple[str, str], _Attempt] = {}
        self._lock = threading.RLock()
        self.url = ""

    def queue(self, *lifecycles: Lifecycle) -> None:
        """The lifecycles of the next Jobs created, in order."""
        self._queue.extend(lifecycles)

    def add_job(self, namespace: str, name: str, lifecycle: Lifecycle) -> None:
        """A Job the runner did not create (a leftover of an orchestrator that died)."""
        body = {
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {"osa.archive/attempt": name},
            },
            "spec": {
                "template": {
                    "metadata": {"labels": {"osa.archive/attempt": name}},
                    "spec": {"containers": []},
                }
            },
        }
        with self._lock:
            self._attempts[(namespace, name)] = self._new_attempt(namespace, body, lifecycle)
            self._attempts[(namespace, name)].advance()

    def job_exists(self, namespace: str, name: str) -> bool:
        attempt = self._attempts.get((namespace, name))
        return attempt is not None and not attempt.job_deleted

    def pod_exists(self, namespace: str, name: str) -> bool:
        attempt = self._attempts.get((namespace, name))
        return attempt is not None and self._pod(attempt) is not None

    def calls(self, method: str, fragment: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and fragment in r.path]

    @contextlib.contextmanager
    def running(self) -> Iterator[str]:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.daemon_threads = True
        server.fake = self  # type: ignore[attr-defined]
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        try:
            self.url = f"http://127.0.0.1:{server.server_address[1]}"
            yield self.url
        finally:
            server.shutdown()
            server.server_close()
            thread.join()

    # --- documents ------------------------------------------------------------------------

    def _new_attempt(self, namespace: str, body: Document, lifecycle: Lifecycle) -> _Attempt:
        job = copy.deepcopy(body)
        uid = str(uuid.uuid4())
        name = job["metadata"]["name"]
        job["apiVersion"], job["kind"] = "batch/v1", "Job"
        job["metadata"].update(
            namespace=namespace,
            uid=uid,
            resourceVersion=str(secrets.randbelow(10**6)),
            generation=1,
            creationTimestamp=_now(),
        )
        job["metadata"].setdefault("labels", {})
        job_labels = {
            "batch.kubernetes.io/controller-uid": uid,
            "batch.kubernetes.io/job-name": name,
            "controller-uid": uid,
            "job-name": name,
        }
        job["metadata"]["labels"] |= job_labels
        spec = job["spec"]
        spec.setdefault("parallelism", 1)
        spec.setdefault("completions", 1)
        spec.setdefault("completionMode", "NonIndexed")
        spec.setdefault("suspend", False)
        spec.setdefault("podReplacementPolicy", "TerminatingOrFailed")
        spec["selector"] = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
        spec["template"]["metadata"].setdefault("labels", {})
        spec["template"]["metadata"]["labels"] |= job_labels
        job["status"] = {}
        return _Attempt(job, lifecycle, f"{name}-{secrets.token_hex(3)[:5]}")

    def _job_document(self, attempt: _Attempt) -> Document:
        job = copy.deepcopy(attempt.job)
        step = attempt.current
        pod = self._pod(attempt)
        status: Document = {
            "startTime": job["metadata"]["creationTimestamp"],
            "uncountedTerminatedPods": {},
            "ready": 0,
            "terminating": 0,
        }
        phase = step.pod.phase if step.pod else None
        if pod is not None and phase in ("Pending", "Running"):
            status["active"] = 1
            status["ready"] = 1 if phase == "Running" and not step.pod.deleting else 0
            status["terminating"] = 1 if step.pod.deleting else 0
        if phase == "Succeeded":
            status["succeeded"] = 1
            status["completionTime"] = _now()
        if phase == "Failed" or any(c["type"] == "Failed" for c in step.job_conditions):
            status["failed"] = 1
        if step.job_conditions:
            status["conditions"] = step.job_conditions
        job["status"] = status
        return job

    def _pod(self, attempt: _Attempt) -> Document | None:
        state = attempt.current.pod
        if state is None or attempt.pod_deleted or attempt.step < 0:
            return None
        job = attempt.job
        template = job["spec"]["template"]
        name = job["metadata"]["name"]
        metadata = {
            "name": attempt.pod_name,
            "generateName": f"{name}-",
            "namespace": job["metadata"]["namespace"],
            "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, attempt.pod_name)),
            "resourceVersion": str(secrets.randbelow(10**6)),
            "creationTimestamp": job["metadata"]["creationTimestamp"],
            "labels": dict(template["metadata"]["labels"]),
            "finalizers": ["batch.kubernetes.io/job-tracking"],
            "ownerReferences": [
                {
                    "apiVersion": "batch/v1",
                    "kind": "Job",
                    "name": name,
                    "uid": job["metadata"]["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        }
        if state.deleting:
            metadata["deletionTimestamp"] = _now(30)
            metadata["deletionGracePeriodSeconds"] = 30
        spec = copy.deepcopy(template["spec"])
        spec |= {
            "nodeName": NODE,
            "schedulerName": "default-scheduler",
            "dnsPolicy": "ClusterFirst",
            "priority": 0,
            "preemptionPolicy": "PreemptLowerPriority",
        }
        images = {
            c["name"]: c.get("image", "")
            for c in spec.get("initContainers", []) + spec.get("containers", [])
        }
        ended = state.phase in ("Succeeded", "Failed")
        initialised = all(
            "terminated" in s or "running" in s for s in state.init.values()
        ) and not any(n == STAGE_IN and "running" in s for n, s in state.init.items())
        ready = state.phase == "Running" and not state.deleting

        def condition(kind: str, ok: bool, reason: str | None = None) -> Document:
            found: Document = {
                "type": kind,
                "status": "True" if ok else "False",
                "lastProbeTime": None,
                "lastTransitionTime": _now(-6),
            }
            if not ok and reason:
                found["reason"] = reason
            return found

        not_ready = (
            "PodCompleted"
            if state.phase == "Succeeded"
            else ("PodFailed" if ended else "ContainersNotReady")
        )
        conditions = [
            condition("PodReadyToStartContainers", not ended),
            condition("Initialized", initialised, "ContainersNotInitialized"),
            condition("Ready", ready, not_ready),
            condition("ContainersReady", ready, not_ready),
            condition("PodScheduled", True),
            *state.conditions,
        ]
        status: Document = {
            "phase": state.phase,
            "conditions": conditions,
            "hostIP": HOST_IP,
            "hostIPs": [{"ip": HOST_IP}],
            "startTime": _now(-6),
            "qosClass": "Burstable",
            "initContainerStatuses": [
                self._container(n, s, images.get(n, "")) for n, s in state.init.items()
            ],
            "containerStatuses": [
                self._container(n, s, images.get(n, "")) for n, s in state.containers.items()
            ],
        }
        if state.phase == "Running":
            status["podIP"] = "198.51.100.20"
            status["podIPs"] = [{"ip": "198.51.100.20"}]
        if state.reason is not None:
            status["reason"] = state.reason
        if state.message is not None:
            status["message"] = state.message
        return {
            "kind": "Pod",
            "apiVersion": "v1",
            "metadata": metadata,
            "spec": spec,
            "status": status,
        }

    @staticmethod
    def _container(name: str, state: Document, image: str) -> Document:
        started = "running" in state or "terminated" in state
        document: Document = {
            "name": name,
            "state": state,
            "lastState": {},
            "ready": "running" in state,
            "restartCount": 0,
            "image": image,
            "imageID": f"{image.split(':')[0]}@sha256:{'ab' * 32}" if started else "",
            "started": "running" in state,
        }
        if started:
            document["containerID"] = state.get("terminated", {}).get(
                "containerID", f"containerd://{secrets.token_hex(32)}"
            )
        return document

    # --- routes -----------------------------------------------------------------------------

    def handle(
        self, method: str, path: str, query: dict[str, list[str]], body: Any
    ) -> tuple[int, Any]:
        with self._lock:
            self.requests.append(Request(method, path, query, body))
            parts = path.strip("/").split("/")
            match parts:
                case ["apis", "batch", "v1", "namespaces", namespace, "jobs"] if method == "POST":
                    return self._create_job(namespace, body)
                case ["apis", "batch", "v1", "namespaces", namespace, "jobs", name]:
                    attempt = self._attempts.get((namespace, name))
                    if attempt is None or attempt.job_deleted:
                        return _not_found("jobs.batch", name, "batch", "jobs")
                    if method == "GET":
                        attempt.advance()
                        return 200, self._job_document(attempt)
                    if method == "DELETE":
                        attempt.job_deleted = True
                        if (body or {}).get("propagationPolicy") in ("Background", "Foreground"):
                            attempt.pod_deleted = True
                        return 200, _status_success(name, attempt.job["metadata"]["uid"])
                case ["api", "v1", "namespaces", namespace, "pods"] if method in ("GET", "DELETE"):
                    selected = self._select(namespace, query.get("labelSelector", [""])[0])
                    items = [pod for attempt in selected if (pod := self._pod(attempt)) is not None]
                    if method == "DELETE":
                        for attempt in selected:
                            attempt.pod_deleted = True
                    return 200, {
                        "kind": "PodList",
                        "apiVersion": "v1",
                        "metadata": {"resourceVersion": "4242"},
                        "items": items,
                    }
                case ["api", "v1", "namespaces", namespace, "pods", pod_name, "log"] if (
                    method == "GET"
                ):
                    return self._log(namespace, pod_name, query)
            return 404, {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": "the server could not find the requested resource",
                "reason": "NotFound",
                "details": {},
                "code": 404,
            }

    def _create_job(self, namespace: str, body: Any) -> tuple[int, Any]:
        if not isinstance(body, dict) or body.get("kind") != "Job":
            return 400, {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": "the body is not a Job",
                "reason": "BadRequest",
                "code": 400,
            }
        name = body["metadata"]["name"]
        if (namespace, name) in self._attempts:
            return 409, {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": f'jobs.batch "{name}" already exists',
                "reason": "AlreadyExists",
                "details": {"name": name, "group": "batch", "kind": "jobs"},
                "code": 409,
            }
        if not self._queue:
            raise AssertionError(f"the test queued no lifecycle for Job {name}")
        self.created.append(copy.deepcopy(body))
        attempt = self._new_attempt(namespace, body, self._queue.popleft())
        self._attempts[(namespace, name)] = attempt
        return 201, self._job_document(attempt)

    def _select(self, namespace: str, selector: str) -> list[_Attempt]:
        wanted = dict(term.split("=", 1) for term in selector.split(",") if term)
        return [
            attempt
            for (ns, _), attempt in self._attempts.items()
            if ns == namespace
            and all(
                attempt.job["spec"]["template"]["metadata"]["labels"].get(k) == v
                for k, v in wanted.items()
            )
        ]

    def _log(self, namespace: str, pod_name: str, query: dict[str, list[str]]) -> tuple[int, Any]:
        container = query.get("container", [""])[0]
        for (ns, _), attempt in self._attempts.items():
            if ns == namespace and attempt.pod_name == pod_name and self._pod(attempt) is not None:
                known = {
                    c["name"]
                    for c in attempt.job["spec"]["template"]["spec"].get("initContainers", [])
                    + attempt.job["spec"]["template"]["spec"]["containers"]
                }
                if container not in known:
                    return 400, {
                        "kind": "Status",
                        "apiVersion": "v1",
                        "metadata": {},
                        "status": "Failure",
                        "message": f"container {container} is not valid for pod {pod_name}",
                        "reason": "BadRequest",
                        "code": 400,
                    }
                return 200, _log_as_read(attempt.lifecycle.logs.get(container, ""), query)
        return _not_found("pods", pod_name, "", "pods")


def _log_as_read(text: str, query: dict[str, list[str]]) -> str | bytes:
    """What the API server sends of a log: its last `tailLines` lines, then at most
    `limitBytes` of them from their start (cut mid-line, as the kubelet cuts)."""
    data = text.encode()
    if "tailLines" in query:
        lines = data.splitlines(keepends=True)
        data = b"".join(lines[max(0, len(lines) - int(query["tailLines"][0])) :])
    if "limitBytes" in query:
        data = data[: int(query["limitBytes"][0])]
    return data


def _not_found(resource: str, name: str, group: str, kind: str) -> tuple[int, Document]:
    return 404, {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": f'{resource} "{name}" not found',
        "reason": "NotFound",
        "details": {"name": name, "group": group, "kind": kind},
        "code": 404,
    }


def _status_success(name: str, uid: str) -> Document:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "details": {"name": name, "group": "batch", "kind": "jobs", "uid": uid},
    }


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the test asserts on FakeKubeApi.requests instead."""

    def _serve(self) -> None:
        fake: FakeKubeApi = self.server.fake  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        parts = urlsplit(self.path)
        status, answer = fake.handle(self.command, parts.path, parse_qs(parts.query), body)
        if isinstance(answer, bytes | str):
            payload = answer if isinstance(answer, bytes) else answer.encode()
            kind = "text/plain"
        else:
            payload, kind = json.dumps(answer).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_DELETE = _serve
