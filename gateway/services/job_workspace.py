"""Job workspaces: the ``/workspace`` of a job's session, made on the gateway's host.

A job on a repository gets a copy-on-write view of the repository's clone:

- **overlay** — a Docker local-driver volume of type overlay: the clone generation
  (``CCGATE_REPOS_DIR/<repo>/g<N>``, never changed once made) is the read-only lower layer,
  ``CCGATE_JOBS_DIR/<job>/upper`` takes the job's writes. Made in milliseconds whatever the
  repository's size; the engine mounts it when the container starts.
- **copy** — ``cp -a --reflink=auto`` of the clone into ``CCGATE_JOBS_DIR/<job>/ws``, bound
  into a volume: a reflink clone (instant) on XFS/Btrfs, a full copy elsewhere.

``auto`` (the default) probes once whether the engine can mount an overlay volume of these
directories and falls back to copy when it cannot (the probe's reason is logged). A job on a
git URL, a zip or nothing gets a plain directory ``ws`` bound the same way. Every workspace is
a host directory the gateway reads directly (job files API, workspace_files.py) and writes the
uploads into before the session starts. Both directories must be the same path on the engine's
host and in the gateway (settings). Files are owned by the session user (uid 1000) so the agent
can change them; that needs the gateway to run as root (it does in the compose file) — as any
other user they keep its owner and the agent can only read them (logged once).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gateway.batch_config import WorkspaceMode
from gateway.config import Settings
from gateway.errors import ContainerStartFailed, GatewayError
from gateway.services.provision import job_volume_name
from gateway.services.runtime import ContainerRuntime
from gateway.services.runtime.base import LABEL_OWNER

logger = logging.getLogger(__name__)

SESSION_UID = 1000
"""The uid (and gid) the CLI and the agent's tools run as in a session container."""
LABEL_JOB = "ccgate.job"
UPLOADS_IN_WORKSPACE = ".ccgate/uploads"
"""Where a job's uploaded files are put, relative to ``/workspace``."""
COPY_TIMEOUT_S = 1800.0


class WorkspaceFailed(GatewayError):
    """A job workspace could not be made (the job fails with this message)."""

    status_code = 500
    code = "workspace_failed"


@dataclass(frozen=True)
class PreparedWorkspace:
    """Where a job's workspace is: ``mode`` (overlay, copy, reflink, empty), its volume, the
    host directory that takes the job's writes (``upper`` — overlay's upper layer — or the
    workspace itself) and, for overlay, the read-only clone below it. Stored in
    ``job.workspace``."""

    mode: str
    volume: str
    upper: str
    lower: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The ``job.workspace`` column's value."""
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> PreparedWorkspace:
        """Read back :meth:`to_json`."""
        return cls(
            mode=str(raw["mode"]),
            volume=str(raw["volume"]),
            upper=str(raw["upper"]),
            lower=str(raw["lower"]) if raw.get("lower") else None,
        )


async def _run(*argv: str, timeout_s: float) -> None:
    """Run a command (no shell); raises WorkspaceFailed with its stderr on failure."""
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(process.communicate(), timeout_s)
    except (TimeoutError, asyncio.CancelledError):
        process.kill()
        await process.wait()
        raise
    if process.returncode != 0:
        tail = err.decode(errors="replace").strip()[-500:]
        raise WorkspaceFailed(f"{argv[0]} failed (exit {process.returncode}): {tail}")


_warned_owner = False


async def own_by_session_user(path: Path) -> None:
    """Give ``path`` and everything under it to the session user (uid/gid 1000) so the agent
    can change it; only root can (any other gateway user: logged once, left as it is)."""
    global _warned_owner
    if os.geteuid() == SESSION_UID:
        return
    if os.geteuid() != 0:
        if not _warned_owner:
            _warned_owner = True
            logger.warning(
                "the gateway is not root: workspace files keep uid %d and the agent can only "
                "read them",
                os.geteuid(),
            )
        return
    await _run("chown", "-R", f"{SESSION_UID}:{SESSION_UID}", "--", str(path), timeout_s=600)


