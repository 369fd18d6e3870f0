"""Warm pool: one row per started, unclaimed pool container.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pool_slot",
        sa.Column("id", sa.String(length=36), primary_key=True),
        sa.Column("profile", sa.String(length=32), nullable=False),
        sa.Column("fingerprint", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("container_id", sa.String(length=80), nullable=True),
        sa.Column("proxy_key_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ready_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_pool_slot_profile", "pool_slot", ["profile"])
    op.create_index("ix_pool_slot_fingerprint", "pool_slot", ["fingerprint"])


def downgrade() -> None:
    op.drop_index("ix_pool_slot_fingerprint", table_name="pool_slot")
    op.drop_index("ix_pool_slot_profile", table_name="pool_slot")
    op.drop_table("pool_slot")
