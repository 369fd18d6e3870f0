"""The wrapper's service, after ``python -m wrapper`` (``__main__``) has read its config and maybe
started the CLI early: take the session's SessionSpec (the early launch's, else from Redis, where
the gateway wrote it; a warm-pool container can start here before its session exists), then run
the SessionRunner until SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from wrapper.config import WrapperConfig
from wrapper.launch import EarlyLaunch
from wrapper.outbox import Outbox
from wrapper.protocol import Claim, SessionSpec, claim_key, pool_ready_key, spec_key
from wrapper.publisher import EventPublisher
from wrapper.runner import PendingEvents, SessionRunner, StartupFailed

logger = logging.getLogger("wrapper")


async def wait_for_spec(
    client: aioredis.Redis, session_id: str, stop: asyncio.Event
) -> SessionSpec | None:
    """Poll for the session's spec (bounded backoff) until it appears or a stop is requested."""
    delay = 0.05
    while not stop.is_set():
        try:
            raw = await client.get(spec_key(session_id))
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            logger.warning("waiting for redis: %s", exc)
            raw = None
        if raw is not None:
            return SessionSpec.from_json(raw)
        try:
            await asyncio.wait_for(stop.wait(), delay)
        except TimeoutError:
            delay = min(delay * 2, 1.0)
    return None


async def amain(config: WrapperConfig, early: EarlyLaunch | None) -> int:
    """Run the wrapper; returns the process exit status."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def client() -> aioredis.Redis:
        return aioredis.Redis.from_url(
            config.redis_url,
            socket_connect_timeout=5,
            # Above the 2 s BLPOP timeout of the input and control loops.
            socket_timeout=15,
            socket_keepalive=True,
            health_check_interval=15,
            retry=Retry(ExponentialBackoff(cap=2.0), 3),
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
        )

    main, blocking_input, blocking_control = client(), client(), client()
    try:
        spec = (
            early.spec if early is not None else await wait_for_spec(main, config.session_id, stop)
        )
        if spec is None:
            return 0
        if spec.pooled:
            return await _serve_pooled(config, spec, stop, (main, blocking_input, blocking_control))
        publisher = await start_publisher(main, config)
        runner = SessionRunner(
            config,
            spec,
            publisher=publisher,
            input_redis=blocking_input,
            control_redis=blocking_control,
            state_redis=main,
            early=early,
        )
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, runner.request_stop)
        if stop.is_set():
            runner.request_stop()
        return await runner.run()
    finally:
        for c in (main, blocking_input, blocking_control):
            await c.aclose()


async def start_publisher(client: aioredis.Redis, config: WrapperConfig) -> EventPublisher:
    """The session's publisher (outbox in the state dir), started; waits while Redis is
    unreachable (the container is useless without it; the gateway's timeouts bound it)."""
    publisher = EventPublisher(client, config.session_id, outbox=Outbox(config.state_dir))
    while True:
        try:
            await publisher.start()
            return publisher
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            logger.warning("waiting for redis: %s", exc)
            await asyncio.sleep(0.5)


async def wait_for_claim(
    client: aioredis.Redis, slot_id: str, runner: SessionRunner, stop: asyncio.Event
) -> Claim | None:
    """BLPOP the slot's claim; None when a stop is requested or the CLI died meanwhile (the
    container then exits and the pool replaces it). A malformed claim is logged and skipped."""
    while not stop.is_set() and runner.cli_alive:
        try:
            item = await client.blpop([claim_key(slot_id)], timeout=1)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            logger.warning("waiting for a claim: redis: %s", exc)
            await asyncio.sleep(0.5)
            continue
        if item is None:
            continue
        try:
            return Claim.from_json(item[1])
        except (ValueError, KeyError) as exc:
            logger.error("malformed claim ignored: %s", exc)
    return None


async def _serve_pooled(
    config: WrapperConfig,
    profile: SessionSpec,
    stop: asyncio.Event,
    clients: tuple[aioredis.Redis, aioredis.Redis, aioredis.Redis],
) -> int:
    """Warm pool: start the CLI for ``profile``, report ready, wait for the claim, then serve
    the session (whose id this container already carries)."""
    main, blocking_input, blocking_control = clients
    runner = SessionRunner(
        config,
        profile,
        publisher=PendingEvents(),
        input_redis=blocking_input,
        control_redis=blocking_control,
        state_redis=main,
    )
    started = time.monotonic()
    try:
        await runner.prestart()
    except StartupFailed as exc:
        logger.error("warm-pool CLI did not start: %s", exc)
        return 1
    ready = json.dumps({"ready_ms": int((time.monotonic() - started) * 1000)})
    await main.rpush(pool_ready_key(config.session_id), ready)
    claim = await wait_for_claim(blocking_input, config.session_id, runner, stop)
    if claim is None:
        await runner.stop_cli()
        return 0 if stop.is_set() else 1
    spec = SessionSpec.from_json(claim.spec)
    if claim.session_id != config.session_id or spec.session_id != config.session_id:
        logger.error("claim for another session (%s) refused", claim.session_id)
        await runner.stop_cli()
        return 1
    publisher = await start_publisher(main, config)
    runner.bind(spec, publisher=publisher, claimed_at=claim.claimed_at)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, runner.request_stop)
    if stop.is_set():
        runner.request_stop()
    return await runner.run()


def main(config: WrapperConfig, early: EarlyLaunch | None) -> None:
    """Configure logging, run the service, exit with its status."""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if early is not None:
        logger.info("claude started early from the spec in the environment, pid %s",
                    early.process.pid)  # fmt: skip
    sys.exit(asyncio.run(amain(config, early)))
