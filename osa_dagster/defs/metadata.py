"""What a curator reads on a materialisation: counts first, then small tables."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import dagster as dg
from osa_sdk.runtime import IngestReport
from osa_sdk.types import OutcomeStatus

from osa_dagster.batch.deposits import DepositResult
from osa_dagster.batch.fetch import RawBatchSummary
from osa_dagster.batch.hooks import SetAside
from osa_dagster.batch.publish import FeaturesSummary, PublishSummary
from osa_dagster.engine import AttemptRecord, Checkpoint
from osa_dagster.engine.memory_history import MemoryHistory

PREVIEW_ROWS = 20
HOOK_VERSION_METADATA = "hook_version"
"""On a hook's asset definition and each materialisation: the version that judged."""
# A wait for a slot and memory this long is told in an attempt's log line.
NOTED_WAIT_S = 0.1


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> dg.MetadataValue:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return dg.MetadataValue.md("\n".join(lines))


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _ending(attempt: AttemptRecord) -> str:
    if attempt.oom_killed:
        return "OOM killed alone" if attempt.isolation else "OOM killed"
    if attempt.timed_out:
        return "timed out"
    if attempt.interrupted:
        return "interrupted"
    return f"exit {attempt.returncode}"


def describe_attempt(attempt: AttemptRecord) -> str:
    text = (
        ("" if attempt.shard is None else f"shard {attempt.shard}, ")
        + f"attempt {attempt.number}: limit {attempt.memory_limit_mb} MB, peak "
        f"{_mb(attempt.peak_memory_mb)} MB, {attempt.records_done}/{attempt.records_in} "
        f"records done, {_ending(attempt)}"
    )
    if attempt.queued_s is not None and attempt.queued_s >= NOTED_WAIT_S:
        text += f", after {attempt.queued_s:.1f} s waiting for a slot and memory"

    if attempt.oom_killed and attempt.first_unfinished:
        text += f" while on record {attempt.first_unfinished!r}"
    return text


def set_aside_metadata(set_aside: SetAside) -> dict[str, Any]:
    """A checkpoint that could not be read: the file kept for inspection, and why."""
    return {"checkpoint_set_aside": set_aside.key, "checkpoint_set_aside_why": set_aside.message}


def attempt_metadata(attempt: AttemptRecord) -> dict[str, Any]:
    return {
        "attempt": attempt.number,
        "memory_limit_mb": attempt.memory_limit_mb,
        "peak_memory_mb": round(attempt.peak_memory_mb or 0.0, 1),
        "oom_killed": attempt.oom_killed,
        "ending": _ending(attempt),
        "records_in": attempt.records_in,
        "records_done": attempt.records_done,
        "record_in_progress": attempt.first_unfinished or "-",
        "isolation": attempt.isolation,
        "lane": attempt.lane or "main",
        "queued_s": round(attempt.queued_s or 0.0, 2),
        "shard": "-" if attempt.shard is None else attempt.shard,
    }


def attempt_origin(attempt: AttemptRecord, run_id: str) -> str:
    """Which run made the attempt: this one, or an earlier one whose checkpoint this run
    reused (its attempts are not new, and its OOMs were retried back then)."""
    if attempt.run_id == run_id:
        return "this run"
    return "reused: earlier run" + (f" {attempt.run_id[:8]}" if attempt.run_id else "")


def attempt_row(attempt: AttemptRecord, run_id: str) -> list[Any]:
    return [
        attempt.number,
        attempt_origin(attempt, run_id),
        "-" if attempt.shard is None else attempt.shard,
        attempt.lane or "main",
        attempt.memory_limit_mb,
        _mb(attempt.peak_memory_mb),
        _ending(attempt),
        f"{attempt.records_done}/{attempt.records_in}",
        "-" if attempt.duration_s is None else f"{attempt.duration_s:.1f}",
        "-" if attempt.queued_s is None else f"{attempt.queued_s:.1f}",
        attempt.first_unfinished or "",
    ]


ATTEMPT_HEADER = (
    "attempt",
    "run",
    "shard",
    "lane",
    "limit MB",
    "peak MB",
    "ending",
    "records done",
    "seconds",
    "queued s",
    "record in progress",
)


