"""The engine's event stream, followed on a thread of its own: container ``die`` and ``oom``
events of one deployment, handed to the loop through a bounded queue.

``GET /events`` is a long-lived HTTP response (no read timeout); reading it blocks, so it gets a
dedicated daemon thread rather than a slot of the Docker pool. The queue holds at most
``max_buffered`` events: past that, events are dropped and the consumer is told (``None``) to
reconcile by listing instead. Closing the iterator closes the response, which ends the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

import docker

from gateway.errors import DependencyUnavailable
from gateway.services.runtime.base import ContainerDeath

logger = logging.getLogger(__name__)

_EOF = object()


def death_of(event: dict[str, Any]) -> ContainerDeath | None:
    """A ``die`` or ``oom`` event (Docker's ``{Type, Action, Actor: {ID, Attributes}, time,
    timeNano}``) as a ContainerDeath; None for anything else. Attributes carry the
    container's labels and, for ``die``, its ``exitCode`` (a string)."""
    action = event.get("Action")
    if event.get("Type") != "container" or action not in ("die", "oom"):
        return None
    actor = event.get("Actor") or {}
    attributes = {str(k): str(v) for k, v in (actor.get("Attributes") or {}).items()}
    code = attributes.pop("exitCode", None)
    nanos = event.get("timeNano")
    return ContainerDeath(
        action=str(action),
        container_id=str(actor.get("ID") or event.get("id") or ""),
        labels=attributes,
        exit_code=int(code) if code is not None and code.lstrip("-").isdigit() else None,
        at=nanos / 1e9 if isinstance(nanos, int) else float(event.get("time") or 0),
    )


async def follow_deaths(
    client: Callable[[], docker.DockerClient],
    labels: list[str],
    *,
    max_buffered: int = 1000,
) -> AsyncIterator[ContainerDeath | None]:
    """Yield each container death of containers carrying every label in ``labels``
    (``key`` or ``key=value``); ``None`` after events were dropped. Raises
    DependencyUnavailable("docker") when the stream cannot be opened or ends."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[object] = asyncio.Queue(max_buffered)
    dropped = False
    filters = {"type": "container", "event": ["die", "oom"], "label": labels}
    try:
        stream = await asyncio.to_thread(lambda: client().events(decode=True, filters=filters))
    except Exception as exc:
        raise DependencyUnavailable("docker", f"cannot follow events: {exc}") from exc

    def put(item: object) -> None:
        nonlocal dropped
        try:
            queue.put_nowait(item)
        except asyncio.QueueFull:
            dropped = True

    def pump() -> None:
        outcome: object = _EOF
        try:
            for event in stream:
                death = death_of(event) if isinstance(event, dict) else None
                if death is not None:
                    loop.call_soon_threadsafe(put, death)
        except Exception as exc:
            outcome = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
            loop.call_soon_threadsafe(put, outcome)

    thread = threading.Thread(target=pump, name="docker-events", daemon=True)
    thread.start()
    try:
        while True:
            item = await queue.get()
            if dropped:
                dropped = False
                yield None
            if item is _EOF:
                raise DependencyUnavailable("docker", "the event stream ended")
            if isinstance(item, Exception):
                raise DependencyUnavailable("docker", f"event stream failed: {item}")
            if isinstance(item, ContainerDeath):
                yield item
    finally:
        with contextlib.suppress(Exception):
            stream.close()
