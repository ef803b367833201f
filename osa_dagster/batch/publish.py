"""Publishing: records that passed every hook into the archive, then their features."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from osa_sdk.types import IngesterRecord, OutcomeStatus

from osa_dagster.batch.fetch import read_raw_records
from osa_dagster.batch.hooks import load_hook_checkpoints
from osa_dagster.batch.plan import load_manifest
from osa_dagster.conventions.base import Convention
from osa_dagster.engine import Checkpoint
from osa_dagster.records import (
    FeatureRows,
    PoisonRecord,
    PublishResult,
    RecordsDatabase,
    RecordToPublish,
    find_srns,
    publish_records,
    replace_dead_letters,
    store_features,
)
from osa_dagster.storage.layout import BatchLayout
from osa_dagster.storage.store import ArtifactStore


@dataclass
class PublishSummary:
    records_in: int
    passed_all: list[str]
    result: PublishResult
    not_published: Counter[str] = field(default_factory=Counter)
    """Why records were not published: 'rejected by <hook>' / 'errored in <hook>'."""
    rejections: list[RecordVerdict] = field(default_factory=list)
    """Why each record not published was not."""
    dead_letters: list[PoisonRecord] = field(default_factory=list)
    """The batch's poison records, as written to the dead_letters table."""


@dataclass(frozen=True)
class RecordVerdict:
    """Why a record did not pass: the first hook that did not pass it, and its outcome."""

    source_id: str
    hook: str
    status: OutcomeStatus
    reason: str

    @property
    def outcome(self) -> str:
        """How curators read it: "<status>: <reason>"."""
        return f"{self.status}: {self.reason}"


@dataclass
class BatchVerdicts:
    passed: list[IngesterRecord]
    failed: list[RecordVerdict]
    checkpoints: dict[str, Checkpoint]


def batch_verdicts(convention: Convention, store: ArtifactStore, partition: str) -> BatchVerdicts:
    """Which records of the batch passed every hook, and why the others did not."""
    records = read_raw_records(store, BatchLayout(convention.name, partition), convention)
    checkpoints = load_hook_checkpoints(convention, store, partition)
    passed: list[IngesterRecord] = []
    failed: list[RecordVerdict] = []
    for record in records:
        verdict = None
        for hook_name, checkpoint in checkpoints.items():
            outcome = checkpoint.outcomes.get(record.source_id)
            if outcome is None:
                verdict = RecordVerdict(
                    record.source_id, hook_name, OutcomeStatus.ERRORED, "no outcome"
                )
            elif outcome.status is not OutcomeStatus.PASSED:
                verdict = RecordVerdict(
                    record.source_id, hook_name, outcome.status, str(outcome.reason)
                )
            if verdict:
                break
        if verdict:
            failed.append(verdict)
        else:
            passed.append(record)
    return BatchVerdicts(passed=passed, failed=failed, checkpoints=checkpoints)


def publish_batch(
    convention: Convention,
    store: ArtifactStore,
    db: RecordsDatabase,
    partition: str,
    *,
    domain: str,
) -> PublishSummary:
    """Publish the records that passed every hook: one bulk, idempotent insert. Each at the
    upstream version its batch was planned with: a record published at another is revised
    in place, under its SRN."""
    verdicts = batch_verdicts(convention, store, partition)
    passed, failed = verdicts.passed, verdicts.failed
    manifest = load_manifest(store, BatchLayout(convention.name, partition))
    versions = {ref.source_id: ref.version for ref in manifest.refs}
    result = publish_records(
        db,
        convention=convention.name,
        domain=domain,
        partition=partition,
        records=[
            RecordToPublish(r.source_id, r.metadata, record_version=versions.get(r.source_id))
            for r in passed
        ],
    )
    poison = poison_records(verdicts.checkpoints)
    replace_dead_letters(db, convention=convention.name, partition=partition, poison=poison)
    reasons = Counter(f"{verdict.status} in {verdict.hook}" for verdict in failed)
    return PublishSummary(
        records_in=len(passed) + len(failed),
        passed_all=[r.source_id for r in passed],
        result=result,
        not_published=reasons,
        rejections=failed,
        dead_letters=poison,
    )


def poison_records(checkpoints: dict[str, Checkpoint]) -> list[PoisonRecord]:
    """Every hook's poison outcomes: a record poison in two hooks is listed for each, since
    each hook's cap must be raised for it to pass."""
    return [
        PoisonRecord(
            source_id=record_id,
            hook=hook_name,
            size_mb=outcome.size_mb,
            limit_mb=outcome.memory_limit_mb,
            peak_mb=outcome.peak_memory_mb,
            reason=outcome.reason or "poison",
        )
        for hook_name, checkpoint in checkpoints.items()
        for record_id, outcome in sorted(checkpoint.poison().items())
    ]


@dataclass
class FeaturesSummary:
    rows_per_hook: dict[str, int]
    records: int


def store_batch_features(
    convention: Convention, store: ArtifactStore, db: RecordsDatabase, partition: str
) -> FeaturesSummary:
    """Store each hook's feature rows of the batch's published records, by SRN."""
    verdicts = batch_verdicts(convention, store, partition)
    passed = verdicts.passed
    srns = find_srns(db, convention.name, [r.source_id for r in passed])
    rows_per_hook: dict[str, int] = {}
    for hook_name, checkpoint in verdicts.checkpoints.items():
        rows = [
            FeatureRows(srns[r.source_id], checkpoint.outcomes[r.source_id].features)
            for r in passed
            if r.source_id in srns
        ]
        rows_per_hook[hook_name] = store_features(db, hook=hook_name, features=rows)
    return FeaturesSummary(rows_per_hook=rows_per_hook, records=len(srns))
