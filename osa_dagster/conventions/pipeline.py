"""The steps a batch goes through, without an orchestrator.

plan -> fetch_raw_batch -> run_batch_hook (each hook) -> publish_batch -> store_batch_features.
The Dagster assets call these one to one; a notebook or a deposition service can too.
Each step reads what the previous one left in the artifact store, so any step can be
re-run alone for one partition.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import islice

from osa_sdk.contract import INGEST_REPORT_FILE, files_dir_for
from osa_sdk.runtime import IngestReport, run_ingest
from osa_sdk.types import FailedRef, HookRecord, IngesterRecord, OutcomeStatus, RecordRef
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from osa_dagster.conventions.base import Convention
from osa_dagster.engine import Checkpoint, HookBatch, HookProgress, Runner, advance_hook
from osa_dagster.engine.memory_history import MemoryHistory
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
from osa_dagster.records.models import Record
from osa_dagster.records.queries import (
    publication_counts,
    published_in_partition,
    srns_with_features,
)
from osa_dagster.storage.checkpoints import StoreCheckpointIO, StoreMemoryHistoryIO
from osa_dagster.storage.layout import (
    BatchLayout,
    Manifest,
    manifests_prefix,
    memory_history_key,
)
from osa_dagster.storage.store import ArtifactStore

_KEY_PART = 24


class BatchInputError(ValueError):
    """Input of a batch that cannot be used; the message names the batch and the place."""


# --- planning ---------------------------------------------------------------------


@dataclass
class PlanResult:
    partitions: list[str]
    """Every partition of this plan, in order, new or planned before."""
    new_partitions: list[str]
    records: int
    duplicate_refs: int = 0


def partition_key(refs: Sequence[RecordRef]) -> str:
    """Deterministic key of a batch: readable ends plus a digest of the whole membership,
    versions included, so that a batch of revised records is a new partition."""
    members = (f"{r.source_id}@{r.version}" if r.version else r.source_id for r in refs)
    digest = hashlib.sha256("\n".join(members).encode()).hexdigest()
    first = files_dir_for(refs[0].source_id)[:_KEY_PART]
    last = files_dir_for(refs[-1].source_id)[:_KEY_PART]
    return f"{first}-{last}-{digest[:10]}"


def plan_ingest(
    convention: Convention,
    store: ArtifactStore,
    *,
    since: datetime | None = None,
    limit: int | None = None,
    batch_size: int | None = None,
) -> PlanResult:
    """Discover records and freeze them into batches, one manifest per batch.

    `limit` counts records, exactly. A batch planned before keeps its manifest (and so
    its partition): planning the same thing twice adds nothing.
    """
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be a positive number of records, not {limit}")
    size = convention.batch_size if batch_size is None else batch_size
    if size <= 0:
        raise ValueError(f"batch_size must be a positive number of records, not {size}")

    discovered = convention.make_ingester().discover(since, limit)
    # islice bounds the walk even if an ingester yields more than it was asked for.
    return plan_refs(
        convention,
        store,
        islice(discovered, limit) if limit else discovered,
        since=since,
        batch_size=size,
    )


def plan_refs(
    convention: Convention,
    store: ArtifactStore,
    discovered: Iterable[RecordRef],
    *,
    since: datetime | None = None,
    batch_size: int | None = None,
) -> PlanResult:
    """Freeze `discovered` (repeats of a source id dropped) into batches of `batch_size`."""
    size = convention.batch_size if batch_size is None else batch_size
    refs: list[RecordRef] = []
    seen: set[str] = set()
    duplicates = 0
    for ref in discovered:
        if ref.source_id in seen:
            duplicates += 1
            continue
        seen.add(ref.source_id)
        refs.append(ref)

    result = PlanResult(
        partitions=[], new_partitions=[], records=len(refs), duplicate_refs=duplicates
    )
    for start in range(0, len(refs), size):
        batch = refs[start : start + size]
        key = partition_key(batch)
        layout = BatchLayout(convention.name, key)
        result.partitions.append(key)
        if not store.exists(layout.manifest):
            manifest = Manifest(convention=convention.name, partition=key, refs=batch, since=since)
            store.write_bytes(layout.manifest, manifest.model_dump_json(indent=1).encode())
            result.new_partitions.append(key)
    return result


class WatchCursor(BaseModel):
    """Where a watch of the upstream stopped: the start of its last look, and the records
    (id and version) it found in the overlap window, which the next look sees again."""

    model_config = ConfigDict(frozen=True)

    looked_at: datetime
    recent: dict[str, str | None] = Field(default_factory=dict)


def watch_upstream(
    convention: Convention,
    store: ArtifactStore,
    cursor: WatchCursor | None,
    *,
    now: datetime,
    overlap: timedelta,
    batch_size: int | None = None,
) -> tuple[PlanResult, WatchCursor]:
    """Plan what changed upstream since the last look, each change exactly once.

    The first look only starts the watch: what exists already is an initial ingest's job
    (the plan job), not a watcher's. Later looks discover from `overlap` before the last
    look, since upstream clocks and days are coarse (a mirror keeps upstream's mtimes, an
    API filters by day), and drop the records the last look found with the same version:
    a record is planned again only when its version changes. `overlap` must exceed how late
    a change can become visible (a mirror's sync lag, a service's indexing delay).
    """
    if cursor is None:
        return PlanResult(partitions=[], new_partitions=[], records=0), WatchCursor(looked_at=now)
    found = list(convention.make_ingester().discover(cursor.looked_at - overlap, None))
    changed = [
        ref
        for ref in found
        if ref.source_id not in cursor.recent or cursor.recent[ref.source_id] != ref.version
    ]
    result = plan_refs(
        convention, store, changed, since=cursor.looked_at - overlap, batch_size=batch_size
    )
    return result, WatchCursor(looked_at=now, recent={r.source_id: r.version for r in found})


def planned_partitions(store: ArtifactStore, convention: str) -> list[str]:
    """Partitions that have a manifest in the store (e.g. to re-register them in Dagster)."""
    prefix = manifests_prefix(convention)
    return [
        key.removeprefix(prefix + "/").removesuffix(".json")
        for key in store.list_keys(prefix)
        if key.endswith(".json")
    ]


def load_manifest(store: ArtifactStore, layout: BatchLayout) -> Manifest:
    if not store.exists(layout.manifest):
        raise BatchInputError(
            f"batch {layout.partition!r} of convention {layout.convention!r} has no manifest "
            f"at {store.describe(layout.manifest)}: plan an ingest that creates it first"
        )
    return Manifest.model_validate_json(store.read_bytes(layout.manifest))


# --- raw batch --------------------------------------------------------------------

# The longest source id the records database holds (records.source_id).
MAX_SOURCE_ID_CHARS = Record.__table__.c.source_id.type.length


def source_id_error(source_id: str) -> str | None:
    """Why a record with this id cannot be published, or None if it can. The same rule for
    every database: PostgreSQL text holds no NUL, and the column has a length."""
    if "\x00" in source_id:
        return "contains NUL, which a records database cannot hold"
    if len(source_id) > MAX_SOURCE_ID_CHARS:
        return f"is {len(source_id)} characters long, over the {MAX_SOURCE_ID_CHARS} allowed"
    return None


@dataclass
class RawBatchSummary:
    records: list[IngesterRecord]
    report: IngestReport


def read_raw_records(
    store: ArtifactStore, layout: BatchLayout, convention: Convention | None = None
) -> list[IngesterRecord]:
    """Parse the batch's records.jsonl; any bad line fails with the batch and line named."""
    where = f"batch {layout.partition!r} of convention {layout.convention!r}"
    if not store.exists(layout.raw_records):
        raise BatchInputError(f"{where}: no records.jsonl at {store.describe(layout.raw_records)}")
    records: list[IngesterRecord] = []
    first_line: dict[str, int] = {}
    # Split as bytes and let each line be decoded by its parse: a byte that is not UTF-8 is
    # then a bad line named like any other, and no decoded copy of the whole file is made.
    data = store.read_bytes(layout.raw_records)
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            record = IngesterRecord.model_validate_json(line)
            if convention is not None and convention.record_schema is not None:
                convention.record_schema.model_validate(record.metadata)
        except ValidationError as error:
            problem = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'line'}: {e['msg']}" for e in error.errors()
            )
            raise BatchInputError(f"{where}: records.jsonl line {number}: {problem}") from error
        if record.source_id in first_line:
            raise BatchInputError(
                f"{where}: records.jsonl line {number}: duplicate id {record.source_id!r} "
                f"(first on line {first_line[record.source_id]})"
            )
        first_line[record.source_id] = number
        records.append(record)
    return records


