"""Migrations of the records database: the first one builds exactly what the models say."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, inspect, select

from osa_dagster.cli import main
from osa_dagster.local_postgres import throwaway_postgres
from osa_dagster.records import (
    Base,
    DeadLetter,
    Feature,
    Record,
    RecordsDatabase,
    RecordToPublish,
    publish_records,
)
from osa_dagster.records.schema import VERSION_TABLE, current_revision, head_revision


def _differences(engine: Engine) -> list:
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        return compare_metadata(context, Base.metadata)


def test_migrations_build_the_models_schema_on_sqlite(tmp_path: Path):
    db = RecordsDatabase(f"sqlite:///{tmp_path / 'records.db'}")
    assert current_revision(db.engine) == head_revision()
    assert _differences(db.engine) == []


def test_migrations_build_the_models_schema_on_postgresql():
    with throwaway_postgres() as server:
        db = RecordsDatabase(server.url)
        assert current_revision(db.engine) == head_revision()
        assert _differences(db.engine) == []
        db.engine.dispose()


def test_a_database_from_before_migrations_is_stamped_and_keeps_its_records(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    before = create_engine(url)
    # How databases were made before migrations existed, with the tables of that time.
    Base.metadata.create_all(
        before, tables=[Record.__table__, Feature.__table__, DeadLetter.__table__]
    )
    publish_records(
        _unmigrated(url),
        convention="pdb",
        domain="x",
        partition="p",
        records=[RecordToPublish("1ABC", {})],
    )
    assert VERSION_TABLE not in inspect(before).get_table_names()

    db = RecordsDatabase(url)
    assert current_revision(db.engine) == head_revision()
    with db.session() as session:
        assert session.scalars(select(Record.source_id)).all() == ["1ABC"]


def _unmigrated(url: str) -> RecordsDatabase:
    """A RecordsDatabase on an engine that skipped the migrations (as old versions did)."""
    db = RecordsDatabase(url)
    db.__dict__["engine"] = create_engine(url)
    return db


def test_osa_db_reports_the_revision(capsys):
    assert main(["db", "upgrade"]) == 0
    assert main(["db", "current"]) == 0
    assert f"at revision {head_revision()}" in capsys.readouterr().out
