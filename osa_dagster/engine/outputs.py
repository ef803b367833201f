"""Read what a hook wrote to $OSA_OUT and merge it into the checkpoint, line by line.

Hooks are written by others and get killed mid-write, so nothing here trusts the output: bad
lines are counted as anomalies, never raised, and only complete lines are read. The folder
itself is the hook's to shape, so only regular files are opened, never through a link and
never in a way that blocks: a FIFO, a symlink (to a sibling's checkpoint, to /etc/shadow), a
device or a folder in place of an outcome file refuses the output, and so does output past
the hook's size cap. The engine then stops the attempt and errors the records left.

What is taken is bounded too (the caps of osa_sdk.contract): a line over
MAX_OUTCOME_LINE_BYTES streams past unread, a features line of more than
MAX_FEATURE_ROWS_PER_RECORD rows errors its record, and feature rows or bytes past the
per-batch caps (counting what the checkpoint holds already) refuse the output. So the
orchestrator's memory, its checkpoint and the records database's write of a batch's features
stay bounded whatever a hook emits.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Set
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from osa_sdk.contract import (
    BYTES_PER_MB,
    FEATURES_FILE,
    MAX_FEATURE_BYTES_PER_BATCH,
    MAX_FEATURE_ROWS_PER_BATCH,
    MAX_FEATURE_ROWS_PER_RECORD,
    MAX_OUTCOME_LINE_BYTES,
    OUTPUT_FILES,
    REJECTIONS_FILE,
    bytes_to_mb,
)
from osa_sdk.types import ErrorLine, FeaturesLine, OutcomeStatus, RejectionLine
from pydantic import ValidationError

from osa_dagster.engine.checkpoint import Anomaly, Checkpoint, RecordOutcome
from osa_dagster.regular_files import TooManyEntries, open_folder, open_regular, tree_bytes

CONFLICT_PREFIX = "conflicting outcomes: "


# An output folder needs three files: past this many entries it is not read at all.
MAX_OUTPUT_ENTRIES = 10_000
# How much of an output file is read at once: the orchestrator holds at most this plus one
# line, whatever the hook writes and however fast.
READ_CHUNK_BYTES = BYTES_PER_MB
# How much of an over-long line is kept to find the record id it starts with.
_HEAD_BYTES = 64 * 1024
_LEADING_ID = re.compile(rb'\A\s*\{\s*"id"\s*:\s*("(?:[^"\\]|\\.)*")')


@dataclass(frozen=True)
class OversizedLine:
    """A complete line over the limit, which was skipped rather than read."""

    size: int
    head: bytes

    def record_id(self) -> str | None:
        """The id the line starts with, when it starts like an outcome line."""
        match = _LEADING_ID.match(self.head)
        if match is None:
            return None
        try:
            record_id = json.loads(match.group(1))
        except ValueError:
            return None
        return record_id if isinstance(record_id, str) else None


class OutputReader:
    """Hands out the complete lines appended to an attempt's output files since the last call.

    A line counts once its `\\n` is written; a partial last line (the hook was killed while
    writing it) is left unread. Files are read in chunks, up to where they ended when the call
    started, and a line over `max_line_bytes` is skipped as it streams past (an OversizedLine
    in its place), so memory stays bounded whatever the hook writes. What was read of a
    partial line is kept for the next call rather than read again.

    Once the folder holds something other than regular outcome files, or its outcome files
    add up to more than `max_output_bytes`, `refused` says why and nothing more is read.
    """

    def __init__(
        self,
        out_dir: Path,
        offsets: dict[str, int],
        max_line_bytes: int = MAX_OUTCOME_LINE_BYTES,
        max_output_bytes: int | None = None,
        held_features: tuple[int, int] = (0, 0),
    ) -> None:
        self.out_dir = out_dir
        # Shared with the checkpoint's in-flight attempt, so that saving the checkpoint also
        # saves how far its outcomes go.
        self.offsets = offsets
        self.max_line_bytes = max_line_bytes
        self.max_output_bytes = max_output_bytes
        self.refused: str | None = None
        # The feature rows and bytes of the batch so far (`held_features`: what its checkpoint
        # held before this reader), against the per-batch caps.
        self.feature_rows, self.feature_bytes = held_features
        self._partial: dict[str, bytes] = {}  # read after the offset, no newline yet
        self._skipping: dict[str, tuple[int, bytes]] = {}  # over-long line: scanned to, head

    def new_lines(self) -> Iterator[tuple[str, bytes | OversizedLine]]:
        if self.refused is not None:
            return
        files = self._open_all()
        try:
            if self.refused is None:
                for name, (f, size) in files.items():
                    yield from self._read(name, f, size)
        finally:
            for f, _ in files.values():
                f.close()

    def _open_all(self) -> dict[str, tuple[BinaryIO, int]]:
        """Every outcome file present, opened safely, with its size; sets `refused` when the
        folder breaks the rules (the files opened so far are returned for closing)."""
        files: dict[str, tuple[BinaryIO, int]] = {}
        folder = open_folder(self.out_dir)
        if folder is None:
            return files
        if isinstance(folder, str):
            self.refused = f"the output folder is {folder}, not a folder"
            return files
        try:
            for name in OUTPUT_FILES:
                opened = open_regular(folder, name)
                if isinstance(opened, str):
                    self.refused = f"{name} in the output folder is {opened}, not a regular file"
                    return files
                if opened is not None:
                    files[name] = (opened, os.fstat(opened.fileno()).st_size)
            if self.max_output_bytes is not None:
                self.refused = self._over_cap(folder, self.max_output_bytes)
        finally:
            os.close(folder)
        return files

    @staticmethod
    def _over_cap(folder: int, cap: int) -> str | None:
        """Why the output folder is over the cap, or None. Everything in it counts, outcome
        files or not: the cap is what keeps a hook from filling the disk."""
        try:
            total = tree_bytes(folder, MAX_OUTPUT_ENTRIES)
        except TooManyEntries as too_many:
            return f"the output folder holds {too_many}"
        if total <= cap:
            return None
        return (
            f"the hook wrote {bytes_to_mb(total):.1f} MB into its output folder, over its cap "
            f"of {bytes_to_mb(cap):.1f} MB (HookSpec.max_output_mb)"
        )

    def _read(
        self, name: str, f: BinaryIO, end: int
    ) -> Iterator[tuple[str, bytes | OversizedLine]]:
        offset = self.offsets.get(name, 0)
        partial = self._partial.pop(name, b"")
        scanned, head = self._skipping.pop(name, (offset + len(partial), None))
        f.seek(scanned)
        while scanned < end:
            chunk = f.read(min(READ_CHUNK_BYTES, end - scanned))
            if not chunk:
                break
            start, scanned = scanned, scanned + len(chunk)
            if head is not None:
                newline = chunk.find(b"\n")
                if newline == -1:
                    continue
                line_end = start + newline + 1
                yield name, OversizedLine(line_end - 1 - offset, head)
                offset, head, chunk = line_end, None, chunk[newline + 1 :]
                self.offsets[name] = offset
            partial += chunk
            complete = partial.rfind(b"\n") + 1
            if complete:
                lines, partial = partial[:complete].split(b"\n")[:-1], partial[complete:]
                offset += complete
                self.offsets[name] = offset
                for line in lines:
                    too_long = len(line) > self.max_line_bytes
                    yield name, OversizedLine(len(line), line[:_HEAD_BYTES]) if too_long else line
            if len(partial) > self.max_line_bytes:
                head, partial = partial[:_HEAD_BYTES], b""
        if head is not None:
            self._skipping[name] = (scanned, head)
        elif partial:
            self._partial[name] = partial


def harvest(
    checkpoint: Checkpoint,
    reader: OutputReader,
    batch_ids: Set[str],
    *,
    attempt: int,
    memory_limit_mb: int,
) -> bool:
    """Merge the new lines of `reader` into `checkpoint`; True if any line was consumed."""
    consumed = False
    for file_name, raw in reader.new_lines():
        consumed = True
        if isinstance(raw, OversizedLine):
            parsed = _oversized(file_name, raw, reader.max_line_bytes)
        elif not raw.strip():
            continue
        else:
            parsed = _parse(file_name, raw)
        if parsed is None:
            checkpoint.note(Anomaly.MALFORMED_LINES)
            continue
        record_id, fields, anomaly = parsed
        if anomaly is not None:
            checkpoint.note(anomaly)
        rows = len(fields.get("features", ()))
        line_bytes = raw.size if isinstance(raw, OversizedLine) else len(raw)
        # Only rows of the batch's own records are kept, so only they count against its caps:
        # a line naming another id is dropped as an anomaly, whatever it holds.
        if rows and record_id in batch_ids and not _within_batch_caps(reader, rows, line_bytes):
            break  # refused: nothing this attempt writes from here on counts
        outcome = RecordOutcome(**fields, attempt=attempt, memory_limit_mb=memory_limit_mb)
        _merge(checkpoint, batch_ids, record_id, outcome)
    return consumed


def _within_batch_caps(reader: OutputReader, rows: int, line_bytes: int) -> bool:
    """Count a features line against the batch's caps; past one, refuse the output."""
    reader.feature_rows += rows
    reader.feature_bytes += line_bytes
    if reader.feature_rows > MAX_FEATURE_ROWS_PER_BATCH:
        reader.refused = (
            f"the hook wrote {reader.feature_rows} feature rows for this batch, over the cap "
            f"of {MAX_FEATURE_ROWS_PER_BATCH} per batch"
        )
    elif reader.feature_bytes > MAX_FEATURE_BYTES_PER_BATCH:
        reader.refused = (
            f"the hook wrote {bytes_to_mb(reader.feature_bytes):.1f} MB of features for this "
            f"batch, over the cap of {bytes_to_mb(MAX_FEATURE_BYTES_PER_BATCH):.1f} MB per batch"
        )
    return reader.refused is None


