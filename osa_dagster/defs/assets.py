"""One convention's asset graph: raw_batch -> hook_outcomes/<hook> -> published_records -> features.

One dynamic partition per frozen batch. A run covers one partition or a range of them
(`partitions_per_run`): each asset function loops over the run's partitions, calling the
pipeline steps below (osa_dagster.batch) and giving every partition its own
materialisation metadata.
"""

import functools
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ParamSpec

import dagster as dg

from osa_dagster.batch.fetch import fetch_raw_batch
from osa_dagster.batch.hooks import (
    HookJob,
    HookJobResult,
    load_memory_history,
    run_hook_jobs,
)
from osa_dagster.batch.publish import publish_batch, store_batch_features
from osa_dagster.batch.shards import hook_state_key
from osa_dagster.conventions.base import Convention
from osa_dagster.defs.checks import (
    CHECKS,
    BatchFacts,
    GuardedAsset,
    Judged,
    check_evaluations,
    check_specs,
    judge,
)
from osa_dagster.defs.dagster_private import DagsterExecutionInterruptedError, UriMetadataSet
from osa_dagster.defs.io_manager import IO_MANAGER_KEY
from osa_dagster.defs.leases import hold_partitions, leased_partitions
from osa_dagster.defs.metadata import (
    HOOK_VERSION_METADATA,
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
    ISOLATION_METADATA,
    ArtifactStoreResource,
    AssetKinds,
    HookRunnerResource,
    RecordsDatabaseResource,
)
from osa_dagster.engine import HookSpec
from osa_dagster.engine.spec import hook_version
from osa_dagster.records import RecordsDatabase
from osa_dagster.records.queries import count_published
from osa_dagster.settings import Settings
from osa_dagster.storage.layout import BatchLayout
from osa_dagster.storage.store import ArtifactStore

# A step whose process the kernel killed (the run worker, not the hook) is retried;
# it resumes from the hook's checkpoint.
STEP_CRASH_RETRIES = 2
P = ParamSpec("P")
StepEvent = dg.AssetObservation | dg.MaterializeResult
STEP_INTERRUPTED = (
    "interrupted (Ctrl-C, or the run was terminated): its hooks were stopped, and their "
    "checkpoints keep what they did for the next run to resume from"
)
# The hook step of every run holds a slot of this pool while its hooks run, so an operator
# caps the runs running hooks at once with `dagster instance concurrency set osa_hooks N`.
# Without a limit set, it costs nothing. The hook attempts themselves share the machine's
# slots and memory budget (OSA_HOOK_SLOTS, OSA_HOOK_MEMORY_BUDGET), whatever run they are in.
HOOK_POOL = "osa_hooks"


# Partitions a run covers when many are materialised at once (asset backfills, the
# new-batches sensor, `osa materialize`). Dagster's cost is per run and per step, about
# 0.6 s per one-partition run against 0.07 s per partition in runs of 20 (bench/RESULTS.md);
# a run failing stops only its own range. OSA_PARTITIONS_PER_RUN=1: one run each.
def partitions_per_run() -> int:
    return Settings.from_env().partitions_per_run


def backfill_policy() -> dg.BackfillPolicy:
    return dg.BackfillPolicy.multi_run(max_partitions_per_run=partitions_per_run())


def batch_partitions_name(convention: Convention) -> str:
    return f"{convention.name}_batches"


def batch_partitions(convention: Convention) -> dg.DynamicPartitionsDefinition:
    return dg.DynamicPartitionsDefinition(name=batch_partitions_name(convention))


