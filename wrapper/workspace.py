"""Which files in the workspace a turn created, changed or deleted (the artifact manifest)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

SKIP_DIRS = frozenset({".git", "node_modules", "__pycache__", ".venv", ".cache"})


@dataclass(frozen=True)
class FileChange:
    """A created or modified regular file: path relative to the workspace, size in bytes, sha256."""

    path: str
    size: int
    sha256: str

    def as_dict(self) -> dict[str, object]:
        """JSON shape used in the turn_completed event's ``files`` list."""
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


class WorkspaceTracker:
    """Snapshots (size, mtime) of regular files under ``root`` and reports differences.

    Symlinks are not followed; directories in :data:`SKIP_DIRS` are ignored; at most
    ``max_files`` files are tracked per scan (the rest are counted in ``truncated``).
    """

    def __init__(self, root: str, *, max_files: int = 5000) -> None:
        self.root = root
        self.max_files = max_files
        self._known: dict[str, tuple[int, int]] = {}
        self.truncated = 0

    def _scan(self) -> dict[str, tuple[int, int]]:
        found: dict[str, tuple[int, int]] = {}
        self.truncated = 0
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                try:
                    st = os.lstat(full)
                except OSError:
                    continue
                if not os.path.isfile(full) or os.path.islink(full):
                    continue
                if len(found) >= self.max_files:
                    self.truncated += 1
                    continue
                found[os.path.relpath(full, self.root)] = (st.st_size, st.st_mtime_ns)
        return found

    def baseline(self) -> None:
        """Remember the current state without reporting it (files that predate the session)."""
        self._known = self._scan()

    def changes(self) -> tuple[list[FileChange], list[str]]:
        """Files created or modified since the last call, and paths deleted since then."""
        current = self._scan()
        changed: list[FileChange] = []
        for rel, stat in current.items():
            if self._known.get(rel) != stat:
                digest = _sha256(os.path.join(self.root, rel))
                if digest is not None:
                    changed.append(FileChange(rel, stat[0], digest))
        deleted = sorted(rel for rel in self._known if rel not in current)
        self._known = current
        return changed, deleted


def _sha256(path: str) -> str | None:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()
