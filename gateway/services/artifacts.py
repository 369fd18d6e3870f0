"""Artifact stores: S3/MinIO through the minio SDK, or a local directory (the embedded default).

Objects live under ``sessions/<session_id>/<path>`` where ``path`` is relative to the session's
/workspace and has passed :func:`safe_relative_path`.

Bytes are streamed both ways, never held whole in memory: :meth:`ArtifactStore.put_stream`
reads from a file object in the calling thread (S3 uploads large objects in multipart parts of
``PART_SIZE``), and :meth:`ArtifactStore.open` yields chunks of ``CHUNK`` bytes. Every blocking
call runs on the store's own thread pool (``gateway.executors``).
"""

from __future__ import annotations

import abc
import io
import mimetypes
import os
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path, PurePosixPath
from typing import BinaryIO, TypeVar

from minio import Minio
from minio.error import S3Error
from urllib3.exceptions import HTTPError

from gateway.errors import DependencyUnavailable, InvalidRequest
from gateway.executors import BlockingPool

T = TypeVar("T")

CHUNK = 64 * 1024
"""Bytes per chunk of a streamed download."""
PART_SIZE = 16 * 1024 * 1024
"""S3 multipart part size: objects larger than this are uploaded in parts."""


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

    def __init__(self, pool: BlockingPool | None = None) -> None:
        self.pool = pool or BlockingPool("storage", 8)

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise DependencyUnavailable unless the store is usable."""

    @abc.abstractmethod
    def put_stream(self, session_id: str, path: str, reader: BinaryIO, size: int) -> None:
        """Store (or replace) one artifact of ``size`` bytes read from ``reader``.

        Blocking: call it from a worker thread. Raises DependencyUnavailable("storage", ...).
        """

    async def put(self, session_id: str, path: str, data: bytes) -> None:
        """Store (or replace) one artifact from bytes in memory (small files, tests)."""
        await self.pool.run(lambda: self.put_stream(session_id, path, io.BytesIO(data), len(data)))

    @abc.abstractmethod
    async def open(self, session_id: str, path: str) -> AsyncIterator[bytes]:
        """The artifact's bytes in chunks; raises FileNotFoundError before the first chunk
        when it is missing."""

    async def get(self, session_id: str, path: str) -> bytes:
        """The whole artifact in memory (small files, tests); raises FileNotFoundError."""
        return b"".join([chunk async for chunk in await self.open(session_id, path)])

    @abc.abstractmethod
    async def delete_session(self, session_id: str) -> None:
        """Remove every artifact of a session."""

    def close(self) -> None:
        """Release the thread pool."""
        self.pool.shutdown()


class LocalArtifactStore(ArtifactStore):
    """Artifacts as files under a directory on the gateway's host."""

    def __init__(self, root: Path, pool: BlockingPool | None = None) -> None:
        super().__init__(pool)
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
            await self.pool.run(_check)
        except OSError as exc:
            raise DependencyUnavailable("storage", str(exc)) from exc

    def put_stream(self, session_id: str, path: str, reader: BinaryIO, size: int) -> None:
        """Copy into a temp file, then rename over the target (readers never see a torn file)."""
        target = self._file(session_id, path)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            with open(tmp, "wb") as out:
                shutil.copyfileobj(reader, out, CHUNK)
            tmp.replace(target)
        except OSError as exc:
            raise DependencyUnavailable("storage", str(exc)) from exc

    async def open(self, session_id: str, path: str) -> AsyncIterator[bytes]:
        """Chunks of the file; FileNotFoundError when it is missing."""
        fh = await self.pool.run(lambda: open(self._file(session_id, path), "rb"))

        async def chunks() -> AsyncIterator[bytes]:
            try:
                while chunk := await self.pool.run(lambda: fh.read(CHUNK)):
                    yield chunk
            finally:
                fh.close()

        return chunks()

    async def delete_session(self, session_id: str) -> None:
        """Remove the session's directory."""
        root = self.root / "sessions" / session_id
        await self.pool.run(lambda: shutil.rmtree(root, ignore_errors=True))


class S3ArtifactStore(ArtifactStore):
    """Artifacts in an S3-compatible bucket (MinIO in docker-compose.yml)."""

    def __init__(self, client: Minio, bucket: str, pool: BlockingPool | None = None) -> None:
        super().__init__(pool)
        self._client = client
        self._bucket = bucket

    async def _call(self, fn: Callable[[], T]) -> T:
        try:
            return await self.pool.run(fn)
        except (S3Error, HTTPError, OSError) as exc:
            raise _translate(exc) from exc

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

    def put_stream(self, session_id: str, path: str, reader: BinaryIO, size: int) -> None:
        """Upload one object (multipart above PART_SIZE)."""
        try:
            self._client.put_object(
                self._bucket,
                object_key(session_id, path),
                reader,
                size,
                content_type=content_type_of(path),
                part_size=PART_SIZE,
            )
        except (S3Error, HTTPError, OSError) as exc:
            raise _translate(exc) from exc

    async def open(self, session_id: str, path: str) -> AsyncIterator[bytes]:
        """Chunks of the object; FileNotFoundError when it is missing."""
        key = object_key(session_id, path)
        response = await self._call(lambda: self._client.get_object(self._bucket, key))

        def _close() -> None:
            response.close()
            response.release_conn()

        async def chunks() -> AsyncIterator[bytes]:
            try:
                while chunk := await self._call(lambda: response.read(CHUNK)):
                    yield bytes(chunk)
            finally:
                await self.pool.run(_close)

        return chunks()

    async def delete_session(self, session_id: str) -> None:
        """Delete every object under the session's prefix."""

        def _delete() -> None:
            prefix = f"sessions/{session_id}/"
            for obj in self._client.list_objects(self._bucket, prefix=prefix, recursive=True):
                self._client.remove_object(self._bucket, obj.object_name)

        await self._call(_delete)


def _translate(exc: Exception) -> Exception:
    """FileNotFoundError for a missing object, DependencyUnavailable("storage") otherwise."""
    if isinstance(exc, S3Error) and exc.code in ("NoSuchKey", "NoSuchObject"):
        return FileNotFoundError(exc.message)
    return DependencyUnavailable("storage", str(exc))
