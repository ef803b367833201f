"""The sensors that request ingest runs: one for every newly planned partition, one that
requests again the batches of a run that died for reasons outside its work once Dagster's
run retries are used up, and one (off by default) that re-validates the batches a changed
hook has not judged."""

from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass

import dagster as dg

from osa_dagster.batch.revalidate import stale_partitions
from osa_dagster.conventions.base import Convention
from osa_dagster.defs.assets import check_keys, features_key, partitions_per_run
from osa_dagster.defs.dagster_private import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    PARTITION_NAME_TAG,
    RunFailureReason,
    UnresolvedAssetJobDefinition,
    ended_backfill,
    partition_range_tags,
    run_failure_reason,
    will_be_retried,
)
from osa_dagster.defs.jobs import CONVENTION_TAG
from osa_dagster.defs.resources import ArtifactStoreResource, hooks_refusal
from osa_dagster.engine.spec import hook_version

SENSOR_INTERVAL_S = 15
# Finding stale batches reads every hook's checkpoint of every batch: not every 15 s.
STALE_SENSOR_INTERVAL_S = 300
# How many times over the batches of a run that keeps dying are requested again, each time
# with Dagster's own run retries: a batch that kills every worker needs a person.
MAX_RESUMES = 3
RESUMES_TAG = "osa/resumes"
RESUMED_FROM_TAG = "osa/resumed-from"
# A run in one of these may still work its batches.
LIVE_RUN_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def contiguous_chunks(keys: Sequence[str], skip: Set[str], size: int) -> list[list[str]]:
    """`keys` without `skip`, cut into runs of at most `size` keys that were adjacent in
    `keys`: a run over a partition range must not cover a partition it should skip."""
    chunks: list[list[str]] = [[]]
    for key in keys:
        if key in skip:
            chunks.append([])
        else:
            if len(chunks[-1]) == size:
                chunks.append([])
            chunks[-1].append(key)
    return [chunk for chunk in chunks if chunk]


def partition_range_request(
    chunk: Sequence[str], key_prefix: str = "", tags: Mapping[str, str] | None = None
) -> dg.RunRequest:
    """One run over the partitions `chunk[0]`..`chunk[-1]` (adjacent in the definition),
    whose run key names them after `key_prefix`."""
    if len(chunk) == 1:
        return dg.RunRequest(run_key=key_prefix + chunk[0], partition_key=chunk[0], tags=tags)
    first, last = chunk[0], chunk[-1]
    return dg.RunRequest(
        run_key=f"{key_prefix}{first}...{last}",
        tags={**(tags or {}), **partition_range_tags(first, last)},
    )


@dataclass(frozen=True)
class BatchOrder:
    """A convention's batches in planning order: the order that a run's range follows."""

    keys: Sequence[str]
    position: Mapping[str, int]

    @classmethod
    def of(
        cls, instance: dg.DagsterInstance, partitions: dg.DynamicPartitionsDefinition
    ) -> "BatchOrder":
        keys = partitions.get_partition_keys(dynamic_partitions_store=instance)
        return cls(keys=keys, position={key: n for n, key in enumerate(keys)})

    def covered_by(self, run: dg.DagsterRun) -> list[str]:
        """The batches `run` works: its partition, or every one of its range."""
        if PARTITION_NAME_TAG in run.tags:
            return [run.tags[PARTITION_NAME_TAG]]
        first = self.position.get(run.tags.get(ASSET_PARTITION_RANGE_START_TAG, ""))
        last = self.position.get(run.tags.get(ASSET_PARTITION_RANGE_END_TAG, ""))
        if first is None or last is None:
            return []
        return list(self.keys[first : last + 1])


def finished_partitions(
    instance: dg.DagsterInstance, run_ids: Sequence[str], convention: Convention
) -> set[str]:
    """The batches that the runs `run_ids`, together, materialised `features` of and gave a
    verdict of every check on: what a run that died before its end need not do again."""
    features = features_key(convention)
    checks = set(check_keys(convention))
    materialized: set[str] = set()
    evaluated: dict[str, set[dg.AssetCheckKey]] = {}
    kinds = {dg.DagsterEventType.ASSET_MATERIALIZATION, dg.DagsterEventType.ASSET_CHECK_EVALUATION}
    for run_id in run_ids:
        for record in instance.get_records_for_run(run_id, of_type=kinds).records:
            event = record.event_log_entry.dagster_event
            if event is None:
                continue
            if event.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION:
                if event.asset_key == features and event.partition is not None:
                    materialized.add(event.partition)
            else:
                verdict = event.asset_check_evaluation_data
                if verdict.partition is not None:
                    evaluated.setdefault(verdict.partition, set()).add(verdict.asset_check_key)
    return {key for key in materialized if evaluated.get(key, set()) >= checks}


