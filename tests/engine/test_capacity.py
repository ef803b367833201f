"""The machine's capacity for hook attempts (engine/capacity.py): one memory budget and a
number of slots that every attempt on the machine draws from, whatever run it belongs to."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from osa_sdk.types import OutcomeStatus

from osa_dagster.engine import (
    AttemptOptions,
    Cancelled,
    Checkpoint,
    FileCheckpointIO,
    LocalRunner,
    run_hook,
)
from osa_dagster.engine.capacity import AdmissionTurn, HookCapacity
from osa_dagster.settings import Settings

from .helpers import BEHAVE, HOOKS, Harness, alive, eventually, record, require_cgroups

_MB = 1024 * 1024
JOURNALED = (sys.executable, str(HOOKS / "journaled.py"))


class Held:
    """An admission held by a thread of this test until `release()`."""

    def __init__(self, capacity: HookCapacity, limit_mb: int, label: str) -> None:
        self.admitted = threading.Event()
        self._release = threading.Event()
        self.label = label
        self._thread = threading.Thread(target=self._hold, args=(capacity, limit_mb))
        self._thread.start()

    def _hold(self, capacity: HookCapacity, limit_mb: int) -> None:
        with capacity.admit(limit_mb, self.label):
            self.admitted.set()
            self._release.wait()

    def release(self) -> None:
        self._release.set()
        self._thread.join(timeout=30)
        assert not self._thread.is_alive()


def _labels(capacity: HookCapacity, *, running: bool) -> set[str]:
    return {e.label for e in capacity.read().entries if e.running == running}


def test_an_attempt_waits_for_room_and_one_larger_than_the_budget_runs_alone(tmp_path: Path):
    capacity = HookCapacity(tmp_path / "ledger.json", slots=4, budget_mb=100)
    small = Held(capacity, 60, "small")
    assert small.admitted.wait(30)
    # 60 + 50 > 100: waits, and says so in the ledger.
    middle = Held(capacity, 50, "middle")
    assert eventually(lambda: _labels(capacity, running=False) == {"middle"})
    small.release()
    assert middle.admitted.wait(30)

    # Larger than the whole budget: it waits for an empty machine, then nothing joins it.
    huge = Held(capacity, 500, "huge")
    assert eventually(lambda: "huge" in _labels(capacity, running=False))
    middle.release()
    assert huge.admitted.wait(30)
    tiny = Held(capacity, 1, "tiny")
    assert eventually(lambda: _labels(capacity, running=False) == {"tiny"})
    assert _labels(capacity, running=True) == {"huge"}
    huge.release()
    assert tiny.admitted.wait(30)
    tiny.release()
    assert capacity.read().entries == []


def test_chains_with_turns_are_admitted_in_their_order_whoever_asks_first(tmp_path: Path):
    """One slot, three chains in the order 0, 1, 2, whose threads start in the reverse
    order: chain 2 reaches the ledger first, yet the slot goes to 0, then 1, then 2. A chain
    that ends without asking (1, left with nothing to do) passes its turn on."""
    capacity = HookCapacity(tmp_path / "ledger.json", slots=1, budget_mb=100)
    turns = AdmissionTurn.in_order(3)
    admitted: list[int] = []
    release = [threading.Event() for _ in turns]

    def chain(index: int) -> None:
        turns[index].wait(None, f"chain {index}")
        with capacity.admit(10, f"chain {index}"):
            turns[index].taken()
            admitted.append(index)
            release[index].wait(30)

    threads = [threading.Thread(target=chain, args=(i,)) for i in (2, 0)]
    for thread in threads:
        thread.start()
    assert eventually(lambda: admitted == [0])
    turns[1].taken()  # chain 1 ended with nothing to run
    release[0].set()
    assert eventually(lambda: admitted == [0, 2])
    release[2].set()
    for thread in threads:
        thread.join(30)
    assert capacity.read().entries == []


def test_a_chain_waiting_for_its_turn_is_cancelled(tmp_path: Path):
    first, second = AdmissionTurn.in_order(2)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled, match="chain 1 was cancelled while waiting for its turn"):
        second.wait(cancel, "chain 1")
    first.taken()
    second.wait(cancel, "chain 1")  # its turn has come: nothing to wait for


def test_slots_bound_the_attempts_running_at_once(tmp_path: Path):
    capacity = HookCapacity(tmp_path / "ledger.json", slots=2, budget_mb=10_000)
    first, second = Held(capacity, 1, "first"), Held(capacity, 1, "second")
    assert first.admitted.wait(30) and second.admitted.wait(30)
    third = Held(capacity, 1, "third")
    assert eventually(lambda: _labels(capacity, running=False) == {"third"})
    second.release()
    assert third.admitted.wait(30)
    first.release()
    third.release()


RUN = """
import json, sys
from pathlib import Path
from osa_sdk.types import HookRecord
from osa_dagster.engine import (
    AttemptOptions, FileCheckpointIO, HookBatch, HookSpec, LocalRunner, run_hook,
)
from osa_dagster.engine.capacity import HookCapacity
from osa_dagster.settings import Settings
args = json.loads(sys.argv[1])
run_hook(
    HookSpec.model_validate(args["spec"]),
    HookBatch([HookRecord.model_validate(r) for r in args["records"]], Path(args["files_root"])),
    LocalRunner.from_settings(Settings.from_env()),
    FileCheckpointIO(Path(args["checkpoint"])),
    Path(args["workdir"]),
    AttemptOptions(
        capacity=HookCapacity(Path(args["ledger"]), slots=2, budget_mb=args["budget_mb"])
    ),
)
"""


@pytest.mark.slow
def test_a_sigkilled_runs_share_of_the_budget_is_returned(harness: Harness, tmp_path: Path):
    ledger = tmp_path / "capacity.json"
    capacity = HookCapacity(ledger, slots=2, budget_mb=512)
    spec = harness.spec(base_mb=512, cap_mb=512, sleep_s=600)
    args = {
        "spec": spec.model_dump(mode="json"),
        "records": [record("slow").model_dump(mode="json")],
        "files_root": str(harness.files_root),
        "checkpoint": str(harness.checkpoints.path),
        "workdir": str(harness.workdir),
        "ledger": str(ledger),
        "budget_mb": 512,
    }
    run = subprocess.Popen([sys.executable, "-c", RUN, json.dumps(args)])
    try:
        assert eventually(
            lambda: (
                [(e.holder.pid, e.charge_mb) for e in capacity.read().running()] == [(run.pid, 512)]
            ),
            timeout_s=30,
        )
        run.kill()
        # Not reaped yet: a zombie holds nothing either.
        assert eventually(lambda: capacity.read().entries == [])
    finally:
        run.kill()
        run.wait()
    whole = Held(capacity, 512, "after the kill")
    assert whole.admitted.wait(30)
    whole.release()


BATCHES = 8
BUDGET_MB = 384
# Record kind -> (MB it allocates, its outcome) under the ladder 64 -> 128 -> 256 MB; the
# hook and its journaling parent take ~20 MB besides.
KINDS = {
    "small": (16, "passed at 64"),
    "medium": (80, "passed at 128"),
    "large": (180, "passed at 256"),
    "poison": (400, "poison at 256"),
}


def _journal_peak(journal: Path) -> tuple[int, int]:
    """The largest sum of the kernel limits of attempts running at one moment, and the most
    attempts running at one moment, from the hooks' own journal."""
    events: list[tuple[int, int, int]] = []  # (time, 0 for an end, 1 for a start, limit)
    limits: dict[str, int] = {}
    for line in journal.read_text().splitlines():
        kind, ns, *rest = line.split()
        if kind == "start":
            limit, pid = rest
            limits[pid] = int(limit)
            events.append((int(ns), 1, int(limit)))
        else:
            [pid] = rest
            events.append((int(ns), 0, -limits.pop(pid)))
    assert limits == {}, f"attempts without an end in the journal: {limits}"
    total = running = peak = most = 0
    for _, _, change in sorted(events):  # an end before a start at the same instant
        total += change
        running += 1 if change > 0 else -1
        peak, most = max(peak, total), max(most, running)
    return peak, most


