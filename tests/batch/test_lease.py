"""The lease per batch, on SQLite and PostgreSQL: one holder at a time, waits bounded,
dead holders taken over (at once when provably dead here, else after the timeout), and
exactly one winner when several processes take a dead lease at once."""

from __future__ import annotations

import json
import logging
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import event, text, update

from osa_dagster.batch.lease import BatchHeld, BatchLeases, LeaseHolding, LeaseLost
from osa_dagster.engine.process_identity import ProcessIdentity
from osa_dagster.records import RecordsDatabase
from osa_dagster.records.models import BatchLease
from tests.engine.helpers import eventually

REPO = Path(__file__).resolve().parents[2]
ELSEWHERE = ProcessIdentity(
    host="another-host", boot_id="b", pid_namespace="pid:[1]", pid=4242, start_ticks=7
)

HOLD = """
import sys, time
from osa_dagster.batch.lease import BatchLeases
from osa_dagster.records import RecordsDatabase
leases = BatchLeases(RecordsDatabase(sys.argv[1]))
with leases.hold("conv", "b1", step="holder", run_id="r1", wait_s=0):
    print("held", flush=True)
    sys.stdin.read()  # until the test kills us
"""

TAKE = """
import json, sys
from osa_dagster.batch.lease import BatchLeases, BatchHeld
from osa_dagster.records import RecordsDatabase
leases = BatchLeases(RecordsDatabase(sys.argv[1]), poll_s=0.01)
print("ready", flush=True)
sys.stdin.readline()  # all takers start together
try:
    with leases.hold("conv", "b1", step="taker", wait_s=0) as lease:
        print(json.dumps({"took": True}), flush=True)
        sys.stdin.readline()  # hold it until every taker has tried
except BatchHeld as held:
    print(json.dumps({"took": False, "why": str(held)}), flush=True)
"""


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RecordsDatabase]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'records.db'}"
    else:
        url = request.getfixturevalue("postgres").url
    database = RecordsDatabase(url)
    yield database
    database.engine.dispose()


def _leases(db: RecordsDatabase, **kwargs: float) -> BatchLeases:
    return BatchLeases(db, poll_s=0.01, **kwargs)


def _set_row(db: RecordsDatabase, **values: object) -> None:
    with db.session() as session, session.begin():
        session.execute(update(BatchLease).values(**values))


def _hold_in_a_process(db: RecordsDatabase) -> subprocess.Popen[str]:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, db.url],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline() == "held\n"
    return holder


def test_the_lease_is_released_after_its_body(db: RecordsDatabase):
    leases = _leases(db)
    with leases.hold("conv", "b1", step="s", run_id="r1", wait_s=0) as lease:
        assert leases.current("conv", "b1") == lease.holding
        assert lease.holding.holder == ProcessIdentity.of_this_process()
        assert lease.took_over is None
    assert leases.current("conv", "b1") is None
    with leases.hold("conv", "b1", step="s", wait_s=0):  # free again, at once
        pass


def test_a_live_holder_keeps_the_batch_and_the_wait_is_bounded(db: RecordsDatabase):
    holder = _hold_in_a_process(db)
    try:
        leases = _leases(db)
        told = []
        with (
            pytest.raises(BatchHeld) as held,
            leases.hold("conv", "b1", step="second", wait_s=0.2, on_wait=told.append),
        ):
            pytest.fail("a live holder's lease was taken")
        message = str(held.value)
        assert "\n" not in message
        assert f"run r1 (step holder, pid {holder.pid} on " in message
        assert "waited 0.2 s" in message
        assert [h.holder.pid for h in told] == [holder.pid]  # told once, not at every poll
        # Another batch is not held.
        with leases.hold("conv", "b2", step="second", wait_s=0):
            pass
    finally:
        holder.kill()
        holder.wait()


def test_a_waiting_step_gets_the_batch_when_its_holder_releases_it(db: RecordsDatabase):
    leases = _leases(db)
    waiting, got = threading.Event(), []

    def second() -> None:
        with leases.hold(
            "conv", "b1", step="second", wait_s=300, on_wait=lambda _: waiting.set()
        ) as lease:
            got.append(lease)

    with leases.hold("conv", "b1", step="first", wait_s=0) as first:
        thread = threading.Thread(target=second)
        thread.start()
        assert waiting.wait(30)
        assert not got  # still waiting while the first holds it
    thread.join(30)
    [lease] = got
    assert lease.took_over is None and lease.holding.token != first.holding.token


def test_holders_of_overlapping_batches_named_in_opposite_orders_both_get_them(
    db: RecordsDatabase,
):
    """Were leases taken in the order each holder names them, `first` would hold b1 and b2
    and wait for b3 while `second` held b4 and b3 and waited for b2: each for the other."""
    leases = _leases(db)
    told: dict[str, list[str]] = {"first": [], "second": []}
    waiting = {"first": threading.Event(), "second": threading.Event()}
    held: dict[str, list[str]] = {}

    def hold_all(name: str, batches: list[str]) -> None:
        def on_wait(holding: LeaseHolding) -> None:
            told[name].append(holding.batch)
            waiting[name].set()

        with leases.hold_all("conv", batches, step=name, wait_s=300, on_wait=on_wait) as got:
            held[name] = [lease.holding.batch for lease in got]

    with leases.hold("conv", "b3", step="blocker", wait_s=0):
        first = threading.Thread(target=hold_all, args=("first", ["b1", "b2", "b3"]))
        first.start()
        assert waiting["first"].wait(30)  # holds b1 and b2, waits for b3
        second = threading.Thread(target=hold_all, args=("second", ["b4", "b3", "b2"]))
        second.start()
        assert waiting["second"].wait(30)
        # The second waits for the first's b2 before it takes anything: b4 is free.
        assert told == {"first": ["b3"], "second": ["b2"]}
        assert leases.current("conv", "b4") is None
        assert leases.current("conv", "b2").step == "first"
    first.join(60)
    second.join(60)
    assert held == {"first": ["b1", "b2", "b3"], "second": ["b2", "b3", "b4"]}
    assert [leases.current("conv", b) for b in ("b1", "b2", "b3", "b4")] == [None] * 4