def _why_not_resumed(
    context: dg.RunFailureSensorContext, convention: Convention, reason: RunFailureReason
) -> str | None:
    """Why the failed run's batches are not for this sensor to request again, if they are not."""
    instance, run = context.instance, context.dagster_run
    backfill = ended_backfill(instance, run)
    if backfill is not None:
        return f"run {run.run_id} belongs to backfill {backfill}, which has ended"
    if will_be_retried(instance, run, reason):
        return f"run {run.run_id} will be retried by Dagster"
    if reason == RunFailureReason.STEP_FAILURE:
        steps = sorted({e.step_key for e in context.get_step_failure_events() if e.step_key})
        # Running the batch again would fail again until the cause (bad input, a bug) is fixed.
        return (
            f"run {run.run_id} failed in step {', '.join(steps) or '(unknown)'}: its own "
            f"failure, not re-requested (`osa backfill {convention.name} --failed` runs its "
            "batches again once the cause is fixed)"
        )
    return None


def _finished_since(
    instance: dg.DagsterInstance, run: dg.DagsterRun, convention: Convention, order: BatchOrder
) -> set[str]:
    """The batches of `run` that it, Dagster's retries of it (the same root run) or a later
    successful run over some of them (an operator's, say) finished."""
    covered = set(order.covered_by(run))
    group = instance.get_run_group(run.run_id)
    run_ids = [r.run_id for r in group[1]] if group else [run.run_id]
    root = instance.get_run_record_by_id(run.root_run_id or run.run_id)
    if root is not None:
        later = instance.get_runs(
            dg.RunsFilter(
                tags={CONVENTION_TAG: convention.name},
                statuses=[dg.DagsterRunStatus.SUCCESS],
                created_after=root.create_timestamp,
            )
        )
        run_ids += [r.run_id for r in later if covered.intersection(order.covered_by(r))]
    return finished_partitions(instance, run_ids, convention)


def _in_live_runs(
    instance: dg.DagsterInstance, failed: dg.DagsterRun, convention: Convention, order: BatchOrder
) -> set[str]:
    """The batches that a queued or running run other than `failed` may still work (the
    instance stores a run's failure a moment before its status: it may still read STARTED).
    The ingest job's runs and those of `osa backfill` carry the convention's tag."""
    live = instance.get_runs(
        dg.RunsFilter(tags={CONVENTION_TAG: convention.name}, statuses=LIVE_RUN_STATUSES)
    )
    return {key for run in live if run.run_id != failed.run_id for key in order.covered_by(run)}


def unfinished_batches_request(
    context: dg.RunFailureSensorContext,
    convention: Convention,
    partitions: dg.DynamicPartitionsDefinition,
) -> dg.SensorResult | dg.SkipReason:
    """The runs that work again the batches the failed run of the ingest job left unfinished,
    or why there are none. Only a run that died for reasons outside its work (its worker
    gone, an exception in the run, a start timeout) is resumed, once Dagster will not retry
    it, and at most MAX_RESUMES times over."""
    run = context.dagster_run
    reason = run_failure_reason(context.failure_event)
    why_not = _why_not_resumed(context, convention, reason)
    if why_not is not None:
        return dg.SkipReason(why_not)
    order = BatchOrder.of(context.instance, partitions)
    covered = order.covered_by(run)
    skip = _finished_since(context.instance, run, convention, order) | _in_live_runs(
        context.instance, run, convention, order
    )
    left = [key for key in covered if key not in skip]
    died = f"run {run.run_id} died ({reason.value})"
    if not left:
        return dg.SkipReason(f"{died}, but each of its batches is finished or in a live run")
    resumes = int(run.tags.get(RESUMES_TAG, "0"))
    if resumes >= MAX_RESUMES:
        return dg.SkipReason(
            f"{died} after {resumes} resumes, the most this sensor requests; batches left: "
            f"{', '.join(left)}. Run them with `osa materialize {convention.name} "
            f"{' '.join(left)}`"
        )
    tags = {RESUMES_TAG: str(resumes + 1), RESUMED_FROM_TAG: run.run_id}
    # The run key names the failed run and the chunk: a failure evaluated twice requests
    # nothing new.
    requests = [
        partition_range_request(chunk, key_prefix=f"{run.run_id}:", tags=tags)
        for chunk in contiguous_chunks(covered, skip, partitions_per_run())
    ]
    context.log.info(
        f"{died} and will not be retried: requesting {len(left)} of its batches again, in "
        f"{len(requests)} runs"
    )
    return dg.SensorResult(run_requests=requests)


