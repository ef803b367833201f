"""One machine's room for hook attempts: CPU slots and a memory budget, shared by every
attempt on the machine whatever process, run or batch starts it.

An attempt is admitted when a slot is free and its memory limit fits in what the running
attempts' limits leave of the budget; otherwise it waits, so a large rung waits for room
while smaller attempts go on. An attempt whose limit is larger than the whole budget counts
as the whole budget: it runs alone. A waiter that has waited longer than `patience_s` holds
back every younger one until it is admitted, so a steady stream of small attempts cannot
starve a large one.

The mechanism is a ledger: one small JSON file naming every admitted and waiting attempt,
read and rewritten under an fcntl lock on a file beside it. Each entry names its holder (a
`ProcessIdentity`), and every read drops the entries of holders seen dead, so the share of a
SIGKILLed orchestrator comes back at the next read; the lock itself is the kernel's and dies
with its holder. A holder that cannot be seen from the reading process (the step containers
of the Docker executor share the data folder, and so the ledger, but each has its own pid
namespace) is never judged by its pid: its entry carries a heartbeat, renewed every
`HEARTBEAT_S` while it waits or runs, and is dropped once the heartbeat is older than
`UNSEEN_HOLDER_TTL_S`. A holder that died in another pid namespace thus keeps its share for
at most that long after its last heartbeat (the clocks of the processes sharing the ledger
must agree: one kernel's, or hosts kept in step). Why not the alternatives:

- a parent cgroup whose limit is the budget caps the attempts' *usage* together: past it,
  the kernel kills some attempt of the group, maybe a small one well inside its own limit,
  whose OOM the engine would then read as its own and climb its ladder for nothing. Nothing
  would wait for room either, and Docker's containers are not in our cgroups.
- SysV semaphores (the only ones the kernel undoes at exit) count units, not megabytes per
  holder, and say nothing of who holds what; a ledger is one file a person can read.

Attempts of one process wait on a condition that each release in the process notifies;
releases by other processes are seen at the next poll (`POLL_S`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, Field

from osa_dagster.engine.cgroup import memory_limit_bytes
from osa_dagster.engine.process_identity import ProcessIdentity

log = logging.getLogger(__name__)

POLL_S = 0.2
HEARTBEAT_S = 10.0
UNSEEN_HOLDER_TTL_S = 60.0
DEFAULT_PATIENCE_S = 30.0
# Of the memory the orchestrator may use (its cgroup's limit, or the host's), what hook
# attempts may have together by default: the rest is the orchestrator's and the kernel's.
DEFAULT_BUDGET_FRACTION = 0.8
_MB = 1024 * 1024
# Notified by every release in this process, whichever HookCapacity object made it.
_RELEASED = threading.Condition()


class Entry(BaseModel):
    id: str
    holder: ProcessIdentity
    limit_mb: int
    """The attempt's own memory limit."""
    charge_mb: int
    """What it takes from the budget: its limit, or the whole budget when that is smaller."""
    label: str
    since: float
    """time.time() when it was admitted, or when it began to wait."""
    running: bool
    heartbeat: float
    """time.time() when its holder last said it still waits or runs."""

    def kept(self, now: float, unseen_ttl_s: float) -> bool:
        """Whether its holder may still hold it: alive, or not seen from here and heard of
        within `unseen_ttl_s`."""
        alive = self.holder.alive()
        return alive is True or (alive is None and now - self.heartbeat <= unseen_ttl_s)


class LedgerState(BaseModel):
    entries: list[Entry] = Field(default_factory=list)

    def running(self) -> list[Entry]:
        return [e for e in self.entries if e.running]


class Cancelled(Exception):
    """The work was cancelled (its run was terminated) before it ended."""


@dataclass(frozen=True)
class Admission:
    """An admitted attempt: how long it waited for room."""

    entry_id: str
    queued_s: float


