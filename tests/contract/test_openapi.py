"""Schemathesis against a running gateway: every /api/v1 operation, with generated valid and
invalid input, answers no 5xx, only status codes its OpenAPI document declares, and bodies
that match the declared schemas.

Operations that start containers (``POST /sessions``, ``/spawn``, ``POST /jobs``,
``POST /api/tasks``) are left to the e2e tests;
every other operation runs against a real gateway on PostgreSQL, Redis and S3 (session ids
are generated, so most answers are the documented 404s; the two sessions made here are
reached through explicit examples).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.auth import mint_token
from gateway.db.engine import make_db_factory, make_engine
from gateway.db.models import Event, Session, SessionStatus, SpawnTree, Turn, TurnStatus, utcnow
from scripted_model import ScriptedModelServer
from tests.conftest import JWT_SECRET, full_stack_settings
from tests.containers import PostgresContainer, RedisContainer, S3Container
from tests.servers import GatewayServer

USER = "test-contract"
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
)
# They start containers (a created job or task is queued and run): the e2e tests cover them.
EXCLUDED = (
    "POST /api/v1/sessions",
    "POST /api/v1/sessions/{session_id}/spawn",
    "POST /api/v1/jobs",
    "POST /api/tasks",
)
# Left out on the real session: they would end the run's subject early, or (the SSE stream)
# follow it live for as long as the client stays.
ENDING = (
    "DELETE /api/v1/sessions/{session_id}",
    "POST /api/v1/sessions/{session_id}/stop",
    "GET /api/v1/sessions/{session_id}/events/stream",
)


@pytest.fixture(scope="module")
def contract_gateway(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisContainer,
    postgres_server: PostgresContainer,
    s3_server: S3Container,
    scripted_model: ScriptedModelServer,
) -> Iterator[GatewayServer]:
    gateway = GatewayServer(
        full_stack_settings(
            tmp_path_factory.mktemp("gw-contract"),
            redis_server,
            postgres_server,
            s3_server,
            scripted_model,
            rate_limit="",  # the fuzzer's pace is not what is under test here
        )
    ).start()
    yield gateway
    gateway.stop()


async def seed_stopped_session(gateway: GatewayServer, user: str) -> tuple[str, str]:
    """A stopped session of ``user`` with one finished turn and two events, written straight
    to the database (no container: the operations reach their own logic and answer 200s,
    409s, 422s). Returns (session id, message id)."""
    sid, mid = str(uuid.uuid4()), str(uuid.uuid4())
    engine = make_engine(gateway.settings.db_url)
    async with make_db_factory(engine)() as db:
        db.add(SpawnTree(root_id=sid, owner=user, live_sessions=0))
        db.add(
            Session(
                id=sid,
                owner=user,
                status=SessionStatus.STOPPED,
                workspace_volume=f"ccgate-ws-{sid}",
                root_id=sid,
            )
        )
        await db.flush()
        db.add(
            Turn(
                id=mid,
                session_id=sid,
                prompt="hello",
                status=TurnStatus.COMPLETED,
                result="Echo: hello",
                is_error=False,
                recorded_at=utcnow(),
                completed_at=utcnow(),
            )
        )
        for seq, kind in ((1, "ready"), (2, "turn_started")):
            envelope = {"seq": seq, "type": kind, "session_id": sid, "data": {}}
            db.add(Event(session_id=sid, seq=seq, type=kind, envelope=json.dumps(envelope)))
        await db.commit()
    await engine.dispose()
    return sid, mid


def _run(gateway: GatewayServer, tmp_path: Path, *extra: str, skip: tuple[str, ...] = ()) -> str:
    token = mint_token(key=JWT_SECRET, user=USER, ttl_s=3600)
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        *extra,
        "run",
        f"{gateway.url}/openapi.json",
        "--checks",
        ",".join(CHECKS),
        "--header",
        f"Authorization: Bearer {token}",
        "--max-examples",
        "25",
        "--request-timeout",
        "30",
        "--generation-deterministic",
        "--no-color",
    ]
    for name in (*EXCLUDED, *skip):
        command += ["--exclude-name", name]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=900, cwd=tmp_path, env=dict(os.environ)
    )
    report = result.stdout[-20000:] + result.stderr[-5000:]
    assert result.returncode == 0, report
    return report


def test_every_operation_keeps_its_contract_for_unknown_ids(
    contract_gateway: GatewayServer, tmp_path: Path
) -> None:
    """Generated ids: the 404 paths, validation of every parameter and body."""
    report = _run(contract_gateway, tmp_path)
    # Every operation of the document but the excluded ones (new routes are covered as added).
    paths = contract_gateway.app.openapi()["paths"]
    operations = [f"{m.upper()} {p}" for p, item in paths.items() for m in item]
    expected = len([o for o in operations if o not in EXCLUDED])
    assert f"Tested: {expected}" in report, report[-3000:]


async def test_every_operation_keeps_its_contract_on_a_real_session(
    contract_gateway: GatewayServer, tmp_path: Path
) -> None:
    """The ids of a real (stopped) session: the operations' own answers, 200s included.
    DELETE and stop are left out here (they would end the run's subject early)."""
    sid, mid = await seed_stopped_session(contract_gateway, USER)
    config = tmp_path / "schemathesis.toml"
    config.write_text(f'[parameters]\n"path.session_id" = "{sid}"\n"path.message_id" = "{mid}"\n')
    await asyncio.to_thread(
        _run, contract_gateway, tmp_path, "--config-file", str(config), skip=ENDING
    )
