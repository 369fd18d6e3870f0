"""Artifact stores against a real S3-compatible server and a local directory."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from minio import Minio

from gateway.errors import DependencyUnavailable
from gateway.services.artifacts import ArtifactStore, LocalArtifactStore, S3ArtifactStore
from tests.containers import S3Container


async def _exercise(store: ArtifactStore) -> None:
    sid = str(uuid.uuid4())
    await store.ping()
    await store.put(sid, "out/a.bin", b"\x00\x01binary")
    await store.put(sid, "out/a.bin", b"replaced")
    await store.put(sid, "b.txt", b"b")
    assert await store.get(sid, "out/a.bin") == b"replaced"
    with pytest.raises(FileNotFoundError):
        await store.get(sid, "missing.txt")
    await store.delete_session(sid)
    with pytest.raises(FileNotFoundError):
        await store.get(sid, "b.txt")


async def test_s3_store_puts_gets_and_deletes(s3_server: S3Container) -> None:
    client = Minio(
        s3_server.endpoint,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        secure=False,
    )
    store = S3ArtifactStore(client, "ccgate-it")
    await store.ensure_bucket()
    await _exercise(store)


async def test_local_store_puts_gets_and_deletes(tmp_path: Path) -> None:
    await _exercise(LocalArtifactStore(tmp_path / "artifacts"))


async def test_an_unreachable_s3_server_is_reported_as_storage() -> None:
    client = Minio("127.0.0.1:9", access_key="a", secret_key="b", secure=False)
    with pytest.raises(DependencyUnavailable, match="storage"):
        await S3ArtifactStore(client, "ccgate-unreachable").ping()
