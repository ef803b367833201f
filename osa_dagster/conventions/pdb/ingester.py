"""Ingest PDB entries from a local mirror in the wwPDB divided layout, or a flat folder.

A mirror holds ``mmCIF/<middle two characters of the id>/<id>.cif.gz``, as
``rsync rsync.wwpdb.org::ftp_data/structures/divided/mmCIF/`` leaves it. The project
bundles a small one (mirror/, see mirror/SOURCES.md); point `mirror` at a full copy to
ingest the whole archive. A folder without ``mmCIF/`` is read as a flat folder of
``.cif`` and ``.cif.gz`` files, each entry named by its ``data_`` line, whatever its file
is called (a lab's own structures, files a program wrote).

A mirror may also hold wwPDB's list of obsolete entries, ``obsolete.dat`` at its root, as
``rsync rsync.wwpdb.org::ftp_data/status/obsolete.dat`` leaves it: discover lists each
obsolete entry as such, with its successors, and planning withdraws it.
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, date, datetime
from itertools import islice
from pathlib import Path
from typing import IO

import gemmi
from osa_sdk.authoring import FetchContext, Ingester, ingester
from osa_sdk.contract import bytes_to_mb
from osa_sdk.types import IngesterRecord, Obsolete, RecordRef
from pydantic import BaseModel, ConfigDict

from osa_dagster.conventions.local_files import file_of_ref

log = logging.getLogger(__name__)

DEFAULT_MIRROR = Path(__file__).resolve().parent / "mirror"

# Classic 4-character PDB ids: a digit, then three letters or digits.
_ENTRY_FILE = re.compile(r"([0-9][a-z0-9]{3})\.cif\.gz")
_PDB_ID = re.compile(r"[0-9][A-Za-z0-9]{3}")
_FLAT_SUFFIXES = (".cif", ".cif.gz")
# How far into a file its data_ line may be: comments may precede it, coordinates not.
_DATA_LINE_WITHIN = 64
# RecordRef.extra key: an entry's file in a flat folder, relative to it.
_PATH = "path"
# wwPDB's list of obsolete entries, in the mirror's root folder.
OBSOLETE_LIST = "obsolete.dat"
_OBSOLETE_LINE = "OBSLTE"

# The header categories that fetch copies into a record's metadata.
_HEADER_CATEGORIES = frozenset(
    {
        "_struct",
        "_exptl",
        "_pdbx_database_status",
        "_pdbx_audit_revision_history",
        # The revision history of files converted from the PDB format (REVDAT records),
        # and of mmCIF files written before _pdbx_audit_revision_history existed.
        "_database_pdb_rev",
    }
)


class PdbEntryMetadata(BaseModel):
    """What fetch records about an entry; None where the file does not say (or is damaged)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pdb_id: str
    title: str | None
    methods: list[str]
    deposition_date: date | None
    revision_date: date | None
    """The latest revision of the entry, from its revision history."""
    source_path: str
    """The entry's file, relative to the mirror root or to the download URL's folder."""
    source_modified_at: datetime
    """When the file changed at its source: the mirror file's mtime (what a mirror's
    `discover(since=...)` compares), or the download's Last-Modified."""


def entry_path(mirror: Path, pdb_id: str) -> Path:
    """Where the divided layout keeps entry `pdb_id` (any case)."""
    lower = pdb_id.lower()
    return mirror / "mmCIF" / lower[1:3] / f"{lower}.cif.gz"


def mirror_entries(mirror: Path) -> list[tuple[str, Path]]:
    """(PDB id in upper case, file) of every entry of the mirror, sorted by id.

    Files that are not named like an entry, or sit in the wrong folder, are not entries:
    rsync leaves temporary files (".1abc.cif.gz.XXXXXX") beside the ones it writes.
    """
    root = mirror / "mmCIF"
    if not root.is_dir():
        raise FileNotFoundError(
            f"{root} does not exist: {mirror} is not a PDB mirror in the wwPDB divided "
            "layout (mmCIF/<middle two characters of the id>/<id>.cif.gz)"
        )
    entries = []
    with os.scandir(root) as folders:
        for folder in folders:
            if not folder.is_dir():
                continue
            with os.scandir(folder.path) as files:
                for file in files:
                    match = _ENTRY_FILE.fullmatch(file.name)
                    if match and match[1][1:3] == folder.name and file.is_file():
                        entries.append((match[1].upper(), Path(file.path)))
    return sorted(entries)


