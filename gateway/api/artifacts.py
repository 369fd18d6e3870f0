"""Artifact resource: files the agent created or changed in /workspace."""

from __future__ import annotations

from fastapi import APIRouter, Response

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
) -> Response:
    """The file's bytes. Paths are relative to /workspace; '..' and absolute paths are 422."""
    artifact, data = await service.read_artifact(db=db, session=session, path=path)
    return Response(
        content=data,
        media_type=content_type_of(artifact.path),
        headers={"ETag": f'"{artifact.sha256}"', "X-Artifact-Sha256": artifact.sha256},
    )
