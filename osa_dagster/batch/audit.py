"""Auditing: the invariants a materialised batch must hold against the archive."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from osa_sdk.types import OutcomeStatus

from osa_dagster.batch.fetch import read_ingest_report
from osa_dagster.batch.plan import load_manifest
from osa_dagster.batch.publish import BatchVerdicts, batch_verdicts
from osa_dagster.conventions.base import Convention
from osa_dagster.records import RecordsDatabase, find_srns
from osa_dagster.records.queries import (
    publication_counts,
    published_in_partition,
    srns_with_features,
)
from osa_dagster.storage.layout import BatchLayout
from osa_dagster.storage.store import ArtifactStore


@dataclass
class BatchAudit:
    """What must hold for a materialised batch; each list names the records that break it."""

    passed_not_published_once: list[str]
    published_but_failed: list[str]
    missing_features: dict[str, list[str]]
    """hook -> published records lacking that hook's feature rows (hooks that always emit)."""
    counts: dict[str, int]
    verdicts: BatchVerdicts
    """Why each record did not pass, and the hooks' checkpoints the audit read."""

    @property
    def counts_add_up(self) -> bool:
        """in = passed + rejected + errored + skipped, and the ingester's own count agrees."""
        c = self.counts
        settled = c["passed"] + c["rejected"] + c["errored"]
        return c["planned"] == settled + c["skipped"] and c["fetched"] == settled


def audit_batch(
    convention: Convention,
    store: ArtifactStore,
    db: RecordsDatabase,
    partition: str,
    verdicts: BatchVerdicts | None = None,
) -> BatchAudit:
    """Check a batch's records against the archive: the invariants behind the asset checks.
    `verdicts`: the batch's, when read already (`batch_verdicts`)."""
    layout = BatchLayout(convention.name, partition)
    if verdicts is None:
        verdicts = batch_verdicts(convention, store, partition)
    passed_ids = [r.source_id for r in verdicts.passed]
    counts_in_archive = publication_counts(db, convention.name, passed_ids)
    published_here = published_in_partition(db, convention.name, partition)
    failed_ids = {verdict.source_id for verdict in verdicts.failed}
    passed_srns = find_srns(db, convention.name, passed_ids)
    missing: dict[str, list[str]] = {}
    for spec in convention.hooks:
        if spec.emits_features:
            with_rows = srns_with_features(db, spec.name, list(passed_srns.values()))
            lacking = sorted(i for i, srn in passed_srns.items() if srn not in with_rows)
            if lacking:
                missing[spec.name] = lacking
    report = read_ingest_report(store, layout)
    statuses = Counter(verdict.status for verdict in verdicts.failed)
    return BatchAudit(
        passed_not_published_once=sorted(i for i in passed_ids if counts_in_archive.get(i) != 1),
        published_but_failed=sorted(failed_ids & published_here.keys()),
        missing_features=missing,
        counts={
            "planned": len(load_manifest(store, layout).refs),
            "fetched": report.records,
            "passed": len(verdicts.passed),
            "rejected": statuses[OutcomeStatus.REJECTED],
            "errored": statuses[OutcomeStatus.ERRORED],
            "skipped": len(report.skipped_oversize) + len(report.failed) + len(report.missing),
        },
        verdicts=verdicts,
    )
