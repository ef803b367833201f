"""The orchestrating process's peak memory does not grow with the size of the files it moves.

A child Python process runs one batch through the pipeline steps with OSA_STORAGE on a
SeaweedFS server: plan, raw_batch (the ingester streams generated files through
FetchContext.open_file; the store uploads them), the hook (LocalRunner starts it over
files the store staged from S3; it reads every file in chunks and checks its digest),
publish and features. At the end the child reports its own peak RSS (ru_maxrss of
RUSAGE_SELF: the hook processes are its children and are not counted, as they are not
the orchestrator).

The same child runs three times: a tiny batch (the baseline: interpreter, imports, boto3,
SQLite), 8 x 60 MB (480 MB) and 8 x 120 MB (960 MB). The bound does not depend on the
file sizes, and doubling the files must leave the peak where it was.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # the child process imports this module: it must not pay for moto
    from .servers import S3Endpoint

REPO = Path(__file__).resolve().parents[2]
CHILD_MODULE = "tests.storage.test_memory_bound"
RECORDS = 8
TINY_MB, BIG_MB = 0.01, 60.0
# What moving files may add to the baseline, whatever their size: s3transfer's threads
# (10 concurrent requests of 8 MB parts, at most 100 queued 256 kB writes per download)
# and the malloc arenas they leave behind. Measured (2 CPUs): +20 MB after raw_batch's
# upload, +55 to +75 MB once the hook's files were staged, alike for files of 20, 60 and
# 120 MB. Holding the batch's files (480 MB) would be far above.
HEADROOM_MB = 100
# How much more the peak may be after moving twice the data (480 MB more). Runs of the
# same child differ by up to ~20 MB (which threads' arenas the downloads happened to use);
# a process that held even one whole file at a time would be 60 MB higher. One-sided: a
# peak that happens to be lower with larger files is no growth.
FLAT_MB = 30


def _child_env(endpoint: S3Endpoint, prefix: str, tmp_path: Path) -> dict[str, str]:
    (tmp_path / "tmp").mkdir(parents=True, exist_ok=True)
    return {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(REPO),  # the hook processes import the convention module too
        "OSA_STORAGE": f"s3://{endpoint.bucket}/{prefix}",
        "OSA_S3_ENDPOINT_URL": endpoint.url,
        "AWS_ACCESS_KEY_ID": endpoint.access_key,
        "AWS_SECRET_ACCESS_KEY": endpoint.secret_key,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "OSA_DATA_DIR": str(tmp_path / "data"),  # the records database (SQLite)
        "TMPDIR": str(tmp_path / "tmp"),  # staging folders: on the test's own disk space
    }


def _run_child(endpoint: S3Endpoint, tmp_path: Path, file_mb: float) -> dict[str, Any]:
    prefix = f"memory/{uuid.uuid4().hex}"
    store = endpoint.store(prefix)
    try:
        done = subprocess.run(
            [sys.executable, "-m", CHILD_MODULE, str(RECORDS), str(file_mb)],
            env=_child_env(endpoint, prefix, tmp_path / f"child-{file_mb:g}"),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads(done.stdout.strip().splitlines()[-1])
        # The files really went through S3, whole: the objects are there with their sizes.
        sizes = [
            item["Size"]
            for page in store.client.get_paginator("list_objects_v2").paginate(
                Bucket=endpoint.bucket, Prefix=f"{prefix}/batches/big_files/"
            )
            for item in page.get("Contents", [])
            if item["Key"].endswith("/data.bin")
        ]
        report["bytes_in_s3"] = sum(sizes)
        report["files_in_s3"] = len(sizes)
        return report
    finally:
        # The server lives for the whole session: give its disk back.
        store.delete_prefix("batches")
        store.delete_prefix("manifests")


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_file_sizes(seaweedfs: S3Endpoint, tmp_path: Path):
    runs = {mb: _run_child(seaweedfs, tmp_path, mb) for mb in (TINY_MB, BIG_MB, 2 * BIG_MB)}
    # Peaks after each step too: a failure then says which step grew.
    figures = {f"{mb:g} MB x {RECORDS}": r["peak_after"] for mb, r in runs.items()}
    print(f"peak RSS (MB) after each step: {figures}")  # shown with -s or -rP

    for file_mb, report in runs.items():
        # Every record passed the digest check, so every byte survived staging both ways.
        assert report["published"] == RECORDS, report
        assert report["feature_rows"] == RECORDS, report
        assert report["files_in_s3"] == RECORDS, report
        assert report["bytes_in_s3"] == RECORDS * round(file_mb * 1_000_000), report

    baseline = runs[TINY_MB]["peak_rss_mb"]
    big = runs[BIG_MB]["peak_rss_mb"]
    double = runs[2 * BIG_MB]["peak_rss_mb"]
    # Below a bound set by the baseline alone, far below what the batch's files need (480 MB).
    assert big < baseline + HEADROOM_MB, figures
    assert double < baseline + HEADROOM_MB, figures
    # Flat: 480 MB more data moved, the peak stays put.
    assert double < big + FLAT_MB, figures


# --- the child ------------------------------------------------------------------------------


def _child(records: int, file_mb: float) -> dict[str, Any]:
    """One batch through every step, as the assets run them; imports here, not at the top,
    so that the parent (pytest) does not import what only the child needs."""
    from osa_dagster.batch.fetch import fetch_raw_batch
    from osa_dagster.batch.hooks import run_batch_hook
    from osa_dagster.batch.plan import plan_ingest
    from osa_dagster.batch.publish import publish_batch, store_batch_features
    from osa_dagster.engine import LocalRunner
    from osa_dagster.records import RecordsDatabase, database_url
    from osa_dagster.settings import Settings
    from osa_dagster.storage import artifact_store
    from osa_dagster.storage.s3 import S3Store
    from tests.fixtures.big_files_convention import CONVENTIONS, sized

    [big_files] = [c for c in CONVENTIONS if c.name == "big_files"]
    convention = sized(big_files, records=records, file_mb=file_mb)
    store = artifact_store(Settings.from_env())
    # Without OSA_STORAGE the filesystem store would be measured instead: fail, not pass.
    assert isinstance(store, S3Store), store
    db = RecordsDatabase(database_url(Settings.from_env()))

    peak_after: dict[str, float] = {}

    def peak(step: str) -> None:
        # ru_maxrss is in kB on Linux; the hook processes are children, not counted here.
        peak_after[step] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)

    peak("imports")
    [partition] = plan_ingest(convention, store).partitions
    peak("plan")
    raw = fetch_raw_batch(convention, store, partition)
    peak("raw_batch")
    progress = run_batch_hook(
        convention, "file_digest", store, partition, LocalRunner.from_settings(Settings.from_env())
    )
    assert progress.checkpoint.complete, progress
    peak("hook")
    published = publish_batch(convention, store, db, partition, domain="memory-test")
    peak("published")
    features = store_batch_features(convention, store, db, partition)
    peak("features")
    return {
        "peak_rss_mb": peak_after["features"],
        "peak_after": peak_after,
        "fetched": len(raw.records),
        "published": len(published.passed_all),
        "rejections": [v.outcome for v in published.rejections],
        "feature_rows": features.rows_per_hook["file_digest"],
    }


if __name__ == "__main__":
    print(json.dumps(_child(int(sys.argv[1]), float(sys.argv[2]))))
