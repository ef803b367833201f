"""What a GEO record says about itself, gathered from its SOFT entities as they stream by.

The record is the file's first entity that is not its DATABASE: the series of a family
file, the dataset of a GDS file, the sample of a GSM file, the platform of a GPL file.
Samples, platforms and organisms are also collected from the entities that follow it
(the platforms and samples of a family file), where GEO keeps them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date
from enum import StrEnum

from osa_dagster.conventions.geo.soft import (
    ACCESSION_PREFIXES,
    DATABASE,
    DATASET,
    PLATFORM,
    SAMPLE,
    SERIES,
    SUBSET,
    SoftEntity,
    is_accession,
)

_MONTHS = {
    name: number
    for number, name in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"),
        start=1,
    )
}


class RecordKind(StrEnum):
    SERIES = "series"
    DATASET = "dataset"
    SAMPLE = "sample"
    PLATFORM = "platform"


KIND_OF_ENTITY = {
    SERIES: RecordKind.SERIES,
    DATASET: RecordKind.DATASET,
    SAMPLE: RecordKind.SAMPLE,
    PLATFORM: RecordKind.PLATFORM,
}


def geo_date(text: str | None) -> date | None:
    """A GEO date ("Oct 24 2003", month names in English whatever the locale), or None."""
    if not text:
        return None
    parts = text.split()
    if len(parts) != 3 or parts[0][:3].lower() not in _MONTHS:
        return None
    try:
        return date(int(parts[2]), _MONTHS[parts[0][:3].lower()], int(parts[1]))
    except ValueError:
        return None


@dataclass
class GeoSummary:
    accession: str
    kind: RecordKind
    title: str | None
    samples: list[str]
    platforms: list[str]
    organisms: list[str]
    submission_date: date | None
    last_update_date: date | None
    geo_type: str | None
    """The record's !<Kind>_type: experiment type of a series or dataset, molecule of a sample."""
    pubmed_ids: list[str]
    table_rows: int
    """Data rows of every table in the file."""


@dataclass
class SummaryBuilder:
    """Feed it a file's entities in order with `add`, then read `summary()`."""

    record: SoftEntity | None = None
    samples: dict[str, None] = field(default_factory=dict)
    platforms: dict[str, None] = field(default_factory=dict)
    organisms: set[str] = field(default_factory=set)
    table_rows: int = 0

    def add(self, entity: SoftEntity) -> None:
        # The subsets of a dataset are read before the dataset's table, hence before it.
        if entity.kind in (DATABASE, SUBSET):
            return
        if self.record is None:
            self.record = entity
            self._add_record(entity)
        elif entity.kind == PLATFORM:
            self.platforms.setdefault(entity.accession, None)
        elif entity.kind == SAMPLE and self.record.kind in (SERIES, PLATFORM):
            self.samples.setdefault(entity.accession, None)
        self.organisms.update(
            v
            for name in ("organism", "platform_organism", "sample_organism")
            for v in entity.values_starting(name)
            if v
        )
        if entity.table is not None:
            self.table_rows += entity.table.rows

    def _add_record(self, record: SoftEntity) -> None:
        if record.kind == SERIES:
            samples, platforms = record.values("sample_id"), record.values("platform_id")
        elif record.kind == DATASET:
            # The sample columns of its table; the subsets list them too, but not always all.
            columns = record.table.columns if record.table and record.table.columns else []
            samples = [c for c in columns if is_accession(SAMPLE, c)]
            platforms = record.values("platform")
        elif record.kind == SAMPLE:
            samples, platforms = [record.accession], record.values("platform_id")
        elif record.kind == PLATFORM:
            samples, platforms = record.values("sample_id"), [record.accession]
        else:
            samples, platforms = [], []
        self.samples.update(dict.fromkeys(s for s in samples if s))
        self.platforms.update(dict.fromkeys(p for p in platforms if p))

    def summary(self) -> GeoSummary | None:
        """None when no record entity was seen (or its kind is not a GEO record)."""
        record = self.record
        if record is None or record.kind not in ACCESSION_PREFIXES:
            return None
        return GeoSummary(
            accession=record.accession,
            kind=KIND_OF_ENTITY[record.kind],
            title=record.value("title"),
            samples=list(self.samples),
            platforms=list(self.platforms),
            organisms=sorted(self.organisms),
            # GDS files carry no submission date, only the date of their last update.
            submission_date=geo_date(record.value("submission_date")),
            last_update_date=geo_date(
                record.value("last_update_date") or record.value("update_date")
            ),
            geo_type=record.value("type"),
            pubmed_ids=[p for p in record.values("pubmed_id") if p],
            table_rows=self.table_rows,
        )
