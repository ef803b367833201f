"""FileCheckpointIO: round trip, and atomic replacement under a crash."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from osa_sdk.types import OutcomeStatus

from osa_dagster.engine import AttemptRecord, Checkpoint, FileCheckpointIO, RecordOutcome


def checkpoint(*passed: str) -> Checkpoint:
    return Checkpoint(
        hook="h",
        batch_digest="d",
        next_memory_mb=256,
        outcomes={
            rid: RecordOutcome(status=OutcomeStatus.PASSED, attempt=1, memory_limit_mb=128)
            for rid in passed
        },
        attempts=[
            AttemptRecord(
                number=1,
                memory_limit_mb=128,
                peak_memory_mb=128.0,
                returncode=-9,
                oom_killed=True,
                timed_out=False,
                interrupted=False,
                records_in=3,
                records_done=len(passed),
                first_unfinished="c",
                duration_s=0.5,
                started_at=datetime.now(UTC),
                stderr_tail="",
                limit_mode="cgroup",
            )
        ],
    )


def test_round_trip(tmp_path: Path) -> None:
    io = FileCheckpointIO(tmp_path / "sub" / "checkpoint.json")
    assert io.load() is None

    saved = checkpoint("a", "b")
    io.save(saved)
    loaded = io.load()

    assert loaded == saved
    assert loaded.counts() == {"passed": 2, "rejected": 0, "errored": 0}
    assert [a.number for a in loaded.oom_attempts()] == [1]


CRASH_BEFORE_RENAME = """
import os, pathlib, sys
from osa_dagster.engine import Checkpoint, FileCheckpointIO
io = FileCheckpointIO(pathlib.Path(sys.argv[1]))
io.save(Checkpoint.model_validate_json(sys.argv[2]))
os.rename = lambda *args, **kwargs: os._exit(17)  # the process dies between write and rename
io.save(Checkpoint.model_validate_json(sys.argv[3]))
"""


def test_a_crash_between_write_and_rename_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.json"
    crashed = subprocess.run(
        [
            sys.executable,
            "-c",
            CRASH_BEFORE_RENAME,
            str(path),
            checkpoint("a").model_dump_json(),
            checkpoint("a", "b").model_dump_json(),
        ],
        capture_output=True,
        text=True,
    )
    assert crashed.returncode == 17, crashed.stderr

    # The new version was fully written, but only to a temporary file next to the old one.
    assert len(list(tmp_path.glob(".checkpoint.json.*.tmp"))) == 1
    assert set(FileCheckpointIO(path).load().outcomes) == {"a"}


def test_a_failed_save_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    io = FileCheckpointIO(tmp_path / "checkpoint.json")
    io.save(checkpoint("a"))

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "rename", full_disk)
    with pytest.raises(OSError, match="No space"):
        io.save(checkpoint("a", "b"))

    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.json"]
    assert set(io.load().outcomes) == {"a"}
