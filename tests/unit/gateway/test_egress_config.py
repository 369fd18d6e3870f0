"""Egress allowlists: config validation and the proxy's rules (pure)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from gateway.schemas import EgressConfig
from gateway.services.egress import domain_rule, proxy_config


def test_domains_are_validated_and_normalised() -> None:
    config = EgressConfig(policy="allowlist", domains=["PyPI.org.", "*.example.com"])
    assert config.domains == ["pypi.org", "*.example.com"]
    for bad in (["not a domain"], ["exa mple.com"], ["*"], ["-x.com"], ["a" * 254], []):
        with pytest.raises(ValidationError):
            EgressConfig(policy="allowlist", domains=bad)
    with pytest.raises(ValidationError):
        EgressConfig(policy="none", domains=["example.com"])
    assert EgressConfig().policy == "none"


def test_rules_match_the_name_and_only_the_name() -> None:
    exact = re.compile(domain_rule("example.com"))
    assert exact.match("example.com")
    for other in ("evil-example.com", "example.com.evil.net", "sub.example.com", "examplexcom"):
        assert not exact.match(other), other
    wild = re.compile(domain_rule("*.example.com"))
    for ok in ("example.com", "a.example.com", "a.b.example.com"):
        assert wild.match(ok), ok
    for other in ("badexample.com", "example.com.evil.net"):
        assert not wild.match(other), other


def test_the_proxy_denies_by_default_and_authenticates() -> None:
    text = proxy_config(
        port=30001,
        listen="172.17.0.1",
        password="pw",
        filter_path=Path("/x/filter"),
        connect_ports=[443, 80],
    )
    lines = text.splitlines()
    for line in (
        "Port 30001",
        "Listen 172.17.0.1",
        "BasicAuth ccgate pw",
        "FilterDefaultDeny Yes",
        "FilterType ere",
        "FilterURLs Off",
        "ConnectPort 443",
        "ConnectPort 80",
    ):
        assert line in lines, line