def raw_batch_metadata(summary: RawBatchSummary) -> dict[str, Any]:
    report: IngestReport = summary.report
    metadata: dict[str, Any] = {
        "records": len(summary.records),
        "dagster/row_count": len(summary.records),
        "skipped_oversize": len(report.skipped_oversize),
        "fetch_failed": len(report.failed),
        "size_mb": round(sum(r.size_mb for r in summary.records), 3),
    }
    if report.skipped_oversize or report.failed:
        rows = [
            (s.source_id, f"oversize: {s.file_name} {s.size_mb:.1f} MB")
            for s in report.skipped_oversize
        ]
        rows += [(f.source_id, f"fetch failed: {f.error}") for f in report.failed]
        metadata["not_fetched"] = markdown_table(("record", "why"), rows[:PREVIEW_ROWS])
    return metadata


def _by_shard(attempts: list[AttemptRecord]) -> dict[int | None, list[AttemptRecord]]:
    shards: dict[int | None, list[AttemptRecord]] = {}
    for attempt in attempts:
        shards.setdefault(attempt.shard, []).append(attempt)
    return dict(sorted(shards.items(), key=lambda item: item[0] or 0))


def _limits(attempts: list[AttemptRecord]) -> str:
    return " -> ".join(str(a.memory_limit_mb) for a in attempts) or "-"


SHARD_HEADER = ("shard", "attempts", "memory limits MB", "OOM kills", "records settled", "seconds")


def shard_row(shard: int | None, attempts: list[AttemptRecord]) -> list[Any]:
    return [
        "-" if shard is None else shard,
        len(attempts),
        _limits(attempts),
        sum(1 for a in attempts if a.oom_killed),
        sum(a.records_done for a in attempts),
        f"{sum(a.duration_s or 0.0 for a in attempts):.1f}",
    ]


def hook_metadata(checkpoint: Checkpoint, run_id: str) -> dict[str, Any]:
    """A hook's work on a batch as of the run `run_id`: every attempt, told apart by run and
    by shard (batch/shards.py). Bounded whatever the batch's size: counts, a row per shard,
    and at most PREVIEW_ROWS attempts and records."""
    counts = checkpoint.counts()
    ooms = [a for a in checkpoint.attempts if a.oom_killed]
    reused = [a for a in checkpoint.attempts if a.run_id != run_id]
    peaks = [a.peak_memory_mb for a in checkpoint.attempts if a.peak_memory_mb is not None]
    shards = _by_shard(checkpoint.attempts)
    # The attempts a curator looks for first: the ones that did not simply end, then the rest.
    shown = sorted(
        checkpoint.attempts,
        key=lambda a: (a.returncode == 0 and not a.oom_killed, a.shard or 0, a.number),
    )[:PREVIEW_ROWS]
    shown.sort(key=lambda a: (a.shard or 0, a.number))
    metadata: dict[str, Any] = {
        HOOK_VERSION_METADATA: checkpoint.version_name,
        "records_in": len(checkpoint.outcomes),
        "passed": counts[OutcomeStatus.PASSED],
        "rejected": counts[OutcomeStatus.REJECTED],
        "errored": counts[OutcomeStatus.ERRORED],
        "poison": len(checkpoint.poison()),
        "attempts": len(checkpoint.attempts),
        "oom_attempts": len(ooms),
        "oom_attempts_this_run": sum(1 for a in ooms if a.run_id == run_id),
        "attempts_reused": len(reused),
        "memory_limits_mb": _limits(checkpoint.attempts)
        if len(shards) < 2
        else "; ".join(f"shard {shard}: {_limits(a)}" for shard, a in shards.items()),
        "peak_memory_mb": round(max(peaks, default=0.0), 1),
        "shards": max(len(shards), 1),
        "attempt_log": markdown_table(ATTEMPT_HEADER, (attempt_row(a, run_id) for a in shown)),
    }
    if len(shown) < len(checkpoint.attempts):
        metadata["attempt_log_rows_left_out"] = len(checkpoint.attempts) - len(shown)
    if len(shards) > 1:
        metadata["shard_log"] = markdown_table(
            SHARD_HEADER, (shard_row(shard, a) for shard, a in list(shards.items())[:PREVIEW_ROWS])
        )
    anomalies = {name: n for name, n in checkpoint.anomalies.items() if n}
    if anomalies:
        metadata["bad_output"] = dg.MetadataValue.json(anomalies)
    not_passed = [
        (record_id, outcome.status.value, outcome.reason or "")
        for record_id, outcome in sorted(checkpoint.outcomes.items())
        if outcome.status is not OutcomeStatus.PASSED
    ]
    if not_passed:
        metadata["not_passed"] = markdown_table(
            ("record", "status", "reason"), not_passed[:PREVIEW_ROWS]
        )
    return metadata