class ObsoleteEntry(BaseModel):
    """A line of wwPDB's obsolete.dat: ``OBSLTE  31-JUL-94 116L     216L``."""

    model_config = ConfigDict(frozen=True)

    pdb_id: str
    obsoleted_on: date
    superseded_by: tuple[str, ...]


def obsolete_entries(path: Path) -> dict[str, ObsoleteEntry]:
    """The entries of an obsolete.dat by PDB id (upper case). Lines that are not OBSLTE
    records (its title) are passed over; an OBSLTE line that cannot be read is an error
    naming the file and line, since an entry missed would stay published."""
    entries: dict[str, ObsoleteEntry] = {}
    with path.open(encoding="ascii", errors="replace") as lines:
        for number, line in enumerate(lines, 1):
            fields = line.split()
            if not fields or fields[0] != _OBSOLETE_LINE:
                continue
            try:
                day = datetime.strptime(fields[1], "%d-%b-%y").date()
                pdb_id = fields[2]
            except (IndexError, ValueError):
                raise ValueError(
                    f"{path}, line {number}: not an OBSLTE record "
                    f"(OBSLTE DD-MON-YY ID [SUCCESSOR ...]): {line.strip()!r}"
                ) from None
            ids = [pdb_id, *fields[3:]]
            if bad := [i for i in ids if not _PDB_ID.fullmatch(i)]:
                raise ValueError(f"{path}, line {number}: {bad[0]!r} is not a PDB id")
            entries[pdb_id.upper()] = ObsoleteEntry(
                pdb_id=pdb_id.upper(),
                obsoleted_on=day,
                superseded_by=tuple(i.upper() for i in fields[3:]),
            )
    return entries


def flat_files(folder: Path) -> list[Path]:
    """The .cif and .cif.gz files of a flat folder, by name; hidden ones (partial
    downloads, rsync temporaries) left out."""
    return sorted(
        Path(entry.path)
        for entry in os.scandir(folder)
        if not entry.name.startswith(".")
        and entry.name.lower().endswith(_FLAT_SUFFIXES)
        and entry.is_file()
    )


def open_cif(path: Path) -> IO[str]:
    """An mmCIF file as text, decompressed when its name ends in .gz."""
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return path.open(encoding="utf-8", errors="replace")


def data_block_name(path: Path) -> str:
    """The name on the file's data_ line ("1UBI" for data_1UBI): the entry it holds."""
    with open_cif(path) as stream:
        for line in islice(stream, _DATA_LINE_WITHIN):
            if line.startswith("data_"):
                return line[len("data_") :].strip()
            if line.strip() and not line.startswith("#"):
                break
    raise ValueError(f"no data_ line before line {_DATA_LINE_WITHIN}: not an mmCIF file")


def header_lines(lines: Iterable[str]) -> Iterator[str]:
    """The lines of `lines` (an mmCIF file) that belong to _HEADER_CATEGORIES."""
    keep = False
    in_text_field = False
    after_loop = False
    in_block = False
    for line in lines:
        # Lines between ';' delimiters are a text value, whatever they begin with.
        if in_text_field or line.startswith(";"):
            if line.startswith(";"):
                in_text_field = not in_text_field
            if keep:
                yield line
        elif line.startswith("loop_"):
            after_loop, keep = True, False
        elif line.startswith("_"):
            # Every tag of a loop names the same category, so the first one decides.
            keep = line.split(".", 1)[0].lower() in _HEADER_CATEGORIES
            if keep and after_loop:
                yield "loop_\n"
            after_loop = False
            if keep:
                yield line
        elif line.startswith("data_"):
            if in_block:
                return  # wwPDB files hold one block; anything after it is not this entry
            in_block = True
        elif keep and not line.startswith("#"):
            yield line


