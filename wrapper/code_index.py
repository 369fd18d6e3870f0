"""A lexical index of a repository's files (SQLite FTS5), built once per clone generation by the
gateway (so once per commit, shared by every job on it) or per job by the code-search server
when the workspace has none. Standard library only: it runs in the gateway and in the session
image.

The index is one SQLite file: table ``files(path, body)`` (FTS5, ``unicode61`` tokens with
``_`` kept inside words, so identifiers are single tokens) and ``meta(key, value)`` (``commit``,
``files``, ``bytes``, ``skipped``, ``built_at``). Only text is indexed: files up to
``max_file_bytes`` with no NUL byte in their first 8 KiB, outside ``.git``, never through a
symlink, until ``max_total_bytes`` of text (the rest is counted in ``skipped``).
"""

from __future__ import annotations

import os
import re
import sqlite3
import stat
import time
from dataclasses import dataclass
from pathlib import Path

INDEX_IN_GIT_DIR = "ccgate-index.sqlite"
"""The index's name inside a clone's ``.git`` (out of git's view and of the work tree)."""
MAX_FILE_BYTES = 1024 * 1024
MAX_TOTAL_BYTES = 512 * 1024 * 1024
_TOKEN = re.compile(r"[A-Za-z0-9_]+")


@dataclass(frozen=True)
class IndexStats:
    """What an index holds: files and bytes of text indexed, files skipped."""

    files: int
    bytes: int
    skipped: int


def _text(path: Path, limit: int) -> str | None:
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        data = path.read_bytes()
    except OSError:
        return None
    if b"\x00" in data[:8192]:
        return None
    return data.decode("utf-8", errors="replace")


def build_index(
    root: Path,
    target: Path,
    *,
    commit: str | None = None,
    max_file_bytes: int = MAX_FILE_BYTES,
    max_total_bytes: int = MAX_TOTAL_BYTES,
) -> IndexStats:
    """Index the text files under ``root`` into a new SQLite file ``target`` (written beside
    it, then renamed: an index is whole or absent). Raises OSError / sqlite3.Error."""
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    files = total = skipped = 0
    db = sqlite3.connect(partial)
    try:
        db.execute(
            "CREATE VIRTUAL TABLE files USING fts5(path UNINDEXED, body, "
            "tokenize = \"unicode61 tokenchars '_'\")"
        )
        db.execute("CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT)")
        for directory, dirs, names in os.walk(root):
            dirs[:] = sorted(
                d for d in dirs if d != ".git" and not os.path.islink(Path(directory, d))
            )
            for name in sorted(names):
                path = Path(directory, name)
                body = _text(path, max_file_bytes) if total < max_total_bytes else None
                if body is None:
                    skipped += 1
                    continue
                db.execute(
                    "INSERT INTO files(path, body) VALUES (?, ?)",
                    (str(path.relative_to(root)), body),
                )
                files += 1
                total += len(body)
        meta = {"commit": commit or "", "files": files, "bytes": total, "skipped": skipped,
                "built_at": int(time.time())}  # fmt: skip
        db.executemany("INSERT INTO meta VALUES (?, ?)", [(k, str(v)) for k, v in meta.items()])
        db.commit()
    finally:
        db.close()
    os.chmod(partial, 0o644)
    os.replace(partial, target)
    return IndexStats(files, total, skipped)


def fts_query(text: str) -> str:
    """A user's words as an FTS5 query: every word must appear (each quoted, so no FTS5
    syntax gets through)."""
    words = _TOKEN.findall(text)
    return " AND ".join(f'"{w}"' for w in words[:16])


def search(index: Path, text: str, *, limit: int = 20) -> list[str]:
    """Paths of the files containing every word of ``text``, best match first."""
    query = fts_query(text)
    if not query:
        return []
    db = sqlite3.connect(f"file:{index}?mode=ro", uri=True)
    try:
        rows = db.execute(
            "SELECT path FROM files WHERE files MATCH ? ORDER BY rank LIMIT ?", (query, limit)
        ).fetchall()
    finally:
        db.close()
    return [str(r[0]) for r in rows]


def describe(index: Path) -> dict[str, str]:
    """The index's ``meta`` rows."""
    db = sqlite3.connect(f"file:{index}?mode=ro", uri=True)
    try:
        return {str(k): str(v) for k, v in db.execute("SELECT key, value FROM meta")}
    finally:
        db.close()
