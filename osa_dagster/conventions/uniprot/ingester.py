"""Ingest UniProtKB entries from local flat files (``uniprot_sprot.dat``, optionally gzipped).

A release's flat file holds one entry after the other, each from its ``ID`` line to its
``//`` line. The file is streamed entry by entry, never loaded whole: a full Swiss-Prot
release is ~3 GB of text. The project bundles 100 real entries (data/, see
data/SOURCES.md); point `path` at a release's file to ingest all of it, or at a folder of
flat files (Swiss-Prot and TrEMBL, a lab's own entries) to ingest them all.

Every record gets its entry's text as ``<accession>.dat``, the same file the REST
ingester (rest.py) writes, so both share the hooks.
"""

from __future__ import annotations

import gzip
import io
import logging
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import BinaryIO

from Bio import SwissProt
from osa_sdk.authoring import FetchContext, Ingester, ingester
from osa_sdk.contract import bytes_to_mb
from osa_sdk.types import IngesterRecord, RecordRef
from pydantic import BaseModel, ConfigDict

from osa_dagster.conventions.local_files import file_of_ref

log = logging.getLogger(__name__)

DEFAULT_FLAT_FILE = Path(__file__).resolve().parent / "data" / "SWISS100.dat.gz"

ENTRY_FILE_SUFFIX = ".dat"
"""Each record's entry text is the file ``<accession>.dat``."""

# The lines of an entry's header: what discover reads to name an entry and date it.
_HEADER_LINE_CODES = (b"ID", b"AC", b"DT")
# ... and what fetch reads for its metadata. Parsing only these lines costs a small fraction
# of a whole entry's parse (its references and feature table are most of it), which the
# hooks do anyway.
_METADATA_LINE_CODES = (*_HEADER_LINE_CODES, b"OS", b"OX")
_ENTRY_START = b"ID   "
_ENTRY_END = b"//"
_REFERENCES = b"\nRN   "

_GZIP_BUFFER = 1 << 20
_SCAN_BLOCK = 1 << 22

# RecordRef.extra keys: where discover found the entry, so that fetch reads it directly.
_OFFSET = "offset"
_LENGTH = "length"
_FILE = "file"
"""The entry's file relative to the folder, when `path` is a folder."""

FLAT_FILE_SUFFIXES = (".dat", ".dat.gz", ".txt", ".txt.gz")
"""The files of a folder that are read as flat files: release files and REST downloads."""


class UniProtEntryMetadata(BaseModel):
    """What fetch records about an entry; None where the entry does not say (or is damaged)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    accession: str
    """The entry's primary accession: the record's source_id, unless upstream merged the
    entry into another between discover and fetch (the hooks then reject the record)."""
    entry_name: str | None
    reviewed: bool | None
    """True for Swiss-Prot (reviewed), False for TrEMBL (unreviewed)."""
    organism: str | None
    taxonomy_id: int | None
    sequence_length: int | None
    """The length the ID line declares (the hooks compare it with the sequence)."""
    entry_version: int | None
    modified: date | None
    """Date of the entry's latest annotation change (its "entry version" DT line)."""
    release: str | None
    """The UniProt release the entry comes from ("2024_01"), when known."""
    source: str
    """Where the entry was read: "flatfile:<file name>" or the REST URL."""


class EntryParseError(ValueError):
    """An entry's text that Biopython's Swiss-Prot parser cannot read."""


@dataclass(frozen=True)
class RawEntry:
    """One entry's bytes as they stand in the flat file, and where."""

    text: bytes
    offset: int
    """Byte offset of its ID line in the (uncompressed) file."""
    line_number: int
    """1-based line number of its first line, for messages."""


def open_flat_file(path: Path) -> BinaryIO:
    """The flat file as a binary stream, decompressed when its name ends in .gz."""
    if path.name.endswith(".gz"):
        # GzipFile's own readline is a Python method per line; a large buffer in front of it
        # makes line iteration twice as fast.
        return io.BufferedReader(gzip.open(path, "rb"), buffer_size=_GZIP_BUFFER)
    return path.open("rb")