class JobWorkspaces:
    """Makes and removes job workspaces (see the module doc)."""

    def __init__(self, settings: Settings, runtime: ContainerRuntime) -> None:
        self._settings = settings
        self._runtime = runtime
        self._mode: WorkspaceMode | None = None
        self._probe_lock = asyncio.Lock()
        for where in (settings.jobs_path, settings.repos_path):
            if "," in str(where) or ":" in str(where):
                raise ValueError(f"{where}: job and repository directories cannot contain , or :")

    def job_dir(self, job_id: str) -> Path:
        """The job's directory: ``uploads/``, and ``upper/`` + ``work/`` or ``ws/``."""
        return self._settings.jobs_path / job_id

    def zip_path(self, job_id: str) -> Path:
        """Where a zip job's archive waits for its start."""
        return self.job_dir(job_id) / "source.zip"

    def uploads_dir(self, job_id: str) -> Path:
        """Where a job's uploaded files wait for its start."""
        return self.job_dir(job_id) / "uploads"

    async def mode(self) -> WorkspaceMode:
        """overlay or copy: the setting, or for ``auto`` the probe's verdict (made once)."""
        if self._mode is not None:
            return self._mode
        async with self._probe_lock:
            if self._mode is None:
                wanted = self._settings.job_workspace_mode
                self._mode = wanted if wanted is not WorkspaceMode.AUTO else await self._probe()
            return self._mode

    async def _probe(self) -> WorkspaceMode:
        base = self._settings.jobs_path / f".probe-{uuid.uuid4().hex[:8]}"
        volume = f"ccgate-probe-{base.name[7:]}"
        try:
            for part in ("lower", "upper", "work"):
                (base / part).mkdir(parents=True)
            (base / "lower" / "probe").write_text("ok\n")
            await self._runtime.create_volume(volume, {}, _overlay_opts(base / "lower", base))
            await self._runtime.check_volume(volume, image=self._settings.image)
            logger.info("job workspaces: overlay volumes work here")
            return WorkspaceMode.OVERLAY
        except (ContainerStartFailed, OSError) as exc:
            logger.warning("job workspaces: overlay unavailable (%s); copying instead", exc)
            return WorkspaceMode.COPY
        finally:
            try:
                await self._runtime.remove_volume(volume)
            except GatewayError as exc:
                logger.warning("job workspaces: probe volume %s left behind: %s", volume, exc)
            await asyncio.to_thread(shutil.rmtree, base, ignore_errors=True)

    async def from_clone(self, job_id: str, owner: str, clone: Path) -> PreparedWorkspace:
        """A copy-on-write workspace of ``clone`` (a repository generation). Raises
        WorkspaceFailed, or ContainerStartFailed / DependencyUnavailable from the engine."""
        base = self.job_dir(job_id)
        volume = job_volume_name(job_id)
        labels = {LABEL_JOB: job_id, LABEL_OWNER: owner}
        if await self.mode() is WorkspaceMode.OVERLAY:
            for part in ("upper", "work"):
                (base / part).mkdir(parents=True, exist_ok=True)
            await own_by_session_user(base / "upper")
            await self._runtime.create_volume(volume, labels, _overlay_opts(clone, base))
            return PreparedWorkspace("overlay", volume, str(base / "upper"), str(clone))
        target = base / "ws"
        await asyncio.to_thread(shutil.rmtree, target, ignore_errors=True)
        target.mkdir(parents=True)
        await _run(
            "cp", "-a", "--reflink=auto", f"{clone}/.", f"{target}/", timeout_s=COPY_TIMEOUT_S
        )
        await own_by_session_user(target)
        await self._runtime.create_volume(volume, labels, _bind_opts(target))
        return PreparedWorkspace("copy", volume, str(target))

    async def directory(self, job_id: str, owner: str) -> tuple[Path, PreparedWorkspace]:
        """An empty workspace directory for the caller to fill (a git URL's clone, a zip),
        then hand to :meth:`finish_directory`."""
        target = self.job_dir(job_id) / "ws"
        await asyncio.to_thread(shutil.rmtree, target, ignore_errors=True)
        target.mkdir(parents=True)
        volume = job_volume_name(job_id)
        return target, PreparedWorkspace("empty", volume, str(target))

    async def finish_directory(self, job_id: str, owner: str, ws: PreparedWorkspace) -> None:
        """Own the filled directory by the session user and make its volume."""
        await own_by_session_user(Path(ws.upper))
        labels = {LABEL_JOB: job_id, LABEL_OWNER: owner}
        await self._runtime.create_volume(ws.volume, labels, _bind_opts(Path(ws.upper)))

    async def add_uploads(self, job_id: str, ws: PreparedWorkspace) -> None:
        """Put the job's uploaded files under ``.ccgate/uploads`` of the workspace (before
        its session starts) and keep that directory out of git's view of a clone."""
        uploads = self.uploads_dir(job_id)
        upper = Path(ws.upper)
        if uploads.is_dir() and any(uploads.iterdir()):
            target = upper / UPLOADS_IN_WORKSPACE
            target.parent.mkdir(parents=True, exist_ok=True)
            await asyncio.to_thread(shutil.copytree, uploads, target, dirs_exist_ok=True)
            await own_by_session_user(upper / ".ccgate")
        below = Path(ws.lower) if ws.lower else upper
        if (below / ".git").is_dir():
            exclude = upper / ".git" / "info" / "exclude"
            existing = below / ".git" / "info" / "exclude"
            text = existing.read_text() if existing.is_file() else ""
            exclude.parent.mkdir(parents=True, exist_ok=True)
            exclude.write_text(
                text + ("" if text.endswith("\n") or not text else "\n") + ".ccgate/\n"
            )
            await own_by_session_user(upper / ".git")

    async def remove(self, job_id: str, ws: PreparedWorkspace | None) -> None:
        """Remove the job's volume (the engine unmounts it) and its directory. Raises
        DependencyUnavailable when the engine cannot be reached (the directory is kept)."""
        await self._runtime.remove_volume(job_volume_name(job_id))
        await asyncio.to_thread(shutil.rmtree, self.job_dir(job_id), ignore_errors=True)


def _overlay_opts(lower: Path, base: Path) -> dict[str, str]:
    return {
        "type": "overlay",
        "device": "overlay",
        "o": f"lowerdir={lower},upperdir={base / 'upper'},workdir={base / 'work'}",
    }


def _bind_opts(directory: Path) -> dict[str, str]:
    return {"type": "none", "device": str(directory), "o": "bind"}
