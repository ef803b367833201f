"""A batch split into shards for a hook: each shard has its own checkpoint, memory ladder and
attempt log; a real OOM kill in one shard climbs that shard alone; a killed run resumes
every shard from its own checkpoint; the split is frozen, whatever the slots of a later
run. Every record's hook work is counted in a ledger the hook appends to: exactly once."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from osa_sdk.authoring import FetchContext, Ingester, ingester
from osa_sdk.types import IngesterRecord, RecordRef

from osa_dagster.batch.fetch import fetch_raw_batch
from osa_dagster.batch.hooks import (
    HookJob,
    HookJobResult,
    checkpoint_key,
    load_hook_checkpoints,
    run_batch_hook,
    run_hook_jobs,
)
from osa_dagster.batch.plan import plan_ingest
from osa_dagster.batch.shards import (
    MIN_SHARD_RECORDS,
    frozen_shard_plan,
    load_shard_plan,
    shard_count,
    split_records,
)
from osa_dagster.batch.stores import StoreCheckpointIO
from osa_dagster.conventions.base import Convention
from osa_dagster.defs.metadata import hook_metadata
from osa_dagster.engine import Checkpoint, HookCapacity, LocalRunner
from osa_dagster.engine.spec import HookSpec, MemoryPolicy, hook_version
from osa_dagster.settings import Settings
from osa_dagster.storage.layout import BatchLayout
from osa_dagster.storage.store import FileSystemStore
from tests.engine.helpers import BEHAVE, eventually, record, require_cgroups

HOOK = "behave"
BASE_MB, CAP_MB = 128, 512
# Fits at 256 MB, not at 128 MB: the record is OOM-killed at the base and passes one rung up.
OOM_ALLOC_MB = 180


@ingester(name="scripted", max_file_mb=1)
class ScriptedIngester(Ingester):
    """Config: `records` (how many, ids r01, r02, ...) and `metadata`: record id -> what the
    test hook (tests/engine/hooks/behave.py) does with that record."""

    def discover(self, since: datetime | None, limit: int | None) -> Iterable[RecordRef]:
        return (RecordRef(source_id=f"r{n:02d}") for n in range(1, self.config["records"] + 1))

    def fetch(self, refs: Sequence[RecordRef], ctx: FetchContext) -> Iterable[IngesterRecord]:
        for ref in refs:
            file = ctx.add_bytes(ref.source_id, "data.txt", b"x" * 100)
            metadata = self.config["metadata"].get(ref.source_id, {})
            yield IngesterRecord(source_id=ref.source_id, metadata=metadata, files=[file])


@pytest.fixture(autouse=True)
def unsandboxed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hook appends to the test's ledger, which no sandboxed hook may."""
    monkeypatch.setenv("OSA_HOOK_SANDBOX", "off")


def _convention(
    tmp_path: Path, records: int, metadata: dict[str, dict[str, Any]], shard_size: int | None
) -> Convention:
    return Convention(
        name="sharded",
        ingester=ScriptedIngester,
        ingester_config={"records": records, "metadata": metadata},
        hooks=(
            HookSpec(
                name=HOOK,
                command=BEHAVE,
                memory=MemoryPolicy(base_mb=BASE_MB, cap_mb=CAP_MB),
                timeout_s=120,
                config={"ledger": str(tmp_path / "ledger.txt")},
            ),
        ),
        batch_size=records,
        shard_size=shard_size,
    )


def _one_batch(convention: Convention, store: FileSystemStore) -> str:
    [partition] = plan_ingest(convention, store).partitions
    fetch_raw_batch(convention, store, partition)
    return partition


def _ledger(tmp_path: Path) -> Counter[str]:
    return Counter((tmp_path / "ledger.txt").read_text().split())


def _capacity(tmp_path: Path, slots: int) -> HookCapacity:
    return HookCapacity(tmp_path / f"ledger-{slots}.json", slots=slots, budget_mb=4096)


def _run(
    convention: Convention, store: FileSystemStore, partition: str, capacity: HookCapacity
) -> HookJobResult:
    runner = LocalRunner.from_settings(Settings.from_env())
    [result] = run_hook_jobs(
        convention, store, runner, [HookJob(partition, HOOK)], capacity=capacity
    )
    assert result.error is None, result.error
    return result


def _version(convention: Convention) -> str:
    return hook_version(convention.hook(HOOK))


def _shard_checkpoint(
    convention: Convention, store: FileSystemStore, partition: str, shard: int
) -> Checkpoint | None:
    return StoreCheckpointIO(store, checkpoint_key(convention, partition, HOOK, shard)).load()


