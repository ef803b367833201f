"""`osa stack`: the production profile on one machine, up, used as documented, and down.

The stack is started exactly as the README says (`osa stack --dir D --port P`); a plan is
made from another process with the variables of D/stack.env; the daemon of the stack's
`dagster dev` ingests the batch (the new-batches sensor, the queued run coordinator, runs in
PostgreSQL, artifacts and compute logs in SeaweedFS); SIGTERM takes everything down.

It starts again on its own folder after a SIGTERM, after a SIGKILL of its whole process
tree and after a SIGKILL of the stack's process alone, serving what it held; and when the
daemon alone dies, it says so and starts `dagster dev` again while PostgreSQL and S3 stay
up.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3
import dagster as dg
import pytest
import requests
from sqlalchemy import select

from osa_dagster.local_postgres import PgCluster, free_port, pg_binary
from osa_dagster.records import Record, RecordsDatabase
from osa_dagster.stack import Leftovers
from osa_dagster.storage.s3 import make_s3_client
from tests.fixtures.services import unavailable

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
# Generous: dagster dev, its code server and a whole ingest run on a loaded 2-core machine.
DEADLINE_S = 600


def read_stack_env(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        env[name] = shlex.split(value)[0] if value else ""
    return env


def wait_for(what: str, ready, process: subprocess.Popen[bytes]):
    """Poll `ready` until it returns something truthy; fail if the stack died meanwhile."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        assert process.poll() is None, f"osa stack exited with {process.returncode}"
        found = ready()
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"{what} not within {DEADLINE_S} s")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def stack_dir() -> Iterator[Path]:
    """A folder the postgres user can reach (pytest's are private to root)."""
    if pg_binary("initdb") is None:
        unavailable("PostgreSQL (initdb, pg_ctl) is not installed")
    folder = Path(tempfile.mkdtemp(prefix="osa-stack-"))
    folder.chmod(0o755)
    yield folder
    # A test that failed may have left running what a killed stack leaves.
    Leftovers(folder / "stack.processes.json").stop()
    with contextlib.suppress(RuntimeError):
        PgCluster(folder / "postgres").stop("immediate")
    shutil.rmtree(folder, ignore_errors=True)