def materialize_each_partition(
    context: dg.AssetExecutionContext,
    store: ArtifactStore,
    db: RecordsDatabase,
    convention: Convention,
    step: Callable[[BatchFacts], Mapping[str, Any]],
    checked: GuardedAsset | None = None,
) -> Iterator[dg.MaterializeResult | dg.AssetCheckEvaluation | dg.Output]:
    """Run `step` for every partition of the run, in order, each partition getting the
    metadata it returns: a run over a range materialises each batch with its own. Each
    partition's step holds the batch's lease (defs/leases.py), and the checks of the asset
    (`checked`) judge the batch before the lease is let go (defs/checks.py); the step and
    the checks share what they read of the batch (BatchFacts), which the lease keeps
    unchanged meanwhile."""
    label = context.asset_key.to_user_string()
    judged: dict[str, Judged] = {}
    for partition in leased_partitions(context, db, convention.name, label):
        facts = BatchFacts(convention, store, db, partition, context.run_id)
        context.add_asset_metadata(dict(step(facts)), partition_key=partition)
        if checked is not None:
            judged[partition] = judge(checked, facts)
    yield dg.MaterializeResult()
    yield from check_evaluations(context.instance, context.asset_key, judged)
    # The checks' own outputs, so that Dagster sees each check as having run.
    for output_name in context.assets_def.check_specs_by_output_name:
        yield dg.Output(None, output_name=output_name)


def artifact_uri(store: ArtifactStore, key: str) -> dict[str, Any]:
    """The "dagster/uri" metadata of an artifact: its s3:// URL, or file:// URI."""
    where = store.describe(key)
    return dict(UriMetadataSet(uri=Path(where).as_uri() if where.startswith("/") else where))


def raw_batch_key(convention: Convention) -> dg.AssetKey:
    return dg.AssetKey([convention.name, "raw_batch"])


def hook_key(convention: Convention, hook: HookSpec) -> dg.AssetKey:
    return dg.AssetKey([convention.name, "hook_outcomes", hook.name])


def published_key(convention: Convention) -> dg.AssetKey:
    return dg.AssetKey([convention.name, "published_records"])


def features_key(convention: Convention) -> dg.AssetKey:
    return dg.AssetKey([convention.name, "features"])


def check_keys(convention: Convention) -> list[dg.AssetCheckKey]:
    """Every check of the convention's batches: a batch is finished once each has a verdict."""
    guarded = {"published": published_key(convention), "features": features_key(convention)}
    return [dg.AssetCheckKey(guarded[spec.asset], spec.name) for spec in CHECKS]


def _raw_batch_asset(
    convention: Convention, partitions: dg.PartitionsDefinition, kinds: AssetKinds
) -> dg.AssetsDefinition:
    @dg.asset(
        key=raw_batch_key(convention),
        partitions_def=partitions,
        backfill_policy=backfill_policy(),
        group_name=convention.name,
        kinds={"python", *filter(None, [kinds.store])},
        io_manager_key=IO_MANAGER_KEY,
        description=f"Records of one {convention.name} batch fetched by its ingester: "
        "records.jsonl plus files; oversized records skipped and counted.",
    )
    def raw_batch(
        context: dg.AssetExecutionContext,
        artifact_store: ArtifactStoreResource,
        records_db: RecordsDatabaseResource,
    ) -> Iterator[dg.MaterializeResult | dg.AssetCheckEvaluation | dg.Output]:
        store = artifact_store.get()
        yield from materialize_each_partition(
            context,
            store,
            records_db.get(),
            convention,
            lambda facts: {
                **raw_batch_metadata(fetch_raw_batch(convention, store, facts.partition)),
                **artifact_uri(store, BatchLayout(convention.name, facts.partition).raw),
            },
        )

    return raw_batch


def _interrupt_fails_step(
    compute: Callable[P, Iterator[StepEvent]],
) -> Callable[P, Iterator[StepEvent]]:
    """The step's compute, failing for good when interrupted.

    Dagster retries an interrupted step that has a retry policy; the hook step's policy is for
    a crashed step process, while Ctrl-C or a terminated run means stop. By then
    run_hook_jobs has killed the hooks, and their checkpoints keep what they did."""

    @functools.wraps(compute)
    def compute_until_interrupted(*args: P.args, **kwargs: P.kwargs) -> Iterator[StepEvent]:
        try:
            yield from compute(*args, **kwargs)
        except (KeyboardInterrupt, DagsterExecutionInterruptedError) as interrupt:
            raise dg.Failure(description=STEP_INTERRUPTED, allow_retries=False) from interrupt

    return compute_until_interrupted


