"""Hooks of the geo convention: validate_soft and extract_features.

Both read the record's SOFT file with the streaming reader of soft.py and apply the same
checks, so a damaged record is rejected with one message, whichever hook runs first.
Memory stays at a few MB over the interpreter whatever the size of the file (see
__init__.py for the measurements).

GEOparse was considered and not used: it does parse a local file without the network
(get_GEO(filepath=...)), but it holds every table of the file in pandas at once (~300 MB for
the 57 MB GSE781 family file, 5x the text, so several GB for GEO's largest series), and it
checks neither the declared row counts nor that a table is closed, so a file cut at a line
boundary passes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from osa_sdk.authoring import hook
from osa_sdk.types import HookRecord, Reject

from osa_dagster.conventions.geo.soft import (
    ACCESSION_PREFIXES,
    DATABASE,
    DATASET,
    PLATFORM,
    SAMPLE,
    SERIES,
    SOFT_SUFFIXES,
    SoftEntity,
    SoftFormatError,
    is_accession,
    read_entities,
)
from osa_dagster.conventions.geo.summary import GeoSummary, SummaryBuilder

_DECLARED_ROWS = {"data_row_count", "feature_count"}
"""How samples and platforms (data_row_count) and datasets (feature_count) declare rows."""
_LISTED = 5
"""How many missing accessions a rejection names before it only counts the rest."""


def soft_file(record: HookRecord) -> Path:
    """The record's one SOFT file."""
    found = [p for p in record.files() if p.name.lower().endswith(SOFT_SUFFIXES)]
    if not found:
        names = ", ".join(p.name for p in record.files()) or "none"
        raise Reject(
            f"the record has no SOFT file (.soft, .txt, gzipped or not); its files: {names}"
        )
    if len(found) > 1:
        raise Reject(
            "the record has several SOFT files, so it is unclear which one is the record: "
            + ", ".join(p.name for p in found)
        )
    return found[0]


def _listing(accessions: list[str]) -> str:
    shown = ", ".join(accessions[:_LISTED])
    more = len(accessions) - _LISTED
    return f"{shown} and {more} more" if more > 0 else shown


def _check_entity(name: str, entity: SoftEntity) -> None:
    where = f"{name}: ^{entity.kind} = {entity.accession} (line {entity.line})"
    if entity.kind in ACCESSION_PREFIXES and not is_accession(entity.kind, entity.accession):
        raise Reject(f"{where}: {entity.accession!r} is not an accession of a {entity.prefix}")
    for declared_by in _DECLARED_ROWS:
        declared = entity.value(declared_by)
        if declared is None:
            continue
        if not declared.isdigit():
            raise Reject(f"{where}: !{entity.kind.capitalize()}_{declared_by} is {declared!r}")
        if entity.table is not None and entity.table.rows != int(declared):
            raise Reject(
                f"{where}: its table has {entity.table.rows} rows but "
                f"!{entity.kind.capitalize()}_{declared_by} says {declared}: the table is "
                "damaged or cut short"
            )


def _check_record(name: str, summary: GeoSummary, record: SoftEntity, seen: dict[str, str]) -> None:
    if record.kind == SERIES and {PLATFORM, SAMPLE} & set(seen.values()):
        # A family file holds the series' platforms and samples after the series.
        missing = [a for a in [*summary.platforms, *summary.samples] if a not in seen]
        if missing:
            raise Reject(
                f"{name}: the series lists {len(missing)} platforms or samples that the family "
                f"file does not hold ({_listing(missing)}): it is incomplete"
            )
    if record.kind == DATASET:
        declared = record.value("sample_count")
        if declared is not None and declared.isdigit() and int(declared) != len(summary.samples):
            raise Reject(
                f"{name}: !dataset_sample_count says {declared} but its table has "
                f"{len(summary.samples)} sample columns"
            )


def read_checked(record: HookRecord) -> GeoSummary:
    """Read the record's SOFT file through, rejecting what is damaged or not this record."""
    path = soft_file(record)
    builder = SummaryBuilder()
    seen: dict[str, str] = {}
    try:
        for entity in read_entities(path):
            if entity.kind == DATABASE:
                continue
            if entity.accession in seen:
                raise Reject(f"{path.name}: ^{entity.kind} = {entity.accession} appears twice")
            seen[entity.accession] = entity.kind
            _check_entity(path.name, entity)
            builder.add(entity)
    except SoftFormatError as error:
        raise Reject(
            f"{path.name} cannot be read as GEO SOFT, the file is damaged, truncated or not "
            f"SOFT ({error})"
        ) from None
    summary = builder.summary()
    if summary is None or builder.record is None:
        raise Reject(f"{path.name} holds no GEO series, dataset, sample or platform")
    if summary.accession != record.id:
        raise Reject(f"{path.name} is the record of {summary.accession}, not of {record.id}")
    _check_record(path.name, summary, builder.record, seen)
    return summary


@hook
def validate_soft(record: HookRecord) -> None:
    """Pass records whose SOFT file is whole, well-formed, and agrees with its own counts."""
    read_checked(record)


@hook
def extract_features(record: HookRecord) -> dict[str, Any]:
    """One feature row per record: what it is, its samples, platforms, organisms and dates."""
    summary = read_checked(record)
    return {
        "accession": summary.accession,
        "kind": summary.kind.value,
        "title": summary.title,
        "geo_type": summary.geo_type,
        "sample_count": len(summary.samples),
        "samples": summary.samples,
        "platforms": summary.platforms,
        "organisms": summary.organisms,
        "submission_date": summary.submission_date.isoformat() if summary.submission_date else None,
        "last_update_date": (
            summary.last_update_date.isoformat() if summary.last_update_date else None
        ),
        "pubmed_ids": summary.pubmed_ids,
        "table_rows": summary.table_rows,
    }
