"""Pure logic of jobs: the fair queue order, ``{{name}}`` substitution, structured output
checked against a JSON Schema, and reading an overlay workspace's layers (whiteouts, opaque
directories, symlinks never followed, traversal refused)."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gateway.db.models import JobStatus
from gateway.errors import InvalidRequest, NotFound
from gateway.services import workspace_files
from gateway.services.fair_queue import Queued, QueueState, fair_order, next_to_run
from gateway.services.job_results import substitute, validate_structured
from gateway.services.job_workspace import PreparedWorkspace

T0 = datetime(2026, 12, 1, tzinfo=UTC)


def q(job_id: str, owner: str, second: int) -> Queued:
    return Queued(job_id, owner, T0 + timedelta(seconds=second))


def test_users_take_turns_whatever_order_they_queued_in() -> None:
    queued = [q("a1", "alice", 0), q("a2", "alice", 1), q("a3", "alice", 2), q("b1", "bob", 3)]
    assert [j.job_id for j in fair_order(QueueState(queued))] == ["a1", "b1", "a2", "a3"]


def test_a_user_with_fewer_jobs_running_goes_first_then_the_one_who_started_longest_ago() -> None:
    queued = [q("a1", "alice", 0), q("b1", "bob", 5)]
    state = QueueState(queued, running={"alice": 2, "bob": 1})
    assert [j.job_id for j in fair_order(state)] == ["b1", "a1"]
    tie = QueueState(
        queued,
        running={"alice": 1, "bob": 1},
        last_started={"alice": T0 + timedelta(seconds=9), "bob": T0 + timedelta(seconds=8)},
    )
    assert [j.job_id for j in fair_order(tie)] == ["b1", "a1"]


def test_next_to_run_respects_the_total_and_the_per_user_limits() -> None:
    queued = [q("a1", "alice", 0), q("b1", "bob", 1)]
    full = QueueState(queued, running={"carol": 3})
    assert next_to_run(full, total_limit=3, per_user_limit=2) is None
    alice_full = QueueState(queued, running={"alice": 2})
    pick = next_to_run(alice_full, total_limit=3, per_user_limit=2)
    assert pick is not None and pick.job_id == "b1"
    assert next_to_run(QueueState([]), total_limit=3, per_user_limit=2) is None


def test_placeholders_of_uploaded_files_become_their_paths() -> None:
    prompt = "read {{a.csv}} and {{a.csv}}, not {{other}}"
    assert substitute(prompt, ["a.csv"]) == (
        "read /workspace/.ccgate/uploads/a.csv and /workspace/.ccgate/uploads/a.csv, not {{other}}"
    )


SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


def test_structured_output_is_checked_and_the_violation_named() -> None:
    ok = validate_structured('{"n": 1}', SCHEMA)
    assert ok["status"] is JobStatus.COMPLETED and ok["structured_output"] == {"n": 1}
    bad = validate_structured("x", SCHEMA, data={"n": "one"})
    assert bad["status"] is JobStatus.FAILED
    assert (
        bad["error"]
        == "the result does not conform to json_schema at n: 'one' is not of type 'integer'"
    )
    missing = validate_structured('{"m": 1}', SCHEMA)
    assert "at (root): 'n' is a required property" in missing["error"]
    text = validate_structured("plain words", SCHEMA)
    assert text["status"] is JobStatus.FAILED and "not JSON" in text["error"]


@pytest.fixture
def overlay(tmp_path: Path) -> PreparedWorkspace:
    """A clone (lower) with a.txt, gone.txt, dir/old.txt, shadow/in.txt; the job's upper
    layer modifies a.txt, deletes gone.txt (whiteout), replaces shadow/ (opaque) and adds a
    symlink to /etc."""
    if os.geteuid() != 0:
        pytest.fail("whiteouts (character devices) and trusted xattrs need root")
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    for d in (lower / "dir", lower / "shadow", upper / "shadow"):
        d.mkdir(parents=True)
    (lower / "a.txt").write_text("old\n")
    (lower / "gone.txt").write_text("bye\n")
    (lower / "dir" / "old.txt").write_text("kept\n")
    (lower / "shadow" / "in.txt").write_text("hidden\n")
    (upper / "a.txt").write_text("new\n")
    os.mknod(upper / "gone.txt", 0o600 | 0o020000, os.makedev(0, 0))
    os.setxattr(upper / "shadow", "trusted.overlay.opaque", b"y")
    (upper / "shadow" / "fresh.txt").write_text("fresh\n")
    (upper / "etc").symlink_to("/etc")
    return PreparedWorkspace("overlay", "v", str(upper), str(lower))


def test_an_overlay_workspace_reads_as_the_kernel_shows_it(overlay: PreparedWorkspace) -> None:
    root = {e.name: e.kind for e in workspace_files.list_dir(overlay, "")}
    assert root == {"a.txt": "file", "dir": "dir", "etc": "symlink", "shadow": "dir"}
    assert [e.name for e in workspace_files.list_dir(overlay, "shadow")] == ["fresh.txt"]
    assert [e.name for e in workspace_files.list_dir(overlay, "dir")] == ["old.txt"]
    assert workspace_files.file_path(overlay, "a.txt").read_text() == "new\n"
    assert workspace_files.file_path(overlay, "dir/old.txt").read_text() == "kept\n"
    for hidden in ("gone.txt", "shadow/in.txt", "etc/passwd", "etc"):
        with pytest.raises(NotFound):
            workspace_files.file_path(overlay, hidden)
    with pytest.raises(InvalidRequest):
        workspace_files.file_path(overlay, "../lower/a.txt")
    changes, truncated = workspace_files.changed_files(overlay)
    seen = {c.path: c.change for c in changes}
    assert not truncated
    assert seen == {
        "a.txt": "modified",
        "gone.txt": "deleted",
        "shadow/fresh.txt": "added",
        "etc": "added",
    }


def _zip(path: Path, members: dict[str, bytes], *, symlink: str | None = None) -> Path:
    import stat as stat_
    import zipfile

    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        if symlink is not None:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat_.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return path


def test_a_zip_unpacks_into_the_workspace(tmp_path: Path) -> None:
    from gateway.services.zip_unpack import unpack

    archive = _zip(tmp_path / "ok.zip", {"a.txt": b"a", "dir/b.txt": b"bb", "dir/sub/": b""})
    target = tmp_path / "ws"
    target.mkdir()
    assert unpack(archive, target, max_bytes=100) == (2, 3)
    assert (target / "dir" / "b.txt").read_bytes() == b"bb" and (target / "dir" / "sub").is_dir()


@pytest.mark.parametrize(
    ("members", "symlink", "says"),
    [
        ({"../evil.txt": b"x"}, None, "leaves the workspace"),
        ({"/etc/cron.d/x": b"x"}, None, "absolute path"),
        ({"a.txt": b"x"}, "link", "not a regular file"),
        ({"big.bin": b"0" * 1000}, None, "more than 100 bytes"),
        ({"a": b"x", "a/b": b"y"}, None, "both a file and a directory"),
    ],
)
def test_a_zip_that_leaves_the_workspace_or_is_too_big_is_refused(
    tmp_path: Path, members: dict[str, bytes], symlink: str | None, says: str
) -> None:
    from gateway.services.zip_unpack import ZipRefused, unpack

    archive = _zip(tmp_path / "bad.zip", members, symlink=symlink)
    target = tmp_path / "ws"
    target.mkdir()
    with pytest.raises(ZipRefused, match=says):
        unpack(archive, target, max_bytes=100)
    assert not (tmp_path / "evil.txt").exists()


def test_not_a_zip_is_refused(tmp_path: Path) -> None:
    from gateway.services.zip_unpack import ZipRefused, unpack

    (tmp_path / "x.zip").write_bytes(b"not a zip")
    with pytest.raises(ZipRefused, match="not a zip"):
        unpack(tmp_path / "x.zip", tmp_path, max_bytes=100)


@pytest.mark.parametrize(
    ("spec", "url", "ref"),
    [
        ("https://h/org/r.git@v1.2", "https://h/org/r.git", "v1.2"),
        ("git@github.com:org/r.git", "git@github.com:org/r.git", None),
        ("git@github.com:org/r.git@main", "git@github.com:org/r.git", "main"),
        ("file:///srv/repo", "file:///srv/repo", None),
    ],
)
def test_run_splits_a_git_url_from_its_ref(spec: str, url: str, ref: str | None) -> None:
    from gateway.cli_jobs import split_ref

    assert split_ref(spec) == (url, ref)
