"""A production-like stack on one machine, for a trial of the production profile:

    osa stack [--dir D] [--port P]

brings up PostgreSQL (the distribution's) with the two databases of the profile, `dagster`
(the instance: runs, events, schedules) and `records` (the archive), and SeaweedFS (S3) with
its two buckets, `osa-artifacts` (the artifact store) and `osa-compute-logs`; writes the
shipped profile (deploy/production/dagster.yaml) into D/dagster_home; runs `dagster dev` on
it (webserver and daemon) on 127.0.0.1:P; and, at Ctrl-C or SIGTERM, takes all of it down.
D (default .stack) keeps the data for the next start. D/stack.env holds the variables that
point `osa` and `dagster` commands in another shell at the stack (`. D/stack.env`).

Not for production itself: one machine, trust authentication on 127.0.0.1, one S3 identity.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType

from osa_dagster.local_postgres import PgCluster, free_port
from osa_dagster.storage.local_s3 import SeaweedFS, SeaweedFSUnavailable

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "deploy" / "production" / "dagster.yaml"
WORKSPACE = REPO / "workspace.yaml"
DEFAULT_DIR = Path(".stack")
DEFAULT_PORT = 3000
INSTANCE_DATABASE = "dagster"
RECORDS_DATABASE = "records"
ARTIFACTS_BUCKET = "osa-artifacts"
COMPUTE_LOG_BUCKET = "osa-compute-logs"
# How long `dagster dev` may take to stop its webserver, daemon and code server.
STOP_GRACE_S = 60


class StackError(RuntimeError):
    """A part of the stack that cannot be brought up; the message says which and why."""


def stack_environment(postgres: PgCluster, s3: SeaweedFS, home: Path, port: int) -> dict[str, str]:
    """Every variable the production profile and the archive read, pointing at the stack."""
    return {
        "DAGSTER_HOME": str(home),
        "OSA_DAGSTER_PG_HOST": "127.0.0.1",
        "OSA_DAGSTER_PG_PORT": str(postgres.port),
        "OSA_DAGSTER_PG_DB": INSTANCE_DATABASE,
        "OSA_DAGSTER_PG_USER": "postgres",
        "OSA_DAGSTER_PG_PASSWORD": "",
        "OSA_DATABASE_URL": postgres.database_url(RECORDS_DATABASE),
        **s3.environment(),
        "OSA_COMPUTE_LOG_BUCKET": COMPUTE_LOG_BUCKET,
        "OSA_WEBSERVER_URL": f"http://127.0.0.1:{port}",
    }


@contextlib.contextmanager
def running_postgres(folder: Path) -> Iterator[PgCluster]:
    """The stack's cluster in `folder` (made at the first start), with both databases."""
    cluster = PgCluster(folder, free_port())
    if not cluster.initialised:
        cluster.init()
    cluster.start()
    try:
        for database in (INSTANCE_DATABASE, RECORDS_DATABASE):
            cluster.create_database(database)
        yield cluster
    finally:
        cluster.stop()


@contextlib.contextmanager
def running_s3(folder: Path) -> Iterator[SeaweedFS]:
    try:
        server = SeaweedFS.start(folder, bucket=ARTIFACTS_BUCKET)
    except SeaweedFSUnavailable as error:
        raise StackError(f"SeaweedFS: {error}") from error
    try:
        with contextlib.suppress(server.client().exceptions.BucketAlreadyOwnedByYou):
            server.client().create_bucket(Bucket=COMPUTE_LOG_BUCKET)
        yield server
    finally:
        server.kill()


def write_environment(path: Path, env: dict[str, str]) -> None:
    path.write_text("".join(f"export {name}={shlex.quote(value)}\n" for name, value in env.items()))


class _Stop(Exception):
    """SIGTERM arrived: take the stack down as after a Ctrl-C."""


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def run_stack(root: Path, port: int) -> int:
    """Bring the stack up in `root`, run `dagster dev` until it ends or is stopped, then take
    everything down; `dagster dev`'s exit code (0 after a Ctrl-C or SIGTERM)."""
    if not PROFILE.is_file() or not WORKSPACE.is_file():
        raise StackError(f"{PROFILE} or {WORKSPACE} is missing: run from a source checkout")
    dagster = shutil.which("dagster", path=str(Path(sys.executable).parent)) or "dagster"
    root = root.resolve()
    home = root / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(PROFILE, home / "dagster.yaml")
    signal.signal(signal.SIGTERM, _raise_stop)
    with running_postgres(root / "postgres") as postgres, running_s3(root / "s3") as s3:
        env = stack_environment(postgres, s3, home, port)
        write_environment(root / "stack.env", env)
        print(
            f"osa stack: PostgreSQL on 127.0.0.1:{postgres.port}, S3 at {s3.url}, Dagster UI "
            f"at {env['OSA_WEBSERVER_URL']}; `. {root / 'stack.env'}` points other shells at it",
            file=sys.stderr,
        )
        command = [dagster, "dev", "-w", str(WORKSPACE), "-h", "127.0.0.1", "-p", str(port)]
        # Its own process group: its code servers outlive it otherwise, and stop with it here.
        child = subprocess.Popen(
            command, cwd=REPO, env={**os.environ, **env}, start_new_session=True
        )
        try:
            return child.wait()
        except (KeyboardInterrupt, _Stop):
            return 0
        finally:
            _stop_group(child)


def _stop_group(child: subprocess.Popen[bytes]) -> None:
    """SIGINT to `dagster dev` and its process group (webserver, daemon, code servers),
    which stop gracefully on it; SIGKILL to what is left after STOP_GRACE_S."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGINT)
    try:
        child.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)


def add_stack_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    parents: Sequence[argparse.ArgumentParser] = (),
) -> None:
    stack_cmd = commands.add_parser(
        "stack",
        parents=list(parents),
        help="dagster dev on the production profile against a local PostgreSQL and S3",
        description="Run dagster dev on the production profile against a local PostgreSQL "
        "and SeaweedFS until Ctrl-C or SIGTERM, then stop them; the data stays in --dir for "
        "the next start.",
    )
    stack_cmd.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="default: %(default)s")
    stack_cmd.add_argument("--port", type=int, default=DEFAULT_PORT, help="default: %(default)s")


def run_stack_command(args: argparse.Namespace) -> int:
    try:
        return run_stack(args.dir, args.port)
    except (StackError, FileNotFoundError) as error:
        print(f"osa stack: {error}", file=sys.stderr)
        return 1
