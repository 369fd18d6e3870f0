"""What every user-owned, user-named resource (repositories, MCP profiles) does alike: check a
name, page through the owner's rows by name, fetch one by name."""

from __future__ import annotations

import re
from typing import Any, TypeVar

from sqlalchemy import func
from sqlmodel import SQLModel, col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.errors import InvalidRequest, NotFound

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")

Row = TypeVar("Row", bound=SQLModel)


def check_name(name: str) -> None:
    """Raises InvalidRequest unless ``name`` is 1-100 letters, digits, '.', '_' or '-',
    starting with a letter or digit."""
    if not NAME.match(name):
        raise InvalidRequest(
            "name must be 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )


async def page(
    db: AsyncSession, model: type[Row], *, owner: str, limit: int, offset: int
) -> tuple[list[Row], int]:
    """The owner's rows of ``model`` ordered by name, one page, and how many there are."""
    table: Any = model
    rows = await db.exec(
        select(model)
        .where(col(table.owner) == owner)
        .order_by(col(table.name))
        .limit(limit)
        .offset(offset)
    )
    total = (
        await db.exec(select(func.count()).select_from(model).where(col(table.owner) == owner))
    ).one()
    return list(rows.all()), total


async def by_name(db: AsyncSession, model: type[Row], *, owner: str, name: str, what: str) -> Row:
    """The owner's row of ``model`` called ``name``; NotFound ("<what> 'name' not found")
    otherwise, also when it is another user's."""
    table: Any = model
    row = (
        await db.exec(select(model).where(col(table.owner) == owner, col(table.name) == name))
    ).first()
    if row is None:
        raise NotFound(f"{what} {name!r} not found")
    return row
