"""The schema as the first release created it (``SQLModel.metadata.create_all``).

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_SESSION_STATUS = ("STARTING", "IDLE", "RUNNING", "STOPPED", "FAILED")
_TURN_STATUS = ("QUEUED", "RUNNING", "COMPLETED", "FAILED", "INTERRUPTED", "CANCELLED")


def upgrade() -> None:
    op.create_table(
        "session",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("owner", sa.String(length=255), nullable=False),
        sa.Column("status", sa.Enum(*_SESSION_STATUS, name="sessionstatus"), nullable=False),
        sa.Column("container_id", sa.String(length=80), nullable=True),
        sa.Column("workspace_type", sa.String(length=20), nullable=False),
        sa.Column("workspace_id", sa.String(length=128), nullable=True),
        sa.Column("workspace_volume", sa.String(length=200), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("parent_session_id", sa.String(length=36), nullable=True),
        sa.Column("root_id", sa.String(length=36), nullable=False),
        sa.Column("depth", sa.Integer(), nullable=False),
        sa.Column("live_children", sa.Integer(), nullable=False),
        sa.Column("callback_url", sa.String(length=2000), nullable=True),
        sa.Column("cli_session_id", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_activity", sa.DateTime(timezone=True), nullable=False),
        sa.Column("total_cost_usd", sa.Float(), nullable=False),
        sa.Column("total_turns", sa.Integer(), nullable=False),
        sa.Column("usage", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_session_owner", "session", ["owner"])
    op.create_index("ix_session_parent_session_id", "session", ["parent_session_id"])
    op.create_index("ix_session_root_id", "session", ["root_id"])
    op.create_index("ix_session_status", "session", ["status"])
    op.create_table(
        "spawntree",
        sa.Column("root_id", sa.String(length=36), nullable=False),
        sa.Column("owner", sa.String(length=255), nullable=False),
        sa.Column("sessions_created", sa.Integer(), nullable=False),
        sa.Column("live_sessions", sa.Integer(), nullable=False),
        sa.Column("spend_usd", sa.Float(), nullable=False),
        sa.Column("budget_usd", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("root_id"),
    )
    op.create_table(
        "artifact",
        sa.Column("session_id", sa.String(length=36), nullable=False),
        sa.Column("path", sa.String(length=1024), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("turn_id", sa.String(length=36), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["session_id"], ["session.id"]),
        sa.PrimaryKeyConstraint("session_id", "path"),
    )
    op.create_table(
        "event",
        sa.Column("session_id", sa.String(length=36), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("turn_id", sa.String(length=36), nullable=True),
        sa.Column("type", sa.String(length=64), nullable=False),
        sa.Column("envelope", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["session_id"], ["session.id"]),
        sa.PrimaryKeyConstraint("session_id", "seq"),
    )
    op.create_table(
        "turn",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("session_id", sa.String(length=36), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("status", sa.Enum(*_TURN_STATUS, name="turnstatus"), nullable=False),
        sa.Column("subtype", sa.String(length=64), nullable=True),
        sa.Column("is_error", sa.Boolean(), nullable=True),
        sa.Column("result", sa.Text(), nullable=True),
        sa.Column("errors", sa.JSON(), nullable=True),
        sa.Column("terminal_reason", sa.String(length=64), nullable=True),
        sa.Column("usage", sa.JSON(), nullable=True),
        sa.Column("total_cost_usd", sa.Float(), nullable=True),
        sa.Column("cost_usd", sa.Float(), nullable=True),
        sa.Column("num_turns", sa.Integer(), nullable=True),
        sa.Column("duration_ms", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["session_id"], ["session.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_turn_session_id", "turn", ["session_id"])


def downgrade() -> None:
    op.drop_index("ix_turn_session_id", table_name="turn")
    op.drop_table("turn")
    op.drop_table("event")
    op.drop_table("artifact")
    op.drop_table("spawntree")
    for name in ("ix_session_status", "ix_session_root_id", "ix_session_parent_session_id"):
        op.drop_index(name, table_name="session")
    op.drop_index("ix_session_owner", table_name="session")
    op.drop_table("session")
    sa.Enum(name="turnstatus").drop(op.get_bind(), checkfirst=True)
    sa.Enum(name="sessionstatus").drop(op.get_bind(), checkfirst=True)
