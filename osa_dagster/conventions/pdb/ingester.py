"""Ingest PDB entries from a local mirror in the wwPDB divided layout.

A mirror holds ``mmCIF/<middle two characters of the id>/<id>.cif.gz``, as
``rsync rsync.wwpdb.org::ftp_data/structures/divided/mmCIF/`` leaves it. The project
bundles a small one (mirror/, see mirror/SOURCES.md); point `mirror` at a full copy to
ingest the whole archive.
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, date, datetime
from pathlib import Path

import gemmi
from osa_sdk.authoring import FetchContext, Ingester, ingester
from osa_sdk.contract import bytes_to_mb
from osa_sdk.types import IngesterRecord, RecordRef
from pydantic import BaseModel, ConfigDict

log = logging.getLogger(__name__)

DEFAULT_MIRROR = Path(__file__).resolve().parent / "mirror"

# Classic 4-character PDB ids: a digit, then three letters or digits.
_ENTRY_FILE = re.compile(r"([0-9][a-z0-9]{3})\.cif\.gz")
_PDB_ID = re.compile(r"[0-9][A-Za-z0-9]{3}")

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
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as stream:
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
    """Entries of a local PDB mirror; `source_id` is the PDB id in upper case ("1UBI").

    `discover(since=...)` selects entries by the modification time of their file. Mirrors
    are kept with ``rsync -t``, which gives each file the time of its upstream copy, and
    the wwPDB rewrites an entry's file whenever it releases or revises it: a newer mtime
    is exactly "released or changed upstream since". It costs one stat per entry, whereas
    the revision dates inside the files sit after the coordinates and would mean
    decompressing the whole archive (~80 GB for 200,000 entries) on every discover.
    The revision date is read at fetch time instead and kept in the metadata.

    max_file_mb=100 (compressed) admits every entry of today's archive (the largest,
    3j3q, is ~240 MB uncompressed, far less gzipped) and refuses files no real entry
    reaches.
    """

    def __init__(self, mirror: str | Path = DEFAULT_MIRROR) -> None:
        super().__init__(mirror=str(mirror))
        self.mirror = Path(mirror)

    def discover(self, since: datetime | None, limit: int | None) -> Iterator[RecordRef]:
        """Entries in id order whose file changed after `since` (naive means UTC)."""
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be a number of records >= 0, not {limit}")
        if since is not None and since.tzinfo is None:
            since = since.replace(tzinfo=UTC)
        found = 0
        for pdb_id, path in mirror_entries(self.mirror):
            if limit is not None and found >= limit:
                return
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
            )

    def fetch(self, refs: Sequence[RecordRef], ctx: FetchContext) -> Iterator[IngesterRecord]:
        """Copy each entry's .cif.gz into the batch and record its header as metadata."""
        for ref in refs:
            pdb_id = ref.source_id
            if not _PDB_ID.fullmatch(pdb_id):
                ctx.fail(pdb_id, f"{pdb_id!r} is not a PDB id (a digit and three letters/digits)")
                continue
            path = entry_path(self.mirror, pdb_id)
            try:
                metadata = entry_metadata(self.mirror, path, pdb_id.upper())
                file_ref = ctx.add_file(pdb_id, path)
            except FileNotFoundError:
                # Also when a running rsync removed the entry after discover listed it.
                ctx.fail(pdb_id, f"entry {pdb_id} is not in the mirror: {path} does not exist")
                continue
            yield IngesterRecord(
                source_id=pdb_id, metadata=metadata.model_dump(mode="json"), files=[file_ref]
            )
