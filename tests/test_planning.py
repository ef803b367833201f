from datetime import UTC, datetime

import pytest

from osa_dagster.batch import BatchInputError
from osa_dagster.batch.fetch import fetch_raw_batch, read_raw_records
from osa_dagster.batch.plan import load_manifest, plan_ingest, planned_partitions
from osa_dagster.storage import BatchLayout, store_from_env
from tests.fixtures.toy_convention import CONVENTIONS, TOY_IDS

TOY = CONVENTIONS[0]


def test_limit_is_exact_and_counts_records_not_batches():
    store = store_from_env()
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
    store = store_from_env()
    first = plan_ingest(TOY, store, batch_size=5, since=datetime(2024, 1, 1, tzinfo=UTC))
    manifest_bytes = {k: store.read_bytes(BatchLayout("toy", k).manifest) for k in first.partitions}
    again = plan_ingest(TOY, store, batch_size=5)
    assert again.partitions == first.partitions
    assert again.new_partitions == []
    assert first.new_partitions == first.partitions
    assert {
        k: store.read_bytes(BatchLayout("toy", k).manifest) for k in first.partitions
    } == manifest_bytes
    assert sorted(planned_partitions(store, "toy")) == sorted(first.partitions)


def test_other_batch_size_gives_other_partitions():
    store = store_from_env()
    a = plan_ingest(TOY, store, batch_size=5)
    b = plan_ingest(TOY, store, batch_size=7)
    assert not set(a.partitions) & set(b.partitions)


@pytest.mark.parametrize(
    ("limit", "batch_size", "message"), [(0, 5, "limit"), (-3, 5, "limit"), (5, 0, "batch_size")]
)
def test_bad_plan_arguments_fail_before_any_work(limit, batch_size, message):
    store = store_from_env()
    with pytest.raises(ValueError, match=message):
        plan_ingest(TOY, store, limit=limit, batch_size=batch_size)
    assert planned_partitions(store, "toy") == []


def test_unknown_partition_is_a_clear_error():
    with pytest.raises(BatchInputError, match="no manifest"):
        fetch_raw_batch(TOY, store_from_env(), "no-such-batch")


def test_oversized_records_are_skipped_and_counted():
    convention = TOY.model_copy(update={"ingester_config": {"oversize": [TOY_IDS[1]]}})
    store = store_from_env()
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
    store = store_from_env()
    key = plan_ingest(TOY, store, limit=3, batch_size=3).partitions[0]
    fetch_raw_batch(TOY, store, key)
    layout = BatchLayout("toy", key)
    lines = store.read_bytes(layout.raw_records).decode().splitlines()
    lines[1] = lines[0] if bad_line is None else bad_line
    store.write_bytes(layout.raw_records, ("\n".join(lines) + "\n").encode())
    with pytest.raises(BatchInputError, match=message) as error:
        read_raw_records(store, layout)
    assert key in str(error.value)
