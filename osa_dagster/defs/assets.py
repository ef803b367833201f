"""One convention's asset graph: raw_batch -> hook_outcomes/<hook> -> published_records -> features.

One dynamic partition per frozen batch. A run covers one partition or a range of them
(`partitions_per_run`): each asset function loops over the run's partitions, calling the
pipeline steps below (osa_dagster.batch) and giving every partition its own
materialisation metadata.
"""

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import dagster as dg

from osa_dagster.batch.fetch import fetch_raw_batch
from osa_dagster.batch.hooks import (
    load_memory_history,
    run_batch_hook,
    set_aside_unreadable_checkpoint,
)
from osa_dagster.batch.publish import publish_batch, store_batch_features
from osa_dagster.conventions.base import Convention
from osa_dagster.defs.metadata import (
    attempt_metadata,
    describe_attempt,
    features_metadata,
    hook_metadata,
    memory_history_metadata,
    publish_metadata,
    raw_batch_metadata,
    set_aside_metadata,
)
from osa_dagster.defs.resources import (
    ArtifactStoreResource,
    HookRunnerResource,
    RecordsDatabaseResource,
)
from osa_dagster.engine import HookSpec
from osa_dagster.records.queries import count_published
from osa_dagster.settings import Settings

# A step whose process the kernel killed (the run worker, not the hook) is retried;
# it resumes from the hook's checkpoint.
STEP_CRASH_RETRIES = 2
# Every hook step of every run holds a slot of this pool while its hook runs, so an
# operator caps concurrent hook processes (or containers) across all runs with
# `dagster instance concurrency set osa_hooks N`. Without a limit set, it costs nothing.
HOOK_POOL = "osa_hooks"


def hook_step_retries(hook: HookSpec) -> int:
    """Retries of a hook step: one per climb of its memory ladder, to the cap, plus those of
    a crashed step (Dagster counts every earlier attempt of the step against the limit)."""
    return hook.memory.climbs() + STEP_CRASH_RETRIES


# Partitions a run covers when many are materialised at once (asset backfills, the
# new-batches sensor, `osa materialize`). Dagster's cost is per run and per step, about
# 1 s per one-partition run against 0.20 s per partition in runs of 20 (bench/RESULTS.md);
# a run failing stops only its own range. OSA_PARTITIONS_PER_RUN=1: one run each.
def partitions_per_run() -> int:
    return Settings.from_env().partitions_per_run


def backfill_policy() -> dg.BackfillPolicy:
    return dg.BackfillPolicy.multi_run(max_partitions_per_run=partitions_per_run())


def batch_partitions(convention: Convention) -> dg.DynamicPartitionsDefinition:
    return dg.DynamicPartitionsDefinition(name=f"{convention.name}_batches")


def materialize_each_partition(
    context: dg.AssetExecutionContext, step: Callable[[str], Mapping[str, Any]]
) -> dg.MaterializeResult:
    """Run `step` for every partition of the run, in order, each partition getting the
    metadata it returns: a run over a range materialises each batch with its own."""
    for partition in context.partition_keys:
        context.add_asset_metadata(dict(step(partition)), partition_key=partition)
    return dg.MaterializeResult()


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
        backfill_policy=backfill_policy(),
        group_name=convention.name,
        kinds={"python"},
        description=f"Records of one {convention.name} batch fetched by its ingester: "
        "records.jsonl plus files; oversized records skipped and counted.",
    )
    def raw_batch(
        context: dg.AssetExecutionContext, artifact_store: ArtifactStoreResource
    ) -> dg.MaterializeResult:
        store = artifact_store.get()
        return materialize_each_partition(
            context,
            lambda partition: raw_batch_metadata(fetch_raw_batch(convention, store, partition)),
        )

    return raw_batch


