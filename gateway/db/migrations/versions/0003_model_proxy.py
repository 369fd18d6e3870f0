"""The model proxy: per-session credentials, metered requests, reservations, daily usage.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN (no table rebuild): SQLite keeps its foreign keys enforced throughout.
    op.add_column("session", sa.Column("proxy_key_hash", sa.String(length=64), nullable=True))
    op.add_column("session", sa.Column("budget_usd", sa.Float(), nullable=True))
    op.add_column(
        "session", sa.Column("reserved_usd", sa.Float(), nullable=False, server_default="0")
    )
    op.create_index("ix_session_proxy_key_hash", "session", ["proxy_key_hash"], unique=True)
    op.add_column(
        "spawntree", sa.Column("reserved_usd", sa.Float(), nullable=False, server_default="0")
    )
    op.create_table(
        "modelrequest",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("session_id", sa.String(length=36), nullable=False),
        sa.Column("turn_id", sa.String(length=36), nullable=True),
        sa.Column("root_id", sa.String(length=36), nullable=False),
        sa.Column("owner", sa.String(length=255), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("path", sa.String(length=200), nullable=False),
        sa.Column("stream", sa.Boolean(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=False),
        sa.Column("input_tokens", sa.Integer(), nullable=False),
        sa.Column("output_tokens", sa.Integer(), nullable=False),
        sa.Column("cache_creation_input_tokens", sa.Integer(), nullable=False),
        sa.Column("cache_read_input_tokens", sa.Integer(), nullable=False),
        sa.Column("cost_usd", sa.Float(), nullable=False),
        sa.Column("reserved_usd", sa.Float(), nullable=False),
        sa.Column("complete", sa.Boolean(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("duration_ms", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    for column in ("session_id", "turn_id", "root_id", "owner", "started_at"):
        op.create_index(f"ix_modelrequest_{column}", "modelrequest", [column])
    op.create_table(
        "usageday",
        sa.Column("owner", sa.String(length=255), nullable=False),
        sa.Column("day", sa.String(length=10), nullable=False),
        sa.Column("spend_usd", sa.Float(), nullable=False),
        sa.Column("reserved_usd", sa.Float(), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("input_tokens", sa.Integer(), nullable=False),
        sa.Column("output_tokens", sa.Integer(), nullable=False),
        sa.Column("cache_creation_input_tokens", sa.Integer(), nullable=False),
        sa.Column("cache_read_input_tokens", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("owner", "day"),
    )


def downgrade() -> None:
    op.drop_table("usageday")
    for column in ("session_id", "turn_id", "root_id", "owner", "started_at"):
        op.drop_index(f"ix_modelrequest_{column}", table_name="modelrequest")
    op.drop_table("modelrequest")
    with op.batch_alter_table("spawntree") as batch:
        batch.drop_column("reserved_usd")
    op.drop_index("ix_session_proxy_key_hash", table_name="session")
    with op.batch_alter_table("session") as batch:
        batch.drop_column("reserved_usd")
        batch.drop_column("budget_usd")
        batch.drop_column("proxy_key_hash")
