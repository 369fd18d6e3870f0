"""The engine's event stream when the engine is down: an outage the supervisor retries, not a
hang (the reaper's sweep covers the deaths missed meanwhile)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.errors import DependencyUnavailable
from gateway.services.runtime.docker import DockerRuntime


async def test_following_deaths_on_an_unreachable_engine_fails_fast_as_docker() -> None:
    runtime = DockerRuntime("tcp://127.0.0.1:1", deployment="test-down")
    with pytest.raises(DependencyUnavailable) as caught:
        await asyncio.wait_for(anext(runtime.deaths()), 30)
    assert caught.value.dependency == "docker"
    await runtime.close()
