"""Alembic environment: runs on the connection handed over by ``gateway.db.migrate``.

``alembic upgrade head`` from a shell also works: it reads ``sqlalchemy.url`` (a synchronous
URL, e.g. ``sqlite:///…/ccgate.db`` or ``postgresql+psycopg://…``) from the command line
(``-x url=…``) when no connection is handed over.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine
from sqlmodel import SQLModel

from gateway.db import models  # noqa: F401  (registers the tables)

config = context.config
target_metadata = SQLModel.metadata


def run() -> None:
    """Upgrade or downgrade on the given connection (or one opened from ``-x url=``)."""
    connection = config.attributes.get("connection")
    if connection is None:
        url = context.get_x_argument(as_dictionary=True).get("url")
        if not url:
            raise SystemExit("pass -x url=<synchronous database URL>")
        with create_engine(url).connect() as conn:
            context.configure(
                connection=conn, target_metadata=target_metadata, render_as_batch=True
            )
            with context.begin_transaction():
                context.run_migrations()
        return
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


run()
