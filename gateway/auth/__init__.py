"""Authentication: HS256 JWT bearer tokens whose ``sub`` is the owner of everything a user creates."""

from gateway.auth.tokens import InvalidToken, Principal, decode_token, mint_token

__all__ = ["InvalidToken", "Principal", "decode_token", "mint_token"]
