"""Backfills from the command line against a running `dagster dev` (webserver + daemon):
`dagster job backfill` over some batches, then `osa backfill --failed` over the rest."""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import dagster as dg
import pytest
from sqlalchemy import select

from osa_dagster.backfill import (
    PARTITION_TAG,
    RANGE_END_TAG,
    RANGE_START_TAG,
    BackfillError,
    BackfillState,
    ConventionPartitions,
    DagsterWebserver,
    PartitionSelection,
    RunState,
    backfill_title,
    batches_whose_last_run_failed,
    select_partitions,
)
from osa_dagster.conventions.pdb.ingester import mirror_entries
from osa_dagster.records import Record, RecordsDatabase, database_url
from osa_dagster.settings import Settings
from tests.fixtures.check_status import all_check_statuses, verdicts_by_run
from tests.test_pdb_end_to_end import MIRROR, expected_publishable
from tests.ui.conftest import CODE_LOCATION, DagsterSite, dagster_server, make_site

PLANNED_RECORDS = 12
BATCH_SIZE = 4
RUNS_TIMEOUT_S = 300.0
# The backfill daemon looks at backfills every 30 s: one look to launch, one to close.
ASSET_BACKFILL_TIMEOUT_S = 300.0
FINISHED_RUN_STATUSES = {
    dg.DagsterRunStatus.SUCCESS,
    dg.DagsterRunStatus.FAILURE,
    dg.DagsterRunStatus.CANCELED,
}


@dataclass(frozen=True)
class RunningDagster:
    site: DagsterSite
    url: str
    partitions: list[str]

    def instance(self) -> dg.DagsterInstance:
        return dg.DagsterInstance.from_config(str(self.site.home))


@pytest.fixture(scope="module")
def running_dagster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningDagster]:
    """Three planned pdb batches, nothing ingested, and `dagster dev` serving them."""
    site = make_site(tmp_path_factory.mktemp("backfills"))
    # The sensor would request a run for each new batch itself; stopped, every run that
    # follows was launched by a backfill.
    site.dagster("sensor", "stop", "-m", CODE_LOCATION, "pdb_new_batches")
    partitions = site.plan("pdb", "--limit", str(PLANNED_RECORDS), "--batch-size", "4")
    assert len(partitions) == PLANNED_RECORDS // BATCH_SIZE, partitions
    # Started as people start it, so the job backfill below (launched with -m, as the README
    # writes it) must find its code location under the name the workspace gives it.
    with dagster_server(site, None, "make-ui", make_target=True) as url:
        yield RunningDagster(site=site, url=url, partitions=partitions)


def wait_for_runs(
    instance: dg.DagsterInstance, partitions: set[str], timeout_s: float
) -> list[dg.DagsterRun]:
    """The pdb_ingest runs of `partitions`, once there is a finished one for each."""
    deadline = time.monotonic() + timeout_s
    while True:
        runs = [
            run
            for run in instance.get_runs(dg.RunsFilter(job_name="pdb_ingest"))
            if run.tags.get("dagster/partition") in partitions
        ]
        finished = {r.tags["dagster/partition"] for r in runs if r.status in FINISHED_RUN_STATUSES}
        if finished == partitions:
            return runs
        if time.monotonic() > deadline:
            states = {r.tags["dagster/partition"]: r.status.value for r in runs}
            pytest.fail(f"runs not finished after {timeout_s} s: {states}")
        time.sleep(1.0)


def partition_span(run: dg.DagsterRun) -> tuple[str, str]:
    """First and last partition of a run: a single one, or a range (a backfill policy's)."""
    if "dagster/partition" in run.tags:
        return run.tags["dagster/partition"], run.tags["dagster/partition"]
    return (
        run.tags["dagster/asset_partition_range_start"],
        run.tags["dagster/asset_partition_range_end"],
    )


def covered_partitions(running: RunningDagster, run: dg.DagsterRun) -> list[str]:
    first, last = partition_span(run)
    order = running.partitions
    return order[order.index(first) : order.index(last) + 1]


def published_source_ids(running: RunningDagster, monkeypatch: pytest.MonkeyPatch) -> set[str]:
    monkeypatch.setenv("OSA_DATA_DIR", str(running.site.data))
    db = RecordsDatabase(database_url(Settings.from_env()))
    with db.session() as session:
        return set(session.scalars(select(Record.source_id).where(Record.convention == "pdb")))


