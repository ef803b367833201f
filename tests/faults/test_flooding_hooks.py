"""Hooks that flood the engine, as an adversarial probe found them: one features line of
3,000,000 `{}` rows (accepted as passed, it grew the orchestrator by 900 MB and the records
database by 1.5 GB), and hundreds of MB of stderr (stored whole as the attempt's hook.log).

Each flood now meets a cap that a record's reason or the log names, and the orchestrator's
memory stays bounded while the hook floods: the runs that measure it do so in a child
process of their own (its peak resident memory, /proc/self/status VmHWM, before and after),
so that nothing else of the test's counts.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from osa_sdk.contract import (
    EXIT_MEMORY_ERROR,
    MAX_FEATURE_ROWS_PER_BATCH,
    MAX_FEATURE_ROWS_PER_RECORD,
    MAX_OUTCOME_LINE_BYTES,
    bytes_to_mb,
)
from osa_sdk.types import OutcomeStatus

from osa_dagster.engine import LocalRunner
from osa_dagster.engine.runners.base import HOOK_LOG_MAX_BYTES, dropped_marker
from osa_dagster.settings import Settings
from tests.engine.helpers import Harness, record
from tests.fixtures.flooding_hooks import HEAD_LINE, TAIL_ERROR

REPO = Path(__file__).resolve().parents[2]
FLOOD = (sys.executable, str(REPO / "tests" / "fixtures" / "flooding_hooks.py"))
PASSED, ERRORED = OutcomeStatus.PASSED, OutcomeStatus.ERRORED
# The probe's line: 3,000,000 empty rows, about 9 MB.
PROBE_ROWS = 3_000_000
# What the bounded runs flood with: 100 times the line cap, and 100 times the log cap.
FLOOD_LINE_ROWS = 100 * MAX_OUTCOME_LINE_BYTES // 3
FLOOD_STDERR_MB = 100 * HOOK_LOG_MAX_BYTES // (1024 * 1024)
# How much the orchestrator may grow while it takes the whole flood.
MAX_GROWTH_MB = 100


def features_line_bytes(record_id: str, rows: int) -> int:
    """The size of the hook's features line of `rows` empty rows, newline excluded."""
    return len(json.dumps({"id": record_id})) - 1 + len(', "features": [') + 3 * rows + 1


@pytest.fixture
def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Harness:
    # The flood is about what the engine takes from a hook, the same sandboxed or not.
    monkeypatch.setenv("OSA_HOOK_SANDBOX", "off")
    return Harness(tmp_path, LocalRunner.from_settings(Settings.from_env()))


def test_the_probes_three_million_rows_on_one_line_error_their_record_only(
    harness: Harness,
) -> None:
    spec = harness.spec(FLOOD, rows={"flood": PROBE_ROWS})

    checkpoint = harness.run(spec, [record("ok:1", 1), record("flood", 2), record("ok:2", 3)])

    size = features_line_bytes("flood", PROBE_ROWS)
    assert {rid: (o.status, o.reason) for rid, o in checkpoint.outcomes.items()} == {
        "ok:1": (PASSED, None),
        "flood": (
            ERRORED,
            f"the hook wrote a features.jsonl line of {bytes_to_mb(size):.1f} MB for this "
            f"record, over the cap of {bytes_to_mb(MAX_OUTCOME_LINE_BYTES):.1f} MB per line",
        ),
        "ok:2": (PASSED, None),
    }
    assert checkpoint.outcomes["flood"].features == []
    assert not checkpoint.outcomes["flood"].retryable
    assert checkpoint.anomalies == {"over_cap": 1}
    # What the probe's run carried into its checkpoint and records database is not kept.
    assert (harness.root / "checkpoint.json").stat().st_size < 64 * 1024


def test_rows_over_the_record_cap_on_a_short_line_error_the_record(harness: Harness) -> None:
    rows = MAX_FEATURE_ROWS_PER_RECORD + 1
    assert features_line_bytes("many", rows) < MAX_OUTCOME_LINE_BYTES
    spec = harness.spec(FLOOD, rows={"many": rows, "fine": MAX_FEATURE_ROWS_PER_RECORD})

    checkpoint = harness.run(spec, [record("fine", 1), record("many", 2)])

    assert checkpoint.outcomes["fine"].status is PASSED
    assert len(checkpoint.outcomes["fine"].features) == MAX_FEATURE_ROWS_PER_RECORD
    many = checkpoint.outcomes["many"]
    assert (many.status, many.reason, many.features) == (
        ERRORED,
        f"the hook wrote {rows} feature rows for this record, over the cap of "
        f"{MAX_FEATURE_ROWS_PER_RECORD} per record",
        [],
    )


def test_rows_over_the_batch_cap_stop_the_attempt(harness: Harness) -> None:
    """Records each within their cap, too many of them: the batch's rows are bounded."""
    full = MAX_FEATURE_ROWS_PER_BATCH // MAX_FEATURE_ROWS_PER_RECORD
    ids = [f"r{n:02d}" for n in range(full + 2)]
    spec = harness.spec(FLOOD, rows=dict.fromkeys(ids, MAX_FEATURE_ROWS_PER_RECORD))

    checkpoint = harness.run(spec, [record(rid, n + 1) for n, rid in enumerate(ids)])

    over = (full + 1) * MAX_FEATURE_ROWS_PER_RECORD
    refused = (
        f"output refused: the hook wrote {over} feature rows for this batch, over the cap "
        f"of {MAX_FEATURE_ROWS_PER_BATCH} per batch"
    )
    assert {rid: (o.status, o.reason) for rid, o in checkpoint.outcomes.items()} == {
        **{rid: (PASSED, None) for rid in ids[:full]},
        **{rid: (ERRORED, refused) for rid in ids[full:]},
    }
    kept = sum(len(o.features) for o in checkpoint.outcomes.values())
    assert kept == MAX_FEATURE_ROWS_PER_BATCH
    assert checkpoint.anomalies == {"refused_output": 1}