def _hook_asset(
    convention: Convention, hook: HookSpec, partitions: dg.PartitionsDefinition
) -> dg.AssetsDefinition:
    ladder = hook.memory.ladder()

    @dg.asset(
        key=hook_key(convention, hook),
        deps=[raw_batch_key(convention)],
        partitions_def=partitions,
        backfill_policy=backfill_policy(),
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
        runner = hook_runner.get()
        oom_killed: dict[str, int | None] = {}
        for partition in context.partition_keys:
            set_aside = set_aside_unreadable_checkpoint(convention, store, partition, hook.name)
            if set_aside is not None:
                context.log.warning(set_aside.message)
                yield dg.AssetObservation(
                    asset_key=hook_key(convention, hook),
                    partition=partition,
                    metadata=set_aside_metadata(set_aside),
                )
            progress = run_batch_hook(convention, hook.name, store, partition, runner)
            # Yielded, not logged: events logged through the context are dropped when the
            # step then raises, and the OOM attempt is the one a curator must see.
            for attempt in progress.attempts_this_call:
                context.log.info(f"hook {hook.name} on {partition}: {describe_attempt(attempt)}")
                yield dg.AssetObservation(
                    asset_key=hook_key(convention, hook),
                    partition=partition,
                    metadata=attempt_metadata(attempt),
                )
            if progress.done:
                history = load_memory_history(convention, store, hook.name)
                context.add_asset_metadata(
                    {
                        **hook_metadata(progress.checkpoint),
                        **memory_history_metadata(history),
                        **(set_aside_metadata(set_aside) if set_aside else {}),
                    },
                    partition_key=partition,
                )
            else:
                oom_killed[partition] = progress.next_memory_mb
        if oom_killed:
            context.log.warning(
                f"hook {hook.name} was OOM-killed in {', '.join(oom_killed)}; their records "
                f"not yet done run again with more memory ({oom_killed})"
            )
            # Only an OOM gets here: the next step attempt takes its memory from the
            # checkpoint, and the partitions already done return at once.
            raise dg.RetryRequested(max_retries=hook_step_retries(hook), seconds_to_wait=0)
        yield dg.MaterializeResult()

    return hook_outcomes


def _published_asset(
    convention: Convention, partitions: dg.PartitionsDefinition
) -> dg.AssetsDefinition:
    @dg.asset(
        key=published_key(convention),
        deps=[hook_key(convention, hook) for hook in convention.hooks],
        partitions_def=partitions,
        backfill_policy=backfill_policy(),
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
        db, store = records_db.get(), artifact_store.get()

        def publish(partition: str) -> dict[str, Any]:
            summary = publish_batch(
                convention, store, db, partition, domain=records_db.srn_domain()
            )
            return publish_metadata(summary, count_published(db, convention.name))

        return materialize_each_partition(context, publish)

    return published_records


def _features_asset(
    convention: Convention, partitions: dg.PartitionsDefinition
) -> dg.AssetsDefinition:
    @dg.asset(
        key=features_key(convention),
        deps=[published_key(convention)],
        partitions_def=partitions,
        backfill_policy=backfill_policy(),
        group_name=convention.name,
        kinds={"sqlite", "postgres"},
        description="Each hook's feature rows of the published records, stored by SRN.",
    )
    def features(
        context: dg.AssetExecutionContext,
        artifact_store: ArtifactStoreResource,
        records_db: RecordsDatabaseResource,
    ) -> dg.MaterializeResult:
        store, db = artifact_store.get(), records_db.get()
        return materialize_each_partition(
            context,
            lambda partition: features_metadata(
                store_batch_features(convention, store, db, partition)
            ),
        )

    return features


def convention_assets(
    convention: Convention, partitions: dg.DynamicPartitionsDefinition
) -> dg.Definitions:
    return dg.Definitions(
        assets=[
            _raw_batch_asset(convention, partitions),
            *(_hook_asset(convention, hook, partitions) for hook in convention.hooks),
            _published_asset(convention, partitions),
            _features_asset(convention, partitions),
        ]
    )
