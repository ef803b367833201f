"""Asset checks on every partition: the archive's invariants, and flags for a curator,
visible in the UI.

Each check is partitioned like the asset it guards (`AssetCheckSpec.partitions_def`), so a
run plans one execution per check and partition it covers, and the UI shows each check's
verdict per batch (its Partitions tab: Passed, Failed, Missing). Each check is evaluated in
the step of the asset it guards, for every batch the step works, right after the work and
under the same lease (published_records' checks after publishing, features' one after
storing the features), whatever covered the batch (a sensor's run of one batch, a range run
of `osa materialize` or an asset backfill, the UI). Dagster turns an `AssetCheckResult` of a
range step into one evaluation without a partition, so the step yields Dagster's
`AssetCheckEvaluation` itself, one per check and partition, each naming its partition and the
materialisation it judged: each planned execution gets its verdict under the run's own id.
(Unpartitioned, a check was planned once per run without a partition, and that execution,
never evaluated, was listed as "Skipped" after every run.)

A step of their own per check cost, for every batch, a lease, a look-up of the
materialisation and an audit each: five of them were most of Dagster's cost per batch. In
the asset's step the batch is audited once for all its checks.
"""

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import dagster as dg

from osa_dagster.batch.audit import BatchAudit, audit_batch
from osa_dagster.batch.publish import BatchVerdicts, batch_verdicts
from osa_dagster.conventions.base import Convention
from osa_dagster.defs.dagster_private import AssetCheckEvaluationTargetMaterializationData
from osa_dagster.defs.metadata import attempt_origin
from osa_dagster.records import DeadLetterRow, RecordsDatabase, list_dead_letters
from osa_dagster.storage.store import ArtifactStore

PREVIEW = 20
# The assets that have checks.
GuardedAsset = Literal["published", "features"]


@dataclass(frozen=True)
class Verdict:
    passed: bool
    metadata: dict[str, Any]
    description: str | None = None


class BatchFacts:
    """What a step and the checks of one partition look at, read when first asked for."""

    def __init__(
        self,
        convention: Convention,
        store: ArtifactStore,
        db: RecordsDatabase,
        partition: str,
        run_id: str,
    ) -> None:
        self.convention = convention
        self.store = store
        self.db = db
        self.partition = partition
        self.run_id = run_id  # the run judging the batch

    @cached_property
    def verdicts(self) -> BatchVerdicts:
        return batch_verdicts(self.convention, self.store, self.partition)

    @cached_property
    def audit(self) -> BatchAudit:
        return audit_batch(self.convention, self.store, self.db, self.partition, self.verdicts)

    @cached_property
    def dead_letters(self) -> list[DeadLetterRow]:
        return list_dead_letters(self.db, self.convention.name, partition=self.partition)


def _records(broken: list[str], what: str) -> Verdict:
    return Verdict(
        passed=not broken,
        metadata={"records": len(broken), "examples": ", ".join(broken[:PREVIEW]) or "-"},
        description=what if broken else None,
    )


def _passed_published_once(facts: BatchFacts) -> Verdict:
    return _records(
        facts.audit.passed_not_published_once,
        "records that passed every hook but are not in the archive exactly once",
    )


def _failed_not_published(facts: BatchFacts) -> Verdict:
    return _records(
        facts.audit.published_but_failed,
        "records this batch published although a hook rejected or errored them",
    )


def _counts_add_up(facts: BatchFacts) -> Verdict:
    return Verdict(
        passed=facts.audit.counts_add_up,
        metadata=dict(facts.audit.counts),
        description=None
        if facts.audit.counts_add_up
        else "planned != passed + rejected + errored + skipped, or the ingester counted otherwise",
    )


def _have_features(facts: BatchFacts) -> Verdict:
    missing = [
        f"{record} ({hook})" for hook, ids in facts.audit.missing_features.items() for record in ids
    ]
    return _records(
        missing, "published records without the rows of a hook that always emits features"
    )


def _no_dead_letters(facts: BatchFacts) -> Verdict:
    letters = [f"{d.source_id} ({d.hook}, {d.limit_mb} MB)" for d in facts.dead_letters]
    return Verdict(
        passed=not letters,
        metadata={"records": len(letters), "examples": ", ".join(letters[:PREVIEW]) or "-"},
        description=f"{len(letters)} records ran out of memory alone at their hook's cap: "
        "raise it with OSA_HOOK_MEMORY and run `osa materialize CONVENTION --dead-letters`"
        if letters
        else None,
    )


def _no_oom_kills(facts: BatchFacts) -> Verdict:
    kills = [
        (hook, attempt)
        for hook, checkpoint in facts.audit.verdicts.checkpoints.items()
        for attempt in checkpoint.oom_attempts()
    ]
    this_run = [attempt for _, attempt in kills if attempt.run_id == facts.run_id]
    named = [
        f"{hook} at {attempt.memory_limit_mb} MB on {attempt.first_unfinished or '(unknown)'} "
        f"({attempt_origin(attempt, facts.run_id)})"
        for hook, attempt in kills
    ]
    earlier = len(kills) - len(this_run)
    return Verdict(
        passed=not kills,
        metadata={
            "oom_kills": len(kills),
            "oom_kills_this_run": len(this_run),
            "examples": ", ".join(named[:PREVIEW]) or "-",
        },
        description=f"hook attempts OOM-killed on this batch, their records retried with more "
        f"memory: {len(kills)} ({len(this_run)} in this run, {earlier} in earlier runs whose "
        "checkpoints this run reused)"
        if kills
        else None,
    )