def read_header(path: Path) -> gemmi.cif.Block | None:
    """The entry's header categories (_HEADER_CATEGORIES), read by streaming the file.

    Only the lines of those categories are kept, so memory stays small even for a 240 MB
    entry; the revision history sits after the coordinates, hence the whole file is read.
    A damaged gzip stream ends the read early and keeps what came before it. None when
    the kept lines are not valid CIF.
    """
    kept = ["data_header\n"]
    with open_cif(path) as stream:
        try:
            for line in header_lines(stream):
                kept.append(line)
        except (EOFError, gzip.BadGzipFile, zlib.error) as error:
            log.warning("%s: read stopped early (%s); its metadata may be incomplete", path, error)
    try:
        return gemmi.cif.read_string("".join(kept)).sole_block()
    except (RuntimeError, ValueError) as error:
        log.warning("%s: header categories are not valid CIF (%s)", path, error)
        return None


def _values(block: gemmi.cif.Block | None, tag: str) -> list[str]:
    if block is None:
        return []
    return [gemmi.cif.as_string(v) for v in block.find_values(tag) if not gemmi.cif.is_null(v)]


def _dates(texts: Iterable[str]) -> list[date]:
    dates = []
    for text in texts:
        try:
            dates.append(date.fromisoformat(text))
        except ValueError:
            log.warning("ignoring a date that is not YYYY-MM-DD: %r", text)
    return dates


def entry_metadata(mirror: Path, path: Path, pdb_id: str) -> PdbEntryMetadata:
    header = read_header(path)
    titles = _values(header, "_struct.title")
    revisions = _values(header, "_pdbx_audit_revision_history.revision_date") or _values(
        header, "_database_PDB_rev.date"
    )
    # Files from before _pdbx_database_status had a deposition date keep it as the original
    # date of their revisions.
    deposited = _values(header, "_pdbx_database_status.recvd_initial_deposition_date") or _values(
        header, "_database_PDB_rev.date_original"
    )
    return PdbEntryMetadata(
        pdb_id=pdb_id,
        title=titles[0] if titles else None,
        methods=_values(header, "_exptl.method"),
        deposition_date=min(_dates(deposited), default=None),
        revision_date=max(_dates(revisions), default=None),
        source_path=path.relative_to(mirror).as_posix(),
        source_modified_at=datetime.fromtimestamp(path.stat().st_mtime, UTC),
    )


