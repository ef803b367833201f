"""The asset graph run through Dagster itself, on the toy conventions (fast, synthetic)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
from sqlalchemy import func, select

from osa_dagster.batch.hooks import checkpoint_key
from osa_dagster.batch.stores import StoreMemoryHistoryIO
from osa_dagster.definitions import build_definitions
from osa_dagster.defs.checks import CHECKS
from osa_dagster.records import Feature, Record, RecordsDatabase, database_url
from osa_dagster.settings import Settings
from osa_dagster.storage import BatchLayout, artifact_store
from osa_dagster.storage.layout import memory_history_key
from tests.fixtures.check_status import all_check_statuses, check_statuses, verdicts_by_run
from tests.fixtures.toy_convention import CONVENTIONS, TOY_IDS
from tests.ui.conftest import make_site

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def instance(tmp_path: Path):
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        yield instance


@pytest.fixture
def defs(toy_conventions) -> dg.Definitions:
    return build_definitions()


def _plan(defs, instance, convention: str, **config) -> list[str]:
    result = defs.resolve_job_def(f"{convention}_plan").execute_in_process(
        run_config={"ops": {f"{convention}_plan_batches": {"config": config}}}, instance=instance
    )
    assert result.success
    return instance.get_dynamic_partitions(f"{convention}_batches")


def _ingest(defs, instance, convention: str, key: str) -> dg.ExecuteInProcessResult:
    job = defs.resolve_job_def(f"{convention}_ingest")
    return job.execute_in_process(partition_key=key, instance=instance, raise_on_error=False)


def _counts() -> tuple[int, int]:
    db = RecordsDatabase(database_url(Settings.from_env()))
    with db.session() as session:
        return (
            session.scalar(select(func.count()).select_from(Record)),
            session.scalar(select(func.count()).select_from(Feature)),
        )


def _metadata(result: dg.ExecuteInProcessResult, *path: str) -> dict:
    [event] = [
        e
        for e in result.get_asset_materialization_events()
        if e.asset_key == dg.AssetKey(list(path))
    ]
    return {k: v.value for k, v in event.materialization.metadata.items()}


def test_whole_graph_publishes_what_passed_and_is_idempotent(defs, instance):
    keys = _plan(defs, instance, "toy", limit=10, batch_size=5)
    assert len(keys) == 2
    for key in keys:
        assert _ingest(defs, instance, "toy", key).success
    # Record n has n kB: records 5 and 10 are rejected (multiples of 5 kB) in each batch.
    published, features = _counts()
    assert (published, features) == (8, 8)

    again = _ingest(defs, instance, "toy", keys[0])
    assert again.success
    assert _counts() == (8, 8)
    meta = _metadata(again, "toy", "published_records")
    assert (meta["published"], meta["duplicates_skipped"]) == (0, 4)
    hook_meta = _metadata(again, "toy", "hook_outcomes", "check_size")
    assert (hook_meta["passed"], hook_meta["rejected"], hook_meta["errored"]) == (4, 1, 0)
    # OSA_HOOK_SANDBOX unset: on, and every materialisation says how its hooks ran.
    assert hook_meta["hook_isolation"].startswith("sandboxed (bubblewrap")


def test_planning_twice_adds_no_partition(defs, instance):
    first = _plan(defs, instance, "toy", batch_size=5)
    second = _plan(defs, instance, "toy", batch_size=5)
    assert first == second
    assert len(first) == -(-len(TOY_IDS) // 5)


def test_bad_plan_config_fails_before_any_partition(defs, instance):
    result = defs.resolve_job_def("toy_plan").execute_in_process(
        run_config={"ops": {"toy_plan_batches": {"config": {"limit": 0}}}},
        instance=instance,
        raise_on_error=False,
    )
    assert not result.success
    error = str(result.failure_data_for_node("toy_plan_batches").error)
    assert "limit\n  Value error, must be a positive number of records, not 0" in error
    assert instance.get_dynamic_partitions("toy_batches") == []


def test_unknown_partition_key_is_refused(defs, instance):
    _plan(defs, instance, "toy", limit=5)
    with pytest.raises(dg.DagsterUnknownPartitionError, match="no-such-batch"):
        _ingest(defs, instance, "toy", "no-such-batch")


def test_an_oom_climbs_the_ladder_within_the_hook_step(defs, instance):
    [key] = _plan(defs, instance, "toy_oom")
    result = _ingest(defs, instance, "toy_oom", key)
    assert result.success
    # The step climbs the ladder itself: the other jobs of its range need not wait for a retry.
    retries = [
        e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY
    ]
    assert retries == []
    observations = [
        e.asset_observation_data.asset_observation.metadata
        for e in result.all_events
        if e.event_type == dg.DagsterEventType.ASSET_OBSERVATION
    ]
    attempts = [(o["memory_limit_mb"].value, o["oom_killed"].value) for o in observations]
    assert attempts == [(128, True), (256, False)]
    meta = _metadata(result, "toy_oom", "hook_outcomes", "hungry")
    assert meta["passed"] == 6
    # The history the prediction uses is shown, this batch's part apart: the record that was
    # killed at 128 MB, by name.
    assert f"| {TOY_IDS[4]} | 0.00 | OOM-killed | 128 |" in meta["memory_history_this_batch"]
    assert f"| {TOY_IDS[4]} | 0.00 | OOM-killed | 128 |" in meta["memory_history_all_batches"]
    # The fits name their record too: the batch's largest record, which passed at 256 MB.
    assert "| fitted |" in meta["memory_history_this_batch"]
    assert (meta["oom_attempts"], meta["oom_attempts_this_run"], meta["attempts_reused"]) == (
        1,
        1,
        0,
    )
    # The records done before the kill were not run again: the second attempt got only the rest.
    assert (
        observations[1]["records_in"].value
        == observations[0]["records_in"].value - observations[0]["records_done"].value
    )
    assert _counts() == (6, 6)
    # The hook's memory history in the store learnt the OOM and the fits, for the next batch.
    history = StoreMemoryHistoryIO(
        artifact_store(Settings.from_env()), memory_history_key("toy_oom", "hungry")
    )
    learnt = history.load()
    assert learnt is not None and learnt.hook == "hungry"
    assert [o.limit_mb for o in learnt.ooms] == [128]
    assert learnt.fits


def _verdict(result: dg.ExecuteInProcessResult, check: str) -> dg.AssetCheckEvaluation:
    [verdict] = [c for c in result.get_asset_check_evaluations() if c.check_name == check]
    return verdict


def test_a_re_run_that_reuses_checkpoints_shows_no_new_oom(defs, instance):
    [key] = _plan(defs, instance, "toy_oom")
    first = _ingest(defs, instance, "toy_oom", key)
    assert first.success
    flagged = _verdict(first, "no_oom_kills")
    assert (flagged.passed, flagged.severity) == (False, dg.AssetCheckSeverity.WARN)
    assert flagged.partition == key
    assert (flagged.metadata["oom_kills"].value, flagged.metadata["oom_kills_this_run"].value) == (
        1,
        1,
    )
    assert f"hungry at 128 MB on {TOY_IDS[4]} (this run)" in flagged.metadata["examples"].value

    again = _ingest(defs, instance, "toy_oom", key)
    assert again.success
    # Nothing ran again: no attempt was observed, and the log marks both as reused.
    assert not [
        e for e in again.all_events if e.event_type == dg.DagsterEventType.ASSET_OBSERVATION
    ]
    meta = _metadata(again, "toy_oom", "hook_outcomes", "hungry")
    assert (meta["oom_attempts"], meta["oom_attempts_this_run"], meta["attempts_reused"]) == (
        1,
        0,
        2,
    )
    earlier = f"reused: earlier run {first.run_id[:8]}"
    assert re.findall(r"^\| (\d) \| ([^|]+) \|", meta["attempt_log"], re.M) == [
        ("1", earlier),
        ("2", earlier),
    ]
    assert "this run" not in meta["attempt_log"]
    # The batch is still flagged (it needed more memory), as an OOM of an earlier run.
    flagged = _verdict(again, "no_oom_kills")
    assert not flagged.passed
    assert flagged.metadata["oom_kills_this_run"].value == 0
    assert "1 (0 in this run, 1 in earlier runs" in (flagged.description or "")
    assert f"on {TOY_IDS[4]} ({earlier})" in flagged.metadata["examples"].value


@pytest.mark.slow
def test_a_record_over_the_second_to_last_rung_passes_at_the_cap(defs, instance):
    # The hook holds 700 MB on one record: killed at 64, 128, 256 and 512 MB, it passes at
    # the cap, 1000 MB, all within the hook step.
    [key] = _plan(defs, instance, "toy_ladder")
    result = _ingest(defs, instance, "toy_ladder", key)
    assert result.success
    observations = [
        e.asset_observation_data.asset_observation.metadata
        for e in result.all_events
        if e.event_type == dg.DagsterEventType.ASSET_OBSERVATION
    ]
    attempts = [(o["memory_limit_mb"].value, o["oom_killed"].value) for o in observations]
    assert attempts == [(64, True), (128, True), (256, True), (512, True), (1000, False)]
    retries = [
        e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY
    ]
    assert retries == []
    meta = _metadata(result, "toy_ladder", "hook_outcomes", "hungry")
    assert (meta["passed"], meta["errored"]) == (4, 0)
    assert _counts() == (4, 4)


def test_a_hook_that_rejects_everything_publishes_nothing_without_failing(defs, instance):
    [key] = _plan(defs, instance, "toy_rejected")
    result = _ingest(defs, instance, "toy_rejected", key)
    assert result.success
    meta = _metadata(result, "toy_rejected", "published_records")
    assert (meta["records_in"], meta["published"], meta["not_published"]) == (4, 0, 4)
    assert "rejected in check_size" in meta["why_not_published"]
    assert _counts() == (0, 0)


def test_definitions_validate_from_the_workspace():
    completed = subprocess.run(
        [
            str(Path(sys.executable).with_name("dagster")),
            "definitions",
            "validate",
            "-w",
            "workspace.yaml",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]


def _covered(request: dg.RunRequest, keys: list[str]) -> list[str]:
    """The partitions a run request covers: one, or a range of adjacent keys."""
    if request.partition_key is not None:
        return [request.partition_key]
    start = keys.index(request.tags["dagster/asset_partition_range_start"])
    end = keys.index(request.tags["dagster/asset_partition_range_end"])
    return keys[start : end + 1]


def test_sensor_requests_runs_for_new_partitions_once(defs, instance):
    sensor = defs.resolve_sensor_def("toy_new_batches")
    first_keys = _plan(defs, instance, "toy", limit=10, batch_size=5)
    first = sensor(dg.build_sensor_context(instance=instance, definitions=defs))
    # Both new partitions in one run (up to OSA_PARTITIONS_PER_RUN of them per run).
    (request,) = first.run_requests
    assert _covered(request, first_keys) == first_keys
    assert request.run_key == f"{first_keys[0]}...{first_keys[-1]}"

    later_keys = _plan(defs, instance, "toy", batch_size=7)
    second = sensor(
        dg.build_sensor_context(instance=instance, cursor=first.cursor, definitions=defs)
    )
    new_keys = [k for k in later_keys if k not in first_keys]
    all_keys = instance.get_dynamic_partitions("toy_batches")
    assert [k for r in second.run_requests for k in _covered(r, all_keys)] == new_keys


def test_cli_names_an_unknown_convention(toy_conventions, capsys):
    from osa_dagster.cli import main

    assert main(["plan", "nope"]) == 2
    assert re.fullmatch(
        r"osa plan: no convention 'nope'; known: .*pdb.*toy.*\n", capsys.readouterr().err
    )


def _check_results(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    return {
        e.asset_check_evaluation_data.check_name: e.asset_check_evaluation_data.passed
        for e in result.all_events
        if e.event_type == dg.DagsterEventType.ASSET_CHECK_EVALUATION
    }


def test_asset_checks_pass_on_every_ingest(defs, instance):
    [key, *_] = _plan(defs, instance, "toy", limit=5, batch_size=5)
    checks = _check_results(_ingest(defs, instance, "toy", key))
    assert checks == {
        "passed_records_published_once": True,
        "failed_records_not_published": True,
        "counts_add_up": True,
        "published_records_have_features": True,
        "no_dead_letters": True,
        "no_oom_kills": True,
        "every_record_passed": False,  # a flag: record 5 (5 kB) is rejected
    }


def test_a_corrupted_records_table_fails_a_check_in_the_next_run(defs, instance):
    from sqlalchemy import update

    [key, *_] = _plan(defs, instance, "toy", limit=5, batch_size=5)
    assert _ingest(defs, instance, "toy", key).success
    db = RecordsDatabase(database_url(Settings.from_env()))
    with db.session() as session, session.begin():
        # Record 5 (5 kB) was rejected: make it look as if this batch had published it.
        session.execute(
            update(Record).where(Record.source_id == TOY_IDS[0]).values(source_id=TOY_IDS[4])
        )
    result = _ingest(defs, instance, "toy", key)
    assert result.success  # the checks are not blocking: they flag, the data stays
    assert _check_results(result) == {
        "passed_records_published_once": True,  # the run published record 1 again
        "failed_records_not_published": False,
        "counts_add_up": True,
        "published_records_have_features": True,
        "no_dead_letters": True,
        "no_oom_kills": True,
        "every_record_passed": False,  # a flag: record 5 (5 kB) is rejected
    }


def test_the_audit_names_what_a_corrupted_table_lost(defs, instance):
    from sqlalchemy import delete

    from osa_dagster.batch.audit import audit_batch
    from osa_dagster.conventions.registry import load_conventions
    from osa_dagster.storage import artifact_store

    [key, *_] = _plan(defs, instance, "toy", limit=5, batch_size=5)
    assert _ingest(defs, instance, "toy", key).success
    db = RecordsDatabase(database_url(Settings.from_env()))
    with db.session() as session, session.begin():
        srns = dict(session.execute(select(Record.source_id, Record.srn)).all())
        session.execute(
            delete(Feature).where(Feature.record_srn.in_([srns[TOY_IDS[1]], srns[TOY_IDS[2]]]))
        )
        session.execute(delete(Record).where(Record.srn == srns[TOY_IDS[1]]))
    audit = audit_batch(
        load_conventions(Settings.from_env())["toy"], artifact_store(Settings.from_env()), db, key
    )
    assert audit.passed_not_published_once == [TOY_IDS[1]]
    assert audit.missing_features == {"check_size": [TOY_IDS[2]]}
    assert audit.published_but_failed == []
    assert audit.counts == {
        "planned": 5,
        "fetched": 5,
        "passed": 4,
        "rejected": 1,
        "errored": 0,
        "skipped": 0,
    }
    assert audit.counts_add_up


def test_sensor_skips_batches_already_ingested(defs, instance):
    [first, second] = _plan(defs, instance, "toy", limit=10, batch_size=5)
    assert _ingest(defs, instance, "toy", first).success
    sensor = defs.resolve_sensor_def("toy_new_batches")
    result = sensor(dg.build_sensor_context(instance=instance, definitions=defs))
    assert [r.partition_key for r in result.run_requests] == [second]


def test_poison_records_are_dead_lettered_and_rerun_with_a_raised_cap(
    defs, instance, monkeypatch, capsys
):
    from osa_dagster.cli import main
    from osa_dagster.records import list_dead_letters

    poison = {TOY_IDS[1], TOY_IDS[3]}
    [key] = _plan(defs, instance, "toy_poison")
    result = _ingest(defs, instance, "toy_poison", key)
    assert result.success
    hook_meta = _metadata(result, "toy_poison", "hook_outcomes", "hungry")
    assert (hook_meta["passed"], hook_meta["errored"], hook_meta["poison"]) == (4, 2, 2)
    meta = _metadata(result, "toy_poison", "published_records")
    assert (meta["published"], meta["dead_letters"]) == (4, 2)
    assert "poison: OOM alone at 256 MB" in meta["dead_letter_records"]
    assert check_statuses(instance, "toy_poison", "published_records", "no_dead_letters") == {
        key: "FAILED"
    }
    db = RecordsDatabase(database_url(Settings.from_env()))
    letters = list_dead_letters(db, "toy_poison")
    assert {(d.source_id, d.hook, d.partition, d.limit_mb) for d in letters} == {
        (rid, "hungry", key, 256) for rid in poison
    }
    assert all(d.size_mb is not None and d.size_mb > 0 for d in letters)

    # Idempotent: the same run again writes the same dead letters, no more.
    assert _ingest(defs, instance, "toy_poison", key).success
    assert len(list_dead_letters(db, "toy_poison")) == 2

    main(["dead-letters", "toy_poison", "--partitions"])
    assert capsys.readouterr().out.split() == [key]
    main(["dead-letters", "toy_poison"])
    listing = capsys.readouterr().out
    assert all(rid in listing for rid in poison)
    assert "OSA_HOOK_MEMORY=toy_poison.hungry=128:512" in listing

    monkeypatch.setenv("OSA_HOOK_MEMORY", "toy_poison.hungry=128:512")
    raised = _ingest(build_definitions(), instance, "toy_poison", key)

    assert raised.success
    observations = [
        e.asset_observation_data.asset_observation.metadata
        for e in raised.all_events
        if e.event_type == dg.DagsterEventType.ASSET_OBSERVATION
    ]
    # Only the two poison records ran, straight at the rung above the old cap.
    assert [(o["memory_limit_mb"].value, o["records_in"].value) for o in observations] == [(512, 2)]
    meta = _metadata(raised, "toy_poison", "published_records")
    assert (meta["published"], meta["duplicates_skipped"], meta["dead_letters"]) == (2, 4, 0)
    assert list_dead_letters(db, "toy_poison") == []
    assert _counts() == (6, 6)
    assert check_statuses(instance, "toy_poison", "published_records", "no_dead_letters") == {
        key: "SUCCEEDED"
    }


def test_only_the_hook_step_takes_a_slot_of_the_hook_pool(defs):
    job = defs.resolve_job_def("toy_ingest")
    pools = {node.name: node.definition.pool for node in job.nodes}
    assert {name: pool for name, pool in pools.items() if pool} == {
        "toy__hook_outcomes": "osa_hooks"
    }


def test_one_run_over_a_partition_range_keeps_per_partition_metadata(defs, instance):
    keys = _plan(defs, instance, "toy", limit=15, batch_size=5)
    assert len(keys) == 3
    job = defs.resolve_job_def("toy_ingest")
    result = job.execute_in_process(
        instance=instance,
        tags={
            "dagster/asset_partition_range_start": keys[0],
            "dagster/asset_partition_range_end": keys[-1],
        },
    )
    assert result.success
    assert _counts() == (12, 12)
    published = [
        e.materialization
        for e in result.get_asset_materialization_events()
        if e.asset_key == dg.AssetKey(["toy", "published_records"])
    ]
    assert sorted(m.partition for m in published) == sorted(keys)
    # Each partition's own counts, not the range's: 4 of its 5 records pass.
    assert {m.metadata["published"].value for m in published} == {4}
    assert {m.metadata["records_in"].value for m in published} == {5}
    checks = result.get_asset_check_evaluations()
    # Every batch's record 5 is rejected, which the flag every_record_passed warns of.
    assert {(c.check_name, c.passed) for c in checks} == {
        (spec.name, spec.name != "every_record_passed") for spec in CHECKS
    }
    # One verdict per check and partition, each about its own partition.
    assert sorted((c.check_name, c.partition) for c in checks) == sorted(
        (spec.name, key) for spec in CHECKS for key in keys
    )


def _ingest_range(defs, instance, convention: str, keys: list[str]) -> dg.ExecuteInProcessResult:
    job = defs.resolve_job_def(f"{convention}_ingest")
    return job.execute_in_process(
        instance=instance,
        raise_on_error=False,
        tags={
            "dagster/asset_partition_range_start": keys[0],
            "dagster/asset_partition_range_end": keys[-1],
        },
    )


def test_range_runs_give_every_partition_its_check_verdict_run_after_run(defs, instance):
    keys = _plan(defs, instance, "toy", limit=15, batch_size=5)
    for run in range(3):
        assert _ingest_range(defs, instance, "toy", keys).success, f"range run {run + 1}"
        statuses = all_check_statuses(instance, "toy")
        assert statuses == {check: dict.fromkeys(keys, "SUCCEEDED") for check in statuses}
    # A run of one partition (as the sensor makes) in between changes nobody else's verdict.
    assert _ingest(defs, instance, "toy", keys[1]).success
    statuses = all_check_statuses(instance, "toy")
    assert statuses == {check: dict.fromkeys(keys, "SUCCEEDED") for check in statuses}


def _toy():
    return next(c for c in CONVENTIONS if c.name == "toy")


def _toy_verdicts(partitions: list[str]) -> dict[tuple[str, str], dict[str, str]]:
    """What a run records of toy batches: every check passes but the flag every_record_passed
    (each batch's record 5 is rejected)."""
    assets = {"published": "published_records", "features": "features"}
    return {
        (assets[spec.asset], spec.name): dict.fromkeys(
            partitions, "FAILED" if spec.name == "every_record_passed" else "SUCCEEDED"
        )
        for spec in CHECKS
    }


def test_each_run_records_a_verdict_per_partition_and_none_without_one(defs, instance):
    keys = _plan(defs, instance, "toy", limit=15, batch_size=5)
    one = _ingest(defs, instance, "toy", keys[1])  # as the sensor and the UI launch one batch
    assert one.success
    ranged = _ingest_range(defs, instance, "toy", keys)  # as `osa materialize` and backfills
    assert ranged.success
    # The checks are partitioned like their assets: each run's execution history holds one
    # verdict per check and partition it covered, and nothing without a partition (which the
    # UI would list as "Skipped").
    assert verdicts_by_run(instance, "toy") == {
        one.run_id: _toy_verdicts([keys[1]]),
        ranged.run_id: _toy_verdicts(keys),
    }
    graph = defs.resolve_asset_graph()
    partitions = graph.get(dg.AssetKey(["toy", "published_records"])).partitions_def
    for key in graph.asset_check_keys:
        if key.asset_key.path[0] == "toy":
            assert graph.get_check_spec(key).partitions_def == partitions, key


def test_osa_materialize_records_a_verdict_per_partition_and_none_without_one(tmp_path: Path):
    site = make_site(tmp_path)
    site.env["OSA_CONVENTIONS"] = "tests.fixtures.toy_convention"
    keys = site.plan("toy", "--limit", "15", "--batch-size", "5")
    site.env["OSA_PARTITIONS_PER_RUN"] = "2"
    site.osa("materialize", "toy")
    with dg.DagsterInstance.from_config(str(site.home)) as instance:
        runs = {
            run.run_id: (
                run.tags["dagster/asset_partition_range_start"],
                run.tags["dagster/asset_partition_range_end"],
            )
            for run in instance.get_runs(dg.RunsFilter(job_name="toy_ingest"))
        }
        assert sorted(runs.values()) == [(keys[0], keys[1]), (keys[2], keys[2])]
        first_two = next(run for run, span in runs.items() if span[0] == keys[0])
        last = next(run for run, span in runs.items() if span[0] == keys[2])
        assert verdicts_by_run(instance, "toy") == {
            first_two: _toy_verdicts(keys[:2]),
            last: _toy_verdicts(keys[2:]),
        }


def test_a_corrupted_table_fails_only_its_partitions_check_in_a_range_run(defs, instance):
    from sqlalchemy import update

    keys = _plan(defs, instance, "toy", limit=15, batch_size=5)
    assert _ingest_range(defs, instance, "toy", keys).success
    db = RecordsDatabase(database_url(Settings.from_env()))
    with db.session() as session, session.begin():
        # Record 5 of the first batch was rejected: make it look as if it had been published.
        session.execute(
            update(Record).where(Record.source_id == TOY_IDS[0]).values(source_id=TOY_IDS[4])
        )
    assert _ingest_range(defs, instance, "toy", keys).success  # checks flag, never block
    statuses = all_check_statuses(instance, "toy")
    corrupted = ("published_records", "failed_records_not_published")
    assert statuses.pop(corrupted) == {
        keys[0]: "FAILED",
        keys[1]: "SUCCEEDED",
        keys[2]: "SUCCEEDED",
    }
    assert statuses == {check: dict.fromkeys(keys, "SUCCEEDED") for check in statuses}


def test_every_check_of_a_convention_says_what_it_guards(defs):
    graph = defs.resolve_asset_graph()
    checks = {
        key.name: graph.get_check_spec(key)
        for key in graph.asset_check_keys
        if key.asset_key.path[0] == "toy"
    }
    assert set(checks) == {spec.name for spec in CHECKS}
    assert all(spec.description for spec in checks.values())
    assert checks["no_dead_letters"].asset_key == dg.AssetKey(["toy", "published_records"])


def _truncate(store, key: str) -> bytes:
    intact = store.read_bytes(key)
    store.write_bytes(key, intact[: len(intact) // 2])
    return intact[: len(intact) // 2]


def test_a_truncated_checkpoint_is_set_aside_and_its_hook_runs_the_batch_again(defs, instance):
    [key] = _plan(defs, instance, "toy", limit=5, batch_size=5)
    assert _ingest(defs, instance, "toy", key).success
    store = artifact_store(Settings.from_env())
    checkpoint = checkpoint_key(_toy(), key, "check_size")
    truncated = _truncate(store, checkpoint)

    result = _ingest(defs, instance, "toy", key)
    assert result.success
    meta = _metadata(result, "toy", "hook_outcomes", "check_size")
    # Kept for inspection, and named with the batch, the file and the cause in one line.
    assert store.read_bytes(meta["checkpoint_set_aside"]) == truncated
    [why] = meta["checkpoint_set_aside_why"].splitlines()
    assert key in why and store.describe(checkpoint) in why and "Invalid JSON: EOF" in why
    # The hook ran every record of the batch again; the archive is exactly what passed.
    attempts = [
        e.asset_observation_data.asset_observation.metadata
        for e in result.all_events
        if e.event_type == dg.DagsterEventType.ASSET_OBSERVATION
        and "records_in" in e.asset_observation_data.asset_observation.metadata
    ]
    assert [a["records_in"].value for a in attempts] == [5]
    assert (meta["passed"], meta["rejected"]) == (4, 1)
    assert _counts() == (4, 4)
    statuses = all_check_statuses(instance, "toy")
    assert statuses == {check: {key: "SUCCEEDED"} for check in statuses}


def test_publishing_over_a_truncated_checkpoint_names_it_and_what_to_do(defs, instance):
    from osa_dagster.batch import BatchInputError
    from osa_dagster.batch.publish import publish_batch
    from osa_dagster.conventions.registry import load_conventions

    [key] = _plan(defs, instance, "toy", limit=5, batch_size=5)
    assert _ingest(defs, instance, "toy", key).success
    store = artifact_store(Settings.from_env())
    checkpoint = checkpoint_key(_toy(), key, "check_size")
    _truncate(store, checkpoint)
    db = RecordsDatabase(database_url(Settings.from_env()))
    with pytest.raises(BatchInputError) as error:
        publish_batch(load_conventions(Settings.from_env())["toy"], store, db, key, domain="test")
    [line] = str(error.value).splitlines()
    assert key in line and store.describe(checkpoint) in line and "Invalid JSON: EOF" in line
    assert "materialise its hook_outcomes again" in line


def test_replanned_records_count_once_in_the_summary(defs, instance):
    from osa_dagster.cli import summary

    first = _plan(defs, instance, "toy", limit=10, batch_size=5)
    # Without replan, another batch size plans nothing: every record is planned already.
    assert _plan(defs, instance, "toy", limit=10, batch_size=4) == first
    keys = _plan(defs, instance, "toy", limit=10, batch_size=4, replan=True)
    assert len(keys) == 5  # 2 batches of 5 and 3 of at most 4, over the same 10 records
    assert _ingest_range(defs, instance, "toy", keys).success
    totals = summary(Settings.from_env(), "toy")
    # Each record is counted once, though two batches hold it: passed in either, it is in
    # the archive (the toy hook rejects the 5th record of a batch, so both sizes differ).
    counts = totals.model_dump()
    outcomes = {name: n for name, n in counts.items() if name.startswith("records_")}
    assert sum(n for name, n in outcomes.items() if name != "records_in_archive") == 10
    assert totals.records_passed == totals.records_in_archive == 10
    assert totals.batches_done == 5


def test_a_truncated_manifest_fails_its_run_in_one_line_naming_it(defs, instance):
    [key] = _plan(defs, instance, "toy", limit=5, batch_size=5)
    store = artifact_store(Settings.from_env())
    manifest = BatchLayout("toy", key).manifest
    _truncate(store, manifest)

    result = _ingest(defs, instance, "toy", key)
    assert not result.success
    error = result.failure_data_for_node("toy__raw_batch").error.cause  # under Dagster's own
    assert error.cls_name == "BatchInputError"
    [line] = error.message.strip().splitlines()
    assert key in line and store.describe(manifest) in line and "Invalid JSON: EOF" in line
    assert "osa plan toy --replan" in line
    assert _counts() == (0, 0)
