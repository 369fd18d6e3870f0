"""Repository resource: git repositories registered once and cloned on the gateway's host, for
jobs to run on (``/api/v1/repositories``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response, status

from gateway.batch_schemas import RepositoryCreate, RepositoryList, RepositoryPublic
from gateway.deps import DbDep, UserToken
from gateway.services.repositories import RepositoryService

router = APIRouter(prefix="/repositories", tags=["repositories"])


def get_repositories(request: Request) -> RepositoryService:
    """The process's RepositoryService."""
    service: RepositoryService = request.app.state.repositories
    return service


Repos = Annotated[RepositoryService, Depends(get_repositories)]


@router.post("", status_code=status.HTTP_202_ACCEPTED)
async def register(
    body: RepositoryCreate, user: UserToken, db: DbDep, repos: Repos
) -> RepositoryPublic:
    """Register a repository; 202 with ``status: cloning`` — poll ``GET
    /repositories/{name}`` until ``ready`` or ``failed`` (``error`` says why). 422 for a
    URL the gateway does not clone (the message says which are allowed), 409 for a name you
    already use."""
    repo = await repos.register(
        db,
        owner=user.user,
        name=body.name,
        git_url=body.git_url,
        branch=body.branch,
        description=body.description,
        deploy_key=body.deploy_key,
    )
    return RepositoryPublic.of(repo)


@router.get("")
async def list_repositories(
    user: UserToken,
    db: DbDep,
    repos: Repos,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> RepositoryList:
    """Your repositories by name."""
    rows, total = await repos.list(db, owner=user.user, limit=limit, offset=offset)
    return RepositoryList(
        repositories=[RepositoryPublic.of(r) for r in rows], total=total, limit=limit, offset=offset
    )


@router.get("/{name}")
async def get_repository(name: str, user: UserToken, db: DbDep, repos: Repos) -> RepositoryPublic:
    """One repository with its clone's git metadata (branch, head commit, date, subject, size)."""
    return RepositoryPublic.of(await repos.get(db, owner=user.user, name=name))


@router.post("/{name}/pull", status_code=status.HTTP_202_ACCEPTED)
async def pull(name: str, user: UserToken, db: DbDep, repos: Repos) -> RepositoryPublic:
    """Fetch the branch and move the clone to its head, in the background (``pulling`` until
    done; a failed repository is cloned again). 409 while a clone or pull runs."""
    return RepositoryPublic.of(await repos.pull(db, owner=user.user, name=name))


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_repository(name: str, user: UserToken, db: DbDep, repos: Repos) -> Response:
    """Remove the repository and its clone. 409 while a clone or pull runs."""
    await repos.delete(db, owner=user.user, name=name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