def publish_metadata(summary: PublishSummary, total_published: int) -> dict[str, Any]:
    result = summary.result
    metadata: dict[str, Any] = {
        "records_in": summary.records_in,
        "passed_all_hooks": len(summary.passed_all),
        "published": result.newly_published,
        "duplicates_skipped": result.already_published,
        "not_published": len(summary.rejections),
        "convention_total_published": total_published,
        "dagster/row_count": len(result.srns),
        # Always present, so that a curator can chart re-validations over partitions.
        "withdrawn": len(summary.withdrawn),
        "reinstated": len(summary.reinstated),
        "hook_versions": dg.MetadataValue.json(summary.hook_versions),
    }
    changed = [("withdrawn", i, why) for i, why in sorted(summary.withdrawn.items())] + [
        ("reinstated", i, why) for i, why in sorted(summary.reinstated.items())
    ]
    if changed:
        metadata["status_changes"] = markdown_table(
            ("change", "record", "why"), changed[:PREVIEW_ROWS]
        )
    if summary.not_published:
        metadata["why_not_published"] = dg.MetadataValue.json(dict(summary.not_published))
        metadata["not_published_records"] = markdown_table(
            ("record", "hook", "outcome"),
            [(v.source_id, v.hook, v.outcome) for v in summary.rejections[:PREVIEW_ROWS]],
        )
    # Always present, so that a curator can chart dead letters over partitions.
    metadata["dead_letters"] = len(summary.dead_letters)
    if summary.dead_letters:
        metadata["dead_letter_records"] = markdown_table(
            ("record", "hook", "size MB", "limit MB", "peak MB", "reason"),
            [
                (p.source_id, p.hook, _mb(p.size_mb), p.limit_mb, _mb(p.peak_mb), p.reason)
                for p in summary.dead_letters[:PREVIEW_ROWS]
            ],
        )
    if result.srns:
        rows = sorted(result.srns.items())[:PREVIEW_ROWS]
        metadata["srns"] = markdown_table(("record", "SRN"), rows)
    return metadata


def features_metadata(summary: FeaturesSummary) -> dict[str, Any]:
    return {
        "feature_rows": sum(summary.rows_per_hook.values()),
        "records": summary.records,
        "rows_per_hook": dg.MetadataValue.json(summary.rows_per_hook),
    }


def memory_history_metadata(history: MemoryHistory | None, batch: Iterable[str]) -> dict[str, Any]:
    """What the hook's memory prediction has learnt, largest records first: from this batch's
    records (`batch`), and from every batch of the convention, which is what starts a new
    batch's large records above the base."""
    if history is None or not (history.fits or history.ooms):
        return {}
    header = ("record", "record size MB", "outcome", "memory MB (peak or limit)")
    rows = [
        (f.record or "-", f"{f.size_mb:.2f}", "fitted", f"{f.need_mb:.0f}") for f in history.fits
    ]
    rows += [
        (o.record or "-", f"{o.size_mb:.2f}", "OOM-killed", str(o.limit_mb)) for o in history.ooms
    ]
    rows.sort(key=lambda row: -float(row[1]))
    ours = set(batch)
    this_batch = [row for row in rows if row[0] in ours]
    metadata: dict[str, Any] = {
        "memory_history_all_batches": markdown_table(header, rows[:PREVIEW_ROWS]),
    }
    if this_batch:
        metadata["memory_history_this_batch"] = markdown_table(header, this_batch[:PREVIEW_ROWS])
    return metadata


def deposit_metadata(result: DepositResult, location: str) -> dict[str, Any]:
    """What a depositor or curator reads about one validated deposit."""
    metadata: dict[str, Any] = {
        "status": result.status.value,
        "reason": result.reason or "-",
        "source_id": result.source_id or "-",
        "result": dg.MetadataValue.path(location),
    }
    if result.hooks:
        metadata["hooks"] = markdown_table(
            ["hook", "status", "reason", "attempts (MB, OOM)"],
            (
                (
                    v.hook,
                    v.status.value,
                    v.reason or "-",
                    ", ".join(
                        f"{a.memory_limit_mb}{' OOM' if a.oom_killed else ''}" for a in v.attempts
                    ),
                )
                for v in result.hooks
            ),
        )
        features = [row for v in result.hooks for row in v.features]
        if features:
            metadata["features"] = dg.MetadataValue.json(features[:PREVIEW_ROWS])
    return metadata
