"""The jobs of a convention: the plan job, which freezes batches into partitions, and the
ingest job, which runs a batch's assets (one partition, or a range of adjacent ones)."""

import sys
from collections.abc import Sequence
from datetime import datetime

import dagster as dg
from osa_sdk.types import SkippedSource
from pydantic import Field, field_validator

from osa_dagster.batch.plan import plan_ingest
from osa_dagster.conventions.base import Convention
from osa_dagster.defs.assets import batch_partitions_name, features_key
from osa_dagster.defs.dagster_private import UnresolvedAssetJobDefinition, retry_all_steps_tags
from osa_dagster.defs.executors import ingest_executor
from osa_dagster.defs.resources import ArtifactStoreResource, RecordsDatabaseResource
from osa_dagster.defs.run_worker import recording_worker
from osa_dagster.settings import Settings

SKIPPED_METADATA = "skipped_files"
PLANNED_BATCHES_METADATA = "planned_batches"
CHANGES_METADATA = "upstream_changes"
# Every run of a convention's batches carries it: the ingest job's, `osa backfill`'s.
CONVENTION_TAG = "osa/convention"


class PlanConfig(dg.Config):
    """What to ingest: records changed since a date (ISO 8601), at most `limit` of them.

    Validated here, so a bad value fails the same way in the launchpad and in `osa plan`
    (which builds this before it launches anything).
    """

    limit: int | None = Field(default=None, description="Exact number of records; all if unset.")
    since: str | None = Field(default=None, description="ISO date or datetime, e.g. 2024-01-31.")
    batch_size: int | None = Field(default=None, description="Records per batch (partition).")
    replan: bool = Field(
        default=False,
        description="Batch again records already planned at the same version (left out otherwise).",
    )
    source: str | None = Field(
        default=None,
        description="Where to read, for this plan only: a source's name, a folder or file, a "
        "URL, or NAME:LOCATION (as in OSA_SOURCES). The batches keep reading there.",
    )
    dry_run: bool = Field(
        default=False,
        description="Say what this plan would add, revise, withdraw and reinstate, and change "
        "nothing: no batch, no partition, no published record.",
    )

    @field_validator("limit", "batch_size")
    @classmethod
    def _a_countable_number(cls, value: int | None) -> int | None:
        if value is None:
            return None
        if value <= 0:
            raise ValueError(f"must be a positive number of records, not {value}")
        # Larger than any list can hold here: the discovery would fail after minutes.
        if value > sys.maxsize:
            raise ValueError(
                f"{value} is more records than this machine can count (at most {sys.maxsize})"
            )
        return value

    @field_validator("since")
    @classmethod
    def _an_iso_date(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                datetime.fromisoformat(value)
            except ValueError:
                raise ValueError(
                    f"{value!r} is not an ISO date or datetime (e.g. 2024-01-31)"
                ) from None
        return value


def skipped_table(skipped: Sequence[SkippedSource]) -> dg.TableMetadataValue:
    """What discover left out, as a table the UI shows and `osa plan` prints."""
    return dg.MetadataValue.table(
        records=[dg.TableRecord({"file": s.where, "reason": s.reason}) for s in skipped],
        schema=dg.TableSchema(
            columns=[dg.TableColumn("file", "string"), dg.TableColumn("reason", "string")]
        ),
    )


def plan_job_name(convention: Convention) -> str:
    return f"{convention.name}_plan"


def ingest_job_name(convention: Convention) -> str:
    return f"{convention.name}_ingest"


def plan_job(convention: Convention) -> dg.JobDefinition:
    """Discovers the convention's records and adds a partition per batch it froze."""

    @dg.op(name=f"{convention.name}_plan_batches")
    def plan_batches(
        context: dg.OpExecutionContext,
        config: PlanConfig,
        artifact_store: ArtifactStoreResource,
        records_db: RecordsDatabaseResource,
    ) -> None:
        since = datetime.fromisoformat(config.since) if config.since else None
        try:
            source = convention.choose_source(config.source) if config.source else convention
        except ValueError as error:
            raise dg.Failure(description=f"source: {error}", allow_retries=False) from None
        partitions_name = batch_partitions_name(convention)

        def register(partitions: Sequence[str]) -> None:
            # In bulk, as batches freeze: a plan of a whole database registers what it froze
            # before it is killed. Re-adding known keys is harmless: the instance ignores them.
            context.instance.add_dynamic_partitions(partitions_name, partitions)

        result = plan_ingest(
            source,
            artifact_store.get(),
            since=since,
            limit=config.limit,
            batch_size=config.batch_size,
            replan=config.replan,
            register=register,
            db=records_db.to_look_at() if config.dry_run else records_db.get(),
            dry_run=config.dry_run,
        )
        changes = result.changes
        assert changes is not None
        context.log.info(result.gone_check)
        if config.dry_run:
            context.log.info(changes.format())
        else:
            context.log.info(
                "upstream changes: "
                + ", ".join(f"{kind} {change.count}" for kind, change in changes.changes.items())
            )
        context.log.info(
            f"planned {result.records} records in {len(result.partitions)} batches, "
            f"{len(result.new_partitions)} of them new; {result.already_planned} records "
            "left out, planned before at the same version"
        )
        if result.manifests_indexed:
            context.log.info(
                f"registered again {result.manifests_indexed} batches whose manifests the plan "
                "index had not read (a plan stopped midway, another plan, an index rebuilt)"
            )
        for skipped in result.skipped:
            context.log.warning(f"skipped {skipped.where}: {skipped.reason}")
        context.add_output_metadata(
            {
                "source": source.location or source.source,
                "records": result.records,
                "batches": len(result.partitions),
                "new_batches": len(result.new_partitions),
                "duplicate_refs_dropped": result.duplicate_refs,
                "already_planned": result.already_planned,
                "manifests_indexed": result.manifests_indexed,
                # Which batches, in planning order, and which of them are new: `osa plan`
                # prints them from here, and the run's page shows them.
                PLANNED_BATCHES_METADATA: dg.MetadataValue.json(
                    {
                        "batches": result.partitions,
                        "new": result.new_partitions,
                        "records": result.records_per_batch,
                    }
                ),
                "skipped": len(result.skipped),
                SKIPPED_METADATA: skipped_table(result.skipped),
                "dry_run": config.dry_run,
                "gone_check": result.gone_check,
                # Counts and examples; a real plan's are what it did, a dry run's what it would.
                CHANGES_METADATA: dg.MetadataValue.json(
                    {**changes.as_json(), "dry_run": config.dry_run}
                ),
            }
        )

    @dg.job(
        name=plan_job_name(convention),
        description=f"Discover {convention.name} records and freeze them into batches.",
        executor_def=recording_worker(dg.in_process_executor),
    )
    def job() -> None:
        plan_batches()

    return job


def ingest_job(convention: Convention, settings: Settings) -> UnresolvedAssetJobDefinition:
    """Every asset of one batch, up to its features, over a partition or a range of them."""
    return dg.define_asset_job(
        name=ingest_job_name(convention),
        selection=dg.AssetSelection.assets(features_key(convention)).upstream(),
        executor_def=ingest_executor(settings),
        description=f"Fetch, check, publish and store features of one {convention.name} batch.",
        # The production profile limits concurrent runs per convention on this tag. A retry
        # (of a run whose worker died) runs every step again: finished ones cost a re-fetch
        # and a look at complete checkpoints, and every check gets its verdict.
        tags={CONVENTION_TAG: convention.name, **retry_all_steps_tags()},
    )
