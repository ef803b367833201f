"""Planning: discover records upstream and freeze them into batches, one manifest each."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import islice

from osa_sdk.contract import files_dir_for
from osa_sdk.types import RecordRef, SkippedSource
from pydantic import BaseModel, ConfigDict, Field

from osa_dagster.batch import BatchInputError
from osa_dagster.batch.stores import UnreadableState, parse_stored
from osa_dagster.conventions.base import Convention
from osa_dagster.storage.layout import BatchLayout, Manifest, SourceChoice, manifests_prefix
from osa_dagster.storage.store import ArtifactStore

_KEY_PART = 24
log = logging.getLogger(__name__)


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
    replan: bool = False,
) -> PlanResult:
    """Discover records and freeze them into batches, one manifest per batch.

    `limit` counts the records discovered, exactly. Records that a batch planned before
    holds at the same version are left out, unless `replan`: planning the same thing twice
    adds nothing, whatever the batch size. With `replan` every record discovered is
    batched again; a batch of the same membership keeps its manifest (and partition).
    """
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be a positive number of records, not {limit}")
    size = convention.batch_size if batch_size is None else batch_size
    if size <= 0:
        raise ValueError(f"batch_size must be a positive number of records, not {size}")

    ingester = convention.make_ingester()
    discovered = ingester.discover(since, limit)
    # islice bounds the walk even if an ingester yields more than it was asked for.
    result = plan_refs(
        convention,
        store,
        islice(discovered, limit) if limit else discovered,
        since=since,
        batch_size=size,
        replan=replan,
    )
    result.skipped = ingester.skipped
    return result


def plan_refs(
    convention: Convention,
    store: ArtifactStore,
    discovered: Iterable[RecordRef],
    *,
    since: datetime | None = None,
    batch_size: int | None = None,
    replan: bool = False,
) -> PlanResult:
    """Freeze `discovered` (repeats of a source id dropped, and records already planned at
    the same version unless `replan`) into batches of `batch_size`."""
    size = convention.batch_size if batch_size is None else batch_size
    planned = {} if replan else planned_versions(store, convention.name)
    refs: list[RecordRef] = []
    seen: set[str] = set()
    duplicates = already_planned = 0
    for ref in discovered:
        if ref.source_id in seen:
            duplicates += 1
            continue
        seen.add(ref.source_id)
        if ref.version in planned.get(ref.source_id, ()):
            already_planned += 1
            continue
        refs.append(ref)

    result = PlanResult(
        partitions=[],
        new_partitions=[],
        records=len(refs),
        duplicate_refs=duplicates,
        already_planned=already_planned,
    )
    for start in range(0, len(refs), size):
        batch = refs[start : start + size]
        key = partition_key(batch)
        layout = BatchLayout(convention.name, key)
        result.partitions.append(key)
        result.records_per_batch[key] = len(batch)
        # An unreadable manifest of the same membership is written anew: same records,
        # same partition.
        if not store.exists(layout.manifest) or _unreadable(store, layout):
            manifest = Manifest(
                convention=convention.name,
                partition=key,
                refs=batch,
                since=since,
                source=SourceChoice(name=convention.source, location=convention.location),
            )
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
    ingester = convention.make_ingester()
    found = list(ingester.discover(cursor.looked_at - overlap, None))
    changed = [
        ref
        for ref in found
        if ref.source_id not in cursor.recent or cursor.recent[ref.source_id] != ref.version
    ]
    result = plan_refs(
        convention, store, changed, since=cursor.looked_at - overlap, batch_size=batch_size
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


def _unreadable(store: ArtifactStore, layout: BatchLayout) -> bool:
    try:
        parse_stored(Manifest, store, layout.manifest)
    except UnreadableState:
        return True
    return False


def planned_versions(store: ArtifactStore, convention: str) -> dict[str, set[str | None]]:
    """Source id -> every version a planned batch of the convention holds it at.

    Reads every manifest; one that cannot be read is passed over with a warning (its
    records are then planned again, and a batch of the same membership rewrites it)."""
    versions: dict[str, set[str | None]] = {}
    for partition in planned_partitions(store, convention):
        try:
            manifest = load_manifest(store, BatchLayout(convention, partition))
        except BatchInputError as error:
            log.warning("planning passes over a manifest: %s", error)
            continue
        for ref in manifest.refs:
            versions.setdefault(ref.source_id, set()).add(ref.version)
    return versions