def _hooks_asset(
    convention: Convention, partitions: dg.PartitionsDefinition, kinds: AssetKinds
) -> dg.AssetsDefinition:
    """Every hook of the convention in one step, each still its own asset.

    Steps of one run execute one after another, so a step per hook would run the hooks of
    a range one batch and one hook at a time. This step runs every (batch, hook) of its
    range at once, as far as the machine's slots and memory budget allow (run_hook_jobs),
    and gives each hook's asset its own materialisation and metadata per partition. Each
    job climbs its whole memory ladder in the step, so an OOM holds back no other job. A
    selection of some hooks (the UI, a backfill of one hook) runs only those.
    """
    specs = [
        dg.AssetSpec(
            key=hook_key(convention, hook),
            deps=[raw_batch_key(convention)],
            group_name=convention.name,
            kinds={kinds.runner, *filter(None, [kinds.store])},
            skippable=True,
            description=f"Outcomes of hook {hook.name!r} version {hook_version(hook)} over the "
            f"batch (memory ladder {' -> '.join(f'{mb} MB' for mb in hook.memory.ladder())}, "
            "escalated on OOM only).",
            # A batch materialised by another version shows as changed code in the UI: the
            # batches this version has not judged.
            code_version=hook_version(hook),
            metadata={HOOK_VERSION_METADATA: hook_version(hook)},
        ).with_io_manager_key(IO_MANAGER_KEY)
        for hook in convention.hooks
    ]

    @dg.multi_asset(
        name=f"{convention.name}__hook_outcomes",
        specs=specs,
        partitions_def=partitions,
        backfill_policy=backfill_policy(),
        retry_policy=dg.RetryPolicy(max_retries=STEP_CRASH_RETRIES),
        pool=HOOK_POOL,
        can_subset=True,
    )
    @_interrupt_fails_step
    def hook_outcomes(
        context: dg.AssetExecutionContext,
        artifact_store: ArtifactStoreResource,
        hook_runner: HookRunnerResource,
        records_db: RecordsDatabaseResource,
    ) -> Iterator[dg.AssetObservation | dg.MaterializeResult]:
        store, runner, capacity = artifact_store.get(), hook_runner.get(), hook_runner.capacity()
        hooks = [
            h for h in convention.hooks if hook_key(convention, h) in context.selected_asset_keys
        ]
        jobs = [HookJob(p, h.name) for p in context.partition_keys for h in hooks]
        failed: list[HookJobResult] = []
        # Every batch of the step is held while its hooks run: all of them at once, taken in
        # one order by every run, so that two runs of overlapping ranges cannot deadlock.
        label = f"{convention.name}/hook_outcomes"
        with hold_partitions(context, records_db.get(), convention.name, label):
            for result in run_hook_jobs(
                convention,
                store,
                runner,
                jobs,
                capacity=capacity,
                run_id=context.run_id,
            ):
                job, key = result.job, hook_key(convention, convention.hook(result.job.hook))
                set_aside: dict[str, Any] = {}
                for aside in result.set_aside:
                    context.log.warning(aside.message)
                    set_aside = set_aside_metadata(aside)
                    yield dg.AssetObservation(
                        asset_key=key, partition=job.partition, metadata=set_aside
                    )
                if result.progress is None:
                    context.log.error(f"hook {job.hook} on {job.partition} failed: {result.error}")
                    failed.append(result)
                    continue
                # Yielded, not only logged: events logged through the context are dropped when
                # the step then raises, and an OOM attempt is one a curator must see.
                for attempt in result.progress.attempts_this_call:
                    context.log.info(
                        f"hook {job.hook} on {job.partition}: {describe_attempt(attempt)}"
                    )
                    yield dg.AssetObservation(
                        asset_key=key, partition=job.partition, metadata=attempt_metadata(attempt)
                    )
                history = load_memory_history(convention, store, job.hook)
                checkpoint = result.progress.checkpoint
                context.add_asset_metadata(
                    {
                        ISOLATION_METADATA: hook_runner.isolation(),
                        **hook_metadata(checkpoint, context.run_id),
                        **memory_history_metadata(history, checkpoint.outcomes),
                        **set_aside,
                        **artifact_uri(
                            store,
                            hook_state_key(
                                store,
                                BatchLayout(convention.name, job.partition),
                                job.hook,
                                checkpoint.hook_version,
                            ),
                        ),
                    },
                    asset_key=key,
                    partition_key=job.partition,
                )
        if failed:
            raise failed[0].error  # type: ignore[misc]  # a failed job has its error
        for hook in hooks:
            yield dg.MaterializeResult(asset_key=hook_key(convention, hook))

    return hook_outcomes


