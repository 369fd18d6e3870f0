"""Helpers for reading a session's WebSocket stream in tests."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

from websockets.asyncio.client import ClientConnection

Predicate = Callable[[dict[str, Any]], bool]


def turn_done(message_id: str) -> Predicate:
    """True on the turn_completed event of ``message_id``."""
    return lambda e: e.get("type") == "turn_completed" and e.get("turn_id") == message_id


async def collect_until(
    ws: ClientConnection, stop: Predicate, *, timeout_s: float = 90.0
) -> list[dict[str, Any]]:
    """Event envelopes (messages with a seq) up to and including the first matching ``stop``."""
    events: list[dict[str, Any]] = []

    async def _read() -> None:
        while True:
            message = json.loads(await ws.recv())
            if "seq" not in message:
                continue
            events.append(message)
            if stop(message):
                return

    await asyncio.wait_for(_read(), timeout_s)
    return events


async def final_message(http: Any, session_id: str, message_id: str, timeout_s: float = 30) -> Any:
    """GET the message until the ledger has recorded its final status (it trails the stream)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        body = (await http.get(f"/api/v1/sessions/{session_id}/messages/{message_id}")).json()
        if body["status"] not in ("queued", "running"):
            return body
        assert asyncio.get_running_loop().time() < deadline, f"{message_id} never finished"
        await asyncio.sleep(0.1)


class StalledWebSocket:
    """A WebSocket client that completes the handshake and then stops reading, like a frozen
    browser tab. (Client libraries keep reading in the background, so this speaks the wire
    protocol on a raw socket with a small, fixed receive buffer.)"""

    def __init__(self, host: str, port: int, path: str) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        self.sock.connect((host, port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101"), head

    def drain(self, timeout_s: float = 30) -> tuple[int, int | None]:
        """Read everything now: (text messages received, close code or None on EOF)."""
        self.sock.settimeout(timeout_s)
        data = bytearray()
        messages = 0
        while True:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                return messages, None
            data += chunk
            while len(data) >= 2:
                opcode, length, offset = data[0] & 0x0F, data[1] & 0x7F, 2
                if length == 126:
                    length, offset = struct.unpack(">H", data[2:4])[0], 4
                elif length == 127:
                    length, offset = struct.unpack(">Q", data[2:10])[0], 10
                if len(data) < offset + length:
                    break
                payload = bytes(data[offset : offset + length])
                del data[: offset + length]
                if opcode == 0x8:
                    return messages, struct.unpack(">H", payload[:2])[0] if payload else None
                messages += opcode == 0x1

    def close(self) -> None:
        """Drop the socket."""
        self.sock.close()
