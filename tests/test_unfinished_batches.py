"""The sensor that requests again the batches of an ingest run that died for reasons outside
its work once Dagster's run retries are used up, evaluated on a real instance of the shipped
profile (run monitoring through the worker-checking launcher, two run retries) with runs of
the toy convention's ingest job."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.remote_origin import (
    RegisteredCodeLocationOrigin,
    RemoteJobOrigin,
    RemoteRepositoryOrigin,
)
from dagster._core.storage.tags import (
    PARENT_RUN_ID_TAG,
    RETRY_NUMBER_TAG,
    ROOT_RUN_ID_TAG,
    TAGS_TO_MAYBE_OMIT_ON_RETRY,
    WILL_RETRY_TAG,
)
from dagster._daemon.monitoring.run_monitoring import monitor_started_run

from osa_dagster.definitions import build_definitions
from osa_dagster.defs.batch_sensors import MAX_RESUMES, RESUMED_FROM_TAG, RESUMES_TAG
from osa_dagster.defs.dagster_private import partition_range_tags
from tests.conftest import REPO

CONVENTION = "toy"
SENSOR = f"{CONVENTION}_unfinished_batches"
RANGE_START, RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """DAGSTER_HOME with the shipped dagster.yaml, which other processes can share."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.chdir(home)  # the profile's paths are relative to it
    return home


@pytest.fixture
def instance(home: Path) -> Iterator[dg.DagsterInstance]:
    with dg.DagsterInstance.from_config(str(home)) as instance:
        yield instance


@pytest.fixture
def defs(toy_conventions) -> dg.Definitions:
    return build_definitions()


@pytest.fixture
def batches(defs: dg.Definitions, instance: dg.DagsterInstance) -> list[str]:
    """Four planned batches of five records."""
    result = defs.resolve_job_def(f"{CONVENTION}_plan").execute_in_process(
        run_config={"ops": {f"{CONVENTION}_plan_batches": {"config": {"limit": 20}}}},
        instance=instance,
    )
    assert result.success
    keys = instance.get_dynamic_partitions(f"{CONVENTION}_batches")
    assert len(keys) == 4
    return keys


def _ingest_run(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    keys: list[str],
    status: dg.DagsterRunStatus | None = None,
    tags: dict[str, str] | None = None,
) -> dg.DagsterRun:
    """A run of the ingest job over `keys`, as the sensor daemon creates one: from the code
    location, tagged with the job's own tags, then the request's."""
    job = defs.resolve_job_def(f"{CONVENTION}_ingest")
    origin = RemoteJobOrigin(
        repository_origin=RemoteRepositoryOrigin(
            code_location_origin=RegisteredCodeLocationOrigin(location_name="osa"),
            repository_name="__repository__",
        ),
        job_name=job.name,
    )
    covered = (
        {"dagster/partition": keys[0]}
        if len(keys) == 1
        else partition_range_tags(keys[0], keys[-1])
    )
    return instance.create_run_for_job(
        job,
        status=status,
        tags={**job.run_tags, **covered, **(tags or {})},
        remote_job_origin=origin,
    )


def _start(instance: dg.DagsterInstance, run: dg.DagsterRun) -> None:
    instance.handle_run_event(
        run.run_id,
        dg.DagsterEvent(
            event_type_value=dg.DagsterEventType.RUN_START.value, job_name=run.job_name
        ),
    )


def _die(instance: dg.DagsterInstance, run: dg.DagsterRun) -> dg.DagsterRun:
    """Start `run`, then fail it as run monitoring fails a run whose worker is gone."""
    _start(instance, run)
    instance.report_run_failed(run, "its worker, pid 1 on here, is gone")
    failed = instance.get_run_by_id(run.run_id)
    assert failed is not None and failed.status == dg.DagsterRunStatus.FAILURE
    return failed


def _retry(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    root: dg.DagsterRun,
    parent: dg.DagsterRun,
    number: int,
) -> dg.DagsterRun:
    """A retry of the failed `parent`, created as Dagster's run retries create one: the
    parent's tags, the same root run."""
    assert parent.tags[WILL_RETRY_TAG] == "true"  # the instance's verdict, on failure
    tags = {k: v for k, v in parent.tags.items() if k not in TAGS_TO_MAYBE_OMIT_ON_RETRY}
    return instance.create_run_for_job(
        defs.resolve_job_def(root.job_name),
        tags={
            **tags,
            RETRY_NUMBER_TAG: str(number),
            PARENT_RUN_ID_TAG: parent.run_id,
            ROOT_RUN_ID_TAG: root.run_id,
        },
        root_run_id=root.run_id,
        parent_run_id=parent.run_id,
        remote_job_origin=root.remote_job_origin,
    )