def _outcome(checkpoint: Checkpoint, record_id: str) -> str:
    outcome = checkpoint.outcomes[record_id]
    if outcome.poison:
        return f"poison at {outcome.memory_limit_mb}"
    assert outcome.status is OutcomeStatus.PASSED, outcome
    return f"passed at {outcome.features[0]['memory_limit_mb']}"


@pytest.mark.slow
def test_a_burst_of_climbing_attempts_never_holds_more_than_the_budget(tmp_path: Path):
    require_cgroups()
    capacity = HookCapacity(tmp_path / "capacity.json", slots=BATCHES, budget_mb=BUDGET_MB)
    journal = tmp_path / "journal.txt"
    runner = LocalRunner.from_settings(Settings.from_env())
    harnesses = [Harness(tmp_path / f"batch-{n}", runner) for n in range(BATCHES)]

    def run(harness: Harness) -> Checkpoint:
        spec = harness.spec((*JOURNALED, str(journal), *BEHAVE), base_mb=64, cap_mb=256)
        records = [
            record(kind, size_mb=size, alloc_mb=alloc_mb, sleep_s=0.2)
            for size, (kind, (alloc_mb, _)) in enumerate(KINDS.items(), start=1)
        ]
        return run_hook(
            spec,
            harness.batch(records),
            runner,
            FileCheckpointIO(harness.root / "checkpoint.json"),
            harness.workdir,
            AttemptOptions(capacity=capacity),
        )

    with ThreadPoolExecutor(BATCHES) as pool:
        checkpoints = list(pool.map(run, harnesses))

    # Every record ends with what its size really needs, whatever ran beside it.
    for checkpoint in checkpoints:
        assert {kind: _outcome(checkpoint, kind) for kind in KINDS} == {
            kind: outcome for kind, (_, outcome) in KINDS.items()
        }
    peak, most = _journal_peak(journal)
    assert peak <= BUDGET_MB * _MB
    assert most >= 2  # the attempts did run side by side
    # 8 first attempts at 64 MB do not fit in 384 MB together: some waited, and said so.
    attempts = [a for c in checkpoints for a in c.attempts]
    assert any(a.queued_s for a in attempts)
    assert capacity.read().entries == []


