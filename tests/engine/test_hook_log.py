"""A hook's log is kept to a bounded size, its two ends whole, whatever the hook prints."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from osa_dagster.engine.runners.base import (
    HOOK_LOG_HEAD_BYTES,
    HOOK_LOG_MAX_BYTES,
    HOOK_LOG_TAIL_BYTES,
    HookLog,
    PipeToHookLog,
    dropped_marker,
)


def numbered(size: int) -> bytes:
    """`size` bytes in which every position is told apart from its neighbours."""
    return b"".join(b"%09d\n" % n for n in range(size // 10 + 1))[:size]


def test_a_log_within_the_cap_is_kept_whole(tmp_path: Path) -> None:
    text = numbered(HOOK_LOG_MAX_BYTES)
    with HookLog(tmp_path / "hook.log") as log:
        for start in range(0, len(text), 7_777):
            log.write(text[start : start + 7_777])
    assert (tmp_path / "hook.log").read_bytes() == text


def test_a_longer_log_keeps_its_head_and_tail_and_says_what_was_dropped(tmp_path: Path) -> None:
    text = numbered(10 * HOOK_LOG_MAX_BYTES + 12_345)
    with HookLog(tmp_path / "hook.log") as log:
        for start in range(0, len(text), 65_521):
            log.write(text[start : start + 65_521])
    dropped = len(text) - HOOK_LOG_MAX_BYTES
    assert (tmp_path / "hook.log").read_bytes() == (
        text[:HOOK_LOG_HEAD_BYTES] + dropped_marker(dropped) + text[-HOOK_LOG_TAIL_BYTES:]
    )
    assert b"9.0 MB of the hook's output dropped" in dropped_marker(dropped)


def test_finishing_takes_what_is_in_the_pipe_without_waiting_for_a_child_holding_it(
    tmp_path: Path,
) -> None:
    """A child that outlives the hook may hold the pipe open: the log ends all the same."""
    read_end, write_end = os.pipe()
    holder = subprocess.Popen(["sleep", "600"], stdout=write_end)
    try:
        os.write(write_end, b"the hook's last words\n")
        os.close(write_end)
        log = PipeToHookLog(read_end, tmp_path / "hook.log")
        log.finish()
        assert (tmp_path / "hook.log").read_bytes() == b"the hook's last words\n"
        assert holder.poll() is None  # the pipe was never closed by its last writer
    finally:
        holder.kill()
        holder.wait()
