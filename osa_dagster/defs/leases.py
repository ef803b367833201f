"""Every step that works a batch holds the batch's lease (osa_dagster/batch/lease.py)."""

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg

from osa_dagster.batch.lease import BatchLeases, Lease, LeaseHolding
from osa_dagster.records import RecordsDatabase
from osa_dagster.settings import settings


class _LeaseLog:
    """Says in the run's log when the step `step` had to wait for another run's batch, or
    took a dead holder's lease over."""

    def __init__(self, context: dg.AssetExecutionContext, step: str, wait_s: float) -> None:
        self.context = context
        self.step = step
        self.wait_s = wait_s
        self.waited: set[str] = set()

    def waiting(self, holding: LeaseHolding) -> None:
        self.waited.add(holding.batch)
        self.context.log.info(
            f"{self.step}: batch {holding.batch} is being worked by {holding.describe()}; "
            f"waiting for it (at most {self.wait_s:g} s)"
        )

    def acquired(self, lease: Lease) -> None:
        batch = lease.holding.batch
        if lease.took_over is not None:
            self.context.log.warning(
                f"{self.step}: batch {batch}: took over the lease of "
                f"{lease.took_over.describe()}, which is dead"
            )
        elif batch in self.waited:
            self.context.log.info(
                f"{self.step}: batch {batch}: waited {lease.waited_s:.1f} s for it"
            )


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
    log = _LeaseLog(context, step, wait_s)
    with BatchLeases(db).hold(
        convention, batch, step=step, run_id=context.run.run_id, wait_s=wait_s, on_wait=log.waiting
    ) as lease:
        log.acquired(lease)
        yield lease


def leased_partitions(
    context: dg.AssetExecutionContext,
    db: RecordsDatabase,
    convention: str,
    step: str,
) -> Iterator[str]:
    """The run's partitions in order, each yielded while its lease is held: whatever the
    loop does with a partition, no other run works that batch meanwhile. One lease at a
    time, none held while waiting for the next."""
    for partition in context.partition_keys:
        with batch_lease(context, db, convention, partition, step):
            yield partition


@contextmanager
def hold_partitions(
    context: dg.AssetExecutionContext, db: RecordsDatabase, convention: str, step: str
) -> Iterator[list[Lease]]:
    """Hold the leases of all the run's partitions at once, for a step that works them
    together, in the one order every such step takes them (BatchLeases.hold_all)."""
    wait_s = settings().lease_wait_s
    log = _LeaseLog(context, step, wait_s)
    with BatchLeases(db).hold_all(
        convention,
        context.partition_keys,
        step=step,
        run_id=context.run.run_id,
        wait_s=wait_s,
        on_wait=log.waiting,
    ) as leases:
        for lease in leases:
            log.acquired(lease)
        yield leases
