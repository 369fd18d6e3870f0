"""The wrapper's outbox: every event is journaled inside the container before it is sent.

Files in the session's state directory (on the per-session config volume, so they survive a
wrapper or container restart):

- ``outbox.jsonl``: one envelope JSON per line, appended in seq order before delivery;
- ``outbox.delivered``: the highest seq Redis has confirmed.

On start the events after ``delivered`` are sent again (delivery is idempotent by seq, see
publisher.py). Once everything appended has been delivered and the journal is larger than
``compact_bytes``, it is truncated. Appends are flushed to the OS, not fsynced: a crash of the
wrapper or the container loses nothing; a crash of the whole machine may lose the last events.
"""

from __future__ import annotations

import contextlib
import json
import os

_SEQ_PREFIX = b'{"seq":'


def _seq_of(line: bytes) -> int:
    end = line.index(b",", len(_SEQ_PREFIX))
    return int(line[len(_SEQ_PREFIX) : end])


class Outbox:
    """Append-only journal of envelopes plus a delivered-up-to marker."""

    def __init__(self, state_dir: str, *, compact_bytes: int = 8 * 1024 * 1024) -> None:
        os.makedirs(state_dir, exist_ok=True)
        self._journal_path = os.path.join(state_dir, "outbox.jsonl")
        self._marker_path = os.path.join(state_dir, "outbox.delivered")
        self._compact_bytes = compact_bytes
        self._journal = open(self._journal_path, "ab")
        self._last_appended = 0
        self._delivered = 0
        self._cursor: tuple[int, int] | None = None  # (next seq expected, byte offset)

    def recover(self) -> tuple[int, list[tuple[int, str]]]:
        """(last journaled seq, undelivered (seq, envelope) in order) from a previous run."""
        try:
            with open(self._marker_path, "rb") as fh:
                self._delivered = int(fh.read().strip() or 0)
        except (OSError, ValueError):
            self._delivered = 0
        pending: list[tuple[int, str]] = []
        last = self._delivered
        try:
            with open(self._journal_path, "rb") as fh:
                for line in fh:
                    line = line.rstrip(b"\n")
                    try:
                        seq = _seq_of(line)
                        json.loads(line)
                    except ValueError:
                        continue  # a torn last line from a crash mid-append
                    last = max(last, seq)
                    if seq > self._delivered:
                        pending.append((seq, line.decode("utf-8", errors="replace")))
        except OSError:
            pass
        self._last_appended = last
        return last, pending

    def append(self, seq: int, envelope: str) -> None:
        """Journal one envelope (before it is sent)."""
        self._journal.write(envelope.encode())
        self._journal.write(b"\n")
        self._journal.flush()
        self._last_appended = seq

    def read_from(self, seq: int, limit: int) -> list[tuple[int, str]]:
        """Up to ``limit`` journaled (seq, envelope) with seq >= ``seq``, in order: the events
        the publisher kept out of memory. Reads on from where the last call stopped, so a
        backlog is read once, front to back."""
        offset = 0
        if self._cursor is not None and self._cursor[0] <= seq:
            offset = self._cursor[1]
        out: list[tuple[int, str]] = []
        with open(self._journal_path, "rb") as fh:
            fh.seek(offset)
            while len(out) < limit:
                line = fh.readline()
                if not line.endswith(b"\n"):
                    break  # end of the journal (or a line still being written)
                offset = fh.tell()
                try:
                    current = _seq_of(line)
                except ValueError:
                    continue
                if current >= seq:
                    out.append((current, line.rstrip(b"\n").decode("utf-8", errors="replace")))
        self._cursor = ((out[-1][0] + 1) if out else seq, offset)
        return out

    def delivered(self, seq: int) -> None:
        """Record that Redis has every event up to ``seq``; compact when all is delivered."""
        self._delivered = seq
        tmp = f"{self._marker_path}.tmp"
        with open(tmp, "wb") as fh:
            fh.write(str(seq).encode())
        os.replace(tmp, self._marker_path)
        if seq >= self._last_appended and self._journal.tell() > self._compact_bytes:
            self._journal.truncate(0)
            self._journal.seek(0)
            self._cursor = None

    def close(self) -> None:
        """Close the journal file (a full disk may refuse the last buffered bytes: they are
        dropped here, the caller already knows the journal failed)."""
        with contextlib.suppress(OSError):
            self._journal.close()
