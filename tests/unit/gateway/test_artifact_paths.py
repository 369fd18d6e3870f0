"""Artifact paths cannot leave the workspace."""

from __future__ import annotations

import pytest

from gateway.errors import InvalidRequest
from gateway.services.artifacts import object_key, safe_relative_path


@pytest.mark.parametrize(
    "path", ["/etc/passwd", "../x", "a/../../x", "a/..", "", ".", "a\\b", "a\x00b"]
)
def test_traversal_and_absolute_paths_are_refused(path: str) -> None:
    with pytest.raises(InvalidRequest):
        safe_relative_path(path)


def test_paths_are_normalised_under_the_session_prefix() -> None:
    assert safe_relative_path("./a//b/./c.txt") == "a/b/c.txt"
    assert object_key("s1", "out/report.md") == "sessions/s1/out/report.md"