def test_osa_stack_ingests_on_the_production_profile_and_stops(stack_dir: Path, tmp_path: Path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OSA_", "DAGSTER_", "AWS_"))}
    stack = subprocess.Popen(
        [BIN / "osa", "stack", "--dir", str(stack_dir), "--port", str(port)],
        env=env,
        cwd=tmp_path,
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def answering() -> bool:
            try:
                return requests.get(f"{url}/server_info", timeout=5).ok
            except requests.ConnectionError:
                return False

        wait_for("the webserver", answering, stack)
        stack_env = read_stack_env(stack_dir / "stack.env")
        assert stack_env["OSA_WEBSERVER_URL"] == url
        used = {**env, **stack_env}
        planned = subprocess.run(
            [BIN / "osa", "plan", "geo", "--limit", "1"],
            env=used,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=True,
        )
        key = planned.stdout.split()[0]  # "KEY  new"

        os.environ.update(stack_env)  # the instance of DAGSTER_HOME reads them
        try:
            with dg.DagsterInstance.get() as instance:
                assert type(instance.run_storage).__name__ == "PostgresRunStorage"
                ended = [
                    dg.DagsterRunStatus.SUCCESS,
                    dg.DagsterRunStatus.FAILURE,
                    dg.DagsterRunStatus.CANCELED,
                ]
                finished = dg.RunsFilter(job_name="geo_ingest", statuses=ended)
                [run] = wait_for(
                    "the sensor's ingest run to end",
                    lambda: instance.get_run_records(finished),
                    stack,
                )
                assert run.dagster_run.status == dg.DagsterRunStatus.SUCCESS
                features = dg.AssetKey(["geo", "features"])
                assert instance.get_materialized_partitions(features) == {key}
        finally:
            for name in stack_env:
                os.environ.pop(name, None)

        with RecordsDatabase(stack_env["OSA_DATABASE_URL"]).session() as session:
            assert list(session.scalars(select(Record.source_id))) == ["GDS507"]
        session = boto3.session.Session(
            aws_access_key_id=stack_env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=stack_env["AWS_SECRET_ACCESS_KEY"],
        )
        s3 = make_s3_client(endpoint_url=stack_env["OSA_S3_ENDPOINT_URL"], session=session)
        for bucket, prefix in [("osa-artifacts", "osa/batches/geo/"), ("osa-compute-logs", "")]:
            listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix)
            assert listed.get("KeyCount", 0) > 0, bucket
    finally:
        stack.send_signal(signal.SIGTERM)
        returncode = stack.wait(timeout=180)
    assert returncode == 0
    postgres_port = int(stack_env["OSA_DAGSTER_PG_PORT"])
    s3_port = int(stack_env["OSA_S3_ENDPOINT_URL"].rsplit(":", 1)[1])
    assert not any(port_open(p) for p in (port, postgres_port, s3_port))
    assert not list(Path("/tmp").glob(f"seaweedfs-*-grpc-{s3_port}.sock"))
    assert processes_naming(stack_dir) == []


def processes_naming(folder: Path) -> list[int]:
    """Pids of live processes whose command line names `folder` (code servers name it)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and str(folder).encode() in (proc / "cmdline").read_bytes():
                found.append(int(proc.name))
        except OSError:
            continue  # ended meanwhile
    return found


def answering(url: str) -> bool:
    try:
        return requests.get(f"{url}/server_info", timeout=5).ok
    except requests.ConnectionError:
        return False


@contextmanager
def stack_instance(stack_env: dict[str, str]) -> Iterator[dg.DagsterInstance]:
    """The stack's instance, read as `. D/stack.env` then `dagster` would."""
    saved = {name: os.environ.get(name) for name in stack_env}
    os.environ.update(stack_env)
    try:
        with dg.DagsterInstance.get() as instance:
            yield instance
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class RunningStack:
    """`osa stack --dir D --port P` as a subprocess, its output in a log file."""

    def __init__(self, folder: Path, port: int, cwd: Path, log: Path) -> None:
        self.folder, self.url, self.log = folder, f"http://127.0.0.1:{port}", log
        self.env = {
            k: v for k, v in os.environ.items() if not k.startswith(("OSA_", "DAGSTER_", "AWS_"))
        }
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [BIN / "osa", "stack", "--dir", str(folder), "--port", str(port)],
                env=self.env,
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        # Its line comes once it stopped what a killed stack left, such as a webserver.
        wait_for("PostgreSQL and S3", lambda: "Dagster UI at" in self.output(), self.process)
        wait_for("the webserver", lambda: answering(self.url), self.process)
        self.stack_env = read_stack_env(folder / "stack.env")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, what: str, ready: Callable[[], object]) -> object:
        return wait_for(what, ready, self.process)

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=DEADLINE_S)


def descendants(pid: int) -> list[int]:
    """`pid` and every live process under it, by parent pid."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, stack = [], [pid]
    while stack:
        tree.append(current := stack.pop())
        stack.extend(children.get(current, []))
    return tree


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def command_line(pid: int) -> bytes:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return b""


def serves_what_it_held(stack: RunningStack, key: str) -> set[str]:
    """Check that PostgreSQL holds the plan's partition and that S3 answers with both
    buckets (the webserver answered already); the artifact store's keys."""
    with stack_instance(stack.stack_env) as instance:
        assert key in instance.get_dynamic_partitions("geo_batches")
    env = stack.stack_env
    session = boto3.session.Session(
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )
    s3 = make_s3_client(endpoint_url=env["OSA_S3_ENDPOINT_URL"], session=session)
    s3.head_bucket(Bucket="osa-compute-logs")
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="osa-artifacts", Prefix="osa/")
    return {item["Key"] for page in pages for item in page.get("Contents", [])}


