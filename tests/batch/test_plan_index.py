"""Planning as a stream over the plan index: manifests are the truth, the index a cache of
them that a killed plan, another plan at once, or a damaged file cannot make lie."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from osa_sdk.types import RecordRef

from osa_dagster.batch.plan import load_manifest, plan_refs, planned_partitions
from osa_dagster.batch.plan_index import INDEX_FILE, LOOKUP_CHUNK
from osa_dagster.settings import Settings
from osa_dagster.storage import ArtifactStore, BatchLayout, FileSystemStore, artifact_store
from osa_dagster.storage.layout import plan_index_prefix
from tests.conftest import REPO
from tests.fixtures.toy_convention import CONVENTIONS

TOY = CONVENTIONS[0]


def refs(count: int, start: int = 0, version: str | None = "1") -> list[RecordRef]:
    return [RecordRef(source_id=f"rec:{n:05d}", version=version) for n in range(start, count)]


def planned_records(store: ArtifactStore) -> list[tuple[str, str | None]]:
    """Every (id, version) the manifests hold, once per manifest that holds it."""
    return sorted(
        (ref.source_id, ref.version)
        for partition in planned_partitions(store, TOY.name)
        for ref in load_manifest(store, BatchLayout(TOY.name, partition)).refs
    )


def index_file(store: FileSystemStore) -> Path:
    return store.path(plan_index_prefix(TOY.name)) / INDEX_FILE


class Registry:
    """What a plan registered with the orchestrator, as the plan job does with Dagster."""

    def __init__(self) -> None:
        self.partitions: set[str] = set()

    def __call__(self, partitions: Sequence[str]) -> None:
        self.partitions.update(partitions)


@pytest.fixture
def store() -> FileSystemStore:
    store = artifact_store(Settings.from_env())
    assert isinstance(store, FileSystemStore)
    return store


def test_repeats_of_an_id_are_dropped_the_first_kept_across_lookup_chunks(store):
    stream = [*refs(LOOKUP_CHUNK + 10), *refs(5), *refs(LOOKUP_CHUNK + 12, LOOKUP_CHUNK + 8)]
    result = plan_refs(TOY, store, iter(stream), batch_size=400)
    assert result.records == LOOKUP_CHUNK + 12
    assert result.duplicate_refs == 5 + 2
    assert planned_records(store) == [(r.source_id, r.version) for r in refs(LOOKUP_CHUNK + 12)]
    # In discovery order, cut where the batch size says.
    assert list(result.records_per_batch.values()) == [400, 400, LOOKUP_CHUNK + 12 - 800]


def test_planning_twice_adds_nothing_and_a_new_version_is_planned_again(store):
    first = plan_refs(TOY, store, iter(refs(30)), batch_size=7)
    again = plan_refs(TOY, store, iter(refs(30)), batch_size=7)
    assert (again.partitions, again.records, again.already_planned) == ([], 0, 30)
    assert again.manifests_indexed == 0  # the index was up to date: no manifest was read
    revised = plan_refs(TOY, store, iter([*refs(2), *refs(5, 2, version="2")]), batch_size=7)
    assert (revised.records, revised.already_planned) == (3, 2)
    assert len(planned_records(store)) == 33
    assert set(first.partitions).isdisjoint(revised.partitions)


def test_a_plan_killed_before_indexing_is_indexed_and_registered_by_the_next(store):
    # A real SIGKILL of the planning process once its manifests are written, while the
    # registration that precedes the index's commit is under way.
    killed = (
        "import os, signal\n"
        "from osa_sdk.types import RecordRef\n"
        "from osa_dagster.batch.plan import plan_refs\n"
        "from osa_dagster.settings import Settings\n"
        "from osa_dagster.storage import artifact_store\n"
        "from tests.fixtures.toy_convention import CONVENTIONS\n"
        "refs = (RecordRef(source_id=f'rec:{n:05d}', version='1') for n in range(25))\n"
        "def die(partitions):\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "plan_refs(CONVENTIONS[0], artifact_store(Settings.from_env()), refs, batch_size=10,\n"
        "          register=die)\n"
    )
    process = subprocess.run([sys.executable, "-c", killed], cwd=REPO, capture_output=True)
    assert process.returncode == -9, process.stderr.decode()
    written = planned_partitions(store, TOY.name)
    assert len(written) == 3
    assert index_file(store).exists()  # created, its rows of the three never committed

    registry = Registry()
    result = plan_refs(TOY, store, iter(refs(40)), batch_size=10, register=registry)
    assert result.manifests_indexed == 3
    assert registry.partitions == set(written) | set(result.partitions)
    assert (result.records, result.already_planned) == (15, 25)
    assert planned_records(store) == [(r.source_id, r.version) for r in refs(40)]


def test_an_index_copy_that_lost_to_another_plans_upload_misses_nothing(store):
    # On S3 the last plan to end uploads its copy of the index; another plan's batches
    # are then in manifests only. Played here by putting back the copy from before them.
    plan_refs(TOY, store, iter(refs(20)), batch_size=10)
    before = index_file(store).read_bytes()
    plan_refs(TOY, store, iter(refs(35, 20)), batch_size=10)
    index_file(store).write_bytes(before)

    registry = Registry()
    again = plan_refs(TOY, store, iter(refs(35)), batch_size=10, register=registry)
    assert (again.records, again.already_planned, again.manifests_indexed) == (0, 35, 2)
    assert len(registry.partitions) == 2
    assert planned_records(store) == [(r.source_id, r.version) for r in refs(35)]


def test_two_plans_at_once_share_the_index(store):
    script = (
        "import sys\n"
        "from osa_sdk.types import RecordRef\n"
        "from osa_dagster.batch.plan import plan_refs\n"
        "from osa_dagster.settings import Settings\n"
        "from osa_dagster.storage import artifact_store\n"
        "from tests.fixtures.toy_convention import CONVENTIONS\n"
        "start, stop = int(sys.argv[1]), int(sys.argv[2])\n"
        "refs = (RecordRef(source_id=f'rec:{n:05d}', version='1') for n in range(start, stop))\n"
        "plan_refs(CONVENTIONS[0], artifact_store(Settings.from_env()), refs, batch_size=100)\n"
    )
    plans = [
        subprocess.Popen([sys.executable, "-c", script, str(start), str(start + 3000)], cwd=REPO)
        for start in (0, 3000)
    ]
    assert [plan.wait() for plan in plans] == [0, 0]
    again = plan_refs(TOY, store, iter(refs(6000)), batch_size=100)
    assert (again.records, again.already_planned, again.manifests_indexed) == (0, 6000, 0)


@pytest.mark.parametrize("damage", ["missing", "garbage", "cut short", "another format"])
def test_a_missing_or_unreadable_index_is_built_again_from_the_manifests(store, damage, caplog):
    first = plan_refs(TOY, store, iter(refs(300)), batch_size=50)
    path = index_file(store)
    if damage == "missing":
        shutil.rmtree(path.parent)
    elif damage == "garbage":
        path.write_bytes(b"not an index" * 1000)
    elif damage == "cut short":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        import sqlite3

        with sqlite3.connect(path) as db:
            db.execute("UPDATE meta SET format = 0")
    registry = Registry()
    with caplog.at_level(logging.WARNING):
        again = plan_refs(TOY, store, iter(refs(300)), batch_size=50, register=registry)
    assert (again.records, again.already_planned) == (0, 300)
    assert again.manifests_indexed == len(first.partitions) == 6
    assert registry.partitions == set(first.partitions)
    told = [r.getMessage() for r in caplog.records if "plan index" in r.getMessage()]
    assert len(told) == (0 if damage == "missing" else 1)
    assert all(str(path) in line and "built again" in line for line in told)


def test_a_manifest_removed_or_cut_short_has_its_records_planned_again(store, caplog):
    first = plan_refs(TOY, store, iter(refs(30)), batch_size=10)
    gone, cut, kept = (BatchLayout(TOY.name, key).manifest for key in first.partitions)
    store.delete_prefix(gone)
    store.write_bytes(cut, store.read_bytes(cut)[:100])
    with caplog.at_level(logging.WARNING):
        again = plan_refs(TOY, store, iter(refs(30)), batch_size=10)
    # The same members give the same partitions: the cut manifest is written anew.
    assert (again.records, again.already_planned) == (20, 10)
    assert again.new_partitions == first.partitions[:2]
    assert [r.getMessage() for r in caplog.records if store.describe(cut) in r.getMessage()]
    assert store.exists(kept)
    assert planned_records(store) == [(r.source_id, r.version) for r in refs(30)]


def test_frozen_batches_are_registered_while_discover_still_runs(store, monkeypatch):
    # A slow upstream: every batch is registered (and indexed) as soon as it freezes.
    monkeypatch.setattr("osa_dagster.batch.plan.COMMIT_EVERY_S", 0.0)
    registry = Registry()
    registered_midway: list[str] = []

    def discovery():
        yield from refs(LOOKUP_CHUNK)
        registered_midway.extend(registry.partitions)
        yield from refs(LOOKUP_CHUNK + 50, LOOKUP_CHUNK)

    result = plan_refs(TOY, store, discovery(), batch_size=100, register=registry)
    assert sorted(registered_midway) == sorted(result.partitions[: LOOKUP_CHUNK // 100])
    assert registry.partitions == set(result.partitions)
