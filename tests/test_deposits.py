"""Single-record deposits: picked up by a sensor, validated by the real hooks through the
same engine, verdicts written where the depositor reads them and shown on the asset."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
import pytest
from osa_sdk.contract import BYTES_PER_MB
from osa_sdk.types import OutcomeStatus

from osa_dagster.batch.deposits import RESULT_FILE, deposit_prefix, read_result, write_deposit
from osa_dagster.conventions.pdb.ingester import DEFAULT_MIRROR, entry_path
from osa_dagster.definitions import build_definitions
from osa_dagster.defs.resources import default_resources
from osa_dagster.engine.runners import sandbox as sandbox_module
from osa_dagster.settings import Settings
from osa_dagster.storage.store import FileSystemStore, deposits_store
from tests.engine.helpers import require_cgroups

pytestmark = pytest.mark.slow


def entry_bytes(pdb_id: str) -> bytes:
    return entry_path(DEFAULT_MIRROR, pdb_id).read_bytes()


@pytest.fixture
def validated():
    """Four deposits, validated through the sensor and the deposit job."""
    require_cgroups()
    store = deposits_store(Settings.from_env())
    write_deposit(store, "pdb", "good", {"1a28.cif.gz": entry_bytes("1A28")}, {"source_id": "1A28"})
    write_deposit(store, "pdb", "big", {"6zu5.cif.gz": entry_bytes("6ZU5")})
    write_deposit(store, "pdb", "broken", {"x.cif.gz": b"\x1f\x8b not really gzip"})
    write_deposit(store, "pdb", "malformed", {"1a28.cif.gz": entry_bytes("1A28")}, "{not json")
    # A deposit still being uploaded (no deposit.json yet) is left alone.
    store.write_bytes("pdb/uploading/files/1a28.cif.gz", entry_bytes("1A28"))
    # Hostile ones, refused before any hook runs: a sparse gigabyte, a name not in UTF-8.
    assert isinstance(store, FileSystemStore)
    write_deposit(store, "pdb", "sparse", {"huge.cif.gz": b""})
    os.truncate(store.path("pdb/sparse/files/huge.cif.gz"), 1024 * BYTES_PER_MB)
    write_deposit(store, "pdb", "latin1", {"1a28.cif.gz": entry_bytes("1A28")})
    Path(os.fsdecode(os.fsencode(store.path("pdb/latin1/files")) + b"/\xe9.cif")).touch()

    defs = build_definitions()
    sensor = defs.resolve_sensor_def("pdb_deposits")
    job = defs.resolve_job_def("pdb_validate_deposit")
    with dg.instance_for_test() as instance:
        context = dg.build_sensor_context(
            instance=instance, resources={"deposits": default_resources()["deposits"]}
        )
        tick = sensor(context)
        keys = [r.partition_key for r in tick.run_requests]
        assert sorted(keys) == ["big", "broken", "good", "latin1", "malformed", "sparse"]
        instance.add_dynamic_partitions("pdb_deposits", keys)
        results = {
            key: job.execute_in_process(partition_key=key, instance=instance) for key in keys
        }
        second = sensor(
            dg.build_sensor_context(
                instance=instance, resources={"deposits": default_resources()["deposits"]}
            )
        )
        yield store, results, second


def test_a_good_deposit_passes_with_features(validated):
    store, results, _ = validated
    assert results["good"].success
    result = read_result(store, "pdb", "good")
    assert (result.status, result.source_id) == (OutcomeStatus.PASSED, "1A28")
    (features,) = [v for v in result.hooks if v.hook == "extract_features"]
    assert features.features[0]["atoms"] > 1000


def test_a_deposit_that_needs_more_memory_is_escalated(validated):
    store, _, _ = validated
    result = read_result(store, "pdb", "big")
    assert result.status is OutcomeStatus.PASSED
    (features,) = [v for v in result.hooks if v.hook == "extract_features"]
    assert [(a.memory_limit_mb, a.oom_killed) for a in features.attempts] == [
        (192, True),
        (384, False),
    ]


def test_a_broken_file_is_rejected_with_a_readable_reason(validated):
    store, results, _ = validated
    assert results["broken"].success  # a verdict, not a crashed run
    result = read_result(store, "pdb", "broken")
    assert result.status is OutcomeStatus.REJECTED
    assert result.reason.startswith("validate_structure: ")
    assert len(result.hooks) == 1  # the feature extractor is not run on a rejected record


def test_a_malformed_deposit_is_rejected_not_crashed(validated):
    store, results, _ = validated
    assert results["malformed"].success
    result = read_result(store, "pdb", "malformed")
    assert result.status is OutcomeStatus.REJECTED
    assert result.reason.startswith("malformed deposit: deposit.json is not valid")


def test_hostile_deposits_get_a_result_saying_why(validated):
    store, results, _ = validated
    assert results["sparse"].success and results["latin1"].success
    assert read_result(store, "pdb", "sparse").reason == (
        "malformed deposit: files/huge.cif.gz is 1024.0 MB, over the 100 MB a deposited file "
        "of this convention may be"
    )
    assert read_result(store, "pdb", "latin1").reason == (
        "malformed deposit: file name '\\udce9.cif' is not valid UTF-8: name files in UTF-8"
    )


def test_the_verdict_is_on_the_materialisation_and_nothing_is_validated_twice(validated):
    _, results, second = validated
    (materialization,) = results["big"].asset_materializations_for_node("pdb__deposit_validation")
    metadata = materialization.metadata
    assert metadata["status"].value == "passed"
    assert "192 OOM, 384" in metadata["hooks"].value
    assert metadata["hook_isolation"].value.startswith("sandboxed (bubblewrap")
    assert second.run_requests == []


@pytest.fixture
def no_bubblewrap(tmp_path, monkeypatch):
    """A PATH without bubblewrap; the once-per-process probe forgotten before and after."""
    empty = tmp_path / "no-tools"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    sandbox_module._unavailable_reason.cache_clear()
    yield
    sandbox_module._unavailable_reason.cache_clear()


def test_without_the_sandbox_deposits_wait_and_a_run_fails_in_one_line(no_bubblewrap):
    store = deposits_store(Settings.from_env())
    write_deposit(store, "pdb", "good", {"1a28.cif.gz": entry_bytes("1A28")}, {"source_id": "1A28"})
    defs = build_definitions()
    with dg.instance_for_test() as instance:
        tick = defs.resolve_sensor_def("pdb_deposits")(
            dg.build_sensor_context(
                instance=instance, resources={"deposits": default_resources()["deposits"]}
            )
        )
        assert isinstance(tick, dg.SkipReason)
        assert tick.skip_message.startswith("OSA_HOOK_SANDBOX=on, but hooks cannot be sandboxed")
        # A run launched all the same (from the UI, say) fails before any hook runs.
        instance.add_dynamic_partitions("pdb_deposits", ["good"])
        result = defs.resolve_job_def("pdb_validate_deposit").execute_in_process(
            partition_key="good", instance=instance, raise_on_error=False
        )
    assert not result.success
    [failure] = [e for e in result.all_events if e.is_step_failure]
    error = failure.step_failure_data.user_failure_data
    assert error is not None and error.description is not None
    assert error.description == tick.skip_message
    assert not store.exists(f"{deposit_prefix('pdb', 'good')}/{RESULT_FILE}")  # no verdict


def test_hooks_run_unsandboxed_only_when_turned_off_and_say_so(monkeypatch):
    require_cgroups()
    monkeypatch.setenv("OSA_HOOK_SANDBOX", "off")
    store = deposits_store(Settings.from_env())
    write_deposit(store, "pdb", "good", {"1a28.cif.gz": entry_bytes("1A28")}, {"source_id": "1A28"})
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("pdb_deposits", ["good"])
        result = (
            build_definitions()
            .resolve_job_def("pdb_validate_deposit")
            .execute_in_process(partition_key="good", instance=instance)
        )
    (materialization,) = result.asset_materializations_for_node("pdb__deposit_validation")
    assert materialization.metadata["hook_isolation"].value.startswith("UNSANDBOXED")