def test_shards_have_similar_sizes_and_counts():
    records = [record(f"r{n}", size_mb=float(n)) for n in range(1, 10)]
    shards = split_records(list(reversed(records)), 3)
    assert shards == [["r3", "r4", "r9"], ["r2", "r5", "r8"], ["r1", "r6", "r7"]]
    # Contiguous chunks would give 6, 15 and 24 MB; dealt out in turn, 12, 15 and 18.
    one_large = [record("big", size_mb=30.0), *records[:5]]
    assert split_records(one_large, 2) == [["r1", "r2", "big"], ["r3", "r4", "r5"]]
    assert shard_count(records=5000, shard_size=1250, slots=2) == 4
    assert shard_count(records=44, shard_size=None, slots=2) == 2
    assert shard_count(records=44, shard_size=None, slots=1) == 1
    assert shard_count(records=MIN_SHARD_RECORDS + 1, shard_size=None, slots=8) == 1


def test_an_oom_in_one_shard_climbs_that_shard_alone(tmp_path: Path):
    """Six records in shards of three: r01 r03 r05 and r02 r04 r06. r03 is OOM-killed at the
    base: its shard climbs to the next rung for r03 and r05 only; the other shard's one
    attempt stays at the base; every record ran to its end exactly once."""
    require_cgroups()
    store = FileSystemStore(tmp_path / "store")
    convention = _convention(tmp_path, 6, {"r03": {"alloc_mb": OOM_ALLOC_MB}}, shard_size=3)
    partition = _one_batch(convention, store)

    result = _run(convention, store, partition, _capacity(tmp_path, slots=2))

    plan = load_shard_plan(store, BatchLayout("sharded", partition), HOOK, _version(convention))
    assert plan is not None and plan.shards == [["r01", "r03", "r05"], ["r02", "r04", "r06"]]
    oom_shard, other = (
        _shard_checkpoint(convention, store, partition, 0),
        _shard_checkpoint(convention, store, partition, 1),
    )
    assert oom_shard is not None and other is not None
    assert [(a.memory_limit_mb, a.oom_killed, a.records_in) for a in oom_shard.attempts] == [
        (BASE_MB, True, 3),
        (2 * BASE_MB, False, 2),  # r03 and r05: r01 was kept
    ]
    assert oom_shard.attempts[0].first_unfinished == "r03"
    assert [(a.memory_limit_mb, a.oom_killed, a.records_in) for a in other.attempts] == [
        (BASE_MB, False, 3)
    ]
    assert _ledger(tmp_path) == Counter({f"r0{n}": 1 for n in range(1, 7)})
    # The step and publishing read the whole batch: every outcome, each attempt's shard.
    assert result.progress is not None
    merged = load_hook_checkpoints(convention, store, partition)[HOOK]
    assert merged == result.progress.checkpoint
    assert merged.counts()["passed"] == 6 and merged.complete
    assert sorted((a.shard, a.number) for a in merged.attempts) == [(0, 1), (0, 2), (1, 1)]
    # What a curator reads on the partition: per shard, bounded whatever the batch's size.
    shown = hook_metadata(merged, run_id="run")
    assert (shown["shards"], shown["oom_attempts"], shown["passed"]) == (2, 1, 6)
    assert shown["memory_limits_mb"] == f"shard 0: {BASE_MB} -> {2 * BASE_MB}; shard 1: {BASE_MB}"
    assert "| 0 | 2 |" in shown["shard_log"].value and "| 1 | 1 |" in shown["shard_log"].value

    again = _run(convention, store, partition, _capacity(tmp_path, slots=2))

    assert again.progress is not None and again.progress.attempts_this_call == []
    assert _ledger(tmp_path) == Counter({f"r0{n}": 1 for n in range(1, 7)})


