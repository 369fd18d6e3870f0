"""Sessions: the one place that combines the database, the runtime, Redis and the artifact store.

``SessionService`` is assembled from its parts (one module each); lookups and authorization are
here."""

from __future__ import annotations

from collections.abc import AsyncIterator

from sqlalchemy import func
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.db.models import (
    Artifact,
    Session,
    SessionStatus,
)
from gateway.errors import (
    NotFound,
)
from gateway.services import family
from gateway.services.artifacts import safe_relative_path
from gateway.services.creation import Creation
from gateway.services.pause import PauseResume
from gateway.services.provision import config_volume_name, workspace_volume_name


class SessionService(Creation, PauseResume):
    """Operations on sessions; callers are authorised with :meth:`authorize`.

    Its parts: creation.py (create, spawn), provision.py (containers, volumes, Redis access),
    turns.py (chat, wait, interrupt), shutdown.py (stop, delete), pause.py (pause, resume);
    lookups live here.
    """

    # ------------------------------------------------------------------ lookups, authz

    async def list_sessions(
        self,
        *,
        db: AsyncSession,
        owner: str,
        status: SessionStatus | None,
        limit: int,
        offset: int,
    ) -> tuple[list[Session], int]:
        """A page of the owner's sessions, newest first, and the total count."""
        query = select(Session).where(Session.owner == owner)
        counter = select(func.count()).select_from(Session).where(Session.owner == owner)
        if status is not None:
            query = query.where(Session.status == status)
            counter = counter.where(Session.status == status)
        total = (await db.exec(counter)).one()
        rows = await db.exec(
            query.order_by(col(Session.created_at).desc()).offset(offset).limit(limit)
        )
        return list(rows.all()), int(total)

    async def child_ids(self, *, db: AsyncSession, session_id: str) -> list[str]:
        """Ids of the sessions whose parent is ``session_id``."""
        return [c.id for c in await family.children_of(db, session_id)]

    async def list_artifacts(self, *, db: AsyncSession, session: Session) -> list[Artifact]:
        """Collected files of the session, by path."""
        rows = await db.exec(
            select(Artifact).where(Artifact.session_id == session.id).order_by(col(Artifact.path))
        )
        return list(rows.all())

    async def open_artifact(
        self, *, db: AsyncSession, session: Session, path: str
    ) -> tuple[Artifact, AsyncIterator[bytes]]:
        """Metadata and a chunk stream of one artifact; InvalidRequest on traversal, NotFound
        if absent (from the database or from storage)."""
        clean = safe_relative_path(path)
        artifact = await db.get(Artifact, (session.id, clean))
        if artifact is None:
            raise NotFound(f"artifact {clean} not found in session {session.id}")
        try:
            chunks = await self.store.open(session.id, clean)
        except FileNotFoundError as exc:
            raise NotFound(f"artifact {clean} is recorded but missing from storage") from exc
        return artifact, chunks


__all__ = ["SessionService", "config_volume_name", "workspace_volume_name"]
