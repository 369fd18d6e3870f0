"""Jobs, generations of repository clones, and the structured output of a turn.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_STATUSES = (
    "CREATED",
    "QUEUED",
    "GIT_PULLING",
    "RUNNING",
    "COMPLETED",
    "FAILED",
    "GIT_FAILED",
    "TIMEOUT",
    "CANCELLED",
)


def upgrade() -> None:
    op.add_column("turn", sa.Column("structured_output", sa.JSON(), nullable=True))
    op.add_column(
        "repository",
        sa.Column("generation", sa.Integer(), nullable=False, server_default="0"),
    )
    op.create_table(
        "job",
        sa.Column("id", sa.String(length=36), primary_key=True),
        sa.Column("owner", sa.String(length=255), nullable=False),
        sa.Column("status", sa.Enum(*_STATUSES, name="jobstatus"), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("source", sa.JSON(), nullable=False),
        sa.Column("repository_id", sa.String(length=36), nullable=True),
        sa.Column("options", sa.JSON(), nullable=False),
        sa.Column("tags", sa.Text(), nullable=False),
        sa.Column("files", sa.JSON(), nullable=False),
        sa.Column("timeout_s", sa.Integer(), nullable=False),
        sa.Column("session_id", sa.String(length=36), nullable=True),
        sa.Column("turn_id", sa.String(length=36), nullable=True),
        sa.Column("workspace", sa.JSON(), nullable=True),
        sa.Column("workspace_expired_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("git_commit", sa.String(length=64), nullable=True),
        sa.Column("git_status", sa.Text(), nullable=True),
        sa.Column("result", sa.Text(), nullable=True),
        sa.Column("structured_output", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("cost_usd", sa.Float(), nullable=True),
        sa.Column("usage", sa.JSON(), nullable=True),
        sa.Column("num_turns", sa.Integer(), nullable=True),
        sa.Column("duration_ms", sa.Integer(), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("worker", sa.String(length=64), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("queued_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_job_owner", "job", ["owner"])
    op.create_index("ix_job_status", "job", ["status"])
    op.create_index("ix_job_repository_id", "job", ["repository_id"])
    op.create_index("ix_job_queued_at", "job", ["queued_at"])


def downgrade() -> None:
    for index in ("ix_job_queued_at", "ix_job_repository_id", "ix_job_status", "ix_job_owner"):
        op.drop_index(index, table_name="job")
    op.drop_table("job")
    sa.Enum(name="jobstatus").drop(op.get_bind(), checkfirst=True)
    op.drop_column("repository", "generation")
    op.drop_column("turn", "structured_output")
