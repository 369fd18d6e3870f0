"""File objects for streaming a file out of a container's tar archive (``get_archive``) without
holding it whole: a reader over the SDK's chunk iterator, and one that counts and hashes."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import IO


class ChunkReader:
    """A read-only file object over the SDK's chunk iterator (for tarfile's stream mode)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = b""

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buffer) < size:
            try:
                self._buffer += next(self._chunks)
            except StopIteration:
                break
        if size < 0:
            out, self._buffer = self._buffer, b""
        else:
            out, self._buffer = self._buffer[:size], self._buffer[size:]
        return out


class HashingReader:
    """Counts and hashes what passes through (the sink's reads)."""

    def __init__(self, inner: IO[bytes]) -> None:
        self._inner = inner
        self.sha256 = hashlib.sha256()
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self._inner.read(size)
        self.sha256.update(data)
        self.count += len(data)
        return data

    def drain(self) -> None:
        """Read whatever the sink left unread, so size and hash cover the whole file."""
        while self.read(256 * 1024):
            pass