# One output line as the record id, the outcome's fields, and the anomaly it counts as.
_Parsed = tuple[str, dict[str, Any], Anomaly | None]


def _oversized(file_name: str, line: OversizedLine, limit: int) -> _Parsed | None:
    """An over-long line errors the record it names; None when it names none."""
    record_id = line.record_id()
    if record_id is None:
        return None
    reason = (
        f"the hook wrote a {file_name} line of {bytes_to_mb(line.size):.1f} MB for this record, "
        f"over the cap of {bytes_to_mb(limit):.1f} MB per line"
    )
    return record_id, _errored_over_cap(reason), Anomaly.OVER_CAP


def _errored_over_cap(reason: str) -> dict[str, Any]:
    # The hook misbehaved, not the record: errored, and running it again would do the same.
    return {"status": OutcomeStatus.ERRORED, "reason": reason, "retryable": False}


def _parse(file_name: str, raw: bytes) -> _Parsed | None:
    """The record id, the outcome fields and any anomaly of one output line; None if it is
    malformed."""
    try:
        if file_name == FEATURES_FILE:
            passed = FeaturesLine.model_validate_json(raw)
            if (rows := len(passed.features)) > MAX_FEATURE_ROWS_PER_RECORD:
                reason = (
                    f"the hook wrote {rows} feature rows for this record, over the cap of "
                    f"{MAX_FEATURE_ROWS_PER_RECORD} per record"
                )
                return passed.id, _errored_over_cap(reason), Anomaly.OVER_CAP
            if (non_finite := passed.non_finite()) is not None:
                reason = f"the hook wrote {non_finite}, which JSON cannot hold"
                errored = {"status": OutcomeStatus.ERRORED, "reason": reason}
                return passed.id, errored, Anomaly.NON_FINITE_NUMBERS
            return passed.id, {"status": OutcomeStatus.PASSED, "features": passed.features}, None
        if file_name == REJECTIONS_FILE:
            rejected = RejectionLine.model_validate_json(raw)
            return rejected.id, {"status": OutcomeStatus.REJECTED, "reason": rejected.reason}, None
        error_line = ErrorLine.model_validate_json(raw)
        return (
            error_line.id,
            {
                "status": OutcomeStatus.ERRORED,
                "reason": error_line.error,
                "retryable": error_line.retryable,
            },
            None,
        )
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
