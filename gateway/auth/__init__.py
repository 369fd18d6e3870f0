"""Authentication: HS256 JWT bearer tokens; the ``sub`` claim owns everything a user creates."""

from gateway.auth.tokens import InvalidToken, Principal, decode_token, mint_token

__all__ = ["InvalidToken", "Principal", "decode_token", "mint_token"]
