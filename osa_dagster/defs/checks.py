"""Asset checks on every partition: the archive's invariants, visible in the UI."""

from collections.abc import Iterator

import dagster as dg

from osa_dagster.batch.audit import BatchAudit, audit_batch
from osa_dagster.conventions.base import Convention
from osa_dagster.defs.assets import features_key, published_key
from osa_dagster.defs.resources import ArtifactStoreResource, RecordsDatabaseResource

PREVIEW = 20


def _result(check: str, asset: dg.AssetKey, broken: list[str], what: str) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name=check,
        asset_key=asset,
        passed=not broken,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={"records": len(broken), "examples": ", ".join(broken[:PREVIEW]) or "-"},
        description=what if broken else None,
    )


def audit_results(convention: Convention, audit: BatchAudit) -> Iterator[dg.AssetCheckResult]:
    published, features = published_key(convention), features_key(convention)
    yield _result(
        "passed_records_published_once",
        published,
        audit.passed_not_published_once,
        "records that passed every hook but are not in the archive exactly once",
    )
    yield _result(
        "failed_records_not_published",
        published,
        audit.published_but_failed,
        "records this batch published although a hook rejected or errored them",
    )
    yield dg.AssetCheckResult(
        check_name="counts_add_up",
        asset_key=published,
        passed=audit.counts_add_up,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata=dict(audit.counts),
    )
    missing = [
        f"{record} ({hook})" for hook, ids in audit.missing_features.items() for record in ids
    ]
    yield _result(
        "published_records_have_features",
        features,
        missing,
        "published records without the rows of a hook that always emits features",
    )


def merged_result(
    check: str, asset: dg.AssetKey, results: dict[str, dg.AssetCheckResult]
) -> dg.AssetCheckResult:
    """One result for a run over many partitions (Dagster records one evaluation per
    check step): passed only if every partition passed, naming those that did not."""
    failed = [partition for partition, result in results.items() if not result.passed]
    first_failure = next((results[p] for p in failed), None)
    return dg.AssetCheckResult(
        check_name=check,
        asset_key=asset,
        passed=not failed,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "partitions": len(results),
            "failed_partitions": ", ".join(failed[:PREVIEW]) or "-",
            **({"first_failure": first_failure.description or "-"} if first_failure else {}),
        },
        description=first_failure.description if first_failure else None,
    )


CHECKS = (
    ("passed_records_published_once", "published"),
    ("failed_records_not_published", "published"),
    ("counts_add_up", "published"),
    ("published_records_have_features", "features"),
)


def convention_checks(
    convention: Convention, partitions: dg.PartitionsDefinition
) -> dg.Definitions:
    """One check per invariant, each on the asset it guards, every one for every partition.

    Each check audits the batch on its own (a few indexed queries): Dagster's multi-checks
    cannot be partitioned.
    """
    assets = {"published": published_key(convention), "features": features_key(convention)}

    def build(name: str, asset: dg.AssetKey) -> dg.AssetChecksDefinition:
        @dg.asset_check(
            name=name,
            asset=asset,
            partitions_def=partitions,
            additional_deps=[published_key(convention)]
            if asset != published_key(convention)
            else None,
            blocking=False,
        )
        def check(
            context: dg.AssetCheckExecutionContext,
            artifact_store: ArtifactStoreResource,
            records_db: RecordsDatabaseResource,
        ) -> dg.AssetCheckResult:
            store, db = artifact_store.get(), records_db.get()
            results = {}
            for partition in context.partition_keys:
                audit = audit_batch(convention, store, db, partition)
                results[partition] = next(
                    r for r in audit_results(convention, audit) if r.check_name == name
                )
            if len(results) == 1:
                return next(iter(results.values()))
            # Dagster records one evaluation per check step, not per partition of a range:
            # each partition's own verdict is reported beside it, so the UI shows it.
            for partition, result in results.items():
                context.instance.report_runless_asset_event(
                    dg.AssetCheckEvaluation(
                        asset_key=asset,
                        check_name=name,
                        passed=result.passed,
                        metadata=result.metadata,
                        severity=result.severity,
                        description=result.description,
                        partition=partition,
                    )
                )
            return merged_result(name, asset, results)

        return check

    return dg.Definitions(asset_checks=[build(name, assets[asset]) for name, asset in CHECKS])
