"""Deposits in Dagster: one partition per deposited record, validated by a sensor-launched
run, with the verdict on the materialisation (see batch/deposits.py)."""

import dagster as dg

from osa_dagster.batch.deposits import (
    RESULT_FILE,
    deposit_prefix,
    pending_deposits,
    refuse_misnamed_deposits,
    validate_deposit,
)
from osa_dagster.conventions.base import Convention
from osa_dagster.defs.leases import batch_lease
from osa_dagster.defs.metadata import deposit_metadata
from osa_dagster.defs.resources import (
    ISOLATION_METADATA,
    DepositsResource,
    HookRunnerResource,
    RecordsDatabaseResource,
    hooks_refusal,
)
from osa_dagster.defs.run_worker import recording_worker

DEPOSIT_SENSOR_INTERVAL_S = 15


def deposit_key(convention: Convention) -> dg.AssetKey:
    return dg.AssetKey([convention.name, "deposit_validation"])


def convention_deposits(
    convention: Convention,
) -> dg.Definitions:
    partitions = dg.DynamicPartitionsDefinition(name=f"{convention.name}_deposits")

    @dg.asset(
        key=deposit_key(convention),
        partitions_def=partitions,
        group_name=f"{convention.name}_deposits",
        kinds={"python"},
        description=f"One record deposited by a person, validated by every {convention.name} "
        "hook as a batch of one (same memory ladder and OOM escalation): passed with "
        "features, rejected with reasons, or errored. The verdict is also written to the "
        "deposit's result.json.",
    )
    def deposit_validation(
        context: dg.AssetExecutionContext,
        deposits: DepositsResource,
        hook_runner: HookRunnerResource,
        records_db: RecordsDatabaseResource,
    ) -> dg.MaterializeResult:
        runner, store, deposit = hook_runner.get(), deposits.get(), context.partition_key
        # Deposits are batches of their own namespace: a deposit's name may equal a batch's.
        with batch_lease(
            context,
            records_db.get(),
            f"{convention.name}/deposits",
            deposit,
            deposit_key(convention).to_user_string(),
        ):
            result = validate_deposit(
                convention,
                store,
                deposit,
                runner,
                hook_runner.capacity(),
                max_mb=deposits.max_mb,
            )
        prefix = deposit_prefix(convention.name, result.deposit)
        location = store.describe(f"{prefix}/{RESULT_FILE}")
        context.log.info(f"deposit {result.deposit}: {result.status.value} {result.reason or ''}")
        return dg.MaterializeResult(
            metadata={
                ISOLATION_METADATA: hook_runner.isolation(),
                **deposit_metadata(result, location),
            }
        )

    job = dg.define_asset_job(
        name=f"{convention.name}_validate_deposit",
        selection=[deposit_key(convention)],
        executor_def=recording_worker(dg.in_process_executor),
        description=f"Validate one deposited {convention.name} record.",
    )

    @dg.sensor(
        name=f"{convention.name}_deposits",
        job=job,
        minimum_interval_seconds=DEPOSIT_SENSOR_INTERVAL_S,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Validates each complete deposit (deposit.json written) once.",
    )
    def new_deposits(
        context: dg.SensorEvaluationContext, deposits: DepositsResource
    ) -> dg.SensorResult | dg.SkipReason:
        refusal = hooks_refusal()
        if refusal is not None:
            return dg.SkipReason(refusal)  # the deposits wait, validated once hooks can run
        store = deposits.get()
        for refused in refuse_misnamed_deposits(store, convention.name):
            context.log.warning(f"deposit folder {refused!r} refused: not a deposit name")
        pending = pending_deposits(store, convention.name)
        known = set(partitions.get_partition_keys(dynamic_partitions_store=context.instance))
        new = [name for name in pending if name not in known]
        return dg.SensorResult(
            run_requests=[dg.RunRequest(run_key=name, partition_key=name) for name in new],
            dynamic_partitions_requests=[partitions.build_add_request(new)] if new else [],
        )

    return dg.Definitions(assets=[deposit_validation], jobs=[job], sensors=[new_deposits])
