"""Reading a job's workspace from the gateway's host: one directory's entries, one file, and
the files the job changed — through the overlay's layers as the kernel would show them.

An overlay workspace (job_workspace.py) is its upper directory over the clone: a name in the
upper layer hides the clone's; a character device 0/0 there is a *whiteout* (the job deleted
that name); a directory marked opaque (xattr ``trusted.overlay.opaque=y``) hides the whole
clone directory below it. Other workspaces are one directory.

Everything in a workspace was written by the agent, so it is untrusted: paths are cleaned
(``..``, absolute and empty parts refused), no symlink is ever followed — a symlink is listed
as one and cannot be read — and only regular files are opened.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import InvalidRequest, NotFound
from gateway.services.job_workspace import PreparedWorkspace

MAX_CHANGED = 10_000
"""Most entries :func:`changed_files` returns (``truncated`` says when there were more)."""


@dataclass(frozen=True)
class Entry:
    """One name in a workspace directory: ``kind`` is file, dir, symlink or other; ``size``
    in bytes (files only)."""

    name: str
    kind: str
    size: int | None


@dataclass(frozen=True)
class Change:
    """A path the job added, modified or deleted (relative to the workspace)."""

    path: str
    change: str
    size: int | None


def clean_path(path: str) -> list[str]:
    """``path`` as its parts; InvalidRequest for ``..``, NUL or anything odd."""
    parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]
    for part in parts:
        if part == ".." or "\x00" in part:
            raise InvalidRequest(f"path {path!r} is not inside the workspace")
        if len(part.encode()) > 255:
            raise InvalidRequest("a path part is longer than 255 bytes")
    if len(parts) > 64 or len(path) > 4096:
        raise InvalidRequest("path is too long")
    return parts


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _is_opaque(directory: Path) -> bool:
    try:
        return os.getxattr(directory, "trusted.overlay.opaque", follow_symlinks=False) == b"y"
    except OSError:
        return False


def _kind(st: os.stat_result) -> str:
    if stat.S_ISREG(st.st_mode):
        return "file"
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    if stat.S_ISLNK(st.st_mode):
        return "symlink"
    return "other"


def _layers(ws: PreparedWorkspace) -> list[Path]:
    return [Path(ws.upper)] + ([Path(ws.lower)] if ws.lower else [])


def _resolve(ws: PreparedWorkspace, parts: list[str]) -> list[Path]:
    """The host paths of ``parts`` in each layer that shows it, top first (several for a
    directory merged from both layers). NotFound when the name does not exist, is deleted, or
    passes through a symlink. A layer hides the ones below it for this path when it has a
    whiteout or a non-directory on the way, an opaque directory on the way, or the path
    itself as a file or an opaque directory."""
    found: list[Path] = []
    for layer in _layers(ws):
        current = layer
        hides_below = False
        present = True
        for index, part in enumerate(parts):
            current = current / part
            try:
                st = os.lstat(current)
            except OSError:  # missing, not a directory, a name the filesystem refuses
                present = False
                break
            if _is_whiteout(st):
                present, hides_below = False, True
                break
            if index < len(parts) - 1:
                if not stat.S_ISDIR(st.st_mode):
                    present, hides_below = False, True
                    break
                if _is_opaque(current):
                    hides_below = True
        if present:
            found.append(current)
            if not stat.S_ISDIR(os.lstat(current).st_mode) or (parts and _is_opaque(current)):
                hides_below = True
        if hides_below:
            break
    if not found:
        _missing(parts)
    return found


def _missing(parts: list[str]) -> list[Path]:
    raise NotFound(f"{'/'.join(parts) or '/'} is not in the workspace")


def list_dir(ws: PreparedWorkspace, path: str) -> list[Entry]:
    """The entries of one workspace directory, by name. NotFound / InvalidRequest (a file)."""
    parts = clean_path(path)
    layers = _resolve(ws, parts)
    if not stat.S_ISDIR(os.lstat(layers[0]).st_mode):
        raise InvalidRequest(f"{path} is a file; download it instead")
    entries: dict[str, Entry] = {}
    hidden: set[str] = set()
    for directory in layers:
        with os.scandir(directory) as names:
            for item in names:
                if item.name in entries or item.name in hidden:
                    continue
                st = item.stat(follow_symlinks=False)
                if _is_whiteout(st):
                    hidden.add(item.name)
                    continue
                size = st.st_size if stat.S_ISREG(st.st_mode) else None
                entries[item.name] = Entry(item.name, _kind(st), size)
    return [entries[name] for name in sorted(entries)]


def file_path(ws: PreparedWorkspace, path: str) -> Path:
    """The host path of one regular file of the workspace (to stream it). NotFound for a
    missing file, a directory, a symlink or a device."""
    parts = clean_path(path)
    if not parts:
        raise InvalidRequest("name a file")
    top = _resolve(ws, parts)[0]
    if not stat.S_ISREG(os.lstat(top).st_mode):
        raise NotFound(f"{path} is not a regular file")
    return top


def changed_files(ws: PreparedWorkspace) -> tuple[list[Change], bool]:
    """What the job changed: for an overlay workspace, every file of its upper layer (added, or
    modified when the clone has it) and every whiteout (deleted); for the others, every file
    (added). Sorted by path; (changes, truncated)."""
    upper = Path(ws.upper)
    lower = Path(ws.lower) if ws.lower else None
    changes: list[Change] = []
    for root, dirs, files in os.walk(upper):
        dirs.sort()
        rel_root = os.path.relpath(root, upper)
        for name in sorted(files + [d for d in dirs if os.path.islink(os.path.join(root, d))]):
            full = os.path.join(root, name)
            rel = os.path.normpath(os.path.join(rel_root, name))
            st = os.lstat(full)
            if _is_whiteout(st):
                changes.append(Change(rel, "deleted", None))
            else:
                existed = lower is not None and os.path.lexists(lower / rel)
                size = st.st_size if stat.S_ISREG(st.st_mode) else None
                changes.append(Change(rel, "modified" if existed else "added", size))
            if len(changes) >= MAX_CHANGED:
                return changes, True
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
    return changes, False
