"""Which addresses a spawn callback may reach (SSRF), and the pinned http request."""

from __future__ import annotations

import ipaddress

import pytest

from gateway.errors import CallbackRefused
from gateway.services.callbacks import _pinned, parse_networks, refusal, resolve_callback


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("10.1.2.3", "private"),
        ("172.17.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fd00::1", "private"),
        ("::ffff:127.0.0.1", "loopback"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("93.184.216.34", None),
        ("2606:4700::1111", None),
    ],
)
def test_addresses_are_classified(address: str, kind: str | None) -> None:
    assert refusal(ipaddress.ip_address(address), []) == kind


def test_an_operator_can_allow_a_network() -> None:
    allowed = parse_networks(["10.20.0.0/16"])
    assert refusal(ipaddress.ip_address("10.20.3.4"), allowed) is None
    assert refusal(ipaddress.ip_address("10.21.3.4"), allowed) == "private"


async def test_a_name_resolving_to_loopback_is_refused_with_the_reason() -> None:
    loopback = r"resolves to (127\.0\.0\.1|::1), a loopback address"
    with pytest.raises(CallbackRefused, match=loopback):
        await resolve_callback("http://localhost:8080/hook", [])
    with pytest.raises(CallbackRefused, match="does not resolve"):
        await resolve_callback("http://no-such-host.invalid/hook", [])


def test_http_is_sent_to_the_checked_address_with_the_name_as_host() -> None:
    url, headers = _pinned("http://hooks.example:8080/x?y=1", ipaddress.ip_address("10.0.0.5"))
    assert url == "http://10.0.0.5:8080/x?y=1" and headers == {"Host": "hooks.example:8080"}
    assert _pinned("https://hooks.example/x", ipaddress.ip_address("10.0.0.5")) == (
        "https://hooks.example/x",
        {},
    )
