"""A streaming reader of GEO SOFT files (series families, datasets, samples, platforms).

SOFT is line-oriented: ``^KIND = accession`` opens an entity, ``!Kind_key = value`` lines
are its attributes, ``#column = description`` lines describe its table, and the table sits
between ``!Kind_table_begin`` and ``!Kind_table_end``: a tab-separated header row, then one
row per line. GDS files open their dataset twice (attributes and subsets first, then the
table), which this reader folds into one entity.

Entities are yielded one at a time, and of a table only its header and row count are kept,
so memory does not grow with the file: a multi-gigabyte family file reads in a few MB.
Anything that breaks the syntax stops the read with a SoftFormatError naming the line; a
gzip stream is recognised by its magic bytes, whatever the file is called.
"""

from __future__ import annotations

import gzip
import io
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

_GZIP_MAGIC = b"\x1f\x8b"

DATABASE = "DATABASE"
SERIES = "SERIES"
PLATFORM = "PLATFORM"
SAMPLE = "SAMPLE"
DATASET = "DATASET"
SUBSET = "SUBSET"

SOFT_SUFFIXES = (".soft", ".soft.gz", ".txt", ".txt.gz")
"""Names of SOFT files: GEO serves series and datasets as .soft.gz, samples as text."""

ACCESSION_PREFIXES = {SERIES: "GSE", PLATFORM: "GPL", SAMPLE: "GSM", DATASET: "GDS"}
"""The accession prefix of each kind of entity that is a GEO record in its own right."""


class SoftFormatError(ValueError):
    """A file that is not well-formed SOFT; `line` is 1-based (None: before any line)."""

    def __init__(self, line: int | None, problem: str) -> None:
        super().__init__(f"line {line}: {problem}" if line else problem)
        self.line = line
        self.problem = problem


@dataclass
class SoftTable:
    begin_line: int
    columns: list[str] | None = None
    """The header row; None while (or if) no row follows the begin marker."""
    rows: int = 0
    """Data rows, the header row not counted."""
    end_line: int | None = None


@dataclass
class SoftEntity:
    kind: str
    """DATABASE, SERIES, PLATFORM, SAMPLE, DATASET or SUBSET (any other word is kept as is)."""
    accession: str
    line: int
    attributes: dict[str, list[str]] = field(default_factory=dict)
    """Attribute values by key in lower case, as written ("series_sample_id")."""
    column_descriptions: dict[str, str] = field(default_factory=dict)
    table: SoftTable | None = None

    @property
    def prefix(self) -> str:
        """The word that starts its attribute keys and table markers: "series", "dataset"."""
        return self.kind.lower()

    def values(self, name: str) -> list[str]:
        """Values of ``!<Kind>_<name>`` in file order ("sample_id" -> !Series_sample_id)."""
        return self.attributes.get(f"{self.prefix}_{name.lower()}", [])

    def value(self, name: str) -> str | None:
        """The first value of ``!<Kind>_<name>``, None when absent or empty."""
        found = [v for v in self.values(name) if v]
        return found[0] if found else None

    def values_starting(self, name_prefix: str) -> list[str]:
        """Values of every attribute whose name starts with `name_prefix` ("organism_ch")."""
        start = f"{self.prefix}_{name_prefix.lower()}"
        return [
            v for key, values in self.attributes.items() if key.startswith(start) for v in values
        ]


def is_accession(kind: str, text: str) -> bool:
    """Whether `text` is an accession of an entity of `kind`: "GSE781" for SERIES."""
    prefix = ACCESSION_PREFIXES.get(kind)
    if prefix is None or not text.startswith(prefix):
        return False
    number = text[len(prefix) :]
    return number.isascii() and number.isdigit()


@contextmanager
def open_soft(path: Path) -> Iterator[TextIO]:
    """The file as text, decompressed when it is gzip; bytes that are not UTF-8 are replaced
    (older GEO records carry Latin-1 text) rather than failing the read."""
    with path.open("rb") as raw:
        gzipped = raw.read(2) == _GZIP_MAGIC
        raw.seek(0)
        binary = gzip.GzipFile(fileobj=raw, mode="rb") if gzipped else raw
        with io.TextIOWrapper(binary, encoding="utf-8", errors="replace", newline="") as text:
            yield text


def read_entities(path: Path) -> Iterator[SoftEntity]:
    """The entities of a SOFT file in order; see parse_entities."""
    with open_soft(path) as stream:
        yield from parse_entities(stream)


