"""Settings of the batch systems (repositories, job workspaces, the job queue); mixed into
:class:`gateway.config.Settings`, so every field reads ``CCGATE_<NAME>`` like the others."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings


class WorkspaceMode(StrEnum):
    """How a job's workspace is made from a repository's clone (job_workspace.py)."""

    AUTO = "auto"  # overlay when the engine can mount it, else copy (reflink where it can)
    OVERLAY = "overlay"  # an overlayfs volume: the clone read-only below, the job's writes above
    COPY = "copy"  # cp -a --reflink=auto: a reflink clone on XFS/Btrfs, a full copy elsewhere


class BatchSettings(BaseSettings):
    """Repositories, job workspaces and the job queue."""

    repos_dir: Path | None = None
    """Where registered repositories are cloned (default ``data_dir/repositories``). Job
    workspaces are mounted from here by the Docker engine: the path must be the same on the
    engine's host and in the gateway."""
    repo_clone_timeout_s: float = Field(default=600.0, gt=0)
    """Longest clone or pull; longer ones are killed and reported."""
    repo_max_bytes: int = Field(default=5 * 1024**3, ge=1024)
    """Largest clone on disk (working tree and .git); a larger one fails and is removed."""
    repo_file_roots: list[Path] = Field(default_factory=list)
    """Directories ``file://`` git URLs may point into (JSON list; empty: file URLs refused)."""
    repo_allow_http: bool = False
    """Allow plain ``http://`` git URLs (https and ssh are always allowed)."""
    repo_concurrency: int = Field(default=2, ge=1, le=32)
    """Clones and pulls running at once on one replica; more wait their turn."""

    code_index_max_bytes: int = Field(default=512 * 1024**2, ge=0)
    """Text indexed per clone generation for the built-in code-search MCP profile (0: no
    index at clone time; the server then builds one per job)."""

    jobs_dir: Path | None = None
    """Job workspaces and uploads (default ``data_dir/jobs``); same host-path rule as
    ``repos_dir``, and on the same filesystem as it for overlay workspaces."""
    job_workspace_mode: WorkspaceMode = WorkspaceMode.AUTO
    """overlay, copy, or auto (overlay if a probe mount works, else copy)."""
    job_concurrency: int = Field(default=4, ge=1, le=1000)
    """Jobs running (pulling, preparing or running their session) at once, deployment-wide."""
    job_concurrency_per_user: int = Field(default=2, ge=1, le=1000)
    """Jobs of one user running at once; the queue is fair across users."""
    job_max_queued: int = Field(default=10_000, ge=1)
    """Jobs waiting in the queue, deployment-wide; more are refused (429)."""
    job_timeout_s: int = Field(default=1800, ge=1)
    """A job's run time limit when it gives none (seconds; its ``timeout_s`` may be lower or
    up to ``job_max_timeout_s``)."""
    job_max_timeout_s: int = Field(default=4 * 3600, ge=1)
    """The longest ``timeout_s`` a job may ask for."""
    job_workspace_retention_s: int = Field(default=7 * 86400, ge=0)
    """A finished job's workspace (and uploads) is removed this long after it finished; the
    job and its result stay (0: kept until the job is deleted)."""
    job_max_file_bytes: int = Field(default=50 * 1024**2, ge=1)
    """Largest uploaded file."""
    job_max_files: int = Field(default=50, ge=1)
    """Uploaded files per job."""
    job_max_zip_bytes: int = Field(default=500 * 1024**2, ge=1)
    """Largest unpacked size of an uploaded zip workspace."""
