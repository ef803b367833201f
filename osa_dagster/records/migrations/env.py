"""Alembic environment of the records database; run through osa_dagster.records.schema."""

from alembic import context

from osa_dagster.records.models import Base
from osa_dagster.records.schema import VERSION_TABLE

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    version_table=VERSION_TABLE,
    # SQLite cannot ALTER most things: batch mode rebuilds tables for it.
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