def _every_record_passed(facts: BatchFacts) -> Verdict:
    failed = facts.audit.verdicts.failed
    return Verdict(
        passed=not failed,
        metadata={
            "rejected": facts.audit.counts["rejected"],
            "errored": facts.audit.counts["errored"],
            "examples": ", ".join(
                f"{v.source_id} ({v.hook}: {v.outcome})" for v in failed[:PREVIEW]
            )
            or "-",
        },
        description=f"records that did not pass every hook, not published: {len(failed)}"
        if failed
        else None,
    )


@dataclass(frozen=True)
class CheckDef:
    name: str
    asset: GuardedAsset
    severity: dg.AssetCheckSeverity
    description: str
    verdict: Callable[[BatchFacts], Verdict]
    # A flag marks batches for a curator to look at (a warning); it guards no invariant.
    flag: bool = False


CHECKS = (
    CheckDef(
        "passed_records_published_once",
        "published",
        dg.AssetCheckSeverity.ERROR,
        "Every record of the batch that passed every hook is in the archive exactly once.",
        _passed_published_once,
    ),
    CheckDef(
        "failed_records_not_published",
        "published",
        dg.AssetCheckSeverity.ERROR,
        "No record that a hook rejected or errored was published by this batch.",
        _failed_not_published,
    ),
    CheckDef(
        "counts_add_up",
        "published",
        dg.AssetCheckSeverity.ERROR,
        "Planned = passed + rejected + errored + skipped, and the ingester fetched what the "
        "hooks settled.",
        _counts_add_up,
    ),
    CheckDef(
        "published_records_have_features",
        "features",
        dg.AssetCheckSeverity.ERROR,
        "Every published record has the feature rows of each hook that always emits them.",
        _have_features,
    ),
    CheckDef(
        "no_dead_letters",
        "published",
        dg.AssetCheckSeverity.WARN,
        "No record of the batch ran out of memory alone at its hook's cap (a dead letter); a "
        "warning names them: raise the cap and re-run the batch.",
        _no_dead_letters,
    ),
    # Flags rather than invariants: a batch whose hooks needed more memory, or whose records
    # did not all pass, is complete and right, and these warnings let a curator list them.
    CheckDef(
        "no_oom_kills",
        "published",
        dg.AssetCheckSeverity.WARN,
        "No hook attempt was OOM-killed on the batch. A warning counts and names the kills "
        "(hook, memory limit, the record it was on) and says which happened in this run and "
        "which in earlier runs whose checkpoints this run reused; the records were retried "
        "with more memory.",
        _no_oom_kills,
        flag=True,
    ),
    CheckDef(
        "every_record_passed",
        "published",
        dg.AssetCheckSeverity.WARN,
        "Every record of the batch passed every hook. A warning counts the rejected and "
        "errored records and names them, with the first hook that did not pass each and why; "
        "they are not published.",
        _every_record_passed,
        flag=True,
    ),
)


def check_specs(
    asset: GuardedAsset, key: dg.AssetKey, partitions: dg.PartitionsDefinition
) -> list[dg.AssetCheckSpec]:
    """The checks of `asset` (whose key is `key`), for its decorator: partitioned like the
    asset, so that each batch has its own verdicts."""
    return [
        dg.AssetCheckSpec(
            spec.name, asset=key, description=spec.description, partitions_def=partitions
        )
        for spec in CHECKS
        if spec.asset == asset
    ]


Judged = list[tuple[CheckDef, Verdict]]


def judge(asset: GuardedAsset, facts: BatchFacts) -> Judged:
    """Every check of `asset` on one batch, which is audited once for all of them."""
    return [(spec, spec.verdict(facts)) for spec in CHECKS if spec.asset == asset]


def _latest_materializations(
    instance: dg.DagsterInstance, asset: dg.AssetKey, partitions: Sequence[str]
) -> dict[str, AssetCheckEvaluationTargetMaterializationData]:
    """Each partition's latest materialisation: a verdict about it is the partition's current
    status in the UI (a verdict about an older one is not shown as current). The step has
    just materialised them all, so they are the newest records of the asset, read at once."""
    found: dict[str, AssetCheckEvaluationTargetMaterializationData] = {}

    def fetch(wanted: list[str]) -> None:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=asset, asset_partitions=wanted), limit=len(wanted)
        ).records
        for record in records:  # newest first
            if record.partition_key is not None and record.partition_key not in found:
                found[record.partition_key] = AssetCheckEvaluationTargetMaterializationData(
                    run_id=record.run_id, storage_id=record.storage_id, timestamp=record.timestamp
                )

    fetch(list(partitions))
    # Another run materialised some of them meanwhile more than once: one at a time.
    for partition in [p for p in partitions if p not in found]:
        fetch([partition])
    return found


def check_evaluations(
    instance: dg.DagsterInstance, asset: dg.AssetKey, judged: Mapping[str, Judged]
) -> Iterator[dg.AssetCheckEvaluation]:
    """The verdicts of a step's checks, one evaluation per check and partition, each about the
    partition's materialisation: yield them after the step's materialisations."""
    if not judged:
        return
    targets = _latest_materializations(instance, asset, list(judged))
    for partition, verdicts in judged.items():
        for spec, verdict in verdicts:
            yield dg.AssetCheckEvaluation(
                asset_key=asset,
                check_name=spec.name,
                passed=verdict.passed,
                metadata=verdict.metadata,
                severity=spec.severity,
                description=verdict.description,
                partition=partition,
                target_materialization_data=targets.get(partition),
                blocking=False,
            )