def test_cancelling_a_run_kills_its_hook_and_keeps_what_it_did(harness: Harness):
    capacity = HookCapacity(harness.root / "capacity.json", slots=1, budget_mb=1024)
    cancel = threading.Event()
    records = [record(f"r{n}", size_mb=n, sleep_s=0.1 if n == 0 else 600) for n in range(3)]
    outcome: list[BaseException] = []

    def run() -> None:
        try:
            run_hook(
                harness.spec(),
                harness.batch(records),
                harness.runner,
                harness.checkpoints,
                harness.workdir,
                AttemptOptions(checkpoint_every_s=0.05, capacity=capacity, cancel=cancel),
            )
        except BaseException as error:  # what the thread ended with
            outcome.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    assert eventually(lambda: harness.ledger_counts() == {"r0": 1}, timeout_s=30)
    cancel.set()
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert [type(e) for e in outcome] == [Cancelled]
    stored = harness.checkpoints.load()
    assert stored is not None and stored.running is not None
    hook_pid = stored.running.marker.pid
    assert hook_pid is not None and eventually(lambda: not alive(hook_pid))
    # Its slot is free again; the checkpoint names the attempt, for the next run to harvest.
    assert capacity.read().entries == []


# A holder in a pid namespace of its own, as a step container of the Docker executor is: it
# holds an admission and, for each line read, says which labels the ledger holds for it.
NAMESPACED_HOLDER = """
import json, sys
from pathlib import Path
from osa_dagster.engine.capacity import HookCapacity
capacity = HookCapacity(Path(sys.argv[1]), slots=4, budget_mb=100, heartbeat_s=0.2)
with capacity.admit(10, "in another pid namespace"):
    print("admitted", flush=True)
    for _ in sys.stdin:
        print(json.dumps(sorted(e.label for e in capacity.read().entries)), flush=True)
"""


def _in_a_pid_namespace(command: list[str]) -> list[str]:
    """`command` as pid 1 of a new pid namespace (with a /proc of its own), killed when
    unshare is; an ordinary user gets the namespace through a user namespace of its own."""
    user = [] if os.geteuid() == 0 else ["--map-root-user"]
    return ["unshare", *user, "--pid", "--fork", "--mount-proc", "--kill-child", *command]


def test_holders_in_other_pid_namespaces_are_kept_until_their_heartbeat_stops(tmp_path: Path):
    ledger = tmp_path / "ledger.json"
    capacity = HookCapacity(ledger, slots=4, budget_mb=100)
    here = Held(capacity, 10, "here")
    assert here.admitted.wait(30)
    other = subprocess.Popen(
        _in_a_pid_namespace([sys.executable, "-c", NAMESPACED_HOLDER, str(ledger)]),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert other.stdin is not None and other.stdout is not None
    try:
        assert other.stdout.readline() == "admitted\n"
        # Neither can see the other's pid, and neither drops the other's entry.
        [theirs] = [e for e in capacity.read().entries if e.label == "in another pid namespace"]
        assert theirs.holder.alive() is None
        other.stdin.write("read\n")
        other.stdin.flush()
        assert json.loads(other.stdout.readline()) == ["here", "in another pid namespace"]
        assert {e.label for e in capacity.read().entries} == {"here", "in another pid namespace"}
    finally:
        other.kill()
        other.wait()
    # Dead, but not seen dying: its share is kept until its heartbeat is too old.
    assert {e.label for e in capacity.read().entries} == {"here", "in another pid namespace"}
    impatient = HookCapacity(ledger, slots=4, budget_mb=100, unseen_holder_ttl_s=0.5)
    assert eventually(lambda: {e.label for e in impatient.read().entries} == {"here"}, 30)
    here.release()
