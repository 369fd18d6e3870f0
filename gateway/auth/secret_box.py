"""Secrets at rest (deploy keys, MCP profile secrets): Fernet (AES-128-CBC + HMAC-SHA256, from
the ``cryptography`` package) under a key derived from the deployment's secret.

The key is HKDF-SHA256 of ``CCGATE_SECRETS_KEY`` if set, else of the JWT signing key, with a
fixed ``info`` so it differs from every other use of that secret. Rotating that secret makes
stored secrets unreadable (``open`` raises SecretUnreadable): register them again.
"""

from __future__ import annotations

import base64

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_INFO = b"ccgate secrets at rest v1"


class SecretUnreadable(Exception):
    """A stored secret cannot be decrypted (the deployment's secret changed, or the value was
    altered)."""


class SecretBox:
    """``seal(text) -> token`` and ``open(token) -> text``; tokens are URL-safe ASCII."""

    def __init__(self, secret: str) -> None:
        raw = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(
            secret.encode()
        )
        self._fernet = Fernet(base64.urlsafe_b64encode(raw))

    def seal(self, text: str) -> str:
        """Encrypt and authenticate ``text``."""
        return self._fernet.encrypt(text.encode()).decode()

    def open(self, token: str) -> str:
        """Decrypt a token from ``seal``; raises SecretUnreadable."""
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken as exc:
            raise SecretUnreadable("a stored secret cannot be decrypted") from exc
