"""A production-like stack on one machine, for a trial of the production profile:

    osa stack [--dir D] [--port P]

brings up PostgreSQL (the distribution's) with the two databases of the profile, `dagster`
(the instance: runs, events, schedules) and `records` (the archive), and SeaweedFS (S3) with
its two buckets, `osa-artifacts` (the artifact store) and `osa-compute-logs`; writes the
shipped profile (deploy/production/dagster.yaml) into D/dagster_home; runs `dagster dev` on
it (webserver and daemon) on 127.0.0.1:P; and, at Ctrl-C or SIGTERM, takes all of it down.
D (default .stack) keeps the data for the next start. D/stack.env holds the variables that
point `osa` and `dagster` commands in another shell at the stack (`. D/stack.env`).

It starts again on its own D after any stop. What a killed stack left running on D is
stopped first: its PostgreSQL server (pg_ctl puts it in a session of its own, so it
outlives even a SIGKILL of the stack's process tree), and after a SIGKILL of the stack
alone its SeaweedFS and `dagster dev` (Leftovers). The buckets are kept. One stack
at a time holds D (D/stack.lock). When `dagster dev` stops by itself (its daemon or
webserver died, and it stops the other), the stack says so in one line and starts it again,
PostgreSQL and S3 staying up; after MAX_QUICK_RESTARTS restarts in a row that each lasted
less than STABLE_S it gives up and stops.

Not for production itself: one machine, trust authentication on 127.0.0.1, one S3 identity.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import IO

from pydantic import TypeAdapter

from osa_dagster.engine.process_identity import ProcessIdentity
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
# `dagster dev` started again after it stopped by itself: after a wait that doubles from
# 1 s, at most this many times in a row; a `dagster dev` that ran STABLE_S resets the count.
MAX_QUICK_RESTARTS = 5
STABLE_S = 300.0
# What `dagster dev` logs when its webserver or daemon dies, before it stops the other.
_CHILD_DIED = re.compile(rb"(dagster-\w+) process shut down unexpectedly with return code (-?\d+)")


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
def holding(root: Path) -> Iterator[None]:
    """Hold `root` for this stack: a second one on it would stop this one's PostgreSQL.
    The lock goes with the process, however it ends."""
    lock = (root / "stack.lock").open("a+")
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise StackError(
                f"{root} is in use by another osa stack (pid {lock.read().strip() or '?'})"
            ) from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield
    finally:
        lock.close()


class Leftovers:
    """The processes the stack starts in sessions of their own (SeaweedFS, `dagster dev` and
    its group), which outlive a SIGKILL of the stack alone, recorded in D: the next start
    stops those still running, which would hold D's data and the webserver's port."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def recorded(self) -> dict[str, ProcessIdentity]:
        try:
            return _RECORDED.validate_json(self.path.read_bytes())
        except FileNotFoundError:
            return {}

    def add(self, name: str, pid: int) -> None:
        recorded = {**self.recorded(), name: ProcessIdentity.of_pid(pid)}
        partial = self.path.with_suffix(".partial")
        partial.write_bytes(_RECORDED.dump_json(recorded))
        partial.replace(self.path)  # whole, even if the stack dies while writing

    def stop(self) -> None:
        """SIGKILL each recorded process group whose leader still runs, or whose leader is
        gone without its pid taken by another process (its members are then the stack's)."""
        for name, leader in self.recorded().items():
            alive = leader.alive()
            if not alive and Path(f"/proc/{leader.pid}").exists():
                continue  # gone, its pid reused
            with contextlib.suppress(ProcessLookupError):
                os.killpg(leader.pid, signal.SIGKILL)
                print(
                    f"osa stack: stopped {name} (process group {leader.pid}), which a killed "
                    "stack left running",
                    file=sys.stderr,
                    flush=True,
                )
                _wait_until_gone(leader.pid)
        self.path.unlink(missing_ok=True)


_RECORDED = TypeAdapter(dict[str, ProcessIdentity])


