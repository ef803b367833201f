"""Stage a hook's folders to and from S3 inside a pod: ``python -m osa_sdk.remote ...``.

The Kubernetes runner runs two small programs from here next to the hook, in its pod:

- ``stage-in URL=DIR ...`` (an init container): copies every object under each s3:// URL
  into DIR, before the hook starts.
- ``stage-out DIR URL --done URL`` (a sidecar): uploads the hook's outcome files from DIR to
  URL every few seconds while the hook runs, and once more when it is told to stop
  (SIGTERM, which Kubernetes sends to a sidecar after the hook's container has exited, also
  after an OOM kill); then it writes the `--done` object, saying that the upload is final.

What an OOM kill loses: nothing the hook had written, as long as the sidecar's last upload
succeeds (the sidecar has its own memory limit, so the hook's OOM does not touch it). If the
whole pod dies (evicted, node lost), outcomes written since the sidecar's last upload are lost.
The engine's checkpoint is the truth either way: a record without an uploaded outcome is simply
run again by the next attempt, at the next memory limit after an OOM.

The hook itself never sees S3 or its credentials: only these programs do. S3 is reached as
OSA_S3_ENDPOINT_URL (path-style addressing then) and AWS_REGION / AWS_DEFAULT_REGION say, with
boto3's default credential chain. boto3 is imported lazily: it is needed only in images that
stage (install ``osa-sdk[s3]``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from osa_sdk.contract import EXIT_CONTRACT_ERROR, OUTPUT_FILES

if TYPE_CHECKING:
    from botocore.client import BaseClient

log = logging.getLogger("osa_sdk.remote")

ENV_S3_ENDPOINT_URL = "OSA_S3_ENDPOINT_URL"
DEFAULT_SYNC_INTERVAL_S = 2.0


class StagingError(RuntimeError):
    """A location or an object that cannot be staged; the message names it."""


def s3_client() -> BaseClient:
    """A boto3 S3 client configured from the environment (see the module doc)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError as exc:
        raise StagingError(
            "staging needs boto3, which this image lacks: install osa-sdk[s3]"
        ) from exc
    endpoint = os.environ.get(ENV_S3_ENDPOINT_URL) or None
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    config = Config(
        retries={"mode": "standard", "max_attempts": 8},
        s3={"addressing_style": "path" if endpoint else "auto"},
    )
    return boto3.client("s3", endpoint_url=endpoint, region_name=region, config=config)


def split_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ("bucket", "some/prefix")."""
    parts = urlsplit(url)
    prefix = parts.path.strip("/")
    if parts.scheme != "s3" or not parts.netloc or not prefix:
        raise StagingError(f"{url!r} is not an s3://bucket/prefix location")
    return parts.netloc, prefix


def download_prefix(client: BaseClient, url: str, local: Path) -> int:
    """Copy every object under the s3:// `url` into `local`, keeping relative paths.

    Returns how many files were written. A key that would land outside `local` is refused.
    """
    bucket, prefix = split_s3_url(url)
    local.mkdir(parents=True, exist_ok=True)
    written = 0
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=prefix + "/"
    ):
        for item in page.get("Contents", []):
            key: str = item["Key"]
            relative = PurePosixPath(key[len(prefix) + 1 :])
            if key.endswith("/"):
                continue  # a folder marker some tools create
            if relative.is_absolute() or ".." in relative.parts or not relative.parts:
                raise StagingError(f"s3://{bucket}/{key}: refusing a key outside {url}")
            target = local.joinpath(*relative.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, key, str(target))
            written += 1
    return written


class OutcomeUploader:
    """Uploads the outcome files of an out folder whenever they have grown.

    Outcome files are only ever appended to, so an upload of the whole file replaces the
    object with a longer version of itself; a reader never sees lines disappear.
    """

    def __init__(self, client: BaseClient, out_dir: Path, url: str) -> None:
        self.client = client
        self.out_dir = out_dir
        self.bucket, self.prefix = split_s3_url(url)
        self._uploaded: dict[str, int] = {}

    def sync(self) -> int:
        """Upload the outcome files that grew since the last sync; returns how many."""
        uploaded = 0
        for name in OUTPUT_FILES:
            path = self.out_dir / name
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            if len(data) == self._uploaded.get(name, -1):
                continue
            self.client.put_object(Bucket=self.bucket, Key=f"{self.prefix}/{name}", Body=data)
            self._uploaded[name] = len(data)
            uploaded += 1
        return uploaded


def stage_out(
    client: BaseClient,
    out_dir: Path,
    url: str,
    done_url: str,
    stop: threading.Event,
    interval_s: float = DEFAULT_SYNC_INTERVAL_S,
) -> None:
    """Upload outcomes every `interval_s` until `stop` is set, then a last time, then `done_url`.

    A failed periodic upload is logged and tried again at the next tick; only the final one
    must succeed, since the runner takes the missing `done_url` for a lost upload.
    """
    uploader = OutcomeUploader(client, out_dir, url)
    while not stop.wait(interval_s):
        try:
            uploader.sync()
        except Exception as exc:  # a network blip must not end the sidecar
            log.warning("upload of outcomes to %s failed, retrying: %s", url, exc)
    uploader.sync()
    bucket, key = split_s3_url(done_url)
    client.put_object(Bucket=bucket, Key=key, Body=b"")
    log.info("outcomes of %s uploaded to %s", out_dir, url)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="osa_sdk: %(message)s")
    try:
        client = s3_client()
        if args.command == "stage-in":
            for pair in args.pairs:
                url, sep, folder = pair.partition("=")
                if not sep or not folder:
                    raise StagingError(f"{pair!r} must look like s3://bucket/prefix=/folder")
                count = download_prefix(client, url, Path(folder))
                log.info("staged %d files from %s into %s", count, url, folder)
            return 0
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        stage_out(client, args.dir, args.url, args.done, stop, args.interval)
        return 0
    except StagingError as exc:
        print(f"osa_sdk: {exc}", file=sys.stderr)
        return EXIT_CONTRACT_ERROR


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m osa_sdk.remote", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    stage_in = commands.add_parser("stage-in", help="copy s3:// prefixes into folders")
    stage_in.add_argument("pairs", nargs="+", help="s3://bucket/prefix=/local/folder")
    out = commands.add_parser("stage-out", help="upload outcome files until SIGTERM")
    out.add_argument("dir", type=Path, help="the hook's out folder")
    out.add_argument("url", help="s3://bucket/prefix to upload the outcome files to")
    out.add_argument("--done", required=True, help="s3:// object written after the last upload")
    out.add_argument("--interval", type=float, default=DEFAULT_SYNC_INTERVAL_S, help="seconds")
    return parser


if __name__ == "__main__":
    sys.exit(main())