def fetch_raw_batch(
    convention: Convention, store: ArtifactStore, partition: str
) -> RawBatchSummary:
    """Run the ingester's fetch for the batch's manifest: records.jsonl plus files."""
    layout = BatchLayout(convention.name, partition)
    manifest = load_manifest(store, layout)
    # A re-fetch starts clean: files of a previous fetch must not leak into this one.
    store.delete_prefix(layout.raw)
    refs = [ref for ref in manifest.refs if source_id_error(ref.source_id) is None]
    with store.local_dir(layout.raw, writable=True) as out_dir:
        report = run_ingest(convention.make_ingester(), refs, out_dir)
        if len(refs) < len(manifest.refs):
            report.failed += [
                FailedRef(source_id=ref.source_id, error=f"not fetched: the source id {problem}")
                for ref in manifest.refs
                if (problem := source_id_error(ref.source_id)) is not None
            ]
            (out_dir / INGEST_REPORT_FILE).write_text(report.model_dump_json(indent=2) + "\n")
    records = read_raw_records(store, layout, convention)
    return RawBatchSummary(records=records, report=report)


def read_ingest_report(store: ArtifactStore, layout: BatchLayout) -> IngestReport:
    return IngestReport.model_validate_json(store.read_bytes(layout.ingest_report))


