"""Entry point of the session container: ``python -m wrapper``.

Reads WrapperConfig from the environment, waits for the session's SessionSpec in Redis (written by
the gateway; a warm-pool container can start here before its session exists), then runs the
SessionRunner until SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from wrapper.config import WrapperConfig
from wrapper.outbox import Outbox
from wrapper.protocol import SessionSpec, spec_key
from wrapper.publisher import EventPublisher
from wrapper.runner import SessionRunner

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


async def amain() -> int:
    """Run the wrapper; returns the process exit status."""
    config = WrapperConfig.from_env()
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
        spec = await wait_for_spec(main, config.session_id, stop)
        if spec is None:
            return 0
        publisher = EventPublisher(main, config.session_id, outbox=Outbox(config.state_dir))
        while True:
            try:
                await publisher.start()
                break
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                logger.warning("waiting for redis: %s", exc)
                await asyncio.sleep(0.5)
        runner = SessionRunner(
            config,
            spec,
            publisher=publisher,
            input_redis=blocking_input,
            control_redis=blocking_control,
            state_redis=main,
        )
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, runner.request_stop)
        if stop.is_set():
            runner.request_stop()
        return await runner.run()
    finally:
        for c in (main, blocking_input, blocking_control):
            await c.aclose()


def main() -> None:
    """Console entry."""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    sys.exit(asyncio.run(amain()))


if __name__ == "__main__":
    main()
