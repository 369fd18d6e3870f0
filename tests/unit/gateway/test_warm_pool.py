"""Warm-pool matching (pure logic): which creates a profile's containers can serve."""

from __future__ import annotations

import pytest

from gateway.config import PoolProfile, Settings
from gateway.db.models import Session
from gateway.schemas import SessionConfig
from gateway.services.provision import session_spec
from gateway.services.warm_pool import container_fingerprint, match, resolve_profiles


def _settings(**extra: object) -> Settings:
    return Settings(jwt_secret="x" * 32, **extra)  # type: ignore[arg-type]


def _fingerprint(settings: Settings, **config: object) -> str:
    """The fingerprint of a create with this config, resolved as creation.py stores it."""
    cfg = SessionConfig.model_validate(config)
    stored = cfg.model_dump(mode="json") | {
        "model": cfg.model or settings.default_model,
        "permission_mode": (
            cfg.permission_mode.value if cfg.permission_mode else settings.default_permission_mode
        ),
    }
    session = Session(id="any", owner="u", workspace_volume="v", config=stored)
    return container_fingerprint(settings, session_spec(settings, session), stored)


def test_a_default_create_matches_the_default_profile_whatever_its_per_session_settings() -> None:
    settings = _settings(warm_pool=[PoolProfile(name="default", min_size=1)])
    [profile] = resolve_profiles(settings)
    assert match([profile], _fingerprint(settings)) == profile
    # Explicit defaults are the same CLI; per-session limits ride in the claim.
    same = _fingerprint(
        settings,
        model=settings.default_model,
        timeout_seconds=30,
        idle_timeout_s=60,
        max_lifetime_s=600,
        session_budget_usd=1.5,
    )
    assert same == profile.fingerprint


@pytest.mark.parametrize(
    "config",
    [
        {"model": "claude-opus-4-1"},
        {"permission_mode": "plan"},
        {"system_prompt": "be brief"},
        {"allowed_tools": ["Read"]},
        {"env": {"A": "1"}},
        {"egress": {"policy": "open"}},
        {"mcp_servers": {"x": {"command": "y"}}},
        {"include_partial_messages": True},
        {"max_turns": 3},
    ],
)
def test_anything_that_changes_the_cli_or_the_container_misses(config: dict[str, object]) -> None:
    settings = _settings(warm_pool=[PoolProfile(name="default", min_size=1)])
    profiles = resolve_profiles(settings)
    assert match(profiles, _fingerprint(settings, **config)) is None


def test_a_profile_with_its_own_config_matches_only_that_config() -> None:
    settings = _settings(
        warm_pool=[
            PoolProfile(name="default", min_size=1),
            PoolProfile(name="opus-plan", min_size=1, config={"model": "claude-opus-4-1",
                                                               "permission_mode": "plan"}),
        ]
    )  # fmt: skip
    profiles = resolve_profiles(settings)
    hit = match(profiles, _fingerprint(settings, model="claude-opus-4-1", permission_mode="plan"))
    assert hit is not None and hit.name == "opus-plan"


def test_the_image_is_part_of_the_fingerprint() -> None:
    a = _settings(warm_pool=[PoolProfile(name="default", min_size=1)])
    b = _settings(warm_pool=[PoolProfile(name="default", min_size=1)], image="other:1")
    assert resolve_profiles(a)[0].fingerprint != resolve_profiles(b)[0].fingerprint


def test_bad_profiles_stop_the_start_with_a_message_naming_them() -> None:
    with pytest.raises(ValueError, match="profile names must be unique"):
        _settings(warm_pool=[PoolProfile(name="a"), PoolProfile(name="a")])
    with pytest.raises(ValueError, match="max_size is below min_size"):
        PoolProfile(name="a", min_size=3, max_size=2)
    allowlist = _settings(
        warm_pool=[PoolProfile(name="web", config={"egress": {"policy": "allowlist",
                                                              "domains": ["example.com"]}})]
    )  # fmt: skip
    with pytest.raises(ValueError, match="profile web: egress allowlist sessions start cold"):
        resolve_profiles(allowlist)
    owned = _settings(warm_pool=[PoolProfile(name="gh", config={"mcp_profiles": ["dev"]})])
    with pytest.raises(ValueError, match="profile gh: mcp_profiles belong to a user"):
        resolve_profiles(owned)
    typo = _settings(warm_pool=[PoolProfile(name="typo", config={"modle": "x"})])
    with pytest.raises(ValueError, match="CCGATE_WARM_POOL profile typo"):
        resolve_profiles(typo)
    assert PoolProfile(name="a", min_size=2).max_size == 2