@pytest.mark.slow
def test_job_backfill_then_asset_backfill_of_the_rest(
    running_dagster: RunningDagster, monkeypatch: pytest.MonkeyPatch
):
    first_two, rest = running_dagster.partitions[:2], running_dagster.partitions[2:]
    running_dagster.site.dagster(
        "job", "backfill", "-m", CODE_LOCATION, "-j", "pdb_ingest",
        "--partitions", ",".join(first_two), "--noprompt",
    )  # fmt: skip
    with running_dagster.instance() as instance:
        runs = wait_for_runs(instance, set(first_two), RUNS_TIMEOUT_S)
        assert [r.status for r in runs] == [dg.DagsterRunStatus.SUCCESS] * 2
        assert len({r.tags["dagster/backfill"] for r in runs}) == 1
        assert len(instance.get_runs(dg.RunsFilter(job_name="pdb_ingest"))) == 2

    # Only the batch the job backfill left out is missing, so that is what --failed selects.
    launched = running_dagster.site.run(
        sys.executable, "-m", "osa_dagster.backfill", "pdb", "--failed",
        "--url", running_dagster.url, "--wait", str(ASSET_BACKFILL_TIMEOUT_S),
        timeout_s=ASSET_BACKFILL_TIMEOUT_S + 60,
    )  # fmt: skip
    match = re.search(r"launched backfill (\S+) of 1 pdb batches:\n  (\S+)\n", launched.stdout)
    assert match, launched.stdout
    backfill_id, selected = match.groups()
    assert [selected] == rest
    # It said how the runs were going while it waited, then that every run succeeded.
    assert f"backfill {backfill_id}: REQUESTED; runs: " in launched.stdout
    assert f"backfill {backfill_id} succeeded: all 1 runs succeeded" in launched.stdout

    with running_dagster.instance() as instance:
        backfill_runs = instance.get_runs(dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
        assert [partition_span(r) for r in backfill_runs] == [(rest[0], rest[-1])]
        assert all(r.status is dg.DagsterRunStatus.SUCCESS for r in backfill_runs)
        assert backfill_runs[0].tags["osa/convention"] == "pdb"
        features = dg.AssetKey(["pdb", "features"])
        assert instance.get_materialized_partitions(features) == set(running_dagster.partitions)
        # Job runs and the asset backfill's range run alike: every partition has its verdict.
        statuses = all_check_statuses(instance, "pdb")
        # Each run, launched by the daemon, recorded every check's verdict of each batch it
        # covered, and no execution without a partition.
        verdicts = verdicts_by_run(instance, "pdb")
        current = all_check_statuses(instance, "pdb", flags=True)
        covered = {run.run_id: covered_partitions(running_dagster, run) for run in runs}
        covered[backfill_runs[0].run_id] = rest
        assert verdicts == {
            run: {check: {p: current[check][p] for p in partitions} for check in current}
            for run, partitions in covered.items()
        }
    every_passed = dict.fromkeys(running_dagster.partitions, "SUCCEEDED")
    assert statuses == dict.fromkeys(statuses, every_passed)

    planned_entries = mirror_entries(MIRROR)[:PLANNED_RECORDS]
    expected = {pdb_id for pdb_id, path in planned_entries if expected_publishable(path)}
    assert len(expected) < PLANNED_RECORDS  # the damaged 1OSM is among them and is rejected
    assert published_source_ids(running_dagster, monkeypatch) == expected

    # Nothing failed or missing now: a second --failed launches nothing.
    again = running_dagster.site.run(
        sys.executable, "-m", "osa_dagster.backfill", "pdb", "--failed",
        "--url", running_dagster.url,
    )  # fmt: skip
    assert "nothing to backfill" in again.stdout


@pytest.mark.slow
def test_a_range_backfill_as_the_readme_writes_it(running_dagster: RunningDagster):
    first, last = running_dagster.partitions[0], running_dagster.partitions[1]
    launched = running_dagster.site.run(
        sys.executable, "-m", "osa_dagster.cli", "backfill", "pdb", "--from", first,
        "--to", last, "--url", running_dagster.url, "--wait", str(ASSET_BACKFILL_TIMEOUT_S),
        timeout_s=ASSET_BACKFILL_TIMEOUT_S + 60,
    )  # fmt: skip
    match = re.search(
        r"launched backfill (\S+) of 2 pdb batches:\n  (\S+)\n  (\S+)\n", launched.stdout
    )
    assert match, launched.stdout
    backfill_id, *selected = match.groups()
    assert selected == [first, last]
    assert f"backfill {backfill_id} succeeded: all 1 runs succeeded" in launched.stdout
    with running_dagster.instance() as instance:
        [backfill] = [b for b in instance.get_backfills() if b.backfill_id == backfill_id]
        assert backfill.title == f"osa backfill pdb: 2 batches ({first} to {last})"
        runs = instance.get_runs(dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
        assert [partition_span(r) for r in runs] == [(first, last)]


@pytest.mark.slow
def test_webserver_errors_are_raised_with_their_message(running_dagster: RunningDagster):
    webserver = DagsterWebserver(running_dagster.url)
    state = webserver.convention_partitions("pdb")
    assert state.partition_keys == running_dagster.partitions
    assert ["pdb", "raw_batch"] in state.asset_keys

    with pytest.raises(BackfillError, match=r"PartitionKeysNotFoundError: .*no-such-batch"):
        webserver.launch_asset_backfill(state.asset_keys, ["no-such-batch"], "bad", tags={})
    with pytest.raises(BackfillError, match=r"PythonError: .*'pdb', 'no_such_asset'"):
        webserver.launch_asset_backfill(
            [["pdb", "no_such_asset"]], state.partition_keys[:1], "bad", tags={}
        )
    with pytest.raises(BackfillError, match=r"no partitioned assets of convention 'nope'.*pdb"):
        webserver.convention_partitions("nope")
    with pytest.raises(BackfillError, match="BackfillNotFoundError"):
        webserver.backfill_status("nosuchid")


def test_an_unreachable_webserver_is_named():
    with pytest.raises(BackfillError, match=r"cannot reach the Dagster webserver at http://127"):
        DagsterWebserver("http://127.0.0.1:9").convention_partitions("pdb")


PLANNED = ConventionPartitions(
    convention="pdb",
    asset_keys=[["pdb", "raw_batch"]],
    partition_keys=["K-c", "K-a", "K-d", "K-b"],  # planning order, not sorted
    failed_or_missing=["K-a", "K-b"],
)


@pytest.mark.parametrize(
    ("selection", "expected"),
    [
        (PartitionSelection(keys=["K-b", "K-c"]), ["K-c", "K-b"]),
        (PartitionSelection(first="K-a", last="K-d"), ["K-a", "K-d"]),
        (PartitionSelection(first="K-d"), ["K-d", "K-b"]),
        (PartitionSelection(last="K-a"), ["K-c", "K-a"]),
        (PartitionSelection(failed_or_missing=True), ["K-a", "K-b"]),
    ],
)
def test_partitions_are_selected_in_planning_order(selection, expected):
    assert select_partitions(PLANNED, selection) == expected


def test_bad_selections_are_refused_with_what_is_wrong():
    with pytest.raises(BackfillError, match="pdb has no partition K-x, K-y"):
        select_partitions(PLANNED, PartitionSelection(keys=["K-a", "K-x", "K-y"]))
    with pytest.raises(BackfillError, match="--from K-b comes after --to K-a"):
        select_partitions(PLANNED, PartitionSelection(first="K-b", last="K-a"))
    with pytest.raises(ValueError, match="select partitions one way"):
        PartitionSelection(keys=["K-a"], failed_or_missing=True)
    with pytest.raises(ValueError, match="select partitions one way"):
        PartitionSelection()


def test_titles_fit_dagster_whatever_the_key_length():
    long_keys = [f"{'X' * 60}-{n}" for n in range(200)]
    for selection in (
        PartitionSelection(first=long_keys[0], last=long_keys[-1]),
        PartitionSelection(keys=long_keys),
        PartitionSelection(failed_or_missing=True),
    ):
        title = backfill_title("pdb", long_keys, selection)
        assert len(title) <= 100
        assert title.startswith("osa backfill pdb: 200 batches")
    short = backfill_title("pdb", ["K-a", "K-b"], PartitionSelection(first="K-a", last="K-b"))
    assert short == "osa backfill pdb: 2 batches (K-a to K-b)"
    assert len(backfill_title("x" * 150, long_keys, PartitionSelection(keys=["k"]))) == 100


def run(run_id: str, status: str, created: float, **tags: str) -> RunState:
    return RunState(run_id=run_id, status=status, created=created, tags=tags)


def test_a_batch_whose_last_run_failed_is_selected_even_if_its_assets_materialised():
    order = ["K-a", "K-b", "K-c", "K-d"]
    runs = [
        run("old-range", "SUCCESS", 1.0, **{RANGE_START_TAG: "K-a", RANGE_END_TAG: "K-c"}),
        run("b-again", "FAILURE", 2.0, **{PARTITION_TAG: "K-b"}),
        run("c-failed", "FAILURE", 3.0, **{PARTITION_TAG: "K-c"}),
        run("c-rerun", "SUCCESS", 4.0, **{PARTITION_TAG: "K-c"}),
        run("d-canceled", "CANCELED", 5.0, **{PARTITION_TAG: "K-d"}),
        run("other-convention", "FAILURE", 6.0, **{PARTITION_TAG: "Z-z"}),
    ]
    assert batches_whose_last_run_failed(runs, order) == {"K-b", "K-d"}


def test_a_backfill_succeeds_only_if_every_run_did():
    def state(status: str, **runs: str) -> BackfillState:
        return BackfillState(backfill_id="b1", status=status, run_statuses=runs)

    assert state("COMPLETED_SUCCESS", r1="SUCCESS", r2="SUCCESS").succeeded
    # What Dagster reported for runs that failed in an asset check after materialising.
    all_failed = state("COMPLETED_SUCCESS", r1="FAILURE", r2="FAILURE")
    assert not all_failed.succeeded
    assert all_failed.failed_runs == ["r1", "r2"]
    assert not state("COMPLETED_SUCCESS").succeeded  # no run at all did nothing
    assert not state("COMPLETED_FAILED", r1="SUCCESS").succeeded
    assert state("REQUESTED", r1="SUCCESS", r2="STARTED", r3="FAILURE").progress() == (
        "backfill b1: REQUESTED; runs: 1 succeeded, 1 failed, 1 running or queued"
    )