def _wait_until_gone(group: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:  # no process left in the group
            return
        if time.monotonic() > deadline:
            raise StackError(f"process group {group} still runs {timeout_s:g} s after SIGKILL")
        time.sleep(0.1)


@contextlib.contextmanager
def running_postgres(folder: Path) -> Iterator[PgCluster]:
    """The stack's cluster in `folder` (made at the first start), with both databases."""
    cluster = PgCluster(folder, free_port())
    try:
        if not cluster.initialised:
            cluster.init()
        elif cluster.running:
            # Left by a stack that was killed (this one holds the folder): on an unknown port.
            print(
                f"osa stack: stopping the PostgreSQL server a killed stack left on {folder}",
                file=sys.stderr,
                flush=True,
            )
            cluster.stop()
        cluster.start()
    except RuntimeError as error:  # pg_ctl's own message, which says why
        raise StackError(f"PostgreSQL: {' '.join(str(error).split())}") from error
    try:
        for database in (INSTANCE_DATABASE, RECORDS_DATABASE):
            cluster.create_database(database)
        yield cluster
    finally:
        cluster.stop()


@contextlib.contextmanager
def running_s3(folder: Path, leftovers: Leftovers) -> Iterator[SeaweedFS]:
    try:
        server = SeaweedFS.start(folder, bucket=ARTIFACTS_BUCKET)
    except SeaweedFSUnavailable as error:
        raise StackError(f"SeaweedFS: {error}") from error
    try:
        leftovers.add("SeaweedFS", server.process.pid)
        server.create_bucket(COMPUTE_LOG_BUCKET)
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
    """Bring the stack up in `root`, run `dagster dev` (again whenever it stops by itself)
    until the stack is stopped, then take everything down: 0 after a Ctrl-C or SIGTERM, 1
    when `dagster dev` kept stopping."""
    if not PROFILE.is_file() or not WORKSPACE.is_file():
        raise StackError(f"{PROFILE} or {WORKSPACE} is missing: run from a source checkout")
    dagster = shutil.which("dagster", path=str(Path(sys.executable).parent)) or "dagster"
    root = root.resolve()
    home = root / "dagster_home"
    home.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _raise_stop)
    try:
        with holding(root):
            leftovers = Leftovers(root / "stack.processes.json")
            leftovers.stop()
            shutil.copy(PROFILE, home / "dagster.yaml")
            with (
                running_postgres(root / "postgres") as postgres,
                running_s3(root / "s3", leftovers) as s3,
            ):
                env = stack_environment(postgres, s3, home, port)
                write_environment(root / "stack.env", env)
                print(
                    f"osa stack: PostgreSQL on 127.0.0.1:{postgres.port}, S3 at {s3.url}, "
                    f"Dagster UI at {env['OSA_WEBSERVER_URL']}; `. {root / 'stack.env'}` "
                    "points other shells at it",
                    file=sys.stderr,
                    flush=True,
                )
                command = [dagster, "dev", "-w", str(WORKSPACE), "-h", "127.0.0.1", "-p", str(port)]
                return supervise(command, {**os.environ, **env}, leftovers)
    except (KeyboardInterrupt, _Stop):
        return 0


def supervise(command: list[str], env: dict[str, str], leftovers: Leftovers) -> int:
    """Run `dagster dev` and start it again whenever it stops by itself, saying so; 1 once
    it stopped MAX_QUICK_RESTARTS times in a row less than STABLE_S after its start. A
    Ctrl-C or SIGTERM propagates, after `dagster dev` is stopped."""
    quick_restarts = 0
    while True:
        started = time.monotonic()
        status, died = run_dagster_dev(command, env, leftovers)
        if time.monotonic() - started >= STABLE_S:
            quick_restarts = 0
        stopped = f"dagster dev stopped ({_exit_status(status)})"
        what = f"{died}, so {stopped}" if died else stopped
        if quick_restarts == MAX_QUICK_RESTARTS:
            print(
                f"osa stack: {what}, {quick_restarts + 1} times in a row within {STABLE_S:g} s "
                "of its start: giving up, stopping PostgreSQL and S3",
                file=sys.stderr,
                flush=True,
            )
            return 1
        delay = 2**quick_restarts
        quick_restarts += 1
        print(
            f"osa stack: {what}; starting dagster dev again in {delay} s "
            f"(restart {quick_restarts} of {MAX_QUICK_RESTARTS} in a row), PostgreSQL and S3 "
            "stay up",
            file=sys.stderr,
            flush=True,
        )
        time.sleep(delay)


def run_dagster_dev(
    command: list[str], env: dict[str, str], leftovers: Leftovers
) -> tuple[int, str | None]:
    """Run `dagster dev` until it stops, relaying its output to stderr: its exit status,
    and which of its processes died if one did ("dagster-daemon died (killed by
    SIGKILL)"). Stopped with its whole process group, whatever ends it."""
    # Its own process group: its code servers outlive it otherwise, and stop with it here.
    child = subprocess.Popen(
        command,
        cwd=REPO,
        env=env,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    leftovers.add("dagster dev", child.pid)
    assert child.stdout is not None
    died: list[str] = []
    relay = threading.Thread(target=_relay, args=(child.stdout, died), daemon=True)
    relay.start()
    try:
        status = child.wait()
    finally:
        _stop_group(child)
    # The group is gone, so its output ends: the line that names a death is read by now.
    relay.join(timeout=10)
    return status, died[-1] if died else None


def _relay(output: IO[bytes], died: list[str]) -> None:
    """Copy `dagster dev`'s output to stderr, noting each of its processes that died."""
    for line in output:
        sys.stderr.buffer.write(line)
        sys.stderr.buffer.flush()
        if found := _CHILD_DIED.search(line):
            died.append(f"{found[1].decode()} died ({_exit_status(int(found[2]))})")


def _exit_status(code: int) -> str:
    """A process's return code as people read it: `killed by SIGKILL`, `exit status 1`."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


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
