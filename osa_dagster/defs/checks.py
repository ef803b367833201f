"""Asset checks on every partition: the archive's invariants, visible in the UI.

Each check records one evaluation per partition of its run, whatever covered it (a sensor's
run of one batch, a range run of `osa materialize` or an asset backfill, the UI). Dagster
plans a partitioned check of a range run as one PLANNED row per partition (run id, partition)
in its `asset_check_executions` table, but turns an `AssetCheckResult` of that step into a
single evaluation without a partition: the per-partition rows stay PLANNED and read as
"Skipped" once the run ends. So the checks yield Dagster's `AssetCheckEvaluation` themselves,
one per partition, each naming its partition and the materialisation it checked: every
PLANNED row gets its verdict, under the run's own id, and a later run's rows are its own
(reporting them as runless events instead collides, from the second run on, on the table's
unique index (asset_key, check_name, run_id '', partition)).
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import dagster as dg

from osa_dagster.batch.audit import BatchAudit, audit_batch
from osa_dagster.conventions.base import Convention
from osa_dagster.defs.assets import features_key, published_key
from osa_dagster.defs.dagster_private import AssetCheckEvaluationTargetMaterializationData
from osa_dagster.defs.leases import leased_partitions
from osa_dagster.defs.resources import ArtifactStoreResource, RecordsDatabaseResource
from osa_dagster.records import DeadLetterRow, RecordsDatabase, list_dead_letters
from osa_dagster.storage.store import ArtifactStore

PREVIEW = 20


@dataclass(frozen=True)
class Verdict:
    passed: bool
    metadata: dict[str, Any]
    description: str | None = None


class BatchFacts:
    """What a check of one partition looks at, read when first asked for."""

    def __init__(
        self, convention: Convention, store: ArtifactStore, db: RecordsDatabase, partition: str
    ) -> None:
        self.convention = convention
        self.store = store
        self.db = db
        self.partition = partition

    @cached_property
    def audit(self) -> BatchAudit:
        return audit_batch(self.convention, self.store, self.db, self.partition)

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


@dataclass(frozen=True)
class CheckDef:
    name: str
    asset: str  # "published" or "features"
    severity: dg.AssetCheckSeverity
    description: str
    verdict: Callable[[BatchFacts], Verdict]


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
)


def _checked_materialization(
    instance: dg.DagsterInstance, asset: dg.AssetKey, partition: str
) -> AssetCheckEvaluationTargetMaterializationData | None:
    """The partition's latest materialisation: a verdict about it is the partition's current
    status in the UI (a verdict about an older one is not shown as current)."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=asset, asset_partitions=[partition]), limit=1
    ).records
    if not records:
        return None
    latest = records[0]
    return AssetCheckEvaluationTargetMaterializationData(
        run_id=latest.run_id, storage_id=latest.storage_id, timestamp=latest.timestamp
    )


def _checked_asset(convention: Convention, spec: CheckDef) -> dg.AssetKey:
    return features_key(convention) if spec.asset == "features" else published_key(convention)


def check_keys(convention: Convention) -> list[dg.AssetCheckKey]:
    """Every check of the convention's batches: a batch is finished once each has a verdict."""
    return [dg.AssetCheckKey(_checked_asset(convention, spec), spec.name) for spec in CHECKS]


def convention_checks(
    convention: Convention, partitions: dg.PartitionsDefinition
) -> dg.Definitions:
    """One check per invariant, each on the asset it guards, every one for every partition.

    Each check audits the batch on its own (a few indexed queries): Dagster's multi-checks
    cannot be partitioned.
    """

    def build(spec: CheckDef) -> dg.AssetChecksDefinition:
        asset = _checked_asset(convention, spec)

        @dg.asset_check(
            name=spec.name,
            asset=asset,
            partitions_def=partitions,
            additional_deps=[published_key(convention)] if spec.asset != "published" else None,
            blocking=False,
            description=spec.description,
        )
        def check(
            context: dg.AssetCheckExecutionContext,
            artifact_store: ArtifactStoreResource,
            records_db: RecordsDatabaseResource,
        ) -> Iterator[dg.AssetCheckEvaluation | dg.Output]:
            store, db = artifact_store.get(), records_db.get()
            label = f"{asset.to_user_string()}:{spec.name}"
            for partition in leased_partitions(context, db, convention.name, label):
                verdict = spec.verdict(BatchFacts(convention, store, db, partition))
                yield dg.AssetCheckEvaluation(
                    asset_key=asset,
                    check_name=spec.name,
                    passed=verdict.passed,
                    metadata=verdict.metadata,
                    severity=spec.severity,
                    description=verdict.description,
                    partition=partition,
                    target_materialization_data=_checked_materialization(
                        context.instance, asset, partition
                    ),
                    blocking=False,
                )
            # The step's own output, so that Dagster sees the check as having run.
            [output] = context.op_execution_context.op_def.output_defs
            yield dg.Output(None, output_name=output.name)

        return check

    return dg.Definitions(asset_checks=[build(spec) for spec in CHECKS])
