"""Connecting to the records database: SQLite under the data folder by default."""

from __future__ import annotations

import os
from functools import cache, cached_property
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from osa_dagster.records.schema import current_revision, head_revision, upgrade
from osa_dagster.settings import Settings


class DatabaseNotReadable(RuntimeError):
    """A reading command cannot use the records database as it is; the message says why."""


class RecordsDatabaseUnusable(RuntimeError):
    """The records database could not be opened (unreachable, refused, not a database);
    the one-line message names it and says why."""


def database_url(configured: Settings) -> str:
    """The settings' OSA_DATABASE_URL with OSA_DATABASE_PASSWORD, if set, in it; see
    `shown_database_url`."""
    shown = shown_database_url(configured)
    if configured.database_url and configured.database_password:
        url = make_url(shown).set(password=configured.database_password)
        return url.render_as_string(hide_password=False)
    return shown


def shown_database_url(configured: Settings) -> str:
    """The settings' OSA_DATABASE_URL as set, without OSA_DATABASE_PASSWORD; unset, a SQLite
    file in the data folder."""
    return configured.database_url or f"sqlite:///{configured.data_dir / 'records.db'}"


def _sqlite_file(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


class RecordsDatabase:
    """The database as the steps use it: created and migrated to the newest revision on
    first use. `read_only` is for commands that only look: they migrate nothing, take no
    lock and create no file (see `engine`)."""

    def __init__(self, url: str, *, read_only: bool = False) -> None:
        self.url = url
        self.read_only = read_only

    @cached_property
    def engine(self) -> Engine:
        try:
            return self._reading_engine() if self.read_only else self._writing_engine()
        except DBAPIError as error:
            reason = str(error.orig).strip().splitlines()[0] if error.orig else str(error)
            shown = make_url(self.url).render_as_string(hide_password=True)
            raise RecordsDatabaseUnusable(
                f"the records database {shown} cannot be used: {reason}"
            ) from error

    def _writing_engine(self) -> Engine:
        sqlite_file = _sqlite_file(self.url)
        if sqlite_file is not None:
            sqlite_file.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(self.url)
        if engine.dialect.name == "sqlite":
            # Several runs may publish at once: wait for the writer lock instead of failing.
            @event.listens_for(engine, "connect")
            def _sqlite_pragmas(connection: object, _record: object) -> None:
                cursor = connection.cursor()  # type: ignore[attr-defined]
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA busy_timeout=30000")
                cursor.execute("PRAGMA foreign_keys=ON")
                cursor.close()

        upgrade(engine)
        return engine

    def _reading_engine(self) -> Engine:
        sqlite_file = _sqlite_file(self.url)
        url = self.url
        if sqlite_file is not None:
            if not sqlite_file.is_file():
                raise DatabaseNotReadable(f"no records database at {sqlite_file}")
            # A WAL database opened read-only needs its -shm file, which SQLite cannot make
            # in a folder it may not write to: there, read the file as it is (immutable),
            # which is right for a folder nobody can write to.
            writable = os.access(sqlite_file.parent, os.W_OK)
            mode = "" if writable else "?mode=ro&immutable=1"
            url = f"sqlite:///file:{sqlite_file}{mode}{'&' if mode else '?'}uri=true"
        engine = create_engine(url)
        revision, newest = current_revision(engine), head_revision()
        if revision != newest:
            raise DatabaseNotReadable(
                f"the records database {engine.url.render_as_string()} is at schema revision "
                f"{revision}, this version reads {newest}: run `osa db upgrade`"
            )
        return engine

    def session(self) -> Session:
        return sessionmaker(self.engine)()


def database_to_look_at(url: str) -> RecordsDatabase | None:
    """The database at `url`, read only (dry runs); None for a SQLite file not made yet,
    which holds nothing. A database of another schema revision fails when first used."""
    sqlite_file = _sqlite_file(url)
    if sqlite_file is not None and not sqlite_file.is_file():
        return None
    return RecordsDatabase(url, read_only=True)


@cache
def open_database(url: str) -> RecordsDatabase:
    """One RecordsDatabase per URL and process: its engine pools connections, and the
    schema check runs once instead of at every step."""
    return RecordsDatabase(url)
