"""The plan index: the (source id, version) of every record each manifest of a convention
holds, so that planning looks records up instead of reading every manifest into memory.

Manifests stay the truth and the index is a cache of them: an SQLite file in the artifact
store beside them (`plan_index/<convention>/planned.sqlite`). A filesystem store holds it in
place, and plans running at once share it under SQLite's locks; an S3 store stages it in and
uploads it when the plan ends without error, so the last plan to end wins. Either way a copy
is a subset of the truth: the index records which manifests, at which size, it has read, and
every plan first catches up with the manifests as listed, reading those the index has not
(written by a plan killed before it indexed them, or by another plan whose upload ours
replaced, or rewritten since) and forgetting those gone. A missing, truncated or unreadable
index, or one of another format, is built again from the manifests.

The source ids a plan has seen are kept on disk too (SeenIds), so that dropping the repeats
of a source id costs the orchestrator no memory per record. A plan of a whole source compares
them with the index when its listing ends (`gone`): what was planned from that source and is
not listed any more, a mark-and-sweep on disk.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import TypeVar

from osa_sdk.types import RecordRef

from osa_dagster.batch.stores import UnreadableState, parse_stored
from osa_dagster.storage.layout import (
    BatchLayout,
    Manifest,
    SourceChoice,
    manifests_prefix,
    plan_index_prefix,
)
from osa_dagster.storage.store import ArtifactStore

INDEX_FILE = "planned.sqlite"
# 2: manifests keep the source they were planned from.
INDEX_FORMAT = 2
# A plan waits this long for another plan's commit before it fails on a locked index.
BUSY_TIMEOUT_S = 120.0
# Source ids per look-up (SQLite allows 32,766 parameters per statement).
LOOKUP_CHUNK = 1000
# Records indexed per commit (the plan registers their partitions first), and the longest a
# plan holds frozen batches unregistered while discover is slow.
COMMIT_EVERY_ROWS = 50_000
COMMIT_EVERY_S = 30.0
# Page cache of the index and of the seen ids, each: bounds what they add to the plan's memory.
CACHE_KB = 4096
log = logging.getLogger(__name__)

T = TypeVar("T")
Register = Callable[[Sequence[str]], None]


class IndexUnreadable(Exception):
    """An index file that is not one this code wrote: it is built again."""


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def version_key(version: str | None) -> str:
    """A version as the index keeps it: part of a primary key, so never NULL; the prefix
    keeps "no version" apart from ""."""
    return "" if version is None else f"v{version}"


def source_key(source: SourceChoice | None) -> str:
    """The source a manifest was planned from, as the index keeps it; "" for a manifest
    from before sources could be chosen, which no listing of a source sweeps."""
    return "" if source is None else f"{source.name}\t{source.location or ''}"


class PlanIndex:
    """One plan's view of the index: its catch-up, look-ups, and the manifests it adds.

    Manifests a plan adds are committed only after the orchestrator knows their partitions
    (`register_and_commit`): an indexed manifest is always a registered partition, and one
    written but not indexed is registered when the next plan catches up with it.
    """

    def __init__(self, path: Path, where: str) -> None:
        """The index file at `path`, which the store holds at `where` (for messages)."""
        self.path = path
        self._pending: list[tuple[str, int, str, list[tuple[str, str]]]] = []
        self.pending_rows = 0
        try:
            self._db = _connect(path)
        except IndexUnreadable as error:
            log.warning(
                "the plan index at %s cannot be read (%s): it is built again from the manifests",
                where,
                error,
            )
            for leftover in (path, path.with_name(path.name + "-journal")):
                leftover.unlink(missing_ok=True)
            self._db = _connect(path)

    @classmethod
    @contextmanager
    def of(cls, store: ArtifactStore, convention: str) -> Iterator[PlanIndex]:
        """The convention's index, written back to the store when the body ends without error
        (an S3 store uploads nothing otherwise; the index then lags, which costs reading)."""
        prefix = plan_index_prefix(convention)
        with store.local_dir(prefix, writable=True) as folder:
            index = cls(folder / INDEX_FILE, store.describe(f"{prefix}/{INDEX_FILE}"))
            try:
                yield index
            finally:
                index.close()

    @classmethod
    @contextmanager
    def copy_of(cls, store: ArtifactStore, convention: str) -> Iterator[PlanIndex]:
        """A private copy of the convention's index, for a dry run: what it catches up with
        and adds stays in the copy, and the store is left as it was."""
        prefix = plan_index_prefix(convention)
        where = store.describe(f"{prefix}/{INDEX_FILE}")
        with (
            store.local_dir(prefix, writable=False) as folder,
            tempfile.TemporaryDirectory(prefix="osa-plan-") as private,
        ):
            copy = Path(private) / INDEX_FILE
            if (folder / INDEX_FILE).is_file():
                shutil.copyfile(folder / INDEX_FILE, copy)
            index = cls(copy, where)
            try:
                yield index
            finally:
                index.close()

    def close(self) -> None:
        # What was added and not committed is dropped: those manifests are read next time.
        self._db.close()

    def catch_up(self, store: ArtifactStore, convention: str, register: Register) -> int:
        """Forget manifests gone or changed, index those not indexed yet; `register` is told
        their partitions before they are committed. How many manifests were indexed."""
        prefix = manifests_prefix(convention)
        self._db.execute(
            "CREATE TEMP TABLE listed (partition TEXT PRIMARY KEY, size_bytes INTEGER NOT NULL)"
            " WITHOUT ROWID"
        )
        try:
            self._db.executemany(
                "INSERT INTO listed VALUES (?, ?)",
                (
                    (name.removesuffix(".json"), size)
                    for name, size in store.sizes(prefix).items()
                    if name.endswith(".json") and "/" not in name and not name.startswith(".")
                ),
            )
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "CREATE TEMP TABLE stale AS SELECT id FROM manifests m WHERE NOT EXISTS "
                "(SELECT 1 FROM listed l WHERE l.partition = m.partition "
                "AND l.size_bytes = m.size_bytes)"
            )
            self._db.execute("DELETE FROM planned WHERE manifest IN (SELECT id FROM stale)")
            self._db.execute("DELETE FROM manifests WHERE id IN (SELECT id FROM stale)")
            self._db.execute("DROP TABLE stale")
            self._db.execute("COMMIT")
            unread = self._db.execute(
                "SELECT partition, size_bytes FROM listed l WHERE NOT EXISTS "
                "(SELECT 1 FROM manifests m WHERE m.partition = l.partition) ORDER BY partition"
            )
            indexed = 0
            unregistered: list[str] = []
            for partition, size_bytes in unread.fetchall():
                if self._index_manifest(store, BatchLayout(convention, partition), size_bytes):
                    unregistered.append(partition)
                if self.pending_rows >= COMMIT_EVERY_ROWS:
                    indexed += self.register_and_commit(unregistered, register)
                    unregistered = []
            return indexed + self.register_and_commit(unregistered, register)
        finally:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            self._db.execute("DROP TABLE listed")

    def _index_manifest(self, store: ArtifactStore, layout: BatchLayout, size_bytes: int) -> bool:
        try:
            manifest = parse_stored(Manifest, store, layout.manifest)
        except UnreadableState as error:
            # As planning always did: its records are planned again, and a batch of the same
            # membership writes the manifest anew.
            log.warning(
                "planning passes over the manifest at %s: it cannot be read (%s)",
                error.where,
                error.cause,
            )
            return False
        except FileNotFoundError:
            return False  # removed since it was listed
        self.add(layout.partition, manifest.refs, size_bytes, source_key(manifest.source))
        return True

    def holds_records(self) -> bool:
        return self._db.execute("SELECT 1 FROM planned LIMIT 1").fetchone() is not None

    def planned_versions(self, refs: Sequence[RecordRef]) -> dict[str, set[str]]:
        """The versions (as `version_key` spells them) at which indexed manifests hold each
        of `refs` that one holds."""
        planned: dict[str, set[str]] = {}
        for chunk in chunked([r.source_id for r in refs], LOOKUP_CHUNK):
            for source_id, version in self._db.execute(
                f"SELECT source_id, version FROM planned WHERE source_id IN ({_marks(len(chunk))})",
                chunk,
            ):
                planned.setdefault(source_id, set()).add(version)
        return planned

    def gone(self, seen: SeenIds, source: str) -> Iterator[str]:
        """The source ids planned from `source` (a `source_key`), and from no other, that
        `seen` does not hold, in id order, streamed: what a whole listing of that source
        no longer has. Records planned from another source too are left out: that source
        may list them still."""
        self._db.execute("ATTACH DATABASE ? AS listing", (str(seen.finish()),))
        rows = self._db.cursor()
        try:
            # CROSS JOIN keeps the walk of `planned` in id order outermost (SQLite does not
            # reorder it): one pass, each id looked up in the listing by its key.
            rows.execute(
                "SELECT DISTINCT p.source_id FROM planned p CROSS JOIN manifests m"
                " ON m.id = p.manifest"
                " WHERE m.source = ? AND NOT EXISTS"
                " (SELECT 1 FROM listing.seen s WHERE s.source_id = p.source_id)"
                " AND NOT EXISTS (SELECT 1 FROM planned o JOIN manifests n ON n.id = o.manifest"
                " WHERE o.source_id = p.source_id AND n.source != m.source)"
                " ORDER BY p.source_id",
                (source,),
            )
            for (source_id,) in rows:
                yield source_id
        finally:
            rows.close()
            self._db.execute("DETACH DATABASE listing")

    def add(self, partition: str, refs: Sequence[RecordRef], size_bytes: int, source: str) -> None:
        """Index a manifest, planned from `source` (a `source_key`), at the next commit. Held
        in memory until then, a few MB at most, so that the index is locked only while it is
        written, not while discover runs."""
        rows = [(r.source_id, version_key(r.version)) for r in refs]
        self._pending.append((partition, size_bytes, source, rows))
        self.pending_rows += len(rows)

    def register_and_commit(self, partitions: Sequence[str], register: Register) -> int:
        """Tell `register` the partitions of the manifests added since the last commit, then
        commit them: an indexed manifest is a registered partition. How many."""
        if partitions:
            register(partitions)
        if self._pending:
            self._db.execute("BEGIN IMMEDIATE")
            for partition, size_bytes, source, rows in self._pending:
                self._db.execute(
                    "INSERT INTO manifests (partition, size_bytes, source) VALUES (?, ?, ?) "
                    "ON CONFLICT (partition) DO NOTHING",
                    (partition, size_bytes, source),
                )
                [(manifest,)] = self._db.execute(
                    "SELECT id FROM manifests WHERE partition = ?", (partition,)
                ).fetchall()
                self._db.executemany(
                    "INSERT OR IGNORE INTO planned VALUES (?, ?, ?)",
                    ((source_id, version, manifest) for source_id, version in rows),
                )
            self._db.execute("COMMIT")
        self._pending = []
        self.pending_rows = 0
        return len(partitions)


class SeenIds:
    """The source ids one plan has seen, in an SQLite file of its own in a temporary folder:
    private to the plan, so written without a journal or syncs, in one transaction."""

    def __init__(self) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="osa-plan-")
        self._path = Path(self._folder.name) / "seen.sqlite"
        self._db = sqlite3.connect(self._path, isolation_level=None)
        self._db.execute(f"PRAGMA cache_size = -{CACHE_KB}")
        self._db.execute("PRAGMA journal_mode = OFF")
        self._db.execute("PRAGMA synchronous = OFF")
        self._db.execute("CREATE TABLE seen (source_id TEXT PRIMARY KEY) WITHOUT ROWID")
        self._db.execute("BEGIN")

    def __enter__(self) -> SeenIds:
        return self

    def __exit__(self, *exc: object) -> None:
        self._db.close()
        self._folder.cleanup()

    def first_sightings(self, refs: Sequence[RecordRef]) -> list[RecordRef]:
        """`refs` less the source ids this plan has seen, in this chunk or before it: the first
        occurrence of an id wins. Marks the rest seen."""
        first: dict[str, RecordRef] = {}
        for ref in refs:
            first.setdefault(ref.source_id, ref)
        # One statement a chunk: RETURNING gives the rows inserted, not those already there.
        new = {
            source_id
            for chunk in chunked(list(first), LOOKUP_CHUNK)
            for (source_id,) in self._db.execute(
                f"INSERT INTO seen VALUES {','.join(['(?)'] * len(chunk))} "
                "ON CONFLICT DO NOTHING RETURNING source_id",
                chunk,
            )
        }
        return [ref for source_id, ref in first.items() if source_id in new]

    def finish(self) -> Path:
        """Commit what was seen, for another connection to read: the file's path. Nothing is
        seen after this."""
        if self._db.in_transaction:
            self._db.execute("COMMIT")
        return self._path


def _marks(count: int) -> str:
    return ",".join("?" * count)


def _connect(path: Path) -> sqlite3.Connection:
    """The index at `path`, created if missing; IndexUnreadable if the file is not one."""
    db = sqlite3.connect(path, isolation_level=None, timeout=BUSY_TIMEOUT_S)
    try:
        db.execute(f"PRAGMA cache_size = -{CACHE_KB}")
        _check_whole(db, path)
        db.execute("BEGIN IMMEDIATE")
        db.execute("CREATE TABLE IF NOT EXISTS meta (format INTEGER NOT NULL)")
        db.execute(
            "CREATE TABLE IF NOT EXISTS manifests (id INTEGER PRIMARY KEY, "
            "partition TEXT NOT NULL UNIQUE, size_bytes INTEGER NOT NULL, source TEXT NOT NULL)"
        )
        db.execute(
            "CREATE TABLE IF NOT EXISTS planned (source_id TEXT NOT NULL, version TEXT NOT NULL,"
            " manifest INTEGER NOT NULL, PRIMARY KEY (source_id, version, manifest))"
            " WITHOUT ROWID"
        )
        db.execute(
            "INSERT INTO meta SELECT ? WHERE NOT EXISTS (SELECT 1 FROM meta)", (INDEX_FORMAT,)
        )
        formats = [row[0] for row in db.execute("SELECT format FROM meta")]
        db.execute("COMMIT")
    except sqlite3.DatabaseError as error:
        db.close()
        if error.sqlite_errorname in ("SQLITE_BUSY", "SQLITE_LOCKED"):
            raise  # another plan holds it past the timeout: a failure, not a damaged file
        raise IndexUnreadable(str(error)) from None
    if formats != [INDEX_FORMAT]:
        db.close()
        raise IndexUnreadable(f"format {formats}, not [{INDEX_FORMAT}]")
    return db


def _check_whole(db: sqlite3.Connection, path: Path) -> None:
    """A file shorter than its header says (a copy cut short) is told at once, not by a
    look-up that fails midway through a plan."""
    [(page_size,)] = db.execute("PRAGMA page_size").fetchall()
    [(pages,)] = db.execute("PRAGMA page_count").fetchall()
    if path.exists() and path.stat().st_size < page_size * pages:
        raise IndexUnreadable(
            f"{path.stat().st_size} bytes where its header counts {pages} pages of {page_size}"
        )
