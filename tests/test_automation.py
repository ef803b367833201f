"""The weekly plan schedule and the upstream watch, evaluated with Dagster's own helpers."""

from __future__ import annotations

import os
import shutil
from datetime import datetime
from pathlib import Path

import dagster as dg
import pytest

from osa_dagster.batch.plan import plan_ingest
from osa_dagster.conventions.pdb.ingester import DEFAULT_MIRROR, mirror_entries
from osa_dagster.conventions.registry import load_conventions
from osa_dagster.definitions import build_definitions
from osa_dagster.defs.assets import batch_partitions
from osa_dagster.defs.automation import convention_automation
from osa_dagster.defs.batch_sensors import contiguous_chunks
from osa_dagster.defs.resources import default_resources
from osa_dagster.engine.runners import sandbox as sandbox_module
from osa_dagster.settings import Settings
from osa_dagster.storage import artifact_store
from osa_dagster.storage.layout import plan_index_prefix

pytestmark = pytest.mark.slow


def copy_entry(source: Path, mirror: Path, pdb_id: str) -> Path:
    target = mirror / "mmCIF" / pdb_id[1:3] / f"{pdb_id}.cif.gz"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


@pytest.fixture
def small_mirror(tmp_path: Path) -> Path:
    mirror = tmp_path / "mirror"
    for pdb_id, path in mirror_entries(DEFAULT_MIRROR)[:3]:
        copy_entry(path, mirror, pdb_id.lower())
        # Old upstream times, as `rsync -t` keeps them.
        os.utime(mirror / "mmCIF" / pdb_id.lower()[1:3] / path.name, (1e9, 1e9))
    return mirror


@pytest.fixture
def watch(small_mirror: Path):
    convention = load_conventions(Settings.from_env())["pdb"].model_copy(
        update={"ingester_config": {"mirror": str(small_mirror)}}
    )
    partitions = batch_partitions(convention)
    (sensor,) = convention_automation(convention, partitions, Settings.from_env()).sensors or []
    return sensor


def tick(sensor: dg.SensorDefinition, instance: dg.DagsterInstance, cursor: str | None):
    context = dg.build_sensor_context(
        instance=instance,
        cursor=cursor,
        resources={key: default_resources()[key] for key in ("artifact_store", "records_db")},
    )
    return sensor(context)


def test_the_watch_plans_each_upstream_change_once(watch, small_mirror):
    with dg.instance_for_test() as instance:
        first = tick(watch, instance, None)
        # The first look starts the watch; the records already there are the plan job's.
        assert first.run_requests == [] and first.skip_reason
        assert tick(watch, instance, first.cursor).run_requests == []

        new_entry = copy_entry(next(small_mirror.rglob("*.cif.gz")), small_mirror, "9zz9")
        second = tick(watch, instance, first.cursor)
        (added,) = second.dynamic_partitions_requests
        (planned,) = added.partition_keys
        assert planned.startswith("9ZZ9")
        # The watch plans; the new-batches sensor requests the run, so there is one only.
        assert second.run_requests == []

        # Seen again inside the overlap window, but unchanged: not planned twice.
        third = tick(watch, instance, second.cursor)
        assert third.run_requests == [] and third.skip_reason

        # Revised upstream (a new mtime): planned again, as a new partition.
        os.utime(new_entry, (2e9, 2e9))
        fourth = tick(watch, instance, third.cursor)
        (again,) = fourth.dynamic_partitions_requests[0].partition_keys
        assert again.startswith("9ZZ9") and again != planned


