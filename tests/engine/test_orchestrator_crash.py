"""The orchestrator is SIGKILLed mid-batch: nothing finished is lost, nothing finished is redone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import Harness, alive, eventually, record

ORCHESTRATOR = """
import json, sys
from pathlib import Path
from osa_sdk.types import HookRecord
from osa_dagster.settings import Settings
from osa_dagster.engine import (
    AttemptOptions, FileCheckpointIO, HookBatch, HookSpec, LocalRunner, run_hook,
)
args = json.loads(sys.argv[1])
run_hook(
    HookSpec.model_validate(args["spec"]),
    HookBatch([HookRecord.model_validate(r) for r in args["records"]], Path(args["files_root"])),
    LocalRunner.from_settings(Settings.from_env()),
    FileCheckpointIO(Path(args["checkpoint"])),
    Path(args["workdir"]),
    AttemptOptions(checkpoint_every_s=0.05),
)
"""


@pytest.mark.slow
def test_orchestrator_sigkill_loses_and_redoes_nothing(harness: Harness) -> None:
    spec = harness.spec(sleep_s=0.2)
    records = [record(f"r{i}", size_mb=i) for i in range(8)]
    args = {
        "spec": spec.model_dump(mode="json"),
        "records": [r.model_dump(mode="json") for r in records],
        "files_root": str(harness.files_root),
        "checkpoint": str(harness.checkpoints.path),
        "workdir": str(harness.workdir),
    }
    orchestrator = subprocess.Popen([sys.executable, "-c", ORCHESTRATOR, json.dumps(args)])
    assert eventually(lambda: len(harness.ledger_counts()) >= 3, timeout_s=20)

    orchestrator.kill()
    orchestrator.wait()

    stored = harness.checkpoints.load()
    assert stored is not None and stored.running is not None
    marker = stored.running.marker
    assert eventually(lambda: not alive(marker.pid))  # PR_SET_PDEATHSIG
    done_before = set(harness.ledger_counts())
    assert 3 <= len(done_before) < 8

    checkpoint = harness.run(spec, records)

    ids = [r.id for r in records]
    assert checkpoint.complete and checkpoint.counts()["passed"] == 8
    interrupted, resumed = checkpoint.attempts
    assert (interrupted.interrupted, interrupted.returncode, interrupted.oom_killed) == (
        True,
        None,
        False,
    )
    assert interrupted.records_done == len(done_before)
    assert (resumed.interrupted, resumed.returncode) == (False, 0)
    assert resumed.records_in == 8 - len(done_before)
    assert interrupted.memory_limit_mb == resumed.memory_limit_mb == 128
    assert {rid for rid, o in checkpoint.outcomes.items() if o.attempt == 1} == done_before
    assert harness.ledger_counts() == dict.fromkeys(ids, 1)
    assert harness.outcome_lines() == dict.fromkeys(ids, 1)
    if marker.cgroup is not None:
        assert not Path(marker.cgroup).exists()  # removed by kill_leftovers
