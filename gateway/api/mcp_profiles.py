"""MCP profile resource: reusable, named sets of MCP servers whose secrets are stored encrypted
(``/api/v1/mcp-profiles``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response, status

from gateway.batch_schemas import McpProfileBody, McpProfileList, McpProfilePublic
from gateway.deps import DbDep, UserToken
from gateway.errors import InvalidRequest
from gateway.services.mcp_profiles import McpProfiles

router = APIRouter(prefix="/mcp-profiles", tags=["mcp-profiles"])


def get_profiles(request: Request) -> McpProfiles:
    """The process's McpProfiles."""
    profiles: McpProfiles = request.app.state.mcp_profiles
    return profiles


Profiles = Annotated[McpProfiles, Depends(get_profiles)]


@router.post("", status_code=status.HTTP_201_CREATED)
async def create(
    body: McpProfileBody, user: UserToken, db: DbDep, profiles: Profiles
) -> McpProfilePublic:
    """Save a profile. 422 names the server and field to fix; 409 for a name you use."""
    profile = await profiles.create(
        db, owner=user.user, name=body.name, description=body.description, servers=body.servers
    )
    return McpProfilePublic.of(profile)


@router.get("")
async def list_profiles(
    user: UserToken,
    db: DbDep,
    profiles: Profiles,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> McpProfileList:
    """Your profiles by name (secret values never shown)."""
    rows, total = await profiles.list(db, owner=user.user, limit=limit, offset=offset)
    return McpProfileList(
        profiles=[McpProfilePublic.of(p) for p in rows], total=total, limit=limit, offset=offset
    )


@router.get("/{name}")
async def get_profile(
    name: str, user: UserToken, db: DbDep, profiles: Profiles
) -> McpProfilePublic:
    """One profile: its servers and the names of their secrets."""
    return McpProfilePublic.of(await profiles.get(db, owner=user.user, name=name))


@router.put("/{name}")
async def replace(
    name: str, body: McpProfileBody, user: UserToken, db: DbDep, profiles: Profiles
) -> McpProfilePublic:
    """Replace a profile's description and servers (give every secret again)."""
    if body.name != name:
        raise InvalidRequest(f"the body's name {body.name!r} must be the path's {name!r}")
    profile = await profiles.replace(
        db, owner=user.user, name=name, description=body.description, servers=body.servers
    )
    return McpProfilePublic.of(profile)


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_profile(name: str, user: UserToken, db: DbDep, profiles: Profiles) -> Response:
    """Remove a profile."""
    await profiles.delete(db, owner=user.user, name=name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