class AdmissionTurn:
    """A place in the order in which chains of attempts of one process first ask for room.
    Threads reach the ledger in whatever order the scheduler lets them; a chain with a turn
    asks only once the chain before it was admitted (or ended without asking), so that the
    order given (the longest chains first) is the order they start in. A chain's later
    attempts do not wait."""

    def __init__(self, previous: AdmissionTurn | None) -> None:
        self._previous = previous
        self._taken = threading.Event()

    @classmethod
    def in_order(cls, count: int) -> list[AdmissionTurn]:
        turns: list[AdmissionTurn] = []
        for _ in range(count):
            turns.append(cls(turns[-1] if turns else None))
        return turns

    def wait(self, cancel: threading.Event | None, label: str) -> None:
        """Until the chain before this one has taken its turn; setting `cancel` ends the
        wait with `Cancelled`."""
        if self._previous is None or self._taken.is_set():
            return
        while not self._previous._taken.wait(POLL_S):
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"{label} was cancelled while waiting for its turn")

    def taken(self) -> None:
        """The chain was admitted, or ended without asking: the next may ask."""
        self._taken.set()


class HookCapacity:
    """The machine's slots and memory budget, kept in the ledger at `ledger_path`."""

    def __init__(
        self,
        ledger_path: Path,
        *,
        slots: int,
        budget_mb: int,
        patience_s: float = DEFAULT_PATIENCE_S,
        heartbeat_s: float = HEARTBEAT_S,
        unseen_holder_ttl_s: float = UNSEEN_HOLDER_TTL_S,
    ) -> None:
        if slots < 1 or budget_mb < 1:
            raise ValueError(f"slots and budget must be positive, not {slots} and {budget_mb} MB")
        self.ledger_path = ledger_path
        self.lock_path = ledger_path.with_name(ledger_path.name + ".lock")
        self.slots = slots
        self.budget_mb = budget_mb
        self.patience_s = patience_s
        self.heartbeat_s = heartbeat_s
        self.unseen_holder_ttl_s = unseen_holder_ttl_s
        self._holder = ProcessIdentity.of_this_process()

    def __repr__(self) -> str:
        return f"HookCapacity({self.slots} slots, {self.budget_mb} MB, {self.ledger_path})"

    @contextlib.contextmanager
    def admit(
        self, limit_mb: int, label: str, cancel: threading.Event | None = None
    ) -> Iterator[Admission]:
        """Wait until an attempt of `limit_mb` may run, and hold its share while inside.

        Setting `cancel` ends the wait with `Cancelled`.
        """
        now = time.time()
        entry = Entry(
            id=uuid.uuid4().hex,
            holder=self._holder_now(),
            limit_mb=limit_mb,
            charge_mb=min(limit_mb, self.budget_mb),
            label=label,
            since=now,
            running=False,
            heartbeat=now,
        )
        started = time.monotonic()
        told = False
        try:
            while not self._try_admit(entry):
                if cancel is not None and cancel.is_set():
                    raise Cancelled(f"{label} was cancelled while waiting for room")
                if not told:
                    told = True
                    log.info("%s waits for %d MB and a slot (%s)", label, limit_mb, self.describe())
                with _RELEASED:
                    _RELEASED.wait(POLL_S)
            queued = time.monotonic() - started
            if told:
                log.info("%s admitted after %.1f s in the queue", label, queued)
            with self._heartbeats(entry):
                yield Admission(entry.id, queued)
        finally:
            self._remove(entry.id)

    def describe(self) -> str:
        """What runs now, for a person reading the logs."""
        state = self.read()
        running = state.running()
        used = sum(e.charge_mb for e in running)
        waiting = len(state.entries) - len(running)
        return (
            f"{len(running)}/{self.slots} slots, {used}/{self.budget_mb} MB in use, "
            f"{waiting} waiting"
        )

    def read(self) -> LedgerState:
        """The ledger as it is now, without dead holders' entries."""
        with self._locked() as state:
            return state

    def _holder_now(self) -> ProcessIdentity:
        # A forked child (a test's helper process) must not pass for its parent.
        if self._holder.pid != os.getpid():
            self._holder = ProcessIdentity.of_this_process()
        return self._holder

    @contextlib.contextmanager
    def _heartbeats(self, entry: Entry) -> Iterator[None]:
        """Renew the admitted entry's heartbeat until the attempt ends."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.heartbeat_s):
                self._renew(entry)

        beating = threading.Thread(target=beat, name=f"ledger heartbeat {entry.label}", daemon=True)
        beating.start()
        try:
            yield
        finally:
            stop.set()
            beating.join()

    def _renew(self, entry: Entry) -> None:
        with self._locked() as state:
            entry.heartbeat = time.time()
            if not any(e.id == entry.id for e in state.entries):
                # Dropped by a process that could not see this one and had not heard of it
                # for too long (a stopped container, a clock jump): it runs, so it counts.
                log.warning("%s was missing from the ledger; entered again", entry.label)
            state.entries = [*(e for e in state.entries if e.id != entry.id), entry]

    def _try_admit(self, entry: Entry) -> bool:
        with self._locked() as state:
            others = [e for e in state.entries if e.id != entry.id]
            running = [e for e in others if e.running]
            now = time.time()
            if now - entry.heartbeat >= self.heartbeat_s:
                entry.heartbeat = now  # not at every poll: each change rewrites the ledger
            starving = [
                e
                for e in others
                if not e.running and e.since < entry.since and now - e.since > self.patience_s
            ]
            free_mb = self.budget_mb - sum(e.charge_mb for e in running)
            if len(running) < self.slots and entry.charge_mb <= free_mb and not starving:
                entry.running, entry.since = True, now
            state.entries = [*others, entry]
            return entry.running

    def _remove(self, entry_id: str) -> None:
        with self._locked() as state:
            state.entries = [e for e in state.entries if e.id != entry_id]
        with _RELEASED:
            _RELEASED.notify_all()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[LedgerState]:
        """The ledger under the lock, dead holders dropped; saved back if it changed."""
        self.ledger_path.parent.mkdir(parents=True, exist_ok=True)
        with self.lock_path.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                loaded = self._load()
                now = time.time()
                kept = [e for e in loaded.entries if e.kept(now, self.unseen_holder_ttl_s)]
                state = LedgerState(entries=kept)
                yield state
                if state.entries != loaded.entries:
                    tmp = self.ledger_path.with_name(self.ledger_path.name + ".tmp")
                    tmp.write_text(state.model_dump_json(indent=1))
                    tmp.replace(self.ledger_path)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _load(self) -> LedgerState:
        try:
            text = self.ledger_path.read_text()
        except FileNotFoundError:
            return LedgerState()
        try:
            return LedgerState.model_validate_json(text)
        except ValueError:
            # Only this module writes it, atomically; a damaged ledger is rebuilt from the
            # attempts that come next, which is safe: its holders re-register as they wait.
            log.warning("ignoring an unreadable hook capacity ledger at %s", self.ledger_path)
            return LedgerState()


def default_slots() -> int:
    """The CPUs this process may run on (its affinity, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0))


def default_budget_mb(fraction: float = DEFAULT_BUDGET_FRACTION, root: Path = Path("/")) -> int:
    """`fraction` of the memory this process may really use: the smallest of the host's
    memory and the limits of its cgroup and every cgroup above it (v1 or v2). `root` is
    where /proc and /sys are found; the tests give it a made-up tree."""
    total = _meminfo_total_bytes(root)
    limit = memory_limit_bytes(root)
    available = min(total, limit) if limit else total
    return max(1, int(available * fraction) // _MB)


def _meminfo_total_bytes(root: Path) -> int:
    for line in (root / "proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{root / 'proc/meminfo'} has no MemTotal")