def _died_after_retries(
    defs: dg.Definitions, instance: dg.DagsterInstance, root: dg.DagsterRun
) -> dg.DagsterRun:
    """The failed `root`'s two retries, each dying too: the last one, which Dagster will not
    retry."""
    parent = root
    for number in (1, 2):
        parent = _die(instance, _retry(defs, instance, root, parent, number))
    assert parent.tags[WILL_RETRY_TAG] == "false"
    return parent


def _evaluate(
    defs: dg.Definitions, instance: dg.DagsterInstance, run: dg.DagsterRun
) -> dg.SensorResult | dg.SkipReason:
    """The sensor's answer to the failure of `run`, as the sensor daemon asks for it."""
    [failure] = instance.get_records_for_run(
        run.run_id, of_type=dg.DagsterEventType.RUN_FAILURE
    ).records
    event = failure.event_log_entry.dagster_event
    assert event is not None
    context = dg.build_run_status_sensor_context(
        sensor_name=SENSOR, dagster_event=event, dagster_instance=instance, dagster_run=run
    ).for_run_failure()
    return defs.resolve_sensor_def(SENSOR)(context)


def _covered(request: dg.RunRequest, keys: list[str]) -> list[str]:
    if request.partition_key is not None:
        return [request.partition_key]
    return keys[keys.index(request.tags[RANGE_START]) : keys.index(request.tags[RANGE_END]) + 1]


def _requested(result: dg.SensorResult | dg.SkipReason, keys: list[str]) -> list[list[str]]:
    assert isinstance(result, dg.SensorResult), result
    return [_covered(request, keys) for request in result.run_requests or []]


@pytest.fixture
def stopped_worker(home: Path) -> Iterator[list[subprocess.Popen[str]]]:
    """Processes of tests.fixtures.stopped_worker, killed if a test leaves one alive."""
    workers: list[subprocess.Popen[str]] = []
    yield workers
    for worker in workers:
        worker.kill()
        worker.wait()


