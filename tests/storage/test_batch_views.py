"""Loading a batch in a notebook: `defs.load_asset_value` through the batch views IO manager.

The toy convention's graph runs with its artifacts on the filesystem and on a real S3
server (SeaweedFS); then, as a person in a notebook would, the test loads the batch's raw
records, a hook's outcomes and the published records by asset key and partition, and
checks them against the checkpoint in the store and the rows of the records database.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import dagster as dg
import pytest
from osa_sdk.types import IngesterRecord, OutcomeStatus
from sqlalchemy import select

from osa_dagster.batch.hooks import checkpoint_key
from osa_dagster.batch.views import HookOutcomes, PublishedRecords, RawRecords
from osa_dagster.definitions import build_definitions
from osa_dagster.records import Feature, Record, RecordsDatabase, database_url
from osa_dagster.settings import Settings
from osa_dagster.storage.layout import BatchLayout
from osa_dagster.storage.store import ArtifactStore, artifact_store
from tests.fixtures.toy_convention import CONVENTIONS, TOY_IDS

from .servers import S3Endpoint

TOY = next(c for c in CONVENTIONS if c.name == "toy")

HOOK_OUTCOMES = dg.AssetKey(["toy", "hook_outcomes", "check_size"])


@pytest.fixture(params=["filesystem", "seaweedfs"])
def artifacts_on(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, toy_conventions):
    if request.param == "seaweedfs":
        seaweedfs: S3Endpoint = request.getfixturevalue("seaweedfs")
        prefix = f"views/{uuid.uuid4().hex}"
        monkeypatch.setenv("OSA_STORAGE", f"s3://{seaweedfs.bucket}/{prefix}")
        monkeypatch.setenv("OSA_S3_ENDPOINT_URL", seaweedfs.url)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", seaweedfs.access_key)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", seaweedfs.secret_key)
    return request.param


def test_a_notebook_loads_a_batch_by_asset_key(artifacts_on, tmp_path: Path) -> None:
    defs = build_definitions()
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        planned = defs.resolve_job_def("toy_plan").execute_in_process(
            run_config={"ops": {"toy_plan_batches": {"config": {"limit": 5}}}},
            instance=instance,
        )
        assert planned.success
        [key] = instance.get_dynamic_partitions("toy_batches")
        ingest = defs.resolve_job_def("toy_ingest")
        assert ingest.execute_in_process(partition_key=key, instance=instance).success

        # What a notebook does, with the same definitions and instance.
        raw = defs.load_asset_value(
            dg.AssetKey(["toy", "raw_batch"]), partition_key=key, instance=instance
        )
        outcomes = defs.load_asset_value(HOOK_OUTCOMES, partition_key=key, instance=instance)
        published = defs.load_asset_value(
            dg.AssetKey(["toy", "published_records"]), partition_key=key, instance=instance
        )
        # Each batch's materialisation points at its artifacts.
        uris = {
            name: instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=asset_key, asset_partitions=[key]), limit=1
            )
            .records[0]
            .asset_materialization.metadata["dagster/uri"]
            .value
            for name, asset_key in [
                ("raw", dg.AssetKey(["toy", "raw_batch"])),
                ("hook", HOOK_OUTCOMES),
            ]
        }

    assert isinstance(raw, RawRecords)
    assert isinstance(outcomes, HookOutcomes)
    assert isinstance(published, PublishedRecords)
    store = artifact_store(Settings.from_env())
    assert type(store).__name__ == ("S3Store" if artifacts_on == "seaweedfs" else "FileSystemStore")
    assert outcomes.location.startswith("s3://" if artifacts_on == "seaweedfs" else "/")
    layout = BatchLayout("toy", key)
    expected = {
        "raw": store.describe(layout.raw),
        "hook": store.describe(checkpoint_key(TOY, key, "check_size")),
    }
    if artifacts_on == "filesystem":
        expected = {name: Path(where).as_uri() for name, where in expected.items()}
    assert uris == expected

    records = list(raw)
    assert [r.source_id for r in records] == TOY_IDS[:5]
    assert all(isinstance(r, IngesterRecord) for r in records)

    # The hook's outcomes are the checkpoint the engine persisted in the store.
    persisted = json.loads(store.read_bytes(checkpoint_key(TOY, key, "check_size")))["outcomes"]
    loaded = dict(outcomes)
    assert loaded.keys() == persisted.keys() == set(TOY_IDS[:5])
    assert {i: o.status.value for i, o in loaded.items()} == {
        i: o["status"] for i, o in persisted.items()
    }
    [rejected] = outcomes.with_status(OutcomeStatus.REJECTED).items()
    assert rejected == (TOY_IDS[4], loaded[TOY_IDS[4]])
    assert rejected[1].reason == "5000 bytes is a multiple of 5000"

    # The published records and their features are the rows of the records database.
    with RecordsDatabase(database_url(Settings.from_env())).session() as session:
        rows = session.execute(
            select(Record.source_id, Record.srn, Feature.data)
            .join(Feature, Feature.record_srn == Record.srn)
            .where(Record.partition == key)
        ).all()
    expected = {source_id: (srn, [data]) for source_id, srn, data in rows}
    assert {r.source_id: (r.srn, r.features["check_size"]) for r in published} == expected
    assert sorted(expected) == sorted(TOY_IDS[:4])
    assert [r.metadata["n"] for r in published] == [1, 2, 3, 4]


def test_views_read_nothing_until_iterated(tmp_path: Path) -> None:
    from osa_dagster.storage.store import FileSystemStore

    layout = BatchLayout("toy", "no-such-batch")
    view = RawRecords(FileSystemStore(tmp_path), layout)  # no records.jsonl: nothing read yet
    with pytest.raises(FileNotFoundError):
        next(iter(view))
    with pytest.raises(FileNotFoundError, match="has no checkpoint"):
        HookOutcomes(FileSystemStore(tmp_path), layout, "check_size", "1").checkpoint()


def test_iter_lines_streams_what_read_bytes_reads(store: ArtifactStore) -> None:
    lines = [f"line {n} ".encode() + b"x" * (n % 700) for n in range(5000)]
    store.write_bytes("lines.jsonl", b"\n".join(lines) + b"\n")
    streamed = store.iter_lines("lines.jsonl")
    assert next(streamed) == lines[0]
    assert [lines[0], *streamed] == lines
    with pytest.raises(FileNotFoundError):
        list(store.iter_lines("missing.jsonl"))
