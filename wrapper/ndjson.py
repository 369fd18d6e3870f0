"""Newline-delimited JSON framing for the CLI's stdout (stream-json).

stream-json is NDJSON: one JSON object per line. Lines are split on ``\\n`` only; braces and
quotes inside JSON strings are just text, and there is no line-length cap (tool results and
base64 images arrive as single lines of many megabytes).
"""

from __future__ import annotations


class LineSplitter:
    """Accumulates byte chunks and yields complete lines (without the newline).

    Memory is bounded by the longest line plus one chunk. A trailing ``\\r`` is stripped;
    empty lines are dropped.
    """

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def feed(self, chunk: bytes) -> list[bytes]:
        """Add a chunk read from the pipe; return the lines it completed, in order."""
        lines: list[bytes] = []
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            if nl < 0:
                break
            piece = chunk[start:nl]
            if self._parts:
                self._parts.append(piece)
                piece = b"".join(self._parts)
                self._parts.clear()
            if piece.endswith(b"\r"):
                piece = piece[:-1]
            if piece:
                lines.append(piece)
            start = nl + 1
        if start < len(chunk):
            self._parts.append(chunk[start:])
        return lines

    def flush(self) -> bytes | None:
        """Return an unterminated last line at EOF, if any."""
        if not self._parts:
            return None
        rest = b"".join(self._parts).rstrip(b"\r")
        self._parts.clear()
        return rest or None