def test_osa_stack_starts_again_on_its_folder_after_sigterm_and_after_sigkill(
    stack_dir: Path, tmp_path: Path
):
    port = free_port()
    first = RunningStack(stack_dir, port, tmp_path, tmp_path / "first.log")
    try:
        planned = subprocess.run(
            [BIN / "osa", "plan", "geo", "--limit", "1"],
            env={**first.env, **first.stack_env},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=True,
        )
        key = planned.stdout.split()[0]
        stored = serves_what_it_held(first, key)
        assert stored, "the plan stored nothing"
    finally:
        assert first.terminate() == 0

    second = RunningStack(stack_dir, port, tmp_path, tmp_path / "second.log")
    assert stored <= serves_what_it_held(second, key)
    # Every process of the stack at once, as a crash of the machine's supervisor would.
    tree = descendants(second.process.pid)
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    second.process.wait()
    deadline = time.monotonic() + DEADLINE_S
    while any(alive(pid) for pid in tree):
        assert time.monotonic() < deadline, "the killed processes are still there"
        time.sleep(0.2)

    third = RunningStack(stack_dir, port, tmp_path, tmp_path / "third.log")
    # pg_ctl started the server in a session of its own: it outlived the kill.
    assert "stopping the PostgreSQL server a killed stack left" in third.output()
    assert stored <= serves_what_it_held(third, key)
    # The stack alone: SeaweedFS and dagster dev, in sessions of their own, outlive it too.
    third.process.kill()
    third.process.wait()

    fourth = RunningStack(stack_dir, port, tmp_path, tmp_path / "fourth.log")
    try:
        for leftover in ("SeaweedFS", "dagster dev"):
            assert f"osa stack: stopped {leftover} (process group" in fourth.output()
        assert stored <= serves_what_it_held(fourth, key)
    finally:
        assert fourth.terminate() == 0
    assert processes_naming(stack_dir) == []


def test_when_the_daemon_dies_the_stack_says_so_and_starts_dagster_dev_again(
    stack_dir: Path, tmp_path: Path
):
    stack = RunningStack(stack_dir, free_port(), tmp_path, tmp_path / "stack.log")
    try:
        tree = descendants(stack.process.pid)
        [daemon] = [pid for pid in tree if b"dagster._daemon" in command_line(pid)]
        [weed] = [pid for pid in tree if b"weed" in command_line(pid)]
        postmaster = (stack_dir / "postgres/data/postmaster.pid").read_text().split()[0]
        with stack_instance(stack.stack_env) as instance:
            stack.wait_for("a daemon heartbeat", instance.get_daemon_heartbeats)
            killed_at = time.time()
            os.kill(daemon, signal.SIGKILL)
            said = "dagster-daemon died (killed by SIGKILL), so dagster dev stopped"
            stack.wait_for("the stack to say what died", lambda: said in stack.output())
            stack.wait_for(
                "a heartbeat of a new daemon",
                lambda: any(
                    beat.timestamp > killed_at for beat in instance.get_daemon_heartbeats().values()
                ),
            )
        stack.wait_for("the webserver again", lambda: answering(stack.url))
        restarted = descendants(stack.process.pid)
        assert [pid for pid in restarted if b"dagster._daemon" in command_line(pid)] != [daemon]
        # PostgreSQL and S3 stayed up: the same processes, on the same ports.
        assert weed in restarted
        assert (stack_dir / "postgres/data/postmaster.pid").read_text().split()[0] == postmaster
        assert read_stack_env(stack_dir / "stack.env") == stack.stack_env
        [line] = [line for line in stack.output().splitlines() if said in line]
        assert "starting dagster dev again in 1 s" in line, line
    finally:
        assert stack.terminate() == 0
    assert processes_naming(stack_dir) == []


def test_a_second_stack_on_the_same_folder_is_refused(stack_dir: Path, tmp_path: Path):
    """The lock is what makes stopping a PostgreSQL server found running on the folder safe."""
    with (stack_dir / "stack.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lock.write("4242\n")
        lock.flush()
        refused = subprocess.run(
            [BIN / "osa", "stack", "--dir", str(stack_dir), "--port", str(free_port())],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=DEADLINE_S,
        )
    assert (refused.returncode, refused.stderr) == (
        1,
        f"osa stack: {stack_dir} is in use by another osa stack (pid 4242)\n",
    )
    assert not (stack_dir / "postgres").exists()