def test_the_weekly_plan_asks_for_what_changed_since_the_last_successful_plan():
    with dg.instance_for_test() as instance:
        defs = build_definitions()
        schedule = defs.resolve_schedule_def("pdb_weekly_plan")
        assert schedule.cron_schedule == "0 3 * * 1"
        first = schedule.evaluate_tick(dg.build_schedule_context(instance=instance))
        (request,) = first.run_requests
        assert request.run_config == {"ops": {"pdb_plan_batches": {"config": {}}}}

        plan = defs.resolve_job_def("pdb_plan")
        result = plan.execute_in_process(run_config=request.run_config, instance=instance)
        assert result.success
        assert len(instance.get_dynamic_partitions("pdb_batches")) > 0
        started = instance.get_run_record_by_id(result.run_id).start_time

        second = schedule.evaluate_tick(dg.build_schedule_context(instance=instance))
        (request,) = second.run_requests
        since = request.run_config["ops"]["pdb_plan_batches"]["config"]["since"]
        assert datetime.fromisoformat(since).timestamp() == pytest.approx(started, abs=1e-3)

        # Nothing in the mirror changed since that plan: the second plan adds nothing.
        before = instance.get_dynamic_partitions("pdb_batches")
        replan = plan.execute_in_process(run_config=request.run_config, instance=instance)
        (output,) = [e for e in replan.all_events if e.is_successful_output]
        assert output.step_output_data.metadata["records"].value == 0
        assert instance.get_dynamic_partitions("pdb_batches") == before


def test_new_batches_are_requested_in_ranges_that_skip_done_partitions(monkeypatch):
    monkeypatch.setenv("OSA_PARTITIONS_PER_RUN", "2")
    with dg.instance_for_test() as instance:
        defs = build_definitions()
        keys = [f"b{n}" for n in range(6)]
        instance.add_dynamic_partitions("pdb_batches", keys)
        instance.report_runless_asset_event(
            dg.AssetMaterialization(asset_key=["pdb", "features"], partition="b2")
        )
        sensor = defs.resolve_sensor_def("pdb_new_batches")
        result = sensor(dg.build_sensor_context(instance=instance))
        ranges = [
            (r.tags.get("dagster/asset_partition_range_start"), r.partition_key)
            for r in result.run_requests
        ]
        # b2 is done: no run covers it, so b0-b1, then b3-b4, then b5 alone.
        assert [r.run_key for r in result.run_requests] == ["b0...b1", "b3...b4", "b5"]
        assert ranges[-1] == (None, "b5")
        assert result.cursor == "6"


def test_new_batches_wait_while_their_hooks_could_not_be_sandboxed(tmp_path, monkeypatch):
    no_tools = tmp_path / "no-tools"
    no_tools.mkdir()
    monkeypatch.setenv("PATH", str(no_tools))
    sandbox_module._unavailable_reason.cache_clear()
    try:
        with dg.instance_for_test() as instance:
            instance.add_dynamic_partitions("pdb_batches", ["b0"])
            sensor = build_definitions().resolve_sensor_def("pdb_new_batches")
            result = sensor(dg.build_sensor_context(instance=instance, cursor="0"))
    finally:
        sandbox_module._unavailable_reason.cache_clear()
    assert isinstance(result, dg.SkipReason)
    assert result.skip_message.startswith("OSA_HOOK_SANDBOX=on, but hooks cannot be sandboxed")
    # Nothing requested, the cursor untouched: b0 is requested once hooks can run.


def test_contiguous_chunks_never_span_a_skipped_key():
    keys = list("abcdefg")
    assert contiguous_chunks(keys, {"c", "d"}, 2) == [["a", "b"], ["e", "f"], ["g"]]
    assert contiguous_chunks(keys, set(), 20) == [keys]
    assert contiguous_chunks(keys, set(keys), 3) == []


def test_the_plan_job_registers_the_batches_of_manifests_its_index_had_not_read():
    # Manifests no Dagster instance was told of, and no index of them: as a plan killed
    # between writing its manifests and registering them leaves the store.
    convention = load_conventions(Settings.from_env())["pdb"]
    store = artifact_store(Settings.from_env())
    left = plan_ingest(convention, store, limit=6, batch_size=3).partitions
    store.delete_prefix(plan_index_prefix(convention.name))
    with dg.instance_for_test() as instance:
        plan = build_definitions().resolve_job_def("pdb_plan")
        config = {"ops": {"pdb_plan_batches": {"config": {"limit": 6, "batch_size": 3}}}}
        result = plan.execute_in_process(run_config=config, instance=instance)
        (output,) = [e for e in result.all_events if e.is_successful_output]
        metadata = output.step_output_data.metadata
        assert (metadata["records"].value, metadata["manifests_indexed"].value) == (0, 2)
        assert sorted(instance.get_dynamic_partitions("pdb_batches")) == sorted(left)