def flat_files(path: Path) -> list[Path]:
    """`path` if it is a file, else the flat files of the folder `path` by name (hidden
    ones, partial downloads and rsync temporaries, left out)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"UniProt flat file {path} does not exist")
    return sorted(
        child
        for child in path.iterdir()
        if not child.name.startswith(".")
        and child.name.lower().endswith(FLAT_FILE_SUFFIXES)
        and child.is_file()
    )


def iter_entries(stream: BinaryIO, where: str) -> Iterator[RawEntry]:
    """Entries of a flat file, one at a time: from an ``ID`` line to its ``//`` line.

    An entry cut short (no ``//`` before the next ``ID`` line or the end of the file) is
    yielded as it stands, so that the hooks reject it visibly instead of it vanishing.
    Lines outside any entry other than blank ones are logged and skipped. Lines end at
    ``\n``, as a binary file's lines do.
    """
    return _EntryScanner(stream, where).entries()


class _EntryScanner:
    """iter_entries over blocks of the stream: an entry's inner lines are skipped by
    substring searches, not looked at one by one (a release has ~200 million lines)."""

    def __init__(self, stream: BinaryIO, where: str) -> None:
        self.stream = stream
        self.where = where
        self.buffer = b""
        self.base = 0  # file offset of buffer[0]
        self.eof = False
        # Line numbers: the line at buffer[counted_to] is line number `line_at_counted`.
        self.counted_to = 0
        self.line_at_counted = 1

    def line_number(self, index: int) -> int:
        self.line_at_counted += self.buffer.count(b"\n", self.counted_to, index)
        self.counted_to = index
        return self.line_at_counted

    def refill(self, keep_from: int) -> int:
        """Drop the buffer before `keep_from`, read a block; returns how far indexes moved
        (0 at the end of the file, which sets `eof`)."""
        block = self.stream.read(_SCAN_BLOCK)
        if not block:
            self.eof = True
            return 0
        self.line_number(keep_from)
        self.buffer = self.buffer[keep_from:] + block
        self.base += keep_from
        self.counted_to = 0
        return keep_from

    def line_end(self, start: int) -> int | None:
        """The index after the line starting at `start` (its \n included); None when the
        line goes on past what was read."""
        newline = self.buffer.find(b"\n", start)
        if newline != -1:
            return newline + 1
        return len(self.buffer) if self.eof else None

    def entries(self) -> Iterator[RawEntry]:
        pos = 0  # the next line to look at starts here
        while True:
            end = self.line_end(pos)
            if end is None:
                pos -= self.refill(pos)
                continue
            if pos == end:
                return
            if self.buffer.startswith(_ENTRY_START, pos):
                entry, pos = self._entry(pos)
                yield entry
                continue
            if self.buffer[pos:end].strip():
                log.warning(
                    "%s line %d: skipping a line outside any entry",
                    self.where,
                    self.line_number(pos),
                )
            pos = end

    def _entry(self, start: int) -> tuple[RawEntry, int]:
        """The entry whose ID line starts at `start`, and where the line after it starts (in
        the buffer as it is on return: reading more moves it)."""
        search = start  # every later line starts after a \n found from here
        while True:
            resume = None  # where to search again after reading more
            next_entry = self.buffer.find(b"\n" + _ENTRY_START, search)
            end_line = self.buffer.find(b"\n" + _ENTRY_END, search)
            while end_line != -1 and (next_entry == -1 or end_line < next_entry):
                line_start = end_line + 1
                line_end = self.line_end(line_start)
                if line_end is None:
                    resume = end_line  # the line goes on past the buffer
                    break
                if self.buffer[line_start:line_end].rstrip() == _ENTRY_END:
                    return self._cut(start, line_end), line_end
                end_line = self.buffer.find(b"\n" + _ENTRY_END, line_start)
            else:
                if next_entry != -1:
                    log.warning(
                        "%s line %d: entry has no '//' line", self.where, self.line_number(start)
                    )
                    return self._cut(start, next_entry + 1), next_entry + 1
                if self.eof:
                    log.warning(
                        "%s line %d: the file ends inside an entry",
                        self.where,
                        self.line_number(start),
                    )
                    return self._cut(start, len(self.buffer)), len(self.buffer)
            # Undecided within the buffer: read on, and search again only from near its old
            # end (a separator may straddle it), or from the line that went past it.
            old_end = len(self.buffer)
            moved = self.refill(start)
            start -= moved
            near_end = max(start, old_end - moved - len(_ENTRY_START) - 1)
            search = near_end if resume is None else min(resume - moved, near_end)

    def _cut(self, start: int, end: int) -> RawEntry:
        return RawEntry(self.buffer[start:end], self.base + start, self.line_number(start))


def is_one_entry(text: bytes) -> bool:
    """Whether `text` is one entry as iter_entries cuts them: its ID line, then lines that
    neither start another entry nor end this one before the last."""
    # Substring searches over the whole entry rather than a loop over its lines: fetch checks
    # every entry it reads. Lines end as bytes.splitlines ends them (\n, \r, \r\n).
    if not text.startswith(_ENTRY_START) or any(
        line_end + _ENTRY_START in text for line_end in _LINE_ENDS
    ):
        return False
    for line_end in _LINE_ENDS:
        at = text.find(line_end + _ENTRY_END)
        while at != -1:
            if _END_LINE_BEFORE_ANOTHER.match(text, at + 1):
                return False
            at = text.find(line_end + _ENTRY_END, at + 1)
    return True


_LINE_ENDS = (b"\n", b"\r")
# An end line ("//" and trailing whitespace) with a line after it.
_END_LINE_BEFORE_ANOTHER = re.compile(rb"//[ \t\x0b\x0c]*(?:\r\n|\r(?!\n)|\n)[\s\S]")


def parse_entry(text: bytes) -> SwissProt.Record:
    """The entry parsed by Biopython; EntryParseError says why it cannot be."""
    try:
        return SwissProt.read(io.StringIO(text.decode("ascii", errors="replace")))
    except (ValueError, AssertionError) as error:
        # Biopython's SwissProtParserError carries the offending line.
        line = getattr(error, "line", None)
        at = f" at line {line.rstrip()!r}" if line else ""
        raise EntryParseError(f"{error or type(error).__name__}{at}") from None


def parse_entry_header(
    text: bytes, line_codes: tuple[bytes, ...] = _HEADER_LINE_CODES
) -> SwissProt.Record:
    """Only the ID, AC and DT lines of an entry (or those of `line_codes`), parsed by
    Biopython.

    Enough to name and date the entry, at a fraction of the cost of a whole parse.
    """
    # The format puts these lines before the references: look there first, and through the
    # whole entry only if one of them is not there.
    references = text.find(_REFERENCES)
    header = _lines_of(text if references == -1 else text[: references + 1], line_codes)
    if references != -1 and {line[:2] for line in header} != set(line_codes):
        header = _lines_of(text, line_codes)
    parsed = parse_entry(b"".join(header) + _ENTRY_END + b"\n")
    if not parsed.accessions:
        raise EntryParseError("the entry has no AC (accession) line")
    return parsed


def _lines_of(text: bytes, line_codes: tuple[bytes, ...]) -> list[bytes]:
    return [
        line
        for line in text.splitlines(keepends=True)
        if line[:2] in line_codes and line[2:5] == b"   "
    ]


def _date(text: str | None) -> date | None:
    """A flat-file date ("09-JUL-2014"); None when missing or not a date."""
    if not text:
        return None
    try:
        return datetime.strptime(text, "%d-%b-%Y").date()
    except ValueError:
        log.warning("ignoring a date that is not DD-MON-YYYY: %r", text)
        return None


def organism_name(parsed: SwissProt.Record) -> str | None:
    """The OS line without its final full stop: "Homo sapiens (Human)"."""
    # Biopython gathers the OS lines in a list, then joins them into this string.
    return parsed.organism.rstrip(".") or None  # type: ignore[attr-defined]


def taxonomy_id(parsed: SwissProt.Record) -> int | None:
    """The NCBI taxonomy id of the OX line; None when there is none or it is not a number."""
    ids = parsed.taxonomy_id
    if not ids or not ids[0].strip().isdigit():
        return None
    return int(ids[0])


def modified_date(parsed: SwissProt.Record) -> date | None:
    return _date(parsed.annotation_update[0]) if parsed.annotation_update else None


def entry_metadata(text: bytes, *, release: str | None, source: str) -> UniProtEntryMetadata:
    """Metadata of an entry's text, from its header lines (_METADATA_LINE_CODES) alone: the
    hooks parse the whole entry and reject it if it is damaged. Where the OS or OX lines
    cannot be read, the organism is left out.

    Raises EntryParseError only when not even the header (ID, AC, DT lines) can be read.
    """
    try:
        parsed = parse_entry_header(text, _METADATA_LINE_CODES)
        described = True
    except EntryParseError as error:
        log.warning("%s: the entry's OS or OX lines cannot be parsed (%s)", source, error)
        parsed = parse_entry_header(text)
        described = False
    return UniProtEntryMetadata(
        accession=parsed.accessions[0],
        entry_name=parsed.entry_name or None,
        reviewed={"Reviewed": True, "Unreviewed": False}.get(parsed.data_class or ""),
        organism=organism_name(parsed) if described else None,
        taxonomy_id=taxonomy_id(parsed) if described else None,
        sequence_length=parsed.sequence_length,
        entry_version=parsed.annotation_update[1] if parsed.annotation_update else None,
        modified=modified_date(parsed),
        release=release,
        source=source,
    )


@ingester(name="uniprot_flat_file", max_file_mb=20)
class UniProtFlatFileIngester(Ingester):
    """Entries of local UniProtKB flat files; `source_id` is the primary accession ("P31946").

    `path` is one flat file or a folder of them (FLAT_FILE_SUFFIXES), read in name order.
    An entry whose accession an earlier entry already had, an entry whose header cannot be
    read and a file that cannot be read are skipped with their reasons; the rest is planned.

    `discover(since=...)` selects entries by the date of their latest annotation change
    (the "entry version" DT line), at day granularity: an entry changed on the day of
    `since` is included, as re-ingesting it is harmless and missing it is not.

    discover notes where each entry starts and how long it is in its ref, so fetch reads
    exactly those bytes. In an uncompressed file that is a seek; in a gzipped one, fetch
    decompresses the file up to the batch's entries, which is fine for samples but makes a
    full release cost quadratic time: decompress a release's file once before ingesting it.

    max_file_mb=20: the largest entries (titin, ~35,000 residues) are around 1 MB of text.
    """

    def __init__(self, path: str | Path = DEFAULT_FLAT_FILE, release: str | None = None) -> None:
        super().__init__(path=str(path), release=release)
        self.path = Path(path)
        self.release = release
        if not self.path.exists():
            raise FileNotFoundError(f"UniProt flat file {self.path} does not exist")

    def _where(self, file: Path) -> str:
        return file.name if file == self.path else file.relative_to(self.path).as_posix()

    def discover(self, since: datetime | None, limit: int | None) -> Iterator[RecordRef]:
        """Entries in file order changed on or after the day of `since` (naive means UTC)."""
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be a number of records >= 0, not {limit}")
        if since is not None and since.tzinfo is None:
            since = since.replace(tzinfo=UTC)
        since_day = since.astimezone(UTC).date() if since is not None else None
        first_seen: dict[str, str] = {}
        found = 0
        for file in flat_files(self.path):
            where = self._where(file)
            try:
                with open_flat_file(file) as stream:
                    for entry in iter_entries(stream, str(file)):
                        if limit is not None and found >= limit:
                            return
                        at = f"{where} line {entry.line_number}"
                        try:
                            header = parse_entry_header(entry.text)
                        except EntryParseError as error:
                            # Without an accession the entry cannot be a record.
                            self.skip(at, f"the entry's header cannot be read: {error}")
                            continue
                        accession = header.accessions[0]
                        if accession in first_seen:
                            self.skip(at, f"entry {accession} repeats {first_seen[accession]}")
                            continue
                        first_seen[accession] = at
                        modified = modified_date(header)
                        if since_day is not None and modified is not None and modified < since_day:
                            continue
                        found += 1
                        located = {_OFFSET: entry.offset, _LENGTH: len(entry.text)}
                        yield RecordRef(
                            source_id=accession,
                            size_hint_mb=bytes_to_mb(len(entry.text)),
                            version=modified.isoformat() if modified else None,
                            extra=located if file == self.path else {**located, _FILE: where},
                        )
            except (OSError, EOFError, zlib.error) as error:
                self.skip(where, f"cannot be read past what was planned from it: {error}")

    def fetch(self, refs: Sequence[RecordRef], ctx: FetchContext) -> Iterator[IngesterRecord]:
        """Write each entry's text as ``<accession>.dat`` and its metadata."""
        located: dict[Path, list[tuple[int, int, str]]] = {}
        root = self.path.resolve()
        for ref in refs:
            offset, length = ref.extra.get(_OFFSET), ref.extra.get(_LENGTH)
            relative = ref.extra.get(_FILE)
            if not isinstance(offset, int) or not isinstance(length, int):
                ctx.fail(
                    ref.source_id,
                    f"ref {ref.source_id} does not say where its entry is in {self.path.name} "
                    f"(extra.{_OFFSET}, extra.{_LENGTH}): plan it with this ingester's discover",
                )
                continue
            if relative is None and self.path.is_file():
                file = self.path
            else:
                try:
                    file = file_of_ref(root, ref, _FILE)
                except ValueError as error:
                    ctx.fail(ref.source_id, str(error))
                    continue
            located.setdefault(file, []).append((offset, length, ref.source_id))
        for file, entries in sorted(located.items()):
            yield from self._fetch_from(file, sorted(entries), ctx)

    def _fetch_from(
        self, file: Path, entries: list[tuple[int, int, str]], ctx: FetchContext
    ) -> Iterator[IngesterRecord]:
        """The entries of one file, in offset order, so a gzipped file is decompressed once,
        forward."""
        source = f"flatfile:{file.name}"
        with open_flat_file(file) as stream:
            for offset, length, accession in entries:
                stream.seek(offset)
                text = stream.read(length)
                changed = f"the file changed since this batch was planned ({file}, offset {offset})"
                if len(text) != length or not is_one_entry(text):
                    ctx.fail(accession, f"entry {accession} is not where it was: {changed}")
                    continue
                try:
                    metadata = entry_metadata(text, release=self.release, source=source)
                except EntryParseError as error:
                    ctx.fail(
                        accession, f"no entry header where {accession} was ({error}): {changed}"
                    )
                    continue
                if metadata.accession != accession:
                    ctx.fail(
                        accession,
                        f"entry {metadata.accession} stands where {accession} was: {changed}",
                    )
                    continue
                file_ref = ctx.add_bytes(accession, accession + ENTRY_FILE_SUFFIX, text)
                yield IngesterRecord(
                    source_id=accession,
                    metadata=metadata.model_dump(mode="json"),
                    files=[file_ref],
                )
