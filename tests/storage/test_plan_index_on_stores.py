"""The plan index on every store: on S3 it is staged in and uploaded when the plan ends."""

from __future__ import annotations

import pytest
from osa_sdk.types import RecordRef

from osa_dagster.batch.plan import plan_refs
from osa_dagster.batch.plan_index import INDEX_FILE, LOOKUP_CHUNK
from osa_dagster.storage import ArtifactStore
from osa_dagster.storage.layout import plan_index_prefix
from tests.fixtures.toy_convention import CONVENTIONS

TOY = CONVENTIONS[0]
REFS = [RecordRef(source_id=f"rec:{n:03d}", version="1") for n in range(25)]


def test_the_index_is_kept_in_the_store_and_rebuilt_from_it(store: ArtifactStore):
    first = plan_refs(TOY, store, iter(REFS), batch_size=10)
    assert list(store.list_keys(plan_index_prefix(TOY.name))) == [
        f"{plan_index_prefix(TOY.name)}/{INDEX_FILE}"
    ]
    again = plan_refs(TOY, store, iter(REFS), batch_size=10)
    # Read from the index the first plan stored: no manifest was read again.
    assert (again.records, again.already_planned, again.manifests_indexed) == (0, 25, 0)

    store.delete_prefix(plan_index_prefix(TOY.name))
    rebuilt = plan_refs(TOY, store, iter(REFS), batch_size=10)
    assert (rebuilt.records, rebuilt.manifests_indexed) == (0, len(first.partitions))


def test_a_plan_that_fails_midway_leaves_its_manifests_to_the_next(store: ArtifactStore):
    many = [RecordRef(source_id=f"rec:{n:04d}", version="1") for n in range(1600)]
    plan_refs(TOY, store, iter(many[:500]), batch_size=500)

    def broken_discovery():
        yield from many[500 : 500 + LOOKUP_CHUNK]
        raise RuntimeError("upstream went away")

    # Its full batches are written; their index rows are rolled back (a filesystem store)
    # or never uploaded (S3).
    with pytest.raises(RuntimeError, match="upstream went away"):
        plan_refs(TOY, store, broken_discovery(), batch_size=500)
    after = plan_refs(TOY, store, iter(many), batch_size=500)
    frozen = LOOKUP_CHUNK // 500
    assert (after.manifests_indexed, after.already_planned) == (frozen, 500 + 500 * frozen)
    assert after.records == 1600 - after.already_planned
