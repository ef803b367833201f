"""Publishing: records that passed every hook into the archive, then their features."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from osa_sdk.types import IngesterRecord, OutcomeStatus

from osa_dagster.batch.fetch import read_raw_records
from osa_dagster.batch.hooks import load_hook_checkpoints
from osa_dagster.batch.plan import load_manifest
from osa_dagster.batch.upstream import withdrawn_upstream
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
from osa_dagster.records.lifecycle import (
    ChangeExample,
    ChangeReport,
    reinstate_records,
    update_provenance,
    withdraw_records,
)
from osa_dagster.records.models import PUBLISHED, WITHDRAWN
from osa_dagster.records.queries import HeldRecord, records_of_partition_by_status
from osa_dagster.storage.layout import BatchLayout, Manifest
from osa_dagster.storage.store import ArtifactStore


@dataclass
class PublishSummary:
    records_in: int
    passed_all: list[str]
    result: PublishResult
    withdrawn: dict[str, str] = field(default_factory=dict)
    """Records of the batch published before that a hook now rejects: id -> why."""
    reinstated: dict[str, str] = field(default_factory=dict)
    """Records of the batch withdrawn before that every hook passes again: id -> why."""
    hook_versions: dict[str, str] = field(default_factory=dict)
    """The version of each hook that judged the batch."""
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
    rejected_records: list[IngesterRecord] = field(default_factory=list)
    """The records of `failed` a hook rejected (the others errored)."""


def batch_verdicts(convention: Convention, store: ArtifactStore, partition: str) -> BatchVerdicts:
    """Which records of the batch passed every hook, and why the others did not."""
    records = read_raw_records(store, BatchLayout(convention.name, partition), convention)
    checkpoints = load_hook_checkpoints(convention, store, partition)
    passed: list[IngesterRecord] = []
    failed: list[RecordVerdict] = []
    rejected: list[IngesterRecord] = []
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
            if verdict.status is OutcomeStatus.REJECTED:
                rejected.append(record)
        else:
            passed.append(record)
    return BatchVerdicts(
        passed=passed, failed=failed, checkpoints=checkpoints, rejected_records=rejected
    )


@dataclass(frozen=True)
class Revalidation:
    """What the batch's verdicts by the hooks' current versions change in the archive."""

    add: list[str]
    """Passed, and not published by any batch yet."""
    withdraw: dict[str, str]
    """Published by this batch, now rejected by a hook: id -> why."""
    reinstate: dict[str, str]
    """Withdrawn from this batch, now passed by every hook: id -> why."""
    srns: dict[str, str]
    """The SRN of every record of the batch that has one."""


def _judged_by(checkpoints: dict[str, Checkpoint]) -> str:
    return ", ".join(f"{hook} {c.version_name}" for hook, c in checkpoints.items())


def plan_revalidation(
    convention: Convention, db: RecordsDatabase, partition: str, verdicts: BatchVerdicts
) -> Revalidation:
    """Compare the batch's verdicts with what the archive holds of it.

    A published record is withdrawn when a hook rejects it with another version than the
    one its provenance says passed it (or an unknown one: published before versions). A
    rejected record published by the version that now rejects it was never passed by it:
    the archive is damaged, which the batch's checks report, and nothing is withdrawn.
    Only a rejection withdraws: a record that errored (out of memory, timed out) was not
    judged, and stays as it is."""
    held = records_of_partition_by_status(db, convention.name, partition)
    passed = [r.source_id for r in verdicts.passed]
    elsewhere = find_srns(db, convention.name, [i for i in passed if i not in held])
    judged_by = _judged_by(verdicts.checkpoints)
    withdraw = {}
    for verdict in verdicts.failed:
        record = held.get(verdict.source_id)
        if verdict.status is not OutcomeStatus.REJECTED or record is None:
            continue
        version = verdicts.checkpoints[verdict.hook].version_name
        if record.status == PUBLISHED and _passed_by(record, verdict.hook) != version:
            withdraw[verdict.source_id] = f"rejected by {verdict.hook} {version}: {verdict.reason}"
    withdrawn = [i for i in passed if (record := held.get(i)) and record.status == WITHDRAWN]
    # A record upstream removed stays withdrawn, however well it passes: planning reinstates
    # it when upstream lists it again.
    gone = withdrawn_upstream(db, convention.name, withdrawn)
    reinstate = {i: f"passed by {judged_by}" for i in withdrawn if i not in gone}
    return Revalidation(
        add=[i for i in passed if i not in held and i not in elsewhere],
        withdraw=withdraw,
        reinstate=reinstate,
        srns={**elsewhere, **{i: record.srn for i, record in held.items()}},
    )


def _passed_by(record: HeldRecord, hook: str) -> str | None:
    """The version of the hook that judged the published record, if its provenance says."""
    judged = (record.provenance or {}).get("hooks", {}).get(hook)
    return judged.get("version") if isinstance(judged, dict) else None


def revalidation_report(
    convention: Convention, db: RecordsDatabase, partition: str, verdicts: BatchVerdicts
) -> ChangeReport:
    """What publishing the batch now would add, withdraw and reinstate, changing nothing."""
    plan = plan_revalidation(convention, db, partition, verdicts)
    report = ChangeReport(
        convention=convention.name,
        scope=f"batch {partition} judged by {_judged_by(verdicts.checkpoints)}",
    )
    for source_id in plan.add:
        report.note("add", ChangeExample(source_id))
    for kind, changes in (("withdraw", plan.withdraw), ("reinstate", plan.reinstate)):
        for source_id, why in sorted(changes.items()):
            report.note(kind, ChangeExample(source_id, plan.srns.get(source_id), why))
    return report


def records_provenance(
    records: Iterable[IngesterRecord],
    checkpoints: dict[str, Checkpoint],
    manifest: Manifest,
    convention: Convention,
) -> dict[str, dict[str, Any]]:
    """Each record's provenance, by source id: where it came from (the source it was
    planned from, its name, location and the record's upstream version), the batch, each
    file's SHA-256, and each hook's version, outcome, and the attempt and memory limit that
    settled it."""
    source = manifest.source
    refs = {ref.source_id: ref for ref in manifest.refs}
    provenance: dict[str, dict[str, Any]] = {}
    for record in records:
        ref = refs.get(record.source_id)
        hooks: dict[str, Any] = {}
        for hook_name, checkpoint in checkpoints.items():
            outcome = checkpoint.outcomes.get(record.source_id)
            hooks[hook_name] = {
                "version": checkpoint.version_name,
                "outcome": outcome.status.value if outcome else None,
                "attempt": outcome.attempt if outcome else None,
                "memory_limit_mb": outcome.memory_limit_mb if outcome else None,
            }
        provenance[record.source_id] = {
            "source": {
                "name": source.name if source else convention.source,
                "location": source.location if source else convention.location,
                "upstream_version": ref.version if ref else None,
                "fetched_at": record.fetched_at.isoformat(),
            },
            "batch": manifest.partition,
            "files": [
                {"name": f.name, "sha256": f.sha256, "size_mb": f.size_mb} for f in record.files
            ],
            "hooks": hooks,
        }
    return provenance


def publish_batch(
    convention: Convention,
    store: ArtifactStore,
    db: RecordsDatabase,
    partition: str,
    *,
    domain: str,
    verdicts: BatchVerdicts | None = None,
) -> PublishSummary:
    """Publish the records that passed every hook (one bulk, idempotent insert), and bring
    the batch's published records in line with the hooks' current versions: a record a
    hook now rejects is withdrawn, a withdrawn one every hook passes again is reinstated,
    and each record's provenance names the versions that judged it. Each record is
    published at the upstream version its batch was planned with: a record published at
    another is revised in place, under its SRN. `verdicts`: the batch's, when read already
    (`batch_verdicts`)."""
    if verdicts is None:
        verdicts = batch_verdicts(convention, store, partition)
    passed, failed = verdicts.passed, verdicts.failed
    manifest = load_manifest(store, BatchLayout(convention.name, partition))
    versions = {ref.source_id: ref.version for ref in manifest.refs}
    # One pass over the batch: the manifest is indexed once, not once per record.
    provenance = records_provenance(
        [*passed, *verdicts.rejected_records], verdicts.checkpoints, manifest, convention
    )
    plan = plan_revalidation(convention, db, partition, verdicts)
    result = publish_records(
        db,
        convention=convention.name,
        domain=domain,
        partition=partition,
        records=[
            RecordToPublish(
                r.source_id,
                r.metadata,
                record_version=versions.get(r.source_id),
                provenance=provenance[r.source_id],
            )
            for r in passed
        ],
    )
    withdraw_records(db, convention.name, plan.withdraw)
    reinstate_records(
        db,
        convention.name,
        list(plan.reinstate),
        reason=f"passed by {_judged_by(verdicts.checkpoints)}",
    )
    # Records published before by this batch: their provenance now names these versions.
    update_provenance(db, convention.name, partition, provenance)
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
        withdrawn=plan.withdraw,
        reinstated=plan.reinstate,
        hook_versions={hook: c.version_name for hook, c in verdicts.checkpoints.items()},
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
    convention: Convention,
    store: ArtifactStore,
    db: RecordsDatabase,
    partition: str,
    verdicts: BatchVerdicts | None = None,
) -> FeaturesSummary:
    """Store each hook's feature rows of the batch's published records, by SRN.
    `verdicts`: the batch's, when read already (`batch_verdicts`)."""
    if verdicts is None:
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
