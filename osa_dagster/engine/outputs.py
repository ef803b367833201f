"""Read what a hook wrote to $OSA_OUT and merge it into the checkpoint, line by line.

Hooks are written by others and get killed mid-write, so nothing here trusts the output: bad
lines are counted as anomalies, never raised, and only complete lines are read.
"""

from __future__ import annotations

from collections.abc import Set
from pathlib import Path
from typing import Any

from osa_sdk.contract import FEATURES_FILE, OUTPUT_FILES, REJECTIONS_FILE
from osa_sdk.types import ErrorLine, FeaturesLine, OutcomeStatus, RejectionLine
from pydantic import ValidationError

from osa_dagster.engine.checkpoint import Anomaly, Checkpoint, RecordOutcome

CONFLICT_PREFIX = "conflicting outcomes: "


class OutputReader:
    """Hands out the complete lines appended to an attempt's output files since the last call.

    A line counts once its `\\n` is written; a partial last line (the hook was killed while
    writing it) is left unread.
    """

    def __init__(self, out_dir: Path, offsets: dict[str, int]) -> None:
        self.out_dir = out_dir
        # Shared with the checkpoint's in-flight attempt, so that saving the checkpoint also
        # saves how far its outcomes go.
        self.offsets = offsets

    def new_lines(self) -> list[tuple[str, bytes]]:
        lines: list[tuple[str, bytes]] = []
        for name in OUTPUT_FILES:
            offset = self.offsets.get(name, 0)
            try:
                with (self.out_dir / name).open("rb") as f:
                    f.seek(offset)
                    chunk = f.read()
            except FileNotFoundError:
                continue
            end = chunk.rfind(b"\n") + 1
            if end:
                self.offsets[name] = offset + end
                lines.extend((name, line) for line in chunk[:end].split(b"\n")[:-1])
        return lines


def harvest(
    checkpoint: Checkpoint,
    reader: OutputReader,
    batch_ids: Set[str],
    *,
    attempt: int,
    memory_limit_mb: int,
) -> bool:
    """Merge the new lines of `reader` into `checkpoint`; True if any line was consumed."""
    lines = reader.new_lines()
    for file_name, raw in lines:
        if not raw.strip():
            continue
        parsed = _parse(file_name, raw)
        if parsed is None:
            checkpoint.note(Anomaly.MALFORMED_LINES)
            continue
        record_id, fields = parsed
        outcome = RecordOutcome(**fields, attempt=attempt, memory_limit_mb=memory_limit_mb)
        _merge(checkpoint, batch_ids, record_id, outcome)
    return bool(lines)


def _parse(file_name: str, raw: bytes) -> tuple[str, dict[str, Any]] | None:
    """The record id and the outcome fields of one output line; None if it is malformed."""
    try:
        if file_name == FEATURES_FILE:
            passed = FeaturesLine.model_validate_json(raw)
            return passed.id, {"status": OutcomeStatus.PASSED, "features": passed.features}
        if file_name == REJECTIONS_FILE:
            rejected = RejectionLine.model_validate_json(raw)
            return rejected.id, {"status": OutcomeStatus.REJECTED, "reason": rejected.reason}
        errored = ErrorLine.model_validate_json(raw)
        return errored.id, {
            "status": OutcomeStatus.ERRORED,
            "reason": errored.error,
            "retryable": errored.retryable,
        }
    except ValidationError:  # invalid UTF-8 and invalid JSON included
        return None


def _merge(
    checkpoint: Checkpoint, batch_ids: Set[str], record_id: str, outcome: RecordOutcome
) -> None:
    if record_id not in batch_ids:
        checkpoint.note(Anomaly.UNKNOWN_IDS)
        return
    existing = checkpoint.outcomes.get(record_id)
    if existing is None:
        checkpoint.outcomes[record_id] = outcome
    elif existing.attempt != outcome.attempt:
        # Settled before this attempt started: the hook was not asked about it.
        checkpoint.note(Anomaly.ALREADY_SETTLED)
    elif existing.same_result(outcome):
        checkpoint.note(Anomaly.DUPLICATE_OUTCOMES)
    else:
        checkpoint.note(Anomaly.CONFLICTING_OUTCOMES)
        if not (existing.reason or "").startswith(CONFLICT_PREFIX):
            checkpoint.outcomes[record_id] = outcome.model_copy(
                update={
                    "status": OutcomeStatus.ERRORED,
                    "features": [],
                    "reason": f"{CONFLICT_PREFIX}{_describe(existing)} and {_describe(outcome)}",
                    "retryable": False,
                }
            )


def _describe(outcome: RecordOutcome) -> str:
    return (
        outcome.status.value
        if outcome.reason is None
        else f"{outcome.status.value} ({outcome.reason})"
    )
