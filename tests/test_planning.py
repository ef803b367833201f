from datetime import UTC, datetime

import pytest
from osa_sdk.types import RecordRef

from osa_dagster.batch import BatchInputError
from osa_dagster.batch.fetch import fetch_raw_batch, read_ingest_report, read_raw_records
from osa_dagster.batch.plan import load_manifest, plan_ingest, plan_refs, planned_partitions
from osa_dagster.settings import Settings
from osa_dagster.storage import BatchLayout, Manifest, artifact_store
from tests.fixtures.toy_convention import CONVENTIONS, TOY_IDS

TOY = CONVENTIONS[0]


def test_limit_is_exact_and_counts_records_not_batches():
    store = artifact_store(Settings.from_env())
    result = plan_ingest(TOY, store, limit=12, batch_size=5)
    assert result.records == 12
    sizes = [len(load_manifest(store, BatchLayout("toy", k)).refs) for k in result.partitions]
    assert sizes == [5, 5, 2]
    planned = [
        r.source_id
        for k in result.partitions
        for r in load_manifest(store, BatchLayout("toy", k)).refs
    ]
    assert planned == TOY_IDS[:12]


def test_planning_twice_adds_nothing_and_keeps_manifests_frozen():
    store = artifact_store(Settings.from_env())
    first = plan_ingest(TOY, store, batch_size=5, since=datetime(2024, 1, 1, tzinfo=UTC))
    manifest_bytes = {k: store.read_bytes(BatchLayout("toy", k).manifest) for k in first.partitions}
    again = plan_ingest(TOY, store, batch_size=5)
    assert (again.partitions, again.records, again.already_planned) == ([], 0, len(TOY_IDS))
    assert first.new_partitions == first.partitions
    # Asked to, it batches them again: the same batches, their manifests untouched.
    replanned = plan_ingest(TOY, store, batch_size=5, replan=True)
    assert replanned.partitions == first.partitions
    assert replanned.new_partitions == []
    assert {
        k: store.read_bytes(BatchLayout("toy", k).manifest) for k in first.partitions
    } == manifest_bytes
    assert sorted(planned_partitions(store, "toy")) == sorted(first.partitions)


def test_another_batch_size_plans_nothing_new_unless_asked_to_replan():
    store = artifact_store(Settings.from_env())
    a = plan_ingest(TOY, store, batch_size=5)
    assert plan_ingest(TOY, store, batch_size=7).partitions == []
    b = plan_ingest(TOY, store, batch_size=7, replan=True)
    assert b.partitions and not set(a.partitions) & set(b.partitions)


def test_only_records_new_or_at_a_new_version_are_planned():
    store = artifact_store(Settings.from_env())
    plan_refs(TOY, store, [RecordRef(source_id="a", version="1"), RecordRef(source_id="b")])
    again = plan_refs(
        TOY,
        store,
        [
            RecordRef(source_id="a", version="2"),
            RecordRef(source_id="b"),
            RecordRef(source_id="c", version="1"),
        ],
    )
    [key] = again.partitions
    planned = load_manifest(store, BatchLayout("toy", key)).refs
    assert [(r.source_id, r.version) for r in planned] == [("a", "2"), ("c", "1")]
    assert again.already_planned == 1


def test_a_truncated_manifest_fails_naming_it_and_planning_again_rewrites_it():
    store = artifact_store(Settings.from_env())
    [key] = plan_ingest(TOY, store, limit=5, batch_size=5).partitions
    layout = BatchLayout("toy", key)
    intact = store.read_bytes(layout.manifest)
    store.write_bytes(layout.manifest, intact[: len(intact) // 2])

    with pytest.raises(BatchInputError) as error:
        fetch_raw_batch(TOY, store, key)
    [line] = str(error.value).splitlines()
    assert key in line and store.describe(layout.manifest) in line
    assert "Invalid JSON: EOF" in line and "osa plan toy --replan" in line

    # What the message says to do: the same records and batch size give the same partition.
    assert plan_ingest(TOY, store, limit=5, batch_size=5, replan=True).partitions == [key]
    assert load_manifest(store, layout).refs == Manifest.model_validate_json(intact).refs
    assert len(fetch_raw_batch(TOY, store, key).records) == 5


@pytest.mark.parametrize(
    ("limit", "batch_size", "message"), [(0, 5, "limit"), (-3, 5, "limit"), (5, 0, "batch_size")]
)
def test_bad_plan_arguments_fail_before_any_work(limit, batch_size, message):
    store = artifact_store(Settings.from_env())
    with pytest.raises(ValueError, match=message):
        plan_ingest(TOY, store, limit=limit, batch_size=batch_size)
    assert planned_partitions(store, "toy") == []


def test_unknown_partition_is_a_clear_error():
    with pytest.raises(BatchInputError, match="no manifest"):
        fetch_raw_batch(TOY, artifact_store(Settings.from_env()), "no-such-batch")


def test_oversized_records_are_skipped_and_counted():
    convention = TOY.model_copy(update={"ingester_config": {"oversize": [TOY_IDS[1]]}})
    store = artifact_store(Settings.from_env())
    key = plan_ingest(convention, store, limit=5, batch_size=5).partitions[0]
    summary = fetch_raw_batch(convention, store, key)
    assert [s.source_id for s in summary.report.skipped_oversize] == [TOY_IDS[1]]
    assert [r.source_id for r in summary.records] == [TOY_IDS[0], *TOY_IDS[2:5]]


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("{not json", "line 2"),
        ('{"metadata": {}}', "line 2: source_id"),
        (None, "line 2: duplicate id"),
    ],
)
def test_malformed_raw_records_name_the_batch_and_line(bad_line, message):
    store = artifact_store(Settings.from_env())
    key = plan_ingest(TOY, store, limit=3, batch_size=3).partitions[0]
    fetch_raw_batch(TOY, store, key)
    layout = BatchLayout("toy", key)
    lines = store.read_bytes(layout.raw_records).decode().splitlines()
    lines[1] = lines[0] if bad_line is None else bad_line
    store.write_bytes(layout.raw_records, ("\n".join(lines) + "\n").encode())
    with pytest.raises(BatchInputError, match=message) as error:
        read_raw_records(store, layout)
    assert key in str(error.value)


def test_a_truncated_ingest_report_names_the_batch_the_file_and_what_to_do():
    store = artifact_store(Settings.from_env())
    [key] = plan_ingest(TOY, store, limit=3, batch_size=3).partitions
    fetch_raw_batch(TOY, store, key)
    layout = BatchLayout("toy", key)
    store.write_bytes(layout.ingest_report, store.read_bytes(layout.ingest_report)[:10])

    with pytest.raises(BatchInputError) as error:
        read_ingest_report(store, layout)
    [line] = str(error.value).splitlines()
    assert key in line and store.describe(layout.ingest_report) in line
    assert "Invalid JSON" in line and "materialise its raw_batch again" in line