def test_a_sigkilled_holders_lease_is_taken_over_at_once(db: RecordsDatabase):
    holder = _hold_in_a_process(db)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    # Its heartbeat is fresh: only its liveness says it is dead.
    leases = _leases(db, timeout_s=3600)
    with leases.hold("conv", "b1", step="next", wait_s=0) as lease:
        assert lease.took_over is not None
        assert (lease.took_over.run_id, lease.took_over.holder.pid) == ("r1", holder.pid)
    assert leases.current("conv", "b1") is None


def test_a_holder_that_cannot_be_checked_here_is_taken_over_after_the_timeout(
    db: RecordsDatabase,
):
    leases = _leases(db, heartbeat_s=1, timeout_s=60)
    # A holder on another machine: alive as far as anyone here can tell.
    now = time.time() if db.engine.dialect.name == "sqlite" else _postgres_now(db)
    with db.session() as session, session.begin():
        session.add(
            BatchLease(
                convention="conv",
                batch="b1",
                token="elsewhere",
                run_id="r0",
                step="s",
                holder=ELSEWHERE.model_dump(),
                acquired_at=now - 100,
                heartbeat_at=now - 5,
            )
        )
    with pytest.raises(BatchHeld), leases.hold("conv", "b1", step="s", wait_s=0):
        pass
    # Its heartbeats stopped 61 s ago: presumed dead.
    _set_row(db, heartbeat_at=now - 61)
    with leases.hold("conv", "b1", step="s", wait_s=0) as taken:
        assert taken.took_over is not None
        assert taken.took_over.holder == ELSEWHERE


def _postgres_now(db: RecordsDatabase) -> float:
    with db.session() as session:
        return float(session.scalar(text("SELECT extract(epoch FROM clock_timestamp())")))


def test_a_holder_whose_lease_is_taken_over_fails_when_its_work_ends(db: RecordsDatabase):
    leases = _leases(db, heartbeat_s=0.05, timeout_s=60)
    with (
        pytest.raises(LeaseLost, match="another process took this step's lease over"),
        leases.hold("conv", "b1", step="s", wait_s=0) as lease,
    ):
        _set_row(db, token="someone-else")  # what a takeover leaves
        assert lease.lost.wait(30)
    assert leases.current("conv", "b1").token == "someone-else"  # its row is not touched


def test_of_many_takers_of_a_dead_lease_exactly_one_wins(db: RecordsDatabase):
    holder = _hold_in_a_process(db)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    takers = [
        subprocess.Popen(
            [sys.executable, "-c", TAKE, db.url],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    for taker in takers:
        assert taker.stdout is not None and taker.stdout.readline() == "ready\n"
    for taker in takers:
        taker.stdin.write("go\n")  # type: ignore[union-attr]
        taker.stdin.flush()  # type: ignore[union-attr]
    results = [json.loads(t.stdout.readline()) for t in takers]  # type: ignore[union-attr]
    for taker in takers:
        taker.communicate("done\n", timeout=60)
    assert sorted(r["took"] for r in results) == [False, False, False, True]
    assert all("held by" in r["why"] for r in results if not r["took"])


class _Renewals(logging.Handler):
    """The lease's log records, and an event for each kind a test waits on."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.failed = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if record.levelno == logging.WARNING and "could not renew" in record.getMessage():
            self.failed.set()


def test_a_renewal_the_locked_database_refuses_is_one_line_and_tried_again(tmp_path: Path):
    """What a flood of feature rows did to the probe's run: another writer holds SQLite's
    lock past the busy timeout. The renewal says so in one line, without a traceback, and the
    next heartbeat renews the lease once the lock is free."""
    db = RecordsDatabase(f"sqlite:///{tmp_path / 'records.db'}")
    # The lock is held past the busy timeout at once, rather than after its 30 s.
    event.listen(
        db.engine, "connect", lambda connection, _: connection.execute("PRAGMA busy_timeout=50")
    )
    db.engine.dispose()
    renewals = _Renewals()
    lease_log = logging.getLogger("osa_dagster.batch.lease")
    lease_log.addHandler(renewals)
    lease_log.setLevel(logging.DEBUG)
    try:
        leases = _leases(db, heartbeat_s=0.05, timeout_s=60)
        with leases.hold("conv", "b1", step="s", wait_s=0) as lease:
            writer = sqlite3.connect(tmp_path / "records.db", isolation_level=None)
            writer.execute("BEGIN IMMEDIATE")  # the other writer's long transaction
            assert renewals.failed.wait(30)
            writer.execute("ROLLBACK")
            writer.close()
            before = leases.current("conv", "b1").heartbeat_at
            assert eventually(lambda: leases.current("conv", "b1").heartbeat_at > before, 30)
        assert not lease.lost.is_set()
    finally:
        lease_log.removeHandler(renewals)
        db.engine.dispose()
    [failure, *_] = [r for r in renewals.records if r.levelno == logging.WARNING]
    message = failure.getMessage()
    assert failure.exc_info is None
    assert "\n" not in message
    assert message.startswith(
        "batch b1 of convention conv: could not renew its lease "
        "((sqlite3.OperationalError) database is locked); last renewed "
    )
    assert message.endswith("presumed dead after 60 s; trying again in 0.05 s")
    # The traceback is there for --debug.
    assert any(r.levelno == logging.DEBUG and r.exc_info for r in renewals.records)
