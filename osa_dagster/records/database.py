"""Connecting to the records database: SQLite under the data folder by default."""

from __future__ import annotations

from functools import cache, cached_property

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from osa_dagster.records.schema import upgrade
from osa_dagster.settings import Settings, data_dir


def database_url_from_env() -> str:
    """OSA_DATABASE_URL, else a SQLite file in the data folder."""
    url = Settings.from_env().database_url
    if url:
        return url
    folder = data_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'records.db'}"


class RecordsDatabase:
    def __init__(self, url: str) -> None:
        self.url = url

    @cached_property
    def engine(self) -> Engine:
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

    def session(self) -> Session:
        return sessionmaker(self.engine)()


@cache
def open_database(url: str) -> RecordsDatabase:
    """One RecordsDatabase per URL and process: its engine pools connections, and the
    schema check runs once instead of at every step."""
    return RecordsDatabase(url)