def test_the_batch_cap_counts_the_rows_of_earlier_attempts(harness: Harness) -> None:
    """A first attempt brings the batch to its cap and runs out of memory; the record the
    second attempt passes would take the batch over: refused, though that attempt is small."""
    full = MAX_FEATURE_ROWS_PER_BATCH // MAX_FEATURE_ROWS_PER_RECORD
    ids = [f"r{n:02d}" for n in range(full + 1)]
    spec = harness.spec(
        FLOOD,
        base_mb=128,
        cap_mb=256,
        rows=dict.fromkeys(ids, MAX_FEATURE_ROWS_PER_RECORD),
        stop_at={"128": ids[-1]},
        exit={"128": EXIT_MEMORY_ERROR},
    )

    checkpoint = harness.run(spec, [record(rid, n + 1) for n, rid in enumerate(ids)])

    assert [(a.memory_limit_mb, a.records_done) for a in checkpoint.attempts] == [
        (128, full),
        (256, 0),
    ]
    assert checkpoint.outcomes[ids[-1]].reason == (
        f"output refused: the hook wrote {MAX_FEATURE_ROWS_PER_BATCH + MAX_FEATURE_ROWS_PER_RECORD}"
        f" feature rows for this batch, over the cap of {MAX_FEATURE_ROWS_PER_BATCH} per batch"
    )
    assert all(checkpoint.outcomes[rid].status is PASSED for rid in ids[:-1])


@pytest.mark.slow
def test_a_flood_of_features_and_stderr_keeps_the_orchestrator_and_the_log_bounded(
    tmp_path: Path,
) -> None:
    """A features line 100 times the line cap and stderr 100 times the log cap, then a crash:
    the orchestrator grows by less than MAX_GROWTH_MB while it takes them, the stored log is
    the cap and a marker, and the records left get the traceback at the log's end."""
    report = run_driver(
        tmp_path,
        {
            "rows": {"flood": FLOOD_LINE_ROWS},
            "stop_at": "crash",
            "stderr_mb": FLOOD_STDERR_MB,
            "exit": 1,
        },
        ["ok:1", "flood", "crash", "ok:2"],
    )

    outcomes = report["outcomes"]
    assert outcomes["ok:1"] == ["passed", None]
    assert outcomes["flood"][0] == "errored"
    assert "over the cap of 4.0 MB per line" in outcomes["flood"][1]
    for left in ("crash", "ok:2"):
        status, reason = outcomes[left]
        assert status == "errored"
        assert reason.startswith("hook exited with code 1: ")
        assert reason.endswith(TAIL_ERROR)
    # The stored log: its start, a marker saying how much was dropped, its end.
    log = Path(report["log"]).read_bytes()
    assert len(log) <= HOOK_LOG_MAX_BYTES + len(dropped_marker(10**12))
    assert log.startswith(HEAD_LINE.encode())
    assert log.endswith(f"{TAIL_ERROR}\n".encode())
    [dropped] = re.findall(rb"\[\.\.\. ([0-9.]+) MB of the hook's output dropped here", log)
    assert float(dropped) >= FLOOD_STDERR_MB - 1
    assert report["attempts"] == [{"timed_out": False, "returncode": 1}]
    assert report["grew_mb"] < MAX_GROWTH_MB, report


def run_driver(root: Path, config: dict[str, Any], ids: list[str]) -> dict[str, Any]:
    settings = {"root": str(root), "config": config, "ids": ids}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "sdk" / "src")])}
    result = subprocess.run(
        [sys.executable, __file__, json.dumps(settings)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.splitlines()[-1])


# The driver, run in a child process whose peak memory is the orchestrator's alone.


def _peak_rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    [kb] = re.findall(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(kb) / 1024


def _drive(settings: dict[str, Any]) -> dict[str, Any]:
    os.environ["OSA_HOOK_SANDBOX"] = "off"
    harness = Harness(Path(settings["root"]), LocalRunner.from_settings(Settings.from_env()))
    # The flood goes through the output folder: its own cap is not what this test is about.
    spec = harness.spec(FLOOD, **settings["config"]).model_copy(
        update={"max_output_mb": 4 * bytes_to_mb(100 * MAX_OUTCOME_LINE_BYTES)}
    )
    records = [record(rid, n + 1) for n, rid in enumerate(settings["ids"])]
    before = _peak_rss_mb()
    checkpoint = harness.run(spec, records)
    grew = _peak_rss_mb() - before
    return {
        "outcomes": {rid: [o.status.value, o.reason] for rid, o in checkpoint.outcomes.items()},
        "attempts": [
            {"timed_out": a.timed_out, "returncode": a.returncode} for a in checkpoint.attempts
        ],
        "log": str(harness.workdir / "attempt-1" / "hook.log"),
        "grew_mb": grew,
    }


if __name__ == "__main__":
    print(json.dumps(_drive(json.loads(sys.argv[1]))))
