"""Schema migrations of the records database (Alembic), run when a database is opened.

An operator upgrades an existing archive with `osa db upgrade` (or by simply running the
new version); `osa db current` tells the revision a database is at. Databases created
before migrations existed hold the first revision's tables without Alembic's version
table: they are stamped, not created again.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text

MIGRATIONS = Path(__file__).parent / "migrations"
FIRST_REVISION = "0001"
# Not Alembic's default name: the Dagster instance runs its own Alembic migrations, and an
# operator may well keep both in one PostgreSQL database.
VERSION_TABLE = "osa_records_version"
# Any fixed number: PostgreSQL serialises concurrent migrators on this advisory lock.
_MIGRATION_LOCK = 0x05A_0001


def _config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        return context.get_current_revision()


def head_revision() -> str:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    head = ScriptDirectory.from_config(config).get_current_head()
    if head is None:
        raise RuntimeError(f"no migration found in {MIGRATIONS}")
    return head


@contextmanager
def _sqlite_file_lock(engine: Engine) -> Iterator[None]:
    """Serialise migrators of one SQLite file: its DDL commits statement by statement, so
    two processes creating the schema at once would interleave ("already exists")."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield
        return
    with Path(f"{database}.migrate-lock").open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def upgrade(engine: Engine) -> None:
    """Bring the database to the newest revision, one migrator at a time."""
    with _sqlite_file_lock(engine), engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
        tables = set(inspect(connection).get_table_names())
        config = _config(connection)
        if "records" in tables and VERSION_TABLE not in tables:
            command.stamp(config, FIRST_REVISION)
        command.upgrade(config, "head")
