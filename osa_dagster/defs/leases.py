"""Every step that works a batch holds the batch's lease (osa_dagster/batch/lease.py)."""

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import dagster as dg

from osa_dagster.batch.lease import BatchLeases, Lease, LeaseHolding
from osa_dagster.records import RecordsDatabase
from osa_dagster.settings import settings


@contextmanager
def batch_lease(
    context: dg.AssetExecutionContext,
    db: RecordsDatabase,
    convention: str,
    batch: str,
    step: str,
) -> Iterator[Lease]:
    """Hold `batch` of `convention` for this run's step `step`, saying in the run's log
    when it had to wait for another run, or took a dead holder's lease over."""
    wait_s = settings().lease_wait_s
    waited = False

    def waiting(holding: LeaseHolding) -> None:
        nonlocal waited
        waited = True
        context.log.info(
            f"{step}: batch {batch} is being worked by {holding.describe()}; waiting for it "
            f"(at most {wait_s:g} s)"
        )

    with BatchLeases(db).hold(
        convention,
        batch,
        step=step,
        run_id=context.run.run_id,
        wait_s=wait_s,
        on_wait=waiting,
    ) as lease:
        if lease.took_over is not None:
            context.log.warning(
                f"{step}: batch {batch}: took over the lease of {lease.took_over.describe()}, "
                "which is dead"
            )
        elif waited:
            context.log.info(f"{step}: batch {batch}: waited {lease.waited_s:.1f} s for it")
        yield lease


def leased_partitions(
    context: dg.AssetExecutionContext,
    db: RecordsDatabase,
    convention: str,
    step: str,
) -> Iterator[str]:
    """The run's partitions in order, each yielded while its lease is held: whatever the
    loop does with a partition, no other run works that batch meanwhile."""
    for partition in context.partition_keys:
        with batch_lease(context, db, convention, partition, step):
            yield partition


@contextmanager
def hold_partitions(
    context: dg.AssetExecutionContext, db: RecordsDatabase, convention: str, step: str
) -> Iterator[list[Lease]]:
    """Hold the leases of all the run's partitions at once, for a step that works them
    together. Every step that holds several takes them in sorted order, and a step that
    holds one at a time never waits while holding it: no two runs can wait for each other."""
    with ExitStack() as held:
        yield [
            held.enter_context(batch_lease(context, db, convention, partition, step))
            for partition in sorted(context.partition_keys)
        ]
