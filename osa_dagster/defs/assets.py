"""One convention's asset graph: raw_batch -> hook_outcomes/<hook> -> published_records -> features.

One dynamic partition per frozen batch. The asset functions only translate between
Dagster and the pipeline steps below (osa_dagster.conventions.pipeline).
"""

from collections.abc import Iterator

import dagster as dg

from osa_dagster.conventions.base import Convention
from osa_dagster.conventions.pipeline import (
    fetch_raw_batch,
    load_memory_history,
    publish_batch,
    run_batch_hook,
    store_batch_features,
)
from osa_dagster.defs.metadata import (
    attempt_metadata,
    describe_attempt,
    features_metadata,
    hook_metadata,
    memory_history_metadata,
    publish_metadata,
    raw_batch_metadata,
)
from osa_dagster.defs.resources import (
    ArtifactStoreResource,
    HookRunnerResource,
    RecordsDatabaseResource,
)
from osa_dagster.engine import HookSpec
from osa_dagster.records.queries import count_published

# A step whose process the kernel killed (the run worker, not the hook) is retried;
# it resumes from the hook's checkpoint.
STEP_CRASH_RETRIES = 2
# Every hook step of every run holds a slot of this pool while its hook runs, so an
# operator caps concurrent hook processes (or containers) across all runs with
# `dagster instance concurrency set osa_hooks N`. Without a limit set, it costs nothing.
HOOK_POOL = "osa_hooks"


def batch_partitions(convention: Convention) -> dg.DynamicPartitionsDefinition:
    return dg.DynamicPartitionsDefinition(name=f"{convention.name}_batches")


def raw_batch_key(convention: Convention) -> dg.AssetKey:
    return dg.AssetKey([convention.name, "raw_batch"])


def hook_key(convention: Convention, hook: HookSpec) -> dg.AssetKey:
    return dg.AssetKey([convention.name, "hook_outcomes", hook.name])


def published_key(convention: Convention) -> dg.AssetKey:
    return dg.AssetKey([convention.name, "published_records"])


def features_key(convention: Convention) -> dg.AssetKey:
    return dg.AssetKey([convention.name, "features"])


def _raw_batch_asset(
    convention: Convention, partitions: dg.PartitionsDefinition
) -> dg.AssetsDefinition:
    @dg.asset(
        key=raw_batch_key(convention),
        partitions_def=partitions,
        group_name=convention.name,
        kinds={"python"},
        description=f"Records of one {convention.name} batch fetched by its ingester: "
        "records.jsonl plus files; oversized records skipped and counted.",
    )
    def raw_batch(
        context: dg.AssetExecutionContext, artifact_store: ArtifactStoreResource
    ) -> dg.MaterializeResult:
        summary = fetch_raw_batch(convention, artifact_store.get(), context.partition_key)
        return dg.MaterializeResult(metadata=raw_batch_metadata(summary))

    return raw_batch


def _hook_asset(
    convention: Convention, hook: HookSpec, partitions: dg.PartitionsDefinition
) -> dg.AssetsDefinition:
    ladder = hook.memory.ladder()

    @dg.asset(
        key=hook_key(convention, hook),
        deps=[raw_batch_key(convention)],
        partitions_def=partitions,
        group_name=convention.name,
        kinds={"python"},
        retry_policy=dg.RetryPolicy(max_retries=STEP_CRASH_RETRIES),
        pool=HOOK_POOL,
        description=f"Outcomes of hook {hook.name!r} over the batch (memory ladder "
        f"{' -> '.join(f'{mb} MB' for mb in ladder)}, escalated on OOM only).",
    )
    def hook_outcomes(
        context: dg.AssetExecutionContext,
        artifact_store: ArtifactStoreResource,
        hook_runner: HookRunnerResource,
    ) -> Iterator[dg.AssetObservation | dg.MaterializeResult]:
        store = artifact_store.get()
        progress = run_batch_hook(
            convention, hook.name, store, context.partition_key, hook_runner.get()
        )
        # Yielded, not logged: events logged through the context are dropped when the step
        # then raises, and the OOM attempt is the one a curator must see.
        for attempt in progress.attempts_this_call:
            context.log.info(f"hook {hook.name}: {describe_attempt(attempt)}")
            yield dg.AssetObservation(
                asset_key=hook_key(convention, hook),
                partition=context.partition_key,
                metadata=attempt_metadata(attempt),
            )
        if not progress.done:
            context.log.warning(
                f"hook {hook.name} was OOM-killed; the records not yet done run again with "
                f"{progress.next_memory_mb} MB"
            )
            # Only an OOM gets here: the next step attempt takes its memory from the checkpoint.
            raise dg.RetryRequested(max_retries=len(ladder), seconds_to_wait=0)
        history = load_memory_history(convention, store, hook.name)
        yield dg.MaterializeResult(
            metadata={**hook_metadata(progress.checkpoint), **memory_history_metadata(history)}
        )

    return hook_outcomes


def _published_asset(
    convention: Convention, partitions: dg.PartitionsDefinition
) -> dg.AssetsDefinition:
    @dg.asset(
        key=published_key(convention),
        deps=[hook_key(convention, hook) for hook in convention.hooks],
        partitions_def=partitions,
        group_name=convention.name,
        kinds={"sqlite", "postgres"},
        description="Records that passed every hook, published once per (convention, source id) "
        "with an SRN.",
    )
    def published_records(
        context: dg.AssetExecutionContext,
        artifact_store: ArtifactStoreResource,
        records_db: RecordsDatabaseResource,
    ) -> dg.MaterializeResult:
        db = records_db.get()
        summary = publish_batch(
            convention,
            artifact_store.get(),
            db,
            context.partition_key,
            domain=records_db.srn_domain(),
        )
        total = count_published(db, convention.name)
        return dg.MaterializeResult(metadata=publish_metadata(summary, total))

    return published_records


def _features_asset(
    convention: Convention, partitions: dg.PartitionsDefinition
) -> dg.AssetsDefinition:
    @dg.asset(
        key=features_key(convention),
        deps=[published_key(convention)],
        partitions_def=partitions,
        group_name=convention.name,
        kinds={"sqlite", "postgres"},
        description="Each hook's feature rows of the published records, stored by SRN.",
    )
    def features(
        context: dg.AssetExecutionContext,
        artifact_store: ArtifactStoreResource,
        records_db: RecordsDatabaseResource,
    ) -> dg.MaterializeResult:
        summary = store_batch_features(
            convention, artifact_store.get(), records_db.get(), context.partition_key
        )
        return dg.MaterializeResult(metadata=features_metadata(summary))

    return features


def convention_assets(
    convention: Convention, partitions: dg.DynamicPartitionsDefinition
) -> list[dg.AssetsDefinition]:
    return [
        _raw_batch_asset(convention, partitions),
        *(_hook_asset(convention, hook, partitions) for hook in convention.hooks),
        _published_asset(convention, partitions),
        _features_asset(convention, partitions),
    ]
