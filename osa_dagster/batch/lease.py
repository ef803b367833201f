"""A lease per batch: one process works a batch at a time, whoever started it.

Two runs of the same batch (a sensor's and a CLI's, two backfills, the UI) would otherwise
fight: each takes the other's running hook for a leftover of a crash and kills it, and a
re-fetch deletes the files under a running hook. Every step that works a batch therefore
holds its lease, a row of `batch_leases` in the records database:

- acquiring is an INSERT that does nothing when the row exists; taking a dead holder's row
  is an UPDATE conditional on that holder's token. Both are atomic on SQLite and
  PostgreSQL alike, so of two takers exactly one wins, with no lock held between
  statements and nothing particular to either database (an advisory lock is PostgreSQL
  only and dies with its connection, not with its process; a conditional write in the
  store would need one mechanism per store, and S3 servers differ in what they support).
  Every run already shares the records database, whatever its artifact store.
- the holder renews its row's heartbeat every `heartbeat_s` from a thread, and deletes the
  row when done. A holder is dead, and its lease taken over, when its heartbeat is older
  than `timeout_s`, or at once when it ran on this machine (same host, boot and pid
  namespace) and its process is gone (pid absent, or reused by a later process).
- a step that finds its batch held by a live holder waits for it, at most `wait_s`, then
  fails with one line naming the holder. It does not skip the batch: a Dagster step over a
  range of partitions materialises all of them or fails, so a skipped batch would be
  reported materialised. The holder is doing the same work, so after a wait the step
  usually finds the batch done and returns at once.
- a holder that learns its lease was taken (it stalled past the timeout, e.g. a stopped
  process or a database it could not reach) fails its step with `LeaseLost` when the work
  ends, so that its result is not reported.

Leases cannot deadlock. A step either holds one lease at a time (each partition of its
range in turn), never waiting for one while it holds another, or holds the leases of its
whole range at once (`hold_all`, for a step that works its batches together), taking them
in one global order, sorted by batch, whatever order it names them in. So a holder that
waits holds only leases that come before the one it waits for, and the holder of that one
never waits for any of them: no two holders wait for each other. No Dagster here.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, CursorResult, Result, delete, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from osa_dagster.engine.process_identity import ProcessIdentity
from osa_dagster.records import RecordsDatabase
from osa_dagster.records.models import BatchLease

log = logging.getLogger(__name__)

HEARTBEAT_S = 10.0
# Silence after which a holder is presumed dead: several missed heartbeats, so that a
# loaded machine or a slow database does not lose a live holder its lease.
TIMEOUT_S = 60.0
POLL_S = 1.0


class BatchHeld(RuntimeError):
    """The batch stayed held by a live holder for longer than the step would wait."""


class LeaseLost(RuntimeError):
    """Another process took this lease over while it was held: the work may have overlapped."""


@dataclass(frozen=True)
class LeaseHolding:
    """Who holds a batch, as its row says."""

    convention: str
    batch: str
    token: str
    run_id: str | None
    step: str
    holder: ProcessIdentity
    acquired_at: float
    heartbeat_at: float

    @classmethod
    def from_row(cls, row: BatchLease) -> LeaseHolding:
        return cls(
            convention=row.convention,
            batch=row.batch,
            token=row.token,
            run_id=row.run_id,
            step=row.step,
            holder=ProcessIdentity.model_validate(row.holder),
            acquired_at=row.acquired_at,
            heartbeat_at=row.heartbeat_at,
        )

    def describe(self) -> str:
        run = f"run {self.run_id}" if self.run_id else "a process"
        return f"{run} (step {self.step}, {self.holder.describe()})"


@dataclass
class Lease:
    """A lease this process holds; `lost` is set if another process takes it over."""

    holding: LeaseHolding
    took_over: LeaseHolding | None
    """The dead holder this lease was taken from, if any."""
    waited_s: float = 0.0
    lost: threading.Event = field(default_factory=threading.Event)


class BatchLeases:
    """Leases of batches in one records database."""

    def __init__(
        self,
        db: RecordsDatabase,
        *,
        heartbeat_s: float = HEARTBEAT_S,
        timeout_s: float = TIMEOUT_S,
        poll_s: float = POLL_S,
    ) -> None:
        if not 0 < heartbeat_s < timeout_s:
            raise ValueError(
                f"the heartbeat ({heartbeat_s} s) must be positive and shorter than the "
                f"timeout ({timeout_s} s)"
            )
        self.db = db
        self.heartbeat_s = heartbeat_s
        self.timeout_s = timeout_s
        self.poll_s = poll_s

    def current(self, convention: str, batch: str) -> LeaseHolding | None:
        with self.db.session() as session:
            row = session.get(BatchLease, (convention, batch))
            return LeaseHolding.from_row(row) if row is not None else None

    @contextmanager
    def hold(
        self,
        convention: str,
        batch: str,
        *,
        step: str,
        run_id: str | None = None,
        wait_s: float,
        on_wait: Callable[[LeaseHolding], None] | None = None,
    ) -> Iterator[Lease]:
        """Hold the batch's lease for the body: wait up to `wait_s` for a live holder
        (`on_wait` is told who, once), take a dead holder's over, renew it while the body
        runs, release it after."""
        lease = self._acquire(convention, batch, step, run_id, wait_s, on_wait)
        stop = threading.Event()
        heartbeat = threading.Thread(
            target=self._heartbeat,
            args=(lease, stop),
            name=f"lease-{convention}-{batch}",
            daemon=True,
        )
        heartbeat.start()
        try:
            yield lease
        finally:
            stop.set()
            heartbeat.join()
            self._release(lease.holding)
        if lease.lost.is_set():
            raise LeaseLost(
                f"batch {batch!r} of convention {convention!r}: another process took this "
                f"step's lease over while it worked (it was presumed dead after "
                f"{self.timeout_s:g} s without a heartbeat); its result is not reported"
            )

    @contextmanager
    def hold_all(
        self,
        convention: str,
        batches: Iterable[str],
        *,
        step: str,
        run_id: str | None = None,
        wait_s: float,
        on_wait: Callable[[LeaseHolding], None] | None = None,
    ) -> Iterator[list[Lease]]:
        """Hold the leases of all `batches` for the body, as `hold` holds one, taking them
        in sorted order: every holder of several takes them in this one order, so two holders
        of overlapping sets never each hold what the other waits for."""
        with ExitStack() as held:
            yield [
                held.enter_context(
                    self.hold(
                        convention,
                        batch,
                        step=step,
                        run_id=run_id,
                        wait_s=wait_s,
                        on_wait=on_wait,
                    )
                )
                for batch in sorted(set(batches))
            ]

    def _acquire(
        self,
        convention: str,
        batch: str,
        step: str,
        run_id: str | None,
        wait_s: float,
        on_wait: Callable[[LeaseHolding], None] | None,
    ) -> Lease:
        me = ProcessIdentity.of_this_process()
        started = time.monotonic()
        told: str | None = None
        while True:
            outcome = self._try_acquire(convention, batch, step, run_id, me)
            if isinstance(outcome, Lease):
                outcome.waited_s = time.monotonic() - started
                return outcome
            if outcome is not None:
                if outcome.token != told and on_wait is not None:
                    on_wait(outcome)
                told = outcome.token
                if time.monotonic() - started >= wait_s:
                    raise BatchHeld(
                        f"batch {batch!r} of convention {convention!r} is held by "
                        f"{outcome.describe()}, alive and working it; waited {wait_s:g} s. "
                        "Run the batch again once that run has ended."
                    )
                time.sleep(self.poll_s)

    def _try_acquire(
        self, convention: str, batch: str, step: str, run_id: str | None, me: ProcessIdentity
    ) -> Lease | LeaseHolding | None:
        """The lease; or who holds it, alive; or None if its holder released it meanwhile."""
        token = uuid.uuid4().hex
        with self.db.session() as session, session.begin():
            now = _now(session)
            values = {
                "token": token,
                "run_id": run_id,
                "step": step,
                "holder": me.model_dump(),
                "acquired_at": now,
                "heartbeat_at": now,
            }
            inserted = session.execute(
                _insert_if_absent(session).values(convention=convention, batch=batch, **values)
            )
            if _rows_changed(inserted) == 1:
                return Lease(self._holding(convention, batch, values), took_over=None)
            row = session.get(BatchLease, (convention, batch))
            if row is None:
                return None
            held = LeaseHolding.from_row(row)
            if not self._dead(held, now):
                return held
            taken = session.execute(
                update(BatchLease)
                .where(
                    BatchLease.convention == convention,
                    BatchLease.batch == batch,
                    BatchLease.token == held.token,
                )
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            if _rows_changed(taken) != 1:
                return None  # another taker won: look again
        log.warning(
            "batch %s of convention %s: took the lease of %s over (%s)",
            batch,
            convention,
            held.describe(),
            "its process is gone"
            if held.holder.alive() is False
            else f"no heartbeat for {now - held.heartbeat_at:.0f} s",
        )
        return Lease(self._holding(convention, batch, values), took_over=held)

    @staticmethod
    def _holding(convention: str, batch: str, values: dict) -> LeaseHolding:
        return LeaseHolding(
            convention=convention,
            batch=batch,
            token=values["token"],
            run_id=values["run_id"],
            step=values["step"],
            holder=ProcessIdentity.model_validate(values["holder"]),
            acquired_at=values["acquired_at"],
            heartbeat_at=values["heartbeat_at"],
        )

    def _dead(self, held: LeaseHolding, now: float) -> bool:
        return held.holder.alive() is False or now - held.heartbeat_at > self.timeout_s

    def _heartbeat(self, lease: Lease, stop: threading.Event) -> None:
        holding = lease.holding
        renewed_at = time.monotonic()
        while not stop.wait(self.heartbeat_s):
            try:
                with self.db.session() as session, session.begin():
                    renewed = session.execute(
                        update(BatchLease)
                        .where(*_mine(holding))
                        .values(heartbeat_at=_now(session))
                        .execution_options(synchronize_session=False)
                    )
            except Exception as error:
                # Expected now and then (a database busy with another writer, or unreachable
                # for a while): one line, and the next heartbeat tries again; the lease is
                # only at risk after `timeout_s` without one, which the line says.
                log.warning(
                    "batch %s of convention %s: could not renew its lease (%s); last renewed "
                    "%.0f s ago, presumed dead after %g s; trying again in %g s",
                    holding.batch,
                    holding.convention,
                    _first_line(error),
                    time.monotonic() - renewed_at,
                    self.timeout_s,
                    self.heartbeat_s,
                )
                log.debug("the lease renewal's error", exc_info=True)
                continue
            renewed_at = time.monotonic()
            if _rows_changed(renewed) != 1:
                log.error(
                    "batch %s of convention %s: another process took this lease over",
                    holding.batch,
                    holding.convention,
                )
                lease.lost.set()
                return

    def _release(self, holding: LeaseHolding) -> None:
        with self.db.session() as session, session.begin():
            session.execute(
                delete(BatchLease)
                .where(*_mine(holding))
                .execution_options(synchronize_session=False)
            )


def _first_line(error: Exception) -> str:
    """An error in one line: SQLAlchemy's carry the statement and a link on the next ones."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _rows_changed(result: Result[Any]) -> int:
    """How many rows an INSERT, UPDATE or DELETE changed: its result is a CursorResult."""
    assert isinstance(result, CursorResult)
    return result.rowcount


def _mine(holding: LeaseHolding) -> tuple[ColumnElement[bool], ...]:
    """The lease's row, as long as `holding` still holds it."""
    return (
        BatchLease.convention == holding.convention,
        BatchLease.batch == holding.batch,
        BatchLease.token == holding.token,
    )


def _insert_if_absent(session: Session) -> postgresql.Insert | sqlite.Insert:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(BatchLease).on_conflict_do_nothing()
    if dialect == "sqlite":
        return sqlite.insert(BatchLease).on_conflict_do_nothing()
    raise ValueError(f"the records database must be PostgreSQL or SQLite, not {dialect}")


def _now(session: Session) -> float:
    """Seconds since the epoch on the database's clock, which every holder shares (a SQLite
    file is on this machine, whose clock is the database's)."""
    if session.get_bind().dialect.name == "postgresql":
        return float(session.scalar(text("SELECT extract(epoch FROM clock_timestamp())")))
    return time.time()