def test_a_killed_run_resumes_each_shard_and_keeps_the_split_with_fewer_slots(tmp_path: Path):
    """Twenty records, no shard size: two slots split them in two shards of ten. The run is
    ended while shard 1 waits on its second record: shard 0 has finished, shard 1 has done
    one record. The next run has one slot, which alone would not split the batch: it keeps
    the frozen split, does nothing of shard 0 again, and shard 1 only what was left."""
    store = FileSystemStore(tmp_path / "store")
    gate = tmp_path / "gate"
    records = 2 * MIN_SHARD_RECORDS
    convention = _convention(tmp_path, records, {"r04": {"wait_for": [str(gate)]}}, None)
    partition = _one_batch(convention, store)
    runner = LocalRunner.from_settings(Settings.from_env())
    jobs = run_hook_jobs(
        convention,
        store,
        runner,
        [HookJob(partition, HOOK), HookJob("never-fetched", HOOK)],
        capacity=_capacity(tmp_path, slots=2),
    )
    # The batch that cannot be read ends at once, while the shards run: the run is paused
    # there, as a step is between two results.
    assert next(jobs).job.partition == "never-fetched"

    def shard_1_waits_on_r04() -> bool:
        shard_1 = _shard_checkpoint(convention, store, partition, 1)
        return shard_1 is not None and "r02" in shard_1.outcomes and shard_1.running is not None

    def shard_0_done() -> bool:
        return (c := _shard_checkpoint(convention, store, partition, 0)) is not None and c.complete

    assert eventually(shard_0_done, timeout_s=60)
    assert eventually(shard_1_waits_on_r04, timeout_s=60)
    jobs.close()  # the run is terminated: the waiting hook is killed, its outcomes kept
    done_before = _ledger(tmp_path)
    assert set(done_before) == {f"r{n:02d}" for n in range(1, records, 2)} | {"r02"}

    gate.touch()
    result = _run(convention, store, partition, _capacity(tmp_path, slots=1))

    plan = load_shard_plan(store, BatchLayout("sharded", partition), HOOK, _version(convention))
    assert plan is not None and len(plan.shards) == 2 and plan.slots == 2
    assert result.progress is not None
    new = result.progress.attempts_this_call
    assert {a.shard for a in new} == {1}, "shard 0 finished: nothing of it runs again"
    assert sum(a.records_in for a in new if not a.interrupted) == len(plan.shards[1]) - 1
    assert _ledger(tmp_path) == Counter({f"r{n:02d}": 1 for n in range(1, records + 1)})
    assert result.progress.checkpoint.counts()["passed"] == records


def test_a_batch_begun_before_batches_were_split_goes_on_as_one_shard(tmp_path: Path):
    """A store written before shards: the hook's one checkpoint, no split. Publishing reads
    it as before, and a run with slots enough to split the batch keeps it whole."""
    store = FileSystemStore(tmp_path / "store")
    records = 2 * MIN_SHARD_RECORDS
    convention = _convention(tmp_path, records, {}, shard_size=None)
    partition = _one_batch(convention, store)
    runner = LocalRunner.from_settings(Settings.from_env())
    run_batch_hook(convention, HOOK, store, partition, runner)  # no capacity: one shard
    layout = BatchLayout("sharded", partition)
    # As the store was before shards.
    store.delete_prefix(layout.shard_plan(HOOK, _version(convention)))

    assert load_hook_checkpoints(convention, store, partition)[HOOK].counts()["passed"] == records
    result = _run(convention, store, partition, _capacity(tmp_path, slots=2))

    assert result.progress is not None and result.progress.attempts_this_call == []
    plan = load_shard_plan(store, layout, HOOK, _version(convention))
    assert plan is not None and plan.keys() == [None]
    assert _ledger(tmp_path) == Counter({f"r{n:02d}": 1 for n in range(1, records + 1)})


def test_an_unsplit_batch_keeps_the_hook_paths_of_before(tmp_path: Path):
    layout = BatchLayout("c", "p")
    old = None  # judged before hooks had versions
    assert (
        layout.checkpoint(HOOK, old)
        == layout.checkpoint(HOOK, old, None)
        == "batches/c/p/hooks/behave/checkpoint.json"
    )
    assert layout.checkpoint(HOOK, old, 1) == "batches/c/p/hooks/behave/shards/1/checkpoint.json"
    assert layout.hook_workdir(HOOK, old, 0) == "batches/c/p/hooks/behave/shards/0/work"
    assert (
        layout.checkpoint(HOOK, "2", 1) == "batches/c/p/hooks/behave/v/2/shards/1/checkpoint.json"
    )


def test_an_unreadable_split_is_set_aside_and_made_again(tmp_path: Path):
    store = FileSystemStore(tmp_path / "store")
    layout = BatchLayout("c", "p")
    records = [record(f"r{n:02d}") for n in range(1, 2 * MIN_SHARD_RECORDS + 1)]
    store.write_bytes(layout.shard_plan(HOOK, "1"), b'{"hook": "behave", "shards": [[')

    plan = frozen_shard_plan(store, layout, HOOK, "1", records, shard_size=None, slots=2)

    assert [len(shard) for shard in plan.shards] == [MIN_SHARD_RECORDS, MIN_SHARD_RECORDS]
    assert load_shard_plan(store, layout, HOOK, "1") == plan
    [aside] = [k for k in store.list_keys(layout.hook(HOOK)) if ".unreadable-" in k]
    assert store.read_bytes(aside) == b'{"hook": "behave", "shards": [['