def first_record_entity(path: Path, max_lines: int = 1000) -> tuple[str, str]:
    """(kind, accession) of the file's first entity that is not its DATABASE.

    Reads only the first lines: a record's own entity comes first in every GEO download.
    Raises SoftFormatError when none is found in `max_lines` lines.
    """
    with open_soft(path) as stream:
        try:
            for number, line in enumerate(stream, start=1):
                if number > max_lines:
                    break
                if line.startswith("^"):
                    word, accession = _assignment(line[1:], number)
                    if word.upper() != DATABASE:
                        return word.upper(), accession
        except (EOFError, OSError, zlib.error) as error:
            raise SoftFormatError(None, f"the gzip stream is damaged ({error})") from None
    raise SoftFormatError(
        None, f"no entity line (^SERIES, ^DATASET, ^SAMPLE ...) in the first {max_lines} lines"
    )


def parse_entities(lines: Iterable[str]) -> Iterator[SoftEntity]:
    """Entities of SOFT text, each yielded once complete; raises SoftFormatError on bad syntax.

    A damaged or truncated gzip stream surfaces here too, as a SoftFormatError that names
    the last line read: entities completed before it have been yielded already.
    """
    entity: SoftEntity | None = None
    held_datasets: dict[str, SoftEntity] = {}
    number = 0
    try:
        for number, raw in enumerate(lines, start=1):
            line = raw.rstrip("\r\n")
            if entity is not None and entity.table is not None and entity.table.end_line is None:
                _table_line(entity, entity.table, line, number)
                continue
            if not line.strip():
                continue
            marker = line[0]
            if marker == "^":
                kind, accession = _assignment(line[1:], number)
                kind = kind.upper()
                if not accession:
                    raise SoftFormatError(number, f"entity ^{kind} has no accession")
                if entity is not None and (entity.kind, entity.accession) == (kind, accession):
                    continue
                if entity is not None:
                    if entity.kind == DATASET and entity.table is None:
                        # A GDS file reopens its dataset for the table after the subsets:
                        # the dataset is yielded once that part is read.
                        held_datasets[entity.accession] = entity
                    else:
                        yield entity
                reopened = held_datasets.pop(accession, None) if kind == DATASET else None
                entity = reopened or SoftEntity(kind=kind, accession=accession, line=number)
            elif entity is None:
                raise SoftFormatError(
                    number, "the file does not start with an entity line (^SERIES = ..., etc.)"
                )
            elif marker == "!":
                _attribute_line(entity, line, number)
            elif marker == "#":
                name, description = _assignment(line[1:], number)
                entity.column_descriptions[name] = description
            else:
                raise SoftFormatError(
                    number,
                    f"a data row outside any table of {entity.accession} "
                    f"(no !{entity.kind.capitalize()}_table_begin before it)",
                )
    except (EOFError, OSError, zlib.error) as error:
        raise SoftFormatError(
            number or None,
            f"the gzip stream is damaged or truncated after this line ({error})",
        ) from None
    if entity is not None and entity.table is not None and entity.table.end_line is None:
        raise SoftFormatError(
            number,
            f"the file ends inside the table of {entity.accession} begun on line "
            f"{entity.table.begin_line} (no !{entity.kind.capitalize()}_table_end): "
            "it is truncated",
        )
    if entity is not None:
        yield entity
    yield from held_datasets.values()


def _assignment(text: str, number: int) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not equals:
        raise SoftFormatError(number, f"expected 'name = value', found {text[:80]!r}")
    return key.strip(), value.strip()


def _attribute_line(entity: SoftEntity, line: str, number: int) -> None:
    body = line[1:].strip()
    lowered = body.lower()
    if lowered.endswith(("_table_begin", "_table_end")) and "=" not in body:
        marker_kind, _, which = lowered.rpartition("_table_")
        if marker_kind != entity.prefix:
            raise SoftFormatError(
                number, f"!{body} inside {entity.kind.lower()} {entity.accession}"
            )
        if which == "end":
            raise SoftFormatError(number, f"!{body} without a table begun before it")
        if entity.table is not None:
            raise SoftFormatError(
                number,
                f"a second table in {entity.accession} (the first began on line "
                f"{entity.table.begin_line})",
            )
        entity.table = SoftTable(begin_line=number)
        return
    key, value = _assignment(body, number)
    entity.attributes.setdefault(key.lower(), []).append(value)


def _table_line(entity: SoftEntity, table: SoftTable, line: str, number: int) -> None:
    if line.startswith("!") and line[1:].strip().lower() == f"{entity.prefix}_table_end":
        table.end_line = number
        return
    if line.startswith("^"):
        raise SoftFormatError(
            number,
            f"a new entity begins inside the table of {entity.accession} begun on line "
            f"{table.begin_line}: its !{entity.kind.capitalize()}_table_end is missing",
        )
    if not line.strip():
        return
    if table.columns is None:
        table.columns = line.split("\t")
        return
    # Counting tabs rather than splitting: this runs once per row of every table.
    fields = line.count("\t") + 1
    if fields != len(table.columns):
        raise SoftFormatError(
            number,
            f"row {table.rows + 1} of the table of {entity.accession} has {fields} "
            f"fields, its header has {len(table.columns)}",
        )
    table.rows += 1
