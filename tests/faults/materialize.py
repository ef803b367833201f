"""Materialise partitions of a convention in this process, on the instance of DAGSTER_HOME:

    python -m tests.faults.materialize CONVENTION KEY [KEY ...]

What a Dagster run worker does, in a process a fault test can SIGKILL or run twice at once.
Prints one JSON line per partition; exits 1 if any run failed.
"""

from __future__ import annotations

import json
import sys

import dagster as dg

from osa_dagster.definitions import build_definitions


def main(argv: list[str]) -> int:
    convention, *keys = argv
    job = build_definitions().resolve_job_def(f"{convention}_ingest")
    ok = True
    with dg.DagsterInstance.get() as instance:
        for key in keys:
            result = job.execute_in_process(
                partition_key=key, instance=instance, raise_on_error=False
            )
            failed = [
                e.step_key
                for e in result.all_events
                if e.event_type == dg.DagsterEventType.STEP_FAILURE
            ]
            print(json.dumps({"partition": key, "success": result.success, "failed": failed}))
            sys.stdout.flush()
            ok = ok and result.success
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
