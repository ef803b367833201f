"""The embedded profile's event log (osa_dagster/defs/event_log.py): Dagster's SQLite storage
with its databases kept open. What it stores must read the same from other processes, from
Dagster's own SQLite storage and from the UI's live view of a run, whatever is still open."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import dagster as dg
import pytest

from osa_dagster.defs.event_log import OPEN_RUN_DATABASES, PooledSqliteEventLogStorage
from tests.conftest import REPO

# Generous: the suite runs on loaded machines; the wait ends as soon as the event arrives.
EVENT_TIMEOUT_S = 120.0


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A Dagster home with the repo's embedded profile, its folders under `tmp_path`."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    profile = (REPO / "dagster.yaml").read_text()
    assert "PooledSqliteEventLogStorage" in profile
    (home / "dagster.yaml").write_text(
        profile.replace("base_dir: dagster", f"base_dir: {tmp_path / 'dagster'}")
    )
    return home


@pytest.fixture
def instance(home: Path) -> Iterator[dg.DagsterInstance]:
    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert isinstance(instance.event_log_storage, PooledSqliteEventLogStorage)
        yield instance


def _run(instance: dg.DagsterInstance) -> dg.DagsterRun:
    return instance.create_run_for_job(dg.GraphDefinition("noop").to_job())


def _messages(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    return [entry.message for entry in instance.all_logs(run_id)]


# Writes engine events into a run from another process, then keeps its databases open until
# told to exit: until then nothing is checkpointed into the database files.
WRITER = """
import sys
import dagster as dg
with dg.DagsterInstance.from_config(sys.argv[1]) as instance:
    run = instance.get_run_by_id(sys.argv[2])
    for message in sys.argv[3:]:
        instance.report_engine_event(message, run)
    print("written", flush=True)
    sys.stdin.readline()
"""


@pytest.fixture
def writer(home: Path) -> Iterator[Callable[..., None]]:
    processes: list[subprocess.Popen[str]] = []

    def write(run_id: str, *messages: str) -> None:
        process = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(home), run_id, *messages],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        processes.append(process)
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "written"

    yield write
    for process in processes:
        process.communicate("\n", timeout=EVENT_TIMEOUT_S)


def test_another_process_reads_events_while_their_writer_keeps_the_database_open(
    instance: dg.DagsterInstance, writer
):
    run = _run(instance)
    writer(run.run_id, "first", "second")
    assert {"first", "second"} <= set(_messages(instance, run.run_id))


def test_the_live_view_of_a_run_sees_events_written_by_a_process_that_stays_open(
    instance: dg.DagsterInstance, writer
):
    """The UI's run page watches the run's events; the writer has not closed (checkpointed)
    its database, so only the WAL file changed."""
    run = _run(instance)
    seen = threading.Event()

    def on_event(entry: dg.EventLogEntry, _cursor: str) -> None:
        if entry.message == "live":
            seen.set()

    instance.watch_event_logs(run.run_id, None, on_event)
    try:
        writer(run.run_id, "live")
        assert seen.wait(EVENT_TIMEOUT_S), "the watch never saw the event"
    finally:
        instance.end_watch_event_logs(run.run_id, on_event)


def test_dagsters_own_sqlite_storage_reads_what_it_stored(
    instance: dg.DagsterInstance, tmp_path: Path
):
    run = _run(instance)
    instance.report_engine_event("stored", run)
    instance.event_log_storage.dispose()  # as at the end of a process
    stock = {"storage": {"sqlite": {"base_dir": str(tmp_path / "dagster" / "storage")}}}
    with dg.instance_for_test(overrides=stock) as plain:
        assert type(plain.event_log_storage).__name__ == "SqliteEventLogStorage"
        assert plain.get_run_by_id(run.run_id) is not None
        assert "stored" in _messages(plain, run.run_id)


def _write_in_child(instance: dg.DagsterInstance, run_id: str) -> None:
    instance.report_engine_event("from the child", instance.get_run_by_id(run_id))


def test_a_forked_child_writes_through_its_own_connection(instance: dg.DagsterInstance):
    run = _run(instance)
    instance.report_engine_event("before the fork", run)  # the parent's connection is open
    child = multiprocessing.get_context("fork").Process(
        target=_write_in_child, args=(instance, run.run_id)
    )
    child.start()
    child.join(EVENT_TIMEOUT_S)
    assert child.exitcode == 0
    instance.report_engine_event("after the fork", run)
    assert {"before the fork", "from the child", "after the fork"} <= set(
        _messages(instance, run.run_id)
    )
    path = instance.event_log_storage.path_for_shard(run.run_id)
    with sqlite3.connect(path) as check:
        assert check.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def _open_databases(folder: Path) -> set[str]:
    names = set()
    for fd in Path("/proc/self/fd").iterdir():
        target = os.path.realpath(fd)
        if target.startswith(str(folder)) and target.endswith(".db"):
            names.add(Path(target).name)
    return names


def test_it_keeps_at_most_its_limit_of_run_databases_open(instance: dg.DagsterInstance):
    storage = instance.event_log_storage
    assert isinstance(storage, PooledSqliteEventLogStorage)
    folder = Path(storage.path_for_shard("index")).parent
    runs = [_run(instance) for _ in range(OPEN_RUN_DATABASES + 4)]
    for run in runs:
        instance.report_engine_event(f"event of {run.run_id}", run)
    open_now = _open_databases(folder)
    assert "index.db" in open_now
    assert len(open_now - {"index.db"}) == OPEN_RUN_DATABASES
    assert f"{runs[0].run_id}.db" not in open_now  # the least recently used was closed
    # and opens again when needed
    assert f"event of {runs[0].run_id}" in _messages(instance, runs[0].run_id)


def test_wipe_deletes_the_run_databases_it_holds_open(instance: dg.DagsterInstance):
    run = _run(instance)
    instance.report_engine_event("to be wiped", run)
    path = Path(instance.event_log_storage.path_for_shard(run.run_id))
    assert path.exists()
    instance.wipe()
    assert not path.exists()
    again = _run(instance)
    instance.report_engine_event("after the wipe", again)
    assert "after the wipe" in _messages(instance, again.run_id)
