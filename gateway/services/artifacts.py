"""Artifact stores: S3/MinIO through the minio SDK, or a local directory (the embedded default).

Objects live under ``sessions/<session_id>/<path>`` where ``path`` is relative to the session's
/workspace and has passed :func:`safe_relative_path`.
"""

from __future__ import annotations

import abc
import asyncio
import io
import mimetypes
import os
import shutil
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import TypeVar

from minio import Minio
from minio.error import S3Error
from urllib3.exceptions import HTTPError

from gateway.errors import DependencyUnavailable, InvalidRequest

T = TypeVar("T")


def safe_relative_path(path: str) -> str:
    """Normalise a workspace-relative path; raises InvalidRequest on traversal or absolute paths.

    ``a/./b`` becomes ``a/b``; ``/etc/passwd``, ``../x``, ``a/../../x``, empty paths, NUL bytes
    and backslashes are refused.
    """
    if not path or "\x00" in path or "\\" in path:
        raise InvalidRequest("artifact path must be a non-empty relative path")
    pure = PurePosixPath(path)
    if pure.is_absolute() or any(part == ".." for part in pure.parts):
        raise InvalidRequest("artifact path must stay inside the workspace (no '..', not absolute)")
    parts = [p for p in pure.parts if p not in ("", ".")]
    if not parts:
        raise InvalidRequest("artifact path must name a file")
    return "/".join(parts)


def object_key(session_id: str, path: str) -> str:
    """Storage key of a session's artifact."""
    return f"sessions/{session_id}/{safe_relative_path(path)}"


def content_type_of(path: str) -> str:
    """Best-guess MIME type from the file name."""
    return mimetypes.guess_type(path)[0] or "application/octet-stream"


class ArtifactStore(abc.ABC):
    """Where artifact bytes live. Raises DependencyUnavailable("storage", ...) when down."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise DependencyUnavailable unless the store is usable."""

    @abc.abstractmethod
    async def put(self, session_id: str, path: str, data: bytes) -> None:
        """Store (or replace) one artifact."""

    @abc.abstractmethod
    async def get(self, session_id: str, path: str) -> bytes:
        """Read one artifact; raises FileNotFoundError."""

    @abc.abstractmethod
    async def delete_session(self, session_id: str) -> None:
        """Remove every artifact of a session."""


class LocalArtifactStore(ArtifactStore):
    """Artifacts as files under a directory on the gateway's host."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _file(self, session_id: str, path: str) -> Path:
        return self.root / object_key(session_id, path)

    async def ping(self) -> None:
        """The directory must exist and be writable."""

        def _check() -> None:
            self.root.mkdir(parents=True, exist_ok=True)
            if not os.access(self.root, os.W_OK):
                raise OSError(f"{self.root} is not writable")

        try:
            await asyncio.to_thread(_check)
        except OSError as exc:
            raise DependencyUnavailable("storage", str(exc)) from exc

    async def put(self, session_id: str, path: str, data: bytes) -> None:
        """Write atomically (temp file + rename)."""
        target = self._file(session_id, path)

        def _write() -> None:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            tmp.write_bytes(data)
            tmp.replace(target)

        try:
            await asyncio.to_thread(_write)
        except OSError as exc:
            raise DependencyUnavailable("storage", str(exc)) from exc

    async def get(self, session_id: str, path: str) -> bytes:
        """Read one artifact; raises FileNotFoundError."""
        return await asyncio.to_thread(self._file(session_id, path).read_bytes)

    async def delete_session(self, session_id: str) -> None:
        """Remove the session's directory."""
        await asyncio.to_thread(
            shutil.rmtree, self.root / "sessions" / session_id, ignore_errors=True
        )


class S3ArtifactStore(ArtifactStore):
    """Artifacts in an S3-compatible bucket (MinIO in docker-compose.yml)."""

    def __init__(self, client: Minio, bucket: str) -> None:
        self._client = client
        self._bucket = bucket

    async def _call(self, fn: Callable[[], T]) -> T:
        try:
            return await asyncio.to_thread(fn)
        except (S3Error, HTTPError, OSError) as exc:
            if isinstance(exc, S3Error) and exc.code in ("NoSuchKey", "NoSuchObject"):
                raise FileNotFoundError(exc.message) from exc
            raise DependencyUnavailable("storage", str(exc)) from exc

    async def ensure_bucket(self) -> None:
        """Create the bucket when missing."""

        def _ensure() -> None:
            if not self._client.bucket_exists(self._bucket):
                self._client.make_bucket(self._bucket)

        await self._call(_ensure)

    async def ping(self) -> None:
        """The bucket must exist and answer."""
        exists = await self._call(lambda: self._client.bucket_exists(self._bucket))
        if not exists:
            raise DependencyUnavailable("storage", f"bucket {self._bucket} does not exist")

    async def put(self, session_id: str, path: str, data: bytes) -> None:
        """Upload one object."""
        key = object_key(session_id, path)
        await self._call(
            lambda: self._client.put_object(
                self._bucket, key, io.BytesIO(data), len(data), content_type=content_type_of(path)
            )
        )

    async def get(self, session_id: str, path: str) -> bytes:
        """Download one object; raises FileNotFoundError."""
        key = object_key(session_id, path)

        def _get() -> bytes:
            response = self._client.get_object(self._bucket, key)
            try:
                return bytes(response.read())
            finally:
                response.close()
                response.release_conn()

        return await self._call(_get)

    async def delete_session(self, session_id: str) -> None:
        """Delete every object under the session's prefix."""

        def _delete() -> None:
            prefix = f"sessions/{session_id}/"
            for obj in self._client.list_objects(self._bucket, prefix=prefix, recursive=True):
                self._client.remove_object(self._bucket, obj.object_name)

        await self._call(_delete)
