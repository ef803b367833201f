"""create the records, features and dead_letters tables

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("convention", sa.String(length=64), nullable=False),
        sa.Column("source_id", sa.String(length=512), nullable=False),
        sa.Column("hook", sa.String(length=64), nullable=False),
        sa.Column("partition", sa.String(length=255), nullable=False),
        sa.Column("size_mb", sa.Float(), nullable=True),
        sa.Column("limit_mb", sa.Integer(), nullable=False),
        sa.Column("peak_mb", sa.Float(), nullable=True),
        sa.Column("reason", sa.String(length=1024), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("convention", "source_id", "hook", name="uq_dead_letters_record_hook"),
    )
    with op.batch_alter_table("dead_letters", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_dead_letters_convention"), ["convention"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_dead_letters_partition"), ["partition"], unique=False)

    op.create_table(
        "records",
        sa.Column("srn", sa.String(length=96), nullable=False),
        sa.Column("convention", sa.String(length=64), nullable=False),
        sa.Column("source_id", sa.String(length=512), nullable=False),
        sa.Column("partition", sa.String(length=255), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("srn"),
        sa.UniqueConstraint("convention", "source_id", name="uq_records_source"),
    )
    with op.batch_alter_table("records", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_records_convention"), ["convention"], unique=False)
        batch_op.create_index(batch_op.f("ix_records_partition"), ["partition"], unique=False)

    op.create_table(
        "features",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("record_srn", sa.String(length=96), nullable=False),
        sa.Column("hook", sa.String(length=64), nullable=False),
        sa.Column("row_index", sa.Integer(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["record_srn"],
            ["records.srn"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("record_srn", "hook", "row_index", name="uq_features_row"),
    )
    with op.batch_alter_table("features", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_features_record_srn"), ["record_srn"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("features", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_features_record_srn"))

    op.drop_table("features")
    with op.batch_alter_table("records", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_records_partition"))
        batch_op.drop_index(batch_op.f("ix_records_convention"))

    op.drop_table("records")
    with op.batch_alter_table("dead_letters", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_dead_letters_partition"))
        batch_op.drop_index(batch_op.f("ix_dead_letters_convention"))

    op.drop_table("dead_letters")
