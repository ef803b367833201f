"""Planning: discover records upstream and freeze them into batches, one manifest each."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import islice

from osa_sdk.contract import files_dir_for
from osa_sdk.types import RecordRef, SkippedSource
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from osa_dagster.batch import BatchInputError
from osa_dagster.batch.plan_index import (
    COMMIT_EVERY_ROWS,
    COMMIT_EVERY_S,
    LOOKUP_CHUNK,
    PlanIndex,
    Register,
    SeenIds,
    chunked,
    source_key,
    version_key,
)
from osa_dagster.batch.stores import UnreadableState, parse_stored
from osa_dagster.batch.upstream import ChangeReport, UpstreamChanges
from osa_dagster.conventions.base import Convention
from osa_dagster.records import RecordsDatabase
from osa_dagster.storage.layout import BatchLayout, Manifest, SourceChoice, manifests_prefix
from osa_dagster.storage.store import ArtifactStore

_KEY_PART = 24


@dataclass
class PlanResult:
    partitions: list[str]
    """Every partition of this plan, in order, new or planned before."""
    new_partitions: list[str]
    records: int
    records_per_batch: dict[str, int] = field(default_factory=dict)
    """How many records each partition of this plan holds."""
    duplicate_refs: int = 0
    already_planned: int = 0
    """Records left out because a batch planned before holds them at the same version."""
    skipped: list[SkippedSource] = field(default_factory=list)
    """Parts of the source that discover left out, with the reason (see Ingester.skip)."""
    manifests_indexed: int = 0
    """Manifests the plan index had not read (a plan killed before it indexed them, another
    plan at once, an index built again): their partitions were registered again."""
    changes: ChangeReport | None = None
    """What the listing adds, revises, withdraws and reinstates (a dry run: would)."""
    gone_check: str = ""
    """Whether records gone upstream were looked for, and if not why not."""


def partition_key(refs: Sequence[RecordRef]) -> str:
    """Deterministic key of a batch: readable ends plus a digest of the whole membership,
    versions included, so that a batch of revised records is a new partition."""
    members = (f"{r.source_id}@{r.version}" if r.version else r.source_id for r in refs)
    digest = hashlib.sha256("\n".join(members).encode()).hexdigest()
    first = files_dir_for(refs[0].source_id)[:_KEY_PART]
    last = files_dir_for(refs[-1].source_id)[:_KEY_PART]
    return f"{first}-{last}-{digest[:10]}"


def _nowhere(partitions: Sequence[str]) -> None:
    """Registers nothing: planning without an orchestrator (tests, benchmarks, notebooks)."""


def plan_ingest(
    convention: Convention,
    store: ArtifactStore,
    *,
    since: datetime | None = None,
    limit: int | None = None,
    batch_size: int | None = None,
    replan: bool = False,
    register: Register = _nowhere,
    db: RecordsDatabase | None = None,
    dry_run: bool = False,
) -> PlanResult:
    """Discover records and freeze them into batches, one manifest per batch.

    `limit` counts the records discovered, exactly. Records that a batch planned before
    holds at the same version are left out, unless `replan`: planning the same thing twice
    adds nothing, whatever the batch size. With `replan` every record discovered is
    batched again; a batch of the same membership keeps its manifest (and partition).
    `register` is given the partitions as they are frozen (see `plan_refs`).

    With the records database `db`, the plan also withdraws the published records that
    upstream marks obsolete, reinstates those withdrawn as gone upstream that it lists
    again and, when it lists the whole source (no `since`, no `limit`, nothing skipped),
    withdraws those planned from this source that it no longer lists (see
    osa_dagster/batch/upstream.py). `dry_run` changes nothing and reports what would be.
    """
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be a positive number of records, not {limit}")
    size = convention.batch_size if batch_size is None else batch_size
    if size <= 0:
        raise ValueError(f"batch_size must be a positive number of records, not {size}")

    ingester = convention.make_ingester()
    discovered = ingester.discover(since, limit)

    def incomplete() -> str | None:
        if since is not None:
            return f"a plan of the records changed since {since.isoformat()} lists only those"
        if limit is not None:
            return f"a plan of at most {limit} records may not list them all"
        if ingester.skipped:
            return (
                f"discover skipped {len(ingester.skipped)} parts of the source, whose records "
                "it cannot name"
            )
        return None

    # islice bounds the walk even if an ingester yields more than it was asked for.
    result = plan_refs(
        convention,
        store,
        islice(discovered, limit) if limit else discovered,
        since=since,
        batch_size=size,
        replan=replan,
        register=register,
        db=db,
        dry_run=dry_run,
        incomplete=incomplete,
    )
    result.skipped = ingester.skipped
    return result


def _partial_listing() -> str | None:
    return "the records given are not a listing of the whole source"


def plan_refs(
    convention: Convention,
    store: ArtifactStore,
    discovered: Iterable[RecordRef],
    *,
    since: datetime | None = None,
    batch_size: int | None = None,
    replan: bool = False,
    register: Register = _nowhere,
    db: RecordsDatabase | None = None,
    dry_run: bool = False,
    incomplete: Callable[[], str | None] = _partial_listing,
) -> PlanResult:
    """Freeze `discovered` (repeats of a source id dropped, refs marked obsolete set aside,
    and records already planned at the same version unless `replan`) into batches of
    `batch_size`.

    `discovered` is consumed as a stream: each batch's manifest is written once it is full,
    and what the plan remembers per record (the ids it saw, the versions planned before)
    lives in the plan index on disk, so memory does not grow with the records. `register`
    is given the partitions of the frozen batches in bulk (COMMIT_EVERY_ROWS records' worth,
    or what COMMIT_EVERY_S saw frozen, the rest at the end), and those of the manifests the
    index had not read; it must register them with the orchestrator (re-registering a known
    one must be harmless).

    With `db`, the published records change as upstream did (see `plan_ingest`); records
    gone upstream are looked for when the listing ends, if `incomplete` then says nothing
    against it. A `dry_run` works on a private copy of the plan index and writes nothing:
    no manifest, no partition, no change of the records database; its result says what the
    plan would have done.
    """
    size = convention.batch_size if batch_size is None else batch_size
    result = PlanResult(partitions=[], new_partitions=[], records=0)
    source = SourceChoice(name=convention.source, location=convention.location)
    scope = f"planning the records changed since {since.isoformat()}" if since else "planning"
    changes = UpstreamChanges(convention.name, source, db, scope=scope, dry_run=dry_run)
    open_index = PlanIndex.copy_of if dry_run else PlanIndex.of
    with open_index(store, convention.name) as index, SeenIds() as seen:
        result.manifests_indexed = index.catch_up(
            store, convention.name, _nowhere if dry_run else register
        )
        freezer = _Freezer(convention, store, index, result, since, register)
        # As planned when the plan starts (what it freezes itself, `seen` leaves out): the
        # first plan of a convention looks nothing up.
        look_up = index.holds_records()
        batch: list[RecordRef] = []
        for chunk in chunked(discovered, LOOKUP_CHUNK):
            fresh = seen.first_sightings(chunk)
            result.duplicate_refs += len(chunk) - len(fresh)
            listed = [r for r in fresh if r.obsolete is None]
            changes.obsolete([r for r in fresh if r.obsolete is not None])
            planned = index.planned_versions(listed) if look_up else {}
            unplanned = [
                r for r in listed if version_key(r.version) not in planned.get(r.source_id, ())
            ]
            changes.listed(listed, unplanned, planned)
            if not replan:
                result.already_planned += len(listed) - len(unplanned)
            if dry_run:
                continue
            for ref in listed if replan else unplanned:
                batch.append(ref)
                if len(batch) == size:
                    freezer.freeze(batch)
                    batch = []
        if batch:
            freezer.freeze(batch)
        freezer.flush()
        why_not = incomplete()
        if why_not is None:
            changes.gone(index.gone(seen, source_key(source)))
            result.gone_check = f"records gone from {changes.source_label} were looked for"
        else:
            result.gone_check = f"records gone upstream were not looked for: {why_not}"
    result.changes = changes.report
    return result


class _Freezer:
    """Writes each full batch's manifest, and registers then indexes them in bulk."""

    def __init__(
        self,
        convention: Convention,
        store: ArtifactStore,
        index: PlanIndex,
        result: PlanResult,
        since: datetime | None,
        register: Register,
    ) -> None:
        self.convention = convention
        self.store = store
        self.index = index
        self.result = result
        self.since = since
        self.register = register
        self.source = SourceChoice(name=convention.source, location=convention.location)
        self.source_key = source_key(self.source)
        self.unregistered: list[str] = []
        self.last_flush = time.monotonic()

    def freeze(self, batch: list[RecordRef]) -> None:
        key = partition_key(batch)
        layout = BatchLayout(self.convention.name, key)
        # An unreadable manifest of the same membership is written anew: same records,
        # same partition.
        size_bytes = _readable_size(self.store, layout)
        if size_bytes is None:
            manifest = Manifest(
                convention=self.convention.name,
                partition=key,
                refs=batch,
                since=self.since,
                source=self.source,
            )
            data = manifest.model_dump_json(indent=1).encode()
            self.store.write_bytes(layout.manifest, data)
            size_bytes = len(data)
            self.result.new_partitions.append(key)
        self.result.partitions.append(key)
        self.result.records_per_batch[key] = len(batch)
        self.result.records += len(batch)
        self.index.add(key, batch, size_bytes, self.source_key)
        self.unregistered.append(key)
        if (
            self.index.pending_rows >= COMMIT_EVERY_ROWS
            or time.monotonic() - self.last_flush >= COMMIT_EVERY_S
        ):
            self.flush()

    def flush(self) -> None:
        """Registered first, indexed second: a plan killed in between leaves manifests that
        the next plan's catch-up indexes and registers."""
        self.index.register_and_commit(self.unregistered, self.register)
        self.unregistered = []
        self.last_flush = time.monotonic()


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
    register: Register = _nowhere,
    db: RecordsDatabase | None = None,
) -> tuple[PlanResult, WatchCursor]:
    """Plan what changed upstream since the last look, each change exactly once.

    The first look only starts the watch: what exists already is an initial ingest's job
    (the plan job), not a watcher's. Later looks discover from `overlap` before the last
    look, since upstream clocks and days are coarse (a mirror keeps upstream's mtimes, an
    API filters by day), and drop the records the last look found with the same version:
    a record is planned again only when its version changes. `overlap` must exceed how late
    a change can become visible (a mirror's sync lag, a service's indexing delay). With `db`,
    what upstream marks obsolete is withdrawn and what it lists again reinstated; a watch
    never sees a record gone (see osa_dagster/batch/upstream.py).
    """
    if cursor is None:
        return PlanResult(partitions=[], new_partitions=[], records=0), WatchCursor(looked_at=now)
    ingester = convention.make_ingester()
    found = list(ingester.discover(cursor.looked_at - overlap, None))
    changed = [
        ref
        for ref in found
        if ref.source_id not in cursor.recent or cursor.recent[ref.source_id] != ref.version
    ]
    result = plan_refs(
        convention,
        store,
        changed,
        since=cursor.looked_at - overlap,
        batch_size=batch_size,
        register=register,
        db=db,
    )
    result.skipped = ingester.skipped
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
    where = f"batch {layout.partition!r} of convention {layout.convention!r}"
    if not store.exists(layout.manifest):
        raise BatchInputError(
            f"{where} has no manifest at {store.describe(layout.manifest)}: plan an ingest "
            "that creates it first"
        )
    try:
        return parse_stored(Manifest, store, layout.manifest)
    except UnreadableState as error:
        raise BatchInputError(
            f"{where}: the manifest at {error.where} cannot be read ({error.cause}); plan its "
            f"records again with `osa plan {layout.convention} --replan` and the batch size "
            "it was planned with, which writes it anew under the same partition"
        ) from None


def _readable_size(store: ArtifactStore, layout: BatchLayout) -> int | None:
    """The size of the batch's manifest, or None if there is none that can be read."""
    try:
        data = store.read_bytes(layout.manifest)
    except FileNotFoundError:
        return None
    try:
        Manifest.model_validate_json(data)
    except ValidationError:
        return None
    return len(data)
