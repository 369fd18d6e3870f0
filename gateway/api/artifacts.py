"""Artifact resource: files the agent created or changed in /workspace."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from gateway.db.models import as_utc
from gateway.deps import DbDep, OwnedSession, ServiceDep
from gateway.schemas import ArtifactList, ArtifactPublic
from gateway.services.artifacts import content_type_of

router = APIRouter(prefix="/sessions/{session_id}/artifacts", tags=["artifacts"])


@router.get("")
async def list_artifacts(session: OwnedSession, db: DbDep, service: ServiceDep) -> ArtifactList:
    """Every collected file with size, sha256 and the turn that last changed it."""
    rows = await service.list_artifacts(db=db, session=session)
    return ArtifactList(
        session_id=session.id,
        artifacts=[
            ArtifactPublic(
                path=a.path,
                size=a.size,
                sha256=a.sha256,
                content_type=content_type_of(a.path),
                turn_id=a.turn_id,
                updated_at=as_utc(a.updated_at) or a.updated_at,
            )
            for a in rows
        ],
    )


@router.get("/{path:path}")
async def download_artifact(
    path: str, session: OwnedSession, db: DbDep, service: ServiceDep
) -> StreamingResponse:
    """The file's bytes, streamed. Paths are relative to /workspace; '..' and absolute paths
    are 422."""
    artifact, chunks = await service.open_artifact(db=db, session=session, path=path)
    await db.close()  # the body streams without a database connection
    return StreamingResponse(
        chunks,
        media_type=content_type_of(artifact.path),
        headers={
            "ETag": f'"{artifact.sha256}"',
            "X-Artifact-Sha256": artifact.sha256,
            "Content-Length": str(artifact.size),
        },
    )
