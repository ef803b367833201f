"""Fetching: the ingester turns a batch's manifest into records.jsonl and files."""

from __future__ import annotations

from dataclasses import dataclass

from osa_sdk.contract import INGEST_REPORT_FILE
from osa_sdk.runtime import IngestReport, run_ingest
from osa_sdk.types import FailedRef, IngesterRecord
from pydantic import ValidationError

from osa_dagster.batch import BatchInputError
from osa_dagster.batch.plan import load_manifest
from osa_dagster.batch.stores import UnreadableState, parse_stored
from osa_dagster.conventions.base import Convention
from osa_dagster.records.models import source_id_error
from osa_dagster.storage.layout import BatchLayout, Manifest
from osa_dagster.storage.store import ArtifactStore


@dataclass
class RawBatchSummary:
    records: list[IngesterRecord]
    report: IngestReport


def read_raw_records(
    store: ArtifactStore, layout: BatchLayout, convention: Convention | None = None
) -> list[IngesterRecord]:
    """Parse the batch's records.jsonl; any bad line fails with the batch and line named."""
    where = f"batch {layout.partition!r} of convention {layout.convention!r}"
    if not store.exists(layout.raw_records):
        raise BatchInputError(f"{where}: no records.jsonl at {store.describe(layout.raw_records)}")
    records: list[IngesterRecord] = []
    first_line: dict[str, int] = {}
    # Split as bytes and let each line be decoded by its parse: a byte that is not UTF-8 is
    # then a bad line named like any other, and no decoded copy of the whole file is made.
    data = store.read_bytes(layout.raw_records)
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            record = IngesterRecord.model_validate_json(line)
            if convention is not None and convention.record_schema is not None:
                convention.record_schema.model_validate(record.metadata)
        except ValidationError as error:
            problem = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'line'}: {e['msg']}" for e in error.errors()
            )
            raise BatchInputError(f"{where}: records.jsonl line {number}: {problem}") from error
        if record.source_id in first_line:
            raise BatchInputError(
                f"{where}: records.jsonl line {number}: duplicate id {record.source_id!r} "
                f"(first on line {first_line[record.source_id]})"
            )
        first_line[record.source_id] = number
        records.append(record)
    return records


def planned_source(convention: Convention, manifest: Manifest) -> Convention:
    """The convention reading from the source its batch was planned from."""
    if manifest.source is None:
        return convention
    try:
        return convention.with_source(manifest.source.name, manifest.source.location)
    except ValueError as error:
        raise BatchInputError(
            f"batch {manifest.partition!r} of convention {convention.name!r} was planned from "
            f"a source that cannot be read now: {error}"
        ) from error


def fetch_raw_batch(
    convention: Convention, store: ArtifactStore, partition: str
) -> RawBatchSummary:
    """Run the ingester's fetch for the batch's manifest: records.jsonl plus files."""
    layout = BatchLayout(convention.name, partition)
    manifest = load_manifest(store, layout)
    # A re-fetch starts clean: files of a previous fetch must not leak into this one.
    store.delete_prefix(layout.raw)
    refs = [ref for ref in manifest.refs if source_id_error(ref.source_id) is None]
    ingester = planned_source(convention, manifest).make_ingester()
    with store.local_dir(layout.raw, writable=True) as out_dir:
        report = run_ingest(ingester, refs, out_dir)
        if len(refs) < len(manifest.refs):
            report.failed += [
                FailedRef(source_id=ref.source_id, error=f"not fetched: the source id {problem}")
                for ref in manifest.refs
                if (problem := source_id_error(ref.source_id)) is not None
            ]
            (out_dir / INGEST_REPORT_FILE).write_text(report.model_dump_json(indent=2) + "\n")
    records = read_raw_records(store, layout, convention)
    return RawBatchSummary(records=records, report=report)


def read_ingest_report(store: ArtifactStore, layout: BatchLayout) -> IngestReport:
    try:
        return parse_stored(IngestReport, store, layout.ingest_report)
    except UnreadableState as error:
        raise BatchInputError(
            f"batch {layout.partition!r} of convention {layout.convention!r}: the ingest report "
            f"at {error.where} cannot be read ({error.cause}); materialise its raw_batch again"
        ) from None
