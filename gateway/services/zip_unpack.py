"""Unpacking an uploaded zip into a job's workspace, safely: the archive is the user's, and a
zip can name any path, claim any size and hold symlinks.

Every member's name is cleaned (``..``, absolute paths and drive letters refused), symlinks and
other special files are refused, the unpacked total is bounded by ``max_bytes`` counting the
bytes actually written (never the sizes the archive claims), and the member count by
``MAX_MEMBERS``. Files are written with O_EXCL under directories this function made, so nothing
in the archive can redirect a write outside ``target``.
"""

from __future__ import annotations

import os
import stat
import zipfile
from pathlib import Path

MAX_MEMBERS = 100_000
_CHUNK = 1024 * 1024


class ZipRefused(ValueError):
    """The archive cannot be unpacked as a workspace; the message says why."""


def _clean(name: str) -> list[str]:
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise ZipRefused(f"{name!r} is an absolute path")
    for part in parts:
        if part == ".." or "\x00" in part:
            raise ZipRefused(f"{name!r} leaves the workspace")
    return parts


def unpack(archive: Path, target: Path, *, max_bytes: int) -> tuple[int, int]:
    """Unpack ``archive`` into the empty directory ``target``; returns (files, bytes).
    Raises ZipRefused (not a zip, a bad member, too large, too many members)."""
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ZipRefused(f"not a zip archive: {exc}") from exc
    written = files = 0
    with zf:
        members = zf.infolist()
        if len(members) > MAX_MEMBERS:
            raise ZipRefused(f"the archive has {len(members)} members (at most {MAX_MEMBERS})")
        for member in members:
            parts = _clean(member.filename)
            if not parts:
                continue
            kind = stat.S_IFMT(member.external_attr >> 16)  # 0: no Unix type recorded
            is_dir = member.is_dir()
            if kind and not is_dir and kind != stat.S_IFREG:
                raise ZipRefused(f"{member.filename!r} is not a regular file (a symlink?)")
            path = target.joinpath(*parts)
            parent = path if is_dir else path.parent
            _make_dirs(target, parent)
            if is_dir:
                continue
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "wb") as out, zf.open(member) as source:
                while chunk := source.read(_CHUNK):
                    written += len(chunk)
                    if written > max_bytes:
                        raise ZipRefused(f"the archive unpacks to more than {max_bytes} bytes")
                    out.write(chunk)
            files += 1
    return files, written


def _make_dirs(root: Path, directory: Path) -> None:
    """Make ``directory`` (inside ``root``) one level at a time, refusing anything on the way
    that is not a real directory."""
    current = root
    for part in directory.relative_to(root).parts:
        current = current / part
        try:
            os.mkdir(current, 0o755)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(current).st_mode):
                raise ZipRefused(f"{part!r} is both a file and a directory") from None
