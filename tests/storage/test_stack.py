"""`osa stack`: the production profile on one machine, up, used as documented, and down.

The stack is started exactly as the README says (`osa stack --dir D --port P`); a plan is
made from another process with the variables of D/stack.env; the daemon of the stack's
`dagster dev` ingests the batch (the new-batches sensor, the queued run coordinator, runs in
PostgreSQL, artifacts and compute logs in SeaweedFS); SIGTERM takes everything down.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import dagster as dg
import pytest
import requests
from sqlalchemy import select

from osa_dagster.local_postgres import free_port, pg_binary
from osa_dagster.records import Record, RecordsDatabase
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