def batch_sensors(
    convention: Convention,
    partitions: dg.DynamicPartitionsDefinition,
    ingest_job: UnresolvedAssetJobDefinition,
) -> dg.Definitions:
    """The sensor that runs newly planned batches and the one that runs again the batches of
    runs that died."""

    @dg.sensor(
        name=f"{convention.name}_new_batches",
        job=ingest_job,
        minimum_interval_seconds=SENSOR_INTERVAL_S,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Requests ingest runs for newly planned batches, up to "
        "OSA_PARTITIONS_PER_RUN adjacent ones per run.",
    )
    def new_batches(context: dg.SensorEvaluationContext) -> dg.SensorResult | dg.SkipReason:
        refusal = hooks_refusal()
        if refusal is not None:
            return dg.SkipReason(refusal)  # the cursor stays: the batches run once hooks can
        keys = partitions.get_partition_keys(dynamic_partitions_store=context.instance)
        # Keys come back in the order they were added, so the cursor is a count; the run
        # key makes a repeated request a no-op should the cursor ever lag.
        seen = int(context.cursor or 0)
        # Batches ingested outside this sensor (the CLI, a backfill) need no run.
        done = context.instance.get_materialized_partitions(features_key(convention))
        requests = [
            partition_range_request(chunk)
            for chunk in contiguous_chunks(keys[seen:], done, partitions_per_run())
        ]
        return dg.SensorResult(run_requests=requests, cursor=str(len(keys)))

    @dg.run_failure_sensor(
        name=f"{convention.name}_unfinished_batches",
        monitored_jobs=[ingest_job],
        request_job=ingest_job,
        minimum_interval_seconds=SENSOR_INTERVAL_S,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="When an ingest run died for reasons outside its work (its worker gone, "
        "say) and Dagster's run retries are used up, requests its unfinished batches again, "
        f"at most {MAX_RESUMES} times over.",
    )
    def unfinished_batches(context: dg.RunFailureSensorContext) -> dg.SensorResult | dg.SkipReason:
        return unfinished_batches_request(context, convention, partitions)

    @dg.sensor(
        name=f"{convention.name}_stale_batches",
        job=ingest_job,
        minimum_interval_seconds=STALE_SENSOR_INTERVAL_S,
        default_status=dg.DefaultSensorStatus.STOPPED,
        description="Off by default: once turned on, re-validates the batches that a changed "
        "hook has not judged (`osa versions`), withdrawing what its new version rejects. Run "
        "`osa materialize <convention> --stale --dry-run` first to see what that would be.",
    )
    def stale_batches(
        context: dg.SensorEvaluationContext, artifact_store: ArtifactStoreResource
    ) -> dg.SensorResult | dg.SkipReason:
        refusal = hooks_refusal()
        if refusal is not None:
            return dg.SkipReason(refusal)
        keys = partitions.get_partition_keys(dynamic_partitions_store=context.instance)
        stale = set(stale_partitions(convention, artifact_store.get(), keys))
        if not stale:
            return dg.SkipReason("every hook's current version has judged every batch")
        # Named with the versions: each batch is requested once per set of hook versions, so
        # a run that fails is not requested over and over.
        versions = ",".join(f"{spec.name}={hook_version(spec)}" for spec in convention.hooks)
        requests = [
            partition_range_request(chunk, key_prefix=f"revalidate:{versions}:")
            for chunk in contiguous_chunks(keys, set(keys) - stale, partitions_per_run())
        ]
        return dg.SensorResult(run_requests=requests)

    return dg.Definitions(sensors=[new_batches, unfinished_batches, stale_batches])
