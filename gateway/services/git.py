"""Git for registered repositories: which URLs may be cloned, and running ``git`` bounded.

URL policy (``check_url``): ``https://``; ``ssh://`` and scp-like ``user@host:path``;
``http://`` only with ``CCGATE_REPO_ALLOW_HTTP``; ``file://`` only inside a directory of
``CCGATE_REPO_FILE_ROOTS`` (the gateway's own files — other users' clones among them — are never
reachable). Refused: every other transport (``ext::`` runs a command), a password or token in
the URL (it would be stored and logged in clear), a URL starting with ``-`` (an option to git).
Git itself is held to the same transports (``GIT_ALLOW_PROTOCOL``), so a redirect or a submodule
cannot leave them.

``run_git`` runs one git command as an asyncio subprocess in its own process group with no
terminal prompt, no system or user config (``HOME`` is a private empty directory), killed with
its children at ``timeout_s``; ``GitFailed`` carries the tail of its stderr. A deploy key (an
SSH private key) is written 0600 for the command's duration only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from gateway.batch_config import BatchSettings
from gateway.errors import InvalidRequest

_SCP_LIKE = re.compile(r"^(?P<user>[A-Za-z0-9._-]+)@(?P<host>[A-Za-z0-9.-]+):(?P<path>[^/].*)$")
_STDERR_TAIL = 2000
GIT_LOCAL_TIMEOUT_S = 30.0
"""Bound of a git command that only reads or writes the local clone."""


class GitFailed(Exception):
    """A git command failed, timed out or could not start; the message says which and why."""


@dataclass(frozen=True)
class UrlPolicy:
    """What may be cloned: ``allow_http`` permits plain http; ``file_roots`` are the
    directories under which ``file://`` URLs may point (none: file URLs refused)."""

    allow_http: bool = False
    file_roots: tuple[Path, ...] = ()

    @classmethod
    def of(cls, settings: BatchSettings) -> UrlPolicy:
        """The deployment's policy (``CCGATE_REPO_ALLOW_HTTP``, ``CCGATE_REPO_FILE_ROOTS``)."""
        return cls(allow_http=settings.repo_allow_http, file_roots=tuple(settings.repo_file_roots))

    @property
    def protocols(self) -> str:
        """``GIT_ALLOW_PROTOCOL`` for every git command (colon-separated)."""
        allowed = ["https", "ssh"]
        if self.allow_http:
            allowed.append("http")
        if self.file_roots:
            allowed.append("file")
        return ":".join(allowed)


def check_url(url: str, policy: UrlPolicy) -> str:
    """The URL's transport (``https``, ``http``, ``ssh`` or ``file``) if the policy allows it;
    raises InvalidRequest saying what to fix."""
    if not url or url.startswith("-") or any(c.isspace() for c in url):
        raise InvalidRequest("git_url must be a URL without spaces, not starting with '-'")
    if _SCP_LIKE.match(url):
        return "ssh"
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("https", "http", "ssh"):
        if not parts.hostname:
            raise InvalidRequest(f"git_url {url!r} has no host")
        if parts.password is not None:
            raise InvalidRequest(
                "git_url must not carry a password or token; use a deploy key (ssh) or a "
                "repository the gateway can read"
            )
        if scheme == "http" and not policy.allow_http:
            raise InvalidRequest("plain http git URLs are off (CCGATE_REPO_ALLOW_HTTP)")
        return scheme
    if scheme == "file":
        if not policy.file_roots:
            raise InvalidRequest("file:// git URLs are off (CCGATE_REPO_FILE_ROOTS is empty)")
        if parts.netloc not in ("", "localhost"):
            raise InvalidRequest("a file:// git URL names a local path: file:///path")
        path = Path(os.path.realpath(parts.path))
        if not any(path.is_relative_to(os.path.realpath(root)) for root in policy.file_roots):
            raise InvalidRequest(
                f"{parts.path} is outside the directories file:// URLs may use "
                "(CCGATE_REPO_FILE_ROOTS)"
            )
        return "file"
    raise InvalidRequest(
        "git_url must be https://, ssh:// (or user@host:path), file:// or, when allowed, "
        f"http://; got {url!r}"
    )


async def run_git(
    args: list[str],
    *,
    policy: UrlPolicy,
    timeout_s: float,
    cwd: Path | None = None,
    deploy_key: str | None = None,
) -> str:
    """Run ``git ARGS`` (stdout returned, decoded); raises GitFailed on a non-zero exit, a
    timeout (the process group is killed) or a git that cannot start."""
    with tempfile.TemporaryDirectory(prefix="ccgate-git-") as home:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": home,
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_ALLOW_PROTOCOL": policy.protocols,
            "GIT_ASKPASS": "/bin/false",
            # Clones belong to the session user (job workspaces); git run by root must
            # still work in them ("dubious ownership" otherwise). Command-line scope.
            "GIT_CONFIG_COUNT": "1",
            "GIT_CONFIG_KEY_0": "safe.directory",
            "GIT_CONFIG_VALUE_0": "*",
            "SSH_ASKPASS": "/bin/false",
            "LC_ALL": "C",
        }
        ssh = [
            "ssh",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=accept-new",
            "-o",
            f"UserKnownHostsFile={home}/known_hosts",
        ]
        if deploy_key is not None:
            key = Path(home) / "deploy_key"
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(deploy_key.rstrip("\n") + "\n")
            ssh += ["-i", str(key), "-o", "IdentitiesOnly=yes"]
        env["GIT_SSH_COMMAND"] = " ".join(ssh)
        try:
            process = await asyncio.create_subprocess_exec(
                "git",
                *args,
                cwd=cwd,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            raise GitFailed(f"git could not start: {exc}") from exc
        try:
            out, err = await asyncio.wait_for(process.communicate(), timeout_s)
        except TimeoutError:
            await _kill_group(process)
            raise GitFailed(f"git {args[0]} timed out after {timeout_s:.0f}s") from None
        except asyncio.CancelledError:
            await _kill_group(process)
            raise
    if process.returncode != 0:
        tail = err.decode(errors="replace").strip()[-_STDERR_TAIL:]
        raise GitFailed(f"git {args[0]} failed (exit {process.returncode}): {tail}")
    return out.decode(errors="replace")


async def _kill_group(process: asyncio.subprocess.Process) -> None:
    """SIGKILL the command and everything it started (ssh, remote helpers), then reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(process.wait(), 5)


def tree_size(path: Path) -> int:
    """Bytes of every regular file under ``path`` (blocking; run it on an executor)."""
    total = 0
    for top, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(top, name))
                total += st.st_size
    return total


async def head_metadata(directory: Path, policy: UrlPolicy) -> dict[str, object]:
    """A clone's checked-out branch, head commit, its committer date (UTC) and subject, and
    the clone's size in bytes, as Repository column values. Raises GitFailed."""

    async def git(*args: str) -> str:
        out = await run_git(list(args), policy=policy, timeout_s=GIT_LOCAL_TIMEOUT_S, cwd=directory)
        return out.strip()

    branch = await git("rev-parse", "--abbrev-ref", "HEAD")
    head = await git("log", "-1", "--format=%H%x1f%cI%x1f%s")
    commit, date, subject = head.split("\x1f", 2)
    return {
        "head_branch": branch,
        "head_commit": commit,
        "head_date": datetime.fromisoformat(date).astimezone(UTC),
        "head_subject": subject[:2000],
        "size_bytes": await asyncio.to_thread(tree_size, directory),
    }
