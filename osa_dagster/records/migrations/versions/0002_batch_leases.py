"""create the batch_leases table: which process works a batch now

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "batch_leases",
        sa.Column("convention", sa.String(length=64), nullable=False),
        sa.Column("batch", sa.String(length=255), nullable=False),
        sa.Column("token", sa.String(length=32), nullable=False),
        sa.Column("run_id", sa.String(length=64), nullable=True),
        sa.Column("step", sa.String(length=255), nullable=False),
        sa.Column("holder", sa.JSON(), nullable=False),
        sa.Column("acquired_at", sa.Float(), nullable=False),
        sa.Column("heartbeat_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("convention", "batch"),
    )


def downgrade() -> None:
    op.drop_table("batch_leases")