def _published_asset(
    convention: Convention, partitions: dg.PartitionsDefinition, kinds: AssetKinds
) -> dg.AssetsDefinition:
    @dg.asset(
        key=published_key(convention),
        deps=[hook_key(convention, hook) for hook in convention.hooks],
        partitions_def=partitions,
        backfill_policy=backfill_policy(),
        group_name=convention.name,
        kinds={kinds.database},
        io_manager_key=IO_MANAGER_KEY,
        description="Records that passed every hook, published once per (convention, source id) "
        "with an SRN.",
        check_specs=check_specs("published", published_key(convention), partitions),
    )
    def published_records(
        context: dg.AssetExecutionContext,
        artifact_store: ArtifactStoreResource,
        records_db: RecordsDatabaseResource,
    ) -> Iterator[dg.MaterializeResult | dg.AssetCheckEvaluation | dg.Output]:
        db, store = records_db.get(), artifact_store.get()

        def publish(facts: BatchFacts) -> dict[str, Any]:
            summary = publish_batch(
                convention,
                store,
                db,
                facts.partition,
                domain=records_db.srn_domain(),
                verdicts=facts.verdicts,
            )
            return publish_metadata(summary, count_published(db, convention.name))

        yield from materialize_each_partition(
            context, store, db, convention, publish, checked="published"
        )

    return published_records


def _features_asset(
    convention: Convention, partitions: dg.PartitionsDefinition, kinds: AssetKinds
) -> dg.AssetsDefinition:
    @dg.asset(
        key=features_key(convention),
        deps=[published_key(convention)],
        partitions_def=partitions,
        backfill_policy=backfill_policy(),
        group_name=convention.name,
        kinds={kinds.database},
        io_manager_key=IO_MANAGER_KEY,
        description="Each hook's feature rows of the published records, stored by SRN.",
        check_specs=check_specs("features", features_key(convention), partitions),
    )
    def features(
        context: dg.AssetExecutionContext,
        artifact_store: ArtifactStoreResource,
        records_db: RecordsDatabaseResource,
    ) -> Iterator[dg.MaterializeResult | dg.AssetCheckEvaluation | dg.Output]:
        store, db = artifact_store.get(), records_db.get()
        yield from materialize_each_partition(
            context,
            store,
            db,
            convention,
            lambda facts: features_metadata(
                store_batch_features(convention, store, db, facts.partition, facts.verdicts)
            ),
            checked="features",
        )

    return features


def convention_assets(
    convention: Convention, partitions: dg.DynamicPartitionsDefinition, kinds: AssetKinds
) -> dg.Definitions:
    return dg.Definitions(
        assets=[
            _raw_batch_asset(convention, partitions, kinds),
            _hooks_asset(convention, partitions, kinds),
            _published_asset(convention, partitions, kinds),
            _features_asset(convention, partitions, kinds),
        ]
    )