def test_a_run_whose_worker_died_after_its_retries_has_its_unfinished_batches_requested(
    defs, instance, batches, home, stopped_worker
):
    root = _ingest_run(defs, instance, batches)
    # A real worker executes the run until its second batch is finished, and is killed there.
    worker = subprocess.Popen(
        [sys.executable, "-m", "tests.fixtures.stopped_worker", root.run_id, batches[1]],
        cwd=home,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    stopped_worker.append(worker)
    assert worker.stdout is not None and worker.stdout.readline() == "stopped\n"
    worker.kill()
    worker.wait()
    # Run monitoring finds the worker gone and fails the run; Dagster will retry it.
    record = instance.get_run_record_by_id(root.run_id)
    monitor_started_run(instance, None, record, logging.getLogger("test"))
    root = instance.get_run_by_id(root.run_id)
    assert root.status == dg.DagsterRunStatus.FAILURE
    assert _evaluate(defs, instance, root) == dg.SkipReason(
        f"run {root.run_id} will be retried by Dagster"
    )
    # The later batches have features, but not every check's verdict yet.
    features = dg.AssetKey([CONVENTION, "features"])
    assert set(batches[2:]) <= instance.get_materialized_partitions(features)

    last = _died_after_retries(defs, instance, root)
    result = _evaluate(defs, instance, last)
    assert _requested(result, batches) == [batches[2:]]
    [request] = result.run_requests
    assert request.run_key == f"{last.run_id}:{batches[2]}...{batches[3]}"
    # The ingest job's own tags (the convention, the retry strategy) are added by the sensor
    # daemon, as to every run it creates for the job.
    assert request.tags == {
        RESUMES_TAG: "1",
        RESUMED_FROM_TAG: last.run_id,
        RANGE_START: batches[2],
        RANGE_END: batches[3],
    }
    assert defs.resolve_sensor_def(SENSOR).job_name == f"{CONVENTION}_ingest"

    # The failure evaluated again: the same run keys, which the daemon launches once.
    again = _evaluate(defs, instance, last)
    assert [r.run_key for r in again.run_requests] == [request.run_key]


def test_a_run_that_dagster_will_retry_is_left_to_it(defs, instance, batches):
    run = _die(instance, _ingest_run(defs, instance, batches))
    assert run.tags[WILL_RETRY_TAG] == "true"
    skipped = dg.SkipReason(f"run {run.run_id} will be retried by Dagster")
    assert _evaluate(defs, instance, run) == skipped
    # Seen by a tick before the instance tagged the run: judged as the instance judges.
    untagged = run.with_tags({k: v for k, v in run.tags.items() if k != WILL_RETRY_TAG})
    assert _evaluate(defs, instance, untagged) == skipped


def test_a_failure_seen_before_the_instance_recorded_it_is_judged_as_it_will_be(
    defs, instance, batches
):
    root = _die(instance, _ingest_run(defs, instance, batches))
    last = _retry(defs, instance, root, _die(instance, _retry(defs, instance, root, root, 1)), 2)
    _start(instance, last)
    # The failure stored; the run not updated yet (as a tick may find it in between).
    failure = dg.DagsterEvent(
        event_type_value=dg.DagsterEventType.RUN_FAILURE.value, job_name=last.job_name
    )
    instance.event_log_storage.store_event(
        dg.EventLogEntry(
            error_info=None,
            level=logging.ERROR,
            user_message="",
            run_id=last.run_id,
            timestamp=time.time(),
            dagster_event=failure,
        )
    )
    seen = instance.get_run_by_id(last.run_id)
    assert seen.status == dg.DagsterRunStatus.STARTED and WILL_RETRY_TAG not in seen.tags
    # Not taken for a run Dagster retries, nor for a live run covering its batches.
    assert _requested(_evaluate(defs, instance, seen), batches) == [batches]


def test_a_run_that_failed_in_a_step_is_not_requested_again(defs, instance, batches):
    # Never planned, so the batch has no manifest: its fetch step fails.
    instance.add_dynamic_partitions(f"{CONVENTION}_batches", ["unplanned"])
    job = defs.resolve_job_def(f"{CONVENTION}_ingest")
    result = job.execute_in_process(
        partition_key="unplanned", instance=instance, raise_on_error=False
    )
    assert not result.success
    run = instance.get_run_by_id(result.run_id)
    assert run.tags[WILL_RETRY_TAG] == "false"  # retry_on_asset_or_op_failure: false
    skipped = _evaluate(defs, instance, run)
    assert isinstance(skipped, dg.SkipReason)
    assert skipped.skip_message == (
        f"run {run.run_id} failed in step {CONVENTION}__raw_batch: its own failure, not "
        f"re-requested (`osa backfill {CONVENTION} --failed` runs its batches again once the "
        "cause is fixed)"
    )


def test_batches_of_a_live_run_or_finished_by_a_later_one_are_left_out(
    defs, instance, batches, monkeypatch
):
    monkeypatch.setenv("OSA_PARTITIONS_PER_RUN", "2")
    failed = _died_after_retries(
        defs, instance, _die(instance, _ingest_run(defs, instance, batches))
    )
    assert _requested(_evaluate(defs, instance, failed), batches) == [batches[:2], batches[2:]]

    # An operator runs the last batch, successfully, and queues a run of the second.
    job = defs.resolve_job_def(f"{CONVENTION}_ingest")
    assert job.execute_in_process(partition_key=batches[3], instance=instance).success
    _ingest_run(defs, instance, [batches[1]], status=dg.DagsterRunStatus.QUEUED)
    result = _evaluate(defs, instance, failed)
    assert _requested(result, batches) == [[batches[0]], [batches[2]]]
    assert [r.run_key for r in result.run_requests] == [
        f"{failed.run_id}:{batches[0]}",
        f"{failed.run_id}:{batches[2]}",
    ]


def _resumed_and_died(
    defs: dg.Definitions, instance: dg.DagsterInstance, batches: list[str], resumes: int
) -> dg.DagsterRun:
    resumed = _ingest_run(defs, instance, batches, tags={RESUMES_TAG: str(resumes)})
    return _died_after_retries(defs, instance, _die(instance, resumed))


def test_each_resume_counts_up_to_the_most(defs, instance, batches):
    failed = _resumed_and_died(defs, instance, batches, MAX_RESUMES - 1)
    [request] = _evaluate(defs, instance, failed).run_requests
    assert request.tags[RESUMES_TAG] == str(MAX_RESUMES)


def test_a_run_resumed_the_most_times_is_left_to_an_operator(defs, instance, batches):
    failed = _resumed_and_died(defs, instance, batches, MAX_RESUMES)
    assert _evaluate(defs, instance, failed) == dg.SkipReason(
        f"run {failed.run_id} died (UNKNOWN) after {MAX_RESUMES} resumes, the most this sensor "
        f"requests; batches left: {', '.join(batches)}. Run them with "
        f"`osa materialize {CONVENTION} {' '.join(batches)}`"
    )


def test_a_run_of_a_backfill_that_is_gone_is_left_alone(defs, instance, batches):
    run = _ingest_run(defs, instance, batches, tags={"dagster/backfill": "gone"})
    failed = _die(instance, run)
    # The instance's verdict; but Dagster's run retries leave a run of a backfill that has
    # ended (or is gone) alone, and so does the sensor.
    assert failed.tags[WILL_RETRY_TAG] == "true"
    assert _evaluate(defs, instance, failed) == dg.SkipReason(
        f"run {failed.run_id} belongs to backfill gone, which has ended"
    )
