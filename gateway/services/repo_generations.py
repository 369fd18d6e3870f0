"""Generations of a repository's clone (``CCGATE_REPOS_DIR/<id>/g<N>``): making the next one
cheaply from the current one, and removing a repository's directory."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

from gateway.services.git import GitFailed
from wrapper.code_index import INDEX_IN_GIT_DIR, build_index

logger = logging.getLogger(__name__)


def snapshot(source: Path, target: Path) -> None:
    """A new generation from ``source``: every file hard-linked (``cp -al``), then git's own
    files outside ``.git/objects`` (index, refs, logs, config — which git rewrites or appends
    to in place) replaced by real copies. Objects are immutable and git replaces work-tree
    files by unlinking them, so nothing done in ``target`` shows through in ``source``."""
    done = subprocess.run(
        ["cp", "-al", "--", str(source), str(target)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise GitFailed(f"cannot link the clone for the pull: {done.stderr.strip()[-300:]}")
    git_dir = target / ".git"
    for root, dirs, files in os.walk(git_dir):
        if Path(root) == git_dir and "objects" in dirs:
            dirs.remove("objects")
        for name in files:
            path = Path(root) / name
            if name == INDEX_IN_GIT_DIR and Path(root) == git_dir:
                path.unlink()  # the code index is rebuilt for the new commit
                continue
            if path.is_symlink() or not path.is_file():
                continue
            copy = path.with_name(f".{name}.ccgate-copy")
            shutil.copy2(path, copy)
            os.replace(copy, path)


def remove_root(root: Path, *, everything: bool) -> None:
    """Remove a repository's directory: all of it (``everything``: the repository is gone and
    no job uses a generation), or only when nothing is left in it."""
    if everything:
        shutil.rmtree(root, ignore_errors=True)
        return
    with contextlib.suppress(OSError):
        root.rmdir()


def index_generation(directory: Path, commit: str | None, max_bytes: int) -> None:
    """Build the generation's code index (``.git/ccgate-index.sqlite``, wrapper/code_index.py)
    for the built-in code-search profile; a failure is logged, not raised (the code-search
    server then builds one per job)."""
    if not (directory / ".git").is_dir():
        return
    try:
        stats = build_index(
            directory,
            directory / ".git" / INDEX_IN_GIT_DIR,
            commit=commit,
            max_total_bytes=max_bytes,
        )
    except (OSError, sqlite3.Error) as exc:
        logger.warning("code index of %s not built: %s", directory, exc)
        return
    logger.info("code index of %s: %d files, %d bytes", directory, stats.files, stats.bytes)
