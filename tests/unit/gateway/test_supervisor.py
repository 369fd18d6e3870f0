"""The Supervisor restarts a crashed loop after a backoff and reports it down meanwhile."""

from __future__ import annotations

import asyncio

from gateway.supervisor import Supervisor


async def test_a_crashed_task_is_reported_down_then_restarted() -> None:
    failures: list[str] = []
    runs = 0
    release = asyncio.Event()

    async def flaky() -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise ValueError("first run fails")
        await release.wait()
        await asyncio.sleep(3600)

    supervisor = Supervisor(backoff_s=0.2, on_failure=failures.append)
    supervisor.start("flaky", flaky)
    await asyncio.sleep(0.05)
    assert supervisor.down() == ["flaky"]
    state = supervisor.states["flaky"]
    assert state.restarts == 1 and state.last_error == "ValueError: first run fails"
    assert failures == ["flaky"]
    await asyncio.sleep(0.3)
    assert supervisor.down() == [] and runs == 2
    await supervisor.close()


async def test_a_loop_that_returns_is_treated_as_a_failure() -> None:
    async def returns() -> None:
        return None

    supervisor = Supervisor(backoff_s=10)
    supervisor.start("returns", returns)
    await asyncio.sleep(0.05)
    assert supervisor.states["returns"].last_error == "RuntimeError: the loop returned"
    await supervisor.close()
