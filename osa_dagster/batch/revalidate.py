"""Which batches a hook's current version has judged, and what judging the others would
change in the archive, said before anything changes.

Each version of a hook keeps its own outcomes in the store (storage/layout.py), so what
the store holds tells, for every batch, which versions judged it: the batches judged only
by another version are the ones a changed hook has not judged yet. The dry run judges them
with the current versions (those outcomes are kept, and the real re-validation reuses
them: no hook runs twice) and compares the verdicts with what the archive holds, changing
no record.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from osa_dagster.batch.hooks import HookJob, run_hook_jobs
from osa_dagster.batch.publish import batch_verdicts, revalidation_report
from osa_dagster.batch.shards import shard_checkpoints
from osa_dagster.batch.stores import UnreadableState
from osa_dagster.conventions.base import Convention
from osa_dagster.engine import HookCapacity, Runner
from osa_dagster.engine.checkpoint import UNRECORDED_VERSION_NAME
from osa_dagster.engine.spec import hook_version
from osa_dagster.records import RecordsDatabase
from osa_dagster.records.lifecycle import ChangeReport
from osa_dagster.storage.layout import BatchLayout
from osa_dagster.storage.store import ArtifactStore

_VERSION_FOLDER = re.compile(r"/v/([^/]+)/")


def judged_completely(store: ArtifactStore, layout: BatchLayout, hook: str, version: str) -> bool:
    """Whether this version of the hook has an outcome for every record of the batch."""
    try:
        _, shards = shard_checkpoints(store, layout, hook, version)
    except UnreadableState:
        return False
    return all(checkpoint is not None and checkpoint.complete for checkpoint in shards)


def versions_in_store(store: ArtifactStore, layout: BatchLayout, hook: str) -> set[str]:
    """Every version of the hook that has outcomes of the batch in the store, finished or
    not; outcomes from before versions count as version "unrecorded"."""
    found: set[str] = set()
    prefix = layout.hook(hook)
    for key in store.list_keys(prefix):
        if not key.endswith("checkpoint.json"):
            continue
        matched = _VERSION_FOLDER.search(key.removeprefix(prefix))
        found.add(matched.group(1) if matched else UNRECORDED_VERSION_NAME)
    return found


@dataclass
class HookJudgements:
    """One hook of a convention against the batches: which its current version judged."""

    hook: str
    version: str
    judged: list[str] = field(default_factory=list)
    """Batches the current version judged completely."""
    not_judged: dict[str, list[str]] = field(default_factory=dict)
    """Batches only other versions judged (or began): batch -> those versions."""
    never_run: list[str] = field(default_factory=list)
    """Batches no version of the hook has run on yet."""


def hook_judgements(
    convention: Convention, store: ArtifactStore, partitions: Sequence[str]
) -> list[HookJudgements]:
    """For each hook, which of these batches its current version has judged."""
    result = []
    for spec in convention.hooks:
        version = hook_version(spec)
        judgements = HookJudgements(hook=spec.name, version=version)
        for partition in partitions:
            layout = BatchLayout(convention.name, partition)
            if judged_completely(store, layout, spec.name, version):
                judgements.judged.append(partition)
                continue
            others = sorted(versions_in_store(store, layout, spec.name) - {version})
            if others:
                judgements.not_judged[partition] = others
            else:
                judgements.never_run.append(partition)
        result.append(judgements)
    return result


def stale_partitions(
    convention: Convention, store: ArtifactStore, partitions: Sequence[str]
) -> list[str]:
    """The batches, in the order given, that some hook judged only with another version."""
    stale = {p for j in hook_judgements(convention, store, partitions) for p in j.not_judged}
    return [p for p in partitions if p in stale]


def _unjudged_jobs(
    convention: Convention, store: ArtifactStore, partitions: Sequence[str]
) -> Iterator[HookJob]:
    for partition in partitions:
        layout = BatchLayout(convention.name, partition)
        for spec in convention.hooks:
            if not judged_completely(store, layout, spec.name, hook_version(spec)):
                yield HookJob(partition, spec.name)


def revalidation_dry_run(
    convention: Convention,
    store: ArtifactStore,
    db: RecordsDatabase,
    runner: Runner,
    partitions: Sequence[str],
    *,
    capacity: HookCapacity | None,
    max_examples: int = 5,
) -> ChangeReport:
    """What re-validating these batches with the hooks' current versions would add,
    withdraw and reinstate. The hooks whose current version has not judged a batch judge it
    now (each hook only where its version changed); no record, status or feature changes."""
    jobs = list(_unjudged_jobs(convention, store, partitions))
    for result in run_hook_jobs(convention, store, runner, jobs, capacity=capacity):
        if result.error is not None:
            raise result.error
    judged = ", ".join(f"{spec.name} {hook_version(spec)}" for spec in convention.hooks)
    report = ChangeReport(
        convention=convention.name,
        scope=f"{len(partitions)} batches judged by {judged}",
        max_examples=max_examples,
    )
    for partition in partitions:
        verdicts = batch_verdicts(convention, store, partition)
        report.merge(revalidation_report(convention, db, partition, verdicts))
    return report
