"""Which git URLs the gateway clones, and secrets at rest."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.auth.secret_box import SecretBox, SecretUnreadable
from gateway.errors import InvalidRequest
from gateway.services.git import UrlPolicy, check_url


@pytest.mark.parametrize(
    ("url", "scheme"),
    [
        ("https://github.com/org/repo.git", "https"),
        ("ssh://git@github.com/org/repo.git", "ssh"),
        ("git@github.com:org/repo.git", "ssh"),
    ],
)
def test_https_and_ssh_are_always_cloned(url: str, scheme: str) -> None:
    assert check_url(url, UrlPolicy()) == scheme


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://example.org/r.git", "plain http"),
        ("file:///srv/git/r", "file:// git URLs are off"),
        ("ext::sh -c id", "without spaces"),
        ("ext::ssh", "must be https://"),
        ("fd::17", "must be https://"),
        ("/srv/git/r", "must be https://"),
        ("https://tok:x@example.org/r.git", "password or token"),
        ("--upload-pack=touch /tmp/x", "without spaces"),
        ("-oProxyCommand=x", "not starting with '-'"),
        ("", "without spaces"),
    ],
)
def test_everything_else_is_refused_by_default(url: str, says: str) -> None:
    with pytest.raises(InvalidRequest, match=says):
        check_url(url, UrlPolicy())


def test_file_urls_stay_inside_their_roots(tmp_path: Path) -> None:
    root = tmp_path / "git"
    (root / "r").mkdir(parents=True)
    (tmp_path / "private").mkdir()
    (root / "link").symlink_to(tmp_path / "private")
    policy = UrlPolicy(file_roots=(root,))
    assert check_url(f"file://{root}/r", policy) == "file"
    for outside in (f"file://{root}/../private", f"file://{root}/link", "file:///etc"):
        with pytest.raises(InvalidRequest, match="outside"):
            check_url(outside, policy)
    with pytest.raises(InvalidRequest, match="local path"):
        check_url(f"file://otherhost{root}/r", policy)
    assert policy.protocols == "https:ssh:file"
    assert UrlPolicy(allow_http=True).protocols == "https:ssh:http"


def test_secrets_round_trip_and_another_key_cannot_read_them() -> None:
    box = SecretBox("deployment secret")
    sealed = box.seal("-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n")
    assert "abc" not in sealed
    assert box.open(sealed).endswith("abc\n")
    assert SecretBox("deployment secret").open(sealed) == box.open(sealed)
    with pytest.raises(SecretUnreadable):
        SecretBox("another secret").open(sealed)
    with pytest.raises(SecretUnreadable):
        box.open(sealed[:-4] + "AAAA")