# --- hooks ------------------------------------------------------------------------


def run_batch_hook(
    convention: Convention,
    hook_name: str,
    store: ArtifactStore,
    partition: str,
    runner: Runner,
    *,
    stop_after_oom: bool = True,
    checkpoint_every_s: float = 1.0,
    checkpoint_every_records: int = 1,
    predict_memory: bool = True,
) -> HookProgress:
    """Advance one hook over the batch, resuming from its checkpoint in the store.

    The checkpoint is saved to the store while the hook runs, after `checkpoint_every_records`
    new outcomes or `checkpoint_every_s` seconds (see osa_dagster.engine.hook_run). With
    `predict_memory`, the hook's memory history in the store (`memory_history_key`) starts
    a new batch's large records at the memory their size needed before, and learns from
    this batch's attempts; without it, the ladder starts every record at the base.
    """
    spec = convention.hook(hook_name)
    layout = BatchLayout(convention.name, partition)
    records = [HookRecord.from_ingested(r) for r in read_raw_records(store, layout, convention)]
    checkpoints = StoreCheckpointIO(store, layout.checkpoint(hook_name))
    with (
        store.local_dir(layout.raw_files, writable=False) as files_root,
        store.local_dir(layout.hook_workdir(hook_name), writable=True) as workdir,
    ):
        return advance_hook(
            spec,
            HookBatch(records=records, files_root=files_root),
            runner,
            checkpoints,
            workdir,
            checkpoint_every_s=checkpoint_every_s,
            checkpoint_every_records=checkpoint_every_records,
            stop_after_oom=stop_after_oom,
            history=StoreMemoryHistoryIO(store, memory_history_key(convention.name, hook_name))
            if predict_memory
            else None,
        )


def load_hook_checkpoints(
    convention: Convention, store: ArtifactStore, partition: str
) -> dict[str, Checkpoint]:
    """Every hook's finished checkpoint; a hook that has not finished the batch is an error."""
    layout = BatchLayout(convention.name, partition)
    checkpoints: dict[str, Checkpoint] = {}
    for spec in convention.hooks:
        checkpoint = StoreCheckpointIO(store, layout.checkpoint(spec.name)).load()
        if checkpoint is None or not checkpoint.complete:
            raise BatchInputError(
                f"batch {partition!r} of convention {convention.name!r}: hook {spec.name!r} "
                "has not finished it; materialise its hook_outcomes first"
            )
        checkpoints[spec.name] = checkpoint
    return checkpoints


# --- publishing -------------------------------------------------------------------


@dataclass
class PublishSummary:
    records_in: int
    passed_all: list[str]
    result: PublishResult
    not_published: Counter[str] = field(default_factory=Counter)
    """Why records were not published: 'rejected by <hook>' / 'errored in <hook>'."""
    rejections: list[tuple[str, str, str]] = field(default_factory=list)
    """(record id, hook, reason) of every record not published."""
    dead_letters: list[PoisonRecord] = field(default_factory=list)
    """The batch's poison records, as written to the dead_letters table."""


