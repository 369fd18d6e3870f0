"""Workspace diffs that become artifacts."""

from __future__ import annotations

import os
from pathlib import Path

from wrapper.workspace import WorkspaceTracker


def test_reports_created_and_modified_files_once_and_deleted_paths(tmp_path: Path) -> None:
    (tmp_path / "old.txt").write_text("before")
    tracker = WorkspaceTracker(str(tmp_path))
    tracker.baseline()
    assert tracker.changes() == ([], [])

    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "new.txt").write_text("new")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ignored")
    changed, deleted = tracker.changes()
    assert [c.path for c in changed] == ["sub/new.txt"] and deleted == []
    assert changed[0].size == 3 and len(changed[0].sha256) == 64

    os.utime(tmp_path / "old.txt", ns=(1, 1))
    (tmp_path / "sub" / "new.txt").unlink()
    changed, deleted = tracker.changes()
    assert [c.path for c in changed] == ["old.txt"] and deleted == ["sub/new.txt"]


def test_symlinks_are_not_followed(tmp_path: Path) -> None:
    tracker = WorkspaceTracker(str(tmp_path))
    tracker.baseline()
    (tmp_path / "link").symlink_to("/etc/passwd")
    assert tracker.changes() == ([], [])
