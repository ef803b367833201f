"""records gain a lifecycle (status, reason, when), the upstream version they hold and
their provenance; record_events keeps every change of a published record

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("records", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("status", sa.String(length=16), server_default="published", nullable=False)
        )
        batch_op.add_column(sa.Column("status_reason", sa.String(length=1024), nullable=True))
        batch_op.add_column(
            sa.Column("status_changed_at", sa.DateTime(timezone=True), nullable=True)
        )
        batch_op.add_column(sa.Column("record_version", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("provenance", sa.JSON(), nullable=True))
        batch_op.create_index(batch_op.f("ix_records_status"), ["status"], unique=False)

    op.create_table(
        "record_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("srn", sa.String(length=96), nullable=False),
        sa.Column("event", sa.String(length=16), nullable=False),
        sa.Column("record_version", sa.String(length=255), nullable=True),
        sa.Column("reason", sa.String(length=1024), nullable=True),
        sa.Column("partition", sa.String(length=255), nullable=True),
        sa.Column("provenance", sa.JSON(), nullable=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["srn"], ["records.srn"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("record_events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_record_events_srn"), ["srn"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("record_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_record_events_srn"))
    op.drop_table("record_events")
    with op.batch_alter_table("records", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_records_status"))
        batch_op.drop_column("provenance")
        batch_op.drop_column("record_version")
        batch_op.drop_column("status_changed_at")
        batch_op.drop_column("status_reason")
        batch_op.drop_column("status")
