"""The re-cut ledger: turns recorded after their artifacts, dead letters.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("turn") as batch:
        batch.add_column(sa.Column("pending_files", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=True))
    # Turns finished before this revision were recorded in one transaction with their files.
    op.execute(
        "UPDATE turn SET recorded_at = completed_at "
        "WHERE status NOT IN ('QUEUED', 'RUNNING') AND recorded_at IS NULL"
    )
    op.create_table(
        "deadletter",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("session_id", sa.String(length=36), nullable=False),
        sa.Column("entry_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("envelope", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_deadletter_session_id", "deadletter", ["session_id"])


def downgrade() -> None:
    op.drop_index("ix_deadletter_session_id", table_name="deadletter")
    op.drop_table("deadletter")
    with op.batch_alter_table("turn") as batch:
        batch.drop_column("recorded_at")
        batch.drop_column("pending_files")
