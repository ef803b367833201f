"""Migrations of the records database: they build exactly what the models say."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, create_engine, inspect, select, text

from osa_dagster.cli import main
from osa_dagster.local_postgres import throwaway_postgres
from osa_dagster.records import Base, Record, RecordsDatabase
from osa_dagster.records.schema import (
    FIRST_REVISION,
    MIGRATIONS,
    VERSION_TABLE,
    current_revision,
    head_revision,
)


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
    # How databases were made before migrations existed: the first revision's tables,
    # without the version table.
    with before.begin() as connection:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = connection
        command.upgrade(config, FIRST_REVISION)
        connection.execute(text(f"DROP TABLE {VERSION_TABLE}"))
        connection.execute(
            text(
                "INSERT INTO records (srn, convention, source_id, partition, metadata,"
                " published_at) VALUES ('urn:x', 'pdb', '1ABC', 'p', '{}', '2026-01-01')"
            )
        )
    assert VERSION_TABLE not in inspect(before).get_table_names()

    db = RecordsDatabase(url)
    assert current_revision(db.engine) == head_revision()
    with db.session() as session:
        assert session.execute(select(Record.source_id, Record.status)).all() == [
            ("1ABC", "published")
        ]


def test_osa_db_reports_the_revision(capsys):
    assert main(["db", "upgrade"]) == 0
    assert main(["db", "current"]) == 0
    assert f"at revision {head_revision()}" in capsys.readouterr().out