@ingester(name="pdb_mirror", max_file_mb=100)
class PdbMirrorIngester(Ingester):
    """Entries of a local PDB mirror or flat folder; `source_id` is the PDB id in upper case
    ("1UBI").

    `discover(since=...)` selects entries by the modification time of their file. Mirrors
    are kept with ``rsync -t``, which gives each file the time of its upstream copy, and
    the wwPDB rewrites an entry's file whenever it releases or revises it: a newer mtime
    is exactly "released or changed upstream since". It costs one stat per entry, whereas
    the revision dates inside the files sit after the coordinates and would mean
    decompressing the whole archive (~80 GB for 200,000 entries) on every discover.
    The revision date is read at fetch time instead and kept in the metadata.

    In a flat folder, discover also reads each file's first lines for its entry's id: a
    file without a PDB id there, one that cannot be read, or a second file of an entry
    already found is skipped with its reason, and the plan goes on.

    max_file_mb=100 (compressed) admits every entry of today's archive (the largest,
    3j3q, is ~240 MB uncompressed, far less gzipped) and refuses files no real entry
    reaches.
    """

    def __init__(self, mirror: str | Path = DEFAULT_MIRROR) -> None:
        super().__init__(mirror=str(mirror))
        self.mirror = Path(mirror)
        if not self.mirror.is_dir():
            raise ValueError(
                f"{self.mirror} is not a folder: a PDB mirror in the wwPDB divided layout "
                "(mmCIF/<middle two characters of the id>/<id>.cif.gz) or a flat folder of "
                ".cif/.cif.gz files"
            )
        self.divided = (self.mirror / "mmCIF").is_dir()

    def discover(self, since: datetime | None, limit: int | None) -> Iterator[RecordRef]:
        """Entries in id order (file name order in a flat folder) whose file changed after
        `since` (naive means UTC)."""
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be a number of records >= 0, not {limit}")
        if since is not None and since.tzinfo is None:
            since = since.replace(tzinfo=UTC)
        found = 0
        obsolete = self._obsolete()
        for pdb_id, path in self._entries(since):
            if limit is not None and found >= limit:
                return
            if pdb_id in obsolete:
                continue  # listed below as obsolete, which upstream says it is
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue  # removed by a running rsync since it was listed
            if since is not None and datetime.fromtimestamp(stat.st_mtime, UTC) <= since:
                continue
            found += 1
            yield RecordRef(
                source_id=pdb_id,
                size_hint_mb=bytes_to_mb(stat.st_size),
                version=f"{stat.st_mtime_ns}:{stat.st_size}",
                extra={} if self.divided else {_PATH: path.relative_to(self.mirror).as_posix()},
            )
        for entry in obsolete.values():
            if limit is not None and found >= limit:
                return
            # The list is dated by day: a watch sees again what was declared obsolete on the
            # day it last looked, which withdraws nothing twice.
            if since is not None and entry.obsoleted_on < since.date():
                continue
            found += 1
            yield RecordRef(
                source_id=entry.pdb_id, obsolete=Obsolete(superseded_by=entry.superseded_by)
            )

    def _obsolete(self) -> dict[str, ObsoleteEntry]:
        """The mirror's obsolete entries, by id in id order; none without an obsolete.dat."""
        path = self.mirror / OBSOLETE_LIST
        try:
            return dict(sorted(obsolete_entries(path).items()))
        except FileNotFoundError:
            return {}

    def _entries(self, since: datetime | None) -> Iterator[tuple[str, Path]]:
        if self.divided:
            yield from mirror_entries(self.mirror)
            return
        first_file: dict[str, Path] = {}
        for path in flat_files(self.mirror):
            where = path.relative_to(self.mirror).as_posix()
            try:
                if since is not None and datetime.fromtimestamp(path.stat().st_mtime, UTC) <= since:
                    continue  # unchanged: not worth opening
                name = data_block_name(path)
            except FileNotFoundError:
                continue
            except (OSError, EOFError, zlib.error, ValueError) as error:
                self.skip(where, f"cannot be read as mmCIF: {error}")
                continue
            if not _PDB_ID.fullmatch(name):
                self.skip(where, f"its data_ line names {name!r}, which is not a PDB id")
                continue
            pdb_id = name.upper()
            if pdb_id in first_file:
                self.skip(where, f"entry {pdb_id} repeats {first_file[pdb_id].name}, kept instead")
                continue
            first_file[pdb_id] = path
            yield pdb_id, path

    def fetch(self, refs: Sequence[RecordRef], ctx: FetchContext) -> Iterator[IngesterRecord]:
        """Copy each entry's file into the batch and record its header as metadata."""
        root = self.mirror.resolve()
        for ref in refs:
            pdb_id = ref.source_id
            if not _PDB_ID.fullmatch(pdb_id):
                ctx.fail(pdb_id, f"{pdb_id!r} is not a PDB id (a digit and three letters/digits)")
                continue
            if self.divided:
                path = entry_path(root, pdb_id)
            else:
                try:
                    path = file_of_ref(root, ref, _PATH)
                except ValueError as error:
                    ctx.fail(pdb_id, str(error))
                    continue
            try:
                metadata = entry_metadata(root, path, pdb_id.upper())
                file_ref = ctx.add_file(pdb_id, path)
            except FileNotFoundError:
                # Also when a running rsync removed the entry after discover listed it.
                ctx.fail(pdb_id, f"entry {pdb_id} is not in the mirror: {path} does not exist")
                continue
            yield IngesterRecord(
                source_id=pdb_id, metadata=metadata.model_dump(mode="json"), files=[file_ref]
            )