@dataclass
class BatchVerdicts:
    passed: list[IngesterRecord]
    failed: list[tuple[str, str, str]]
    """(record id, first hook that did not pass it, "<status>: <reason>")."""
    checkpoints: dict[str, Checkpoint]


def batch_verdicts(convention: Convention, store: ArtifactStore, partition: str) -> BatchVerdicts:
    """Which records of the batch passed every hook, and why the others did not."""
    records = read_raw_records(store, BatchLayout(convention.name, partition), convention)
    checkpoints = load_hook_checkpoints(convention, store, partition)
    passed: list[IngesterRecord] = []
    failed: list[tuple[str, str, str]] = []
    for record in records:
        verdict = None
        for hook_name, checkpoint in checkpoints.items():
            outcome = checkpoint.outcomes.get(record.source_id)
            if outcome is None:
                verdict = (record.source_id, hook_name, "errored: no outcome")
            elif outcome.status is not OutcomeStatus.PASSED:
                verdict = (record.source_id, hook_name, f"{outcome.status}: {outcome.reason}")
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
    """Publish the records that passed every hook: one bulk, idempotent insert."""
    verdicts = batch_verdicts(convention, store, partition)
    passed, failed = verdicts.passed, verdicts.failed
    result = publish_records(
        db,
        convention=convention.name,
        domain=domain,
        partition=partition,
        records=[RecordToPublish(r.source_id, r.metadata) for r in passed],
    )
    poison = poison_records(verdicts.checkpoints)
    replace_dead_letters(db, convention=convention.name, partition=partition, poison=poison)
    reasons = Counter(f"{verdict.split(':')[0]} in {hook}" for _, hook, verdict in failed)
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


# --- invariants -------------------------------------------------------------------


@dataclass
class BatchAudit:
    """What must hold for a materialised batch; each list names the records that break it."""

    passed_not_published_once: list[str]
    published_but_failed: list[str]
    missing_features: dict[str, list[str]]
    """hook -> published records lacking that hook's feature rows (hooks that always emit)."""
    counts: dict[str, int]

    @property
    def counts_add_up(self) -> bool:
        """in = passed + rejected + errored + skipped, and the ingester's own count agrees."""
        c = self.counts
        settled = c["passed"] + c["rejected"] + c["errored"]
        return c["planned"] == settled + c["skipped"] and c["fetched"] == settled


def audit_batch(
    convention: Convention, store: ArtifactStore, db: RecordsDatabase, partition: str
) -> BatchAudit:
    """Check a batch's records against the archive: the invariants behind the asset checks."""
    layout = BatchLayout(convention.name, partition)
    verdicts = batch_verdicts(convention, store, partition)
    passed_ids = [r.source_id for r in verdicts.passed]
    counts_in_archive = publication_counts(db, convention.name, passed_ids)
    published_here = published_in_partition(db, convention.name, partition)
    failed_ids = {record_id for record_id, _, _ in verdicts.failed}
    passed_srns = find_srns(db, convention.name, passed_ids)
    missing: dict[str, list[str]] = {}
    for spec in convention.hooks:
        if spec.emits_features:
            with_rows = srns_with_features(db, spec.name, list(passed_srns.values()))
            lacking = sorted(i for i, srn in passed_srns.items() if srn not in with_rows)
            if lacking:
                missing[spec.name] = lacking
    report = read_ingest_report(store, layout)
    statuses = Counter(verdict.split(":")[0] for _, _, verdict in verdicts.failed)
    return BatchAudit(
        passed_not_published_once=sorted(i for i in passed_ids if counts_in_archive.get(i) != 1),
        published_but_failed=sorted(failed_ids & published_here.keys()),
        missing_features=missing,
        counts={
            "planned": len(load_manifest(store, layout).refs),
            "fetched": report.records,
            "passed": len(verdicts.passed),
            "rejected": statuses[OutcomeStatus.REJECTED.value],
            "errored": statuses[OutcomeStatus.ERRORED.value],
            "skipped": len(report.skipped_oversize) + len(report.failed) + len(report.missing),
        },
    )


def load_memory_history(
    convention: Convention, store: ArtifactStore, hook_name: str
) -> MemoryHistory | None:
    """The memory-vs-size history that predicts where a hook's large records start."""
    return StoreMemoryHistoryIO(store, memory_history_key(convention.name, hook_name)).load()
