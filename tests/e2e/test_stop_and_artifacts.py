"""Stop and artifacts under real Docker: a stop waits for the last turn's files, large files are
streamed into S3 (multipart), and concurrent stops do not starve the health checks."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import pytest
from websockets.asyncio.client import connect

from tests.conftest import Api
from tests.e2e.helpers import collect_until, turn_done

pytestmark = pytest.mark.e2e


async def _create(api: Api) -> str:
    r = await api.http.post("/api/v1/sessions", json={})
    assert r.status_code == 201, r.text
    return str(r.json()["session_id"])


async def _chat(api: Api, sid: str, prompt: str) -> str:
    r = await api.http.post(f"/api/v1/sessions/{sid}/chat", json={"prompt": prompt})
    assert r.status_code == 202, r.text
    return str(r.json()["message_id"])


async def test_a_stop_right_after_a_turn_keeps_that_turns_artifacts(make_api: Any) -> None:
    """The container used to be removed before the ledger copied the last turn's files."""
    api: Api = make_api()
    sid = await _create(api)
    prompt = "bash head -c 90000000 /dev/zero > late.bin && echo 'the end' > late.txt"
    async with connect(api.stream_url(sid), max_size=None) as ws:
        mid = await _chat(api, sid, prompt)
        await collect_until(ws, turn_done(mid))
    # At once: copying 90 MB out of the container takes longer than docker stop.
    r = await api.http.post(f"/api/v1/sessions/{sid}/stop")
    assert r.status_code == 200 and r.json()["status"] == "stopped"
    listing = (await api.http.get(f"/api/v1/sessions/{sid}/artifacts")).json()["artifacts"]
    assert sorted((a["path"], a["size"]) for a in listing) == [
        ("late.bin", 90_000_000),
        ("late.txt", 8),
    ]
    body = await api.http.get(f"/api/v1/sessions/{sid}/artifacts/late.txt")
    assert body.text == "the end\n"
    message = (await api.http.get(f"/api/v1/sessions/{sid}/messages/{mid}")).json()
    assert message["status"] == "completed" and not message["errors"], message


async def test_a_large_artifact_is_streamed_into_s3_and_back(make_api: Any) -> None:
    """40 MB of random bytes: multipart upload, streamed download, same sha256."""
    api: Api = make_api()
    sid = await _create(api)
    r = await api.http.post(
        f"/api/v1/sessions/{sid}/chat",
        json={
            "prompt": "bash head -c 40000000 /dev/urandom > big.bin && sha256sum big.bin",
            "stream": False,
        },
    )
    assert r.status_code == 200, r.text
    expected = (r.json()["result"] or "").split("Output:")[-1].split()[0]
    listing = (await api.http.get(f"/api/v1/sessions/{sid}/artifacts")).json()["artifacts"]
    (big,) = [a for a in listing if a["path"] == "big.bin"]
    assert big["size"] == 40_000_000 and big["sha256"] == expected
    digest = hashlib.sha256()
    size = 0
    async with api.http.stream("GET", f"/api/v1/sessions/{sid}/artifacts/big.bin") as response:
        assert response.status_code == 200
        assert response.headers["content-length"] == "40000000"
        async for chunk in response.aiter_bytes():
            digest.update(chunk)
            size += len(chunk)
    assert size == 40_000_000 and digest.hexdigest() == expected


async def test_six_concurrent_stops_leave_health_green(make_api: Any) -> None:
    """Docker calls have their own thread pool: slow stops no longer starve /health."""
    api: Api = make_api()
    sids = [await _create(api) for _ in range(6)]
    for sid in sids:
        r = await api.http.post(
            f"/api/v1/sessions/{sid}/chat", json={"prompt": "echo up", "stream": False}
        )
        assert r.status_code == 200, r.text
    stops = [asyncio.create_task(api.http.post(f"/api/v1/sessions/{sid}/stop")) for sid in sids]
    checks: list[int] = []
    while not all(t.done() for t in stops):
        checks.append((await api.http.get("/health")).status_code)
        await asyncio.sleep(0.2)
    assert [t.result().status_code for t in stops] == [200] * 6
    assert checks and set(checks) == {200}, checks
