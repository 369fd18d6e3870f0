"""Repositories: git repositories registered by users, cloned once on the gateway's host.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "repository",
        sa.Column("id", sa.String(length=36), primary_key=True),
        sa.Column("owner", sa.String(length=255), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("git_url", sa.String(length=2048), nullable=False),
        sa.Column("branch", sa.String(length=255), nullable=True),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("deploy_key", sa.Text(), nullable=True),
        sa.Column(
            "status",
            sa.Enum("CLONING", "READY", "FAILED", name="repositorystatus"),
            nullable=False,
        ),
        sa.Column("pulling", sa.Boolean(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("head_branch", sa.String(length=255), nullable=True),
        sa.Column("head_commit", sa.String(length=64), nullable=True),
        sa.Column("head_date", sa.DateTime(timezone=True), nullable=True),
        sa.Column("head_subject", sa.Text(), nullable=True),
        sa.Column("size_bytes", sa.BigInteger(), nullable=True),
        sa.Column("worker", sa.String(length=64), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("pulled_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("owner", "name", name="uq_repository_owner_name"),
    )
    op.create_index("ix_repository_owner", "repository", ["owner"])


def downgrade() -> None:
    op.drop_index("ix_repository_owner", table_name="repository")
    op.drop_table("repository")
    sa.Enum(name="repositorystatus").drop(op.get_bind(), checkfirst=True)
