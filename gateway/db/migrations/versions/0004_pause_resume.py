"""Sessions that pause and resume (why paused, crash count, idle timeout, lifetime, resume
time, queue position) and turns that carry their deadline, outcome and interrupt request.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        # A native enum (SQLite stores the name as text). PostgreSQL >= 12 adds a value inside
        # a transaction; nothing here uses it before the commit.
        op.execute("ALTER TYPE sessionstatus ADD VALUE IF NOT EXISTS 'PAUSED'")
        op.execute("ALTER TYPE sessionstatus ADD VALUE IF NOT EXISTS 'QUEUED'")
    # Plain ADD COLUMN (no table rebuild): SQLite keeps its foreign keys enforced throughout.
    op.add_column("session", sa.Column("paused_reason", sa.String(length=32), nullable=True))
    op.add_column("session", sa.Column("crashes", sa.Integer(), nullable=False, server_default="0"))
    op.add_column("session", sa.Column("idle_timeout_s", sa.Integer(), nullable=True))
    op.add_column("session", sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("session", sa.Column("resumed_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("session", sa.Column("queue_position", sa.Integer(), nullable=True))
    op.add_column("turn", sa.Column("timeout_s", sa.Float(), nullable=True))
    op.add_column("turn", sa.Column("outcome", sa.String(length=16), nullable=True))
    op.add_column(
        "turn", sa.Column("interrupt_requested_at", sa.DateTime(timezone=True), nullable=True)
    )


def downgrade() -> None:
    # PostgreSQL cannot drop an enum value; 'PAUSED' and 'QUEUED' stay in the type, unused.
    for name in ("interrupt_requested_at", "outcome", "timeout_s"):
        op.drop_column("turn", name)
    for name in (
        "queue_position",
        "resumed_at",
        "expires_at",
        "idle_timeout_s",
        "crashes",
        "paused_reason",
    ):
        op.drop_column("session", name)
