"""JWT checks: algorithm pinned, exp and sub required."""

from __future__ import annotations

import base64
import json
import time

import pytest
from jose import jwt

from gateway.auth import InvalidToken, decode_token, mint_token

KEY = "unit-test-key-unit-test-key-unit-test"


def _b64(obj: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


def test_a_minted_token_names_its_user() -> None:
    assert decode_token(mint_token(key=KEY, user="alice", ttl_s=60), key=KEY).user == "alice"


def test_expired_tokens_are_refused() -> None:
    token = mint_token(key=KEY, user="alice", ttl_s=10, now=time.time() - 3600)
    with pytest.raises(InvalidToken, match="expired"):
        decode_token(token, key=KEY)


def test_a_token_signed_with_another_key_is_refused() -> None:
    with pytest.raises(InvalidToken):
        decode_token(mint_token(key="another-key-entirely-xxxxxxxx", user="a", ttl_s=60), key=KEY)


def test_alg_none_is_refused() -> None:
    token = f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64({'sub': 'a', 'exp': 2**31})}."
    with pytest.raises(InvalidToken, match="HS256"):
        decode_token(token, key=KEY)


def test_other_algorithms_are_refused_even_with_the_right_key() -> None:
    token = jwt.encode({"sub": "a", "exp": int(time.time()) + 60}, KEY, algorithm="HS512")
    with pytest.raises(InvalidToken, match="HS256"):
        decode_token(token, key=KEY)


def test_exp_and_sub_are_required() -> None:
    no_exp = jwt.encode({"sub": "a"}, KEY, algorithm="HS256")
    with pytest.raises(InvalidToken):
        decode_token(no_exp, key=KEY)
    no_sub = jwt.encode({"exp": int(time.time()) + 60}, KEY, algorithm="HS256")
    with pytest.raises(InvalidToken):
        decode_token(no_sub, key=KEY)


def test_garbage_is_refused() -> None:
    with pytest.raises(InvalidToken):
        decode_token("not-a-jwt", key=KEY)


def test_a_session_token_carries_its_scope_and_a_user_token_none() -> None:
    scoped = mint_token(key=KEY, user="alice", ttl_s=60, session_scope="s-1")
    assert decode_token(scoped, key=KEY).session_scope == "s-1"
    assert decode_token(mint_token(key=KEY, user="alice", ttl_s=60), key=KEY).session_scope is None
    bad = jwt.encode(
        {"sub": "a", "exp": int(time.time()) + 60, "ccgate_session": 5}, KEY, algorithm="HS256"
    )
    with pytest.raises(InvalidToken, match="scope"):
        decode_token(bad, key=KEY)
